//! [`LatentPagedCache`]: the host pools over a [`BlockBook`]; the widths, configs and
//! handles every paged cache shares.

use candle_core::{DType, Tensor};

use super::book::{check_blocks, BlockBook};
use super::elem::LatentElem;
use super::table::SeqView;
use super::BlockId;
use crate::error::Result;

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
        check_blocks(self.layer, self.block_size, self.num_blocks, view)
    }
}

/// A paged cache of MLA latent rows `[c ; RoPE(k_pe)]` for many sequences and layers:
/// a [`BlockBook`] (widths, blocks, sequences — reached through `Deref`) and one host
/// pool per layer. See the [module docs](super) for the layout and the sharing rules.
#[derive(Debug, Clone)]
pub struct LatentPagedCache<T: LatentElem = f32> {
    book: BlockBook,
    /// One pool per layer: `(num_blocks, block_size, width_l)`.
    pools: Vec<Vec<T>>,
}

impl<T: LatentElem> std::ops::Deref for LatentPagedCache<T> {
    type Target = BlockBook;
    fn deref(&self) -> &BlockBook {
        &self.book
    }
}

impl<T: LatentElem> std::ops::DerefMut for LatentPagedCache<T> {
    fn deref_mut(&mut self) -> &mut BlockBook {
        &mut self.book
    }
}

impl<T: LatentElem> LatentPagedCache<T> {
    /// Allocate every pool up front (`num_blocks · block_size · Σ_l width_l` values).
    pub fn new(config: CacheConfig) -> Result<Self> {
        let book = BlockBook::new(config)?;
        let pools = (0..book.num_layers())
            .map(|l| Ok(vec![T::default(); book.pool_len(l)?]))
            .collect::<Result<_>>()?;
        Ok(LatentPagedCache { book, pools })
    }

    /// Bytes one token costs over all layers: `Σ_l (rank_l + rope_l) · T::BYTES`.
    pub fn bytes_per_token(&self) -> usize {
        self.values_per_token() * T::BYTES
    }

    /// Bytes of one block over all layers.
    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * self.block_size()
    }

    /// Bytes the pools actually hold (allocated up front); equals
    /// `bytes_per_token() · capacity_tokens()`.
    pub fn pool_bytes(&self) -> usize {
        self.pools
            .iter()
            .map(|p| std::mem::size_of_val(p.as_slice()))
            .sum()
    }

    /// The pool of `layer`, for decode kernels.
    pub fn layer(&self, layer: usize) -> Result<LayerBlocks<'_, T>> {
        let width = self.width(layer)?;
        Ok(LayerBlocks {
            layer,
            width,
            block_size: self.block_size(),
            num_blocks: self.num_blocks(),
            data: &self.pools[layer],
        })
    }

    /// Append `rows` (`(tokens, width)` row-major, f32) to `layer` of `seq`.
    /// `width` must be the layer's `rank + rope`. A shared block written into is first
    /// copied (copy-on-write); the blocks needed are counted against the free list
    /// before anything changes, so on error the cache is as before.
    pub fn append(&mut self, seq: SeqId, layer: usize, width: usize, rows: &[f32]) -> Result<()> {
        let n = self.book.whole_rows(layer, width, rows.len())?;
        let (book, pools) = (&mut self.book, &mut self.pools);
        // A block of a layer is its pool's length over the block count.
        let num_blocks = book.num_blocks();
        let slots = book.reserve(seq, layer, n, &mut |from, to| {
            for pool in pools.iter_mut() {
                let len = pool.len() / num_blocks;
                let (src, dst) = (from as usize * len, to as usize * len);
                pool.copy_within(src..src + len, dst);
            }
            Ok(())
        })?;
        let pool = &mut self.pools[layer];
        for (slot, row) in slots.into_iter().zip(rows.chunks_exact(width)) {
            let at = slot * width;
            for (dst, &v) in pool[at..at + width].iter_mut().zip(row) {
                *dst = T::from_f32(v);
            }
        }
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

    /// `seq`'s rows of `layer` gathered into `(tokens, rank + rope)` f32 (tests,
    /// debugging, handing a prefix to a contiguous form; decode never gathers).
    pub fn gather(&self, seq: SeqId, layer: usize) -> Result<Vec<f32>> {
        let blocks = self.layer(layer)?;
        let view = self.view(seq, layer)?;
        let mut out = Vec::with_capacity(view.tokens * blocks.width.width());
        let mut left = view.tokens;
        for &b in view.blocks {
            let n = left.min(self.block_size());
            out.extend(blocks.rows(b, n).iter().map(|v| v.to_f32()));
            left -= n;
        }
        Ok(out)
    }
}
