//! A tiny random Llama / Qwen2 checkpoint (2 layers, 3 query heads over 1 KV head) for
//! format and math tests; never for quality numbers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

pub const VOCAB: usize = 97;
pub const HIDDEN: usize = 48;
pub const HEADS: usize = 3;
pub const HEAD_DIM: usize = 16;

pub use test_support::Rng;

pub fn write_source(dir: &Path, qwen: bool) {
    write_source_with(dir, qwen, serde_json::json!({}));
}

/// [`write_source`] with extra `config.json` keys (e.g. a `rope_scaling`).
pub fn write_source_with(dir: &Path, qwen: bool, extra: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Rng::new(11);
    let s = 1.0 / (HIDDEN as f32).sqrt();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        r.symmetric_tensor(&[VOCAB, HIDDEN], 1.0),
    );
    t.insert(
        "lm_head.weight".into(),
        r.symmetric_tensor(&[VOCAB, HIDDEN], s),
    );
    t.insert(
        "model.norm.weight".into(),
        (r.symmetric_tensor(&[HIDDEN], 0.1) + 1.0).unwrap(),
    );
    for l in 0..2 {
        let mut put = |n: &str, v: Tensor| t.insert(format!("model.layers.{l}.{n}"), v);
        put(
            "input_layernorm.weight",
            (r.symmetric_tensor(&[HIDDEN], 0.1) + 1.0).unwrap(),
        );
        put(
            "post_attention_layernorm.weight",
            (r.symmetric_tensor(&[HIDDEN], 0.1) + 1.0).unwrap(),
        );
        put(
            "self_attn.q_proj.weight",
            r.symmetric_tensor(&[HEADS * HEAD_DIM, HIDDEN], 2.0 * s),
        );
        put(
            "self_attn.k_proj.weight",
            r.symmetric_tensor(&[HEAD_DIM, HIDDEN], 2.0 * s),
        );
        put(
            "self_attn.v_proj.weight",
            r.symmetric_tensor(&[HEAD_DIM, HIDDEN], s),
        );
        put(
            "self_attn.o_proj.weight",
            r.symmetric_tensor(&[HIDDEN, HEADS * HEAD_DIM], s),
        );
        put("mlp.gate_proj.weight", r.symmetric_tensor(&[64, HIDDEN], s));
        put("mlp.up_proj.weight", r.symmetric_tensor(&[64, HIDDEN], s));
        put(
            "mlp.down_proj.weight",
            r.symmetric_tensor(&[HIDDEN, 64], 0.125),
        );
        if qwen {
            put(
                "self_attn.q_proj.bias",
                r.symmetric_tensor(&[HEADS * HEAD_DIM], 0.5),
            );
            put(
                "self_attn.k_proj.bias",
                r.symmetric_tensor(&[HEAD_DIM], 0.5),
            );
            put(
                "self_attn.v_proj.bias",
                r.symmetric_tensor(&[HEAD_DIM], 0.5),
            );
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if qwen { "qwen2" } else { "llama" },
        "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": HEADS,
        "num_key_value_heads": 1, "head_dim": HEAD_DIM, "intermediate_size": 64,
        "vocab_size": VOCAB, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "max_position_embeddings": 128
    });
    let mut config = config;
    for (k, v) in extra.as_object().expect("extra config is an object") {
        config[k.as_str()] = v.clone();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// Stock options for the tiny model: `kv_lora_rank` (anchor included), `rope_dim` with the
/// smallest legal FreqFold, CARE basis, bias anchor, no damping.
pub fn stock_options(kv_lora_rank: usize, rope_dim: usize) -> care_convert::stock::StockOptions {
    use care_convert::stock::{LatentBasis, LatentNorm, RopeSplitOptions, StockOptions};
    StockOptions {
        kv_lora_rank,
        rank: None,
        rope: RopeSplitOptions {
            rope_dim,
            freqfold: HEAD_DIM / rope_dim,
            pca: true,
        },
        basis: LatentBasis::Care,
        balance: true,
        latent_norm: LatentNorm::BiasAnchor,
        pad_v: true,
        damping: 0.0,
    }
}

/// Calibrate the tiny source at `src` on 40 random windows of 24 tokens (seed 5) and
/// convert it with `opts(spec)`; returns the source model and the conversion.
pub fn convert_tiny(
    src: &Path,
    opts: impl FnOnce(&mla_attention::config::ModelSpec) -> care_convert::stock::StockOptions,
) -> (
    mla_attention::io::Checkpoint,
    mla_attention::model::Decoder,
    care_convert::stock::StockModel,
) {
    use care_convert::calibrate::collect_all;
    use care_convert::stock::convert_stock;
    use mla_attention::io::Checkpoint;
    use mla_attention::load::load_decoder;

    let ckpt = Checkpoint::open(src).unwrap();
    let original = load_decoder(&ckpt).unwrap();
    let mut r = Rng::new(5);
    let windows: Vec<Vec<u32>> = (0..40)
        .map(|_| {
            (0..24)
                .map(|_| ((r.symmetric() + 1.0) * 48.0) as u32)
                .collect()
        })
        .collect();
    let stats = collect_all(&original, &windows, &mut |_, _| {}).unwrap();
    let opts = opts(&original.spec);
    let stock = convert_stock(
        &original.spec,
        ckpt.weights.as_ref(),
        &stats,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    (ckpt, original, stock)
}

/// Export `stock` (converted from the tiny source at `src`) to `out`.
pub fn export_tiny(
    src: &Path,
    out: &Path,
    ckpt: &mla_attention::io::Checkpoint,
    stock: &care_convert::stock::StockModel,
) -> care_convert::Result<()> {
    use care_convert::export::deepseek::{
        write_deepseek_v2, SaveDtype, StockProvenance, TokenizerFiles,
    };
    use care_convert::export::CalibrationRecord;
    let prov = StockProvenance {
        format: "care-deepseek-v2",
        format_version: 1,
        source_model: src.display().to_string(),
        source_sha256: String::new(),
        conversion: stock.summary.clone(),
        calibration: CalibrationRecord {
            sources: vec![],
            samples: 40,
            seq_len: 24,
            seed: 5,
            tokens: 960,
            sequential: false,
        },
        tool: "test".into(),
    };
    write_deepseek_v2(
        out,
        &ckpt.spec,
        ckpt.weights.as_ref(),
        stock,
        &TokenizerFiles::default(),
        &prov,
        SaveDtype::F32,
    )
}

/// Convert the tiny source at `src` into a stock DeepSeek-V2 MLA directory `out` with
/// `rank` latent dims (plus the anchor) and `rope_dim` RoPE dims, CARE basis.
pub fn write_stock(src: &Path, out: &Path, rank: usize, rope_dim: usize) {
    let (ckpt, _, stock) = convert_tiny(src, |_| stock_options(rank + 1, rope_dim));
    export_tiny(src, out, &ckpt, &stock).unwrap();
}
