//! Paged absorbed decode against a contiguous f64 reference, and the paged layer
//! step against the contiguous [`MlaForm::Absorbed`] form.

use candle_core::{DType, Device, Tensor};
use half::bf16;

use super::*;
use crate::cache::{CacheConfig, LatentElem, LatentPagedCache, LayerWidth, SeqId, SeqView};
use crate::mla::{
    latent_attention_f64, MlaAttention, MlaForm, MlaRopeScaling, MlaShape, MlaSpec, MlaWeights,
};
use crate::model::{Attention, AttnInput, LayerCache, Rope};
use crate::Error;

use test_support::Rng;

/// Relative error `‖a − b‖ / ‖b‖` in f64.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// A batch of sequences with their expected (contiguous) rows per layer.
struct Batch<T: LatentElem> {
    cache: LatentPagedCache<T>,
    seqs: Vec<SeqId>,
    /// `rows[seq][layer]`: what the cache should hold, `(tokens, width)`.
    rows: Vec<Vec<Vec<f32>>>,
}

/// Sequences of `lens` in every layer, appended in two chunks each; then `forks`
/// children of the first sequence, each with `fork_extra` more tokens of its own.
fn build<T: LatentElem>(
    g: &mut Rng,
    layers: &[LayerWidth],
    block_size: usize,
    lens: &[usize],
    forks: usize,
    fork_extra: usize,
) -> Batch<T> {
    let mut cache = LatentPagedCache::<T>::new(CacheConfig {
        block_size,
        num_blocks: 256,
        layers: layers.to_vec(),
    })
    .unwrap();
    let (mut seqs, mut all_rows) = (Vec::new(), Vec::new());
    for &len in lens {
        let s = cache.add_sequence();
        let per_layer: Vec<Vec<f32>> = layers
            .iter()
            .enumerate()
            .map(|(l, w)| {
                let rows = g.vec(len * w.width(), 1.0);
                let cut = (len / 2) * w.width();
                cache.append(s, l, w.width(), &rows[..cut]).unwrap();
                cache.append(s, l, w.width(), &rows[cut..]).unwrap();
                rows
            })
            .collect();
        seqs.push(s);
        all_rows.push(per_layer);
    }
    for _ in 0..forks {
        let s = cache.fork(seqs[0]).unwrap();
        let per_layer: Vec<Vec<f32>> = layers
            .iter()
            .enumerate()
            .map(|(l, w)| {
                let extra = g.vec(fork_extra * w.width(), 1.0);
                cache.append(s, l, w.width(), &extra).unwrap();
                let mut rows = all_rows[0][l].clone();
                rows.extend(extra);
                rows
            })
            .collect();
        seqs.push(s);
        all_rows.push(per_layer);
    }
    Batch {
        cache,
        seqs,
        rows: all_rows,
    }
}

/// Decode `layer` of the batch with `params` and return the worst relative error
/// per sequence against the reference.
fn check_layer<T: LatentElem>(
    b: &Batch<T>,
    layer: usize,
    nh: usize,
    params: &DecodeParams,
    g: &mut Rng,
) -> f64 {
    let w = b.cache.layer_widths()[layer];
    let n = b.seqs.len();
    let q_lat = g.vec(n * nh * w.rank, 1.0 / (w.rank as f32).sqrt() * 4.0);
    let q_pe = g.vec(n * nh * w.rope, 1.0);
    let scale = 1.0 / ((w.rope + 16) as f32).sqrt();
    let views: Vec<SeqView<'_>> = b
        .seqs
        .iter()
        .map(|&s| b.cache.view(s, layer).unwrap())
        .collect();
    let query = DecodeQuery {
        q_lat: &q_lat,
        q_pe: &q_pe,
        num_heads: nh,
        scale,
    };
    let out = absorbed_decode(&b.cache.layer(layer).unwrap(), &views, &query, params).unwrap();
    let per = nh * w.rank;
    let mut worst = 0.0f64;
    for i in 0..n {
        let want = latent_attention_f64(
            &b.rows[i][layer],
            w.rank,
            w.rope,
            &q_lat[i * per..][..per],
            &q_pe[i * nh * w.rope..][..nh * w.rope],
            scale,
        );
        worst = worst.max(rel_err(&out[i * per..][..per], &want));
    }
    worst
}

const PARAMS: [DecodeParams; 4] = [
    DecodeParams {
        split_tokens: 256,
        heads_per_task: 8,
    },
    DecodeParams {
        split_tokens: 3,
        heads_per_task: 1,
    },
    DecodeParams {
        split_tokens: 4,
        heads_per_task: 3,
    },
    DecodeParams {
        split_tokens: 7,
        heads_per_task: 16,
    },
];

#[test]
fn paged_decode_matches_contiguous_reference_for_mixed_lengths_and_widths() {
    // Lengths at, just below and just above block boundaries (block 4).
    let lens = [1, 3, 4, 5, 8, 9, 16, 21];
    for (i, &(rank, rope)) in [(16, 8), (64, 64), (512, 8), (512, 64)].iter().enumerate() {
        let mut g = Rng::new(10 + i as u64);
        let layers = [LayerWidth { rank, rope }];
        let b = build::<f32>(&mut g, &layers, 4, &lens, 0, 0);
        for p in &PARAMS {
            let e = check_layer(&b, 0, 5, p, &mut g);
            eprintln!("rank {rank} rope {rope} {p:?}: relative error {e:.2e}");
            assert!(
                e <= 1e-5,
                "rank {rank} rope {rope} {p:?}: relative error {e:e}"
            );
        }
    }
}

#[test]
fn paged_decode_matches_reference_after_fork_and_per_layer_ranks() {
    let mut g = Rng::new(3);
    let layers = [
        LayerWidth { rank: 64, rope: 8 },
        LayerWidth { rank: 16, rope: 8 },
        LayerWidth {
            rank: 512,
            rope: 64,
        },
    ];
    // Parent of 6 tokens (a partial block: children copy it), other lengths mixed.
    let b = build::<f32>(&mut g, &layers, 4, &[6, 11, 2], 3, 5);
    assert!(
        b.cache.used_blocks()
            < b.rows
                .iter()
                .map(|r| (r[0].len() / 72).div_ceil(4))
                .sum::<usize>()
    );
    for layer in 0..layers.len() {
        for p in &PARAMS {
            let e = check_layer(&b, layer, 4, p, &mut g);
            assert!(e <= 1e-5, "layer {layer} {p:?}: relative error {e:e}");
        }
    }
}

#[test]
fn paged_decode_bf16_within_tolerance() {
    let mut g = Rng::new(5);
    let layers = [
        LayerWidth { rank: 64, rope: 8 },
        LayerWidth {
            rank: 512,
            rope: 64,
        },
    ];
    let b = build::<bf16>(&mut g, &layers, 4, &[1, 4, 7, 13], 1, 3);
    for layer in 0..2 {
        let e = check_layer(&b, layer, 3, &DecodeParams::default(), &mut g);
        eprintln!("bf16 layer {layer}: relative error {e:.2e}");
        assert!(e <= 1e-2, "bf16 layer {layer}: relative error {e:e}");
    }
}

#[test]
fn decode_rejects_bad_input_without_writing() {
    let mut g = Rng::new(9);
    let layers = [LayerWidth { rank: 16, rope: 8 }];
    let b = build::<f32>(&mut g, &layers, 4, &[5], 0, 0);
    let layer = b.cache.layer(0).unwrap();
    let (q_lat, q_pe) = (g.vec(2 * 16, 1.0), g.vec(2 * 8, 1.0));
    let q = DecodeQuery {
        q_lat: &q_lat,
        q_pe: &q_pe,
        num_heads: 2,
        scale: 0.3,
    };
    let p = DecodeParams::default();
    let mut out = vec![7.0; 2 * 16];
    let run = |views: &[SeqView<'_>], q: &DecodeQuery<'_>, out: &mut [f32]| {
        absorbed_decode_into(&layer, views, q, &p, out)
    };
    let bad = [SeqView {
        blocks: &[0, 300],
        tokens: 5,
    }];
    assert!(matches!(
        run(&bad, &q, &mut out),
        Err(Error::BadBlock { block: 300, .. })
    ));
    let short = [SeqView {
        blocks: &[0],
        tokens: 5,
    }];
    assert!(matches!(
        run(&short, &q, &mut out),
        Err(Error::BadBlock { .. })
    ));
    let empty = [SeqView {
        blocks: &[],
        tokens: 0,
    }];
    assert!(run(&empty, &q, &mut out).is_err());
    let ok = [b.cache.view(b.seqs[0], 0).unwrap()];
    let narrow = DecodeQuery {
        q_lat: &q_lat[..2 * 15],
        ..q
    };
    assert!(matches!(
        run(&ok, &narrow, &mut out),
        Err(Error::WidthMismatch { what: "q_lat", .. })
    ));
    assert!(
        out.iter().all(|&v| v == 7.0),
        "errors leave the output untouched"
    );
    run(&ok, &q, &mut out).unwrap();
}

// --- The paged layer step against the contiguous absorbed MLA layer. ---

fn mla_layer(g: &mut Rng, s: MlaShape, hidden: usize, bias: bool) -> MlaAttention {
    let spec = MlaSpec {
        shape: s,
        rope_theta: 10_000.0,
        rope_scaling: MlaRopeScaling::None,
        norm_eps: 1e-6,
        attention_bias: bias,
        q_lora_rank: None,
    };
    let inv = |n: usize| 1.0 / (n as f32).sqrt();
    let gamma = (Tensor::ones(s.kv_lora_rank, DType::F32, &Device::Cpu).unwrap()
        + g.tensor(&[s.kv_lora_rank], 0.2))
    .unwrap();
    let w = MlaWeights {
        q_proj: g.tensor(&[s.q_rows(), hidden], inv(hidden)),
        q_lora: None,
        kv_a_proj_with_mqa: g.tensor(&[s.kv_a_rows(), hidden], inv(hidden)),
        kv_a_proj_with_mqa_bias: bias.then(|| g.tensor(&[s.kv_a_rows()], 0.3)),
        kv_a_layernorm: gamma,
        kv_b_proj: g.tensor(&[s.kv_b_rows(), s.kv_lora_rank], inv(s.kv_lora_rank)),
        o_proj: g.tensor(&[hidden, s.o_cols()], inv(s.o_cols())),
        o_proj_bias: bias.then(|| g.tensor(&[hidden], 0.3)),
    };
    MlaAttention::new(&spec, w)
        .unwrap()
        .with_form(MlaForm::Absorbed)
}

fn tensor_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b: Vec<f64> = b
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect();
    rel_err(&a, &b)
}

#[test]
fn paged_layer_step_matches_contiguous_absorbed_form() {
    let mut g = Rng::new(21);
    let (hidden, steps) = (24, 3);
    let shape = MlaShape {
        num_heads: 3,
        qk_nope_head_dim: 16,
        qk_rope_head_dim: 8,
        v_head_dim: 16,
        kv_lora_rank: 32,
    };
    let attn = mla_layer(&mut g, shape, hidden, true);
    // Layer 1 of a cache whose layer 0 has another rank.
    let mut cache = LatentPagedCache::<f32>::new(CacheConfig {
        block_size: 4,
        num_blocks: 32,
        layers: vec![
            LayerWidth { rank: 8, rope: 8 },
            LayerWidth { rank: 32, rope: 8 },
        ],
    })
    .unwrap();
    let paged = PagedMlaLayer::new(attn.clone(), 1)
        .unwrap()
        .with_params(DecodeParams {
            split_tokens: 3,
            heads_per_task: 2,
        });
    let dummy = Rope::with_dim(10_000.0, 2, &crate::config::RopeScaling::None);
    // After the steps: 5, 7, 8 tokens; the next step needs a new block only for the last.
    let prompts = [2usize, 4, 5];
    let xs: Vec<Tensor> = prompts
        .iter()
        .map(|&p| g.tensor(&[1, p + steps, hidden], 1.0))
        .collect();
    // Prefill each sequence contiguously and copy its latents into the paged cache.
    let mut contiguous: Vec<LayerCache> = Vec::new();
    let mut seqs = Vec::new();
    for (x, &p) in xs.iter().zip(&prompts) {
        let mut lc = LayerCache::default();
        let input = AttnInput {
            x: &x.narrow(1, 0, p).unwrap(),
            start_pos: 0,
            rope: &dummy,
        };
        attn.forward(&input, &mut lc).unwrap();
        let s = cache.add_sequence();
        cache.append_tensor(s, 1, &lc.entries[0]).unwrap();
        contiguous.push(lc);
        seqs.push(s);
    }
    for step in 0..steps {
        let mut want = Vec::new();
        for ((x, &p), lc) in xs.iter().zip(&prompts).zip(contiguous.iter_mut()) {
            let input = AttnInput {
                x: &x.narrow(1, p + step, 1).unwrap(),
                start_pos: p + step,
                rope: &dummy,
            };
            want.push(attn.forward(&input, lc).unwrap());
        }
        let want = Tensor::cat(&want, 0).unwrap();
        let x = Tensor::cat(
            &xs.iter()
                .zip(&prompts)
                .map(|(x, &p)| x.narrow(1, p + step, 1).unwrap())
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let got = paged.decode_step(&x, &seqs, &mut cache).unwrap();
        let e = tensor_rel_err(&got, &want);
        assert!(
            e <= 1e-5,
            "step {step}: paged vs contiguous absorbed, relative error {e:e}"
        );
        for (s, lc) in seqs.iter().zip(&contiguous) {
            let lat = lc.entries[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let lat: Vec<f64> = lat.iter().map(|&v| v as f64).collect();
            assert!(rel_err(&cache.gather(*s, 1).unwrap(), &lat) <= 1e-6);
        }
    }
    // A batch step that cannot fit rolls every sequence back.
    let filler = cache.add_sequence();
    while cache.free_blocks() > 0 {
        cache.append(filler, 0, 16, &[0.0; 16 * 4]).unwrap();
    }
    let before: Vec<usize> = seqs.iter().map(|&s| cache.tokens(s, 1).unwrap()).collect();
    let snap: Vec<Vec<f32>> = seqs.iter().map(|&s| cache.gather(s, 1).unwrap()).collect();
    let x = g.tensor(&[3, 1, hidden], 1.0);
    let e = paged.decode_step(&x, &seqs, &mut cache).unwrap_err();
    assert!(matches!(e, Error::CacheFull { .. }), "{e}");
    let after: Vec<usize> = seqs.iter().map(|&s| cache.tokens(s, 1).unwrap()).collect();
    assert_eq!(before, after);
    let snap_after: Vec<Vec<f32>> = seqs.iter().map(|&s| cache.gather(s, 1).unwrap()).collect();
    assert_eq!(snap, snap_after);
    // Wrong widths and duplicate sequences are errors too.
    let wrong = PagedMlaLayer::new(attn, 0).unwrap();
    assert!(matches!(
        wrong.decode_step(&x, &seqs, &mut cache),
        Err(Error::WidthMismatch { .. })
    ));
    let dup = [seqs[0], seqs[0], seqs[1]];
    assert!(paged.decode_step(&x, &dup, &mut cache).is_err());
}
