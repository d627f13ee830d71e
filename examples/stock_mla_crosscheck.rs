//! Writes tiny random-weight Llama models converted to stock DeepSeek-V2 MLA, plus the
//! logits our runtime computes for a fixed token sequence, so another engine (HF
//! transformers on the GPU machine: `scripts/hf_crosscheck.py`) can load the same files and
//! compare. Random weights are fine here: this checks the *format* (names, layouts, RoPE
//! pairing, norms, scales), not quality.
//!
//! ```text
//! cargo run --release -p care-convert --example stock_mla_crosscheck -- OUT_DIR
//! ```
//!
//! Writes `OUT_DIR/<variant>/` (a `DeepseekV2ForCausalLM` directory) and
//! `OUT_DIR/<variant>/expected.json` (`tokens`, `logits` per position) for the variants
//! `padded-v` (v_head_dim = qk head width, what mistral.rs needs on CPU), `plain-v`, and
//! `qwen-bias` (a Qwen2 source: q bias folded through a q-LoRA, k/v biases through the
//! latent anchor), and `llama3-yarn` (a source with Llama 3 RoPE scaling over a 16-token
//! original window, exported as DeepSeek YaRN: checks that the other engine reads the
//! `rope_scaling` / `rope_parameters` keys as we do).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;
use test_support::Rng;

use care_convert::calibrate::collect_all;
use care_convert::export::deepseek::{
    write_deepseek_v2, SaveDtype, StockProvenance, TokenizerFiles,
};
use care_convert::export::CalibrationRecord;
use care_convert::stock::{convert_stock, LatentBasis, LatentNorm, RopeSplitOptions, StockOptions};
use mla_attention::io::Checkpoint;
use mla_attention::load::load_decoder;

const VOCAB: usize = 320;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const LAYERS: usize = 2;
const INTER: usize = 128;

/// `shape` uniform in `[-amp, amp)`.
fn tensor(r: &mut Rng, shape: (usize, usize), amp: f32) -> Result<Tensor> {
    Ok(r.symmetric_tensor(&[shape.0, shape.1], amp))
}

/// Norm weights around 1.
fn norm(r: &mut Rng, n: usize) -> Result<Tensor> {
    Ok((r.symmetric_tensor(&[n], 0.2) + 1.0)?)
}

/// A random Llama (or, with `qwen`, a Qwen2 with q/k/v biases) in HF layout (half-split
/// RoPE pairs), with `rope_scaling` in its config, written to `dir`.
fn write_source(dir: &Path, qwen: bool, rope_scaling: serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut r = Rng::new(2026);
    let mut t = HashMap::new();
    let s = 1.0 / (HIDDEN as f32).sqrt();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        tensor(&mut r, (VOCAB, HIDDEN), 1.0)?,
    );
    t.insert(
        "lm_head.weight".to_string(),
        tensor(&mut r, (VOCAB, HIDDEN), s)?,
    );
    t.insert("model.norm.weight".to_string(), norm(&mut r, HIDDEN)?);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let mut put = |n: &str, v: Tensor| t.insert(format!("{p}.{n}"), v);
        put("input_layernorm.weight", norm(&mut r, HIDDEN)?);
        put("post_attention_layernorm.weight", norm(&mut r, HIDDEN)?);
        put(
            "self_attn.q_proj.weight",
            tensor(&mut r, (HEADS * HEAD_DIM, HIDDEN), 3.0 * s)?,
        );
        put(
            "self_attn.k_proj.weight",
            tensor(&mut r, (KV_HEADS * HEAD_DIM, HIDDEN), 3.0 * s)?,
        );
        put(
            "self_attn.v_proj.weight",
            tensor(&mut r, (KV_HEADS * HEAD_DIM, HIDDEN), s)?,
        );
        put(
            "self_attn.o_proj.weight",
            tensor(&mut r, (HIDDEN, HEADS * HEAD_DIM), s)?,
        );
        put("mlp.gate_proj.weight", tensor(&mut r, (INTER, HIDDEN), s)?);
        put("mlp.up_proj.weight", tensor(&mut r, (INTER, HIDDEN), s)?);
        put(
            "mlp.down_proj.weight",
            tensor(&mut r, (HIDDEN, INTER), 1.0 / (INTER as f32).sqrt())?,
        );
        if qwen {
            for (n, rows) in [
                ("q_proj", HEADS),
                ("k_proj", KV_HEADS),
                ("v_proj", KV_HEADS),
            ] {
                let b = tensor(&mut r, (1, rows * HEAD_DIM), 0.5)?.flatten_all()?;
                put(&format!("self_attn.{n}.bias"), b);
            }
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "model_type": if qwen { "qwen2" } else { "llama" },
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "intermediate_size": INTER,
        "vocab_size": VOCAB, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "max_position_embeddings": 256,
        "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": rope_scaling
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .context("usage: stock_mla_crosscheck OUT_DIR")?;
    let out = Path::new(&out);
    let mut r = Rng::new(7);
    let windows: Vec<Vec<u32>> = (0..64)
        .map(|_| {
            (0..32)
                .map(|_| ((r.symmetric() + 1.0) * 0.5 * (VOCAB - 1) as f32) as u32)
                .collect()
        })
        .collect();
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % VOCAB as u32).collect();
    let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 4.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
    for (name, pad_v, qwen, scaled) in [
        ("padded-v", true, false, false),
        ("plain-v", false, false, false),
        ("qwen-bias", true, true, false),
        ("llama3-yarn", true, false, true),
    ] {
        let src = out.join(match (qwen, scaled) {
            (true, _) => "source-qwen2",
            (false, true) => "source-llama3",
            (false, false) => "source-llama",
        });
        if !src.exists() {
            let scaling = if scaled {
                llama3.clone()
            } else {
                serde_json::Value::Null
            };
            write_source(&src, qwen, scaling)?;
        }
        let ckpt = Checkpoint::open(&src)?;
        let model = load_decoder(&ckpt)?;
        let stats = collect_all(&model, &windows, &mut |_, _| {})?;
        let dir = out.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let opts = StockOptions {
            kv_lora_rank: 24,
            rank: None,
            rope: RopeSplitOptions {
                rope_dim: 8,
                freqfold: 2,
                pca: true,
            },
            basis: LatentBasis::Care,
            balance: true,
            latent_norm: LatentNorm::BiasAnchor,
            pad_v,
            damping: 0.01,
        };
        let stock = convert_stock(
            &model.spec,
            ckpt.weights.as_ref(),
            &stats,
            &opts,
            &mut |_, _| {},
        )?;
        let prov = StockProvenance {
            format: "care-deepseek-v2",
            format_version: 1,
            source_model: "random tiny llama".into(),
            source_sha256: String::new(),
            conversion: stock.summary.clone(),
            calibration: CalibrationRecord {
                sources: vec!["random tokens".into()],
                samples: windows.len(),
                seq_len: 32,
                seed: 7,
                tokens: 64 * 32,
                sequential: false,
            },
            tool: "stock_mla_crosscheck".into(),
        };
        write_deepseek_v2(
            &dir,
            &model.spec,
            ckpt.weights.as_ref(),
            &stock,
            &TokenizerFiles::default(),
            &prov,
            SaveDtype::F32,
        )?;
        let ours = load_decoder(&Checkpoint::open(&dir)?)?;
        let logits = ours
            .forward(&tokens, &mut ours.new_cache())?
            .to_vec2::<f32>()?;
        let expected = serde_json::json!({ "tokens": tokens, "logits": logits });
        std::fs::write(dir.join("expected.json"), serde_json::to_string(&expected)?)?;
        eprintln!("wrote {}", dir.display());
    }
    Ok(())
}
