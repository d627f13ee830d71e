//! The converted attention forms a runner decodes over a paged cache, and loading
//! them (shared by the CPU and CUDA paged models).
//!
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
use crate::model::decoder::{load_layer_rest, load_low_rank_attention};
use crate::model::{Attention, Decoder, LowRankKvAttention};

/// One layer's attention as a runner decodes it.
#[derive(Debug, Clone)]
pub enum RunnerLayer {
    Mla(Box<MlaAttention>),
    LowRank(LowRankKvAttention),
}

impl RunnerLayer {
    /// The layer's row in the paged cache (`rope` 0 for the one-shot form, whose
    /// latents carry no position).
    pub fn width(&self) -> LayerWidth {
        match self {
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
            RunnerLayer::LowRank(_) => true,
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

/// Every layer's attention of a converted checkpoint — stock DeepSeek-V2 or one-shot
/// low rank — and the decoder around them (MLA layers in materialized form, for
/// prefill). An unconverted (GQA) layer is an error naming the converters.
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
                    return Err(Error::InvalidInput(format!(
                        "{}: layer {l} is plain GQA; the paged runner decodes converted \
                         checkpoints (stock MLA from `care-convert mla`, one-shot latents \
                         from `care-convert convert`)",
                        w.path().display()
                    )))
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

/// A prefill's contiguous cache of one layer as the rows of the paged cache: its
/// entries side by side, `(1, 1, tokens, Σ widths)`.
pub(crate) fn prefill_rows(l: usize, lc: &LayerCache) -> Result<Tensor> {
    match lc.entries.as_slice() {
        [] => Err(Error::InvalidInput(format!(
            "layer {l}: the prefill left no latent rows"
        ))),
        [one] => Ok(one.clone()),
        many => Ok(Tensor::cat(many, 3)?),
    }
}
