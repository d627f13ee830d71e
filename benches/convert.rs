//! Conversion-time benchmark on the real models: calibration (forward passes that
//! accumulate C per layer) and factorization + rank planning, timed separately.
//! Prints a markdown table for `docs/BENCHMARKS.md`.
//!
//! `cargo bench -p care-convert --bench convert [-- MODEL.gguf ...]`
//! (default: SmolLM2-135M and, if fetched, Qwen2.5-Coder-0.5B from the asset cache).

use std::path::PathBuf;
use std::time::Instant;

use care_convert::calibrate::{collect_all, sample_windows, CalibrationOptions};
use care_convert::convert::{convert_one_pass, ConvertMethod, ConvertOptions};
use mla_attention::io::{tokenizer::encode, Checkpoint};
use mla_attention::load::load_decoder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let assets = mla_attention::io::asset_cache_dir();
    let mut models: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .collect();
    if models.is_empty() {
        models.push(assets.join("models/smollm2-135m-instruct/model.gguf"));
        let q = assets.join("models/qwen2.5-coder-0.5b-instruct/model.gguf");
        if bench_mode && q.exists() {
            models.push(q);
        }
    }
    // Under `cargo test --all-targets`: a smoke run with a tiny calibration.
    let opts = if bench_mode {
        CalibrationOptions::default()
    } else {
        CalibrationOptions {
            samples: 2,
            seq_len: 8,
            seed: 42,
        }
    };
    let cal: String = ["c4.utf8", "wiki.utf8", "code.utf8"]
        .iter()
        .map(|f| std::fs::read_to_string(assets.join("data/exllamav2-cal").join(f)))
        .collect::<Result<Vec<_>, _>>()?
        .join("\n");
    println!(
        "calibration: {} windows × {} tokens (ExLlamaV2 c4+wiki+code); {} threads",
        opts.samples,
        opts.seq_len,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| model | load s | calibration s | method | factorize + plan + install s | total s |\n|---|---:|---:|---|---:|---:|");
    for path in &models {
        let t0 = Instant::now();
        let ckpt = Checkpoint::open(path)?;
        let original = load_decoder(&ckpt)?;
        let load_s = t0.elapsed().as_secs_f64();
        let ids = encode(ckpt.tokenizer()?, &cal)?;
        let windows = sample_windows(&ids, &opts)?;
        let t1 = Instant::now();
        let stats = collect_all(&original, &windows, &mut |_, _| {})?;
        let calib_s = t1.elapsed().as_secs_f64();
        drop(original);
        let methods: &[ConvertMethod] = if bench_mode {
            &[
                ConvertMethod::CareU,
                ConvertMethod::CareE,
                ConvertMethod::Palu,
                ConvertMethod::Mha2mla,
            ]
        } else {
            &[ConvertMethod::CareE]
        };
        for &m in methods {
            let mut model = load_decoder(&ckpt)?;
            let t2 = Instant::now();
            let o = ConvertOptions {
                method: m,
                kv_keep: 0.5,
                ..Default::default()
            };
            convert_one_pass(
                &mut model,
                ckpt.weights.as_ref(),
                &stats,
                &o,
                &mut |_, _| {},
            )?;
            let f_s = t2.elapsed().as_secs_f64();
            let name = path
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or("model");
            println!(
                "| {name} | {load_s:.2} | {calib_s:.2} | {} | {f_s:.2} | {:.2} |",
                m.name(),
                load_s + calib_s + f_s
            );
        }
    }
    Ok(())
}
