//! Scheduler tests on random fixtures of every checkpoint kind: continuous batching equals
//! each request decoded alone by the reference decoder; drafting (good and bad drafts)
//! equals plain decoding; queueing, cancellation, stop tokens and stop strings.

use std::collections::BTreeMap;
use std::sync::Arc;

use infinigram_spec::spec::{
    BatchPolicy, BatchPolicySettings, NgramDrafterConfig, PolicyKind, SampleParams, Sampling,
    SpecStats, StepCost,
};
use infinigram_spec::{BuildConfig, IndexBuilder};

use super::*;
use crate::io::Checkpoint;
use crate::model::Decoder;
use crate::runner::{CpuPagedModel, PagedModel, RunnerConfig};
use test_support::fixture::{RandomDeepseek, RandomOneShot};

const VOCAB: usize = 40;

/// Greedy tokens of one request alone through `Decoder::forward` (contiguous cache); the
/// stop token ends it and is not returned.
fn reference(model: &Decoder, prompt: &[u32], max_new: usize, stop: &[u32]) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut logits = model.forward(prompt, &mut cache).unwrap();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let last = logits.dim(0).unwrap() - 1;
        let t = logits
            .get(last)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        if stop.contains(&t) {
            break;
        }
        out.push(t);
        logits = model.forward(&[t], &mut cache).unwrap();
    }
    out
}

enum Fixture {
    Mla(RandomDeepseek),
    OneShot(RandomOneShot),
}

fn load(f: &Fixture, config: RunnerConfig) -> (tempfile::TempDir, Decoder, CpuPagedModel) {
    let dir = tempfile::tempdir().unwrap();
    match f {
        Fixture::Mla(m) => m.write(dir.path()).unwrap(),
        Fixture::OneShot(m) => m.write(dir.path()).unwrap(),
    }
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let decoder = crate::load::load_decoder(&ckpt).unwrap();
    let model = CpuPagedModel::load(&ckpt.spec, ckpt.weights.as_ref(), config).unwrap();
    (dir, decoder, model)
}

fn fixtures() -> Vec<(&'static str, Fixture)> {
    let one = RandomOneShot::tiny();
    vec![
        ("gqa", Fixture::OneShot(RandomOneShot::tiny_gqa())),
        (
            "gqa-qwen2",
            Fixture::OneShot(RandomOneShot {
                qwen2: true,
                ..RandomOneShot::tiny_gqa()
            }),
        ),
        ("mla", Fixture::Mla(RandomDeepseek::tiny())),
        (
            "mla-qlora-bias",
            Fixture::Mla(RandomDeepseek {
                q_lora_rank: Some(20),
                attention_bias: true,
                ..RandomDeepseek::tiny()
            }),
        ),
        ("one-shot", Fixture::OneShot(one.clone())),
        (
            "one-shot-per-layer-ranks",
            Fixture::OneShot(RandomOneShot {
                rank_step: 3,
                ..one.clone()
            }),
        ),
        (
            "one-shot-shared-qwen2",
            Fixture::OneShot(RandomOneShot {
                shared: true,
                qwen2: true,
                ranks: (7, 7),
                ..one
            }),
        ),
    ]
}

const SMALL: RunnerConfig = RunnerConfig {
    block_size: 4,
    num_blocks: 32,
};

const PROMPTS: [&[u32]; 3] = [&[3, 17, 5, 9, 30], &[7, 1], &[11, 4, 38, 2, 19, 6, 25]];

/// Cached values per token of each fixture, exactly.
fn expected_bytes_per_token(f: &Fixture) -> usize {
    match f {
        Fixture::Mla(m) => m.layers * (m.shape.kv_lora_rank + m.shape.qk_rope_head_dim) * 4,
        Fixture::OneShot(m) if m.gqa => m.layers * 2 * m.num_kv_heads * m.head_dim * 4,
        Fixture::OneShot(m) => {
            (0..m.layers)
                .map(|l| {
                    let step = l * m.rank_step;
                    if m.shared {
                        m.ranks.0 + step
                    } else {
                        m.ranks.0 + m.ranks.1 + 2 * step
                    }
                })
                .sum::<usize>()
                * 4
        }
    }
}

#[test]
fn every_checkpoint_kind_batches_like_requests_run_alone() {
    for (name, f) in fixtures() {
        let (_dir, decoder, model) = load(&f, SMALL);
        assert_eq!(
            model.bytes_per_token(),
            expected_bytes_per_token(&f),
            "{name}"
        );
        let mut engine = Engine::new(model, EngineConfig::default());
        let max_new = [7, 5, 6];
        // Request 2 stops at the third token its reference generates.
        let stop2 = reference(&decoder, PROMPTS[2], max_new[2], &[])[2];
        let stops = [vec![], vec![], vec![stop2]];
        let want: Vec<Vec<u32>> = (0..3)
            .map(|i| reference(&decoder, PROMPTS[i], max_new[i], &stops[i]))
            .collect();
        assert!(want[2].len() <= 2, "{name}");
        let req = |i: usize| GenerationRequest {
            stop_tokens: stops[i].clone(),
            ..GenerationRequest::greedy(PROMPTS[i].to_vec(), max_new[i])
        };
        let a = engine.submit(req(0)).unwrap();
        let b = engine.submit(req(1)).unwrap();
        let mut streamed: BTreeMap<RequestId, Vec<u32>> = BTreeMap::new();
        let mut reasons = BTreeMap::new();
        let mut collect = |events: Vec<EngineEvent>| {
            for e in events {
                match e {
                    EngineEvent::Tokens { id, tokens, .. } => {
                        streamed.entry(id).or_default().extend(tokens)
                    }
                    EngineEvent::Finished { id, reason, .. } => {
                        reasons.insert(id, reason);
                    }
                    EngineEvent::Failed { message, .. } => panic!("{name}: {message}"),
                }
            }
        };
        for _ in 0..2 {
            collect(engine.step().unwrap());
        }
        // Joins mid-way, at another position than the others.
        let c = engine.submit(req(2)).unwrap();
        while !engine.is_idle() {
            collect(engine.step().unwrap());
        }
        let done = engine.take_finished();
        for (i, id) in [a, b, c].into_iter().enumerate() {
            assert_eq!(done[&id], want[i], "{name}: request {i}");
            let got = streamed.get(&id).cloned().unwrap_or_default();
            assert_eq!(got, want[i], "{name}: request {i} streamed");
        }
        assert_eq!(reasons[&a], FinishReason::Length);
        assert_eq!(reasons[&c], FinishReason::Stop);
        assert_eq!(engine.model().used_blocks(), 0, "{name}");
        assert_eq!(engine.model().num_sequences(), 0, "{name}");
    }
}

/// An index over `docs` and drafting with a fixed policy of `max_draft`.
fn drafting(docs: Vec<Vec<u32>>, max_draft: usize) -> Drafting {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("i.igs");
    IndexBuilder::new(BuildConfig::new(VOCAB as u32))
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
                max_draft,
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

/// Runs `reqs` to completion; tokens per request in order, and the engine's stats.
fn run(
    engine: &mut Engine<CpuPagedModel>,
    reqs: &[GenerationRequest],
) -> (Vec<Vec<u32>>, Vec<RequestStats>) {
    let ids: Vec<RequestId> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    let mut stats = BTreeMap::new();
    while !engine.is_idle() {
        for e in engine.step().unwrap() {
            match e {
                EngineEvent::Finished { id, stats: s, .. } => {
                    stats.insert(id, s);
                }
                EngineEvent::Failed { message, .. } => panic!("{message}"),
                EngineEvent::Tokens { .. } => {}
            }
        }
    }
    let done = engine.take_finished();
    (
        ids.iter().map(|id| done[id].clone()).collect(),
        ids.iter().map(|id| stats[id]).collect(),
    )
}

/// Good drafts (an index of the model's own continuations) are accepted, bad ones (random
/// tokens) rejected and rolled back; either way the output is plain greedy decoding and
/// sampled output equals plain sampling with the same seed.
#[test]
fn drafting_equals_plain_decoding_and_rolls_back_rejections() {
    for (name, f) in fixtures()
        .into_iter()
        .filter(|(n, _)| ["gqa", "mla"].contains(n))
    {
        let (_dir, decoder, model) = load(&f, SMALL);
        let max_new = 12;
        let want: Vec<Vec<u32>> = PROMPTS
            .iter()
            .map(|p| reference(&decoder, p, max_new, &[]))
            .collect();
        let good: Vec<Vec<u32>> = PROMPTS
            .iter()
            .zip(&want)
            .map(|(p, w)| p.iter().chain(w).copied().collect())
            .collect();
        let mut x = 7u32;
        let bad: Vec<Vec<u32>> = (0..20)
            .map(|_| {
                (0..30)
                    .map(|_| {
                        x = x.wrapping_mul(1103515245).wrapping_add(12345);
                        (x >> 16) % VOCAB as u32
                    })
                    .collect()
            })
            .collect();
        let greedy: Vec<GenerationRequest> = PROMPTS
            .iter()
            .map(|p| GenerationRequest::greedy(p.to_vec(), max_new))
            .collect();
        let mut engine = Engine::new(model, EngineConfig::default());
        for (kind, docs) in [("good", good), ("bad", bad)] {
            engine = {
                let model = std::mem::replace(engine.model_mut(), load(&f, SMALL).2);
                Engine::new(model, EngineConfig::default()).with_drafting(drafting(docs, 4), None)
            };
            let (out, stats) = run(&mut engine, &greedy);
            assert_eq!(out, want, "{name}, {kind} drafts");
            let submitted: usize = stats.iter().map(|s| s.submitted).sum();
            let accepted: usize = stats.iter().map(|s| s.accepted).sum();
            assert!(submitted > 0, "{name}, {kind}: nothing drafted");
            if kind == "good" {
                assert!(accepted * 2 > submitted, "{name}: {accepted}/{submitted}");
            } else {
                assert!(accepted < submitted, "{name}: bad drafts all accepted");
            }
            assert_eq!(engine.model().used_blocks(), 0);
            // Sampling: drafting on and off give the same tokens for the same seed.
            let sampled = |draft: bool| GenerationRequest {
                sampling: Sampling::Sample(SampleParams {
                    temperature: 0.8,
                    top_k: 0,
                    top_p: 0.95,
                    seed: 11,
                }),
                draft,
                ..GenerationRequest::greedy(PROMPTS[0].to_vec(), max_new)
            };
            let (on, _) = run(&mut engine, &[sampled(true)]);
            let (off, _) = run(&mut engine, &[sampled(false)]);
            assert_eq!(
                on, off,
                "{name}, {kind}: sampled output changed by drafting"
            );
        }
    }
}

#[test]
fn requests_wait_for_blocks_and_cancelled_ones_free_theirs() {
    let f = Fixture::OneShot(RandomOneShot::tiny_gqa());
    // 6 blocks of 4 tokens; each request needs (5 + 8 − 1) / 4 = 3 blocks.
    let config = RunnerConfig {
        block_size: 4,
        num_blocks: 6,
    };
    let (_dir, decoder, model) = load(&f, config);
    let mut engine = Engine::new(model, EngineConfig::default());
    let p = PROMPTS[0];
    let want = reference(&decoder, p, 8, &[]);
    let ids: Vec<RequestId> = (0..3)
        .map(|_| {
            engine
                .submit(GenerationRequest::greedy(p.to_vec(), 8))
                .unwrap()
        })
        .collect();
    engine.step().unwrap();
    assert_eq!((engine.num_active(), engine.num_queued()), (2, 1));
    let too_big = engine.submit(GenerationRequest::greedy(vec![5; 20], 8));
    assert!(
        matches!(too_big, Err(Error::CacheFull { .. })),
        "{too_big:?}"
    );
    let done = engine.run_to_completion().unwrap();
    for id in &ids {
        assert_eq!(done[id], want);
    }
    assert_eq!(engine.model().used_blocks(), 0);

    // Cancelling an active request frees its blocks at once; the other runs on.
    let a = engine
        .submit(GenerationRequest::greedy(p.to_vec(), 8))
        .unwrap();
    let b = engine
        .submit(GenerationRequest::greedy(p.to_vec(), 8))
        .unwrap();
    engine.step().unwrap();
    engine.step().unwrap();
    let held = engine.model().used_blocks();
    assert!(engine.cancel(a));
    assert!(engine.model().used_blocks() < held);
    assert!(!engine.cancel(a), "already gone");
    let done = engine.run_to_completion().unwrap();
    assert_eq!(done[&b], want);
    assert!(!done.contains_key(&a));
    assert_eq!(engine.model().used_blocks(), 0);
    // Bad requests are refused at submit, nothing changes.
    assert!(engine.submit(GenerationRequest::greedy(vec![], 3)).is_err());
    assert!(engine
        .submit(GenerationRequest::greedy(vec![VOCAB as u32], 3))
        .is_err());
    assert!(engine
        .submit(GenerationRequest::greedy(vec![1], 0))
        .is_err());
    assert!(engine.is_idle());
}

/// A word-level tokenizer of the fixtures' vocabulary: id `i` is the word `w{i}`, decoded
/// with single spaces between words.
fn word_tokenizer() -> Arc<Tokenizer> {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    Arc::new(json.to_string().parse::<Tokenizer>().unwrap())
}

#[test]
fn stop_strings_end_requests_across_steps() {
    let f = Fixture::OneShot(RandomOneShot::tiny_gqa());
    let (_dir, decoder, model) = load(&f, SMALL);
    let tok = word_tokenizer();
    let mut engine = Engine::new(model, EngineConfig::default()).with_tokenizer(Arc::clone(&tok));
    let p = PROMPTS[2];
    let want = reference(&decoder, p, 10, &[]);
    let words: Vec<String> = want.iter().map(|t| format!("w{t}")).collect();
    // A stop string that spans tokens 3 and 4 (two steps), cut inside token 4's word.
    let stop = format!("{} {}", words[3], &words[4][..1]);
    let full = words.join(" ");
    let cut = full.find(&stop).unwrap();
    let id = engine
        .submit(GenerationRequest {
            stop_strings: vec![stop.clone()],
            ..GenerationRequest::greedy(p.to_vec(), 10)
        })
        .unwrap();
    let mut text = String::new();
    let mut reason = None;
    while !engine.is_idle() {
        for e in engine.step().unwrap() {
            match e {
                EngineEvent::Tokens { text: t, .. } => {
                    assert!(!(text.clone() + &t).contains(&stop), "stop string streamed");
                    text += &t;
                }
                EngineEvent::Finished {
                    text: t, reason: r, ..
                } => {
                    text += &t;
                    reason = Some(r);
                }
                EngineEvent::Failed { message, .. } => panic!("{message}"),
            }
        }
    }
    assert_eq!(text, full[..cut]);
    assert_eq!(reason, Some(FinishReason::Stop));
    assert!(engine.take_finished()[&id].len() <= 5);
    assert_eq!(engine.model().used_blocks(), 0);
    // Without a stop string the whole text comes, in pieces.
    engine
        .submit(GenerationRequest::greedy(p.to_vec(), 10))
        .unwrap();
    let mut text = String::new();
    while !engine.is_idle() {
        for e in engine.step().unwrap() {
            if let EngineEvent::Tokens { text: t, .. } | EngineEvent::Finished { text: t, .. } = e {
                text += &t;
            }
        }
    }
    assert_eq!(text, full);
}
