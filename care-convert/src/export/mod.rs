//! Writing converted checkpoints.
//!
//! The one-shot form is our own format: an HF directory (`config.json` of the source
//! architecture, `model.safetensors`, `tokenizer.json`) whose layers carry
//! `self_attn.{k,v}_latent_{a,b}.weight` (or `kv_latent_a` + `{k,v}_latent_b` for a shared
//! latent) instead of `k_proj`/`v_proj`; `mla_attention::load::load_decoder` recognizes
//! them. The sidecar `care.json` records method, ranks, budget, calibration and the
//! source model's hash.
//!
//! Everything is written into a temporary sibling directory that is renamed into place
//! at the end, so an interrupted run leaves no half checkpoint at `out`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::convert::{to_tensor, ConversionSummary, LayerFactors};
use crate::error::{Error, Result};
use mla_attention::config::{Architecture, ModelSpec, RopeScaling};
use mla_attention::io::WeightSource;
use mla_attention::model::decoder::lowrank_names as names;

pub mod deepseek;

/// Calibration provenance for `care.json`.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationRecord {
    pub sources: Vec<String>,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub tokens: u64,
    pub sequential: bool,
}

/// The `care.json` sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub format: &'static str,
    pub format_version: u32,
    pub source_model: String,
    pub source_sha256: String,
    pub conversion: ConversionSummary,
    pub calibration: CalibrationRecord,
    pub tool: String,
}

/// sha256 of a file, or of every file of a directory in name order.
pub fn sha256_path(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files.drain(..) {
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io(&f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// HF `config.json` for the (unchanged) source architecture.
pub fn hf_config(spec: &ModelSpec) -> serde_json::Value {
    let model_type = match spec.arch {
        Architecture::Llama => "llama",
        Architecture::Qwen2 => "qwen2",
    };
    let arch = match spec.arch {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    };
    let rope_scaling = match &spec.rope_scaling {
        RopeScaling::Llama3(s) => serde_json::json!({
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings
        }),
        _ => serde_json::Value::Null,
    };
    serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "hidden_act": "silu",
        "vocab_size": spec.vocab_size,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": "float32",
    })
}

/// Tokenizer-side files of an output directory: what a server needs besides the weights.
#[derive(Debug, Clone, Default)]
pub struct TokenizerFiles {
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Jinja chat template (GGUF `tokenizer.chat_template`).
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: bool,
}

/// `tokenizer.json` (when there is a tokenizer), `tokenizer_config.json` (special tokens and
/// the chat template: without it mistral.rs fails every chat request) and
/// `generation_config.json` into `dir`.
pub(crate) fn write_tokenizer_files(
    dir: &Path,
    spec: &ModelSpec,
    tok: &TokenizerFiles,
) -> Result<()> {
    if let Some(t) = &tok.tokenizer {
        write_tokenizer(dir, t)?;
    }
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": false,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    for (k, v) in [
        ("bos_token", &tok.bos_token),
        ("eos_token", &tok.eos_token),
        ("chat_template", &tok.chat_template),
    ] {
        if let Some(v) = v {
            tc[k] = serde_json::Value::String(v.clone());
        }
    }
    write_json(dir, "tokenizer_config.json", &tc)?;
    write_json(
        dir,
        "generation_config.json",
        &serde_json::json!({
            "bos_token_id": spec.bos_token_id,
            "eos_token_id": spec.eos_token_id,
            "do_sample": false,
        }),
    )
}

/// Write the source model itself, unchanged, as an f32 HF directory (`config.json`,
/// `model.safetensors` and the tokenizer files) at `out` (which must not exist): a GGUF
/// model dequantized for loaders of the HF format, e.g. as the baseline of a side-by-side
/// benchmark against a converted checkpoint in the same precision.
pub fn write_hf_original(
    out: &Path,
    spec: &ModelSpec,
    w: &dyn WeightSource,
    tokenizer: &TokenizerFiles,
) -> Result<()> {
    write_atomically(out, |dir| {
        let mut tensors = shared_tensors(spec, w)?;
        for l in 0..spec.num_layers {
            for n in ["k_proj", "v_proj"] {
                let name = format!("model.layers.{l}.self_attn.{n}.weight");
                tensors.insert(name.clone(), w.tensor(&name)?);
            }
        }
        let st = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &st).map_err(|e| Error::BadData {
            path: st.clone(),
            reason: e.to_string(),
        })?;
        write_json(dir, "config.json", &hf_config(spec))?;
        write_tokenizer_files(dir, spec, tokenizer)
    })
}

/// Write the one-shot checkpoint to `out` (which must not exist).
pub fn write_oneshot(
    out: &Path,
    spec: &ModelSpec,
    w: &dyn WeightSource,
    factors: &[LayerFactors],
    tokenizer: Option<&tokenizers::Tokenizer>,
    provenance: &Provenance,
) -> Result<()> {
    if factors.len() != spec.num_layers {
        return Err(Error::InvalidOption(format!(
            "{} layer factors for {} layers",
            factors.len(),
            spec.num_layers
        )));
    }
    write_atomically(out, |tmp| {
        write_into(tmp, spec, w, factors, tokenizer, provenance)
    })
}

/// Write `bytes` to the file `path` through a temporary sibling that is synced and renamed
/// into place, so readers see the old file or the whole new one, never a part.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

/// Run `write` on a fresh temporary sibling of `out` and rename it to `out` when it
/// succeeds; on failure the temporary directory is removed and `out` never appears.
pub(crate) fn write_atomically(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if out.exists() {
        return Err(Error::InvalidOption(format!(
            "{} already exists; choose another --out or remove it",
            out.display()
        )));
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| write(&tmp))
        .and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Every tensor of `spec` except K/V projections (and, for the one-shot format, what
/// replaces them): embeddings, norms, head, q/o projections, MLPs, q/k/v biases.
fn shared_tensors(spec: &ModelSpec, w: &dyn WeightSource) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut copy = |name: String| -> Result<()> {
        let t = w.tensor(&name)?;
        tensors.insert(name, t);
        Ok(())
    };
    copy("model.embed_tokens.weight".into())?;
    copy("model.norm.weight".into())?;
    if !spec.tie_word_embeddings {
        copy("lm_head.weight".into())?;
    }
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        for n in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            copy(format!("{p}.{n}"))?;
        }
        if spec.arch.has_qkv_bias() {
            for n in ["q_proj", "k_proj", "v_proj"] {
                copy(format!("{p}.self_attn.{n}.bias"))?;
            }
        }
    }
    Ok(tensors)
}

fn write_into(
    dir: &Path,
    spec: &ModelSpec,
    w: &dyn WeightSource,
    factors: &[LayerFactors],
    tokenizer: Option<&tokenizers::Tokenizer>,
    provenance: &Provenance,
) -> Result<()> {
    let mut tensors = shared_tensors(spec, w)?;
    for (l, f) in factors.iter().enumerate() {
        let p = format!("model.layers.{l}.self_attn");
        let mut put = |n: &str, m: &faer::Mat<f64>| -> Result<()> {
            tensors.insert(format!("{p}.{n}"), to_tensor(m)?);
            Ok(())
        };
        match f {
            LayerFactors::Separate { k, v } => {
                put(names::K_A, &k.a)?;
                put(names::K_B, &k.b)?;
                put(names::V_A, &v.a)?;
                put(names::V_B, &v.b)?;
            }
            LayerFactors::Shared(j) => {
                put(names::KV_A, &j.a)?;
                put(names::K_B, &j.b[0])?;
                put(names::V_B, &j.b[1])?;
            }
        }
    }
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(|e| Error::BadData {
        path: st.clone(),
        reason: e.to_string(),
    })?;
    write_json(dir, "config.json", &hf_config(spec))?;
    let prov = serde_json::to_value(provenance).map_err(|e| Error::BadData {
        path: dir.join("care.json"),
        reason: e.to_string(),
    })?;
    write_json(dir, "care.json", &prov)?;
    if let Some(tok) = tokenizer {
        write_tokenizer(dir, tok)?;
    }
    Ok(())
}

/// Pretty JSON into `dir/name`.
pub(crate) fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<()> {
    let p = dir.join(name);
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::BadData {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
}

/// `dir/tokenizer.json`.
pub(crate) fn write_tokenizer(dir: &Path, tok: &tokenizers::Tokenizer) -> Result<()> {
    let p = dir.join("tokenizer.json");
    let text = tok.to_string(false).map_err(|e| Error::BadData {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
}
