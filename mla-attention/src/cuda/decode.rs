//! [`CudaMlaDecoder`]: absorbed MLA decode over a [`CudaLatentCache`], split-KV
//! ("flash-decoding") with a combine pass: the CUDA twin of
//! [`crate::cpu::absorbed_decode`], with the same math (see that module).
//!
//! ```text
//! plan(views)                      splits of the batch → one u32 buffer on the device
//! decode_into(cache, layer, q, õ)  split kernel:   per (split, head group) partial õ, lse
//!                                  combine kernel: merge a sequence's partials (skipped
//!                                                  when every sequence has one split)
//! ```
//!
//! Two split kernels. bf16 caches whose rank and rope are multiples of 8 (rows of
//! whole 16-byte chunks) and whose tiles fit in shared memory take the tensor-core kernel
//! (`kernels/mla_decode_tc.cu`: mma.sync bf16, f32 accumulation, P rounded to bf16);
//! everything else, f32 caches included, takes the generic one
//! (`kernels/mla_decode_generic.cu`, f32 arithmetic). Both read each cached row once
//! per split and use it for every head of a group of 32 (tensor cores) or 16 heads.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};

use super::cache::CudaLatentCache;
use super::elem::CudaLatentElem;
use super::kernels::{
    driver, MetaOffsets, MlaKernels, GENERIC_HEADS, TC_MAX_NT, TC_MAX_NT_T64, THREADS,
};
use super::plan::{encode, plan_splits, split_tokens_for, SplitPlan, SplitPolicy};
use crate::cache::{LayerWidth, SeqId, SeqView};
use crate::error::{Error, Result};

/// Output columns per block of the combine kernel (`COMBINE_COLS`) and split groups
/// per block (`COMBINE_GROUPS`).
const COMBINE_COLS: usize = 64;
const COMBINE_GROUPS: usize = 4;

/// Which split kernel a decode uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    /// Tensor cores where the element type and width allow, else generic.
    #[default]
    Auto,
    /// Always the generic CUDA-core kernel (tests compare the two).
    Generic,
}

/// Queries of one decode step of one layer, on the device.
#[derive(Debug, Clone, Copy)]
pub struct CudaDecodeQuery<'a, T> {
    /// `(batch, num_heads, rank)`: `q̃_h = W_UK,hᵀ q_nope,h`.
    pub q_lat: &'a CudaView<'a, T>,
    /// `(batch, num_heads, rope)`: RoPE'd `q_pe,h`.
    pub q_pe: &'a CudaView<'a, T>,
    pub num_heads: usize,
    /// Softmax scale (natural base, as `MlaSpec::softmax_scale`).
    pub scale: f32,
}

/// The plan of the current step.
#[derive(Debug)]
struct Step {
    batch: usize,
    splits: SplitPlan,
    offsets: MetaOffsets,
    block_size: usize,
    num_blocks: usize,
}

/// Decodes batches over a [`CudaLatentCache`]; owns the per-step metadata and the
/// split partials, which grow as needed and are reused across layers and steps.
#[derive(Debug)]
pub struct CudaMlaDecoder {
    kernels: Arc<MlaKernels>,
    policy: SplitPolicy,
    choice: KernelChoice,
    step: Option<Step>,
    meta: Option<CudaSlice<u32>>,
    part_o: Option<CudaSlice<f32>>,
    part_lse: Option<CudaSlice<f32>>,
}

/// Which kernel and launch geometry one layer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPlan {
    /// Tensor cores: `mt` m-tiles (16·mt heads per block), `nt` = ceil(rank / 64),
    /// tiles of `tile_tokens` (64 or 32).
    TensorCore {
        mt: usize,
        nt: usize,
        tile_tokens: usize,
        smem_bytes: usize,
    },
    /// CUDA cores: tiles of `tile_tokens`, 16 heads per block.
    Generic {
        tile_tokens: usize,
        smem_bytes: usize,
    },
}

impl CudaMlaDecoder {
    pub fn new(kernels: Arc<MlaKernels>) -> Self {
        CudaMlaDecoder {
            kernels,
            policy: SplitPolicy::Auto,
            choice: KernelChoice::Auto,
            step: None,
            meta: None,
            part_o: None,
            part_lse: None,
        }
    }

    pub fn with_policy(mut self, policy: SplitPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn with_kernel(mut self, choice: KernelChoice) -> Self {
        self.choice = choice;
        self
    }

    /// Splits of the current plan (0 before [`Self::plan`]).
    pub fn num_splits(&self) -> usize {
        self.step.as_ref().map_or(0, |s| s.splits.num_splits())
    }

    /// Plan a step for `seqs` as they stand in `layer` of `cache` (block ids and
    /// token counts). The plan serves every layer whose token counts are the same.
    pub fn plan_for<T: CudaLatentElem>(
        &mut self,
        cache: &CudaLatentCache<T>,
        seqs: &[SeqId],
        layer: usize,
    ) -> Result<()> {
        let views = seqs
            .iter()
            .map(|&s| cache.view(s, layer))
            .collect::<Result<Vec<_>>>()?;
        for v in &views {
            cache.check_view(layer, v)?;
        }
        self.plan_views(&views, cache.block_size(), cache.num_blocks())
    }

    /// Plan a step from explicit views (an external block table). Every view is
    /// checked against the geometry (`block_size`, `num_blocks`) before upload.
    pub fn plan_views(
        &mut self,
        views: &[SeqView<'_>],
        block_size: usize,
        num_blocks: usize,
    ) -> Result<()> {
        self.step = None;
        for (i, v) in views.iter().enumerate() {
            if v.tokens == 0 {
                return Err(Error::InvalidInput(format!(
                    "decode plan: sequence {i} of the batch has no cached rows to attend to"
                )));
            }
            if v.tokens > u32::MAX as usize {
                return Err(Error::InvalidInput(format!(
                    "decode plan: sequence {i} too long"
                )));
            }
            let probe = crate::cache::LayerBlocks::<f32> {
                layer: 0,
                width: LayerWidth { rank: 1, rope: 0 },
                block_size,
                num_blocks,
                data: &[],
            };
            probe.check(v)?;
        }
        let lens: Vec<usize> = views.iter().map(|v| v.tokens).collect();
        let target = match self.policy {
            SplitPolicy::Auto => split_tokens_for(&lens, self.kernels.sm_count()),
            SplitPolicy::Fixed(n) if n > 0 => n,
            SplitPolicy::Fixed(_) => {
                return Err(Error::InvalidInput("split policy: zero tokens".into()));
            }
        };
        let splits = plan_splits(&lens, target);
        let (meta, offsets) = encode(views, &splits)?;
        let stream = self.kernels.stream().clone();
        if self.meta.as_ref().is_none_or(|m| m.len() < meta.len()) {
            self.meta = Some(
                stream
                    .alloc_zeros::<u32>(meta.len().max(1))
                    .map_err(driver)?,
            );
        }
        if !meta.is_empty() {
            let dst = self.meta.as_mut().expect("allocated above");
            stream
                .memcpy_htod(&meta, &mut dst.slice_mut(0..meta.len()))
                .map_err(driver)?;
        }
        self.step = Some(Step {
            batch: views.len(),
            splits,
            offsets,
            block_size,
            num_blocks,
        });
        Ok(())
    }

    /// Kernel and shared memory `layer`'s width gets for `num_heads` heads, or an
    /// error when not even the generic kernel fits the device's shared memory.
    pub fn kernel_plan<T: CudaLatentElem>(
        &self,
        width: LayerWidth,
        num_heads: usize,
    ) -> Result<KernelPlan> {
        let (r, d) = (width.rank, width.rope);
        let w = r + d;
        let max = self.kernels.max_smem_bytes();
        if T::TENSOR_CORES
            && self.choice == KernelChoice::Auto
            && r.is_multiple_of(8)
            && d.is_multiple_of(8)
        {
            if let Some(p) = tc_plan(r, d, num_heads, max, self.kernels.tc_force) {
                return Ok(p);
            }
        }
        let ws = w | 1;
        let hg = GENERIC_HEADS;
        for tt in [32, 16] {
            let smem = 4 * (hg * ws + tt * ws + hg * r + hg * tt + 3 * hg);
            if smem <= max {
                return Ok(KernelPlan::Generic {
                    tile_tokens: tt,
                    smem_bytes: smem,
                });
            }
        }
        Err(Error::InvalidInput(format!(
            "MLA decode: row width {w} (rank {r} + rope {d}) needs more shared memory than the \
             device's {max} bytes per block"
        )))
    }

    /// `õ (batch, num_heads, rank)` f32 into `out` for `layer` of `cache`, over the
    /// planned step. Widths are checked against the layer; the plan's geometry
    /// against the cache. On error nothing is launched.
    pub fn decode_into<T: CudaLatentElem>(
        &mut self,
        cache: &CudaLatentCache<T>,
        layer: usize,
        q: &CudaDecodeQuery<'_, T>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let step = self
            .step
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("decode before plan".into()))?;
        if (step.block_size, step.num_blocks) != (cache.block_size(), cache.num_blocks()) {
            return Err(Error::InvalidInput(format!(
                "decode plan made for {} blocks of {} tokens, cache has {} of {}",
                step.num_blocks,
                step.block_size,
                cache.num_blocks(),
                cache.block_size()
            )));
        }
        let width = *cache.layer_widths().get(layer).ok_or_else(|| {
            Error::InvalidInput(format!(
                "latent cache has {} layers, got layer {layer}",
                cache.num_layers()
            ))
        })?;
        let (b, nh) = (step.batch, q.num_heads);
        let (r, d) = (width.rank, width.rope);
        for (what, got, per) in [
            ("q_lat", q.q_lat.len(), r),
            ("q_pe", q.q_pe.len(), d),
            ("output", out.len(), r),
        ] {
            if got != b * nh * per {
                return Err(Error::WidthMismatch {
                    layer,
                    what,
                    got,
                    expected: b * nh * per,
                });
            }
        }
        if nh == 0 {
            return Err(Error::InvalidInput("decode needs num_heads > 0".into()));
        }
        if b == 0 {
            return Ok(());
        }
        let kplan = self.kernel_plan::<T>(width, nh)?;
        let n_splits = step.splits.num_splits();
        let combine = step.splits.needs_combine();
        let offsets = step.offsets;
        let stream = self.kernels.stream().clone();
        if combine {
            let need_o = n_splits * nh * r;
            if self.part_o.as_ref().is_none_or(|p| p.len() < need_o) {
                self.part_o = Some(stream.alloc_zeros::<f32>(need_o).map_err(driver)?);
            }
            if self
                .part_lse
                .as_ref()
                .is_none_or(|p| p.len() < n_splits * nh)
            {
                self.part_lse = Some(stream.alloc_zeros::<f32>(n_splits * nh).map_err(driver)?);
            }
        } else if self.part_o.is_none() {
            // The split kernel takes the pointers even when it writes straight to out.
            self.part_o = Some(stream.alloc_zeros::<f32>(1).map_err(driver)?);
            self.part_lse = Some(stream.alloc_zeros::<f32>(1).map_err(driver)?);
        }
        let args = SplitArgs {
            pool: cache.pool(layer)?,
            q,
            meta: self.meta.as_ref().expect("planned"),
            offsets,
            part_o: self.part_o.as_ref().expect("allocated"),
            part_lse: self.part_lse.as_ref().expect("allocated"),
            dims: [r as i32, d as i32, nh as i32, cache.block_size() as i32],
            scale_log2: q.scale * std::f32::consts::LOG2_E,
        };
        match kplan {
            KernelPlan::TensorCore {
                mt,
                nt,
                tile_tokens,
                smem_bytes,
            } => {
                let f = if tile_tokens == 64 {
                    &self.kernels.f.tc64[mt - 1][nt - 1]
                } else {
                    &self.kernels.f.tc32[mt - 1][nt - 1]
                };
                let groups = nh.div_ceil(16 * mt);
                let bs = cache.block_size();
                let shift = if bs.is_power_of_two() {
                    bs.trailing_zeros() as i32
                } else {
                    -1
                };
                launch_split(
                    &self.kernels,
                    f,
                    &args,
                    out,
                    (n_splits, groups),
                    smem_bytes,
                    Tail::Shift(shift),
                )?;
            }
            KernelPlan::Generic {
                tile_tokens,
                smem_bytes,
            } => {
                let f = T::generic_kernel(&self.kernels);
                let groups = nh.div_ceil(GENERIC_HEADS);
                let tt = tile_tokens as i32;
                launch_split(
                    &self.kernels,
                    f,
                    &args,
                    out,
                    (n_splits, groups),
                    smem_bytes,
                    Tail::Tile(tt),
                )?;
            }
        }
        if combine {
            let max_splits = step.splits.max_splits_per_seq();
            let smem = (max_splits + COMBINE_GROUPS * COMBINE_COLS + 8) * 4;
            if smem > self.kernels.max_smem_bytes() {
                return Err(Error::InvalidInput(format!(
                    "decode plan: {max_splits} splits of one sequence exceed the combine kernel"
                )));
            }
            let cfg = LaunchConfig {
                grid_dim: ((b * nh) as u32, r.div_ceil(COMBINE_COLS) as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (r32, h32) = (r as i32, nh as i32);
            // SAFETY: arguments match `mla_combine`; partials hold n_splits·nh·r values
            // written by the split kernel above on the same stream; out holds b·nh·r;
            // shared memory as the kernel carves it.
            unsafe {
                stream
                    .launch_builder(&self.kernels.f.combine)
                    .arg(args.part_o)
                    .arg(args.part_lse)
                    .arg(args.meta)
                    .arg(&offsets)
                    .arg(&mut *out)
                    .arg(&r32)
                    .arg(&h32)
                    .launch(cfg)
            }
            .map_err(driver)?;
        }
        Ok(())
    }

    /// [`Self::decode_into`] into a fresh `(batch, num_heads, rank)` buffer.
    pub fn decode<T: CudaLatentElem>(
        &mut self,
        cache: &CudaLatentCache<T>,
        layer: usize,
        q: &CudaDecodeQuery<'_, T>,
    ) -> Result<CudaSlice<f32>> {
        let b = self.step.as_ref().map_or(0, |s| s.batch);
        let r = cache.layer_widths().get(layer).map_or(0, |w| w.rank);
        let mut out = self
            .kernels
            .stream()
            .alloc_zeros::<f32>((b * q.num_heads * r).max(1))
            .map_err(driver)?;
        if b * q.num_heads * r == 0 {
            return Err(Error::InvalidInput(
                "decode: empty batch, heads or rank".into(),
            ));
        }
        self.decode_into(cache, layer, q, &mut out)?;
        Ok(out)
    }
}

/// What both split kernels take, in their argument order.
struct SplitArgs<'a, T> {
    pool: &'a CudaSlice<T>,
    q: &'a CudaDecodeQuery<'a, T>,
    meta: &'a CudaSlice<u32>,
    offsets: MetaOffsets,
    part_o: &'a CudaSlice<f32>,
    part_lse: &'a CudaSlice<f32>,
    /// rank, rope, heads, block size.
    dims: [i32; 4],
    scale_log2: f32,
}

/// The one argument where the two split kernels differ: the tensor-core kernel takes
/// `log2(block_size)` (or -1) before the scale, the generic one its tile after it.
enum Tail {
    Shift(i32),
    Tile(i32),
}

/// Shape of the tensor-core kernel for a width, or `None` when its limits (rank ≤ 768,
/// k-steps per warp group, shared memory) rule it out. Mirrors `TcShape` and the
/// shared-memory carve of `kernels/mla_decode_tc.cu`.
fn tc_plan(
    r: usize,
    d: usize,
    num_heads: usize,
    max_smem: usize,
    force: Option<(usize, usize)>,
) -> Option<KernelPlan> {
    let w = r + d;
    let nt = r.div_ceil(64);
    let mut mt = if num_heads <= 16 { 1 } else { 2 };
    if let Some((m, _)) = force {
        mt = m.clamp(1, 2);
    }
    let wpad = w.div_ceil(32) * 32;
    let ks = wpad / 16;
    for (tt, kg, kpg_max, max_nt) in [(64, 4, 10, TC_MAX_NT_T64), (32, 8, 8, TC_MAX_NT)] {
        if force.is_some_and(|(_, t)| t != tt) {
            continue;
        }
        if nt > max_nt || ks.div_ceil(kg) > kpg_max {
            continue;
        }
        let ws = wpad.max(nt * 64) + 8;
        let hm = 16 * mt;
        let (ps, ss) = (tt + 8, tt + 8);
        let union = (hm * ws * 2).max(kg * hm * ss * 4).div_ceil(16) * 16;
        // 16 bytes of mbarriers, then the carve of `mla_decode_tc.cu`.
        let smem = 16 + union + 2 * tt * ws * 2 + hm * ps * 2 + 3 * hm * 4;
        if smem <= max_smem {
            return Some(KernelPlan::TensorCore {
                mt,
                nt,
                tile_tokens: tt,
                smem_bytes: smem,
            });
        }
    }
    None
}

fn launch_split<T>(
    k: &MlaKernels,
    f: &CudaFunction,
    a: &SplitArgs<'_, T>,
    out: &mut CudaSlice<f32>,
    grid: (usize, usize),
    smem_bytes: usize,
    tail: Tail,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    };
    let stream = k.stream();
    let mut b = stream.launch_builder(f);
    b.arg(a.pool)
        .arg(a.q.q_lat)
        .arg(a.q.q_pe)
        .arg(a.meta)
        .arg(&a.offsets)
        .arg(out)
        .arg(a.part_o)
        .arg(a.part_lse)
        .arg(&a.dims[0])
        .arg(&a.dims[1])
        .arg(&a.dims[2])
        .arg(&a.dims[3]);
    match &tail {
        Tail::Shift(shift) => b.arg(shift).arg(&a.scale_log2),
        Tail::Tile(tt) => b.arg(&a.scale_log2).arg(tt),
    };
    // SAFETY: argument order and types match `mla_split_tc_*` / `mla_split_generic_*`;
    // the plan's block ids were checked against the cache geometry, the query and
    // output lengths against (batch, heads, width); smem_bytes is what the kernel
    // carves (computed by `kernel_plan` with the kernel's own formula).
    unsafe { b.launch(cfg) }.map_err(driver)?;
    Ok(())
}
