//! CPU decode benchmark on the real SmolLM2-135M-Instruct: the original GQA model against
//! its stock-MLA conversion at 50 % KV (CARE, `kv_lora_rank` 160 incl. the anchor, RoPE
//! 32), f32, on the CPU:
//!
//! - **GQA contiguous** / **MLA contiguous**: the reference decoder with its contiguous
//!   cache (grown by concatenation: every step copies the cache);
//! - **GQA paged** / **MLA paged**: the serving engine (`mla_attention::engine::Engine`)
//!   over the paged cache (`[K ; V]` rows, absorbed decode over `[c ; k_pe]` rows).
//!
//! For each (prompt length, batch), every engine prefills `batch` prompts (untimed), then
//! decodes `STEPS` greedy steps for the whole batch (timed; one warm-up step first).
//! Prints decode tokens/s and the KV cache bytes per token of each engine as a markdown
//! table for `docs/BENCHMARKS.md`.
//!
//! `cargo bench -p care-convert --bench decode [-- MODEL.gguf] [--contexts 512,4096]
//! [--paged-only]` (`--paged-only` skips the contiguous engines, whose 4 K prefills and
//! per-step cache copies dominate the run's time).
//! Under `cargo test --all-targets` it runs one tiny cell as a smoke check.

use std::time::Instant;

use care_convert::eval::run::NoProgress;
use care_convert::export::deepseek::SaveDtype;
use care_convert::jobs::{Calibration, StockConversion, StockJob, StockLayout};
use mla_attention::engine::{Engine, EngineConfig, GenerationRequest};
use mla_attention::mla::MlaAttention;
use mla_attention::model::Decoder;
use mla_attention::runner::{CpuPagedModel, PagedModel, RunnerConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const BLOCK: usize = 16;

/// `batch` distinct prompts of `ctx` token ids (any ids of the vocabulary do for speed).
fn prompts(batch: usize, ctx: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|b| {
            (0..ctx)
                .map(|i| 100 + ((i * 37 + b * 101) % 40_000) as u32)
                .collect()
        })
        .collect()
}

/// Greedy next token of every row of `hidden` `(batch, t, d)` at its last position.
fn next_tokens(model: &Decoder, hidden: &candle_core::Tensor) -> Res<Vec<u32>> {
    let (b, t, d) = hidden.dims3()?;
    let last = hidden.narrow(1, t - 1, 1)?.reshape((b, d))?;
    Ok(model.logits(&last)?.argmax(1)?.to_vec1::<u32>()?)
}

/// Decode tokens/s of a contiguous-cache decoder over `steps` batched steps.
fn contiguous(model: &Decoder, prompts: &[Vec<u32>], steps: usize) -> Res<f64> {
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut cache = model.new_cache();
    let h = model.forward_hidden_batch(&rows, &mut cache, None)?;
    let mut next = next_tokens(model, &h)?;
    let mut step = |next: &mut Vec<u32>| -> Res<()> {
        let rows: Vec<&[u32]> = next.iter().map(std::slice::from_ref).collect();
        let h = model.forward_hidden_batch(&rows, &mut cache, None)?;
        *next = next_tokens(model, &h)?;
        Ok(())
    };
    step(&mut next)?; // warm-up
    let start = Instant::now();
    for _ in 0..steps {
        step(&mut next)?;
    }
    Ok((prompts.len() * steps) as f64 / start.elapsed().as_secs_f64())
}

/// Decode tokens/s of the engine (paged cache) over `steps` steps.
fn paged(engine: &mut Engine<CpuPagedModel>, prompts: &[Vec<u32>], steps: usize) -> Res<f64> {
    for p in prompts {
        engine.submit(GenerationRequest::greedy(p.clone(), steps + 2))?;
    }
    let t = Instant::now();
    engine.step()?; // prefill and a warm-up step
    let prefill = t.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut each = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        engine.step()?;
        each.push(t.elapsed().as_secs_f64() * 1e3);
    }
    eprintln!("prefill + first step {prefill:.1} s; steps ms {each:.1?}");
    let tps = (prompts.len() * steps) as f64 / start.elapsed().as_secs_f64();
    engine.run_to_completion()?; // frees every block for the next cell
    Ok(tps)
}

fn main() -> Res<()> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let assets = mla_attention::io::asset_cache_dir();
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--") && a.parse::<usize>().is_err() && !a.contains(','))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| assets.join("models/smollm2-135m-instruct/model.gguf"));
    let argv: Vec<String> = std::env::args().collect();
    let paged_only = argv.iter().any(|a| a == "--paged-only");
    let contexts: Option<Vec<usize>> = argv
        .iter()
        .position(|a| a == "--contexts")
        .and_then(|i| argv.get(i + 1))
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect());
    let (default_ctxs, batches, steps, samples): (&[usize], &[usize], usize, usize) = if bench_mode
    {
        (&[512, 4096], &[1], 16, 128)
    } else {
        (&[16], &[2], 2, 16)
    };
    let ctxs: &[usize] = contexts.as_deref().unwrap_or(default_ctxs);
    if !path.exists() {
        return Err(format!("{}: missing (run scripts/fetch_assets.py)", path.display()).into());
    }
    let job = StockJob {
        model: path.clone(),
        layout: StockLayout {
            kv_lora_rank: Some(160),
            rope_dim: Some(32),
            freqfold: Some(2),
            ..Default::default()
        },
        calibration: Calibration {
            texts: vec![assets.join("data/exllamav2-cal/wiki.utf8")],
            samples,
            seq_len: 32,
            seed: 42,
            ..Default::default()
        },
        dtype: SaveDtype::F32,
    };
    let t0 = Instant::now();
    let StockConversion {
        checkpoint: ckpt,
        original,
        stock,
        ..
    } = job.convert(&mut NoProgress)?;
    let convert_s = t0.elapsed().as_secs_f64();
    let mla_decoder = || -> Res<Decoder> {
        let mut d = mla_attention::load::load_decoder(&ckpt)?;
        stock.install(&mut d)?;
        Ok(d)
    };
    let mla = mla_decoder()?;
    let attns = stock
        .layers
        .iter()
        .map(|l| -> Res<MlaAttention> { Ok(MlaAttention::new(&stock.mla, l.to_weights()?)?) })
        .collect::<Res<Vec<_>>>()?;
    let max_batch = *batches.iter().max().unwrap_or(&1);
    let max_ctx = *ctxs.iter().max().unwrap_or(&1);
    let num_blocks = max_batch * (max_ctx + steps + 2).div_ceil(BLOCK) + 8;
    let cache = RunnerConfig {
        block_size: BLOCK,
        num_blocks,
    };
    let mut mla_paged = Engine::new(
        CpuPagedModel::from_parts(mla_decoder()?, attns, cache)?,
        EngineConfig::default(),
    );
    let mut gqa_paged = Engine::new(
        CpuPagedModel::load(&ckpt.spec, ckpt.weights.as_ref(), cache)?,
        EngineConfig::default(),
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model: {} ({} layers), f32 CPU, {threads} threads; conversion (calibration {} x 32 \
         tokens + CARE stock MLA 50 %) {convert_s:.1} s; {steps} timed decode steps per cell",
        path.display(),
        original.spec.num_layers,
        samples
    );
    let kv = |values: usize| values * 4;
    println!(
        "KV cache bytes per token (f32): GQA contiguous {}, GQA paged {}, MLA contiguous {}, \
         MLA paged {}",
        kv(original.cache_values_per_token()),
        gqa_paged.model().bytes_per_token(),
        kv(mla.cache_values_per_token()),
        mla_paged.model().bytes_per_token()
    );
    println!(
        "| prompt tokens | batch | GQA contiguous tok/s | GQA paged tok/s | MLA contiguous tok/s | MLA paged tok/s | GQA paged ms/step | MLA paged ms/step |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &ctx in ctxs {
        for &batch in batches {
            let p = prompts(batch, ctx);
            let contiguous_tps = |model: &Decoder| -> Res<String> {
                if paged_only {
                    return Ok("–".into());
                }
                Ok(format!("{:.1}", contiguous(model, &p, steps)?))
            };
            let a = contiguous_tps(&original)?;
            let b = paged(&mut gqa_paged, &p, steps)?;
            let c = contiguous_tps(&mla)?;
            let d = if std::env::var_os("DECODE_BENCH_GQA_ONLY").is_some() {
                f64::NAN
            } else {
                paged(&mut mla_paged, &p, steps)?
            };
            let ms = |tps: f64| 1e3 * batch as f64 / tps;
            println!(
                "| {ctx} | {batch} | {a} | {b:.1} | {c} | {d:.1} | {:.1} | {:.1} |",
                ms(b),
                ms(d)
            );
        }
    }
    Ok(())
}
