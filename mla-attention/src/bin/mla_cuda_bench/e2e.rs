//! A whole greedy decode step of an 8B-shaped DeepSeek-V2-style dense model with
//! random bf16 weights: candle (cuBLAS) for the projections and the MLP, our paged
//! cache and kernel for attention. Shapes: hidden 4096, 32 layers, 32 heads, q_nope
//! 128 + rope 64, v 128, kv_lora_rank 512, MLP 14336, vocab 128256 (untied head).
//!
//! Per layer: RMSNorm → q_proj, kv_a_proj → latent RMSNorm → append [c ; k_pe] to
//! the paged cache → q̃ = W_UKᵀ q_nope (batched per head) → our decode → W_UV → o_proj
//! → residual → RMSNorm → SwiGLU MLP → residual. Then final norm, lm_head, argmax,
//! ids back to the host (one sync per step, as a server does), embedding lookup.
//! RoPE is omitted (elementwise on 64 of 192 query dims and the 64-wide key).
//! The cache is pre-filled with `ctx` random latent rows per sequence (no prefill).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use half::bf16;
use mla_attention::cache::LayerWidth;
use mla_attention::cuda::interop::{with_view, wrap};
use mla_attention::cuda::{CudaDecodeQuery, CudaLatentCache, CudaMlaDecoder, MlaKernels};

use crate::bench::{filled_cache, time_ms, HEADS, LAYERS};

const HIDDEN: usize = 4096;
const NOPE: usize = 128;
const ROPE: usize = 64;
const V: usize = 128;
const RANK: usize = 512;
const MLP: usize = 14336;
const VOCAB: usize = 128256;
const WARMUP: usize = 2;
const TIMED: usize = 10;

#[derive(Debug, Clone, serde::Serialize)]
pub struct E2eResult {
    pub ctx: usize,
    pub batch: usize,
    pub ms_per_step: f64,
    pub tokens_per_s: f64,
    /// 32 decode-kernel calls on the same cache, timed alone.
    pub attention_ms: Option<f64>,
}

struct Layer {
    w_in: Tensor,
    w_q: Tensor,
    w_kva: Tensor,
    w_kvnorm: Tensor,
    /// `(heads, nope, rank)`: q̃_h = q_nope,h · W_UK,h.
    w_uk: Tensor,
    /// `(heads, rank, v)`: o_h = õ_h · W_UV,hᵀ.
    w_uv: Tensor,
    w_o: Tensor,
    w_post: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

fn rand(dev: &Device, shape: &[usize], fan_in: usize) -> Result<Tensor> {
    let std = 1.0 / (fan_in as f32).sqrt();
    Ok(Tensor::randn(0f32, std, shape, dev)?.to_dtype(DType::BF16)?)
}

fn ones(dev: &Device, n: usize) -> Result<Tensor> {
    Ok(Tensor::ones(n, DType::BF16, dev)?)
}

impl Layer {
    fn new(dev: &Device) -> Result<Self> {
        Ok(Layer {
            w_in: ones(dev, HIDDEN)?,
            w_q: rand(dev, &[HEADS * (NOPE + ROPE), HIDDEN], HIDDEN)?,
            w_kva: rand(dev, &[RANK + ROPE, HIDDEN], HIDDEN)?,
            w_kvnorm: ones(dev, RANK)?,
            w_uk: rand(dev, &[HEADS, NOPE, RANK], NOPE)?,
            w_uv: rand(dev, &[HEADS, RANK, V], RANK)?,
            w_o: rand(dev, &[HIDDEN, HEADS * V], HEADS * V)?,
            w_post: ones(dev, HIDDEN)?,
            w_gate: rand(dev, &[MLP, HIDDEN], HIDDEN)?,
            w_up: rand(dev, &[MLP, HIDDEN], HIDDEN)?,
            w_down: rand(dev, &[HIDDEN, MLP], MLP)?,
        })
    }
}

fn rms_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_div(&(ms + 1e-6)?.sqrt()?)?;
    Ok(y.to_dtype(DType::BF16)?.broadcast_mul(w)?)
}

struct Model {
    dev: Device,
    layers: Vec<Layer>,
    emb: Tensor,
    norm: Tensor,
    head: Tensor,
}

struct StepState<'a> {
    cache: &'a mut CudaLatentCache<bf16>,
    seqs: &'a [mla_attention::cache::SeqId],
    dec: &'a mut CudaMlaDecoder,
}

impl Model {
    fn attention(&self, l: usize, x: &Tensor, st: &mut StepState<'_>) -> Result<Tensor> {
        let w = &self.layers[l];
        let b = x.dim(0)?;
        let q = x.matmul(&w.w_q.t()?)?.reshape((b, HEADS, NOPE + ROPE))?;
        let kv = x.matmul(&w.w_kva.t()?)?;
        let c = rms_norm(&kv.narrow(1, 0, RANK)?, &w.w_kvnorm)?;
        let row = Tensor::cat(&[&c, &kv.narrow(1, RANK, ROPE)?], 1)?.contiguous()?;
        with_view::<bf16, _>(&row, |v| st.cache.append_step(st.seqs, l, v))?;
        if l == 0 {
            st.dec.plan_for(st.cache, st.seqs, 0)?;
        }
        // q̃ = W_UKᵀ q_nope per head: (heads, b, nope) x (heads, nope, rank).
        let q_nope = q.narrow(2, 0, NOPE)?.transpose(0, 1)?.contiguous()?;
        let q_lat = q_nope.matmul(&w.w_uk)?.transpose(0, 1)?.contiguous()?;
        let q_pe = q.narrow(2, NOPE, ROPE)?.contiguous()?;
        let o_lat = with_view::<bf16, _>(&q_lat, |ql| {
            with_view::<bf16, _>(&q_pe, |qp| {
                let q = CudaDecodeQuery {
                    q_lat: ql,
                    q_pe: qp,
                    num_heads: HEADS,
                    scale: 1.0 / ((NOPE + ROPE) as f32).sqrt(),
                };
                st.dec.decode(st.cache, l, &q)
            })
        })?;
        let o_lat = wrap::<f32>(&self.dev, o_lat, (b, HEADS, RANK))?.to_dtype(DType::BF16)?;
        let o = o_lat.transpose(0, 1)?.contiguous()?.matmul(&w.w_uv)?; // (heads, b, v)
        let o = o.transpose(0, 1)?.contiguous()?.reshape((b, HEADS * V))?;
        Ok(o.matmul(&w.w_o.t()?)?)
    }

    fn step(&self, ids: &Tensor, st: &mut StepState<'_>) -> Result<Tensor> {
        let mut h = self.emb.index_select(ids, 0)?;
        for l in 0..self.layers.len() {
            let w = &self.layers[l];
            h = (&h + self.attention(l, &rms_norm(&h, &w.w_in)?, st)?)?;
            let n = rms_norm(&h, &w.w_post)?;
            let g = n.matmul(&w.w_gate.t()?)?;
            let u = n.matmul(&w.w_up.t()?)?;
            let m = (candle_core::Tensor::silu(&g)? * u)?.matmul(&w.w_down.t()?)?;
            h = (h + m)?;
        }
        let logits = rms_norm(&h, &self.norm)?.matmul(&self.head.t()?)?;
        Ok(logits.argmax(D::Minus1)?)
    }
}

pub fn run(
    _k: &MlaKernels,
    ctxs: &[usize],
    batches: &[usize],
    quick: bool,
) -> Result<Vec<E2eResult>> {
    let dev = Device::new_cuda(0)?;
    let kernels = MlaKernels::new(dev.as_cuda_device()?.cuda_stream())?;
    let t = Instant::now();
    let model = Model {
        layers: (0..LAYERS)
            .map(|_| Layer::new(&dev))
            .collect::<Result<_>>()?,
        emb: rand(&dev, &[VOCAB, HIDDEN], 1)?,
        norm: ones(&dev, HIDDEN)?,
        head: rand(&dev, &[VOCAB, HIDDEN], HIDDEN)?,
        dev: dev.clone(),
    };
    dev.synchronize()?;
    eprintln!(
        "e2e: random 8B-shaped model ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut out = Vec::new();
    let width = LayerWidth {
        rank: RANK,
        rope: ROPE,
    };
    for &b in batches {
        for &ctx in ctxs {
            if quick && ctx > 32768 {
                continue;
            }
            let (free, _) = kernels.stream().context().mem_get_info()?;
            let need = LAYERS * b * (ctx + 64 + 2 * TIMED) * width.width() * 2;
            if need + (4usize << 30) > free {
                eprintln!("e2e ctx {ctx} batch {b}: skipped, needs {need} B of KV, {free} free");
                continue;
            }
            let r = cell(&model, &kernels, width, ctx, b)
                .with_context(|| format!("e2e ctx {ctx} batch {b}"))?;
            eprintln!(
                "e2e ctx {ctx} batch {b}: {:.2} ms/step, {:.1} tok/s",
                r.ms_per_step, r.tokens_per_s
            );
            out.push(r);
        }
    }
    Ok(out)
}

fn cell(
    model: &Model,
    k: &std::sync::Arc<MlaKernels>,
    width: LayerWidth,
    ctx: usize,
    b: usize,
) -> Result<E2eResult> {
    // Room for the generated tokens.
    let layers = vec![width; LAYERS];
    let spare = b * ((WARMUP + TIMED).div_ceil(crate::bench::BLOCK) + 1);
    let (mut cache, seqs) = filled_cache(k, &layers, b, ctx, 3, spare)?;
    let mut dec = CudaMlaDecoder::new(k.clone());
    let mut ids = Tensor::from_vec((0..b as u32).collect::<Vec<_>>(), b, &model.dev)?;
    let mut st = StepState {
        cache: &mut cache,
        seqs: &seqs,
        dec: &mut dec,
    };
    for _ in 0..WARMUP {
        ids = model.step(&ids, &mut st)?;
        ids.to_vec1::<u32>()?;
    }
    let t = Instant::now();
    for _ in 0..TIMED {
        ids = model.step(&ids, &mut st)?;
        let host = ids.to_vec1::<u32>()?; // the step's only host sync
        anyhow::ensure!(host.iter().all(|&i| (i as usize) < VOCAB), "bad token id");
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / TIMED as f64;
    // The attention kernel alone on this cache: 32 calls = one step's worth.
    let mut g = test_support::Rng::new(1);
    let host = |n: usize, g: &mut test_support::Rng| -> Vec<bf16> {
        g.symmetric_vec(n, 2.0)
            .into_iter()
            .map(bf16::from_f32)
            .collect()
    };
    let ql = k.stream().clone_htod(&host(b * HEADS * RANK, &mut g))?;
    let qp = k.stream().clone_htod(&host(b * HEADS * ROPE, &mut g))?;
    let (qlv, qpv) = (ql.as_view(), qp.as_view());
    let q = CudaDecodeQuery {
        q_lat: &qlv,
        q_pe: &qpv,
        num_heads: HEADS,
        scale: 0.07,
    };
    let mut o = k.stream().alloc_zeros::<f32>(b * HEADS * RANK)?;
    st.dec.plan_for(st.cache, st.seqs, 0)?;
    let per_call = time_ms(
        k,
        |i| Ok(st.dec.decode_into(st.cache, i % LAYERS, &q, &mut o)?),
        LAYERS,
    )?;
    Ok(E2eResult {
        ctx,
        batch: b,
        ms_per_step: ms,
        tokens_per_s: b as f64 * 1e3 / ms,
        attention_ms: Some(per_call * LAYERS as f64),
    })
}
