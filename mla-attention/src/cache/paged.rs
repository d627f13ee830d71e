//! [`LatentPagedCache`]: the pools, the allocator and the sequences' block tables.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::allocator::BlockAllocator;
use super::elem::LatentElem;
use super::table::{BlockTable, SeqView};
use super::BlockId;
use crate::error::{Error, Result};

/// Widths of one layer's cached row `[c (rank) ; k_pe (rope)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerWidth {
    /// `r_l`: this layer's latent rank (`kv_lora_rank`, or a per-layer CARE rank).
    pub rank: usize,
    /// `d_rope`: width of the shared RoPE key.
    pub rope: usize,
}

impl LayerWidth {
    /// The row of an MLA layer of `shape`: `kv_lora_rank + qk_rope_head_dim`.
    pub fn of_shape(shape: &crate::mla::MlaShape) -> Self {
        LayerWidth {
            rank: shape.kv_lora_rank,
            rope: shape.qk_rope_head_dim,
        }
    }

    /// Values per cached row: `rank + rope`.
    pub fn width(&self) -> usize {
        self.rank + self.rope
    }
}

/// What a [`LatentPagedCache`] is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Tokens per block (the same for every layer).
    pub block_size: usize,
    /// Blocks in the pool; each holds `block_size` tokens of every layer.
    pub num_blocks: usize,
    /// One entry per layer.
    pub layers: Vec<LayerWidth>,
}

/// An opaque sequence handle, never reused within one cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    /// The raw id (for messages and logs).
    pub fn get(self) -> u64 {
        self.0
    }

    /// A handle from a raw id; the cache rejects ids it did not hand out.
    pub fn from_raw(id: u64) -> Self {
        SeqId(id)
    }
}

/// Read-only view of one layer's pool, what a decode kernel needs.
#[derive(Debug, Clone, Copy)]
pub struct LayerBlocks<'a, T> {
    pub layer: usize,
    pub width: LayerWidth,
    pub block_size: usize,
    pub num_blocks: usize,
    /// `(num_blocks, block_size, rank + rope)`, row-major.
    pub data: &'a [T],
}

impl<'a, T> LayerBlocks<'a, T> {
    /// The first `rows` rows of `block`, `(rows, rank + rope)` flattened. The id
    /// must be valid (kernels check their [`SeqView`]s first).
    #[inline]
    pub fn rows(&self, block: BlockId, rows: usize) -> &'a [T] {
        let w = self.width.width();
        let start = block as usize * self.block_size * w;
        &self.data[start..start + rows * w]
    }

    /// Check that `view` only names blocks of this pool and that they cover its
    /// tokens; the decode calls this before reading.
    pub fn check(&self, view: &SeqView<'_>) -> Result<()> {
        if let Some(&bad) = view.blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            return Err(Error::BadBlock {
                block: bad as usize,
                num_blocks: self.num_blocks,
                reason: format!("layer {}: block id out of range", self.layer),
            });
        }
        let covered = view.blocks.len() * self.block_size;
        if covered < view.tokens {
            return Err(Error::BadBlock {
                block: view.blocks.len(),
                num_blocks: self.num_blocks,
                reason: format!(
                    "layer {}: {} block(s) of {} tokens cannot hold {} tokens",
                    self.layer,
                    view.blocks.len(),
                    self.block_size,
                    view.tokens
                ),
            });
        }
        Ok(())
    }
}

/// A paged cache of MLA latent rows `[c ; RoPE(k_pe)]` for many sequences and layers.
/// See the [module docs](super) for the layout and the sharing rules.
#[derive(Debug, Clone)]
pub struct LatentPagedCache<T: LatentElem = f32> {
    block_size: usize,
    layers: Vec<LayerWidth>,
    /// One pool per layer: `(num_blocks, block_size, width_l)`.
    pools: Vec<Vec<T>>,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, BlockTable>,
    next_seq: u64,
}

impl<T: LatentElem> LatentPagedCache<T> {
    /// Allocate every pool up front (`num_blocks · block_size · Σ_l width_l` values).
    pub fn new(config: CacheConfig) -> Result<Self> {
        let CacheConfig {
            block_size,
            num_blocks,
            layers,
        } = config;
        if block_size == 0 || num_blocks == 0 || layers.is_empty() {
            return Err(Error::InvalidInput(format!(
                "latent cache needs block_size, num_blocks and layers > 0, got {block_size}, \
                 {num_blocks}, {}",
                layers.len()
            )));
        }
        if num_blocks > BlockId::MAX as usize {
            return Err(Error::InvalidInput(format!(
                "latent cache: {num_blocks} blocks exceed the id range"
            )));
        }
        if let Some((l, w)) = layers.iter().enumerate().find(|(_, w)| w.rank == 0) {
            return Err(Error::InvalidInput(format!(
                "latent cache layer {l}: rank must be positive ({w:?})"
            )));
        }
        let pool_len = |w: &LayerWidth| {
            num_blocks
                .checked_mul(block_size)
                .and_then(|n| n.checked_mul(w.width()))
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "latent cache: {num_blocks} blocks x {block_size} tokens x {} values \
                         overflow",
                        w.width()
                    ))
                })
        };
        let pools = layers
            .iter()
            .map(|w| Ok(vec![T::default(); pool_len(w)?]))
            .collect::<Result<_>>()?;
        Ok(LatentPagedCache {
            block_size,
            layers,
            pools,
            alloc: BlockAllocator::new(num_blocks),
            seqs: HashMap::new(),
            next_seq: 0,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn layer_widths(&self) -> &[LayerWidth] {
        &self.layers
    }

    /// Blocks in the pool (capacity).
    pub fn num_blocks(&self) -> usize {
        self.alloc.num_blocks()
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.free_blocks()
    }

    pub fn used_blocks(&self) -> usize {
        self.alloc.used_blocks()
    }

    /// Tokens the whole pool can hold (without sharing).
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }

    /// Bytes one token costs over all layers: `Σ_l (rank_l + rope_l) · T::BYTES`.
    pub fn bytes_per_token(&self) -> usize {
        self.layers.iter().map(|w| w.width() * T::BYTES).sum()
    }

    /// Bytes of one block over all layers.
    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * self.block_size
    }

    /// Bytes the pools actually hold (allocated up front); equals
    /// `bytes_per_token() · capacity_tokens()`.
    pub fn pool_bytes(&self) -> usize {
        self.pools
            .iter()
            .map(|p| std::mem::size_of_val(p.as_slice()))
            .sum()
    }

    /// Holders of `block` (0 = free).
    pub fn refcount(&self, block: BlockId) -> u32 {
        self.alloc.refcount(block)
    }

    /// Live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, BlockTable::new(self.layers.len()));
        id
    }

    fn table(&self, seq: SeqId) -> Result<&BlockTable> {
        self.seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence { seq: seq.0 })
    }

    fn width(&self, layer: usize) -> Result<LayerWidth> {
        self.layers.get(layer).copied().ok_or_else(|| {
            Error::InvalidInput(format!(
                "latent cache has {} layers, got layer {layer}",
                self.layers.len()
            ))
        })
    }

    pub fn block_table(&self, seq: SeqId) -> Result<&BlockTable> {
        self.table(seq)
    }

    /// Tokens of `layer` cached for `seq`.
    pub fn tokens(&self, seq: SeqId, layer: usize) -> Result<usize> {
        self.width(layer)?;
        Ok(self.table(seq)?.layer_tokens[layer])
    }

    /// The pool of `layer`, for decode kernels.
    pub fn layer(&self, layer: usize) -> Result<LayerBlocks<'_, T>> {
        let width = self.width(layer)?;
        Ok(LayerBlocks {
            layer,
            width,
            block_size: self.block_size,
            num_blocks: self.num_blocks(),
            data: &self.pools[layer],
        })
    }

    /// `seq`'s blocks and its token count in `layer`.
    pub fn view(&self, seq: SeqId, layer: usize) -> Result<SeqView<'_>> {
        self.width(layer)?;
        let t = self.table(seq)?;
        Ok(SeqView {
            blocks: &t.blocks,
            tokens: t.layer_tokens[layer],
        })
    }

    /// A new sequence sharing all of `seq`'s blocks (prefix sharing: counts go up,
    /// nothing is copied). The first append of either sequence into a shared block
    /// copies that block first (copy-on-write). Never needs a free block.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let table = self.table(seq)?.clone();
        for &b in &table.blocks {
            self.alloc.retain(b);
        }
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, table);
        Ok(id)
    }

    /// Append `rows` (`(tokens, width)` row-major, f32) to `layer` of `seq`.
    /// `width` must be the layer's `rank + rope`.
    ///
    /// Everything is checked, and the blocks it needs (new ones, plus a private
    /// copy of each shared block it writes into) are counted against the free list,
    /// before anything changes: on error the cache is as before.
    pub fn append(&mut self, seq: SeqId, layer: usize, width: usize, rows: &[f32]) -> Result<()> {
        let lw = self.width(layer)?;
        if width != lw.width() {
            return Err(Error::WidthMismatch {
                layer,
                what: "appended rows",
                got: width,
                expected: lw.width(),
            });
        }
        if !rows.len().is_multiple_of(width) {
            return Err(Error::InvalidInput(format!(
                "layer {layer}: {} values are not whole rows of width {width}",
                rows.len()
            )));
        }
        let n = rows.len() / width;
        let bs = self.block_size;
        let table = self.table(seq)?;
        let start = table.layer_tokens[layer];
        let end = start + n;
        if n == 0 {
            return Ok(());
        }
        let first = start / bs;
        let have = table.blocks.len();
        let new_blocks = end.div_ceil(bs).saturating_sub(have);
        let cow: Vec<usize> = (first..have.min(end.div_ceil(bs)))
            .filter(|&i| self.alloc.refcount(table.blocks[i]) > 1)
            .collect();
        let needed = new_blocks + cow.len();
        if needed > self.alloc.free_blocks() {
            return Err(Error::CacheFull {
                layer,
                needed_blocks: needed,
                free_blocks: self.alloc.free_blocks(),
                total_blocks: self.alloc.num_blocks(),
            });
        }
        // Checked: from here on nothing fails.
        let mut blocks = self.table(seq)?.blocks.clone();
        for i in cow {
            let fresh = self
                .alloc
                .allocate()
                .expect("counted against the free list");
            self.copy_block(blocks[i], fresh);
            self.alloc.release(blocks[i]);
            blocks[i] = fresh;
        }
        for _ in 0..new_blocks {
            blocks.push(
                self.alloc
                    .allocate()
                    .expect("counted against the free list"),
            );
        }
        let pool = &mut self.pools[layer];
        for (t, row) in (start..end).zip(rows.chunks_exact(width)) {
            let at = (blocks[t / bs] as usize * bs + t % bs) * width;
            for (dst, &v) in pool[at..at + width].iter_mut().zip(row) {
                *dst = T::from_f32(v);
            }
        }
        let table = self.seqs.get_mut(&seq).expect("checked above");
        table.blocks = blocks;
        table.layer_tokens[layer] = end;
        Ok(())
    }

    /// [`Self::append`] from a tensor whose last dim is the row width and whose other
    /// dims multiply to the token count (e.g. `(1, 1, tokens, r + d_rope)` from
    /// [`MlaAttention::latents`](crate::mla::MlaAttention::latents)).
    pub fn append_tensor(&mut self, seq: SeqId, layer: usize, rows: &Tensor) -> Result<()> {
        let width = rows.dims().last().copied().unwrap_or(0);
        let flat = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.append(seq, layer, width, &flat)
    }

    /// Drop `layer`'s tokens of `seq` beyond `tokens` (e.g. rejected speculative
    /// tokens, or undoing part of a batched step). Blocks no layer needs any more
    /// go back to the allocator.
    pub fn truncate(&mut self, seq: SeqId, layer: usize, tokens: usize) -> Result<()> {
        self.width(layer)?;
        let bs = self.block_size;
        let table = self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence { seq: seq.0 })?;
        if tokens > table.layer_tokens[layer] {
            return Err(Error::InvalidInput(format!(
                "layer {layer}: cannot truncate {} tokens to {tokens}",
                table.layer_tokens[layer]
            )));
        }
        table.layer_tokens[layer] = tokens;
        let keep = table.max_tokens().div_ceil(bs);
        for b in table.blocks.drain(keep..) {
            self.alloc.release(b);
        }
        Ok(())
    }

    /// Finish `seq`: release its blocks (shared ones stay with their other holders).
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        let table = self
            .seqs
            .remove(&seq)
            .ok_or(Error::UnknownSequence { seq: seq.0 })?;
        for b in table.blocks {
            self.alloc.release(b);
        }
        Ok(())
    }

    /// `seq`'s rows of `layer` gathered into `(tokens, rank + rope)` f32 (tests,
    /// debugging, handing a prefix to a contiguous form; decode never gathers).
    pub fn gather(&self, seq: SeqId, layer: usize) -> Result<Vec<f32>> {
        let blocks = self.layer(layer)?;
        let view = self.view(seq, layer)?;
        let mut out = Vec::with_capacity(view.tokens * blocks.width.width());
        let mut left = view.tokens;
        for &b in view.blocks {
            let n = left.min(self.block_size);
            out.extend(blocks.rows(b, n).iter().map(|v| v.to_f32()));
            left -= n;
        }
        Ok(out)
    }

    /// Copy block `from` into `to` in every layer.
    fn copy_block(&mut self, from: BlockId, to: BlockId) {
        let bs = self.block_size;
        for (pool, w) in self.pools.iter_mut().zip(&self.layers) {
            let len = bs * w.width();
            let (src, dst) = (from as usize * len, to as usize * len);
            pool.copy_within(src..src + len, dst);
        }
    }
}
