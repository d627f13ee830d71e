//! A checkpoint into a reference [`Decoder`] whatever its attention: original GQA, the
//! one-shot low-rank form, or stock DeepSeek-V2 MLA. The one place that knows every
//! attention kind, so the decoder (`model`) and the MLA layer (`mla`) need not know each
//! other.

use crate::config::ModelSpec;
use crate::error::Result;
use crate::io::{Checkpoint, WeightSource};
use crate::mla::load::mla_spec;
use crate::mla::{load_mla_attention, MlaForm};
use crate::model::decoder::load_layer_rest;
use crate::model::{Attention, Decoder};

/// Load a model from a checkpoint, whatever its attention (see [`load_attention`]).
pub fn load_decoder(ckpt: &Checkpoint) -> Result<Decoder> {
    load_decoder_weights(&ckpt.spec, ckpt.weights.as_ref())
}

/// [`load_decoder`] from a spec and weights.
pub fn load_decoder_weights(spec: &ModelSpec, w: &dyn WeightSource) -> Result<Decoder> {
    Decoder::load_layers(spec, w, &load_attention)
}

/// The attention of layer `l`: MLA for a DeepSeek-V2 spec ([`ModelSpec::mla`]), otherwise
/// what [`care_model::model::decoder::load_attention`] finds (low-rank or GQA).
pub fn load_attention(
    spec: &ModelSpec,
    w: &dyn WeightSource,
    l: usize,
) -> Result<Box<dyn Attention>> {
    if spec.mla.is_some() {
        return Ok(Box::new(load_mla_attention(spec, w, l)?));
    }
    care_model::model::decoder::load_attention(spec, w, l)
}

/// A whole DeepSeek-V2 decoder whose every layer computes in `form`
/// ([`load_decoder`] gives [`MlaForm::Auto`]).
pub fn load_mla_decoder(spec: &ModelSpec, w: &dyn WeightSource, form: MlaForm) -> Result<Decoder> {
    mla_spec(spec, w)?;
    let layers = (0..spec.num_layers)
        .map(|l| {
            let attn = load_mla_attention(spec, w, l)?.with_form(form);
            load_layer_rest(spec, w, l, Box::new(attn))
        })
        .collect::<Result<Vec<_>>>()?;
    Decoder::from_layers(spec.clone(), w, layers)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::Tensor;

    use super::*;
    use crate::io::Checkpoint;
    use crate::mla::tests::{random_weights, rel_err, Rng};
    use crate::mla::MlaShape;

    const VOCAB: usize = 40;
    const HIDDEN: usize = 32;
    const LAYERS: usize = 2;

    /// A tiny dense DeepSeek-V2 `config.json` with every key mistral.rs 0.8.1 requires.
    fn config(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 48,
            "moe_intermediate_size": 48, "num_hidden_layers": LAYERS,
            "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "attention_bias": false, "q_lora_rank": null, "kv_lora_rank": 24,
            "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12,
            "n_routed_experts": null, "n_shared_experts": null, "first_k_dense_replace": LAYERS,
            "moe_layer_freq": 1, "n_group": 1, "topk_group": 1, "num_experts_per_tok": null,
            "hidden_act": "silu", "tie_word_embeddings": false, "rope_scaling": null,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"
        });
        for (k, x) in extra.as_object().expect("an object") {
            v[k] = x.clone();
        }
        v
    }

    /// Write `config.json` + `model.safetensors` with random weights for `cfg`.
    fn write_checkpoint(dir: &Path, cfg: &serde_json::Value) {
        let g = &mut Rng::new(11);
        let n = |k: &str| cfg[k].as_u64().expect("numeric key") as usize;
        let s = MlaShape {
            num_heads: n("num_attention_heads"),
            qk_nope_head_dim: n("qk_nope_head_dim"),
            qk_rope_head_dim: n("qk_rope_head_dim"),
            v_head_dim: n("v_head_dim"),
            kv_lora_rank: n("kv_lora_rank"),
        };
        let (h, f) = (HIDDEN, n("intermediate_size"));
        let bias = cfg["attention_bias"].as_bool() == Some(true);
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let mut put = |name: String, v: Tensor| {
            t.insert(name, v);
        };
        let ones = |g: &mut Rng, n: usize| (g.tensor(&[n], 0.1) + 1.0).unwrap();
        put(
            "model.embed_tokens.weight".into(),
            g.tensor(&[VOCAB, h], 1.0),
        );
        put("lm_head.weight".into(), g.tensor(&[VOCAB, h], 0.2));
        put("model.norm.weight".into(), ones(g, h));
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            let w = random_weights(s, h, bias, g);
            let a = format!("{p}.self_attn");
            put(format!("{a}.q_proj.weight"), w.q_proj);
            put(
                format!("{a}.kv_a_proj_with_mqa.weight"),
                w.kv_a_proj_with_mqa,
            );
            put(format!("{a}.kv_a_layernorm.weight"), w.kv_a_layernorm);
            put(format!("{a}.kv_b_proj.weight"), w.kv_b_proj);
            put(format!("{a}.o_proj.weight"), w.o_proj);
            if let (Some(ba), Some(bo)) = (w.kv_a_proj_with_mqa_bias, w.o_proj_bias) {
                put(format!("{a}.kv_a_proj_with_mqa.bias"), ba);
                put(format!("{a}.o_proj.bias"), bo);
            }
            put(format!("{p}.input_layernorm.weight"), ones(g, h));
            put(format!("{p}.post_attention_layernorm.weight"), ones(g, h));
            put(format!("{p}.mlp.gate_proj.weight"), g.tensor(&[f, h], 0.2));
            put(format!("{p}.mlp.up_proj.weight"), g.tensor(&[f, h], 0.2));
            put(format!("{p}.mlp.down_proj.weight"), g.tensor(&[h, f], 0.15));
        }
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    }

    /// Logits of `tokens` as one prefill, and as a 3-token prefill then single steps.
    fn prefill_and_decode(model: &Decoder, tokens: &[u32]) -> (Tensor, Tensor) {
        let full = model.forward(tokens, &mut model.new_cache()).unwrap();
        let mut cache = model.new_cache();
        let mut rows = vec![model.forward(&tokens[..3], &mut cache).unwrap()];
        for t in &tokens[3..] {
            rows.push(model.forward(std::slice::from_ref(t), &mut cache).unwrap());
        }
        let per_layer = 24 + 4;
        assert_eq!(cache.values_per_token(), LAYERS * per_layer);
        assert_eq!(model.cache_values_per_token(), LAYERS * per_layer);
        (full, Tensor::cat(&rows, 0).unwrap())
    }

    #[test]
    fn tiny_deepseek_v2_checkpoint_prefill_equals_decode_in_every_form() {
        let tokens: Vec<u32> = vec![1, 7, 3, 33, 12, 5, 39, 0, 21];
        for extra in [
            serde_json::json!({}),
            serde_json::json!({"attention_bias": true, "rope_scaling": {"type": "yarn",
                "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write_checkpoint(dir.path(), &config(extra.clone()));
            let ckpt = Checkpoint::open(dir.path()).unwrap();
            let mla = ckpt.spec.mla.as_ref().expect("resolved as MLA");
            assert_eq!(mla.shape.cache_values_per_token(), 28);
            assert_eq!(ckpt.spec.head_dim, 12);
            let model = crate::load::load_decoder(&ckpt).unwrap();
            let (full, stepped) = prefill_and_decode(&model, &tokens);
            let e = rel_err(&stepped, &full);
            eprintln!("{extra}: load_decoder (auto) prefill vs decode logits {e:.2e}");
            assert!(e <= 1e-5, "auto: {e:e}");
            for form in [MlaForm::Materialized, MlaForm::Absorbed] {
                let m = load_mla_decoder(&ckpt.spec, ckpt.weights.as_ref(), form).unwrap();
                let (f, s) = prefill_and_decode(&m, &tokens);
                let (e1, e2) = (rel_err(&s, &f), rel_err(&f, &full));
                eprintln!("{extra}: {form:?} prefill vs decode {e1:.2e}, vs auto {e2:.2e}");
                assert!(e1 <= 1e-5 && e2 <= 1e-5, "{form:?}: {e1:e} {e2:e}");
            }
        }
    }

    #[test]
    fn unsupported_configs_and_bad_tensors_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (extra, want) in [
            (
                serde_json::json!({"q_lora_rank": 0}),
                "q_lora_rank must be positive",
            ),
            (
                serde_json::json!({"n_routed_experts": 8, "first_k_dense_replace": 1}),
                "layer 1 is a mixture-of-experts",
            ),
            (
                serde_json::json!({"kv_lora_rank": null}),
                "kv_lora_rank is required",
            ),
            (
                serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
                "`linear` is not supported",
            ),
        ] {
            write_checkpoint(dir.path(), &config(serde_json::json!({})));
            std::fs::write(dir.path().join("config.json"), config(extra).to_string()).unwrap();
            let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("config.json"), "{err}");
        }
        // A kv_b_proj written for another rank.
        write_checkpoint(dir.path(), &config(serde_json::json!({})));
        let st = dir.path().join("model.safetensors");
        let mut t = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
        let name = "model.layers.1.self_attn.kv_b_proj.weight";
        t.insert(name.into(), Rng::new(1).tensor(&[80, 20], 0.1));
        candle_core::safetensors::save(&t, &st).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let err = crate::load::load_decoder(&ckpt)
            .expect_err("shape mismatch")
            .to_string();
        assert!(
            err.contains(&format!("`{name}` has shape [80, 20], expected [80, 24]")),
            "{err}"
        );
    }
}
