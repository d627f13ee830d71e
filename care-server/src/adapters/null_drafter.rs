//! The "null drafter": a one-layer Llama checkpoint whose only job is to be a `Pipeline` that
//! mistral.rs 0.8.1's stock `SpeculativePipeline` accepts as its draft model
//! (`research/mistralrs.md` §3.4). Its logits are a constant: every entry 0 except
//! [`SIGNATURE_LOGIT`] at the signature token, whatever the input. The
//! [`super::InfinigramHook`] recognizes that signature and replaces the logits with the n-gram
//! proposal; on the target model's logits (no signature) it changes nothing.
//!
//! How the weights give the constant (hidden size `H`):
//!
//! ```text
//! embed_tokens[t] = e₀                      every token embeds to the first unit vector
//! q, k, v, o, gate, up, down = 0            attention and MLP add nothing to the residual
//! norm(e₀) = e₀ · √H                        RMSNorm of a unit vector, weights 1
//! lm_head[signature] = (SIGNATURE_LOGIT / √H) · e₀,  every other row 0
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Hidden size of the null drafter (its cost is the LM head: `vocab × HIDDEN` multiply-adds).
const HIDDEN: usize = 64;

/// The draft logit of the signature token. Real models' logits stay far below
/// [`SIGNATURE_THRESHOLD`].
pub const SIGNATURE_LOGIT: f32 = 16_000.0;

/// Logits above this at the signature token come from the null drafter.
pub const SIGNATURE_THRESHOLD: f32 = 8_000.0;

/// Writes the null drafter for a vocabulary of `vocab_size` into `dir`: `config.json`,
/// `model.safetensors` and a `tokenizer_config.json` (the draft pipeline wants a chat template;
/// it is never used). The tokenizer itself is passed to mistral.rs separately.
pub fn write_null_drafter(dir: &Path, vocab_size: usize, signature: u32) -> Result<()> {
    if signature as usize >= vocab_size {
        return Err(Error::InvalidSetting(format!(
            "null drafter signature {signature} outside the vocabulary ({vocab_size})"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN,
        "vocab_size": vocab_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
    });
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(path, e))
    };
    write("config.json", config.to_string())?;
    write(
        "tokenizer_config.json",
        serde_json::json!({
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        })
        .to_string(),
    )?;
    let tensors = null_weights(vocab_size, signature).map_err(Error::NullDrafter)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(Error::NullDrafter)
}

fn null_weights(vocab: usize, signature: u32) -> candle_core::Result<HashMap<String, Tensor>> {
    let cpu = &Device::Cpu;
    let zeros = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, cpu);
    let ones = || Tensor::ones(HIDDEN, DType::F32, cpu);
    let mut e0 = vec![0f32; vocab * HIDDEN];
    for row in e0.chunks_exact_mut(HIDDEN) {
        row[0] = 1.0;
    }
    let mut head = vec![0f32; vocab * HIDDEN];
    head[signature as usize * HIDDEN] = SIGNATURE_LOGIT / (HIDDEN as f32).sqrt();
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        Tensor::from_vec(e0, (vocab, HIDDEN), cpu)?,
    );
    t.insert(
        "lm_head.weight".into(),
        Tensor::from_vec(head, (vocab, HIDDEN), cpu)?,
    );
    t.insert("model.norm.weight".into(), ones()?);
    let l = "model.layers.0";
    t.insert(format!("{l}.input_layernorm.weight"), ones()?);
    t.insert(format!("{l}.post_attention_layernorm.weight"), ones()?);
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        t.insert(format!("{l}.self_attn.{p}.weight"), zeros(HIDDEN, HIDDEN)?);
    }
    for p in ["gate_proj", "up_proj", "down_proj"] {
        t.insert(format!("{l}.mlp.{p}.weight"), zeros(HIDDEN, HIDDEN)?);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forward the module doc describes, done by hand on the written weights.
    #[test]
    fn written_weights_give_the_signature_logit() {
        let dir = tempfile::tempdir().unwrap();
        write_null_drafter(dir.path(), 100, 7).unwrap();
        let t = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
        let emb = t["model.embed_tokens.weight"].get(42).unwrap();
        let rms = emb.sqr().unwrap().mean_all().unwrap().sqrt().unwrap();
        let normed = emb.broadcast_div(&rms).unwrap();
        let logits: Vec<f32> = t["lm_head.weight"]
            .matmul(&normed.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((logits[7] - SIGNATURE_LOGIT).abs() < 1.0, "{}", logits[7]);
        assert!(logits.iter().enumerate().all(|(i, &x)| i == 7 || x == 0.0));
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["vocab_size"], 100);
        assert!(write_null_drafter(dir.path(), 100, 100).is_err());
    }
}
