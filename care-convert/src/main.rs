//! `care-convert`: a thin layer over the library. Parses arguments, draws progress
//! bars on stderr, prints results on stdout.

mod cli;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use care_convert::eval::multiple_choice::{load_requests, score_doc, summarize, task_path};
use care_convert::eval::perplexity::{perplexity, PerplexityOptions};
use care_convert::eval::report::{EvalReport, TextEval};
use cli::{Cli, Command, EvalArgs, Format, InspectArgs, TokenizerArgs};
use mla_attention::io::{tokenizer, Checkpoint};
use mla_attention::model::Decoder;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Eval(a) => run_eval(a),
        Command::Tokenizer(a) => run_tokenizer(a),
        Command::Inspect(a) => run_inspect(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn bar(len: u64, msg: String, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Write `bytes` to `path` through a temporary file in the same directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn open_model(path: &Path, tok: Option<&Path>) -> Result<(Checkpoint, Decoder)> {
    let mut ckpt = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    if let Some(t) = tok {
        ckpt.tokenizer = Some(
            tokenizers::Tokenizer::from_file(t)
                .map_err(|e| anyhow::anyhow!("{}: {e}", t.display()))?,
        );
    }
    let model = Decoder::load(&ckpt).with_context(|| format!("loading {}", path.display()))?;
    Ok((ckpt, model))
}

fn run_eval(a: EvalArgs) -> Result<()> {
    if a.ppl_files.is_empty() && a.tasks.is_empty() {
        bail!("nothing to evaluate: pass --ppl FILE and/or --tasks LIST");
    }
    let started = Instant::now();
    let tasks_dir = a
        .tasks_dir
        .clone()
        .unwrap_or_else(|| cli::assets_dir().join("data/oe_eval_tasks"));
    // Resolve every input before the (slow) model load, so typos fail fast.
    let task_files: Vec<(String, std::path::PathBuf)> = a
        .tasks
        .iter()
        .map(|t| Ok((t.clone(), task_path(&tasks_dir, t)?)))
        .collect::<care_convert::Result<_>>()?;
    for (t, p) in &task_files {
        if !p.exists() {
            bail!(
                "task {t}: {} not found (run scripts/fetch_assets.py)",
                p.display()
            );
        }
    }
    for f in &a.ppl_files {
        if !f.is_file() {
            bail!("{}: not a file", f.display());
        }
    }
    let (ckpt, model) = open_model(&a.model, a.tokenizer.as_deref())?;
    let tok = ckpt.tokenizer()?;
    let opts = PerplexityOptions {
        window: a.window,
        stride: a.stride,
    };
    let mut ppl = Vec::new();
    for f in &a.ppl_files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let mut ids = tokenizer::encode(tok, &text)?;
        if ckpt.add_bos {
            if let Some(b) = ckpt.spec.bos_token_id {
                ids.insert(0, b);
            }
        }
        if let Some(m) = a.max_tokens {
            ids.truncate(m);
        }
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("text")
            .to_string();
        let pb = bar(1, name.clone(), a.quiet);
        let result = perplexity(&model, &ids, &opts, &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        })?;
        pb.finish_and_clear();
        ppl.push(TextEval {
            source: f.display().to_string(),
            max_tokens: a.max_tokens,
            options: opts.clone(),
            result,
        });
    }
    let prefix_token = ckpt
        .spec
        .eos_token_id
        .or(ckpt.spec.bos_token_id)
        .unwrap_or(0);
    let mut tasks = Vec::new();
    for (task, path) in &task_files {
        let docs = load_requests(path, a.limit)?;
        let pb = bar(docs.len() as u64, task.clone(), a.quiet);
        let mut scores = Vec::with_capacity(docs.len());
        for d in &docs {
            scores.push(score_doc(&model, tok, d, prefix_token, a.max_len)?);
            pb.inc(1);
        }
        pb.finish_and_clear();
        tasks.push(summarize(task, &scores));
    }
    let mc: Vec<_> = tasks
        .iter()
        .filter(|t| t.task != "lambada")
        .cloned()
        .collect();
    let report = EvalReport {
        model: a.model.display().to_string(),
        architecture: format!("{:?}", ckpt.spec.arch).to_lowercase(),
        kv_values_per_token: model.spec.num_layers * ckpt.spec.kv_values_per_token_per_layer(),
        perplexity: ppl,
        average_acc: EvalReport::average(&mc),
        tasks,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.json {
        write_atomic(p, json.as_bytes())?;
    }
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => writeln!(out, "{json}")?,
        Format::Markdown => write!(out, "{}", report.to_markdown())?,
    }
    Ok(())
}

fn run_tokenizer(a: TokenizerArgs) -> Result<()> {
    let file = mla_attention::io::gguf::GgufFile::open(&a.model)?;
    let doc = tokenizer::json_from_gguf(&file)?;
    // Check that the document loads before writing it.
    let text = serde_json::to_string(&doc)?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| anyhow::anyhow!("rebuilt tokenizer does not load: {e}"))?;
    write_atomic(&a.out, text.as_bytes())?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    println!("{}", serde_json::to_string_pretty(&ckpt.spec)?);
    Ok(())
}
