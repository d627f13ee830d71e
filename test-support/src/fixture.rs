//! [`RandomDeepseek`] (stock DeepSeek-V2) and [`RandomOneShot`] (one-shot low-rank Llama /
//! Qwen2) checkpoint directories with random weights, for
//! format tests, unit tests and device checks (never for quality numbers).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use care_model::config::mla::MlaShape;
use care_model::{Error, Result};

use crate::Rng;

/// The shape and seed of a random dense DeepSeek-V2 checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomDeepseek {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub shape: MlaShape,
    /// A q-LoRA of this width (`q_a_proj`, `q_a_layernorm`, `q_b_proj`).
    pub q_lora_rank: Option<usize>,
    /// `kv_a_proj_with_mqa`, `o_proj` (and `q_a_proj`) biases.
    pub attention_bias: bool,
    /// Standard deviation of `lm_head` (a peaked head keeps greedy choices off ties).
    pub head_std: f32,
    pub seed: u64,
}

/// The fixture's draws: [`Rng`] tensors with `?`-friendly results.
struct Gen(Rng);

impl Gen {
    fn new(seed: u64) -> Self {
        Gen(Rng::new(seed))
    }

    fn tensor(&mut self, dims: &[usize], std: f32) -> Result<Tensor> {
        Ok(self.0.tensor(dims, std))
    }

    /// Around 1 (norm weights).
    fn ones(&mut self, n: usize) -> Result<Tensor> {
        Ok((self.tensor(&[n], 0.1)? + 1.0)?)
    }

    /// Embedding, final norm and an untied head (`head_std`).
    fn embedding_and_head(
        &mut self,
        t: &mut HashMap<String, Tensor>,
        vocab: usize,
        hidden: usize,
        head_std: f32,
    ) -> Result<()> {
        let embed = self.tensor(&[vocab, hidden], 1.0)?;
        t.insert("model.embed_tokens.weight".into(), embed);
        t.insert(
            "lm_head.weight".into(),
            self.tensor(&[vocab, hidden], head_std)?,
        );
        t.insert("model.norm.weight".into(), self.ones(hidden)?);
        Ok(())
    }

    /// Layer `p`'s two norms and SwiGLU MLP (Llama names).
    fn norms_and_mlp(
        &mut self,
        t: &mut HashMap<String, Tensor>,
        p: &str,
        h: usize,
        f: usize,
    ) -> Result<()> {
        t.insert(format!("{p}.input_layernorm.weight"), self.ones(h)?);
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            self.ones(h)?,
        );
        t.insert(
            format!("{p}.mlp.gate_proj.weight"),
            self.tensor(&[f, h], 0.2)?,
        );
        t.insert(
            format!("{p}.mlp.up_proj.weight"),
            self.tensor(&[f, h], 0.2)?,
        );
        t.insert(
            format!("{p}.mlp.down_proj.weight"),
            self.tensor(&[h, f], 0.15)?,
        );
        Ok(())
    }
}

/// `model.safetensors` and `config.json` into `dir`.
fn save(dir: &Path, t: &HashMap<String, Tensor>, config: &serde_json::Value) -> Result<()> {
    candle_core::safetensors::save(t, dir.join("model.safetensors"))?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config.to_string()).map_err(|e| Error::io(cfg, e))?;
    Ok(())
}

impl RandomDeepseek {
    /// 2 layers, hidden 32, 4 heads of 8 + 4 (rope), v 12, rank 24, vocab 40.
    pub fn tiny() -> Self {
        RandomDeepseek {
            vocab: 40,
            hidden: 32,
            intermediate: 48,
            layers: 2,
            shape: MlaShape {
                num_heads: 4,
                qk_nope_head_dim: 8,
                qk_rope_head_dim: 4,
                v_head_dim: 12,
                kv_lora_rank: 24,
            },
            q_lora_rank: None,
            attention_bias: false,
            head_std: 0.6,
            seed: 23,
        }
    }

    /// `config.json` with every key mistral.rs 0.8.1 and HF transformers read.
    pub fn config(&self) -> serde_json::Value {
        let s = self.shape;
        serde_json::json!({
            "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
            "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "moe_intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": s.num_heads,
            "num_key_value_heads": s.num_heads, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "attention_bias": self.attention_bias, "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": s.kv_lora_rank, "qk_nope_head_dim": s.qk_nope_head_dim,
            "qk_rope_head_dim": s.qk_rope_head_dim, "v_head_dim": s.v_head_dim,
            "n_routed_experts": null, "n_shared_experts": null,
            "first_k_dense_replace": self.layers, "moe_layer_freq": 1, "n_group": 1,
            "topk_group": 1, "num_experts_per_tok": null, "hidden_act": "silu",
            "tie_word_embeddings": false, "rope_scaling": null, "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "float32"
        })
    }

    /// Write `config.json` and `model.safetensors` into `dir` (which must exist).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let g = &mut Gen::new(self.seed);
        let (v, h, f, s) = (self.vocab, self.hidden, self.intermediate, self.shape);
        let inv = |n: usize| 1.0 / (n as f32).sqrt();
        let mut t: HashMap<String, Tensor> = HashMap::new();
        g.embedding_and_head(&mut t, v, h, self.head_std)?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            match self.q_lora_rank {
                None => {
                    t.insert(
                        format!("{a}.q_proj.weight"),
                        g.tensor(&[s.q_rows(), h], inv(h))?,
                    );
                }
                Some(q) => {
                    t.insert(format!("{a}.q_a_proj.weight"), g.tensor(&[q, h], inv(h))?);
                    t.insert(format!("{a}.q_a_layernorm.weight"), g.ones(q)?);
                    t.insert(
                        format!("{a}.q_b_proj.weight"),
                        g.tensor(&[s.q_rows(), q], inv(q))?,
                    );
                    if self.attention_bias {
                        t.insert(format!("{a}.q_a_proj.bias"), g.tensor(&[q], 0.1)?);
                    }
                }
            }
            t.insert(
                format!("{a}.kv_a_proj_with_mqa.weight"),
                g.tensor(&[s.kv_a_rows(), h], inv(h))?,
            );
            t.insert(
                format!("{a}.kv_a_layernorm.weight"),
                g.ones(s.kv_lora_rank)?,
            );
            t.insert(
                format!("{a}.kv_b_proj.weight"),
                g.tensor(&[s.kv_b_rows(), s.kv_lora_rank], inv(s.kv_lora_rank))?,
            );
            t.insert(
                format!("{a}.o_proj.weight"),
                g.tensor(&[h, s.o_cols()], inv(s.o_cols()))?,
            );
            if self.attention_bias {
                t.insert(
                    format!("{a}.kv_a_proj_with_mqa.bias"),
                    g.tensor(&[s.kv_a_rows()], 0.1)?,
                );
                t.insert(format!("{a}.o_proj.bias"), g.tensor(&[h], 0.1)?);
            }
            g.norms_and_mlp(&mut t, &p, h, f)?;
        }
        save(dir, &t, &self.config())
    }
}

/// A one-shot converted checkpoint (Llama or Qwen2 layout plus latent factors
/// `k_latent_a/b`, `v_latent_a/b`, or `kv_latent_a` shared) with random weights.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomOneShot {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `(r_k, r_v)`, or `r` of a shared latent when `shared`; layer `l` adds
    /// `l · rank_step` to each (per-layer ranks, as CARE's water-filling gives).
    pub ranks: (usize, usize),
    pub rank_step: usize,
    /// No latent factors at all: the original GQA checkpoint (`k_proj`, `v_proj`).
    pub gqa: bool,
    pub shared: bool,
    /// Qwen2 (q/k/v biases) instead of Llama.
    pub qwen2: bool,
    pub seed: u64,
}

impl RandomOneShot {
    /// The original GQA form of [`Self::tiny`]'s shape (no latents).
    pub fn tiny_gqa() -> Self {
        RandomOneShot {
            gqa: true,
            ..Self::tiny()
        }
    }

    /// 2 layers, hidden 32, 4 query heads over 2 KV heads of 8, ranks (6, 5), vocab 40.
    pub fn tiny() -> Self {
        RandomOneShot {
            vocab: 40,
            hidden: 32,
            intermediate: 48,
            layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            ranks: (6, 5),
            rank_step: 0,
            gqa: false,
            shared: false,
            qwen2: false,
            seed: 29,
        }
    }

    pub fn config(&self) -> serde_json::Value {
        let arch = if self.qwen2 {
            ("qwen2", "Qwen2ForCausalLM")
        } else {
            ("llama", "LlamaForCausalLM")
        };
        serde_json::json!({
            "architectures": [arch.1], "model_type": arch.0,
            "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "float32"
        })
    }

    /// Write `config.json` and `model.safetensors` into `dir` (which must exist).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let g = &mut Gen::new(self.seed);
        let (v, h, f) = (self.vocab, self.hidden, self.intermediate);
        let (q_rows, kv_rows) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let inv = |n: usize| 1.0 / (n as f32).sqrt();
        let mut t: HashMap<String, Tensor> = HashMap::new();
        g.embedding_and_head(&mut t, v, h, 0.6)?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            t.insert(
                format!("{a}.q_proj.weight"),
                g.tensor(&[q_rows, h], inv(h))?,
            );
            let (rk, rv) = (
                self.ranks.0 + l * self.rank_step,
                self.ranks.1 + l * self.rank_step,
            );
            if self.gqa {
                t.insert(
                    format!("{a}.k_proj.weight"),
                    g.tensor(&[kv_rows, h], inv(h))?,
                );
                t.insert(
                    format!("{a}.v_proj.weight"),
                    g.tensor(&[kv_rows, h], inv(h))?,
                );
            } else if self.shared {
                t.insert(
                    format!("{a}.kv_latent_a.weight"),
                    g.tensor(&[rk, h], inv(h))?,
                );
                t.insert(
                    format!("{a}.k_latent_b.weight"),
                    g.tensor(&[kv_rows, rk], inv(rk))?,
                );
                t.insert(
                    format!("{a}.v_latent_b.weight"),
                    g.tensor(&[kv_rows, rk], inv(rk))?,
                );
            } else {
                t.insert(
                    format!("{a}.k_latent_a.weight"),
                    g.tensor(&[rk, h], inv(h))?,
                );
                t.insert(
                    format!("{a}.k_latent_b.weight"),
                    g.tensor(&[kv_rows, rk], inv(rk))?,
                );
                t.insert(
                    format!("{a}.v_latent_a.weight"),
                    g.tensor(&[rv, h], inv(h))?,
                );
                t.insert(
                    format!("{a}.v_latent_b.weight"),
                    g.tensor(&[kv_rows, rv], inv(rv))?,
                );
            }
            if self.qwen2 {
                t.insert(format!("{a}.q_proj.bias"), g.tensor(&[q_rows], 0.1)?);
                t.insert(format!("{a}.k_proj.bias"), g.tensor(&[kv_rows], 0.1)?);
                t.insert(format!("{a}.v_proj.bias"), g.tensor(&[kv_rows], 0.1)?);
            }
            t.insert(
                format!("{a}.o_proj.weight"),
                g.tensor(&[h, q_rows], inv(q_rows))?,
            );
            g.norms_and_mlp(&mut t, &p, h, f)?;
        }
        save(dir, &t, &self.config())
    }
}
