//! Building the mistral.rs engines: a plain one, and with Infinigram a stock
//! `SpeculativePipeline` (target + null drafter) beside it.
//!
//! Both engines load the same model the same way: the selected [`ModelSelected`], CPU or the
//! first CUDA device, automatic device mapping, no paged attention (mistral.rs forces it off on
//! CPU, and its speculative pipeline is fragile with it, `research/mistralrs.md` §1.5), the
//! default scheduler with `max_seqs` sequences.

use std::sync::{Arc, Mutex};

use candle_core::Device;
use infinigram_spec::spec::JsonlLog;
use infinigram_spec::{CalibratedPolicy, Index, NgramDrafterConfig, OpenOptions};
use mistralrs_core::{
    get_auto_device_map_params, get_model_dtype, DefaultSchedulerMethod, DeviceMapSetting,
    LoaderBuilder, MistralRs, MistralRsBuilder, ModelDType, ModelSelected, SchedulerConfig,
    SpeculativeConfig, SpeculativeLoader, TokenSource,
};

use crate::adapters::{write_null_drafter, CostFn, HookShared};
use crate::config::InfinigramConfig;
use crate::error::{Error, Result};
use crate::stats::SpecStats;

/// Environment variable that builds the speculative engine although mistral.rs 0.8.1's
/// `SpeculativePipeline` deadlocks (for a locally fixed mistral.rs): `force`.
pub const FORCE_ENV: &str = "CARE_SPECULATIVE_PIPELINE";

/// Token whose null-drafter logit is the signature (any id works: real logits stay small).
pub const SIGNATURE_TOKEN: u32 = 0;

/// The engines the routes dispatch to.
pub struct Engines {
    /// Plain decoding; also serves every route the server does not override.
    pub plain: Arc<MistralRs>,
    /// Speculative decoding, when an index is configured.
    pub spec: Option<SpecEngine>,
}

/// The speculative engine and what its requests' hooks share.
pub struct SpecEngine {
    pub state: Arc<MistralRs>,
    pub shared: Arc<HookShared>,
    pub config: InfinigramConfig,
    /// Holds the null drafter's checkpoint for the process lifetime.
    _null_drafter: tempfile::TempDir,
}

/// The checked Infinigram inputs: the index, opened and verified, and the tokenizer's
/// vocabulary size.
pub struct CheckedIndex {
    pub index: Index,
    pub vocab_size: usize,
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
    Ok(CheckedIndex { index, vocab_size })
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

/// A `plain` selection of the null drafter in `dir`, with the target's tokenizer.
fn null_drafter_selection(dir: &std::path::Path, tokenizer: &std::path::Path) -> ModelSelected {
    ModelSelected::Plain {
        model_id: dir.display().to_string(),
        tokenizer_json: Some(tokenizer.display().to_string()),
        arch: None,
        dtype: ModelDType::Auto,
        topology: None,
        organization: None,
        write_uqff: None,
        from_uqff: None,
        imatrix: None,
        calibration_file: None,
        max_seq_len: 4096,
        max_batch_size: 1,
        hf_cache_path: None,
        matformer_config_path: None,
        matformer_slice_name: None,
    }
}

/// Loads `loader`'s pipeline and starts an engine on it.
async fn build_engine(
    loader: Box<dyn mistralrs_core::Loader>,
    model: &ModelSelected,
    max_seqs: usize,
    no_prefix_cache: bool,
) -> Result<Arc<MistralRs>> {
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
            .with_no_prefix_cache(no_prefix_cache)
            .build()
            .await,
    )
}

/// Loads the plain engine for `model`.
pub async fn build_plain(model: &ModelSelected, max_seqs: usize) -> Result<Arc<MistralRs>> {
    let loader = LoaderBuilder::new(model.clone())
        .build()
        .map_err(Error::Engine)?;
    build_engine(loader, model, max_seqs, false).await
}

/// Loads a stock `SpeculativePipeline` of `model` and a null drafter (written into the
/// returned folder, which must outlive the engine) for a vocabulary of `vocab_size` with the
/// tokenizer at `tokenizer`; γ = `gamma`. Requests need an [`crate::adapters::InfinigramHook`]
/// (or another processor that recognizes the signature) to draft anything useful.
pub async fn build_speculative(
    model: &ModelSelected,
    max_seqs: usize,
    tokenizer: &std::path::Path,
    vocab_size: usize,
    gamma: usize,
) -> Result<(Arc<MistralRs>, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("care-null-drafter")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))?;
    write_null_drafter(dir.path(), vocab_size, SIGNATURE_TOKEN)?;
    let loader = SpeculativeLoader {
        target: LoaderBuilder::new(model.clone())
            .build()
            .map_err(Error::Engine)?,
        draft: LoaderBuilder::new(null_drafter_selection(dir.path(), tokenizer))
            .build()
            .map_err(Error::Engine)?,
        config: SpeculativeConfig { gamma },
    };
    // A prefix-cache hit restores the target's KV cache but not the draft's
    // (`pipeline/speculative.rs` clones them separately), so the speculative engine runs
    // without the prefix cache.
    let state = build_engine(Box::new(loader), model, max_seqs, true).await?;
    Ok((state, dir))
}

/// Loads the plain engine and, with `infinigram`, the speculative one.
pub async fn build_engines(
    model: &ModelSelected,
    max_seqs: usize,
    infinigram: Option<&InfinigramConfig>,
    stats: Arc<SpecStats>,
) -> Result<Engines> {
    // Check the index before the (slow) model loads.
    let checked = infinigram.map(check_index).transpose()?;
    if let Some(config) = infinigram {
        if std::env::var(FORCE_ENV).as_deref() != Ok("force") {
            return Err(Error::SpeculativePipelineUnavailable {
                index: config.index.clone(),
            });
        }
    }
    let plain = build_plain(model, max_seqs).await?;
    let (Some(config), Some(checked)) = (infinigram, checked) else {
        return Ok(Engines { plain, spec: None });
    };
    let (state, dir) = build_speculative(
        model,
        max_seqs,
        &config.tokenizer,
        checked.vocab_size,
        config.max_draft,
    )
    .await?;
    let log = config
        .log
        .as_deref()
        .map(|p| {
            JsonlLog::create(p).map_err(|source| Error::Index {
                path: p.to_path_buf(),
                source,
            })
        })
        .transpose()?
        .map(Mutex::new);
    // The cost model is irrelevant here (γ is the pipeline's); only the learned rates rank
    // candidates. A flat cost keeps `draft_len` well defined for inspection.
    let flat: CostFn = |_, _| 1.0;
    let shared = Arc::new(HookShared {
        index: Arc::new(checked.index),
        drafter_config: NgramDrafterConfig::default(),
        gamma: config.max_draft,
        signature: SIGNATURE_TOKEN,
        policy: Mutex::new(CalibratedPolicy::new(flat, config.max_draft)),
        stats,
        log,
    });
    Ok(Engines {
        plain,
        spec: Some(SpecEngine {
            state,
            shared,
            config: config.clone(),
            _null_drafter: dir,
        }),
    })
}
