//! Building the engines: mistral.rs's own engine, and our [`Engine`] beside it.
//!
//! mistral.rs loads the selected [`ModelSelected`] exactly as `mistralrs serve` does (CPU or
//! the first CUDA device, automatic device mapping, default scheduler with `max_seqs`
//! sequences) and serves every route. Our engine loads the same weights (the `gguf` file or
//! the `plain` folder of the selection) into a paged model — original GQA or converted MLA —
//! and decodes every eligible request, with Infinigram drafting when an index is given.
//! mistral.rs 0.8.1 offers no working way to verify several positions against a kept KV
//! cache (its `SpeculativePipeline` deadlocks; `docs/SERVING.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use infinigram_spec::spec::{
    BatchPolicy, BatchPolicySettings, JsonlLog, NgramDrafterConfig, PolicyKind, SpecStats,
};
use infinigram_spec::{Index, OpenOptions};
use mistralrs_core::{
    get_auto_device_map_params, get_model_dtype, DefaultSchedulerMethod, DeviceMapSetting,
    LoaderBuilder, MistralRs, MistralRsBuilder, ModelSelected, SchedulerConfig, TokenSource,
};
use mla_attention::engine::{measure_step_cost, Drafting, Engine, EngineConfig};
use mla_attention::io::Checkpoint;
use mla_attention::runner::{CpuPagedModel, PagedModel, RunnerConfig};

use crate::config::{EngineChoice, InfinigramConfig};
use crate::error::{Error, Result};
use crate::worker::EngineHandle;

/// Tokens per block of the paged cache.
pub const BLOCK_SIZE: usize = 16;

/// The engines the routes dispatch to.
pub struct Engines {
    /// mistral.rs: every route, and every request our engine does not take.
    pub plain: Arc<MistralRs>,
    /// Our engine, when the weights are local (and not turned off).
    pub care: Option<CareEngine>,
}

/// Our engine and what the routes need beside it.
pub struct CareEngine {
    pub engine: EngineHandle,
    /// Drafting settings, when an index is configured.
    pub infinigram: Option<InfinigramConfig>,
    /// The weights the engine loaded.
    pub weights: PathBuf,
    /// Bytes one cached token costs (`Σ_l width_l · 4`).
    pub kv_bytes_per_token: usize,
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
    let tokenizer_error = |source| Error::Index {
        path: config.tokenizer.clone(),
        source,
    };
    let recorded = index.tokenizer_hash();
    if let Some(given) = infinigram_spec::build::tokenizer_mismatch(&recorded, &config.tokenizer)
        .map_err(tokenizer_error)?
    {
        return Err(Error::TokenizerMismatch {
            index: config.index.clone(),
            tokenizer: config.tokenizer.clone(),
            index_hash: hex(&recorded),
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
pub async fn build_plain(
    model: &ModelSelected,
    max_seqs: usize,
    prefix_cache_n: usize,
) -> Result<Arc<MistralRs>> {
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
            .with_prefix_cache_n(prefix_cache_n)
            .with_no_prefix_cache(prefix_cache_n == 0)
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

/// End-of-turn markers that mistral.rs 0.8.1 adds to a model's stop tokens when the
/// vocabulary has them and the chat template uses them (its `SUPPORTED_ALTERNATE_EOS`).
const ALTERNATE_EOS: &[&str] = &[
    "<|im_end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<|end|>",
    "<|eot_id|>",
    "<|message|>",
    "<|start|>",
    "<|channel|>",
];

/// Tokens that end a request, by mistral.rs 0.8.1's rule so that both engines stop at the
/// same token: the tokenizer's EOS (`tokenizer_config.json`'s `eos_token`, or the GGUF's
/// EOS id), the [`ALTERNATE_EOS`] markers the vocabulary has and the chat template uses,
/// and `generation_config.json`'s `eos_token_id`s. A token outside this set (Qwen's
/// `<|endoftext|>` in a completion, say) is generated like any other, as mistral.rs does.
fn end_tokens(weights: &Path, ckpt: &Checkpoint, tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let read_json = |name: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(weights.join(name)).ok()?;
        serde_json::from_str(&text).ok()
    };
    let mut ids: Vec<u32> = Vec::new();
    let mut push = |id: Option<u32>| {
        if let Some(id) = id {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    };
    let template: Option<String> = if weights.is_dir() {
        let config = read_json("tokenizer_config.json");
        let eos = config.as_ref().and_then(|c| match &c["eos_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_string),
        });
        push(eos.and_then(|t| tokenizer.token_to_id(&t)));
        config.as_ref().and_then(|c| match &c["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => Some(
                named
                    .iter()
                    .filter_map(|t| t["template"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            _ => std::fs::read_to_string(weights.join("chat_template.jinja")).ok(),
        })
    } else {
        push(ckpt.spec.eos_token_id);
        mla_attention::io::gguf::GgufFile::open(weights)
            .ok()
            .and_then(|g| {
                g.get("tokenizer.chat_template")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            })
    };
    for alternate in ALTERNATE_EOS {
        if template.as_deref().is_some_and(|t| t.contains(alternate)) {
            push(tokenizer.token_to_id(alternate));
        }
    }
    if weights.is_dir() {
        if let Some(g) = read_json("generation_config.json") {
            match &g["eos_token_id"] {
                serde_json::Value::Array(list) => {
                    list.iter().for_each(|v| push(v.as_u64().map(|i| i as u32)))
                }
                v => push(v.as_u64().map(|i| i as u32)),
            }
        }
    }
    if ids.is_empty() {
        // No tokenizer config at all: the checkpoint's own EOS.
        ids.extend(ckpt.spec.eos_token_id);
    }
    ids
}

/// What [`build_engines`] needs beyond the model selection.
pub struct EngineOptions<'a> {
    pub max_seqs: usize,
    /// mistral.rs's prefix cache size (0: off).
    pub prefix_cache_n: usize,
    pub infinigram: Option<&'a InfinigramConfig>,
    pub engine: EngineChoice,
    /// Memory for the paged cache.
    pub kv_cache_mib: usize,
    pub stats: Arc<SpecStats>,
}

/// Loads mistral.rs's engine and ours.
pub async fn build_engines(model: &ModelSelected, opts: EngineOptions<'_>) -> Result<Engines> {
    // Check the index and the weights before the (slow) model loads.
    let checked = opts.infinigram.map(check_index).transpose()?;
    let weights = match (opts.engine, opts.infinigram) {
        (EngineChoice::Mistralrs, Some(_)) => {
            return Err(Error::InvalidSetting(
                "--engine mistralrs cannot draft: drop --infinigram-index or use --engine care"
                    .into(),
            ))
        }
        (EngineChoice::Mistralrs, None) => None,
        (_, Some(_)) | (EngineChoice::Care, None) => Some(weights_path(model)?),
        (EngineChoice::Auto, None) => match weights_path(model) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::info!("our engine is off ({e}); mistral.rs serves every request");
                None
            }
        },
    };
    let plain = build_plain(model, opts.max_seqs, opts.prefix_cache_n).await?;
    let Some(weights) = weights else {
        return Ok(Engines { plain, care: None });
    };
    let target = |e: mla_attention::Error| Error::Target(e.to_string());
    let ckpt = Checkpoint::open(&weights).map_err(target)?;
    let tokenizer = match &checked {
        Some(c) => c.tokenizer.clone(),
        None => ckpt.tokenizer().map_err(target)?.clone(),
    };
    if let Some(c) = &checked {
        if ckpt.spec.vocab_size < c.index.vocab_size() as usize {
            return Err(Error::Target(format!(
                "{} has {} ids, fewer than the index's {}",
                weights.display(),
                ckpt.spec.vocab_size,
                c.index.vocab_size()
            )));
        }
    }
    let probe = CpuPagedModel::<f32>::load(
        &ckpt.spec,
        ckpt.weights.as_ref(),
        RunnerConfig {
            block_size: BLOCK_SIZE,
            num_blocks: 1,
        },
    )
    .map_err(target)?;
    let per_block = probe.bytes_per_token() * BLOCK_SIZE;
    drop(probe);
    let num_blocks = (opts.kv_cache_mib << 20) / per_block.max(1);
    if num_blocks < 16 {
        return Err(Error::InvalidSetting(format!(
            "--kv-cache-mib {} holds {num_blocks} blocks of {BLOCK_SIZE} tokens \
             ({per_block} bytes each); give at least {} MiB",
            opts.kv_cache_mib,
            (16 * per_block).div_ceil(1 << 20)
        )));
    }
    let mut model = CpuPagedModel::<f32>::load(
        &ckpt.spec,
        ckpt.weights.as_ref(),
        RunnerConfig {
            block_size: BLOCK_SIZE,
            num_blocks,
        },
    )
    .map_err(target)?;
    let kv_bytes_per_token = model.bytes_per_token();
    tracing::info!(
        weights = %weights.display(),
        kv_bytes_per_token,
        cache_tokens = num_blocks * BLOCK_SIZE,
        "engine: paged model loaded"
    );
    let ends = end_tokens(&weights, &ckpt, &tokenizer);
    tracing::info!(?ends, "engine: end tokens (mistral.rs's rule)");
    let drafting = match (opts.infinigram, checked) {
        (Some(config), Some(checked)) => {
            let cost = if config.policy == PolicyKind::Calibrated {
                let c = measure_step_cost(&mut model).map_err(target)?;
                tracing::info!(cost = ?c, "engine: step cost measured");
                Some(c)
            } else {
                None
            };
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
            let policy = BatchPolicy::new(
                BatchPolicySettings {
                    max_draft: config.max_draft,
                    kind: config.policy,
                    max_concurrency: config.max_concurrency as usize,
                },
                cost.unwrap_or(infinigram_spec::spec::StepCost {
                    passes: [1.0; infinigram_spec::spec::STEP_COST_ROWS.len()],
                    per_sequence: 0.0,
                }),
            );
            Some((
                Drafting {
                    index: Arc::new(checked.index),
                    drafter: NgramDrafterConfig::default(),
                    policy,
                    stats: Arc::clone(&opts.stats),
                    log: log.map(|l| Box::new(l) as Box<_>),
                },
                cost,
            ))
        }
        _ => None,
    };
    let mut engine = Engine::new(
        model,
        EngineConfig {
            max_active: opts.max_seqs,
        },
    )
    .with_end_tokens(ends)
    .with_tokenizer(Arc::new(tokenizer))
    .keep_finished(false);
    if let Some((d, cost)) = drafting {
        engine = engine.with_drafting(d, cost);
    }
    let handle = EngineHandle::start(engine).map_err(|e| Error::Engine(e.into()))?;
    Ok(Engines {
        plain,
        care: Some(CareEngine {
            engine: handle,
            infinigram: opts.infinigram.cloned(),
            weights,
            kv_bytes_per_token,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-Coder's files as shipped: only `<|im_end|>` ends a request, as in mistral.rs;
    /// `<|endoftext|>`, which completions do produce, is generated through.
    #[test]
    fn end_tokens_follow_mistralrs_rule() {
        let src = test_support::asset("models/qwen2.5-coder-0.5b-instruct/model.gguf");
        let ckpt = Checkpoint::open(&src).unwrap();
        let tok = ckpt.tokenizer().unwrap().clone();
        let (im_end, eot) = (
            tok.token_to_id("<|im_end|>").unwrap(),
            tok.token_to_id("<|endoftext|>").unwrap(),
        );
        // The GGUF: its EOS id and the markers its chat template uses.
        let gguf = end_tokens(&src, &ckpt, &tok);
        assert!(gguf.contains(&im_end), "{gguf:?}");
        assert!(!gguf.contains(&eot), "{gguf:?}");

        // A Hugging Face folder: tokenizer_config.json's eos_token, the template's markers,
        // generation_config.json's ids (a list here, with <|endoftext|> added on purpose).
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, v: serde_json::Value| {
            std::fs::write(dir.path().join(name), v.to_string()).unwrap()
        };
        write(
            "tokenizer_config.json",
            serde_json::json!({"eos_token": "<|im_end|>", "chat_template": "{{ '<|im_start|>' }}"}),
        );
        assert_eq!(end_tokens(dir.path(), &ckpt, &tok), vec![im_end]);
        write(
            "generation_config.json",
            serde_json::json!({"eos_token_id": [im_end, eot]}),
        );
        assert_eq!(end_tokens(dir.path(), &ckpt, &tok), vec![im_end, eot]);
        // A template that uses <|eot_id|> adds it only where the vocabulary has it.
        write(
            "tokenizer_config.json",
            serde_json::json!({"eos_token": {"content": "<|im_end|>"}, "chat_template": "<|eot_id|><|im_end|>"}),
        );
        assert_eq!(end_tokens(dir.path(), &ckpt, &tok), vec![im_end, eot]);
    }
}
