//! Writes a llama-architecture GGUF model as a Hugging Face folder with f32 weights
//! (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with the
//! GGUF's chat template), so mistral.rs can serve it as `plain -m DIR`. Weights are the GGUF's
//! dequantized exactly; llama.cpp's Q/K row permutation is undone.
//!
//! On CPU, mistral.rs runs quantized GGUF matmuls row by row (a k-token forward costs about
//! k one-token forwards), while f32 weights go through a GEMM whose cost grows much more
//! slowly with k; the serving benchmark measures both.
//!
//! `cargo run -p care-server --example gguf_to_hf -- MODEL.gguf TOKENIZER.json OUT_DIR`

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

/// llama.cpp's rows `(head, h, j)` back to HF's `(head, j, h)` for a `[n_head·d, in]` weight.
fn unpermute_qk(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let half = rows / n_head / 2;
    Ok(t.reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, kind) = rest.split_once('.')?;
    let hf = match kind {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [gguf_path, tokenizer, out] = args.as_slice() else {
        bail!("usage: gguf_to_hf MODEL.gguf TOKENIZER.json OUT_DIR");
    };
    let mut file =
        std::fs::File::open(gguf_path).with_context(|| gguf_path.display().to_string())?;
    let content = Content::read(&mut file)?;
    let meta = |k: &str| content.metadata.get(k);
    let arch = meta("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        bail!("only llama-architecture GGUF files are supported, got {arch:?}");
    }
    let int = |k: &str| -> Result<usize> {
        let v = meta(&format!("llama.{k}")).with_context(|| format!("llama.{k} missing"))?;
        Ok(v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))?)
    };
    let float = |k: &str, default: f64| -> f64 {
        meta(&format!("llama.{k}"))
            .and_then(|v| v.to_f32().ok())
            .map_or(default, |x| x as f64)
    };
    let n_head = int("attention.head_count")?;
    let n_kv = int("attention.head_count_kv").unwrap_or(n_head);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for g in names {
        let Some(hf) = hf_name(&g) else {
            eprintln!("skipping {g}");
            continue;
        };
        let q = content.tensor(&mut file, &g, &Device::Cpu)?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if g.ends_with("attn_q.weight") {
            t = unpermute_qk(&t, n_head)?;
        } else if g.ends_with("attn_k.weight") {
            t = unpermute_qk(&t, n_kv)?;
        }
        tensors.insert(hf, t);
    }
    let embed = tensors
        .get("model.embed_tokens.weight")
        .context("no token embedding")?;
    let (vocab, hidden) = embed.dims2()?;
    let tied = !tensors.contains_key("lm_head.weight");
    std::fs::create_dir_all(out)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int("feed_forward_length")?,
        "num_hidden_layers": int("block_count")?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "vocab_size": vocab,
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": float("rope.freq_base", 10000.0),
        "max_position_embeddings": int("context_length").unwrap_or(2048),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": meta("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()),
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    std::fs::copy(tokenizer, out.join("tokenizer.json"))?;
    let template = meta("tokenizer.chat_template").and_then(|v| match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    });
    let eos = meta("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok());
    let tok: serde_json::Value = serde_json::from_slice(&std::fs::read(tokenizer)?)?;
    let token_text = |id: Option<u32>| {
        id.and_then(|id| {
            tok["added_tokens"]
                .as_array()?
                .iter()
                .find(|t| t["id"].as_u64() == Some(id as u64))
                .and_then(|t| t["content"].as_str().map(String::from))
        })
    };
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "chat_template": template,
            "eos_token": token_text(eos),
            "bos_token": token_text(meta("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok())),
        }))?,
    )?;
    println!(
        "{}: {} tensors, vocab {vocab}, hidden {hidden}, tied embeddings: {tied}",
        out.display(),
        tensors.len()
    );
    Ok(())
}
