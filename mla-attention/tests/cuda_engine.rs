//! The one engine on the GPU (`cargo test --features cuda`, run on a GPU machine by
//! `scripts/gpu/test-device.sh`): `CudaPagedModel` with f32 weights and cache gives the
//! CPU paged model's tokens with requests joining mid-way; a verify pass of `1 + k` rows
//! per sequence gives the logits of `k + 1` single-row steps; drafting equals plain
//! decoding; a pass with bad input is refused and changes nothing.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use infinigram_spec::spec::{
    BatchPolicy, BatchPolicySettings, NgramDrafterConfig, PolicyKind, SpecStats, StepCost,
};
use infinigram_spec::{BuildConfig, IndexBuilder};
use mla_attention::cuda::{CudaPagedModel, CudaRunnerOptions, MAX_SEGMENT_ROWS};
use mla_attention::engine::{Drafting, Engine, EngineConfig, GenerationRequest, RequestId};
use mla_attention::io::Checkpoint;
use mla_attention::runner::{CpuPagedModel, PagedModel, RunnerConfig};
use test_support::fixture::{RandomDeepseek, RandomOneShot};

/// Small blocks, so passes cross block boundaries.
const CONFIG: RunnerConfig = RunnerConfig {
    block_size: 4,
    num_blocks: 64,
};

const PROMPTS: [&[u32]; 3] = [&[3, 17, 5, 9, 30], &[7, 1], &[11, 4, 38, 2, 19, 6, 25]];

enum Fixture {
    Mla(RandomDeepseek),
    OneShot(RandomOneShot),
}

fn fixtures() -> Vec<(&'static str, Fixture)> {
    vec![
        ("mla", Fixture::Mla(RandomDeepseek::tiny())),
        (
            "mla-qlora-bias",
            Fixture::Mla(RandomDeepseek {
                q_lora_rank: Some(20),
                attention_bias: true,
                ..RandomDeepseek::tiny()
            }),
        ),
        (
            "one-shot-per-layer-ranks",
            Fixture::OneShot(RandomOneShot {
                rank_step: 3,
                ..RandomOneShot::tiny()
            }),
        ),
    ]
}

fn write(f: &Fixture) -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    match f {
        Fixture::Mla(m) => m.write(dir.path()).unwrap(),
        Fixture::OneShot(m) => m.write(dir.path()).unwrap(),
    }
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    (dir, ckpt)
}

fn gpu_f32(ckpt: &Checkpoint) -> CudaPagedModel<f32> {
    let options = CudaRunnerOptions {
        dtype: DType::F32,
        ..CudaRunnerOptions::default()
    };
    CudaPagedModel::<f32>::load(&ckpt.spec, ckpt.weights.as_ref(), CONFIG, options).unwrap()
}

fn cpu_f32(ckpt: &Checkpoint) -> CpuPagedModel {
    CpuPagedModel::load(&ckpt.spec, ckpt.weights.as_ref(), CONFIG).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// Requests 0 and 1 at once, request 2 after two steps; greedy tokens per request.
fn schedule<M: PagedModel>(engine: &mut Engine<M>, max_new: usize) -> Vec<Vec<u32>> {
    let mut ids: Vec<RequestId> = Vec::new();
    for p in &PROMPTS[..2] {
        ids.push(
            engine
                .submit(GenerationRequest::greedy(p.to_vec(), max_new))
                .unwrap(),
        );
    }
    engine.step().unwrap();
    engine.step().unwrap();
    ids.push(
        engine
            .submit(GenerationRequest::greedy(PROMPTS[2].to_vec(), max_new))
            .unwrap(),
    );
    let done: BTreeMap<RequestId, Vec<u32>> = engine.run_to_completion().unwrap();
    ids.iter().map(|id| done[id].clone()).collect()
}

#[test]
fn gpu_engine_f32_gives_the_cpu_engines_tokens() {
    for (name, f) in fixtures() {
        let (_dir, ckpt) = write(&f);
        let want = schedule(
            &mut Engine::new(cpu_f32(&ckpt), EngineConfig::default()),
            16,
        );
        let mut gpu = Engine::new(gpu_f32(&ckpt), EngineConfig::default());
        let got = schedule(&mut gpu, 16);
        assert_eq!(got, want, "{name}: GPU tokens differ from the CPU engine's");
        assert!(want.iter().all(|t| t.len() == 16), "{name}: {want:?}");
        assert_eq!(gpu.model().used_blocks(), 0, "{name}: blocks leaked");
        // The same pass on both models: logits agree to f32 rounding.
        let (mut cpu, mut gpu) = (cpu_f32(&ckpt), gpu_f32(&ckpt));
        let sc = [
            cpu.prefill(PROMPTS[0]).unwrap(),
            cpu.prefill(PROMPTS[1]).unwrap(),
        ];
        let sg = [
            gpu.prefill(PROMPTS[0]).unwrap(),
            gpu.prefill(PROMPTS[1]).unwrap(),
        ];
        let seg: [&[u32]; 2] = [&[8], &[12]];
        let d = max_abs_diff(
            &rows(&cpu.forward(&sc, &seg).unwrap()),
            &rows(&gpu.forward(&sg, &seg).unwrap()),
        );
        eprintln!("{name}: CPU vs GPU f32 logits, max abs diff {d:.2e}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// A pass of `1 + k` rows per sequence (k differing per sequence, crossing blocks) gives
/// the logits and the cache of the same tokens fed one row per pass.
#[test]
fn gpu_verify_pass_equals_single_row_steps() {
    let f = Fixture::Mla(RandomDeepseek::tiny());
    let (_dir, ckpt) = write(&f);
    let (mut multi, mut single) = (gpu_f32(&ckpt), gpu_f32(&ckpt));
    assert_eq!(multi.max_segment_rows(), MAX_SEGMENT_ROWS);
    let segs: [&[u32]; 3] = [&[8, 14, 2, 33, 21, 5], &[12], &[1, 36, 20]];
    let sm: Vec<_> = PROMPTS.iter().map(|p| multi.prefill(p).unwrap()).collect();
    let ss: Vec<_> = PROMPTS.iter().map(|p| single.prefill(p).unwrap()).collect();
    let got = rows(&multi.forward(&sm, &segs).unwrap());
    let mut want = vec![Vec::new(); segs.len()];
    for j in 0..segs.iter().map(|s| s.len()).max().unwrap() {
        let live: Vec<usize> = (0..segs.len()).filter(|&i| j < segs[i].len()).collect();
        let seqs: Vec<_> = live.iter().map(|&i| ss[i]).collect();
        let step: Vec<&[u32]> = live.iter().map(|&i| &segs[i][j..j + 1]).collect();
        for (&i, r) in live
            .iter()
            .zip(rows(&single.forward(&seqs, &step).unwrap()))
        {
            want[i].push(r);
        }
    }
    let want: Vec<Vec<f32>> = want.into_iter().flatten().collect();
    let d = max_abs_diff(&got, &want);
    eprintln!("verify pass vs single steps: max abs diff {d:.2e}");
    assert!(d < 1e-4, "{d}");
    for (i, s) in segs.iter().enumerate() {
        let n = PROMPTS[i].len() + s.len();
        assert_eq!(multi.tokens(sm[i]).unwrap(), n);
        assert_eq!(single.tokens(ss[i]).unwrap(), n);
        for l in 0..multi.decoder().layers.len() {
            assert_eq!(
                multi.cache().gather(sm[i], l).unwrap(),
                single.cache().gather(ss[i], l).unwrap(),
                "sequence {i} layer {l}: cached rows differ"
            );
        }
    }
}

fn drafting(docs: Vec<Vec<u32>>, vocab: u32) -> Drafting {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.igs");
    IndexBuilder::new(BuildConfig::new(vocab))
        .unwrap()
        .build_file(
            &path,
            docs.into_iter().map(Ok),
            &infinigram_spec::NoProgress,
        )
        .unwrap();
    // The map stays valid after the directory is gone.
    let index = infinigram_spec::Index::open(&path, Default::default()).unwrap();
    Drafting {
        index: Arc::new(index),
        drafter: NgramDrafterConfig::default(),
        policy: BatchPolicy::new(
            BatchPolicySettings {
                max_draft: 5,
                kind: PolicyKind::Fixed,
                max_concurrency: 64,
            },
            StepCost {
                passes: [1e-3; 7],
                per_sequence: 0.0,
            },
        ),
        stats: Arc::new(SpecStats::default()),
        log: None,
    }
}

/// Drafts of the model's own continuations are accepted, random ones rejected and rolled
/// back; either way the tokens are plain greedy decoding's.
#[test]
fn gpu_drafting_equals_plain_decoding() {
    let f = Fixture::Mla(RandomDeepseek::tiny());
    let (_dir, ckpt) = write(&f);
    let vocab = ckpt.spec.vocab_size as u32;
    let plain = schedule(
        &mut Engine::new(gpu_f32(&ckpt), EngineConfig::default()),
        16,
    );
    let good: Vec<Vec<u32>> = PROMPTS
        .iter()
        .zip(&plain)
        .map(|(p, w)| p.iter().chain(w).copied().collect())
        .collect();
    let mut rng = test_support::Rng::new(5);
    let bad: Vec<Vec<u32>> = (0..20)
        .map(|_| (0..30).map(|_| rng.below(vocab as u64) as u32).collect())
        .collect();
    for (kind, docs) in [("good", good), ("bad", bad)] {
        let d = drafting(docs, vocab);
        let stats = d.stats.clone();
        let mut engine =
            Engine::new(gpu_f32(&ckpt), EngineConfig::default()).with_drafting(d, None);
        let got = schedule(&mut engine, 16);
        assert_eq!(got, plain, "{kind} drafts changed the tokens");
        assert_eq!(engine.model().used_blocks(), 0, "{kind}: blocks leaked");
        let s = stats.snapshot();
        eprintln!(
            "{kind} drafts: {} drafted, {} accepted",
            s.drafted_tokens, s.accepted_tokens
        );
        assert!(s.drafted_tokens > 0, "{kind}: nothing drafted");
        if kind == "good" {
            assert!(s.accepted_tokens * 2 > s.drafted_tokens, "{kind}: {s:?}");
        } else {
            assert!(
                s.accepted_tokens < s.drafted_tokens,
                "bad drafts all accepted"
            );
        }
    }
}

#[test]
fn gpu_pass_with_bad_input_changes_nothing() {
    let f = Fixture::Mla(RandomDeepseek::tiny());
    let (_dir, ckpt) = write(&f);
    let (mut m, mut fresh) = (gpu_f32(&ckpt), gpu_f32(&ckpt));
    let s = m.prefill(PROMPTS[0]).unwrap();
    let t = m.prefill(PROMPTS[1]).unwrap();
    let before = |m: &CudaPagedModel<f32>| {
        (
            m.tokens(s).unwrap(),
            m.tokens(t).unwrap(),
            m.free_blocks(),
            m.cache().gather(s, 0).unwrap(),
        )
    };
    let snap = before(&m);
    let vocab = m.vocab_size() as u32;
    let long = vec![1u32; MAX_SEGMENT_ROWS + 1];
    let outside = [vocab];
    let bad: [(&str, Vec<_>, Vec<&[u32]>); 5] = [
        (
            "token outside the vocabulary",
            vec![s, t],
            vec![&[1, 2], &outside],
        ),
        ("a sequence twice", vec![s, s], vec![&[1], &[2]]),
        ("an empty segment", vec![s, t], vec![&[1], &[]]),
        ("more rows than a segment takes", vec![s], vec![&long]),
        (
            "segments and sequences differ in number",
            vec![s, t],
            vec![&[1]],
        ),
    ];
    for (what, seqs, segs) in bad {
        assert!(m.forward(&seqs, &segs).is_err(), "{what}: accepted");
        assert!(before(&m) == snap, "{what}: the cache changed");
    }
    // A prompt larger than the whole cache is refused and takes no blocks.
    let huge = vec![3u32; CONFIG.block_size * CONFIG.num_blocks + 1];
    assert!(
        m.prefill(&huge).is_err(),
        "an oversized prompt was accepted"
    );
    assert!(before(&m) == snap, "an oversized prompt changed the cache");
    // A valid pass afterwards is exactly a fresh model's.
    let fs = fresh.prefill(PROMPTS[0]).unwrap();
    let ft = fresh.prefill(PROMPTS[1]).unwrap();
    let seg: [&[u32]; 2] = [&[4, 9], &[13]];
    let got = rows(&m.forward(&[s, t], &seg).unwrap());
    let want = rows(&fresh.forward(&[fs, ft], &seg).unwrap());
    assert_eq!(
        got, want,
        "a pass after refused ones differs from a fresh model's"
    );
}
