//! GGUF tensors under Hugging Face names, and the [`ModelSpec`] from GGUF metadata.
//!
//! llama.cpp's converter stores llama-arch `attn_q`/`attn_k` rows permuted so that
//! RoPE rotates adjacent pairs `(2j, 2j+1)` instead of HF's halves `(j, j + d/2)`:
//!
//! ```text
//! HF row  (half h, j) = h·d/2 + j      for h ∈ {0, 1}, j < d/2
//! GGUF row (j, h)     = 2j + h
//! ```
//!
//! [`GgufWeights`] undoes this per head (n_head rows-blocks for q, n_kv_head for k), so
//! every later stage uses rotate-half RoPE. qwen2-arch GGUF keeps HF order.

use std::path::Path;

use candle_core::Tensor;

use super::gguf::{GgufFile, Value};
use super::WeightSource;
use crate::config::{Architecture, ModelSpec, RopeScaling};
use crate::error::{Error, Result};

/// Tensors of a GGUF file addressed by HF names.
pub struct GgufWeights {
    file: GgufFile,
    arch: Architecture,
    num_heads: usize,
    num_kv_heads: usize,
}

impl GgufWeights {
    /// Wrap an opened file; `spec` must come from [`spec_from_gguf`] on the same file.
    pub fn new(file: GgufFile, spec: &ModelSpec) -> Result<Self> {
        Ok(GgufWeights {
            file,
            arch: spec.arch,
            num_heads: spec.num_heads,
            num_kv_heads: spec.num_kv_heads,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The GGUF name of an HF tensor name, or `None` if it has no counterpart.
    fn gguf_name(hf: &str) -> Option<String> {
        match hf {
            "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
            "model.norm.weight" => return Some("output_norm.weight".into()),
            "lm_head.weight" => return Some("output.weight".into()),
            _ => {}
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (module, kind) = rest.rsplit_once('.')?;
        let g = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{g}.{kind}"))
    }
}

/// Inverse of llama.cpp's Q/K permutation: rows `(head, j, h)` → `(head, h, j)`.
/// Works on weights `[n_head·d, in]` and biases `[n_head·d]`.
pub fn unpermute_qk(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let inner: usize = dims[1..].iter().product();
    if !rows.is_multiple_of(2 * n_head) {
        return Err(Error::InvalidInput(format!(
            "cannot un-permute {rows} rows into {n_head} heads of even size"
        )));
    }
    let half = rows / n_head / 2;
    let t = t
        .reshape((n_head, half, 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

/// llama.cpp's Q/K permutation (the inverse of [`unpermute_qk`]): rows
/// `(head, h, j)` → `(head, j, h)`. Used by tests to show the layout matters.
pub fn permute_qk(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let inner: usize = dims[1..].iter().product();
    if !rows.is_multiple_of(2 * n_head) {
        return Err(Error::InvalidInput(format!(
            "cannot permute {rows} rows into {n_head} heads of even size"
        )));
    }
    let half = rows / n_head / 2;
    Ok(t.reshape((n_head, 2, half, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

impl WeightSource for GgufWeights {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn contains(&self, name: &str) -> bool {
        Self::gguf_name(name).is_some_and(|g| self.file.tensors.contains_key(&g))
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let g = Self::gguf_name(name).ok_or_else(|| Error::MissingTensor {
            path: self.file.path().to_path_buf(),
            tensor: name.to_string(),
        })?;
        let t = self.file.tensor_f32(&g).map_err(|e| match e {
            Error::MissingTensor { path, .. } => Error::MissingTensor {
                path,
                tensor: format!("{g} (HF `{name}`)"),
            },
            other => other,
        })?;
        if self.arch == Architecture::Llama {
            if g.contains(".attn_q.") {
                return unpermute_qk(&t, self.num_heads);
            }
            if g.contains(".attn_k.") {
                return unpermute_qk(&t, self.num_kv_heads);
            }
        }
        Ok(t)
    }
}

/// Resolve the model architecture from GGUF metadata (`general.architecture` and the
/// `{arch}.*` keys), checking the token embedding's shape.
pub fn spec_from_gguf(file: &GgufFile) -> Result<ModelSpec> {
    let path = file.path();
    let bad = |reason: String| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason,
    };
    let arch_name = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing general.architecture".into()))?
        .to_string();
    let arch = match arch_name.as_str() {
        "llama" | "mistral" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
                supported: Architecture::SUPPORTED,
            })
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let req_u = |k: &str| -> Result<usize> {
        file.get(&key(k))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("missing or non-integer {}", key(k))))
    };
    let hidden_size = req_u("embedding_length")?;
    let num_heads = req_u("attention.head_count")?;
    let num_kv_heads = file
        .get(&key("attention.head_count_kv"))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(num_heads);
    if num_heads == 0 {
        return Err(bad("attention.head_count is 0".into()));
    }
    let head_dim = file
        .get(&key("attention.key_length"))
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .unwrap_or(hidden_size / num_heads);
    let embd = file
        .tensors
        .get("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: "token_embd.weight".into(),
        })?;
    if embd.dims.len() != 2 || embd.dims[1] != hidden_size {
        return Err(Error::ShapeMismatch {
            path: path.to_path_buf(),
            tensor: "token_embd.weight".into(),
            got: embd.dims.clone(),
            expected: vec![embd.dims[0], hidden_size],
        });
    }
    let vocab_size = embd.dims[0];
    let rope_scaling = if file.tensors.contains_key("rope_freqs.weight") {
        let f = file.tensor_f32("rope_freqs.weight")?;
        RopeScaling::FreqFactors(f.flatten_all()?.to_vec1::<f32>()?)
    } else {
        RopeScaling::None
    };
    let tok_u32 = |k: &str| file.get(k).and_then(Value::as_u64).map(|v| v as u32);
    let spec = ModelSpec {
        arch,
        hidden_size,
        num_layers: req_u("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        intermediate_size: req_u("feed_forward_length")?,
        vocab_size,
        rope_theta: file
            .get(&key("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0),
        rope_scaling,
        rms_norm_eps: file
            .get(&key("attention.layer_norm_rms_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(1e-5),
        tie_word_embeddings: !file.tensors.contains_key("output.weight"),
        max_position_embeddings: file
            .get(&key("context_length"))
            .and_then(Value::as_u64)
            .unwrap_or(4096) as usize,
        bos_token_id: tok_u32("tokenizer.ggml.bos_token_id"),
        eos_token_id: tok_u32("tokenizer.ggml.eos_token_id"),
        mla: None,
    };
    spec.validate(path)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // HF layout: head 0 rows [a0 a1 | b0 b1], head 1 rows [c0 c1 | d0 d1]
        let hf: Vec<f32> = (0..8).map(|v| v as f32).collect();
        // llama.cpp layout interleaves halves: [a0 b0 a1 b1 | c0 d0 c1 d1]
        let gguf: Vec<f32> = vec![0., 2., 1., 3., 4., 6., 5., 7.];
        let t = Tensor::from_vec(gguf, (8,), &Device::Cpu).unwrap();
        let back = unpermute_qk(&t, 2).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(back, hf);
    }

    #[test]
    fn name_mapping_covers_every_layer_tensor() {
        assert_eq!(
            GgufWeights::gguf_name("model.layers.12.self_attn.k_proj.bias").as_deref(),
            Some("blk.12.attn_k.bias")
        );
        assert_eq!(
            GgufWeights::gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(
            GgufWeights::gguf_name("model.layers.x.mlp.up_proj.weight"),
            None
        );
    }
}
