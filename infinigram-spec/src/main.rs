//! `infinigram`: build, query and inspect suffix-array n-gram indexes.
//!
//! Exit codes: 0 success, 2 error. Results go to stdout (text or `--json`), progress and
//! logs to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use infinigram_spec::build::{collect_files, TextCorpus, TokenStream};
use infinigram_spec::{
    BuildConfig, BuildProgress, ChainOptions, Index, IndexBuilder, NtdOptions, OpenOptions,
    TrieOptions,
};
use serde_json::json;
use tokenizers::Tokenizer;

#[derive(Parser)]
#[command(
    name = "infinigram",
    version,
    about = "Suffix-array n-gram index: build, query, stats"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an index from text files (tokenized on the fly) or pre-tokenized streams.
    Build(BuildArgs),
    /// Query an index.
    Query(QueryArgs),
    /// Print an index's header and shard table.
    Stats(StatsArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum InputFormat {
    /// Text files, one document per file (`.jsonl`: one per line, field "text").
    Text,
    /// Little-endian u32 token ids, each document followed by 0xFFFFFFFF.
    Tokens,
}

#[derive(Args)]
struct BuildArgs {
    /// Files or folders (walked recursively, links followed).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Index file to write (atomically: temporary file, then rename).
    #[arg(short, long)]
    output: PathBuf,
    /// How to read the inputs.
    #[arg(long, value_enum, default_value = "text")]
    input_format: InputFormat,
    /// tokenizer.json for text inputs; its SHA-256 is recorded in the index.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Number of token ids (default for text: the tokenizer's, added tokens included).
    #[arg(long)]
    vocab_size: Option<u32>,
    /// Only files whose names end with one of these (repeatable; e.g. `.py`). Default: all.
    #[arg(long = "extension")]
    extensions: Vec<String>,
    /// Most token slots per shard (tokens + one per document). Peak memory is about
    /// jobs × shard-tokens × 6 bytes (vocabularies below 65 535) or × 8 bytes.
    #[arg(long, default_value_t = 1 << 30)]
    shard_tokens: u64,
    /// Shards built at once (default: number of cores).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Op {
    /// Occurrences of the tokens.
    Count,
    /// Next-token distribution after the tokens.
    Ntd,
    /// Longest suffix of the tokens that occurs (∞-gram), with its NTD.
    Longest,
    /// Most likely continuation chain after the longest match.
    Chain,
    /// Best-first continuation trie after the longest match.
    Trie,
    /// Occurrences with document ids.
    Docs,
}

#[derive(Args)]
struct QueryArgs {
    /// Index file.
    #[arg(short, long)]
    index: PathBuf,
    /// What to compute.
    #[arg(long, value_enum, default_value = "count")]
    op: Op,
    /// Query as comma-separated token ids.
    #[arg(long, conflicts_with = "text")]
    tokens: Option<String>,
    /// Query as text (needs --tokenizer).
    #[arg(long)]
    text: Option<String>,
    /// tokenizer.json, to tokenize --text and to show token strings.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Most next tokens shown (ntd, longest).
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Occurrences inspected per shard for distributions; 0 = all (exact).
    #[arg(long, default_value_t = 1000)]
    max_support: u64,
    /// Chain length / trie depth in tokens.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Trie node budget.
    #[arg(long, default_value_t = 32)]
    max_nodes: usize,
    /// Most occurrences listed (docs).
    #[arg(long, default_value_t = 10)]
    limit: usize,
    /// Check all checksums and the suffix arrays before querying (O(index size)).
    #[arg(long)]
    verify: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatsArgs {
    /// Index file.
    #[arg(short, long)]
    index: PathBuf,
    /// Check all checksums and the suffix arrays (O(index size)).
    #[arg(long)]
    verify: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, not in piped logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(a) => build(a),
        Command::Query(a) => query(a),
        Command::Stats(a) => stats(a),
    }
}

fn print(value: String) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    Ok(())
}

/// Turns build progress into an indicatif spinner on stderr.
struct Bar(ProgressBar);

impl BuildProgress for Bar {
    fn input(&self, docs: u64, tokens: u64) {
        if docs.is_multiple_of(256) {
            self.0
                .set_message(format!("{docs} documents, {tokens} tokens read"));
        }
    }
    fn shard_started(&self, shard: usize, slots: u64) {
        self.0
            .set_message(format!("sorting shard {shard} ({slots} tokens)"));
    }
    fn shard_written(&self, shard: usize, _slots: u64) {
        self.0.set_message(format!("shard {shard} written"));
    }
}

fn build(a: BuildArgs) -> anyhow::Result<()> {
    let files = collect_files(&a.inputs, &a.extensions)?;
    if files.is_empty() {
        bail!("no input files found under {:?}", a.inputs);
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {msg}",
    )?);
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let progress = Bar(bar);
    let summary = match a.input_format {
        InputFormat::Text => {
            let tok = a
                .tokenizer
                .as_deref()
                .context("--tokenizer is required for text inputs")?;
            let corpus = TextCorpus::new(tok, files)?;
            let vocab = match a.vocab_size {
                Some(v) => v,
                None => u32::try_from(corpus.vocab_size()).context("vocabulary size")?,
            };
            let mut config = BuildConfig::new(vocab);
            config.shard_tokens = a.shard_tokens;
            config.jobs = a.jobs;
            config.tokenizer_hash = corpus.tokenizer_hash()?;
            IndexBuilder::new(config)?.build_file(&a.output, corpus, &progress)?
        }
        InputFormat::Tokens => {
            let vocab = a
                .vocab_size
                .context("--vocab-size is required for token inputs")?;
            let mut config = BuildConfig::new(vocab);
            config.shard_tokens = a.shard_tokens;
            config.jobs = a.jobs;
            if let Some(tok) = &a.tokenizer {
                config.tokenizer_hash = infinigram_spec::build::tokenizer_hash(tok)?;
            }
            let streams = files
                .iter()
                .map(|f| TokenStream::open(f))
                .collect::<Result<Vec<_>, _>>()?;
            let docs = streams.into_iter().flatten();
            IndexBuilder::new(config)?.build_file(&a.output, docs, &progress)?
        }
    };
    progress.0.finish_and_clear();
    if a.json {
        return print(serde_json::to_string_pretty(&summary)?);
    }
    print(format!(
        "{}: {} tokens, {} documents, {} shards, {} bytes ({:.2} bytes/token), {:.2} s ({:.2} s indexing, {:.2} M tokens/s overall)",
        a.output.display(),
        summary.tokens,
        summary.docs,
        summary.shards,
        summary.bytes,
        summary.bytes_per_token,
        summary.seconds,
        summary.index_seconds,
        summary.tokens as f64 / summary.seconds.max(1e-9) / 1e6,
    ))
}

fn load_tokenizer(path: &Path) -> anyhow::Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("loading tokenizer {}", path.display()))
}

fn query(a: QueryArgs) -> anyhow::Result<()> {
    let index = Index::open(&a.index, OpenOptions { verify: a.verify })?;
    if let Some(path) = &a.tokenizer {
        // Token ids mean nothing under another tokenizer: refuse a mismatch outright.
        let recorded = index.tokenizer_hash();
        if let Some(given) = infinigram_spec::build::tokenizer_mismatch(&recorded, path)? {
            anyhow::bail!(
                "{} was built with another tokenizer (fingerprint {}) than {} (fingerprint {})",
                a.index.display(),
                hex(&recorded),
                path.display(),
                hex(&given)
            );
        }
    }
    let tokenizer = a.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let tokens: Vec<u32> = match (&a.tokens, &a.text) {
        (Some(list), _) => list
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .with_context(|| format!("token id {s:?}"))
            })
            .collect::<anyhow::Result<_>>()?,
        (None, Some(text)) => {
            let tok = tokenizer.as_ref().context("--text needs --tokenizer")?;
            tok.encode_fast(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None) => Vec::new(),
    };
    let piece = |t: Option<u32>| -> serde_json::Value {
        match (t, &tokenizer) {
            (Some(t), Some(tok)) => json!(tok.id_to_token(t)),
            (None, _) => json!("<end of document>"),
            _ => serde_json::Value::Null,
        }
    };
    let ntd_options = NtdOptions {
        top_k: Some(a.top_k),
        max_support: a.max_support,
    };
    let result = match a.op {
        Op::Count => json!({ "tokens": tokens, "count": index.count(&tokens)? }),
        Op::Ntd => {
            let ntd = index.ntd(&tokens, ntd_options)?;
            let next: Vec<_> = ntd
                .next
                .iter()
                .map(|n| {
                    json!({"token": n.token, "text": piece(n.token), "count": n.count,
                    "prob": n.count as f64 / ntd.prompt_count.max(1) as f64})
                })
                .collect();
            json!({ "tokens": tokens, "prompt_count": ntd.prompt_count, "approx": ntd.approx, "next": next })
        }
        Op::Longest => {
            let m = index.longest_suffix(&tokens, usize::MAX)?;
            let ntd = index.ntd_of_ranges(m.ranges(), m.len(), ntd_options);
            let next: Vec<_> = ntd
                .next
                .iter()
                .map(|n| json!({"token": n.token, "text": piece(n.token), "count": n.count}))
                .collect();
            json!({ "tokens": tokens, "suffix_len": m.len(), "suffix": m.matched_tokens(&index),
                    "count": m.count(), "approx": ntd.approx, "next": next })
        }
        Op::Chain => {
            let m = index.longest_suffix(&tokens, usize::MAX)?;
            let options = ChainOptions {
                max_tokens: a.max_tokens,
                max_support: a.max_support,
                ..ChainOptions::default()
            };
            let steps: Vec<_> = index
                .chain(&m, options)
                .iter()
                .map(|s| json!({"token": s.token, "text": piece(Some(s.token)), "count": s.count, "prob": s.prob}))
                .collect();
            json!({ "tokens": tokens, "suffix_len": m.len(), "count": m.count(), "chain": steps })
        }
        Op::Trie => {
            let m = index.longest_suffix(&tokens, usize::MAX)?;
            let options = TrieOptions {
                max_depth: a.max_tokens,
                max_nodes: a.max_nodes,
                max_support: a.max_support,
                ..TrieOptions::default()
            };
            let trie = index.trie(&m, options);
            let nodes: Vec<_> = trie
                .nodes
                .iter()
                .map(|n| {
                    json!({"token": n.token, "text": piece(Some(n.token)), "parent": n.parent,
                    "depth": n.depth, "count": n.count, "prob": n.prob})
                })
                .collect();
            json!({ "tokens": tokens, "suffix_len": m.len(), "count": trie.root_count, "nodes": nodes })
        }
        Op::Docs => {
            let occ = index.occurrences(&tokens, a.limit)?;
            json!({ "tokens": tokens, "count": index.count(&tokens)?, "occurrences": occ })
        }
    };
    if a.json {
        print(serde_json::to_string(&result)?)
    } else {
        print(serde_json::to_string_pretty(&result)?)
    }
}

fn stats(a: StatsArgs) -> anyhow::Result<()> {
    let index = Index::open(&a.index, OpenOptions { verify: a.verify })?;
    let shards: Vec<_> = (0..index.shard_count())
        .map(|s| {
            let shard = index.shard(s);
            json!({"shard": s, "tokens": shard.tokens(), "documents": shard.docs(),
                   "pointer_width": index.pointer_width(s)})
        })
        .collect();
    let hash: String = index
        .tokenizer_hash()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let result = json!({
        "path": a.index,
        "format_version": infinigram_spec::format::FORMAT_VERSION,
        "bytes": index.byte_len(),
        "tokens": index.token_count(),
        "documents": index.doc_count(),
        "vocab_size": index.vocab_size(),
        "token_width": index.token_width(),
        "bytes_per_token": index.byte_len() as f64 / index.token_count().max(1) as f64,
        "tokenizer_fingerprint": hash,
        "verified": a.verify,
        "shards": shards,
    });
    if a.json {
        print(serde_json::to_string(&result)?)
    } else {
        print(serde_json::to_string_pretty(&result)?)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
