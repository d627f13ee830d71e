//! Kernel timings at Llama-3.1-8B shapes: per-call decode time over a paged cache of
//! random bf16 latents, achieved bandwidth against a measured device-to-device copy,
//! full 32-layer steps with uniform and per-layer ranks, and how many 32K-token
//! sequences fit a memory budget.
//!
//! Timing: CUDA events around `reps` back-to-back calls, 3 warm-up calls first,
//! median of 7 samples. Calls rotate over up to 32 layer pools (each its own memory),
//! so consecutive calls never hit a warm L2, as in a real step.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use half::bf16;
use mla_attention::cache::{CacheConfig, LayerWidth, SeqId};
use mla_attention::cuda::{
    CudaDecodeQuery, CudaLatentCache, CudaMlaDecoder, KernelPlan, MlaKernels,
};
use mla_attention::Error;

use test_support::Rng;

pub const BLOCK: usize = 32;
pub const LAYERS: usize = 32;
pub const HEADS: usize = 32;
/// Llama-3.1-8B GQA KV bytes per token: 8 KV heads × 128 × (K, V) × 2 B × 32 layers.
pub const GQA_BYTES_PER_TOKEN: usize = 8 * 128 * 2 * 2 * 32;

/// Median ms per call of `f(i)` (i counts calls), timed with CUDA events.
pub fn time_ms(
    k: &MlaKernels,
    mut f: impl FnMut(usize) -> Result<()>,
    round_to: usize,
) -> Result<f64> {
    let s = k.stream();
    let ev = || s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    for i in 0..3 {
        f(i)?;
    }
    let a = ev()?;
    f(3)?;
    let b = ev()?;
    let est = a.elapsed_ms(&b)? as f64;
    let reps = ((20.0 / est.max(1e-3)) as usize).clamp(round_to.max(5), 2000);
    let reps = reps.div_ceil(round_to.max(1)) * round_to.max(1);
    let mut samples = Vec::new();
    let mut c = 4;
    for _ in 0..7 {
        let a = ev()?;
        for _ in 0..reps {
            f(c)?;
            c += 1;
        }
        let b = ev()?;
        samples.push(a.elapsed_ms(&b)? as f64 / reps as f64);
    }
    samples.sort_by(|x, y| x.total_cmp(y));
    Ok(samples[3])
}

/// Device-to-device copy bandwidth, GB/s counting bytes read plus bytes written.
pub fn copy_bandwidth(k: &Arc<MlaKernels>) -> Result<f64> {
    let n = 1usize << 29; // 2 GiB of f32 per buffer
    let s = k.stream().clone();
    let src = s.alloc_zeros::<f32>(n)?;
    let mut dst = s.alloc_zeros::<f32>(n)?;
    let ms = time_ms(k, |_| Ok(s.memcpy_dtod(&src, &mut dst)?), 1)?;
    Ok(2.0 * (n * 4) as f64 / ms / 1e6)
}

/// Sequences of `ctx` tokens in every layer, appended round-robin in chunks so the
/// sequences' blocks interleave in the pool, then every pool filled with random
/// values (the appended chunks are placeholders).
pub fn filled_cache(
    k: &Arc<MlaKernels>,
    layers: &[LayerWidth],
    batch: usize,
    ctx: usize,
    seed: u64,
    spare_blocks: usize,
) -> Result<(CudaLatentCache<bf16>, Vec<SeqId>)> {
    let cfg = CacheConfig {
        block_size: BLOCK,
        num_blocks: batch * ctx.div_ceil(BLOCK) + spare_blocks,
        layers: layers.to_vec(),
    };
    let mut cache = CudaLatentCache::<bf16>::new(k.clone(), cfg)?;
    let seqs: Vec<SeqId> = (0..batch).map(|_| cache.add_sequence()).collect();
    let chunk = 4096;
    let max_w = layers.iter().map(|w| w.width()).max().unwrap_or(1);
    let zeros: CudaSlice<bf16> = k.stream().alloc_zeros(chunk * max_w)?;
    for t0 in (0..ctx).step_by(chunk) {
        let n = chunk.min(ctx - t0);
        for &s in &seqs {
            for (l, w) in layers.iter().enumerate() {
                cache.append_device(s, l, &zeros.slice(0..n * w.width()))?;
            }
        }
    }
    cache.fill_uniform(seed, -1.0, 1.0)?;
    Ok((cache, seqs))
}

fn queries(k: &MlaKernels, g: &mut Rng, n: usize) -> Result<CudaSlice<bf16>> {
    let v: Vec<bf16> = g
        .symmetric_vec(n, 2.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    Ok(k.stream().clone_htod(&v)?)
}

/// One (ctx, batch) cell at one width.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cell {
    pub rank: usize,
    pub rope: usize,
    pub heads: usize,
    pub ctx: usize,
    pub batch: usize,
    pub kernel: String,
    pub splits: usize,
    /// Layer pools the calls rotated over.
    pub pools: usize,
    pub plan_us: f64,
    pub ms_per_call: f64,
    pub ms_per_step_32_layers: f64,
    pub kv_bytes_per_call: usize,
    pub gbps: f64,
    pub pct_of_copy_bw: f64,
}

pub fn kernel_cell(
    k: &Arc<MlaKernels>,
    width: LayerWidth,
    ctx: usize,
    batch: usize,
    budget_bytes: usize,
    copy_gbps: f64,
) -> Result<Cell> {
    let per_layer = batch * ctx * width.width() * 2;
    let pools = (budget_bytes / per_layer.max(1)).clamp(1, LAYERS);
    let layers = vec![width; pools];
    let (cache, seqs) = filled_cache(k, &layers, batch, ctx, 17 + ctx as u64 + batch as u64, 0)?;
    let mut g = Rng::new(5);
    let ql = queries(k, &mut g, batch * HEADS * width.rank)?;
    let qp = queries(k, &mut g, batch * HEADS * width.rope)?;
    let scale = 1.0 / (192f32).sqrt();
    let mut dec = CudaMlaDecoder::new(k.clone());
    // Development knob: `MLA_SPLIT_TOKENS=N` replaces the automatic split length (sweeps
    // of the batch-1 split count, docs/CUDA.md).
    if let Some(n) = std::env::var("MLA_SPLIT_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        dec = dec.with_policy(mla_attention::cuda::SplitPolicy::Fixed(n));
    }
    let t = Instant::now();
    dec.plan_for(&cache, &seqs, 0)?;
    k.synchronize()?;
    let plan_us = t.elapsed().as_secs_f64() * 1e6;
    let mut out = k.stream().alloc_zeros::<f32>(batch * HEADS * width.rank)?;
    let (qlv, qpv) = (ql.as_view(), qp.as_view());
    let q = CudaDecodeQuery {
        q_lat: &qlv,
        q_pe: &qpv,
        num_heads: HEADS,
        scale,
    };
    let ms = time_ms(
        k,
        |i| Ok(dec.decode_into(&cache, i % pools, &q, &mut out)?),
        pools,
    )?;
    let out_host = k.stream().clone_dtoh(&out)?;
    if out_host.iter().any(|v| !v.is_finite()) {
        anyhow::bail!("non-finite decode output at ctx {ctx} batch {batch}");
    }
    let kernel = match dec.kernel_plan::<bf16>(width, HEADS)? {
        KernelPlan::TensorCore {
            mt,
            nt,
            tile_tokens,
            ..
        } => format!("tc(m{mt},n{nt},t{tile_tokens})"),
        KernelPlan::Generic { tile_tokens, .. } => format!("generic(t{tile_tokens})"),
    };
    let gbps = per_layer as f64 / ms / 1e6;
    Ok(Cell {
        rank: width.rank,
        rope: width.rope,
        heads: HEADS,
        ctx,
        batch,
        kernel,
        splits: dec.num_splits(),
        pools,
        plan_us,
        ms_per_call: ms,
        ms_per_step_32_layers: ms * LAYERS as f64,
        kv_bytes_per_call: per_layer,
        gbps,
        pct_of_copy_bw: 100.0 * gbps / copy_gbps,
    })
}

/// A measured 32-layer step (one decode call per layer, each on its own pool).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepResult {
    pub plan: String,
    pub ranks: Vec<usize>,
    pub ctx: usize,
    pub batch: usize,
    pub kv_bytes_per_token: usize,
    pub ms_per_step: f64,
    pub gbps: f64,
}

/// Ranks 256..768 in steps of 16 over 32 layers, symmetric around 512 (mean exactly
/// 512: `k_l + k_{31-l} = 32`), a CARE-like profile at the uniform plan's budget.
pub fn ramp_ranks() -> Vec<usize> {
    (0..LAYERS)
        .map(|l| 256 + 16 * ((32.0 * l as f64 / (LAYERS - 1) as f64).round() as usize))
        .collect()
}

pub fn layer_step(
    k: &Arc<MlaKernels>,
    plan: &str,
    ranks: &[usize],
    rope: usize,
    ctx: usize,
    batch: usize,
) -> Result<StepResult> {
    let layers: Vec<LayerWidth> = ranks
        .iter()
        .map(|&rank| LayerWidth { rank, rope })
        .collect();
    let (cache, seqs) = filled_cache(k, &layers, batch, ctx, 99, 0)?;
    let mut g = Rng::new(11);
    let qs = layers
        .iter()
        .map(|w| {
            Ok((
                queries(k, &mut g, batch * HEADS * w.rank)?,
                queries(k, &mut g, batch * HEADS * w.rope)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut outs = layers
        .iter()
        .map(|w| Ok(k.stream().alloc_zeros::<f32>(batch * HEADS * w.rank)?))
        .collect::<Result<Vec<CudaSlice<f32>>>>()?;
    let mut dec = CudaMlaDecoder::new(k.clone());
    dec.plan_for(&cache, &seqs, 0)?;
    let views: Vec<_> = qs.iter().map(|(a, b)| (a.as_view(), b.as_view())).collect();
    let n = layers.len();
    let ms = time_ms(
        k,
        |i| {
            let l = i % n;
            let q = CudaDecodeQuery {
                q_lat: &views[l].0,
                q_pe: &views[l].1,
                num_heads: HEADS,
                scale: 1.0 / (192f32).sqrt(),
            };
            Ok(dec.decode_into(&cache, l, &q, &mut outs[l])?)
        },
        n,
    )? * n as f64;
    let bpt = cache.bytes_per_token();
    Ok(StepResult {
        plan: plan.to_string(),
        ranks: ranks.to_vec(),
        ctx,
        batch,
        kv_bytes_per_token: bpt,
        ms_per_step: ms,
        gbps: (bpt * ctx * batch) as f64 / ms / 1e6,
    })
}

/// How many `ctx`-token sequences a budget holds: counted by filling a real device
/// cache of that size until it reports `CacheFull`, and by formula for GQA.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Capacity {
    pub plan: String,
    pub budget_bytes: usize,
    pub ctx: usize,
    pub kv_bytes_per_token: usize,
    pub sequences_fit: usize,
    pub gqa_sequences_fit: usize,
}

pub fn capacity(
    k: &Arc<MlaKernels>,
    plan: &str,
    ranks: &[usize],
    rope: usize,
    budget_bytes: usize,
    ctx: usize,
) -> Result<Capacity> {
    let layers: Vec<LayerWidth> = ranks
        .iter()
        .map(|&rank| LayerWidth { rank, rope })
        .collect();
    let bpt: usize = layers.iter().map(|w| w.width() * 2).sum();
    let num_blocks = budget_bytes / (bpt * BLOCK);
    let cfg = CacheConfig {
        block_size: BLOCK,
        num_blocks,
        layers: layers.clone(),
    };
    let mut cache = CudaLatentCache::<bf16>::new(k.clone(), cfg)?;
    anyhow::ensure!(
        cache.pool_bytes() <= budget_bytes,
        "pool exceeds the budget"
    );
    let max_w = layers.iter().map(|w| w.width()).max().unwrap_or(1);
    let rows: CudaSlice<bf16> = k.stream().alloc_zeros(ctx * max_w)?;
    let mut fit = 0;
    'fill: loop {
        let s = cache.add_sequence();
        for (l, w) in layers.iter().enumerate() {
            match cache.append_device(s, l, &rows.slice(0..ctx * w.width())) {
                Ok(()) => {}
                Err(Error::CacheFull { .. }) => {
                    cache.free(s)?;
                    break 'fill;
                }
                Err(e) => return Err(e).context("capacity fill"),
            }
        }
        fit += 1;
    }
    Ok(Capacity {
        plan: plan.to_string(),
        budget_bytes,
        ctx,
        kv_bytes_per_token: bpt,
        sequences_fit: fit,
        gqa_sequences_fit: budget_bytes / (GQA_BYTES_PER_TOKEN * ctx),
    })
}
