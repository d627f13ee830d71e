//! Reference-forward benchmark on the real SmolLM2-135M weights: time of one forward
//! pass (all layers + LM head on the last position) for several sequence lengths, on
//! the CPU in f32. Prints a markdown table for `docs/BENCHMARKS.md`.
//!
//! `cargo bench -p mla-attention --bench forward [-- MODEL.gguf [REPEATS]]`

use std::time::Instant;

use care_model::{io::Checkpoint, model::Decoder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes --bench; under `cargo test --all-targets` run a quick smoke check.
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let default = care_model::io::asset_cache_dir().join("models/smollm2-135m-instruct/model.gguf");
    let path = args
        .first()
        .map(std::path::PathBuf::from)
        .unwrap_or(default);
    let repeats: usize = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&path)?;
    let model = Decoder::load(&ckpt)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "model: {} (load + dequantize {:.2} s), {cores} threads, f32 CPU",
        path.display(),
        load_s
    );
    println!("| tokens | median ms | min ms | tokens/s |\n|---:|---:|---:|---:|");
    let lengths: &[usize] = if bench_mode {
        &[1, 8, 32, 128, 512]
    } else {
        &[1, 8]
    };
    let repeats = if bench_mode { repeats } else { 1 };
    for &t in lengths {
        let ids: Vec<u32> = (0..t as u32).map(|i| 100 + (i * 37) % 40_000).collect();
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats + 1 {
            let s = Instant::now();
            let mut cache = model.new_cache();
            let h = model.forward_hidden(&ids, &mut cache, None)?;
            let logits = model.logits(&h.narrow(0, t - 1, 1)?)?;
            std::hint::black_box(logits);
            times.push(s.elapsed().as_secs_f64() * 1e3);
        }
        times.remove(0); // warm-up
        times.sort_by(|a, b| a.total_cmp(b));
        let med = times[times.len() / 2];
        println!(
            "| {t} | {med:.1} | {:.1} | {:.0} |",
            times[0],
            t as f64 / med * 1e3
        );
    }
    Ok(())
}
