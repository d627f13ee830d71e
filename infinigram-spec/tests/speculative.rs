//! Speculative decoding is lossless: with any drafter and policy, greedy output equals plain
//! greedy decoding and sampled output equals plain sampling (same seed), and the sampled
//! output distribution is the target's (chi-square against exact enumeration).

use std::sync::Arc;

use infinigram_spec::spec::toy::HashTarget;
use infinigram_spec::spec::{
    generate_plain, speculative_generate_with, verify_greedy_tree, CalibratedPolicy,
    CountThreshold, DraftPolicy, DraftRecord, Drafter, FixedK, GenerateOptions, MatchLenThreshold,
    NgramDrafter, NgramDrafterConfig, PriorModel, RooflineCost, SampleParams, Sampling, ScoreGate,
    TargetModel,
};
use infinigram_spec::{BuildConfig, Index, IndexBuilder};
use proptest::prelude::*;

/// Documents written by the target itself (greedy from random starts), so that drafts from
/// the corpus are often right, mixed with random documents, so that they are often wrong.
fn corpus(target: &HashTarget, docs: usize, seed: u64) -> Vec<Vec<u32>> {
    let vocab = target.vocab as u64;
    let mut rng = test_support::Rng::new(seed);
    let mut next = || rng.next_u64();
    (0..docs)
        .map(|i| {
            let start: Vec<u32> = (0..3).map(|_| (next() % vocab) as u32).collect();
            let len = 5 + (next() % 40) as usize;
            if i % 3 == 2 {
                return (0..len).map(|_| (next() % vocab) as u32).collect();
            }
            let mut t = HashTarget::new(target.vocab, target.order, target.scale, target.seed);
            let mut doc = start.clone();
            doc.extend(generate_plain(&mut t, &start, len, &Sampling::Greedy, &[]).unwrap());
            doc
        })
        .collect()
}

fn index_of(vocab: usize, docs: Vec<Vec<u32>>) -> Arc<Index<Vec<u8>>> {
    let builder = IndexBuilder::new(BuildConfig::new(vocab as u32)).unwrap();
    Arc::new(builder.build_in_memory(docs.into_iter().map(Ok)).unwrap())
}

fn policy(kind: usize, k: usize) -> Box<dyn DraftPolicy> {
    match kind {
        0 => Box::new(FixedK(k)),
        1 => Box::new(MatchLenThreshold {
            min_match_len: 2,
            max_len: k,
        }),
        2 => Box::new(CountThreshold {
            min_count: 1,
            min_top_share: 0.3,
            max_len: k,
        }),
        3 => Box::new(ScoreGate::new(0.2, 0.5, k)),
        _ => Box::new(CalibratedPolicy::new(
            RooflineCost {
                overhead: 0.1,
                weights: 1.0,
                per_token: 0.02,
            },
            k,
        )),
    }
}

#[derive(Debug, Clone)]
struct Case {
    vocab: usize,
    order: usize,
    scale: f32,
    seed: u64,
    prompt: Vec<u32>,
    max_new: usize,
    policy: usize,
    k: usize,
    use_corpus: bool,
    use_local: bool,
    stop: Option<u32>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        2usize..40,
        1usize..4,
        prop::sample::select(vec![2.0f32, 8.0, 30.0]),
        any::<u64>(),
        1usize..20,
        0usize..60,
        0usize..5,
        1usize..10,
        any::<(bool, bool)>(),
        prop::option::of(0u32..40),
    )
        .prop_map(
            |(vocab, order, scale, seed, plen, max_new, policy, k, (c, l), stop)| {
                let prompt = (0..plen as u64)
                    .map(|i| ((seed >> (i % 48)) as usize % vocab) as u32)
                    .collect();
                Case {
                    vocab,
                    order,
                    scale,
                    seed,
                    prompt,
                    max_new,
                    policy,
                    k,
                    use_corpus: c,
                    use_local: l,
                    stop: stop.filter(|&s| (s as usize) < vocab),
                }
            },
        )
}

fn run(case: &Case, sampling: Sampling) -> (Vec<u32>, Vec<u32>, usize, Vec<DraftRecord>) {
    let target = HashTarget::new(case.vocab, case.order, case.scale, case.seed);
    let docs = corpus(&target, 12, case.seed ^ 0xABCD);
    let config = NgramDrafterConfig {
        use_corpus: case.use_corpus,
        use_local: case.use_local,
        local_max_n: 1 + case.k % 5,
        ..NgramDrafterConfig::default()
    };
    let mut drafter = NgramDrafter::new(Some(index_of(case.vocab, docs)), config);
    let stops: Vec<u32> = case.stop.into_iter().collect();
    let mut log: Vec<DraftRecord> = Vec::new();
    let mut spec_target = target.clone();
    let generation = speculative_generate_with(
        &mut spec_target,
        &mut drafter,
        &mut policy(case.policy, case.k),
        &case.prompt,
        case.max_new,
        &sampling,
        GenerateOptions {
            stop_tokens: stops.clone(),
            max_draft: case.k,
            log: Some(&mut log),
            ..GenerateOptions::default()
        },
    )
    .unwrap();
    let s = generation.stats;
    assert!(s.accepted <= s.submitted && s.submitted <= s.drafted);
    assert_eq!(log.len(), s.drafted);
    assert_eq!(log.iter().filter(|r| r.accepted).count(), s.accepted);
    assert_eq!(log.iter().filter(|r| r.submitted).count(), s.submitted);
    // Each step emits its accepted tokens plus one (the last step may stop early).
    assert!(generation.tokens.len() <= s.accepted + s.steps);
    let mut plain_target = target.clone();
    let plain = generate_plain(
        &mut plain_target,
        &case.prompt,
        case.max_new,
        &sampling,
        &stops,
    )
    .unwrap();
    (generation.tokens, plain, s.accepted, log)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn greedy_speculative_equals_plain_greedy(case in case()) {
        let (spec, plain, _, _) = run(&case, Sampling::Greedy);
        prop_assert_eq!(spec, plain);
    }

    #[test]
    fn sampled_speculative_equals_plain_sampling(
        case in case(),
        temperature in prop::sample::select(vec![0.5f32, 1.0, 2.0]),
        top_k in 0usize..5,
        top_p in prop::sample::select(vec![0.5f32, 0.9, 1.0]),
    ) {
        let sampling = Sampling::Sample(SampleParams { temperature, top_k, top_p, seed: case.seed });
        let (spec, plain, _, _) = run(&case, sampling);
        prop_assert_eq!(spec, plain);
    }
}

#[test]
fn drafting_saves_target_calls_on_self_written_corpus() {
    // The target wrote the corpus: most drafts are right, so far fewer verify steps.
    let target = HashTarget::new(50, 2, 30.0, 11);
    let docs = corpus(&target, 60, 5);
    let index = index_of(50, docs.clone());
    let mut drafter = NgramDrafter::new(Some(index), NgramDrafterConfig::default());
    let mut policy = CalibratedPolicy::new(
        RooflineCost {
            overhead: 0.1,
            weights: 1.0,
            per_token: 0.01,
        },
        8,
    );
    let (mut steps, mut tokens) = (0, 0);
    for d in docs.iter().step_by(3).take(10) {
        let prompt = &d[..3];
        let mut t = target.clone();
        let g = speculative_generate_with(
            &mut t,
            &mut drafter,
            &mut policy,
            prompt,
            40,
            &Sampling::Greedy,
            GenerateOptions::default(),
        )
        .unwrap();
        let mut p = target.clone();
        assert_eq!(
            g.tokens,
            generate_plain(&mut p, prompt, 40, &Sampling::Greedy, &[]).unwrap()
        );
        steps += g.stats.steps;
        tokens += g.tokens.len();
    }
    assert!(
        steps * 2 < tokens,
        "{steps} verify steps for {tokens} tokens"
    );
}

/// Exact distribution of `n` sampled tokens after `prompt`, by enumeration.
fn exact(target: &HashTarget, params: &SampleParams, prompt: &[u32], n: usize) -> Vec<f64> {
    let v = target.vocab;
    let mut probs = vec![0.0; v.pow(n as u32)];
    for (seq_id, p) in probs.iter_mut().enumerate() {
        let mut ctx = prompt.to_vec();
        let mut prob = 1.0;
        let mut rest = seq_id;
        for _ in 0..n {
            let tok = (rest % v) as u32;
            rest /= v;
            let dist = params.distribution(&target.logits_after(&ctx)).unwrap();
            prob *= dist.iter().find(|x| x.0 == tok).map_or(0.0, |x| x.1);
            ctx.push(tok);
        }
        *p = prob;
    }
    probs
}

#[test]
fn sample_and_match_output_distribution_is_the_targets() {
    // Tiny vocabulary, three generated tokens: 27 outcomes, enumerated exactly.
    let target = HashTarget::new(3, 2, 3.0, 21);
    let prompt = [0u32, 1];
    let n = 3;
    // A corpus that makes the drafter propose confidently (and often wrongly).
    let docs: Vec<Vec<u32>> = (0..20)
        .map(|i| vec![0, 1, (i % 3) as u32, 2, 2, 1])
        .collect();
    let index = index_of(3, docs);
    let params = SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    let want = exact(&target, &params, &prompt, n);
    let runs = 20_000u64;
    let mut counts = vec![0u64; want.len()];
    let mut drafter = NgramDrafter::new(Some(index), NgramDrafterConfig::default());
    let mut drafted = 0;
    for seed in 0..runs {
        let mut t = target.clone();
        let g = speculative_generate_with(
            &mut t,
            &mut drafter,
            &mut FixedK(4),
            &prompt,
            n,
            &Sampling::Sample(SampleParams {
                seed: seed * 7919 + 1,
                ..params
            }),
            GenerateOptions::default(),
        )
        .unwrap();
        drafted += g.stats.submitted;
        let id = g
            .tokens
            .iter()
            .rev()
            .fold(0usize, |acc, &t| acc * 3 + t as usize);
        counts[id] += 1;
    }
    assert!(drafted > runs as usize, "the drafter must actually draft");
    // Chi-square over outcomes with expected count ≥ 5; 26 degrees of freedom at most,
    // critical value 54.05 at p = 0.001.
    let mut chi2 = 0.0;
    for (c, p) in counts.iter().zip(&want) {
        let e = p * runs as f64;
        if e >= 5.0 {
            chi2 += (*c as f64 - e).powi(2) / e;
        }
    }
    assert!(chi2 < 54.05, "chi-square {chi2}: {counts:?} vs {want:?}");
    assert!((want.iter().sum::<f64>() - 1.0).abs() < 1e-9);
}

#[test]
fn greedy_tree_verification_equals_plain_greedy() {
    let target = HashTarget::new(20, 2, 20.0, 3);
    let docs = corpus(&target, 40, 9);
    let index = index_of(20, docs.clone());
    for d in docs.iter().take(12) {
        let prompt = &d[..3];
        let mut plain_t = target.clone();
        let plain = generate_plain(&mut plain_t, prompt, 30, &Sampling::Greedy, &[]).unwrap();
        let mut drafter = NgramDrafter::new(Some(index.clone()), NgramDrafterConfig::default());
        drafter.start(prompt).unwrap();
        let mut ctx = prompt.to_vec();
        let mut out = Vec::new();
        while out.len() < plain.len() {
            let tree = drafter.draft_tree(16, 6, &PriorModel).unwrap();
            let root = infinigram_spec::spec::argmax(&target.logits_after(&ctx)).unwrap();
            let node_argmax: Vec<u32> = (0..tree.len())
                .map(|i| {
                    let mut c = ctx.clone();
                    c.extend(tree.path(i).tokens);
                    infinigram_spec::spec::argmax(&target.logits_after(&c)).unwrap()
                })
                .collect();
            let v = verify_greedy_tree(&tree, root, &node_argmax).unwrap();
            let emitted = v.emitted(&tree);
            drafter.accept(&emitted).unwrap();
            ctx.extend(&emitted);
            out.extend(emitted);
        }
        out.truncate(plain.len());
        assert_eq!(out, plain);
    }
}

#[test]
fn errors_not_panics() {
    let mut t = HashTarget::new(5, 1, 1.0, 0);
    let mut d: NgramDrafter<Vec<u8>> = NgramDrafter::new(None, NgramDrafterConfig::default());
    let empty = speculative_generate_with(
        &mut t,
        &mut d,
        &mut FixedK(2),
        &[],
        5,
        &Sampling::Greedy,
        GenerateOptions::default(),
    );
    assert!(empty.is_err());
    let bad = Sampling::Sample(SampleParams {
        temperature: -1.0,
        ..SampleParams::default()
    });
    let r = speculative_generate_with(
        &mut t,
        &mut d,
        &mut FixedK(2),
        &[1, 2],
        5,
        &bad,
        GenerateOptions::default(),
    );
    assert!(r.is_err());

    /// A target that returns the wrong number of rows.
    struct Broken;
    impl TargetModel for Broken {
        fn forward(&mut self, _: &[u32]) -> Vec<Vec<f32>> {
            Vec::new()
        }
        fn rollback(&mut self, _: usize) {}
    }
    let r = speculative_generate_with(
        &mut Broken,
        &mut d,
        &mut FixedK(2),
        &[1, 2],
        5,
        &Sampling::Greedy,
        GenerateOptions::default(),
    );
    assert!(matches!(r, Err(infinigram_spec::Error::Target(_))));
}

#[test]
fn property_cases_exercise_acceptance_and_rejection() {
    let (mut accepted, mut rejected) = (0, 0);
    for i in 0..40u64 {
        let case = Case {
            vocab: 3 + (i as usize * 7) % 30,
            order: 1 + i as usize % 3,
            scale: [2.0, 8.0, 30.0][i as usize % 3],
            seed: i * 0x9E37_79B9,
            prompt: vec![(i % 3) as u32, 1, 2],
            max_new: 40,
            policy: i as usize % 5,
            k: 1 + i as usize % 8,
            use_corpus: i % 4 != 0,
            use_local: i.is_multiple_of(2),
            stop: None,
        };
        let (spec, plain, _, log) = run(&case, Sampling::Greedy);
        assert_eq!(spec, plain);
        accepted += log.iter().filter(|r| r.accepted).count();
        rejected += log.iter().filter(|r| r.verified && !r.accepted).count();
    }
    assert!(
        accepted > 100 && rejected > 20,
        "{accepted} accepted, {rejected} rejected"
    );
}
