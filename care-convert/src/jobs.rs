//! The conversions as jobs: what `care-convert mla` and `care-convert convert` do, as values
//! that the CLI, tests, benches and examples build and run the same way (open → calibrate →
//! factorize → assemble → write), instead of each rebuilding the pipeline.
//!
//! A job's [`convert`](StockJob::convert) keeps the result in memory (tests install it into a
//! decoder); [`write`](StockJob::write) exports it atomically with its provenance.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::calibrate::{collect_all, sample_windows, CalibrationOptions};
use crate::convert::{
    convert_one_pass, convert_sequential, ConversionSummary, ConvertMethod, ConvertOptions,
    LayerFactors,
};
use crate::error::{Error, Result};
use crate::eval::run::Progress;
use crate::export::deepseek::{write_deepseek_v2, SaveDtype, StockProvenance, TokenizerFiles};
use crate::export::{sha256_path, write_oneshot, CalibrationRecord, Provenance};
use crate::factorize::InputStats;
use crate::stock::{
    convert_stock, LatentBasis, LatentNorm, RopeSplitOptions, StockModel, StockOptions,
};
use mla_attention::config::ModelSpec;
use mla_attention::io::{tokenizer, Checkpoint};
use mla_attention::load::{load_decoder, load_decoder_weights};
use mla_attention::model::Decoder;

/// Where the calibration activations come from.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Text files, tokenized with the source's tokenizer. Empty: ExLlamaV2's c4, wiki and
    /// code samples from the asset cache.
    pub texts: Vec<PathBuf>,
    /// Windows drawn.
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the window offsets.
    pub seed: u64,
    /// Relative damping δ of the covariances: C + δ·mean(diag C)·I.
    pub damping: f64,
}

impl Default for Calibration {
    /// The paper's setting: 256 windows of 32 tokens.
    fn default() -> Self {
        Calibration {
            texts: Vec::new(),
            samples: 256,
            seq_len: 32,
            seed: 42,
            damping: crate::factorize::DEFAULT_DAMPING,
        }
    }
}

impl Calibration {
    /// The text files read (the defaults when none were named).
    pub fn files(&self) -> Vec<PathBuf> {
        if self.texts.is_empty() {
            let d = mla_attention::io::asset_cache_dir().join("data/exllamav2-cal");
            vec![d.join("c4.utf8"), d.join("wiki.utf8"), d.join("code.utf8")]
        } else {
            self.texts.clone()
        }
    }

    /// The tokenized windows.
    pub fn windows(&self, tok: &tokenizers::Tokenizer) -> Result<Vec<Vec<u32>>> {
        let mut ids = Vec::new();
        for f in self.files() {
            let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
            ids.extend(tokenizer::encode(tok, &text)?);
        }
        let opts = CalibrationOptions {
            samples: self.samples,
            seq_len: self.seq_len,
            seed: self.seed,
        };
        sample_windows(&ids, &opts)
    }

    fn record(&self, windows: usize, sequential: bool) -> CalibrationRecord {
        CalibrationRecord {
            sources: self
                .files()
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            samples: self.samples,
            seq_len: self.seq_len,
            seed: self.seed,
            tokens: (windows * self.seq_len) as u64,
            sequential,
        }
    }
}

/// The source checkpoint and its decoder.
fn open(model: &Path) -> Result<(Checkpoint, Decoder)> {
    let checkpoint = Checkpoint::open(model)?;
    let original = load_decoder(&checkpoint)?;
    Ok((checkpoint, original))
}

/// Calibration windows and the statistics of every layer's input.
struct Calibrated {
    windows: Vec<Vec<u32>>,
    stats: Vec<InputStats>,
    seconds: f64,
}

fn calibrate(
    checkpoint: &Checkpoint,
    original: &Decoder,
    c: &Calibration,
    progress: &mut dyn Progress,
) -> Result<Calibrated> {
    let windows = c.windows(checkpoint.tokenizer()?)?;
    let t = Instant::now();
    progress.start("calibrate", windows.len());
    let stats = collect_all(original, &windows, &mut |d, _| progress.set(d))?;
    progress.finish();
    Ok(Calibrated {
        windows,
        stats,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// `out` must not exist yet (checked before the slow work as well as at write time).
pub fn check_new_output(out: &Path) -> Result<()> {
    if out.exists() {
        return Err(Error::InvalidOption(format!(
            "{} already exists; choose another output or remove it",
            out.display()
        )));
    }
    Ok(())
}

/// The shape of a stock DeepSeek-V2 conversion as a user states it; resolved against the
/// source by [`StockLayout::options`].
#[derive(Debug, Clone)]
pub struct StockLayout {
    /// Cached latent width per layer (`kv_lora_rank`); `None`: from `kv_keep`.
    pub kv_lora_rank: Option<usize>,
    /// Fraction of the original per-token KV values kept, in (0, 1] (default 0.5).
    pub kv_keep: Option<f64>,
    /// Real latent rank (default: all that fit).
    pub rank: Option<usize>,
    /// Width of the shared RoPE key (default: head_dim / 2).
    pub rope_dim: Option<usize>,
    /// Adjacent frequencies per RoRoPE PCA block (default: the smallest legal value).
    pub freqfold: Option<usize>,
    /// RoRoPE (PCA across heads) rather than MHA2MLA-style partial RoPE.
    pub rorope: bool,
    pub basis: LatentBasis,
    /// K/V norm balancing before the joint factorization.
    pub balance: bool,
    pub latent_norm: LatentNorm,
    /// Zero-pad values to the query head width (what mistral.rs's CPU attention needs).
    pub pad_v: bool,
}

impl Default for StockLayout {
    fn default() -> Self {
        StockLayout {
            kv_lora_rank: None,
            kv_keep: None,
            rank: None,
            rope_dim: None,
            freqfold: None,
            rorope: true,
            basis: LatentBasis::default(),
            balance: true,
            latent_norm: LatentNorm::default(),
            pad_v: true,
        }
    }
}

impl StockLayout {
    /// The conversion options for a source with `spec`, checked.
    pub fn options(&self, spec: &ModelSpec, damping: f64) -> Result<StockOptions> {
        let d = spec.head_dim;
        let rope_dim = self.rope_dim.unwrap_or(d / 2);
        let fold_min = if rope_dim > 0
            && rope_dim <= d
            && rope_dim.is_multiple_of(2)
            && (d / 2).is_multiple_of(rope_dim / 2)
        {
            (d / 2) / (rope_dim / 2)
        } else {
            1
        };
        let kv_lora_rank = match self.kv_lora_rank {
            Some(n) => n,
            None => {
                let keep = self.kv_keep.unwrap_or(0.5);
                if !(keep > 0.0 && keep <= 1.0) {
                    return Err(Error::InvalidOption(format!(
                        "--kv-keep {keep} must be in (0, 1] (the fraction of KV values kept)"
                    )));
                }
                let values = (keep * (2 * spec.num_kv_heads * d) as f64).round() as usize;
                if values <= rope_dim + 1 {
                    return Err(Error::InvalidOption(format!(
                        "--kv-keep {keep} keeps {values} values per token, not more than the \
                         RoPE key ({rope_dim}) plus one latent dim"
                    )));
                }
                values - rope_dim
            }
        };
        let opts = StockOptions {
            kv_lora_rank,
            rank: self.rank,
            rope: RopeSplitOptions {
                rope_dim,
                freqfold: self.freqfold.unwrap_or(fold_min),
                pca: self.rorope,
            },
            basis: self.basis,
            balance: self.balance,
            latent_norm: self.latent_norm,
            pad_v: self.pad_v,
            damping,
        };
        crate::stock::check(spec, &opts)?;
        Ok(opts)
    }
}

/// `care-convert mla`: a Llama / Qwen2 source into a stock DeepSeek-V2 MLA checkpoint.
#[derive(Debug, Clone)]
pub struct StockJob {
    /// A `.gguf` file or a Hugging Face directory.
    pub model: PathBuf,
    pub layout: StockLayout,
    pub calibration: Calibration,
    /// Weight dtype of the written safetensors.
    pub dtype: SaveDtype,
}

/// A finished stock conversion, in memory.
pub struct StockConversion {
    pub checkpoint: Checkpoint,
    /// The source as loaded (for comparisons).
    pub original: Decoder,
    pub stock: StockModel,
    pub calibration: CalibrationRecord,
    pub calibration_seconds: f64,
}

impl StockJob {
    /// Calibrate and convert (progress stages: `calibrate`, `convert`).
    pub fn convert(&self, progress: &mut dyn Progress) -> Result<StockConversion> {
        let (checkpoint, original) = open(&self.model)?;
        self.convert_loaded(checkpoint, original, progress)
    }

    /// [`convert`](Self::convert) of `self.model` already opened as `checkpoint` and loaded
    /// as `original` — which may have been read differently (a test gives the source
    /// another RoPE scaling or fewer layers); `original.spec` is what gets converted and
    /// written.
    pub fn convert_loaded(
        &self,
        checkpoint: Checkpoint,
        original: Decoder,
        progress: &mut dyn Progress,
    ) -> Result<StockConversion> {
        let opts = self
            .layout
            .options(&original.spec, self.calibration.damping)?;
        let c = calibrate(&checkpoint, &original, &self.calibration, progress)?;
        progress.start("convert", original.spec.num_layers);
        let stock = convert_stock(
            &original.spec,
            checkpoint.weights.as_ref(),
            &c.stats,
            &opts,
            &mut |d, _| progress.set(d),
        )?;
        progress.finish();
        Ok(StockConversion {
            calibration: self.calibration.record(c.windows.len(), false),
            checkpoint,
            original,
            stock,
            calibration_seconds: c.seconds,
        })
    }

    /// Write `conv` to `out` (must not exist; written atomically) with its provenance,
    /// the source's tokenizer and chat template.
    pub fn write(&self, conv: &StockConversion, out: &Path) -> Result<()> {
        check_new_output(out)?;
        let prov = StockProvenance {
            format: "care-deepseek-v2",
            format_version: 1,
            source_model: self.model.display().to_string(),
            source_sha256: sha256_path(&self.model)?,
            conversion: conv.stock.summary.clone(),
            calibration: conv.calibration.clone(),
            tool: format!("care-convert {}", env!("CARGO_PKG_VERSION")),
        };
        write_deepseek_v2(
            out,
            &conv.original.spec,
            conv.checkpoint.weights.as_ref(),
            &conv.stock,
            &tokenizer_files(&conv.checkpoint, &self.model)?,
            &prov,
            self.dtype,
        )
    }
}

/// Tokenizer, chat template and special tokens for a converted checkpoint's directory.
pub fn tokenizer_files(ckpt: &Checkpoint, source: &Path) -> Result<TokenizerFiles> {
    let tok = ckpt.tokenizer.clone();
    let name = |id: Option<u32>| id.and_then(|i| tok.as_ref().and_then(|t| t.id_to_token(i)));
    let mut files = TokenizerFiles {
        bos_token: name(ckpt.spec.bos_token_id),
        eos_token: name(ckpt.spec.eos_token_id),
        add_bos_token: ckpt.add_bos,
        tokenizer: tok.clone(),
        chat_template: None,
    };
    if source.is_file() {
        let g = mla_attention::io::gguf::GgufFile::open(source)?;
        files.chat_template = g
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
    } else if let Ok(text) = std::fs::read_to_string(source.join("tokenizer_config.json")) {
        let path = source.join("tokenizer_config.json");
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadData {
            path,
            reason: e.to_string(),
        })?;
        files.chat_template = v["chat_template"].as_str().map(str::to_string);
    }
    Ok(files)
}

/// `care-convert convert`: the one-shot low-rank form (a Llama / Qwen2 checkpoint with
/// latent factors beside the original weights).
#[derive(Debug, Clone)]
pub struct OneShotJob {
    /// A `.gguf` file or a Hugging Face directory.
    pub model: PathBuf,
    pub method: ConvertMethod,
    /// Fraction of the original per-layer K and V width kept as latent rank, in (0, 1].
    pub kv_keep: f64,
    pub calibration: Calibration,
    /// Calibrate layer l on the outputs of the already-converted layers 0..l-1.
    pub sequential: bool,
}

/// A finished one-shot conversion, in memory: `model` has the converted attention
/// installed.
pub struct OneShotConversion {
    pub checkpoint: Checkpoint,
    pub model: Decoder,
    pub factors: Vec<LayerFactors>,
    pub summary: ConversionSummary,
    pub calibration: CalibrationRecord,
    pub calibration_seconds: f64,
}

impl OneShotJob {
    /// Calibrate and factorize (progress stages: `calibrate`, `factorize`).
    pub fn convert(&self, progress: &mut dyn Progress) -> Result<OneShotConversion> {
        self.check()?;
        let (checkpoint, model) = open(&self.model)?;
        self.convert_loaded(checkpoint, model, progress)
    }

    fn check(&self) -> Result<()> {
        if !(self.kv_keep > 0.0 && self.kv_keep <= 1.0) {
            return Err(Error::InvalidOption(format!(
                "--kv-keep {} must be in (0, 1] (the fraction of the K/V width kept)",
                self.kv_keep
            )));
        }
        Ok(())
    }

    /// [`convert`](Self::convert) of `self.model` already opened as `checkpoint` and loaded
    /// as `model` (which may have been read differently, e.g. with fewer layers for a
    /// test); `model.spec` is what gets converted and written.
    pub fn convert_loaded(
        &self,
        checkpoint: Checkpoint,
        mut model: Decoder,
        progress: &mut dyn Progress,
    ) -> Result<OneShotConversion> {
        self.check()?;
        let c = calibrate(&checkpoint, &model, &self.calibration, progress)?;
        let opts = ConvertOptions {
            method: self.method,
            kv_keep: self.kv_keep,
            damping: self.calibration.damping,
            ..Default::default()
        };
        let w = checkpoint.weights.as_ref();
        progress.start("factorize", model.spec.num_layers);
        let mut cb = |d: usize, _: usize| progress.set(d);
        let (factors, summary) = if self.sequential {
            // Ranks from one-pass spectra, then layer-by-layer statistics on converted
            // prefixes.
            let (_, planned) = convert_one_pass(&mut model, w, &c.stats, &opts, &mut |_, _| {})?;
            let mut fresh = load_decoder_weights(&model.spec, checkpoint.weights.as_ref())?;
            let r = convert_sequential(&mut fresh, w, &c.windows, &planned.plan, &opts, &mut cb)?;
            model = fresh;
            r
        } else {
            convert_one_pass(&mut model, w, &c.stats, &opts, &mut cb)?
        };
        progress.finish();
        Ok(OneShotConversion {
            calibration: self.calibration.record(c.windows.len(), self.sequential),
            checkpoint,
            model,
            factors,
            summary,
            calibration_seconds: c.seconds,
        })
    }

    /// Write `conv` to `out` (must not exist; written atomically) with its provenance.
    pub fn write(&self, conv: &OneShotConversion, out: &Path) -> Result<()> {
        check_new_output(out)?;
        let prov = Provenance {
            format: "care-oneshot",
            format_version: 1,
            source_model: self.model.display().to_string(),
            source_sha256: sha256_path(&self.model)?,
            conversion: conv.summary.clone(),
            calibration: conv.calibration.clone(),
            tool: format!("care-convert {}", env!("CARGO_PKG_VERSION")),
        };
        write_oneshot(
            out,
            &conv.model.spec,
            conv.checkpoint.weights.as_ref(),
            &conv.factors,
            conv.checkpoint.tokenizer.as_ref(),
            &prov,
        )
    }
}
