//! Form-equivalence tests: materialized and absorbed MLA against each other and the
//! f64 reference, prompt prefill followed by token-by-token decode.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::{Attention, AttnInput, LayerCache, Rope};

pub(crate) use test_support::{rel_err, Rng};

#[derive(Debug, Clone, Copy)]
struct Case {
    shape: MlaShape,
    hidden: usize,
    batch: usize,
    yarn: bool,
    bias: bool,
}

fn spec_of(c: &Case) -> MlaSpec {
    MlaSpec {
        shape: c.shape,
        rope_theta: 10_000.0,
        rope_scaling: if c.yarn {
            MlaRopeScaling::Yarn(YarnScaling {
                factor: 8.0,
                original_max_position_embeddings: 16,
                beta_fast: 4.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
            })
        } else {
            MlaRopeScaling::None
        },
        norm_eps: 1e-6,
        attention_bias: c.bias,
        q_lora_rank: None,
    }
}

/// Random weights scaled so that scores stay O(1).
pub(crate) fn random_weights(s: MlaShape, hidden: usize, bias: bool, g: &mut Rng) -> MlaWeights {
    let inv = |n: usize| 1.0 / (n as f32).sqrt();
    let ones = Tensor::ones(s.kv_lora_rank, DType::F32, &Device::Cpu).unwrap();
    MlaWeights {
        q_proj: g.tensor(&[s.q_rows(), hidden], inv(hidden)),
        q_lora: None,
        kv_a_proj_with_mqa: g.tensor(&[s.kv_a_rows(), hidden], inv(hidden)),
        kv_a_proj_with_mqa_bias: bias.then(|| g.tensor(&[s.kv_a_rows()], 0.3)),
        kv_a_layernorm: (ones + g.tensor(&[s.kv_lora_rank], 0.2)).unwrap(),
        kv_b_proj: g.tensor(&[s.kv_b_rows(), s.kv_lora_rank], inv(s.kv_lora_rank)),
        o_proj: g.tensor(&[hidden, s.o_cols()], inv(s.o_cols())),
        o_proj_bias: bias.then(|| g.tensor(&[hidden], 0.3)),
    }
}

fn shape(kv_lora_rank: usize, rope: usize, heads: usize, nope: usize, v: usize) -> MlaShape {
    MlaShape {
        num_heads: heads,
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rope,
        v_head_dim: v,
        kv_lora_rank,
    }
}

fn cases() -> Vec<Case> {
    let c = |shape, hidden, batch, yarn, bias| Case {
        shape,
        hidden,
        batch,
        yarn,
        bias,
    };
    vec![
        c(shape(16, 8, 2, 16, 16), 32, 1, false, false),
        c(shape(64, 64, 9, 64, 16), 48, 2, false, true),
        c(shape(512, 8, 2, 16, 64), 40, 1, true, false),
        c(shape(512, 64, 9, 64, 64), 64, 1, true, true),
        c(shape(64, 8, 9, 16, 64), 24, 2, false, false),
    ]
}

/// Prefill `prompt` tokens in one step, then the rest one token at a time.
fn run_steps(attn: &MlaAttention, x: &Tensor, prompt: usize, cache: &mut LayerCache) -> Tensor {
    let total = x.dim(1).unwrap();
    let dummy = Rope::with_dim(10_000.0, 2, &crate::config::RopeScaling::None);
    let mut outs = Vec::new();
    let mut pos = 0;
    while pos < total {
        let n = if pos == 0 { prompt } else { 1 };
        let input = AttnInput {
            x: &x.narrow(1, pos, n).unwrap(),
            start_pos: pos,
            rope: &dummy,
        };
        outs.push(attn.forward(&input, cache).unwrap());
        pos += n;
    }
    Tensor::cat(&outs, 1).unwrap()
}

#[test]
fn materialized_and_absorbed_agree_with_reference_prefill_then_decode() {
    let (prompt, total) = (6, 10);
    for (i, case) in cases().into_iter().enumerate() {
        let mut g = Rng::new(100 + i as u64);
        let spec = spec_of(&case);
        let weights = random_weights(case.shape, case.hidden, case.bias, &mut g);
        let attn = MlaAttention::new(&spec, weights).unwrap();
        let x = g.tensor(&[case.batch, total, case.hidden], 1.0);
        let want = reference_forward(&attn, &x).unwrap();
        let mut outs = Vec::new();
        for form in [MlaForm::Materialized, MlaForm::Absorbed, MlaForm::Auto] {
            let layer = attn.clone().with_form(form);
            let mut cache = LayerCache::default();
            let y = run_steps(&layer, &x, prompt, &mut cache);
            let (e_ref, e_cache) = (
                rel_err(&y, &want.out),
                rel_err(&cache.entries[0], &want.latents),
            );
            eprintln!(
                "case {i} {:?} {form:?}: vs f64 reference {e_ref:.2e}, cache {e_cache:.2e}",
                case.shape
            );
            assert!(
                e_ref <= 1e-5,
                "case {i} {form:?}: relative error {e_ref:e} vs reference"
            );
            assert!(
                e_cache <= 1e-5,
                "case {i} {form:?}: cache differs by {e_cache:e}"
            );
            assert_eq!(cache.entries.len(), 1);
            assert_eq!(
                cache.entries[0].dims(),
                &[case.batch, 1, total, case.shape.cache_values_per_token()]
            );
            assert_eq!(cache.values_per_token(), layer.cache_values_per_token());
            outs.push(y);
        }
        let e = rel_err(&outs[1], &outs[0]);
        eprintln!("case {i}: absorbed vs materialized {e:.2e}");
        assert!(
            e <= 1e-5,
            "case {i}: absorbed vs materialized relative error {e:e}"
        );
        // One-shot prefill of the whole sequence equals the stepped run.
        let full = run_steps(
            &attn.clone().with_form(MlaForm::Materialized),
            &x,
            total,
            &mut LayerCache::default(),
        );
        let e = rel_err(&full, &outs[0]);
        assert!(e <= 1e-5, "case {i}: full prefill vs stepped {e:e}");
    }
}

/// With every non-RoPE weight of the query zero, only positions matter; the two
/// forms must still agree (guards the k_pe broadcast and the score sum).
#[test]
fn rope_only_scores_agree() {
    let s = shape(16, 8, 3, 8, 8);
    let mut g = Rng::new(7);
    let mut w = random_weights(s, 24, false, &mut g);
    let mask: Vec<f32> = (0..s.num_heads)
        .flat_map(|_| (0..s.q_head_dim()).map(|j| if j < 8 { 0.0 } else { 1.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (s.q_rows(), 1), &Device::Cpu).unwrap();
    w.q_proj = w.q_proj.broadcast_mul(&mask).unwrap();
    let spec = spec_of(&Case {
        shape: s,
        hidden: 24,
        batch: 1,
        yarn: false,
        bias: false,
    });
    let attn = MlaAttention::new(&spec, w).unwrap();
    let x = g.tensor(&[1, 7, 24], 1.0);
    let want = reference_forward(&attn, &x).unwrap().out;
    for form in [MlaForm::Materialized, MlaForm::Absorbed] {
        let y = run_steps(
            &attn.clone().with_form(form),
            &x,
            3,
            &mut LayerCache::default(),
        );
        assert!(rel_err(&y, &want) <= 1e-5, "{form:?}");
    }
}

#[test]
fn bad_shapes_and_foreign_caches_are_errors() {
    let s = shape(16, 8, 2, 8, 8);
    let spec = spec_of(&Case {
        shape: s,
        hidden: 24,
        batch: 1,
        yarn: false,
        bias: false,
    });
    let mut g = Rng::new(3);
    let good = random_weights(s, 24, false, &mut g);

    let mut w = good.clone();
    w.kv_b_proj = g.tensor(&[s.kv_b_rows() + 1, 16], 0.1);
    let err = MlaAttention::new(&spec, w).unwrap_err().to_string();
    assert!(
        err.contains("kv_b_proj has shape [33, 16], expected [32, 16]"),
        "{err}"
    );

    let mut w = good.clone();
    w.o_proj_bias = Some(g.tensor(&[24], 0.1));
    let err = MlaAttention::new(&spec, w).unwrap_err().to_string();
    assert!(err.contains("attention_bias = false"), "{err}");

    let mut w = good.clone();
    w.q_proj = g.tensor(&[32], 0.1);
    let err = MlaAttention::new(&spec, w).unwrap_err().to_string();
    assert!(err.contains("q_proj has shape [32]"), "{err}");

    let mut odd = spec.clone();
    odd.shape.qk_rope_head_dim = 7;
    let err = MlaAttention::new(&odd, good.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be even"), "{err}");

    let attn = MlaAttention::new(&spec, good).unwrap();
    let rope = Rope::with_dim(10_000.0, 2, &crate::config::RopeScaling::None);
    let run = |x: &Tensor, cache: &mut LayerCache| {
        attn.forward(
            &AttnInput {
                x,
                start_pos: cache.len(),
                rope: &rope,
            },
            cache,
        )
    };
    let err = run(&g.tensor(&[1, 2, 23], 1.0), &mut LayerCache::default()).unwrap_err();
    assert!(
        err.to_string().contains("hidden size 23, the layer has 24"),
        "{err}"
    );
    let err = run(&g.tensor(&[2, 23], 1.0), &mut LayerCache::default()).unwrap_err();
    assert!(
        err.to_string().contains("expected (batch, seq, hidden)"),
        "{err}"
    );
    // A GQA cache (k, v) is refused rather than misread.
    let mut gqa = LayerCache {
        entries: vec![g.tensor(&[1, 2, 3, 4], 1.0), g.tensor(&[1, 2, 3, 4], 1.0)],
    };
    let err = run(&g.tensor(&[1, 1, 24], 1.0), &mut gqa).unwrap_err();
    assert!(
        err.to_string()
            .contains("expected one (batch 1, 1, tokens, 24)"),
        "{err}"
    );
    // A batch change mid-sequence too.
    let mut cache = LayerCache::default();
    run(&g.tensor(&[1, 2, 24], 1.0), &mut cache).unwrap();
    let err = run(&g.tensor(&[2, 1, 24], 1.0), &mut cache).unwrap_err();
    assert!(err.to_string().contains("MLA cache holds"), "{err}");
}
