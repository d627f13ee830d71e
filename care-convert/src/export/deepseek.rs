//! Writing a stock `DeepseekV2ForCausalLM` directory that mistral.rs 0.8.1 (`deepseekv2`)
//! and HF transformers load unchanged: dense MLP in every layer
//! (`first_k_dense_replace = num_layers`), `q_lora_rank: null`, interleaved RoPE of width
//! `qk_rope_head_dim`, the untied `lm_head` written out, and the tokenizer files a server
//! needs (`tokenizer.json`, `tokenizer_config.json` with the chat template,
//! `generation_config.json`). `care.json` records the conversion.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Serialize;

pub use super::TokenizerFiles;
use super::{write_atomically, write_json, write_tokenizer_files, CalibrationRecord};
use crate::convert::{to_tensor, vec_tensor};
use crate::error::{Error, Result};
use crate::stock::{StockModel, StockSummary};
use mla_attention::config::ModelSpec;
use mla_attention::io::WeightSource;
use mla_attention::mla::MlaRopeScaling;

/// Tensor dtype of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    F32,
    Bf16,
}

impl SaveDtype {
    pub fn dtype(self) -> DType {
        match self {
            SaveDtype::F32 => DType::F32,
            SaveDtype::Bf16 => DType::BF16,
        }
    }
    fn name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }
}

/// The stock `care.json`.
#[derive(Debug, Clone, Serialize)]
pub struct StockProvenance {
    pub format: &'static str,
    pub format_version: u32,
    pub source_model: String,
    pub source_sha256: String,
    pub conversion: StockSummary,
    pub calibration: CalibrationRecord,
    pub tool: String,
}

/// `config.json` of the converted model.
pub fn deepseek_config(
    spec: &ModelSpec,
    model: &StockModel,
    dtype: SaveDtype,
) -> serde_json::Value {
    let s = model.mla.shape;
    // mistral.rs reads `rope_scaling` (DeepSeek's keys; it ignores unknown ones), HF
    // transformers 5 both (`rope_scaling` wins). `attention_factor: 1` in both, because
    // transformers otherwise derives 0.1·ln(factor) + 1 from `mscale = 0` (measured: 1.139
    // for factor 4), while mistral.rs and DeepSeek's code use the mscale ratio, here 1.
    let (rope_scaling, rope_parameters) = match &model.mla.rope_scaling {
        MlaRopeScaling::None => (
            serde_json::Value::Null,
            serde_json::json!({ "rope_type": "default", "rope_theta": model.mla.rope_theta }),
        ),
        MlaRopeScaling::Yarn(y) => (
            serde_json::json!({
                "type": "yarn", "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                "attention_factor": 1.0,
            }),
            serde_json::json!({
                "rope_type": "yarn", "rope_theta": model.mla.rope_theta, "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim,
                "attention_factor": 1.0,
            }),
        ),
    };
    serde_json::json!({
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "moe_intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_heads,
        // No layer is MoE (first_k_dense_replace = num_layers): mistral.rs would also accept
        // null here, HF transformers 5 requires integers.
        "n_shared_experts": 0,
        "n_routed_experts": 1,
        "num_experts_per_tok": 1,
        "first_k_dense_replace": spec.num_layers,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": false,
        "scoring_func": "softmax",
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": model.mla.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "rope_interleave": true,
        "attention_bias": model.mla.attention_bias,
        "attention_dropout": 0.0,
        "q_lora_rank": model.mla.q_lora_rank,
        "kv_lora_rank": s.kv_lora_rank,
        "qk_rope_head_dim": s.qk_rope_head_dim,
        "qk_nope_head_dim": s.qk_nope_head_dim,
        "v_head_dim": s.v_head_dim,
        "head_dim": s.qk_rope_head_dim,
        "tie_word_embeddings": false,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "use_cache": true,
        "torch_dtype": dtype.name(),
    })
}

/// Write the stock checkpoint to `out` (which must not exist), atomically.
pub fn write_deepseek_v2(
    out: &Path,
    spec: &ModelSpec,
    w: &dyn WeightSource,
    model: &StockModel,
    tokenizer: &TokenizerFiles,
    provenance: &StockProvenance,
    dtype: SaveDtype,
) -> Result<()> {
    if model.layers.len() != spec.num_layers {
        return Err(Error::InvalidOption(format!(
            "{} converted layers for {} layers",
            model.layers.len(),
            spec.num_layers
        )));
    }
    write_atomically(out, |dir| {
        write_into(dir, spec, w, model, tokenizer, provenance, dtype)
    })
}

fn write_into(
    dir: &Path,
    spec: &ModelSpec,
    w: &dyn WeightSource,
    model: &StockModel,
    tok: &TokenizerFiles,
    provenance: &StockProvenance,
    dtype: SaveDtype,
) -> Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, t: Tensor| -> Result<()> {
        if t.to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .any(|x| !x.is_finite())
        {
            return Err(Error::NonFinite(name));
        }
        tensors.insert(name, t.to_dtype(dtype.dtype())?);
        Ok(())
    };
    let embed = w.tensor("model.embed_tokens.weight")?;
    put("model.embed_tokens.weight".into(), embed.clone())?;
    put("model.norm.weight".into(), w.tensor("model.norm.weight")?)?;
    let head = if spec.tie_word_embeddings {
        embed
    } else {
        w.tensor("lm_head.weight")?
    };
    put("lm_head.weight".into(), head)?;
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        for n in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            put(format!("{p}.{n}"), w.tensor(&format!("{p}.{n}"))?)?;
        }
        let a = format!("{p}.self_attn");
        match &layer.q_fold {
            None => put(format!("{a}.q_proj.weight"), to_tensor(&layer.q_proj)?)?,
            Some(f) => {
                put(format!("{a}.q_a_proj.weight"), to_tensor(&f.q_a_proj)?)?;
                put(format!("{a}.q_a_proj.bias"), vec_tensor(&f.q_a_bias)?)?;
                put(
                    format!("{a}.q_a_layernorm.weight"),
                    vec_tensor(&f.q_a_layernorm)?,
                )?;
                put(format!("{a}.q_b_proj.weight"), to_tensor(&layer.q_proj)?)?;
            }
        }
        put(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            to_tensor(&layer.kv_a_proj_with_mqa)?,
        )?;
        if let Some(b) = &layer.kv_a_bias {
            put(format!("{a}.kv_a_proj_with_mqa.bias"), vec_tensor(b)?)?;
        }
        put(
            format!("{a}.kv_a_layernorm.weight"),
            vec_tensor(&layer.kv_a_layernorm)?,
        )?;
        put(
            format!("{a}.kv_b_proj.weight"),
            to_tensor(&layer.kv_b_proj)?,
        )?;
        put(format!("{a}.o_proj.weight"), to_tensor(&layer.o_proj)?)?;
        if let Some(b) = &layer.o_bias {
            put(format!("{a}.o_proj.bias"), vec_tensor(b)?)?;
        }
    }
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(|e| Error::BadData {
        path: st.clone(),
        reason: e.to_string(),
    })?;
    write_json(dir, "config.json", &deepseek_config(spec, model, dtype))?;
    let prov = serde_json::to_value(provenance).map_err(|e| Error::BadData {
        path: dir.join("care.json"),
        reason: e.to_string(),
    })?;
    write_json(dir, "care.json", &prov)?;
    write_tokenizer_files(dir, spec, tok)?;
    Ok(())
}
