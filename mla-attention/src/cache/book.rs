//! [`BlockBook`]: the host-side bookkeeping of a paged cache — layer widths, the block
//! allocator, each sequence's block table — shared by the CPU cache
//! ([`LatentPagedCache`](super::LatentPagedCache)) and the CUDA one, which differ only in
//! where their pools live. Every rule about blocks (validation, prefix sharing,
//! copy-on-write, all-or-nothing reservations, truncation) is written here once.

use std::collections::HashMap;

use super::allocator::BlockAllocator;
use super::paged::{CacheConfig, LayerWidth, SeqId};
use super::table::{BlockTable, SeqView};
use super::BlockId;
use crate::error::{Error, Result};

/// Layer widths, blocks and sequences of one paged cache (no row storage).
#[derive(Debug, Clone)]
pub struct BlockBook {
    block_size: usize,
    layers: Vec<LayerWidth>,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, BlockTable>,
    next_seq: u64,
}

impl BlockBook {
    /// Check `config` (positive sizes and ranks, ids and pool sizes in range).
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
        let book = BlockBook {
            block_size,
            layers,
            alloc: BlockAllocator::new(num_blocks),
            seqs: HashMap::new(),
            next_seq: 0,
        };
        for l in 0..book.layers.len() {
            book.pool_len(l)?;
        }
        Ok(book)
    }

    /// Values in `layer`'s pool: `num_blocks · block_size · width`, checked for overflow.
    pub fn pool_len(&self, layer: usize) -> Result<usize> {
        let w = self.width(layer)?.width();
        let num_blocks = self.num_blocks();
        num_blocks
            .checked_mul(self.block_size)
            .and_then(|n| n.checked_mul(w))
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "latent cache: {num_blocks} blocks x {} tokens x {w} values overflow",
                    self.block_size
                ))
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

    /// Values one token costs over all layers: `Σ_l (rank_l + rope_l)`.
    pub fn values_per_token(&self) -> usize {
        self.layers.iter().map(|w| w.width()).sum()
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
        let id = SeqId::from_raw(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, BlockTable::new(self.layers.len()));
        id
    }

    /// `layer`'s row widths, or an error naming the layer count.
    pub fn width(&self, layer: usize) -> Result<LayerWidth> {
        self.layers.get(layer).copied().ok_or_else(|| {
            Error::InvalidInput(format!(
                "latent cache has {} layers, got layer {layer}",
                self.layers.len()
            ))
        })
    }

    pub fn block_table(&self, seq: SeqId) -> Result<&BlockTable> {
        self.seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence { seq: seq.get() })
    }

    /// Tokens of `layer` cached for `seq`.
    pub fn tokens(&self, seq: SeqId, layer: usize) -> Result<usize> {
        self.width(layer)?;
        Ok(self.block_table(seq)?.layer_tokens[layer])
    }

    /// `seq`'s blocks and its token count in `layer`.
    pub fn view(&self, seq: SeqId, layer: usize) -> Result<SeqView<'_>> {
        self.width(layer)?;
        let t = self.block_table(seq)?;
        Ok(SeqView {
            blocks: &t.blocks,
            tokens: t.layer_tokens[layer],
        })
    }

    /// Check that `view` names only blocks of this cache and that they cover its tokens;
    /// a decode calls this before reading.
    pub fn check_view(&self, layer: usize, view: &SeqView<'_>) -> Result<()> {
        self.width(layer)?;
        check_blocks(layer, self.block_size, self.num_blocks(), view)
    }

    /// A new sequence sharing all of `seq`'s blocks (prefix sharing: counts go up,
    /// nothing is copied). Never needs a free block.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let table = self.block_table(seq)?.clone();
        for &b in &table.blocks {
            self.alloc.retain(b);
        }
        let id = SeqId::from_raw(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, table);
        Ok(id)
    }

    /// Rows in `len` values of `layer`, after checking that `width` is the layer's and
    /// that the values are whole rows.
    pub fn whole_rows(&self, layer: usize, width: usize, len: usize) -> Result<usize> {
        let expected = self.width(layer)?.width();
        if width != expected {
            return Err(Error::WidthMismatch {
                layer,
                what: "appended rows",
                got: width,
                expected,
            });
        }
        if !len.is_multiple_of(width) {
            return Err(Error::InvalidInput(format!(
                "layer {layer}: {len} values are not whole rows of width {width}"
            )));
        }
        Ok(len / width)
    }

    /// Make room for `n` more rows of `layer` in `seq` and return their pool slots
    /// (`block · block_size + offset`, in token order). Blocks it writes into that other
    /// sequences share are first copied by `copy(from, to)` (all layers) into fresh ones
    /// (copy-on-write). The blocks needed are counted against the free list before
    /// anything changes: on [`Error::CacheFull`] the cache is as before.
    pub(crate) fn reserve(
        &mut self,
        seq: SeqId,
        layer: usize,
        n: usize,
        copy: &mut dyn FnMut(BlockId, BlockId) -> Result<()>,
    ) -> Result<Vec<usize>> {
        self.width(layer)?;
        let bs = self.block_size;
        let table = self.block_table(seq)?;
        let start = table.layer_tokens[layer];
        let end = start + n;
        if n == 0 {
            return Ok(Vec::new());
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
        // Copy first, release the shared originals only once every copy succeeded, so a
        // failed copy (device error) leaves the counts and tables as they were.
        let mut blocks = table.blocks.clone();
        let fresh: Vec<BlockId> = cow
            .iter()
            .map(|_| {
                self.alloc
                    .allocate()
                    .expect("counted against the free list")
            })
            .collect();
        for (&i, &to) in cow.iter().zip(&fresh) {
            if let Err(e) = copy(blocks[i], to) {
                for &b in &fresh {
                    self.alloc.release(b);
                }
                return Err(e);
            }
        }
        for (&i, &to) in cow.iter().zip(&fresh) {
            self.alloc.release(blocks[i]);
            blocks[i] = to;
        }
        for _ in 0..new_blocks {
            blocks.push(
                self.alloc
                    .allocate()
                    .expect("counted against the free list"),
            );
        }
        let slots = (start..end)
            .map(|t| blocks[t / bs] as usize * bs + t % bs)
            .collect();
        let table = self.seqs.get_mut(&seq).expect("checked above");
        table.blocks = blocks;
        table.layer_tokens[layer] = end;
        Ok(slots)
    }

    /// Drop `layer`'s tokens of `seq` beyond `tokens` (rejected draft tokens, or undoing
    /// part of a step). Blocks no layer needs any more go back to the allocator.
    pub fn truncate(&mut self, seq: SeqId, layer: usize, tokens: usize) -> Result<()> {
        self.width(layer)?;
        let bs = self.block_size;
        let table = self
            .seqs
            .get_mut(&seq)
            .ok_or(Error::UnknownSequence { seq: seq.get() })?;
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
            .ok_or(Error::UnknownSequence { seq: seq.get() })?;
        for b in table.blocks {
            self.alloc.release(b);
        }
        Ok(())
    }
}

/// `view` names only blocks below `num_blocks`, and they cover its tokens.
pub(crate) fn check_blocks(
    layer: usize,
    block_size: usize,
    num_blocks: usize,
    view: &SeqView<'_>,
) -> Result<()> {
    if let Some(&bad) = view.blocks.iter().find(|&&b| b as usize >= num_blocks) {
        return Err(Error::BadBlock {
            block: bad as usize,
            num_blocks,
            reason: format!("layer {layer}: block id out of range"),
        });
    }
    if view.blocks.len() * block_size < view.tokens {
        return Err(Error::BadBlock {
            block: view.blocks.len(),
            num_blocks,
            reason: format!(
                "layer {layer}: {} block(s) of {block_size} tokens cannot hold {} tokens",
                view.blocks.len(),
                view.tokens
            ),
        });
    }
    Ok(())
}
