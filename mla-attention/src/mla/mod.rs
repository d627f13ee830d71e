//! Multi-Head Latent Attention in the DeepSeek-V2 format (arXiv:2405.04434 §2.1):
//! the layer math in two numerically equal forms over one latent cache, its
//! interleaved RoPE, a slow reference, and loading of stock `DeepseekV2ForCausalLM`
//! checkpoints with dense MLPs.
//!
//! - [`config`]: [`MlaShape`], [`MlaSpec`], [`YarnScaling`], the `config.json` fields.
//! - [`layer`]: [`MlaAttention`] (an [`Attention`](crate::model::Attention)) and
//!   [`MlaForm`]: `Materialized` (prefill), `Absorbed` (decode) or `Auto` (both).
//! - [`rope`]: [`InterleavedRope`], pairs `(2i, 2i+1)`, optional YaRN.
//! - [`reference`]: [`reference_forward`], scalar f64 oracle.
//! - [`load`]: [`load_mla_attention`] (a whole decoder: [`crate::load::load_mla_decoder`]).
//!
//! The cache of a layer is one tensor `(batch, 1, tokens, r + d_rope)` holding
//! `[c ; RoPE(k_pe)]` per token, `c` after `kv_a_layernorm`.
//!
//! ```no_run
//! use mla_attention::{io::Checkpoint, load::load_mla_decoder, mla::MlaForm};
//! let ckpt = Checkpoint::open("deepseek-v2-dense-dir")?;
//! let model = load_mla_decoder(&ckpt.spec, ckpt.weights.as_ref(), MlaForm::Absorbed)?;
//! let logits = model.forward(&[1, 2, 3], &mut model.new_cache())?; // (seq, vocab)
//! # Ok::<(), mla_attention::Error>(())
//! ```

/// The MLA fields of `config.json` live with the rest of the configuration.
pub use crate::config::mla as config;
pub mod layer;
pub mod load;
pub mod reference;
pub mod rope;

#[cfg(test)]
pub(crate) mod tests;

pub use config::{MlaRopeScaling, MlaShape, MlaSpec, YarnScaling};
pub use layer::{MlaAttention, MlaForm, MlaWeights, QLoraWeights};
pub use load::load_mla_attention;
pub use reference::{latent_attention_f64, reference_forward, ReferenceOutput};
pub use rope::InterleavedRope;
