//! Cost of a speculative verify pass on the real SmolLM2-135M: one request at a 200-token
//! context runs `n` new tokens (its last token plus `n − 1` drafted ones) through all layers
//! and the head, f32 on the CPU — with candle's matmul and with the few-row kernel
//! (`mla_attention::model::few_rows`, AVX-512), side by side. What matters for drafting is
//! the cost of `n` tokens relative to 1. Prints a markdown table for `docs/BENCHMARKS.md`.
//!
//! `cargo bench -p mla-attention --bench verify_pass [-- MODEL.gguf]`
//! Under `cargo test --all-targets` it runs one tiny cell as a smoke check.

use std::time::Instant;

use mla_attention::io::Checkpoint;
use mla_attention::model::{few_rows, Decoder, DecoderCache};

/// Best-of-`repeats` seconds of a pass of `n` tokens after `cache` (on copies of it).
fn pass(model: &Decoder, cache: &DecoderCache, n: usize, repeats: usize) -> f64 {
    let tokens = vec![300u32; n];
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let mut c = cache.clone();
        let t = Instant::now();
        let h = model
            .forward_hidden(&tokens, &mut c, None)
            .expect("forward");
        let ids = model
            .logits(&h)
            .and_then(|l| Ok(l.argmax(1)?.to_vec1::<u32>()?))
            .expect("logits");
        assert_eq!(ids.len(), n);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            mla_attention::io::asset_cache_dir().join("models/smollm2-135m-instruct/model.gguf")
        });
    let ckpt = Checkpoint::open(&path)?;
    let model = mla_attention::load::load_decoder(&ckpt)?;
    let ctx: Vec<u32> = (0..200u32).map(|i| 100 + i * 7).collect();
    let mut cache = model.new_cache();
    model.forward_hidden(&ctx, &mut cache, None)?;
    let (sizes, repeats): (&[usize], usize) = if bench_mode {
        (&[1, 2, 4, 8, 9, 16, 32, 64], 5)
    } else {
        (&[1, 2], 1)
    };
    println!(
        "model: {}, 200-token context, f32 CPU, {} threads, AVX-512 kernel {}",
        path.display(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if few_rows::available() {
            "available"
        } else {
            "NOT available (both columns are candle)"
        }
    );
    println!("| tokens | candle ms | × 1 token | few-row ms | × 1 token |");
    println!("|---:|---:|---:|---:|---:|");
    let mut base = [0.0f64; 2];
    for &n in sizes {
        let mut t = [0.0f64; 2];
        for (i, on) in [false, true].into_iter().enumerate() {
            few_rows::set_enabled(on);
            t[i] = pass(&model, &cache, n, repeats);
            if n == 1 {
                base[i] = t[i];
            }
        }
        println!(
            "| {n} | {:.2} | {:.2}× | {:.2} | {:.2}× |",
            t[0] * 1e3,
            t[0] / base[0],
            t[1] * 1e3,
            t[1] / base[1]
        );
    }
    few_rows::set_enabled(true);
    Ok(())
}
