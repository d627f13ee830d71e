//! `mla_cuda_bench`: benchmarks of the CUDA paged MLA decode (correctness lives in
//! `cargo test --features cuda`: `tests/cuda_kernels.rs`, `tests/cuda_engine.rs`).
//!
//! ```text
//! mla_cuda_bench [--mode bench|kernel|runner] [--quick] [--ctx 4096,16384,...]
//!                [--batch 1,8,32] [--e2e] [--out DIR]
//!                [--model DIR]... [--text FILE] [--new N]      (runner mode)
//! ```
//!
//! - `bench`: copy bandwidth, per-call kernel time and bandwidth at 512/64 × 32 heads
//!   for every ctx × batch, 32-layer steps (uniform 512 vs a 256–768 rank ramp),
//!   sequences of 32K tokens per memory budget; `--e2e` adds a whole decode step of
//!   an 8B-shaped random-weight model (candle matmuls + our kernel).
//! - `runner`: the continuous-batching runner on the GPU for stock DeepSeek-V2
//!   checkpoints (random ones and every `--model`): tokens equal the CPU runner's, bad
//!   input refused, then prefill and decode tokens/s per `--ctx` × `--batch`
//!   (`--new` tokens per request; prompts are windows of `--text` where the model has a
//!   tokenizer).
//!
//! Writes `results.json` and `results.md` into `--out` (default `.`), prints the
//! markdown last. Exit code: 0 ok, 1 a runner check failed, 2 an error.

mod bench;
mod e2e;
mod report;
mod runner;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use mla_attention::cache::LayerWidth;
use mla_attention::cuda::MlaKernels;

#[derive(Debug)]
struct Args {
    bench: bool,
    /// Only the per-call kernel cells (profiling, kernel variants).
    kernel_only: bool,
    e2e: bool,
    quick: bool,
    ctx: Vec<usize>,
    batch: Vec<usize>,
    out: std::path::PathBuf,
    runner: bool,
    models: Vec<std::path::PathBuf>,
    text: Option<std::path::PathBuf>,
    new: usize,
}

fn list(v: &str) -> Result<Vec<usize>> {
    v.split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .with_context(|| format!("bad number {x:?}"))
        })
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        bench: true,
        kernel_only: false,
        e2e: false,
        quick: false,
        ctx: vec![4096, 16384, 32768, 65536],
        batch: vec![1, 8, 32],
        out: ".".into(),
        runner: false,
        models: Vec::new(),
        text: None,
        new: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mode" => match value()?.as_str() {
                "bench" => a.bench = true,
                "kernel" => (a.bench, a.kernel_only) = (true, true),
                "runner" => (a.bench, a.runner) = (false, true),
                m => bail!("unknown mode {m}"),
            },
            "--quick" => a.quick = true,
            "--e2e" => a.e2e = true,
            "--ctx" => a.ctx = list(&value()?)?,
            "--batch" => a.batch = list(&value()?)?,
            "--out" => a.out = value()?.into(),
            "--model" => a.models.push(value()?.into()),
            "--text" => a.text = Some(value()?.into()),
            "--new" => a.new = value()?.parse().context("--new")?,
            f => bail!("unknown flag {f}"),
        }
    }
    Ok(a)
}

fn run(args: &Args) -> Result<bool> {
    let k = MlaKernels::on_device(0).context("CUDA device 0")?;
    let ctx = k.stream().context();
    let (free, total) = ctx.mem_get_info()?;
    let mut rep = report::Report {
        device: ctx.name()?,
        compute_capability: ctx.compute_capability()?,
        sm_count: k.sm_count(),
        total_mem_bytes: total,
        ..Default::default()
    };
    eprintln!(
        "device {} ({} SMs, {:.1} GiB)",
        rep.device,
        rep.sm_count,
        total as f64 / (1u64 << 30) as f64
    );
    let mut ok = true;
    if args.runner {
        let r = runner::run(&runner::RunnerArgs {
            models: &args.models,
            text: args.text.as_deref(),
            ctxs: &args.ctx,
            batches: &args.batch,
            new: args.new,
            quick: args.quick,
        })?;
        eprintln!("runner: {} failure(s)", r.failures);
        ok &= r.failures == 0;
        rep.runner = Some(r);
    }
    if args.bench {
        rep.copy_gbps = bench::copy_bandwidth(&k)?;
        eprintln!("copy bandwidth {:.0} GB/s (read + write)", rep.copy_gbps);
        let budget = free / 2;
        let w = LayerWidth {
            rank: 512,
            rope: 64,
        };
        for &b in &args.batch {
            for &c in &args.ctx {
                match bench::kernel_cell(&k, w, c, b, budget, rep.copy_gbps) {
                    Ok(cell) => {
                        eprintln!(
                            "bf16 512/64 ctx {c} batch {b}: {:.4} ms/call, {:.0} GB/s ({:.0}% of copy), {} splits",
                            cell.ms_per_call, cell.gbps, cell.pct_of_copy_bw, cell.splits
                        );
                        rep.cells.push(cell);
                    }
                    Err(e) => {
                        eprintln!("cell ctx {c} batch {b}: {e:#}");
                        rep.errors.push(format!("cell ctx {c} batch {b}: {e:#}"));
                    }
                }
            }
        }
        if args.kernel_only {
            return finish(args, &rep, ok);
        }
        let ramp = bench::ramp_ranks();
        let uniform = vec![512; bench::LAYERS];
        let step_batches: Vec<usize> = if args.quick { vec![1] } else { vec![1, 8, 32] };
        for &b in &step_batches {
            for (name, ranks) in [("uniform 512", &uniform), ("ramp 256-768", &ramp)] {
                match bench::layer_step(&k, name, ranks, 64, 32768, b) {
                    Ok(s) => {
                        eprintln!(
                            "step {name} ctx 32768 batch {b}: {:.3} ms/step",
                            s.ms_per_step
                        );
                        rep.steps.push(s);
                    }
                    Err(e) => rep.errors.push(format!("step {name} batch {b}: {e:#}")),
                }
            }
        }
        let budget_bytes = 16usize << 30;
        for (name, ranks) in [("uniform 512", &uniform), ("ramp 256-768", &ramp)] {
            match bench::capacity(&k, name, ranks, 64, budget_bytes, 32768) {
                Ok(c) => rep.capacity.push(c),
                Err(e) => rep.errors.push(format!("capacity {name}: {e:#}")),
            }
        }
        if args.e2e {
            match e2e::run(&k, &args.ctx, &args.batch, args.quick) {
                Ok(r) => rep.e2e = r,
                Err(e) => rep.errors.push(format!("e2e: {e:#}")),
            }
        }
    }
    finish(args, &rep, ok)
}

/// Write `results.json` and `results.md`, print the markdown.
fn finish(args: &Args, rep: &report::Report, ok: bool) -> Result<bool> {
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(rep)?,
    )?;
    let md = report::markdown(rep);
    std::fs::write(args.out.join("results.md"), &md)?;
    println!("{md}");
    Ok(ok && rep.errors.is_empty())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mla_cuda_bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("mla_cuda_bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
