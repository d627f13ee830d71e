//! `care-convert`: a thin layer over the library. Parses arguments, draws progress
//! bars on stderr, prints results on stdout.

mod cli;
mod heal_cmd;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use care_convert::calibrate::{collect_all, overlapping_windows};

/// Shared token run that counts as calibration/evaluation overlap.
const OVERLAP_TOKENS: usize = 16;
use care_convert::compare::{markdown_table, CompareRow};
use care_convert::convert::{convert_one_pass, ConvertMethod, ConvertOptions};
use care_convert::eval::perplexity::PerplexityOptions;
use care_convert::eval::run::{evaluate, EvalPlan, Progress};
use care_convert::jobs::{check_new_output, OneShotJob, StockJob, StockLayout};
use cli::{
    Cli, Command, CompareArgs, ConvertArgs, EvalArgs, ExportHfArgs, Format, InspectArgs, MlaArgs,
    TokenizerArgs,
};
use mla_attention::io::{tokenizer, Checkpoint};
use mla_attention::model::Decoder;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, not in piped logs.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Eval(a) => run_eval(a),
        Command::Convert(a) => run_convert(a),
        Command::Mla(a) => run_mla(a),
        Command::Compare(a) => run_compare(a),
        Command::Tokenizer(a) => run_tokenizer(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Heal(a) => heal_cmd::run_heal(a),
        Command::PackData(a) => heal_cmd::run_pack_data(a),
        Command::ExportHf(a) => run_export_hf(a),
        Command::PlotLoss(a) => heal_cmd::run_plot_loss(a),
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

/// Write `bytes` to `path` atomically (see `care_convert::export::write_file_atomically`).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(care_convert::export::write_file_atomically(path, bytes)?)
}

/// BOS to prepend to texts (only if the tokenizer asks for one) and the token that
/// stands for an empty multiple-choice context (EOS, else BOS, as the harness).
fn special_tokens(ckpt: &Checkpoint) -> (Option<u32>, u32) {
    let bos = if ckpt.add_bos {
        ckpt.spec.bos_token_id
    } else {
        None
    };
    let prefix = ckpt
        .spec
        .eos_token_id
        .or(ckpt.spec.bos_token_id)
        .unwrap_or(0);
    (bos, prefix)
}

fn open_model(path: &Path, tok: Option<&Path>) -> Result<(Checkpoint, Decoder)> {
    let mut ckpt = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    if let Some(t) = tok {
        ckpt.tokenizer = Some(
            tokenizers::Tokenizer::from_file(t)
                .map_err(|e| anyhow::anyhow!("{}: {e}", t.display()))?,
        );
    }
    let model = mla_attention::load::load_decoder(&ckpt)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((ckpt, model))
}

/// indicatif bars for the library's progress callbacks.
struct Bars {
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        Bars { quiet, bar: None }
    }
}

impl Progress for Bars {
    fn start(&mut self, label: &str, total: usize) {
        self.bar = Some(bar(total as u64, label.to_string(), self.quiet));
    }
    fn set(&mut self, done: usize) {
        if let Some(b) = &self.bar {
            if b.length().is_some_and(|l| (done as u64) > l) {
                b.set_length(done as u64);
            }
            b.set_position(done as u64);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn run_eval(a: EvalArgs) -> Result<()> {
    if a.ppl_files.is_empty() && a.tasks.is_empty() {
        bail!("nothing to evaluate: pass --ppl FILE and/or --tasks LIST");
    }
    let tasks_dir = a
        .tasks_dir
        .clone()
        .unwrap_or_else(|| cli::assets_dir().join("data/oe_eval_tasks"));
    // Resolve every input before the (slow) model load, so typos fail fast.
    let (ppl_files, tasks) = EvalPlan::resolve(a.ppl_files.clone(), &a.tasks, &tasks_dir)?;
    let plan = EvalPlan {
        ppl_files,
        max_tokens: a.max_tokens,
        ppl: PerplexityOptions {
            window: a.window,
            stride: a.stride,
        },
        tasks,
        limit: a.limit,
        max_len: a.max_len,
    };
    plan.ppl.validate()?;
    let (ckpt, model) = open_model(&a.model, a.tokenizer.as_deref())?;
    let tok = ckpt.tokenizer()?;
    let (bos, prefix) = special_tokens(&ckpt);
    let report = evaluate(
        &model,
        &a.model.display().to_string(),
        tok,
        bos,
        prefix,
        &plan,
        &mut Bars::new(a.quiet),
    )?;
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

fn collect_stats(
    model: &Decoder,
    windows: &[Vec<u32>],
    quiet: bool,
) -> Result<Vec<care_convert::factorize::InputStats>> {
    let pb = bar(windows.len() as u64, "calibrate".into(), quiet);
    let stats = collect_all(model, windows, &mut |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    Ok(stats)
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    let started = Instant::now();
    let job = OneShotJob {
        model: a.model.clone(),
        method: a.method,
        kv_keep: a.kv_keep,
        calibration: a.calib.calibration(),
        sequential: a.sequential,
    };
    check_new_output(&a.out)?;
    let conv = job
        .convert(&mut Bars::new(a.quiet))
        .with_context(|| format!("converting {}", a.model.display()))?;
    job.write(&conv, &a.out)?;
    let (summary, calib_s) = (&conv.summary, conv.calibration_seconds);
    if let Err(e) = care_convert::ranks::plot_png(
        &summary.plan,
        &format!(
            "{} ranks, {:.1}% KV kept",
            a.method.name(),
            a.kv_keep * 100.0
        ),
        &a.out.join("ranks.png"),
    ) {
        tracing::warn!("rank plot not written: {e}");
    }
    eprintln!(
        "wrote {} ({}: KV values/token {} -> {}, calibration {:.1} s, factorization {:.1} s, total {:.1} s)",
        a.out.display(),
        a.method.name(),
        summary.kv_values_per_token_original,
        summary.kv_values_per_token_converted,
        calib_s,
        summary.factorize_seconds,
        started.elapsed().as_secs_f64()
    );
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn run_mla(a: MlaArgs) -> Result<()> {
    let started = Instant::now();
    let job = StockJob {
        model: a.model.clone(),
        layout: StockLayout {
            kv_lora_rank: a.kv_lora_rank,
            kv_keep: a.kv_keep,
            rank: a.rank,
            rope_dim: a.rope_dim,
            freqfold: a.freqfold,
            rorope: !a.no_rorope,
            basis: a.basis,
            balance: !a.no_balance,
            latent_norm: a.latent_norm,
            pad_v: !a.no_pad_v,
        },
        calibration: a.calib.calibration(),
        dtype: a.dtype,
    };
    check_new_output(&a.out)?;
    let conv = job
        .convert(&mut Bars::new(a.quiet))
        .with_context(|| format!("converting {}", a.model.display()))?;
    job.write(&conv, &a.out)?;
    let (stock, calib_s) = (&conv.stock, conv.calibration_seconds);
    let s = &stock.summary;
    let mean_rope =
        s.layers.iter().map(|l| l.rope_energy).sum::<f64>() / s.layers.len().max(1) as f64;
    eprintln!(
        "wrote {} (DeepSeek-V2 MLA: kv_lora_rank {} (rank {}), rope {}; KV values/token {} -> {}; \
         key energy under RoPE {:.1}%; calibration {:.1} s, conversion {:.1} s, total {:.1} s)",
        a.out.display(),
        stock.mla.shape.kv_lora_rank,
        s.layers.first().map_or(0, |l| l.rank),
        stock.mla.shape.qk_rope_head_dim,
        s.kv_values_per_token_original,
        s.kv_values_per_token_converted,
        100.0 * mean_rope,
        calib_s,
        s.seconds,
        started.elapsed().as_secs_f64()
    );
    if !s.rope_pairs_inexact.is_empty() {
        let list: Vec<String> = s
            .rope_pairs_inexact
            .iter()
            .map(|c| format!("pair {} ({:.1} %)", c.pair, 100.0 * c.rel_error))
            .collect();
        eprintln!(
            "note: the source's RoPE scaling is emulated by YaRN; these RoPE pairs rotate at a \
             different frequency than in the source: {}",
            list.join(", ")
        );
    }
    println!("{}", serde_json::to_string_pretty(s)?);
    Ok(())
}

fn run_compare(a: CompareArgs) -> Result<()> {
    let tasks_dir = a
        .tasks_dir
        .clone()
        .unwrap_or_else(|| cli::assets_dir().join("data/oe_eval_tasks"));
    let (ppl_files, tasks) = EvalPlan::resolve(a.ppl_files.clone(), &a.tasks, &tasks_dir)?;
    if ppl_files.is_empty() && tasks.is_empty() {
        bail!("nothing to evaluate: pass --ppl FILE and/or --tasks LIST");
    }
    for &k in &a.kv_keep {
        if !(k > 0.0 && k <= 1.0) {
            bail!("--kv-keep {k} must be in (0, 1]");
        }
    }
    let plan = EvalPlan {
        ppl_files,
        max_tokens: a.max_tokens,
        ppl: PerplexityOptions {
            window: a.window,
            stride: None,
        },
        tasks,
        limit: a.limit,
        max_len: 2048,
    };
    plan.ppl.validate()?;
    let methods = if a.methods.is_empty() {
        ConvertMethod::ALL.to_vec()
    } else {
        a.methods.clone()
    };
    let (ckpt, original) = open_model(&a.model, None)?;
    let tok = ckpt.tokenizer()?;
    let (bos, prefix) = special_tokens(&ckpt);
    let windows = a.calib.calibration().windows(tok)?;
    for f in &plan.ppl_files {
        let held_out = care_convert::eval::run::text_tokens(tok, f, None, None)?;
        let n = overlapping_windows(&windows, &held_out, OVERLAP_TOKENS);
        if n > 0 {
            bail!(
                "{n} calibration windows share a {OVERLAP_TOKENS}-token run with the evaluation text {}: \
                 calibration and evaluation text must not overlap",
                f.display()
            );
        }
    }
    let stats = collect_stats(&original, &windows, a.quiet)?;
    let mut bars = Bars::new(a.quiet);
    // --resume: keep the rows an interrupted run already saved to --json.
    let mut rows: Vec<CompareRow> = match (&a.json, a.resume) {
        (Some(p), true) if p.exists() => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a compare report", p.display()))?
        }
        (None, true) => bail!("--resume needs --json (the report it continues)"),
        _ => Vec::new(),
    };
    let done = |rows: &[CompareRow], method: &str, keep: f64| {
        rows.iter()
            .any(|r| r.method == method && (r.kv_keep - keep).abs() < 1e-9)
    };
    if !done(&rows, "original", 1.0) {
        let report = evaluate(&original, "original", tok, bos, prefix, &plan, &mut bars)?;
        rows.insert(
            0,
            CompareRow {
                method: "original".into(),
                kv_keep: 1.0,
                report,
                conversion: None,
            },
        );
        save_rows(&a, &rows)?;
    }
    drop(original);
    for &keep in &a.kv_keep {
        for &m in &methods {
            if done(&rows, m.name(), keep) {
                continue;
            }
            let mut model = mla_attention::load::load_decoder(&ckpt)?;
            let opts = ConvertOptions {
                method: m,
                kv_keep: keep,
                damping: a.calib.damping,
                ..Default::default()
            };
            let (_, summary) = convert_one_pass(
                &mut model,
                ckpt.weights.as_ref(),
                &stats,
                &opts,
                &mut |_, _| {},
            )?;
            if let (Some(dir), ConvertMethod::CareE | ConvertMethod::CareEDepth) = (&a.plots, m) {
                let p = dir.join(format!(
                    "ranks-{}-{}.png",
                    m.name(),
                    (keep * 1000.0).round()
                ));
                std::fs::create_dir_all(dir)?;
                care_convert::ranks::plot_png(
                    &summary.plan,
                    &format!("{} {:.1}% KV", m.name(), keep * 100.0),
                    &p,
                )?;
            }
            let name = format!("{} @ {:.1}%", m.name(), keep * 100.0);
            let report = evaluate(&model, &name, tok, bos, prefix, &plan, &mut bars)?;
            eprintln!(
                "{name}: {}",
                report
                    .perplexity
                    .iter()
                    .map(|p| format!("PPL {:.2}", p.result.ppl))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            rows.push(CompareRow {
                method: m.name().into(),
                kv_keep: keep,
                report,
                conversion: Some(summary),
            });
            // Save after every row: a long grid that is interrupted keeps what it measured.
            save_rows(&a, &rows)?;
        }
    }
    let md = save_rows(&a, &rows)?;
    print!("{md}");
    Ok(())
}

/// Write the JSON and markdown outputs of `compare` (atomically); returns the markdown.
fn save_rows(a: &CompareArgs, rows: &[CompareRow]) -> Result<String> {
    let md = markdown_table(rows);
    if let Some(p) = &a.json {
        write_atomic(p, serde_json::to_string_pretty(rows)?.as_bytes())?;
    }
    if let Some(p) = &a.markdown {
        write_atomic(p, md.as_bytes())?;
    }
    Ok(md)
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

fn run_export_hf(a: ExportHfArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    if ckpt.spec.mla.is_some() {
        bail!("{} is already an MLA checkpoint", a.model.display());
    }
    care_convert::export::write_hf_original(
        &a.out,
        &ckpt.spec,
        ckpt.weights.as_ref(),
        &care_convert::jobs::tokenizer_files(&ckpt, &a.model)?,
    )?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&a.model)?;
    println!("{}", serde_json::to_string_pretty(&ckpt.spec)?);
    Ok(())
}
