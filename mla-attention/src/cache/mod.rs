//! A paged cache of MLA latents: fixed-size blocks, a block table per sequence,
//! reference-counted prefix sharing with copy-on-write, and exact memory accounting
//! with per-layer widths.
//!
//! Each cached token of layer `l` is one row `[c (r_l) ; RoPE(k_pe) (d_rope)]`, as in
//! the contiguous [`LayerCache`](crate::model::LayerCache) of
//! [`MlaAttention`](crate::mla::MlaAttention).
//!
//! # Layout: one pool per layer, one block id for all layers
//!
//! ```text
//! pool_l   = (num_blocks, block_size, r_l + d_rope)     one Vec<T> per layer
//! block b  = rows b·block_size .. (b+1)·block_size of every pool
//! token t of a sequence  →  pool_l[table.blocks[t / block_size]][t % block_size]
//! ```
//!
//! Why pools per layer rather than one byte arena: all blocks of a pool have one
//! size, so the free list never fragments; a layer with a smaller rank gets a
//! narrower pool, so a token costs exactly `Σ_l (r_l + d_rope_l)·bytes`
//! ([`LatentPagedCache::bytes_per_token`]); and rows stay typed and aligned for the
//! decode loop (and for a future device copy, one buffer per layer). Sharing the
//! block id across layers (as vLLM does) gives one allocator, one reference count
//! and one block table per sequence instead of one per layer. The cost is that
//! every layer of a block is reserved together, which is what a decoder needs
//! anyway: all layers of a token are written in the same step.
//!
//! # Sharing
//!
//! [`LatentPagedCache::fork`] gives a new sequence the same blocks and raises their
//! counts. An append that writes into a block held by more than one sequence first
//! copies it (all layers) into a fresh block; full shared blocks are never written,
//! so a shared prompt costs its blocks once. [`LatentPagedCache::free`] lowers the
//! counts, and a block whose count reaches zero is free again.
//!
//! # Errors
//!
//! Appends check the layer width ([`Error::WidthMismatch`](crate::Error::WidthMismatch)),
//! the sequence ([`Error::UnknownSequence`](crate::Error::UnknownSequence)) and the free
//! list ([`Error::CacheFull`](crate::Error::CacheFull)) before changing anything, so a
//! failed append leaves every sequence as it was. Decode kernels check each
//! [`SeqView`]'s block ids ([`Error::BadBlock`](crate::Error::BadBlock)).
//!
//! ```
//! use mla_attention::cache::{CacheConfig, LatentPagedCache, LayerWidth};
//! let layers = vec![LayerWidth { rank: 64, rope: 8 }, LayerWidth { rank: 16, rope: 8 }];
//! let mut cache = LatentPagedCache::<f32>::new(CacheConfig { block_size: 4, num_blocks: 8, layers })?;
//! assert_eq!(cache.bytes_per_token(), (72 + 24) * 4);
//! let seq = cache.add_sequence();
//! cache.append(seq, 1, 24, &[0.5; 24 * 5])?; // 5 tokens of layer 1: two blocks
//! assert_eq!(cache.used_blocks(), 2);
//! let child = cache.fork(seq)?; // shares both blocks
//! cache.append(child, 1, 24, &[1.0; 24])?; // copies the partial last block
//! assert_eq!(cache.used_blocks(), 3);
//! cache.free(seq)?;
//! cache.free(child)?;
//! assert_eq!(cache.free_blocks(), 8);
//! # Ok::<(), mla_attention::Error>(())
//! ```

pub mod allocator;
pub mod book;
pub mod elem;
pub mod paged;
pub mod pass;
pub mod table;

#[cfg(test)]
mod tests;

/// Index of a block in every layer's pool.
pub type BlockId = u32;

pub use allocator::BlockAllocator;
pub use book::BlockBook;
pub use elem::{AnyLayerBlocks, LatentElem};
pub use paged::{CacheConfig, LatentPagedCache, LayerBlocks, LayerWidth, SeqId};
pub use pass::PassRows;
pub use table::{BlockTable, SeqView};
