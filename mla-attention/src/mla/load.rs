//! Loading stock `DeepseekV2ForCausalLM` checkpoints (dense MLP, `q_lora_rank: null`).
//!
//! Attention tensors per layer, under `model.layers.{l}.self_attn.` (see [`names`]);
//! norms, MLP, embedding and head carry the Llama names, so the rest of the decoder
//! loads unchanged. [`crate::load::load_attention`] dispatches here when the spec has
//! [`ModelSpec::mla`]; [`crate::load::load_mla_decoder`] builds a whole decoder.

use super::config::MlaSpec;
use super::layer::{MlaAttention, MlaWeights, QLoraWeights};
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::io::{load_checked, WeightSource};

/// DeepSeek-V2 attention tensor names (under `model.layers.{l}.self_attn.`).
pub mod names {
    pub const Q_PROJ: &str = "q_proj";
    pub const KV_A_PROJ_WITH_MQA: &str = "kv_a_proj_with_mqa";
    pub const KV_A_LAYERNORM: &str = "kv_a_layernorm";
    pub const KV_B_PROJ: &str = "kv_b_proj";
    pub const O_PROJ: &str = "o_proj";
}

pub(crate) fn mla_spec<'a>(spec: &'a ModelSpec, w: &dyn WeightSource) -> Result<&'a MlaSpec> {
    spec.mla.as_ref().ok_or_else(|| Error::InvalidConfig {
        path: w.path().to_path_buf(),
        reason: "not a DeepSeek-V2 (MLA) model".into(),
    })
}

/// The MLA attention of layer `l`, every shape checked (errors name the tensor). The
/// form is [`MlaForm::Auto`].
pub fn load_mla_attention(
    spec: &ModelSpec,
    w: &dyn WeightSource,
    l: usize,
) -> Result<MlaAttention> {
    use names::*;
    let mla = mla_spec(spec, w)?;
    let s = mla.shape;
    let h = spec.hidden_size;
    let p = format!("model.layers.{l}.self_attn");
    let get = |name: &str, dims: &[usize]| load_checked(w, &format!("{p}.{name}.weight"), dims);
    let bias = |name: &str, n: usize| {
        mla.attention_bias
            .then(|| load_checked(w, &format!("{p}.{name}.bias"), &[n]))
            .transpose()
    };
    let (q_proj, q_lora) = match mla.q_lora_rank {
        None => (get(Q_PROJ, &[s.q_rows(), h])?, None),
        Some(rank) => (
            get("q_b_proj", &[s.q_rows(), rank])?,
            Some(QLoraWeights {
                q_a_proj: get("q_a_proj", &[rank, h])?,
                q_a_proj_bias: bias("q_a_proj", rank)?,
                q_a_layernorm: get("q_a_layernorm", &[rank])?,
            }),
        ),
    };
    let weights = MlaWeights {
        q_proj,
        q_lora,
        kv_a_proj_with_mqa: get(KV_A_PROJ_WITH_MQA, &[s.kv_a_rows(), h])?,
        kv_a_proj_with_mqa_bias: bias(KV_A_PROJ_WITH_MQA, s.kv_a_rows())?,
        kv_a_layernorm: get(KV_A_LAYERNORM, &[s.kv_lora_rank])?,
        kv_b_proj: get(KV_B_PROJ, &[s.kv_b_rows(), s.kv_lora_rank])?,
        o_proj: get(O_PROJ, &[h, s.o_cols()])?,
        o_proj_bias: bias(O_PROJ, h)?,
    };
    MlaAttention::new(mla, weights)
        .map_err(|e| Error::InvalidInput(format!("{}: layer {l}: {e}", w.path().display())))
}
