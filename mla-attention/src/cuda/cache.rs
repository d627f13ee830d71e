//! [`CudaLatentCache`]: the paged latent cache of [`crate::cache`] with its pools in
//! device memory.
//!
//! Same layout and rules as [`LatentPagedCache`](crate::cache::LatentPagedCache): one
//! pool per layer `(num_blocks, block_size, rank_l + rope_l)`, one block id for all
//! layers, one [`BlockTable`](crate::cache::BlockTable) per sequence, reference-counted prefix sharing with
//! copy-on-write, and every check done before anything changes. The bookkeeping is the
//! CPU cache's own [`BlockBook`] on the host; only rows live on the device. A token costs
//! exactly `Σ_l (rank_l + rope_l) · T::BYTES` ([`CudaLatentCache::bytes_per_token`]).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::elem::CudaLatentElem;
use super::kernels::{driver, MlaKernels};
use crate::cache::{BlockBook, BlockId, CacheConfig, SeqId};
use crate::error::{Error, Result};

/// A paged cache of MLA latent rows `[c ; RoPE(k_pe)]` in device memory: the CPU
/// cache's [`BlockBook`] (reached through `Deref`) over one device pool per layer.
#[derive(Debug)]
pub struct CudaLatentCache<T: CudaLatentElem> {
    kernels: Arc<MlaKernels>,
    book: BlockBook,
    /// One pool per layer: `(num_blocks, block_size, width_l)`.
    pools: Vec<CudaSlice<T>>,
}

impl<T: CudaLatentElem> std::ops::Deref for CudaLatentCache<T> {
    type Target = BlockBook;
    fn deref(&self) -> &BlockBook {
        &self.book
    }
}

impl<T: CudaLatentElem> std::ops::DerefMut for CudaLatentCache<T> {
    fn deref_mut(&mut self) -> &mut BlockBook {
        &mut self.book
    }
}

impl<T: CudaLatentElem> CudaLatentCache<T> {
    /// Allocate every pool up front (zeroed), with the bookkeeping's checks.
    pub fn new(kernels: Arc<MlaKernels>, config: CacheConfig) -> Result<Self> {
        let book = BlockBook::new(config)?;
        let stream = kernels.stream().clone();
        let pools = (0..book.num_layers())
            .map(|l| stream.alloc_zeros::<T>(book.pool_len(l)?).map_err(driver))
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaLatentCache {
            kernels,
            book,
            pools,
        })
    }

    pub fn kernels(&self) -> &Arc<MlaKernels> {
        &self.kernels
    }

    /// Bytes one token costs over all layers: `Σ_l (rank_l + rope_l) · T::BYTES`.
    pub fn bytes_per_token(&self) -> usize {
        self.values_per_token() * T::BYTES
    }

    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * self.block_size()
    }

    /// Device bytes the pools hold: `bytes_per_token() · capacity_tokens()`.
    pub fn pool_bytes(&self) -> usize {
        self.pools.iter().map(|p| p.num_bytes()).sum()
    }

    /// The pool of `layer`: `(num_blocks, block_size, rank + rope)` row-major.
    pub fn pool(&self, layer: usize) -> Result<&CudaSlice<T>> {
        self.width(layer)?;
        Ok(&self.pools[layer])
    }

    /// Append `rows` (`(tokens, width)` row-major, f32 on the host) to `layer` of
    /// `seq`; converted to `T` here and written by one kernel. All checks (width, free
    /// blocks including copy-on-write copies) happen before anything changes.
    pub fn append(&mut self, seq: SeqId, layer: usize, width: usize, rows: &[f32]) -> Result<()> {
        let n = self.book.whole_rows(layer, width, rows.len())?;
        if n == 0 {
            self.block_table(seq)?;
            return Ok(());
        }
        let slots = self.reserve(seq, layer, n)?;
        let host: Vec<T> = rows.iter().map(|&v| T::from_f32(v)).collect();
        let stream = self.kernels.stream().clone();
        let dev_rows = stream.clone_htod(&host).map_err(driver)?;
        self.scatter(layer, &dev_rows.as_view(), &slots)
    }

    /// Append `rows` (`(tokens, width)` of `layer`, already on the device, e.g. a
    /// prefill's latents) to `seq`. Same checks and guarantees as [`Self::append`].
    pub fn append_device(
        &mut self,
        seq: SeqId,
        layer: usize,
        rows: &CudaView<'_, T>,
    ) -> Result<()> {
        let w = self.width(layer)?.width();
        if !rows.len().is_multiple_of(w) {
            return Err(Error::WidthMismatch {
                layer,
                what: "device rows (not whole rows of the layer width)",
                got: rows.len() % w,
                expected: w,
            });
        }
        let n = rows.len() / w;
        if n == 0 {
            self.block_table(seq)?;
            return Ok(());
        }
        let slots = self.reserve(seq, layer, n)?;
        self.scatter(layer, rows, &slots)
    }

    /// Append one row per sequence from device memory: `rows` is `(seqs.len(), width)`
    /// of `layer`, row `i` for `seqs[i]` (distinct). All or nothing: if any sequence
    /// cannot take its row, the others are rolled back and the error returned.
    pub fn append_step(
        &mut self,
        seqs: &[SeqId],
        layer: usize,
        rows: &CudaView<'_, T>,
    ) -> Result<()> {
        self.append_pass(seqs, &vec![1; seqs.len()], layer, rows)
    }

    /// Append `counts[i]` rows to `seqs[i]` (distinct) from device memory: `rows` is
    /// `(Σ counts, width)` of `layer`, sequence-major (a verify pass's rows). All or
    /// nothing, as [`Self::append_step`].
    pub fn append_pass(
        &mut self,
        seqs: &[SeqId],
        counts: &[usize],
        layer: usize,
        rows: &CudaView<'_, T>,
    ) -> Result<()> {
        let w = self.width(layer)?.width();
        let total: usize = counts.iter().sum();
        if counts.len() != seqs.len() || rows.len() != total * w {
            return Err(Error::WidthMismatch {
                layer,
                what: "device rows (pass rows x width)",
                got: rows.len(),
                expected: total * w,
            });
        }
        crate::cache::pass::check_distinct(seqs, "append_pass")?;
        let before: Vec<usize> = seqs
            .iter()
            .map(|&s| self.tokens(s, layer))
            .collect::<Result<_>>()?;
        let mut slots = Vec::with_capacity(total);
        for (i, (&s, &n)) in seqs.iter().zip(counts).enumerate() {
            match self.reserve(s, layer, n) {
                Ok(v) => slots.extend(v),
                Err(e) => {
                    for (&s, &t) in seqs[..i].iter().zip(&before) {
                        // Appended to just above: exists and has >= t rows.
                        let _ = self.truncate(s, layer, t);
                    }
                    return Err(e);
                }
            }
        }
        if slots.is_empty() {
            return Ok(());
        }
        self.scatter(layer, rows, &slots)
    }

    /// Make room for `n` more rows of `layer` in `seq` ([`BlockBook::reserve`], shared
    /// blocks copied on the device) and return their pool slots as the kernel's `u32`s.
    fn reserve(&mut self, seq: SeqId, layer: usize, n: usize) -> Result<Vec<u32>> {
        if self.capacity_tokens() > u32::MAX as usize {
            return Err(Error::InvalidInput(
                "latent cache: slot index exceeds u32".into(),
            ));
        }
        let (book, pools, kernels) = (&mut self.book, &mut self.pools, &self.kernels);
        let num_blocks = book.num_blocks();
        let slots = book.reserve(seq, layer, n, &mut |from, to| {
            copy_block(kernels, pools, num_blocks, from, to)
        })?;
        Ok(slots.into_iter().map(|s| s as u32).collect())
    }

    /// Write `rows` (`(slots.len(), width)`) into `layer`'s pool at `slots`.
    fn scatter(&mut self, layer: usize, rows: &CudaView<'_, T>, slots: &[u32]) -> Result<()> {
        let w = self.layer_widths()[layer].width();
        let stream = self.kernels.stream().clone();
        let dev_slots = stream.clone_htod(slots).map_err(driver)?;
        let (n, w32) = (slots.len() as i32, w as i32);
        let blocks = (slots.len() * w).div_ceil(256).clamp(1, 65535) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let pool = &mut self.pools[layer];
        let f = T::scatter_kernel(&self.kernels);
        // SAFETY: slots were computed above from this cache's blocks (< num_blocks ·
        // block_size); rows holds n · w values; argument order matches the kernel.
        unsafe {
            stream
                .launch_builder(f)
                .arg(pool)
                .arg(rows)
                .arg(&dev_slots)
                .arg(&n)
                .arg(&w32)
                .launch(cfg)
        }
        .map_err(driver)?;
        Ok(())
    }

    /// Fill every pool with uniform values in `[lo, hi)` from a hash of `seed`
    /// (benchmarks: the data a decode reads, without host transfers). The block
    /// tables are unchanged.
    pub fn fill_uniform(&mut self, seed: u64, lo: f32, hi: f32) -> Result<()> {
        let stream = self.kernels.stream().clone();
        for (l, pool) in self.pools.iter_mut().enumerate() {
            let n = pool.len() as u64;
            let s = seed.wrapping_mul(1000).wrapping_add(l as u64);
            let cfg = LaunchConfig {
                grid_dim: ((n.div_ceil(256)).min(65535 * 16) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = T::fill_kernel(&self.kernels);
            // SAFETY: the kernel writes p[0..n), n = the pool's length.
            unsafe {
                stream
                    .launch_builder(f)
                    .arg(pool)
                    .arg(&n)
                    .arg(&s)
                    .arg(&lo)
                    .arg(&hi)
                    .launch(cfg)
            }
            .map_err(driver)?;
        }
        Ok(())
    }

    /// `seq`'s rows of `layer` copied back as `(tokens, rank + rope)` f32 (tests).
    pub fn gather(&self, seq: SeqId, layer: usize) -> Result<Vec<f32>> {
        let w = self.width(layer)?.width();
        let view = self.view(seq, layer)?;
        let stream = self.kernels.stream();
        let mut out = Vec::with_capacity(view.tokens * w);
        let mut left = view.tokens;
        for &b in view.blocks {
            let n = left.min(self.block_size());
            let start = b as usize * self.block_size() * w;
            let host = stream
                .clone_dtoh(&self.pools[layer].slice(start..start + n * w))
                .map_err(driver)?;
            out.extend(host.iter().map(|v| v.to_f32()));
            left -= n;
        }
        Ok(out)
    }

    /// `seq`'s rows of `layer` as one new `(tokens, rank + rope)` device buffer (device
    /// to device, one copy per block): what a decode that rebuilds K/V from every latent
    /// (the one-shot form) reads.
    pub fn gather_device(&self, seq: SeqId, layer: usize) -> Result<CudaSlice<T>> {
        let w = self.width(layer)?.width();
        let view = self.view(seq, layer)?;
        let stream = self.kernels.stream();
        let mut out = stream
            .alloc_zeros::<T>((view.tokens * w).max(1))
            .map_err(driver)?;
        let (mut left, mut off) = (view.tokens, 0);
        for &b in view.blocks {
            let n = left.min(self.block_size());
            let start = b as usize * self.block_size() * w;
            let src = self.pools[layer].slice(start..start + n * w);
            let mut dst = out.slice_mut(off..off + n * w);
            stream.memcpy_dtod(&src, &mut dst).map_err(driver)?;
            off += n * w;
            left -= n;
        }
        Ok(out)
    }
}

/// Copy block `from` into `to` in every layer's pool (device to device).
fn copy_block<T: CudaLatentElem>(
    kernels: &MlaKernels,
    pools: &mut [CudaSlice<T>],
    num_blocks: usize,
    from: BlockId,
    to: BlockId,
) -> Result<()> {
    let stream = kernels.stream().clone();
    for pool in pools.iter_mut() {
        // A block of a layer is its pool's length over the block count.
        let len = pool.len() / num_blocks;
        let (f, t) = (from as usize * len, to as usize * len);
        // Two disjoint views of one allocation.
        if f < t {
            let (lo, mut hi) = pool.split_at_mut(t);
            let src = lo.slice(f..f + len);
            let mut dst = hi.slice_mut(0..len);
            stream.memcpy_dtod(&src, &mut dst).map_err(driver)?;
        } else {
            let (mut lo, hi) = pool.split_at_mut(f);
            let src = hi.slice(0..len);
            let mut dst = lo.slice_mut(t..t + len);
            stream.memcpy_dtod(&src, &mut dst).map_err(driver)?;
        }
    }
    Ok(())
}
