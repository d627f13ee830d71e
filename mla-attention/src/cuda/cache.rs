//! [`CudaLatentCache`]: the paged latent cache of [`crate::cache`] with its pools in
//! device memory.
//!
//! Same layout and rules as [`LatentPagedCache`](crate::cache::LatentPagedCache): one
//! pool per layer `(num_blocks, block_size, rank_l + rope_l)`, one block id for all
//! layers, one [`BlockTable`] per sequence, reference-counted prefix sharing with
//! copy-on-write, and every check done before anything changes. The bookkeeping
//! (allocator, tables) stays on the host; only rows live on the device. A token costs
//! exactly `Σ_l (rank_l + rope_l) · T::BYTES` ([`CudaLatentCache::bytes_per_token`]).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::elem::CudaLatentElem;
use super::kernels::{driver, MlaKernels};
use crate::cache::{BlockAllocator, BlockId, BlockTable, CacheConfig, LayerBlocks, LayerWidth};
use crate::cache::{SeqId, SeqView};
use crate::error::{Error, Result};

/// A paged cache of MLA latent rows `[c ; RoPE(k_pe)]` in device memory.
#[derive(Debug)]
pub struct CudaLatentCache<T: CudaLatentElem> {
    kernels: Arc<MlaKernels>,
    block_size: usize,
    layers: Vec<LayerWidth>,
    /// One pool per layer: `(num_blocks, block_size, width_l)`.
    pools: Vec<CudaSlice<T>>,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, BlockTable>,
    next_seq: u64,
}

impl<T: CudaLatentElem> CudaLatentCache<T> {
    /// Allocate every pool up front (zeroed), with the CPU cache's checks.
    pub fn new(kernels: Arc<MlaKernels>, config: CacheConfig) -> Result<Self> {
        let CacheConfig {
            block_size,
            num_blocks,
            layers,
        } = config;
        // The CPU cache owns the validation rules; a one-block probe applies them.
        crate::cache::LatentPagedCache::<T>::new(CacheConfig {
            block_size,
            num_blocks: 1,
            layers: layers.clone(),
        })?;
        if num_blocks == 0 || num_blocks > BlockId::MAX as usize {
            return Err(Error::InvalidInput(format!(
                "latent cache: {num_blocks} blocks (need 1..={})",
                BlockId::MAX
            )));
        }
        let stream = kernels.stream().clone();
        let pools = layers
            .iter()
            .map(|w| {
                let n = num_blocks
                    .checked_mul(block_size * w.width())
                    .ok_or_else(|| Error::InvalidInput("latent cache size overflows".into()))?;
                stream.alloc_zeros::<T>(n).map_err(driver)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaLatentCache {
            kernels,
            block_size,
            layers,
            pools,
            alloc: BlockAllocator::new(num_blocks),
            seqs: HashMap::new(),
            next_seq: 0,
        })
    }

    pub fn kernels(&self) -> &Arc<MlaKernels> {
        &self.kernels
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

    pub fn num_blocks(&self) -> usize {
        self.alloc.num_blocks()
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.free_blocks()
    }

    pub fn used_blocks(&self) -> usize {
        self.alloc.used_blocks()
    }

    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }

    /// Bytes one token costs over all layers: `Σ_l (rank_l + rope_l) · T::BYTES`.
    pub fn bytes_per_token(&self) -> usize {
        self.layers.iter().map(|w| w.width() * T::BYTES).sum()
    }

    pub fn bytes_per_block(&self) -> usize {
        self.bytes_per_token() * self.block_size
    }

    /// Device bytes the pools hold: `bytes_per_token() · capacity_tokens()`.
    pub fn pool_bytes(&self) -> usize {
        self.pools.iter().map(|p| p.num_bytes()).sum()
    }

    pub fn refcount(&self, block: BlockId) -> u32 {
        self.alloc.refcount(block)
    }

    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId::from_raw(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, BlockTable::new(self.layers.len()));
        id
    }

    fn table(&self, seq: SeqId) -> Result<&BlockTable> {
        self.seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence { seq: seq.get() })
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

    pub fn tokens(&self, seq: SeqId, layer: usize) -> Result<usize> {
        self.width(layer)?;
        Ok(self.table(seq)?.layer_tokens[layer])
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

    /// The pool of `layer`: `(num_blocks, block_size, rank + rope)` row-major.
    pub fn pool(&self, layer: usize) -> Result<&CudaSlice<T>> {
        self.width(layer)?;
        Ok(&self.pools[layer])
    }

    /// Check that `view` names only blocks of this cache and that they cover its
    /// tokens (the CPU cache's rules, [`LayerBlocks::check`]).
    pub fn check_view(&self, layer: usize, view: &SeqView<'_>) -> Result<()> {
        let probe = LayerBlocks::<T> {
            layer,
            width: self.width(layer)?,
            block_size: self.block_size,
            num_blocks: self.num_blocks(),
            data: &[],
        };
        probe.check(view)
    }

    /// A new sequence sharing all of `seq`'s blocks (no copy; counts go up).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let table = self.table(seq)?.clone();
        for &b in &table.blocks {
            self.alloc.retain(b);
        }
        let id = SeqId::from_raw(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, table);
        Ok(id)
    }

    /// Append `rows` (`(tokens, width)` row-major, f32 on the host) to `layer` of
    /// `seq`; converted to `T` here and written by one kernel. All checks (width, free
    /// blocks including copy-on-write copies) happen before anything changes.
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
        if n == 0 {
            self.table(seq)?;
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
            self.table(seq)?;
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
        let w = self.width(layer)?.width();
        if rows.len() != seqs.len() * w {
            return Err(Error::WidthMismatch {
                layer,
                what: "device rows (batch x width)",
                got: rows.len(),
                expected: seqs.len() * w,
            });
        }
        crate::cache::pass::check_distinct(seqs, "append_step")?;
        let before: Vec<usize> = seqs
            .iter()
            .map(|&s| self.tokens(s, layer))
            .collect::<Result<_>>()?;
        let mut slots = Vec::with_capacity(seqs.len());
        for (i, &s) in seqs.iter().enumerate() {
            match self.reserve(s, layer, 1) {
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
        self.scatter(layer, rows, &slots)
    }

    /// Make room for `n` more rows of `layer` in `seq` (new blocks, copy-on-write of
    /// shared ones) and return their pool slots (`block · block_size + offset`).
    /// Checked before any change: on error the cache is as before.
    fn reserve(&mut self, seq: SeqId, layer: usize, n: usize) -> Result<Vec<u32>> {
        let bs = self.block_size;
        let table = self.table(seq)?;
        let start = table.layer_tokens[layer];
        let end = start + n;
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
        if (self.num_blocks() * bs) > u32::MAX as usize {
            return Err(Error::InvalidInput(
                "latent cache: slot index exceeds u32".into(),
            ));
        }
        let mut blocks = table.blocks.clone();
        for i in cow {
            let fresh = self
                .alloc
                .allocate()
                .expect("counted against the free list");
            self.copy_block(blocks[i], fresh)?;
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
        let slots = (start..end)
            .map(|t| (blocks[t / bs] as usize * bs + t % bs) as u32)
            .collect();
        let table = self.seqs.get_mut(&seq).expect("checked above");
        table.blocks = blocks;
        table.layer_tokens[layer] = end;
        Ok(slots)
    }

    /// Write `rows` (`(slots.len(), width)`) into `layer`'s pool at `slots`.
    fn scatter(&mut self, layer: usize, rows: &CudaView<'_, T>, slots: &[u32]) -> Result<()> {
        let w = self.layers[layer].width();
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

    /// Drop `layer`'s tokens of `seq` beyond `tokens`; blocks no layer needs go back.
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

    /// `seq`'s rows of `layer` copied back as `(tokens, rank + rope)` f32 (tests).
    pub fn gather(&self, seq: SeqId, layer: usize) -> Result<Vec<f32>> {
        let w = self.width(layer)?.width();
        let view = self.view(seq, layer)?;
        let stream = self.kernels.stream();
        let mut out = Vec::with_capacity(view.tokens * w);
        let mut left = view.tokens;
        for &b in view.blocks {
            let n = left.min(self.block_size);
            let start = b as usize * self.block_size * w;
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
            let n = left.min(self.block_size);
            let start = b as usize * self.block_size * w;
            let src = self.pools[layer].slice(start..start + n * w);
            let mut dst = out.slice_mut(off..off + n * w);
            stream.memcpy_dtod(&src, &mut dst).map_err(driver)?;
            off += n * w;
            left -= n;
        }
        Ok(out)
    }

    /// Copy block `from` into `to` in every layer (device to device).
    fn copy_block(&mut self, from: BlockId, to: BlockId) -> Result<()> {
        let bs = self.block_size;
        let stream = self.kernels.stream().clone();
        for (pool, w) in self.pools.iter_mut().zip(&self.layers) {
            let len = bs * w.width();
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
}
