//! Command line and the `[infinigram]` TOML table, resolved once into [`InfinigramConfig`].
//!
//! Flags win over the TOML table; the table is read from the file given with `--config`, or
//! from the model-selection TOML (`care-server toml -f FILE`), whose `[infinigram]` table
//! mistral.rs's own parser ignores.

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use mistralrs_core::ModelSelected;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest draft (γ) accepted on the command line or in TOML.
pub const MAX_DRAFT_LIMIT: usize = 16;
/// Default longest draft. The calibrated policy verifies only the prefix that pays, so the
/// cap matters where drafts are long and sure (a chat answer restating the prompt's code):
/// Qwen2.5-Coder-0.5B HumanEval-chat at concurrency 1 measured 1.83× / 2.03× with 12 against
/// 1.80× / 1.96× with 8 (docs/BENCHMARKS.md), the other cells unchanged; 16 requests with
/// 12-token drafts (208 rows) stay within the few-row kernel.
pub const DEFAULT_MAX_DRAFT: usize = 12;

/// `care-server`: mistral.rs's OpenAI-compatible server with Infinigram speculative decoding.
#[derive(Debug, Parser)]
#[command(name = "care-server", version)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub serve_ip: String,

    /// Port to listen on (0: any free port, printed at startup).
    #[arg(short, long, default_value_t = 1234)]
    pub port: u16,

    /// Most sequences each engine runs at once (mistral.rs's scheduler limit).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_seqs: u16,

    /// mistral.rs's prefix cache: how many finished sequences it keeps to reuse their KV
    /// cache for requests with the same prefix (0 turns it off), as mistral.rs's own server's
    /// `--prefix-cache-n`. Our engine does not use it.
    #[arg(long, default_value_t = 16)]
    pub prefix_cache_n: usize,

    /// Which engine decodes eligible requests (greedy or simply sampled, one choice, no
    /// grammar or tools): `auto` — ours when the weights are local (`gguf` file or `plain`
    /// folder), `care` — ours or fail at startup, `mistralrs` — mistral.rs for everything.
    /// Other requests always go to mistral.rs.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,

    /// Memory for our engine's paged KV cache, in MiB (allocated lazily; requests wait
    /// when it is full).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_mib: u64,

    /// TOML file with an `[infinigram]` table (keys as the flags without the `infinigram-`
    /// prefix, `_` for `-`). Flags given on the command line override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub infinigram: InfinigramArgs,

    /// The model, exactly as for mistral.rs's server (`plain`, `gguf`, `toml`, …).
    #[command(subcommand)]
    pub model: ModelSelected,
}

/// The Infinigram flags. Without `--infinigram-index` (here or in TOML) the server is plain
/// mistral.rs.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct InfinigramArgs {
    /// Infinigram index (built by `infinigram build` with the model's tokenizer). Enables
    /// speculative decoding.
    #[arg(long)]
    pub infinigram_index: Option<PathBuf>,

    /// The model's `tokenizer.json`, checked against the index's tokenizer hash. Default: the
    /// `tokenizer.json` beside the model (`plain -m DIR`, `gguf -m DIR` or `-t DIR`).
    #[arg(long)]
    pub infinigram_tokenizer: Option<PathBuf>,

    /// Longest draft per verify step (1–16); the policy may verify fewer. Default 12.
    #[arg(long, value_parser = parse_max_draft)]
    pub infinigram_max_draft: Option<usize>,

    /// How much of each draft is verified: `fixed` (the whole draft, up to the max),
    /// `max-concurrency` (the whole draft while at most `--infinigram-max-concurrency` requests
    /// are decoding, else none) or `calibrated` (learns acceptance online by match length,
    /// count, depth and source, and verifies the prefix with the most expected tokens per unit
    /// of the measured step time, down to none at large batches). Default `calibrated`.
    #[arg(long, value_enum)]
    pub infinigram_policy: Option<PolicyKind>,

    /// Active requests up to which `max-concurrency` drafts. Default 4.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub infinigram_max_concurrency: Option<u32>,

    /// Write every drafted token (features and outcome) as one JSON line to this file.
    #[arg(long)]
    pub infinigram_log: Option<PathBuf>,
}

fn parse_max_draft(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if (1..=MAX_DRAFT_LIMIT).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be between 1 and {MAX_DRAFT_LIMIT}, got {n}"))
    }
}

pub use infinigram_spec::spec::PolicyKind;

/// `--engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineChoice {
    Auto,
    Care,
    Mistralrs,
}

/// The `[infinigram]` TOML table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfinigramToml {
    pub index: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub max_draft: Option<usize>,
    pub policy: Option<PolicyKind>,
    pub max_concurrency: Option<u32>,
    pub log: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct TomlFile {
    infinigram: Option<InfinigramToml>,
}

/// The resolved Infinigram settings.
#[derive(Debug, Clone, Serialize)]
pub struct InfinigramConfig {
    pub index: PathBuf,
    pub tokenizer: PathBuf,
    pub max_draft: usize,
    pub policy: PolicyKind,
    pub max_concurrency: u32,
    pub log: Option<PathBuf>,
}

/// Reads the `[infinigram]` table of a TOML file (`None` when the file has none).
pub fn read_toml_table(path: &Path) -> Result<Option<InfinigramToml>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let file: TomlFile = toml::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(file.infinigram)
}

/// The `tokenizer.json` beside the selected model, if the selection names a local folder.
fn tokenizer_beside_model(model: &ModelSelected) -> Option<PathBuf> {
    let dir = match model {
        ModelSelected::Plain {
            tokenizer_json: Some(t),
            ..
        } => return Some(PathBuf::from(t)),
        ModelSelected::Plain { model_id, .. } => model_id.clone(),
        ModelSelected::GGUF {
            tok_model_id: Some(t),
            ..
        } => t.clone(),
        ModelSelected::GGUF {
            quantized_model_id, ..
        } => quantized_model_id.clone(),
        _ => return None,
    };
    let path = Path::new(&dir).join("tokenizer.json");
    path.is_file().then_some(path)
}

impl Args {
    /// The Infinigram settings, or `None` when no index is configured.
    pub fn resolve_infinigram(&self) -> Result<Option<InfinigramConfig>> {
        let toml_path = match (&self.config, &self.model) {
            (Some(p), _) => Some(PathBuf::from(p)),
            (None, ModelSelected::Toml { file }) => Some(PathBuf::from(file)),
            _ => None,
        };
        let table = match &toml_path {
            Some(p) => read_toml_table(p)?.unwrap_or_default(),
            None => InfinigramToml::default(),
        };
        resolve(&self.infinigram, table, &self.model)
    }
}

/// Merges flags over the TOML table and checks the values.
pub fn resolve(
    flags: &InfinigramArgs,
    table: InfinigramToml,
    model: &ModelSelected,
) -> Result<Option<InfinigramConfig>> {
    let Some(index) = flags.infinigram_index.clone().or(table.index) else {
        return Ok(None);
    };
    let max_draft = flags
        .infinigram_max_draft
        .or(table.max_draft)
        .unwrap_or(DEFAULT_MAX_DRAFT);
    if !(1..=MAX_DRAFT_LIMIT).contains(&max_draft) {
        return Err(Error::InvalidSetting(format!(
            "infinigram max_draft must be between 1 and {MAX_DRAFT_LIMIT}, got {max_draft}"
        )));
    }
    let max_concurrency = flags
        .infinigram_max_concurrency
        .or(table.max_concurrency)
        .unwrap_or(4);
    if max_concurrency == 0 {
        return Err(Error::InvalidSetting(
            "infinigram max_concurrency must be at least 1".into(),
        ));
    }
    let tokenizer = flags
        .infinigram_tokenizer
        .clone()
        .or(table.tokenizer)
        .or_else(|| tokenizer_beside_model(model))
        .ok_or_else(|| {
            Error::InvalidSetting(
                "no tokenizer.json found beside the model: pass --infinigram-tokenizer".into(),
            )
        })?;
    Ok(Some(InfinigramConfig {
        index,
        tokenizer,
        max_draft,
        policy: flags
            .infinigram_policy
            .or(table.policy)
            .unwrap_or(PolicyKind::Calibrated),
        max_concurrency,
        log: flags.infinigram_log.clone().or(table.log),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Args, clap::Error> {
        Args::try_parse_from(args)
    }

    const GGUF: [&str; 5] = ["gguf", "-m", "/models/x", "-f", "model.gguf"];

    #[test]
    fn flags_parse_and_invalid_values_are_rejected() {
        let mut ok = vec!["care-server", "--infinigram-index", "i.igs"];
        ok.extend([
            "--infinigram-max-draft",
            "4",
            "--infinigram-policy",
            "fixed",
        ]);
        ok.extend(GGUF);
        let a = parse(&ok).unwrap();
        assert_eq!(a.infinigram.infinigram_max_draft, Some(4));
        assert_eq!(a.infinigram.infinigram_policy, Some(PolicyKind::Fixed));
        for bad in [
            ["--infinigram-max-draft", "0"],
            ["--infinigram-max-draft", "17"],
            ["--infinigram-max-draft", "x"],
            ["--infinigram-policy", "sometimes"],
            ["--infinigram-max-concurrency", "0"],
        ] {
            let mut v = vec!["care-server"];
            v.extend(bad);
            v.extend(GGUF);
            assert!(parse(&v).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn toml_table_and_flag_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(&tok, "{}").unwrap();
        let file = dir.path().join("serve.toml");
        std::fs::write(
            &file,
            "[model]\nmodel_id = \"x\"\n[infinigram]\nindex = \"a.igs\"\nmax_draft = 5\npolicy = \"max-concurrency\"\n",
        )
        .unwrap();
        let table = read_toml_table(&file).unwrap().unwrap();
        let model = ModelSelected::Toml {
            file: file.display().to_string(),
        };
        let flags = InfinigramArgs {
            infinigram_max_draft: Some(2),
            infinigram_tokenizer: Some(tok.clone()),
            ..Default::default()
        };
        let c = resolve(&flags, table, &model).unwrap().unwrap();
        assert_eq!(c.index, PathBuf::from("a.igs"));
        assert_eq!(c.max_draft, 2, "the flag wins");
        assert_eq!(c.policy, PolicyKind::MaxConcurrency);
        // Unknown keys and bad values in the table are errors.
        std::fs::write(&file, "[infinigram]\nindx = \"a\"\n").unwrap();
        assert!(read_toml_table(&file).is_err());
        std::fs::write(&file, "[infinigram]\nindex = \"a\"\nmax_draft = 40\n").unwrap();
        let table = read_toml_table(&file).unwrap().unwrap();
        let flags = InfinigramArgs {
            infinigram_tokenizer: Some(tok),
            ..Default::default()
        };
        assert!(resolve(&flags, table, &model).is_err());
        // No index anywhere: plain serving.
        let none = resolve(
            &InfinigramArgs::default(),
            InfinigramToml::default(),
            &model,
        );
        assert!(none.unwrap().is_none());
    }
}
