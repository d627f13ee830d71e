//! Building the engines: mistral.rs's plain engine, and with Infinigram our
//! [`DraftVerifyEngine`] beside it.
//!
//! The plain engine loads the selected [`ModelSelected`] exactly as `mistralrs serve` does
//! (CPU or the first CUDA device, automatic device mapping, default scheduler with `max_seqs`
//! sequences) and serves every route. With an index, greedy completions go to the
//! draft-verify engine, which loads the same weights file (the `gguf` file or the `plain`
//! folder of the selection) into `mla_attention`'s f32 decoder: mistral.rs 0.8.1 offers no
//! working way to verify several positions against a kept KV cache (its
//! `SpeculativePipeline` deadlocks; `docs/SERVING.md` has the measurements).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use infinigram_spec::spec::JsonlLog;
use infinigram_spec::{Index, OpenOptions};
use mistralrs_core::{
    get_auto_device_map_params, get_model_dtype, DefaultSchedulerMethod, DeviceMapSetting,
    LoaderBuilder, MistralRs, MistralRsBuilder, ModelSelected, SchedulerConfig, TokenSource,
};
use mla_attention::io::Checkpoint;
use mla_attention::model::Decoder;

use crate::config::InfinigramConfig;
use crate::draft_engine::{measure_step_cost, DraftVerifyEngine, EngineSettings};
use crate::error::{Error, Result};
use crate::stats::SpecStats;

/// The engines the routes dispatch to.
pub struct Engines {
    /// mistral.rs: every route, and every request the draft-verify engine does not take.
    pub plain: Arc<MistralRs>,
    /// Drafting, when an index is configured.
    pub spec: Option<SpecEngine>,
}

/// The draft-verify engine and what the routes need beside it.
pub struct SpecEngine {
    pub engine: DraftVerifyEngine,
    pub config: InfinigramConfig,
    /// The model's tokenizer (the one the index was checked against), for detokenizing.
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// The weights the engine loaded.
    pub weights: PathBuf,
}

/// The checked Infinigram inputs: the index, opened and verified, and the model's tokenizer.
pub struct CheckedIndex {
    pub index: Index,
    pub tokenizer: tokenizers::Tokenizer,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens and fully verifies the index and checks it was built with the model's tokenizer.
/// Runs before any model is loaded, so bad input fails fast.
pub fn check_index(config: &InfinigramConfig) -> Result<CheckedIndex> {
    let index =
        Index::open(&config.index, OpenOptions::default()).map_err(|source| Error::Index {
            path: config.index.clone(),
            source,
        })?;
    index.verify().map_err(|source| Error::Index {
        path: config.index.clone(),
        source,
    })?;
    let given = infinigram_spec::build::tokenizer_hash(&config.tokenizer).map_err(|source| {
        Error::Index {
            path: config.tokenizer.clone(),
            source,
        }
    })?;
    if given != index.tokenizer_hash() {
        return Err(Error::TokenizerMismatch {
            index: config.index.clone(),
            tokenizer: config.tokenizer.clone(),
            index_hash: hex(&index.tokenizer_hash()),
            tokenizer_hash: hex(&given),
        });
    }
    let tokenizer =
        tokenizers::Tokenizer::from_file(&config.tokenizer).map_err(|e| Error::Tokenizer {
            path: config.tokenizer.clone(),
            message: e.to_string(),
        })?;
    let vocab_size = tokenizer.get_vocab_size(true);
    if (index.vocab_size() as usize) > vocab_size {
        return Err(Error::Tokenizer {
            path: config.tokenizer.clone(),
            message: format!(
                "vocabulary of {vocab_size} ids, but the index has {} ids",
                index.vocab_size()
            ),
        });
    }
    Ok(CheckedIndex { index, tokenizer })
}

fn device() -> Result<Device> {
    Device::cuda_if_available(0).map_err(|e| Error::Engine(e.into()))
}

fn scheduler(max_seqs: usize) -> Result<SchedulerConfig> {
    let n = std::num::NonZeroUsize::new(max_seqs)
        .ok_or_else(|| Error::InvalidSetting("max_seqs must be at least 1".into()))?;
    Ok(SchedulerConfig::DefaultScheduler {
        method: DefaultSchedulerMethod::Fixed(n),
    })
}

/// Loads the plain mistral.rs engine for `model`.
pub async fn build_plain(model: &ModelSelected, max_seqs: usize) -> Result<Arc<MistralRs>> {
    let loader = LoaderBuilder::new(model.clone())
        .build()
        .map_err(Error::Engine)?;
    let device = device()?;
    let dtype = get_model_dtype(model).map_err(Error::Engine)?;
    let mapper = DeviceMapSetting::Auto(get_auto_device_map_params(model).map_err(Error::Engine)?);
    let pipeline = loader
        .load_model_from_hf(
            None,
            TokenSource::None,
            &dtype,
            &device,
            true,
            mapper,
            None,
            None,
        )
        .map_err(Error::Engine)?;
    Ok(
        MistralRsBuilder::new(pipeline, scheduler(max_seqs)?, false, None)
            .build()
            .await,
    )
}

/// The local weights of a model selection: the GGUF file of `gguf`, the folder of `plain`.
pub fn weights_path(model: &ModelSelected) -> Result<PathBuf> {
    let path = match model {
        ModelSelected::GGUF {
            quantized_model_id,
            quantized_filename,
            ..
        } => {
            if quantized_filename.contains(' ') {
                return Err(Error::Target(
                    "drafting needs a single GGUF file, not a split model".into(),
                ));
            }
            PathBuf::from(quantized_model_id).join(quantized_filename)
        }
        ModelSelected::Plain { model_id, .. } => PathBuf::from(model_id),
        _ => {
            return Err(Error::Target(
                "drafting needs a local `gguf` or `plain` model selection (the draft-verify \
                 engine loads that file or folder itself)"
                    .into(),
            ))
        }
    };
    if !path.exists() {
        return Err(Error::Target(format!(
            "{} does not exist (drafting needs local weights, not a Hugging Face id)",
            path.display()
        )));
    }
    Ok(path)
}

/// Tokens that end a request: the checkpoint's EOS and the usual end-of-turn markers of
/// chat templates that the tokenizer knows.
fn end_tokens(eos: Option<u32>, tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    for name in [
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|end|>",
        "</s>",
    ] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// Loads the plain engine and, with `infinigram`, the draft-verify engine.
pub async fn build_engines(
    model: &ModelSelected,
    max_seqs: usize,
    infinigram: Option<&InfinigramConfig>,
    stats: Arc<SpecStats>,
) -> Result<Engines> {
    // Check the index and the target's weights before the (slow) model loads.
    let checked = infinigram.map(check_index).transpose()?;
    let weights = infinigram.map(|_| weights_path(model)).transpose()?;
    let plain = build_plain(model, max_seqs).await?;
    let (Some(config), Some(checked), Some(weights)) = (infinigram, checked, weights) else {
        return Ok(Engines { plain, spec: None });
    };
    let ckpt = Checkpoint::open(&weights).map_err(|e| Error::Target(e.to_string()))?;
    let decoder = Decoder::load(&ckpt).map_err(|e| Error::Target(e.to_string()))?;
    if decoder.spec.vocab_size < checked.index.vocab_size() as usize {
        return Err(Error::Target(format!(
            "{} has {} ids, fewer than the index's {}",
            weights.display(),
            decoder.spec.vocab_size,
            checked.index.vocab_size()
        )));
    }
    let cost = measure_step_cost(&decoder)?;
    tracing::info!(?cost, weights = %weights.display(), "draft-verify engine: step cost measured");
    let log = config
        .log
        .as_deref()
        .map(|p| {
            JsonlLog::create(p).map_err(|source| Error::Index {
                path: p.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    let ends = end_tokens(decoder.spec.eos_token_id, &checked.tokenizer);
    let settings = EngineSettings {
        max_draft: config.max_draft,
        policy: config.policy,
        max_concurrency: config.max_concurrency as usize,
        max_active: max_seqs,
    };
    let engine = DraftVerifyEngine::start(
        decoder,
        Arc::new(checked.index),
        settings,
        cost,
        ends,
        stats,
        log,
    )?;
    Ok(Engines {
        plain,
        spec: Some(SpecEngine {
            engine,
            config: config.clone(),
            tokenizer: Arc::new(checked.tokenizer),
            weights,
        }),
    })
}
