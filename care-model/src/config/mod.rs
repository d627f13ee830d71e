//! Model configuration: [`HfConfig`] mirrors a Hugging Face `config.json` field for
//! field; [`ModelSpec`] is the resolved form the forward pass uses, with no optional
//! fields left to check. GGUF metadata resolves into the same [`ModelSpec`]
//! (see [`crate::io::gguf`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub mod mla;

use mla::{DeepseekV2Context, DeepseekV2Fields, MlaSpec};

/// The decoder families this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama (and Mistral without sliding window): RMSNorm, SwiGLU, RoPE, GQA, no biases.
    Llama,
    /// Qwen2: Llama plus biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// Names accepted in error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2";

    /// Whether q/k/v projections carry a bias.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Architecture::Qwen2)
    }
}

/// Architectures accepted in `config.json` (GGUF: [`Architecture::SUPPORTED`]).
const HF_SUPPORTED: &str = "llama, mistral, qwen2, deepseek_v2 (dense, no q-LoRA)";

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// How the RoPE inverse frequencies are modified, if at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// Llama 3 wavelength-dependent scaling.
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors as stored by llama.cpp in `rope_freqs.weight`.
    FreqFactors(Vec<f32>),
}

/// The resolved architecture of a decoder. Built once from `config.json` or GGUF
/// metadata; every field is checked for consistency by [`ModelSpec::validate`].
///
/// A DeepSeek-V2 checkpoint (dense MLP) resolves to `arch: Llama` (its norms, SwiGLU
/// MLP, embedding and head are Llama's) with `mla: Some(..)`, `num_kv_heads =
/// num_heads` and `head_dim = qk_nope_head_dim + qk_rope_head_dim`; its RoPE settings
/// live in the [`MlaSpec`] (`rope_scaling` here stays `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Multi-Head Latent Attention (DeepSeek-V2) instead of GQA, in every layer.
    #[serde(default)]
    pub mla: Option<MlaSpec>,
}

impl ModelSpec {
    /// Check the internal consistency of the dimensions. `path` names the source in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Error::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        };
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if let Some(mla) = &self.mla {
            mla.validate().map_err(|e| bad(e.to_string()))?;
            if mla.shape.num_heads != self.num_heads {
                return Err(bad(format!(
                    "MLA has {} heads, num_attention_heads is {}",
                    mla.shape.num_heads, self.num_heads
                )));
            }
        } else if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(bad(format!("rope_theta {} must be > 1", self.rope_theta)));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(bad(format!(
                "rms_norm_eps {} must be > 0",
                self.rms_norm_eps
            )));
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return Err(bad(format!(
                    "rope_freqs has {} factors, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// KV-cache values per token per layer of the GQA original: `2 · n_kv · head_dim`.
    pub fn kv_values_per_token_per_layer(&self) -> usize {
        2 * self.num_kv_heads * self.head_dim
    }
}

/// `config.json` of a Llama/Mistral/Qwen2 or DeepSeek-V2 checkpoint, as written by HF
/// transformers.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// DeepSeek-V2 keys (`kv_lora_rank`, `qk_rope_head_dim`, …); all `None` otherwise.
    #[serde(flatten)]
    pub deepseek_v2: DeepseekV2Fields,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    /// Read and parse `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::malformed(path, "config.json", e.to_string()))
    }

    /// Resolve into a [`ModelSpec`]; `path` names the file in errors.
    pub fn into_spec(self, path: &Path) -> Result<ModelSpec> {
        let arch_name = self
            .model_type
            .clone()
            .or_else(|| self.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "llama" | "mistral" | "LlamaForCausalLM" | "MistralForCausalLM" => Architecture::Llama,
            "qwen2" | "Qwen2ForCausalLM" => Architecture::Qwen2,
            "deepseek_v2" | "DeepseekV2ForCausalLM" => return self.into_deepseek_v2_spec(path),
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                    supported: HF_SUPPORTED,
                })
            }
        };
        if arch == Architecture::Llama && self.attention_bias == Some(true) {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                reason: "attention_bias = true is not supported for llama".into(),
            });
        }
        let rope_scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(v) => parse_rope_scaling(v, path)?,
        };
        let eos_token_id = eos_id(&self.eos_token_id);
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0 {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                reason: "num_attention_heads must be positive".into(),
            });
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        let spec = ModelSpec {
            arch,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta,
            rope_scaling,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id,
            mla: None,
        };
        spec.validate(path)?;
        Ok(spec)
    }

    /// DeepSeek-V2 (dense): the Llama decoder around [`MlaSpec`] attention.
    fn into_deepseek_v2_spec(self, path: &Path) -> Result<ModelSpec> {
        let cx = DeepseekV2Context {
            num_heads: self.num_attention_heads,
            num_layers: self.num_hidden_layers,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            attention_bias: self.attention_bias.unwrap_or(false),
            rope_scaling: self.rope_scaling.as_ref(),
        };
        let mla = self.deepseek_v2.resolve(cx, path)?;
        let spec = ModelSpec {
            arch: Architecture::Llama,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_attention_heads,
            head_dim: mla.shape.q_head_dim(),
            intermediate_size: self.intermediate_size,
            vocab_size: self.vocab_size,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScaling::None,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            max_position_embeddings: self.max_position_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_id: eos_id(&self.eos_token_id),
            mla: Some(mla),
        };
        spec.validate(path)?;
        Ok(spec)
    }
}

/// The first id of `eos_token_id` (a number or a list).
fn eos_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()).map(|v| v as u32),
        _ => None,
    }
}

fn parse_rope_scaling(v: &serde_json::Value, path: &Path) -> Result<RopeScaling> {
    let bad = |reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    match kind {
        "default" => Ok(RopeScaling::None),
        "llama3" => {
            let f = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_f64())
                    .ok_or_else(|| bad(format!("rope_scaling.{k} missing for llama3")))
            };
            Ok(RopeScaling::Llama3(Llama3RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(bad(format!(
            "rope_scaling type `{other}` is not supported (supported: llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "vocab_size": 100, "rope_theta": 10000.0, "rms_norm_eps": 1e-5
        })
    }

    #[test]
    fn resolves_llama_with_llama3_scaling() {
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let cfg: HfConfig = serde_json::from_value(v).unwrap();
        let spec = cfg.into_spec(Path::new("config.json")).unwrap();
        assert_eq!(spec.head_dim, 16);
        assert_eq!(spec.group_size(), 2);
        assert!(matches!(spec.rope_scaling, RopeScaling::Llama3(s) if s.factor == 8.0));
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let mut v = base();
        v["model_type"] = serde_json::json!("gpt2");
        let cfg: HfConfig = serde_json::from_value(v).unwrap();
        let err = cfg.into_spec(Path::new("c.json")).unwrap_err();
        assert!(
            err.to_string().contains("unsupported architecture `gpt2`"),
            "{err}"
        );

        let mut v = base();
        v["num_key_value_heads"] = serde_json::json!(3);
        let cfg: HfConfig = serde_json::from_value(v).unwrap();
        let err = cfg.into_spec(Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("not a multiple"), "{err}");
    }
}
