//! Conversion into **stock DeepSeek-V2 MLA** (CARE Table 2 form): absorbable attention
//! that unmodified hosts (mistral.rs `deepseekv2`, HF transformers) load and serve with a
//! compressed latent cache `[c ; k_pe]` per token and layer.
//!
//! Per layer, from the calibration statistics the one-shot path already collects:
//!
//! 1. [`rope_split`]: RoRoPE + FreqFold moves the key's position information into one
//!    shared RoPE key of width `d_rope`; the rest of the key loses RoPE.
//! 2. [`joint`]: CARE (or the TransMLA PCA baseline) factors the map x → [k_nope; v] of
//!    every head into one latent of rank r.
//! 3. [`assemble`]: the DeepSeek-V2 tensors, queries rescaled for the new softmax scale,
//!    `kv_a_layernorm` neutralized, padded to one `kv_lora_rank`.
//!
//! The result is installed into a [`Decoder`] (our runtime's [`MlaAttention`]) for
//! evaluation, and written by [`crate::export::deepseek`].

#![allow(non_snake_case)]

pub mod assemble;
pub mod joint;
pub mod rope_scale;
pub mod rope_split;

#[cfg(test)]
mod test_rng {
    /// Uniform samples in (−1, 1) for the module tests, from the tests' one generator.
    pub(crate) fn uniform_pm1(seed: u64) -> impl FnMut() -> f64 {
        let mut r = test_support::Rng::new(seed);
        move || r.uniform() * 2.0 - 1.0
    }
}

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::convert::{to_tensor, vec_tensor, weight_mat as mat};
use crate::error::{Error, Result};
use crate::factorize::InputStats;
use mla_attention::config::ModelSpec;
use mla_attention::io::WeightSource;
use mla_attention::mla::{MlaAttention, MlaShape, MlaSpec, MlaWeights, QLoraWeights};
use mla_attention::model::Decoder;

pub use assemble::{LatentNorm, StockLayer};
pub use joint::LatentBasis;
pub use rope_split::RopeSplitOptions;

/// Options of a stock MLA conversion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockOptions {
    /// `kv_lora_rank` of the output (the padded latent width; 512 for mistral.rs's CUDA
    /// MLA kernel together with `rope.rope_dim = 64`).
    pub kv_lora_rank: usize,
    /// Real latent rank per layer (≤ kv_lora_rank − anchor dims); `None`: as many as fit
    /// and the joint map has (the rest of `kv_lora_rank` is exact zero padding).
    pub rank: Option<usize>,
    pub rope: RopeSplitOptions,
    pub basis: LatentBasis,
    /// K/V balance before the joint factorization.
    pub balance: bool,
    pub latent_norm: LatentNorm,
    /// Pad values to `v_head_dim = head_dim + rope_dim` with exact zeros, which
    /// mistral.rs 0.8.1's CPU attention requires (its CUDA MLA path does not).
    pub pad_v: bool,
    /// Relative damping δ of C.
    pub damping: f64,
}

impl StockOptions {
    /// The usual conversion at one latent width: CARE basis, K/V balance, bias-anchored
    /// latent norm, V padded for mistral.rs's CPU path, damping 0.01, RoRoPE (PCA) split
    /// of `rope_dim` RoPE dims folded `freqfold` times — `care-convert mla`'s defaults.
    pub fn care(kv_lora_rank: usize, rope_dim: usize, freqfold: usize) -> Self {
        StockOptions {
            kv_lora_rank,
            rank: None,
            rope: RopeSplitOptions {
                rope_dim,
                freqfold,
                pca: true,
            },
            basis: LatentBasis::Care,
            balance: true,
            latent_norm: LatentNorm::BiasAnchor,
            pad_v: true,
            damping: 0.01,
        }
    }
}

/// What one layer's conversion did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockLayerReport {
    pub rank: usize,
    /// Share of the calibrated key energy kept under RoPE.
    pub rope_energy: f64,
    pub alpha: f64,
    /// The latent anchor (bias-anchor norm), if used.
    pub anchor: Option<f64>,
    /// ‖a·x‖ RMS over calibration tokens.
    pub latent_rms_norm: f64,
}

/// The whole conversion's summary for `care.json` and reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockSummary {
    pub options: StockOptions,
    pub mla: MlaSpec,
    pub layers: Vec<StockLayerReport>,
    /// Cached values per token over all layers: original GQA K+V, converted `n + d_rope`.
    pub kv_values_per_token_original: usize,
    pub kv_values_per_token_converted: usize,
    /// Exported RoPE pairs whose frequency differs from the source's (a source RoPE
    /// scaling that DeepSeek's YaRN can only approximate; see [`rope_scale`]).
    #[serde(default)]
    pub rope_pairs_inexact: Vec<rope_scale::RopePairCheck>,
    pub seconds: f64,
}

/// A converted model: spec and per-layer weights.
#[derive(Debug, Clone)]
pub struct StockModel {
    pub mla: MlaSpec,
    pub layers: Vec<StockLayer>,
    pub summary: StockSummary,
}

fn vector(w: &dyn WeightSource, name: &str) -> Result<Vec<f64>> {
    let v = w
        .tensor(name)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite(name.to_string()));
    }
    Ok(v)
}

/// The exported `v_head_dim`.
pub fn v_head_dim(spec: &ModelSpec, opts: &StockOptions) -> usize {
    if opts.pad_v {
        spec.head_dim + opts.rope.rope_dim
    } else {
        spec.head_dim
    }
}

/// The largest latent rank the joint map x → [k_nope; v] of one layer can use.
pub fn max_rank(spec: &ModelSpec, opts: &StockOptions) -> usize {
    let joint_width = (2 * spec.num_kv_heads * spec.head_dim).saturating_sub(opts.rope.rope_dim);
    joint_width.min(spec.hidden_size)
}

/// The real latent rank per layer: `opts.rank`, or as many dims as fit.
pub fn effective_rank(spec: &ModelSpec, opts: &StockOptions) -> usize {
    opts.rank.unwrap_or_else(|| {
        opts.kv_lora_rank
            .saturating_sub(opts.latent_norm.extra_dims())
            .min(max_rank(spec, opts))
    })
}

/// Check that `spec` can be converted with `opts`; the errors name the flag to change.
pub fn check(spec: &ModelSpec, opts: &StockOptions) -> Result<()> {
    if spec.mla.is_some() {
        return Err(Error::InvalidOption(
            "the source is already an MLA model".into(),
        ));
    }
    rope_split::validate(&opts.rope, spec.head_dim)?;
    if spec.arch.has_qkv_bias() && opts.latent_norm != LatentNorm::BiasAnchor {
        return Err(Error::InvalidOption(format!(
            "{:?} has q/k/v biases; they fold exactly only through bias anchors \
             (--latent-norm bias-anchor)",
            spec.arch
        )));
    }
    let extra = opts.latent_norm.extra_dims();
    let max_rank = max_rank(spec, opts);
    if opts.kv_lora_rank <= extra {
        return Err(Error::InvalidOption(format!(
            "--kv-lora-rank {} leaves no latent dims (the {:?} norm uses {extra})",
            opts.kv_lora_rank, opts.latent_norm
        )));
    }
    let rank = effective_rank(spec, opts);
    if rank == 0 || rank + extra > opts.kv_lora_rank {
        return Err(Error::InvalidOption(format!(
            "latent rank {rank} must be in 1..={} for --kv-lora-rank {}",
            opts.kv_lora_rank - extra,
            opts.kv_lora_rank
        )));
    }
    if rank > max_rank {
        return Err(Error::InvalidOption(format!(
            "latent rank {rank} is larger than the joint width min(2·{}·{} − {}, hidden {}) \
             = {max_rank}; lower --kv-lora-rank (or --rank)",
            spec.num_kv_heads, spec.head_dim, opts.rope.rope_dim, spec.hidden_size
        )));
    }
    Ok(())
}

/// Convert every layer of the GQA model `w` (spec `spec`) from its calibration statistics.
pub fn convert_stock(
    spec: &ModelSpec,
    w: &dyn WeightSource,
    stats: &[InputStats],
    opts: &StockOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StockModel> {
    check(spec, opts)?;
    if stats.len() != spec.num_layers {
        return Err(Error::InvalidOption(format!(
            "{} layer statistics for {} layers",
            stats.len(),
            spec.num_layers
        )));
    }
    let started = Instant::now();
    let rank = effective_rank(spec, opts);
    let heads = assemble::Heads {
        num_heads: spec.num_heads,
        num_kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        rope_dim: opts.rope.rope_dim,
        kv_lora_rank: opts.kv_lora_rank,
        v_head_dim: v_head_dim(spec, opts),
    };
    let mut layers = Vec::with_capacity(spec.num_layers);
    let mut reports = Vec::with_capacity(spec.num_layers);
    for (l, st) in stats.iter().enumerate() {
        let p = format!("model.layers.{l}.self_attn");
        let wk = mat(w, &format!("{p}.k_proj.weight"))?;
        let bias = |n: &str| -> Result<Option<Vec<f64>>> {
            if spec.arch.has_qkv_bias() {
                Ok(Some(vector(w, &format!("{p}.{n}.bias"))?))
            } else {
                Ok(None)
            }
        };
        let src = assemble::SourceAttention {
            q: mat(w, &format!("{p}.q_proj.weight"))?,
            q_bias: bias("q_proj")?,
            v: mat(w, &format!("{p}.v_proj.weight"))?,
            k_bias: bias("k_proj")?,
            v_bias: bias("v_proj")?,
            o: mat(w, &format!("{p}.o_proj.weight"))?,
        };
        let C = st.second_moment.as_ref();
        let split =
            rope_split::split_rope(wk.as_ref(), C, spec.num_kv_heads, spec.head_dim, &opts.rope)?;
        let joint = joint::joint_latent(
            split.k_nope.as_ref(),
            src.v.as_ref(),
            st,
            rank,
            opts.basis,
            opts.balance,
            opts.damping,
        )?;
        // E‖a x‖² per token.
        let aC = &joint.a * C;
        let energy = (0..joint.a.nrows())
            .map(|i| {
                (0..joint.a.ncols())
                    .map(|k| aC[(i, k)] * joint.a[(i, k)])
                    .sum::<f64>()
            })
            .sum::<f64>()
            / st.tokens.max(1) as f64;
        let input_energy = (0..C.nrows()).map(|i| C[(i, i)]).sum::<f64>() / st.tokens.max(1) as f64;
        let layer = assemble::assemble_layer(
            heads,
            &src,
            &split,
            &joint,
            energy,
            input_energy,
            opts.latent_norm,
        )
        .map_err(|e| Error::InvalidOption(format!("layer {l}: {e}")))?;
        reports.push(StockLayerReport {
            rank,
            rope_energy: split.rope_energy,
            alpha: joint.alpha,
            anchor: layer.anchor,
            latent_rms_norm: energy.sqrt(),
        });
        layers.push(layer);
        progress(l + 1, spec.num_layers);
    }
    let rope_plan = rope_scale::plan(spec, opts.rope.rope_dim);
    let mla = MlaSpec {
        shape: MlaShape {
            num_heads: spec.num_heads,
            qk_nope_head_dim: spec.head_dim,
            qk_rope_head_dim: opts.rope.rope_dim,
            v_head_dim: v_head_dim(spec, opts),
            kv_lora_rank: opts.kv_lora_rank,
        },
        rope_theta: spec.rope_theta,
        rope_scaling: rope_plan.scaling,
        norm_eps: spec.rms_norm_eps,
        attention_bias: opts.latent_norm == LatentNorm::BiasAnchor,
        // A source query bias is folded through a q-LoRA of width hidden + 1.
        q_lora_rank: spec.arch.has_qkv_bias().then_some(spec.hidden_size + 1),
    };
    let summary = StockSummary {
        options: opts.clone(),
        mla: mla.clone(),
        layers: reports,
        kv_values_per_token_original: spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim,
        kv_values_per_token_converted: spec.num_layers * (opts.kv_lora_rank + opts.rope.rope_dim),
        rope_pairs_inexact: rope_plan.inexact,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(StockModel {
        mla,
        layers,
        summary,
    })
}

impl StockLayer {
    /// The layer as our runtime's f32 [`MlaWeights`].
    pub fn to_weights(&self) -> Result<MlaWeights> {
        Ok(MlaWeights {
            q_proj: to_tensor(&self.q_proj)?,
            q_lora: self
                .q_fold
                .as_ref()
                .map(|f| -> Result<QLoraWeights> {
                    Ok(QLoraWeights {
                        q_a_proj: to_tensor(&f.q_a_proj)?,
                        q_a_proj_bias: Some(vec_tensor(&f.q_a_bias)?),
                        q_a_layernorm: vec_tensor(&f.q_a_layernorm)?,
                    })
                })
                .transpose()?,
            kv_a_proj_with_mqa: to_tensor(&self.kv_a_proj_with_mqa)?,
            kv_a_proj_with_mqa_bias: self.kv_a_bias.as_deref().map(vec_tensor).transpose()?,
            kv_a_layernorm: vec_tensor(&self.kv_a_layernorm)?,
            kv_b_proj: to_tensor(&self.kv_b_proj)?,
            o_proj: to_tensor(&self.o_proj)?,
            o_proj_bias: self.o_bias.as_deref().map(vec_tensor).transpose()?,
        })
    }
}

impl StockModel {
    /// Replace every attention layer of `model` (the source GQA decoder) by the converted
    /// MLA layer, so the rest of the network (norms, MLP, head) stays the source's.
    pub fn install(&self, model: &mut Decoder) -> Result<()> {
        if model.layers.len() != self.layers.len() {
            return Err(Error::InvalidOption(format!(
                "{} converted layers for a {}-layer model",
                self.layers.len(),
                model.layers.len()
            )));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let attn = MlaAttention::new(&self.mla, layer.to_weights()?)?;
            model.set_attention(l, Box::new(attn))?;
        }
        Ok(())
    }
}

/// A SmolLM2-shaped Llama spec for unit tests.
#[cfg(test)]
pub(crate) fn test_spec() -> ModelSpec {
    ModelSpec {
        arch: mla_attention::config::Architecture::Llama,
        hidden_size: 576,
        num_layers: 2,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        intermediate_size: 1536,
        vocab_size: 100,
        rope_theta: 1e5,
        rope_scaling: mla_attention::config::RopeScaling::None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        max_position_embeddings: 2048,
        bos_token_id: None,
        eos_token_id: None,
        mla: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mla_attention::config::Architecture;

    fn llama() -> ModelSpec {
        test_spec()
    }

    fn opts(kv_lora_rank: usize, rope_dim: usize, freqfold: usize) -> StockOptions {
        StockOptions::care(kv_lora_rank, rope_dim, freqfold)
    }

    #[test]
    fn bad_conversions_are_refused_with_the_flag_to_change() {
        let cases: Vec<(ModelSpec, StockOptions, &str)> = vec![
            (llama(), opts(160, 31, 1), "--rope-dim 31 must be even"),
            (llama(), opts(160, 128, 1), "larger than the head dimension"),
            (llama(), opts(160, 32, 1), "--freqfold 1"),
            (llama(), opts(1, 32, 2), "leaves no latent dims"),
            (
                llama(),
                StockOptions {
                    rank: Some(400),
                    ..opts(512, 32, 2)
                },
                "larger than the joint width",
            ),
            (
                llama(),
                StockOptions {
                    rank: Some(200),
                    ..opts(160, 32, 2)
                },
                "must be in 1..=159",
            ),
            (
                ModelSpec {
                    arch: Architecture::Qwen2,
                    ..llama()
                },
                StockOptions {
                    latent_norm: LatentNorm::MeanRms,
                    ..opts(160, 32, 2)
                },
                "fold exactly only through bias anchors",
            ),
        ];
        for (spec, o, want) in cases {
            let e = check(&spec, &o).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e:?}");
        }
        // The CUDA kernel shape pads: kv_lora_rank 512 with rope 64 on a 64-wide head
        // uses every joint dim (2·3·64 − 64 = 320) and pads the rest exactly.
        let cuda = opts(512, 64, 1);
        check(&llama(), &cuda).unwrap();
        assert_eq!(effective_rank(&llama(), &cuda), 320);
        assert_eq!(v_head_dim(&llama(), &cuda), 128);
    }
}
