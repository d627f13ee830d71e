//! The attention forms a paged model decodes over a paged cache, and loading them
//! (shared by the CPU and CUDA paged models).
//!
//! - **GQA** (an original Llama/Qwen2 checkpoint): the cached row is `[K ; V]` of every KV
//!   head (RoPE'd keys), attention over the blocks.
//! - **Stock MLA** (`care-convert mla`, DeepSeek-V2 format): the cached row is
//!   `[c ; RoPE(k_pe)]`; decode is absorbed (attention in latent space).
//! - **One-shot low rank** (`care-convert convert`, Llama/Qwen2 format with latent
//!   factors): the cached row is the latents `[c_k ; c_v]` (or the shared `c`); RoPE
//!   acts on the rebuilt keys, so decode gathers a sequence's latents and rebuilds K/V
//!   ([`LowRankKvAttention::decode_over`]) — same cache size, no absorbed speed-up.

use candle_core::Tensor;

use super::RunnerConfig;
use crate::cache::{CacheConfig, LayerWidth};
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::io::WeightSource;
use crate::mla::{load_mla_attention, MlaAttention, MlaForm};
use crate::model::attention::LayerCache;
use crate::model::decoder::{load_gqa_attention, load_layer_rest, load_low_rank_attention};
use crate::model::{Attention, Decoder, GqaAttention, LowRankKvAttention};

/// One layer's attention as a runner decodes it.
#[derive(Debug, Clone)]
pub enum RunnerLayer {
    Gqa(GqaAttention),
    Mla(Box<MlaAttention>),
    LowRank(LowRankKvAttention),
}

impl RunnerLayer {
    /// The layer's row in the paged cache (`rope` 0 for the one-shot form, whose
    /// latents carry no position).
    pub fn width(&self) -> LayerWidth {
        match self {
            RunnerLayer::Gqa(a) => LayerWidth {
                rank: a.cache_values_per_token(),
                rope: 0,
            },
            RunnerLayer::Mla(a) => LayerWidth::of_shape(&a.shape()),
            RunnerLayer::LowRank(a) => LayerWidth {
                rank: a.cache_values_per_token(),
                rope: 0,
            },
        }
    }

    fn cache_values_per_token(&self) -> usize {
        self.width().width()
    }
}

/// Check that `layers` are the attention of `decoder` (same count, cached values per
/// token, and hidden size for MLA).
pub(crate) fn check_parts(decoder: &Decoder, layers: &[RunnerLayer]) -> Result<()> {
    if layers.len() != decoder.layers.len() {
        return Err(Error::InvalidInput(format!(
            "DecoderRunner: {} attention layers for a decoder of {} layers",
            layers.len(),
            decoder.layers.len()
        )));
    }
    for (l, (a, layer)) in layers.iter().zip(&decoder.layers).enumerate() {
        let hidden_ok = match a {
            RunnerLayer::Mla(m) => m.hidden_size() == decoder.spec.hidden_size,
            RunnerLayer::Gqa(_) | RunnerLayer::LowRank(_) => true,
        };
        if !hidden_ok || a.cache_values_per_token() != layer.attn.cache_values_per_token() {
            return Err(Error::InvalidInput(format!(
                "DecoderRunner: layer {l}: the paged layer ({} cached values) does not match \
                 the decoder (hidden {}, {} cached values)",
                a.cache_values_per_token(),
                decoder.spec.hidden_size,
                layer.attn.cache_values_per_token()
            )));
        }
    }
    Ok(())
}

/// Every layer's attention of a checkpoint — original GQA, stock DeepSeek-V2 MLA or
/// one-shot low rank — and the decoder around them (MLA layers in materialized form), which
/// prefills prompts.
pub(crate) fn load_parts(
    spec: &ModelSpec,
    w: &dyn WeightSource,
) -> Result<(Decoder, Vec<RunnerLayer>)> {
    let mut parts = Vec::with_capacity(spec.num_layers);
    let mut decoder_layers = Vec::with_capacity(spec.num_layers);
    for l in 0..spec.num_layers {
        let (part, for_decoder): (RunnerLayer, Box<dyn Attention>) = if spec.mla.is_some() {
            let a = load_mla_attention(spec, w, l)?;
            let prefill = a.clone().with_form(MlaForm::Materialized);
            (RunnerLayer::Mla(Box::new(a)), Box::new(prefill))
        } else {
            match load_low_rank_attention(spec, w, l)? {
                Some(a) => (RunnerLayer::LowRank(a.clone()), Box::new(a)),
                None => {
                    let a = load_gqa_attention(spec, w, l)?;
                    (RunnerLayer::Gqa(a.clone()), Box::new(a))
                }
            }
        };
        parts.push(part);
        decoder_layers.push(load_layer_rest(spec, w, l, for_decoder)?);
    }
    let decoder = Decoder::from_layers(spec.clone(), w, decoder_layers)?;
    Ok((decoder, parts))
}

/// The paged cache geometry for `layers` (each layer its own width).
pub(crate) fn cache_config(layers: &[RunnerLayer], config: RunnerConfig) -> CacheConfig {
    CacheConfig {
        block_size: config.block_size,
        num_blocks: config.num_blocks,
        layers: layers.iter().map(RunnerLayer::width).collect(),
    }
}

/// A prefill's contiguous cache of one layer as the rows of the paged cache,
/// `(1, 1, tokens, width)`: MLA and one-shot entries side by side; GQA's `k`, `v`
/// `(1, n_kv, tokens, d)` as `[K ; V]` rows.
pub(crate) fn prefill_rows(layer: &RunnerLayer, l: usize, lc: &LayerCache) -> Result<Tensor> {
    if let (RunnerLayer::Gqa(_), [k, v]) = (layer, lc.entries.as_slice()) {
        let (_, nkv, t, d) = k.dims4()?;
        let rows = |x: &Tensor| -> Result<Tensor> {
            Ok(x.squeeze(0)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((t, nkv * d))?)
        };
        return Ok(Tensor::cat(&[rows(k)?, rows(v)?], 1)?.reshape((1, 1, t, 2 * nkv * d))?);
    }
    match lc.entries.as_slice() {
        [] => Err(Error::InvalidInput(format!(
            "layer {l}: the prefill left no cached rows"
        ))),
        [one] => Ok(one.clone()),
        many => Ok(Tensor::cat(many, 3)?),
    }
}
