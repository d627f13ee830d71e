//! Per-call time of the decode-attention kernels stock mistral.rs 0.8.1 runs once per
//! layer per decode step, at Llama-3.1-8B shapes:
//!
//! - GQA: `mistralrs_paged_attn::paged_attention`, 32 query heads, 8 KV heads, head 128,
//!   block 32, bf16 (the Llama model's path).
//! - MLA: `mistralrs_paged_attn::flashinfer_mla_decode`, 32 heads, ckv 512 + kpe 64,
//!   block 32, bf16, with the metadata mistral.rs builds for it (one KV tile per
//!   request, `kv_chunk_size` = block size), as in `shared/gpu/baseline-bench`.
//!
//! Caches hold uniform random values; each sequence's blocks are a pseudo-random
//! permutation of the pool. Small cells rotate over several cache copies so the data
//! does not sit in L2 (a real step reads a different layer's cache each call).
//! Timing: 3 warm-up calls, then 7 samples of `n` back-to-back calls between two
//! device synchronizations; the median sample / n is reported (ms per call).
//!
//! Output: CSV on stdout, one line per (kind, batch, ctx). Exit code 2 on error.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

const BLOCK: usize = 32;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const CKV: usize = 512;
const KPE: usize = 64;
/// Rotate over cache copies until they hold at least this many bytes (L2 is 50–60 MB).
const ROTATE_BYTES: usize = 512 << 20;
const SAMPLES: usize = 7;

fn parse_list(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|v| v.trim().parse::<usize>().context("bad number in list"))
        .collect()
}

/// A fixed pseudo-random permutation of 0..n (xorshift + Fisher–Yates).
fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        p.swap(i, (s % (i as u64 + 1)) as usize);
    }
    p
}

fn rand_bf16(shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::rand(-1f32, 1f32, shape, dev)?.to_dtype(DType::BF16)?)
}

/// Median ms per call of `f(copy)` over copies `0..copies`, rotating.
fn time_calls<F: FnMut(usize) -> Result<Tensor>>(dev: &Device, copies: usize, est_ms: f64, mut f: F) -> Result<f64> {
    for i in 0..3 {
        f(i % copies)?;
    }
    dev.synchronize()?;
    // Enough calls per sample for ~20 ms of work, at least `copies`.
    let n = ((20.0 / est_ms.max(1e-3)) as usize).clamp(copies.max(5), 2000);
    let mut samples = Vec::with_capacity(SAMPLES);
    let mut k = 0usize;
    for _ in 0..SAMPLES {
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..n {
            f(k % copies)?;
            k += 1;
        }
        dev.synchronize()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3 / n as f64);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[SAMPLES / 2])
}

/// A quick single-call estimate, to choose the number of calls per sample.
fn estimate<F: FnMut() -> Result<Tensor>>(dev: &Device, mut f: F) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

struct Cell {
    batch: usize,
    ctx: usize,
}

fn gqa(dev: &Device, c: &Cell) -> Result<(f64, f64)> {
    let (b, l) = (c.batch, c.ctx);
    let nb = l.div_ceil(BLOCK);
    let total = b * nb;
    let bytes = b * l * KV_HEADS * HEAD_DIM * 2 * 2;
    let copies = ROTATE_BYTES.div_ceil(bytes).clamp(1, 64);
    let x = 8; // 16 bytes of bf16
    let mut caches = Vec::new();
    for _ in 0..copies {
        let k = rand_bf16(&[total, KV_HEADS, HEAD_DIM / x, BLOCK, x], dev)?;
        let v = rand_bf16(&[total, KV_HEADS, HEAD_DIM, BLOCK], dev)?;
        caches.push((k, v));
    }
    let q = rand_bf16(&[b, HEADS, HEAD_DIM], dev)?;
    let bt = Tensor::from_vec(permutation(total, 7), (b, nb), dev)?;
    let cl = Tensor::from_vec(vec![l as u32; b], (b,), dev)?;
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let call = |i: usize| -> Result<Tensor> {
        let (k, v) = &caches[i];
        Ok(mistralrs_paged_attn::paged_attention(
            &q, None, None, k, v, &bt, &cl, None, l, scale, 1.0, None,
        )?)
    };
    let est = estimate(dev, || call(0))?;
    let ms = time_calls(dev, copies, est, call)?;
    Ok((ms, bytes as f64))
}

fn mla(dev: &Device, c: &Cell) -> Result<(f64, f64)> {
    let (b, l) = (c.batch, c.ctx);
    let nb = l.div_ceil(BLOCK);
    let total = b * nb;
    let bytes = b * l * (CKV + KPE) * 2;
    let copies = ROTATE_BYTES.div_ceil(bytes).clamp(1, 64);
    let mut caches = Vec::new();
    for _ in 0..copies {
        let ckv = rand_bf16(&[total, BLOCK, CKV], dev)?;
        let kpe = rand_bf16(&[total, BLOCK, KPE], dev)?;
        caches.push((ckv, kpe));
    }
    let qn = rand_bf16(&[b, HEADS, CKV], dev)?;
    let qp = rand_bf16(&[b, HEADS, KPE], dev)?;
    let indptr: Vec<i32> = (0..=b as i32).map(|i| i * nb as i32).collect();
    let indptr = Tensor::from_vec(indptr, (b + 1,), dev)?;
    let indices: Vec<i32> = permutation(total, 7).into_iter().map(|v| v as i32).collect();
    let indices = Tensor::from_vec(indices, (total,), dev)?;
    let last = (l - (nb - 1) * BLOCK) as i32;
    let last = Tensor::from_vec(vec![last; b], (b,), dev)?;
    let req = Tensor::from_vec((0..b as i32).collect::<Vec<_>>(), (b,), dev)?;
    let tiles = Tensor::from_vec(vec![0i32; b], (b,), dev)?;
    let oind = Tensor::from_vec((0..=b as i32).collect::<Vec<_>>(), (b + 1,), dev)?;
    let chunk = Tensor::from_vec(vec![BLOCK as i32], (1,), dev)?;
    let scale = 1.0 / (192f32).sqrt();
    let call = |i: usize| -> Result<Tensor> {
        let (ckv, kpe) = &caches[i];
        Ok(mistralrs_paged_attn::flashinfer_mla_decode(
            &qn, &qp, ckv, kpe, &indptr, &indices, &last, &req, &tiles, &oind, &chunk, scale,
        )?)
    };
    let est = estimate(dev, || call(0))?;
    let ms = time_calls(dev, copies, est, call)?;
    Ok((ms, bytes as f64))
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let ctxs = parse_list(&get("--ctx", "4096,16384,32768,65536"))?;
    let batches = parse_list(&get("--batch", "1,8,32"))?;
    let dev = Device::new_cuda(0)?;
    println!("kind,batch,ctx,ms_per_call,ms_per_step_32_layers,kv_bytes_read_per_call,GBps");
    for &b in &batches {
        for &l in &ctxs {
            let cell = Cell { batch: b, ctx: l };
            for kind in ["gqa", "mla"] {
                let r = if kind == "gqa" { gqa(&dev, &cell) } else { mla(&dev, &cell) };
                match r {
                    Ok((ms, bytes)) => println!(
                        "{kind},{b},{l},{ms:.4},{:.2},{bytes},{:.1}",
                        ms * 32.0,
                        bytes / ms / 1e6
                    ),
                    Err(e) => println!("{kind},{b},{l},ERROR {e:#}"),
                }
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anchor-kbench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
