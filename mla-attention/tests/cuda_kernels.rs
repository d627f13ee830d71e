//! The CUDA decode on the device (`cargo test --features cuda`, run on a GPU machine by
//! `scripts/gpu/test-device.sh`): paged decode against a contiguous f64 reference (f32 ≤
//! 1e-5, bf16 ≤ 1e-2) over mixed lengths, block boundaries, shared prefixes, several
//! widths, head counts, split policies and per-layer ranks; the CUDA cache against the
//! CPU cache driven by the same operations; bad input refused with nothing changed.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use half::bf16;
use mla_attention::cache::{CacheConfig, LatentPagedCache, LayerWidth, SeqId, SeqView};
use mla_attention::cuda::{
    CudaDecodeQuery, CudaLatentCache, CudaLatentElem, CudaMlaDecoder, KernelChoice, KernelPlan,
    MlaKernels, SplitPolicy,
};
use mla_attention::mla::latent_attention_f64;
use mla_attention::Error;
use rayon::prelude::*;

use test_support::Rng;

/// One checked case.
#[derive(Debug, Clone)]
struct CaseResult {
    name: String,
    dtype: &'static str,
    kernel: String,
    max_rel_err: f64,
    tolerance: f64,
    passed: bool,
}

/// Everything the checks of one test found (each case printed as it runs).
#[derive(Debug, Default)]
struct CheckReport {
    cases: Vec<CaseResult>,
    bad_input: Vec<(String, bool)>,
    failures: usize,
}

impl CheckReport {
    fn push(&mut self, c: CaseResult) {
        if !c.passed {
            self.failures += 1;
        }
        eprintln!(
            "check {:<48} {:>4} {:<24} rel err {:.2e} (tol {:.0e}) {}",
            c.name,
            c.dtype,
            c.kernel,
            c.max_rel_err,
            c.tolerance,
            if c.passed { "ok" } else { "FAILED" }
        );
        self.cases.push(c);
    }

    fn bad(&mut self, what: &str, ok: bool) {
        if !ok {
            self.failures += 1;
        }
        eprintln!(
            "bad input {what:<60} {}",
            if ok { "rejected ok" } else { "FAILED" }
        );
        self.bad_input.push((what.to_string(), ok));
    }
}

/// A batch built identically in a CPU and a CUDA cache, with the expected rows.
struct Batch<T: CudaLatentElem> {
    gpu: CudaLatentCache<T>,
    cpu: LatentPagedCache<T>,
    seqs: Vec<SeqId>,
    /// `rows[seq][layer]`: the f32 rows as stored (rounded to `T`).
    rows: Vec<Vec<Vec<f32>>>,
}

fn round<T: CudaLatentElem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

/// Sequences of `lens` (appended in two chunks, so appends start mid-block), then
/// `forks` children of the last (longest) sequence with `fork_extra` rows each: a
/// shared prefix whose partial last block is copied on write.
fn build<T: CudaLatentElem>(
    k: &Arc<MlaKernels>,
    g: &mut Rng,
    layers: &[LayerWidth],
    block_size: usize,
    lens: &[usize],
    forks: usize,
    fork_extra: usize,
) -> Result<Batch<T>> {
    let blocks: usize = lens.iter().map(|l| l.div_ceil(block_size)).sum::<usize>()
        + forks * (fork_extra.div_ceil(block_size) + 1)
        + 4;
    let cfg = CacheConfig {
        block_size,
        num_blocks: blocks,
        layers: layers.to_vec(),
    };
    let mut gpu = CudaLatentCache::<T>::new(k.clone(), cfg.clone())?;
    let mut cpu = LatentPagedCache::<T>::new(cfg)?;
    let (mut seqs, mut all) = (Vec::new(), Vec::new());
    for &len in lens {
        let (s, c) = (gpu.add_sequence(), cpu.add_sequence());
        ensure!(s == c, "sequence ids diverge");
        let mut per_layer = Vec::new();
        for (l, w) in layers.iter().enumerate() {
            let rows = g.symmetric_vec(len * w.width(), 1.0);
            let cut = (len / 2) * w.width();
            for part in [&rows[..cut], &rows[cut..]] {
                gpu.append(s, l, w.width(), part)?;
                cpu.append(c, l, w.width(), part)?;
            }
            per_layer.push(round::<T>(&rows));
        }
        seqs.push(s);
        all.push(per_layer);
    }
    for _ in 0..forks {
        let parent = seqs.len() - 1;
        let (s, c) = (gpu.fork(seqs[parent])?, cpu.fork(seqs[parent])?);
        ensure!(s == c, "fork ids diverge");
        let mut per_layer = Vec::new();
        for (l, w) in layers.iter().enumerate() {
            let extra = g.symmetric_vec(fork_extra * w.width(), 1.0);
            gpu.append(s, l, w.width(), &extra)?;
            cpu.append(c, l, w.width(), &extra)?;
            let mut rows = all[parent][l].clone();
            rows.extend(round::<T>(&extra));
            per_layer.push(rows);
        }
        seqs.push(s);
        all.push(per_layer);
    }
    Ok(Batch {
        gpu,
        cpu,
        seqs,
        rows: all,
    })
}

/// The CUDA cache must hold what the CPU cache holds, with the same tables.
fn same_as_cpu<T: CudaLatentElem>(b: &Batch<T>) -> Result<()> {
    ensure!(
        b.gpu.used_blocks() == b.cpu.used_blocks(),
        "used blocks differ"
    );
    ensure!(
        b.gpu.bytes_per_token() == b.cpu.bytes_per_token(),
        "bytes/token differ"
    );
    ensure!(
        b.gpu.pool_bytes() == b.cpu.pool_bytes(),
        "pool bytes differ"
    );
    for &s in &b.seqs {
        ensure!(
            b.gpu.block_table(s)? == b.cpu.block_table(s)?,
            "block tables differ for {s:?}"
        );
        for l in 0..b.gpu.num_layers() {
            ensure!(
                b.gpu.gather(s, l)? == b.cpu.gather(s, l)?,
                "rows differ: {s:?} layer {l}"
            );
        }
    }
    Ok(())
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY; // NaN never passes (also: an unwritten poisoned element)
    }
    let num: f64 = a.iter().zip(b).map(|(&x, y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

fn upload<T: CudaLatentElem>(k: &MlaKernels, v: &[f32]) -> Result<CudaSlice<T>> {
    let host: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    Ok(k.stream().clone_htod(&host)?)
}

fn nan_buffer(k: &MlaKernels, n: usize) -> Result<CudaSlice<f32>> {
    Ok(k.stream().clone_htod(&vec![f32::NAN; n])?)
}

/// Decode `layer` of the batch and return the worst relative error per sequence.
fn check_layer<T: CudaLatentElem>(
    k: &Arc<MlaKernels>,
    b: &Batch<T>,
    dec: &mut CudaMlaDecoder,
    layer: usize,
    nh: usize,
    g: &mut Rng,
) -> Result<f64> {
    let w = b.gpu.layer_widths()[layer];
    let n = b.seqs.len();
    let q_lat = round::<T>(&g.symmetric_vec(n * nh * w.rank, 4.0));
    let q_pe = round::<T>(&g.symmetric_vec(n * nh * w.rope, 4.0));
    let scale = 1.0 / (192f32).sqrt();
    let (ql, qp) = (upload::<T>(k, &q_lat)?, upload::<T>(k, &q_pe)?);
    let q = CudaDecodeQuery {
        q_lat: &ql.as_view(),
        q_pe: &qp.as_view(),
        num_heads: nh,
        scale,
    };
    dec.plan_for(&b.gpu, &b.seqs, layer)?;
    let mut out = nan_buffer(k, n * nh * w.rank)?;
    dec.decode_into(&b.gpu, layer, &q, &mut out)?;
    let got = k.stream().clone_dtoh(&out)?;
    // Same inputs again: a race shows up as a different result.
    let mut again = nan_buffer(k, n * nh * w.rank)?;
    dec.decode_into(&b.gpu, layer, &q, &mut again)?;
    ensure!(
        got == k.stream().clone_dtoh(&again)?,
        "two identical decodes differ (race?)"
    );
    let per = nh * w.rank;
    let worst = (0..n)
        .into_par_iter()
        .map(|i| {
            let want = latent_attention_f64(
                &b.rows[i][layer],
                w.rank,
                w.rope,
                &q_lat[i * per..][..per],
                &q_pe[i * nh * w.rope..][..nh * w.rope],
                scale,
            );
            rel_err(&got[i * per..][..per], &want)
        })
        .reduce(|| 0.0, f64::max);
    Ok(worst)
}

fn kernel_name(dec: &CudaMlaDecoder, w: LayerWidth, nh: usize, bf: bool) -> Result<String> {
    let p = if bf {
        dec.kernel_plan::<bf16>(w, nh)?
    } else {
        dec.kernel_plan::<f32>(w, nh)?
    };
    Ok(match p {
        KernelPlan::TensorCore {
            mt,
            nt,
            tile_tokens,
            ..
        } => format!("tc(m{mt},n{nt},t{tile_tokens})"),
        KernelPlan::Generic { tile_tokens, .. } => format!("generic(t{tile_tokens})"),
    })
}

/// Mixed lengths, block boundaries, shared prefixes, several widths, head counts,
/// split policies and both kernels, for one element type.
fn decode_cases<T: CudaLatentElem>(
    k: &Arc<MlaKernels>,
    rep: &mut CheckReport,
    quick: bool,
) -> Result<()> {
    let bf = T::TENSOR_CORES;
    let tol = if bf { 1e-2 } else { 1e-5 };
    let dtype = if bf { "bf16" } else { "f32" };
    let widths: &[(usize, usize)] = &[
        (512, 64),
        (256, 32),
        (64, 8),
        (100, 13),
        (768, 64),
        (520, 8),
    ];
    for (wi, &(rank, rope)) in widths.iter().enumerate() {
        let layers = [LayerWidth { rank, rope }];
        // The 512/64 shape gets every head count and split policy; the others a subset.
        let (heads, policies): (&[usize], &[SplitPolicy]) = if wi == 0 {
            (
                &[32, 16, 5, 40],
                &[
                    SplitPolicy::Auto,
                    SplitPolicy::Fixed(64),
                    SplitPolicy::Fixed(24),
                ],
            )
        } else if quick {
            (&[32], &[SplitPolicy::Fixed(24)])
        } else {
            (&[32, 5], &[SplitPolicy::Auto, SplitPolicy::Fixed(24)])
        };
        for &bs in &[16usize, 32, 7] {
            let mut g = Rng::new(100 + wi as u64 * 10 + bs as u64);
            let lens = [1, bs - 1, bs, bs + 1, 2 * bs, 63, 64, 65, 200, 1500];
            let b = build::<T>(k, &mut g, &layers, bs, &lens, 3, bs + 3)?;
            if let Err(e) = same_as_cpu(&b) {
                rep.bad(&format!("cache mirror {rank}/{rope} bs{bs}: {e:#}"), false);
            }
            for &nh in heads {
                for &policy in policies {
                    for choice in [KernelChoice::Auto, KernelChoice::Generic] {
                        if !bf && choice == KernelChoice::Generic {
                            continue; // f32 is always generic
                        }
                        let mut dec = CudaMlaDecoder::new(k.clone())
                            .with_policy(policy)
                            .with_kernel(choice);
                        let name = format!("{rank}/{rope} bs{bs} h{nh} {policy:?}");
                        let kn = kernel_name(&dec, layers[0], nh, bf)?;
                        let e = check_layer(k, &b, &mut dec, 0, nh, &mut g)
                            .with_context(|| format!("{name} {kn}"))?;
                        rep.push(CaseResult {
                            name,
                            dtype,
                            kernel: kn,
                            max_rel_err: e,
                            tolerance: tol,
                            passed: e <= tol,
                        });
                    }
                }
            }
        }
    }
    // Per-layer ranks in one cache, one plan for every layer.
    let layers: Vec<LayerWidth> = [
        (512, 64),
        (256, 64),
        (768, 64),
        (264, 64),
        (384, 64),
        (100, 13),
    ]
    .iter()
    .map(|&(rank, rope)| LayerWidth { rank, rope })
    .collect();
    let mut g = Rng::new(7);
    let b = build::<T>(k, &mut g, &layers, 32, &[5, 31, 32, 33, 700, 2100], 2, 40)?;
    if let Err(e) = same_as_cpu(&b) {
        rep.bad(&format!("cache mirror per-layer ranks: {e:#}"), false);
    }
    let mut dec = CudaMlaDecoder::new(k.clone());
    for (l, w) in layers.iter().enumerate() {
        let kn = kernel_name(&dec, *w, 32, bf)?;
        let e = check_layer(k, &b, &mut dec, l, 32, &mut g)?;
        rep.push(CaseResult {
            name: format!("per-layer plan layer {l} {}/{}", w.rank, w.rope),
            dtype,
            kernel: kn,
            max_rel_err: e,
            tolerance: tol,
            passed: e <= tol,
        });
    }
    Ok(())
}

/// Errors, not panics, and nothing changed or written on error.
fn bad_input(k: &Arc<MlaKernels>, rep: &mut CheckReport) -> Result<()> {
    let mut g = Rng::new(99);
    let layers = [
        LayerWidth {
            rank: 512,
            rope: 64,
        },
        LayerWidth {
            rank: 256,
            rope: 64,
        },
    ];
    let mut b = build::<bf16>(k, &mut g, &layers, 16, &[20, 40], 1, 5)?;
    let snapshot = |b: &Batch<bf16>| -> Result<Vec<Vec<f32>>> {
        let mut v = Vec::new();
        for &s in &b.seqs {
            for l in 0..2 {
                v.push(b.gpu.gather(s, l)?);
            }
        }
        Ok(v)
    };
    let before = (snapshot(&b)?, b.gpu.free_blocks());
    // Sequence longer than the cache can hold.
    let r = b
        .gpu
        .append(b.seqs[1], 0, 576, &g.symmetric_vec(576 * 10_000, 1.0));
    rep.bad(
        "sequence too long for the cache -> CacheFull",
        matches!(r, Err(Error::CacheFull { .. })),
    );
    // Mismatched widths.
    let r = b.gpu.append(b.seqs[0], 0, 320, &g.symmetric_vec(320, 1.0));
    rep.bad(
        "append width 320 into a 576 layer -> WidthMismatch",
        matches!(r, Err(Error::WidthMismatch { .. })),
    );
    let r = b.gpu.append(b.seqs[0], 5, 576, &g.symmetric_vec(576, 1.0));
    rep.bad("append into layer 5 of 2 -> error", r.is_err());
    let gone = b.gpu.add_sequence();
    b.gpu.free(gone)?;
    rep.bad(
        "append to a freed sequence -> UnknownSequence",
        matches!(
            b.gpu.append(gone, 0, 576, &[0.0; 576]),
            Err(Error::UnknownSequence { .. })
        ),
    );
    let after = (snapshot(&b)?, b.gpu.free_blocks());
    rep.bad(
        "failed appends leave every sequence unchanged",
        before == after,
    );

    let mut dec = CudaMlaDecoder::new(k.clone());
    let nb = b.gpu.num_blocks();
    let bad_blocks = [0u32, nb as u32 + 3];
    let r = dec.plan_views(
        &[SeqView {
            blocks: &bad_blocks,
            tokens: 20,
        }],
        16,
        nb,
    );
    rep.bad(
        "out-of-range block id -> BadBlock",
        matches!(r, Err(Error::BadBlock { .. })),
    );
    let short = [1u32];
    let r = dec.plan_views(
        &[SeqView {
            blocks: &short,
            tokens: 20,
        }],
        16,
        nb,
    );
    rep.bad(
        "block table too short for its tokens -> BadBlock",
        matches!(r, Err(Error::BadBlock { .. })),
    );
    let r = dec.plan_views(
        &[SeqView {
            blocks: &[],
            tokens: 0,
        }],
        16,
        nb,
    );
    rep.bad("sequence with no rows -> error", r.is_err());

    dec.plan_for(&b.gpu, &b.seqs, 0)?;
    let n = b.seqs.len();
    let (ql, qp) = (
        upload::<bf16>(k, &g.symmetric_vec(n * 8 * 512, 1.0))?,
        upload::<bf16>(k, &g.symmetric_vec(n * 8 * 64, 1.0))?,
    );
    let mut out = nan_buffer(k, n * 8 * 256)?;
    let q = CudaDecodeQuery {
        q_lat: &ql.as_view(),
        q_pe: &qp.as_view(),
        num_heads: 8,
        scale: 0.1,
    };
    let r = dec.decode_into(&b.gpu, 1, &q, &mut out);
    rep.bad(
        "512-wide query on a 256-rank layer -> WidthMismatch",
        matches!(r, Err(Error::WidthMismatch { .. })),
    );
    rep.bad(
        "... and the output is left untouched",
        k.stream().clone_dtoh(&out)?.iter().all(|v| v.is_nan()),
    );
    let r = dec.decode_into(&b.gpu, 9, &q, &mut out);
    rep.bad("decode of layer 9 of 2 -> error", r.is_err());
    let other = CudaLatentCache::<bf16>::new(
        k.clone(),
        CacheConfig {
            block_size: 32,
            num_blocks: 8,
            layers: layers.to_vec(),
        },
    )?;
    let mut out0 = nan_buffer(k, n * 8 * 512)?;
    let r = dec.decode_into(&other, 0, &q, &mut out0);
    rep.bad(
        "plan of one cache used on another geometry -> error",
        r.is_err(),
    );
    let mut fresh = CudaMlaDecoder::new(k.clone());
    rep.bad(
        "decode before plan -> error",
        fresh.decode_into(&b.gpu, 0, &q, &mut out0).is_err(),
    );
    let wide = CudaMlaDecoder::new(k.clone());
    rep.bad(
        "a width beyond shared memory -> error",
        wide.kernel_plan::<f32>(
            LayerWidth {
                rank: 60_000,
                rope: 64,
            },
            32,
        )
        .is_err(),
    );
    // After all that, a good decode still works and matches the reference.
    let e = check_layer(k, &b, &mut dec, 0, 8, &mut g)?;
    rep.bad(
        "a valid decode after the errors is still correct",
        e <= 1e-2,
    );
    if rep.failures > 0 {
        eprintln!("bad-input checks: {} failure(s) so far", rep.failures);
    }
    Ok(())
}

fn kernels() -> Arc<MlaKernels> {
    MlaKernels::on_device(0).expect("CUDA device 0 (these tests run on a GPU machine)")
}

fn assert_clean(rep: &CheckReport) {
    assert!(
        !rep.cases.is_empty() || !rep.bad_input.is_empty(),
        "no checks ran"
    );
    let failed: Vec<&str> = rep
        .cases
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .chain(rep.bad_input.iter().filter(|b| !b.1).map(|b| b.0.as_str()))
        .collect();
    assert_eq!(rep.failures, 0, "failed: {failed:?}");
}

#[test]
fn f32_paged_decode_matches_the_f64_reference() {
    let mut rep = CheckReport::default();
    decode_cases::<f32>(&kernels(), &mut rep, false).unwrap();
    assert_clean(&rep);
}

#[test]
fn bf16_paged_decode_matches_the_f64_reference() {
    let mut rep = CheckReport::default();
    decode_cases::<bf16>(&kernels(), &mut rep, false).unwrap();
    assert_clean(&rep);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut rep = CheckReport::default();
    bad_input(&kernels(), &mut rep).unwrap();
    assert_clean(&rep);
}
