//! The reference decoder (Llama / Qwen2) on the CPU in f32.
//!
//! `embed → [x + attn(norm(x)); x + mlp(norm(x))] × L → norm → lm_head`. Attention is
//! a `Box<dyn Attention>` per layer, so converted forms replace it in place
//! ([`Decoder::set_attention`]). A [`ForwardObserver`] sees each layer's attention
//! input (the normalized hidden state), which is what calibration needs.

use candle_core::{Tensor, D};

use super::attention::{linear, Attention, AttnInput, GqaAttention, LayerCache};
use super::lowrank::{LatentFactors, LatentKv, LowRankKvAttention};
use super::rope::Rope;
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::io::{load_checked, WeightSource};

/// RMSNorm: `x / sqrt(mean(x²) + eps) · w`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = linear(x, &self.gate_proj, None)?.silu()?;
        let u = linear(x, &self.up_proj, None)?;
        linear(&(g * u)?, &self.down_proj, None)
    }
}

/// One transformer block.
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub attn: Box<dyn Attention>,
    pub post_norm: RmsNorm,
    pub mlp: Mlp,
}

/// Receives intermediate activations during a forward pass.
pub trait ForwardObserver {
    /// `x`: the normalized input of layer `layer`'s attention, `(batch, seq, hidden)`.
    fn attention_input(&mut self, layer: usize, x: &Tensor) -> Result<()>;
}

/// Per-sequence state of a forward pass: one [`LayerCache`] per layer.
#[derive(Debug, Clone, Default)]
pub struct DecoderCache {
    pub layers: Vec<LayerCache>,
}

impl DecoderCache {
    pub fn new(num_layers: usize) -> Self {
        DecoderCache {
            layers: vec![LayerCache::default(); num_layers],
        }
    }

    /// Tokens processed so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch size of the cached state (`None` while empty).
    pub fn batch_size(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|l| l.entries.first())
            .map(|t| t.dims()[0])
    }

    /// This single-sequence cache repeated `batch` times along the batch axis, so
    /// several continuations of one prefix run as one batch.
    pub fn repeat_batch(&self, batch: usize) -> Result<DecoderCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let entries = l
                    .entries
                    .iter()
                    .map(|t| {
                        let d = t.dims();
                        if d[0] != 1 {
                            return Err(Error::InvalidInput(format!(
                                "repeat_batch needs a batch-1 cache, got {}",
                                d[0]
                            )));
                        }
                        Ok(t.repeat((batch, 1, 1, 1))?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(LayerCache { entries })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DecoderCache { layers })
    }

    /// Cached values per token, summed over layers.
    pub fn values_per_token(&self) -> usize {
        self.layers.iter().map(LayerCache::values_per_token).sum()
    }

    /// Forgets the last `n` tokens of every layer: speculative decoding appends drafted
    /// tokens to the cache and takes back the ones the target rejected.
    pub fn truncate_last(&mut self, n: usize) -> Result<()> {
        let len = self.len();
        if n > len {
            return Err(Error::InvalidInput(format!(
                "cannot drop {n} tokens from a cache of {len}"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        for layer in &mut self.layers {
            for t in &mut layer.entries {
                *t = t.narrow(2, 0, len - n)?;
            }
        }
        Ok(())
    }
}

/// A decoder-only language model.
pub struct Decoder {
    pub spec: ModelSpec,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `[vocab, hidden]`; the embedding itself when tied.
    pub lm_head: Tensor,
    pub rope: Rope,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("spec", &self.spec)
            .field("layers", &self.layers.len())
            .field("cache_values_per_token", &self.cache_values_per_token())
            .finish()
    }
}

/// Builds the attention of layer `l` from a checkpoint's weights; [`load_attention`] for
/// the kinds this crate knows, `mla_attention::load::load_attention` for every kind.
pub type AttentionLoader =
    dyn Fn(&ModelSpec, &dyn WeightSource, usize) -> Result<Box<dyn Attention>>;

impl Decoder {
    /// Load an original (GQA) or one-shot low-rank checkpoint (see [`load_attention`]).
    /// A DeepSeek-V2 (MLA) checkpoint is an error here: `mla_attention::load::load_decoder`
    /// loads every kind.
    pub fn load(ckpt: &crate::io::Checkpoint) -> Result<Self> {
        Self::load_weights(&ckpt.spec, ckpt.weights.as_ref())
    }

    /// [`Decoder::load`] from a spec and weights.
    pub fn load_weights(spec: &ModelSpec, w: &dyn WeightSource) -> Result<Self> {
        if spec.mla.is_some() {
            return Err(Error::UnsupportedArchitecture {
                path: w.path().to_path_buf(),
                arch: "deepseek_v2 (MLA)".into(),
                supported: "llama, qwen2 and their one-shot low-rank form here; \
                            mla_attention::load::load_decoder loads MLA",
            });
        }
        Self::load_layers(spec, w, &load_attention)
    }

    /// Load every layer with `attention` for its attention and the checkpoint's norms and
    /// MLP for the rest.
    pub fn load_layers(
        spec: &ModelSpec,
        w: &dyn WeightSource,
        attention: &AttentionLoader,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let attn = attention(spec, w, l)?;
            layers.push(load_layer_rest(spec, w, l, attn)?);
        }
        Self::from_layers(spec.clone(), w, layers)
    }

    /// Load a GQA decoder from HF-named weights, checking every shape.
    pub fn load_gqa(spec: &ModelSpec, w: &dyn WeightSource) -> Result<Self> {
        let mut layers = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let attn = load_gqa_attention(spec, w, l)?;
            layers.push(load_layer_rest(spec, w, l, Box::new(attn))?);
        }
        Self::from_layers(spec.clone(), w, layers)
    }

    /// Assemble a decoder from already-built layers plus embedding, norm and head
    /// read from `w`.
    pub fn from_layers(
        spec: ModelSpec,
        w: &dyn WeightSource,
        layers: Vec<DecoderLayer>,
    ) -> Result<Self> {
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let embed_tokens = load_checked(w, "model.embed_tokens.weight", &[v, h])?;
        let lm_head = if w.contains("lm_head.weight") {
            load_checked(w, "lm_head.weight", &[v, h])?
        } else if spec.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            return Err(Error::MissingTensor {
                path: w.path().to_path_buf(),
                tensor: "lm_head.weight".into(),
            });
        };
        let norm = RmsNorm {
            weight: load_checked(w, "model.norm.weight", &[h])?,
            eps: spec.rms_norm_eps,
        };
        let rope = Rope::new(&spec);
        Ok(Decoder {
            spec,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Replace the attention of layer `layer` (e.g. by a converted MLA form).
    pub fn set_attention(&mut self, layer: usize, attn: Box<dyn Attention>) -> Result<()> {
        let n = self.layers.len();
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::InvalidInput(format!("layer {layer} out of range (0..{n})")))?;
        slot.attn = attn;
        Ok(())
    }

    /// A fresh cache for one sequence.
    pub fn new_cache(&self) -> DecoderCache {
        DecoderCache::new(self.layers.len())
    }

    /// Run `tokens` after what `cache` already holds; returns the final-normed hidden
    /// states `(seq, hidden)`. Logits are left to [`Decoder::logits`] so callers can
    /// project only the positions they score.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        cache: &mut DecoderCache,
        observer: Option<&mut dyn ForwardObserver>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_hidden_batch(&[tokens], cache, observer)?
            .squeeze(0)?)
    }

    /// Run a batch of equally long token rows after what `cache` holds (a cache of the
    /// same batch size, or an empty one); returns `(batch, seq, hidden)`.
    ///
    /// Rows of different true lengths may be right-padded with any valid id: attention is
    /// causal, so padding after a row's last real token never changes that row's earlier
    /// positions (but it does enter the cache, so do not continue such a cache).
    pub fn forward_hidden_batch(
        &self,
        rows: &[&[u32]],
        cache: &mut DecoderCache,
        mut observer: Option<&mut dyn ForwardObserver>,
    ) -> Result<Tensor> {
        let seq = rows.first().map_or(0, |r| r.len());
        if seq == 0 {
            return Err(Error::InvalidInput("empty token sequence".into()));
        }
        if rows.iter().any(|r| r.len() != seq) {
            return Err(Error::InvalidInput("batch rows differ in length".into()));
        }
        self.check_input(rows, cache)?;
        if let Some(b) = cache.batch_size() {
            if b != rows.len() {
                return Err(Error::InvalidInput(format!(
                    "cache holds a batch of {b}, input has {} rows",
                    rows.len()
                )));
            }
        }
        let start_pos = cache.len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let mut x = self
            .embed(&flat)?
            .reshape((rows.len(), seq, self.spec.hidden_size))?;
        for l in 0..self.layers.len() {
            let _span = tracing::trace_span!("layer", l).entered();
            let obs = observer
                .as_mut()
                .map(|o| &mut **o as &mut dyn ForwardObserver);
            x = self.layer_forward(l, &x, start_pos, &mut cache.layers[l], obs)?;
        }
        self.norm.forward(&x)
    }

    /// Token ids inside the vocabulary and a cache with one entry per layer.
    fn check_input(&self, rows: &[&[u32]], cache: &DecoderCache) -> Result<()> {
        if let Some(&bad) = rows
            .iter()
            .flat_map(|r| r.iter())
            .find(|&&t| t as usize >= self.spec.vocab_size)
        {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.spec.vocab_size
            )));
        }
        if cache.layers.len() != self.layers.len() {
            return Err(Error::InvalidInput(format!(
                "cache has {} layers, model has {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        Ok(())
    }

    /// Run several sequences of different lengths in one pass, each continuing its own
    /// cache (`segments[i]` after `caches[i]`); returns the final-normed hidden states of
    /// all new tokens, concatenated in order: `(Σ len_i, hidden)`.
    ///
    /// Attention runs per sequence (its own positions and cache); the embedding, norms and
    /// MLP run once over all rows, which is where batching pays for a small model. Used to
    /// verify the drafts of several requests in one step.
    pub fn forward_hidden_segments(
        &self,
        segments: &[&[u32]],
        caches: &mut [&mut DecoderCache],
    ) -> Result<Tensor> {
        if segments.is_empty() || segments.len() != caches.len() {
            return Err(Error::InvalidInput(format!(
                "{} segments for {} caches",
                segments.len(),
                caches.len()
            )));
        }
        if segments.iter().any(|s| s.is_empty()) {
            return Err(Error::InvalidInput("empty token sequence".into()));
        }
        for (seg, c) in segments.iter().zip(caches.iter()) {
            self.check_input(&[seg], c)?;
            if c.batch_size().is_some_and(|b| b != 1) {
                return Err(Error::InvalidInput(
                    "segments need single-sequence caches".into(),
                ));
            }
        }
        let starts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let flat: Vec<u32> = segments.iter().flat_map(|r| r.iter().copied()).collect();
        let mut x = self.embed(&flat)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let mut parts = Vec::with_capacity(segments.len());
            let mut offset = 0;
            for (i, seg) in segments.iter().enumerate() {
                let hs = h.narrow(1, offset, seg.len())?;
                let input = AttnInput {
                    x: &hs,
                    start_pos: starts[i],
                    rope: &self.rope,
                };
                parts.push(layer.attn.forward(&input, &mut caches[i].layers[l])?);
                offset += seg.len();
            }
            let a = if parts.len() == 1 {
                parts.pop().expect("one part")
            } else {
                Tensor::cat(&parts, 1)?
            };
            let x1 = (x + a)?;
            let m = layer.mlp.forward(&layer.post_norm.forward(&x1)?)?;
            x = (x1 + m)?;
        }
        Ok(self.norm.forward(&x)?.squeeze(0)?)
    }

    /// Token embeddings `(1, seq, hidden)`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        // On the embedding's device, so a decoder loaded onto a GPU runs there.
        let ids = Tensor::from_slice(tokens, tokens.len(), self.embed_tokens.device())?;
        Ok(self.embed_tokens.index_select(&ids, 0)?.unsqueeze(0)?)
    }

    /// One decoder block on the residual stream `x` `(batch, seq, hidden)` whose first
    /// token sits at `start_pos`. Used layer by layer for sequential calibration.
    pub fn layer_forward(
        &self,
        l: usize,
        x: &Tensor,
        start_pos: usize,
        cache: &mut LayerCache,
        observer: Option<&mut dyn ForwardObserver>,
    ) -> Result<Tensor> {
        let layer = &self.layers[l];
        let h = layer.input_norm.forward(x)?;
        if let Some(obs) = observer {
            obs.attention_input(l, &h)?;
        }
        let input = AttnInput {
            x: &h,
            start_pos,
            rope: &self.rope,
        };
        let a = layer.attn.forward(&input, cache)?;
        let x = (x + a)?;
        let m = layer.mlp.forward(&layer.post_norm.forward(&x)?)?;
        Ok((x + m)?)
    }

    /// Project hidden states `(seq, hidden)` to logits `(seq, vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, &self.lm_head, None)
    }

    /// Logits `(seq, vocab)` for every position of `tokens`, continuing `cache`.
    pub fn forward(&self, tokens: &[u32], cache: &mut DecoderCache) -> Result<Tensor> {
        let h = self.forward_hidden(tokens, cache, None)?;
        self.logits(&h)
    }

    /// Cached values per token over all layers (as the attention forms declare them).
    pub fn cache_values_per_token(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.attn.cache_values_per_token())
            .sum()
    }
}

/// Tensor names of the one-shot low-rank form (under `model.layers.{l}.self_attn.`).
pub mod lowrank_names {
    pub const K_A: &str = "k_latent_a.weight";
    pub const K_B: &str = "k_latent_b.weight";
    pub const V_A: &str = "v_latent_a.weight";
    pub const V_B: &str = "v_latent_b.weight";
    /// Shared K/V latent (MHA2MLA joint init); used with `K_B` and `V_B`.
    pub const KV_A: &str = "kv_latent_a.weight";
}

/// The attention of layer `l` of a Llama/Qwen2 checkpoint: low-rank (separate or shared
/// latents) when the checkpoint has latent factors for it, otherwise GQA.
pub fn load_attention(
    spec: &ModelSpec,
    w: &dyn WeightSource,
    l: usize,
) -> Result<Box<dyn Attention>> {
    Ok(match load_low_rank_attention(spec, w, l)? {
        Some(a) => Box::new(a),
        None => Box::new(load_gqa_attention(spec, w, l)?),
    })
}

/// The one-shot low-rank attention of layer `l` of a Llama/Qwen2 checkpoint, or `None`
/// where the layer has no latent factors (a GQA layer).
pub fn load_low_rank_attention(
    spec: &ModelSpec,
    w: &dyn WeightSource,
    l: usize,
) -> Result<Option<LowRankKvAttention>> {
    use lowrank_names::*;
    let p = format!("model.layers.{l}.self_attn");
    let has = |n: &str| w.contains(&format!("{p}.{n}"));
    if !has(K_B) {
        return Ok(None);
    }
    let (h, nh, nkv, d) = (
        spec.hidden_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
    );
    let get = |n: &str| w.tensor(&format!("{p}.{n}"));
    let bias = |name: &str, n: usize| -> Result<Option<Tensor>> {
        if spec.arch.has_qkv_bias() {
            Ok(Some(load_checked(w, &format!("{p}.{name}.bias"), &[n])?))
        } else {
            Ok(None)
        }
    };
    let kv = if has(KV_A) {
        LatentKv::Shared {
            a: get(KV_A)?,
            b_k: get(K_B)?,
            b_v: get(V_B)?,
        }
    } else {
        LatentKv::Separate {
            k: LatentFactors {
                a: get(K_A)?,
                b: get(K_B)?,
            },
            v: LatentFactors {
                a: get(V_A)?,
                b: get(V_B)?,
            },
        }
    };
    let attn = LowRankKvAttention {
        q_proj: load_checked(w, &format!("{p}.q_proj.weight"), &[nh * d, h])?,
        q_bias: bias("q_proj", nh * d)?,
        kv,
        k_bias: bias("k_proj", nkv * d)?,
        v_bias: bias("v_proj", nkv * d)?,
        o_proj: load_checked(w, &format!("{p}.o_proj.weight"), &[h, nh * d])?,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
    };
    attn.validate(h)
        .map_err(|e| Error::InvalidInput(format!("{}: layer {l}: {e}", w.path().display())))?;
    Ok(Some(attn))
}

/// The GQA attention of layer `l` from HF-named weights.
pub fn load_gqa_attention(
    spec: &ModelSpec,
    w: &dyn WeightSource,
    l: usize,
) -> Result<GqaAttention> {
    let p = format!("model.layers.{l}.self_attn");
    let (h, nh, nkv, d) = (
        spec.hidden_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
    );
    let bias = |name: &str, n: usize| -> Result<Option<Tensor>> {
        let full = format!("{p}.{name}.bias");
        if spec.arch.has_qkv_bias() {
            Ok(Some(load_checked(w, &full, &[n])?))
        } else {
            Ok(None)
        }
    };
    Ok(GqaAttention {
        q_proj: load_checked(w, &format!("{p}.q_proj.weight"), &[nh * d, h])?,
        k_proj: load_checked(w, &format!("{p}.k_proj.weight"), &[nkv * d, h])?,
        v_proj: load_checked(w, &format!("{p}.v_proj.weight"), &[nkv * d, h])?,
        o_proj: load_checked(w, &format!("{p}.o_proj.weight"), &[h, nh * d])?,
        q_bias: bias("q_proj", nh * d)?,
        k_bias: bias("k_proj", nkv * d)?,
        v_bias: bias("v_proj", nkv * d)?,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: d,
    })
}

/// Norms and MLP of layer `l`, around a given attention.
pub fn load_layer_rest(
    spec: &ModelSpec,
    w: &dyn WeightSource,
    l: usize,
    attn: Box<dyn Attention>,
) -> Result<DecoderLayer> {
    let p = format!("model.layers.{l}");
    let (h, f) = (spec.hidden_size, spec.intermediate_size);
    let norm = |name: &str| -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: load_checked(w, &format!("{p}.{name}.weight"), &[h])?,
            eps: spec.rms_norm_eps,
        })
    };
    Ok(DecoderLayer {
        input_norm: norm("input_layernorm")?,
        attn,
        post_norm: norm("post_attention_layernorm")?,
        mlp: Mlp {
            gate_proj: load_checked(w, &format!("{p}.mlp.gate_proj.weight"), &[f, h])?,
            up_proj: load_checked(w, &format!("{p}.mlp.up_proj.weight"), &[f, h])?,
            down_proj: load_checked(w, &format!("{p}.mlp.down_proj.weight"), &[h, f])?,
        },
    })
}
