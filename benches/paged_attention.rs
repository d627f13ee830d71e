//! The CPU paged attention alone (`mla_attention::cpu`): one layer's attention of one
//! query row over a sequence of `ctx` cached rows, for the SmolLM2-135M shapes — original
//! GQA (9 query heads, 3 KV heads of 64: `[K ; V]` rows of 384 values) and its stock-MLA
//! conversion at 50 % (9 heads, latent 128 + RoPE 32) — f32, random cache contents. Prints
//! µs per layer (all 30 layers called in turn, as a decode step does), the cache bytes read per second and the multiply-adds per second, so the
//! decode benchmark's step time can be split into attention and the rest.
//!
//! `cargo bench -p mla-attention --bench paged_attention`

use std::time::Instant;

use mla_attention::cache::{CacheConfig, LatentPagedCache, LayerWidth};
use mla_attention::cpu::{
    absorbed_decode, paged_gqa_attention, DecodeParams, DecodeQuery, GqaShape,
};

/// SmolLM2-135M's layer count.
const LAYERS: usize = 30;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn values(n: usize, seed: u64) -> Vec<f32> {
    test_support::Rng::new(seed).symmetric_vec(n, 0.5)
}

/// Median µs of `f` over `reps` calls (one warm-up).
fn time(reps: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn main() -> Res<()> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let (ctxs, reps): (&[usize], usize) = if bench_mode {
        (&[512, 4096, 16384], 10)
    } else {
        (&[64], 2)
    };
    let (nh, nkv, d) = (9, 3, 64);
    let (r, dr) = (128, 32);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("SmolLM2-135M shapes, f32, batch 1, one layer, {threads} threads");
    println!("| context | form | µs / call | cache GB/s | GFLOP/s |");
    println!("|---:|---|---:|---:|---:|");
    for &ctx in ctxs {
        let bs = 16;
        for (form, width) in [
            (
                "GQA",
                LayerWidth {
                    rank: 2 * nkv * d,
                    rope: 0,
                },
            ),
            ("MLA", LayerWidth { rank: r, rope: dr }),
        ] {
            // Every layer of the model, called in turn as a decode step does, so the cache
            // is read from memory rather than from the last-level cache.
            let mut cache = LatentPagedCache::<f32>::new(CacheConfig {
                block_size: bs,
                num_blocks: ctx.div_ceil(bs),
                layers: vec![width; LAYERS],
            })?;
            let seq = cache.add_sequence();
            for l in 0..LAYERS {
                cache.append(
                    seq,
                    l,
                    width.width(),
                    &values(ctx * width.width(), 1 + l as u64),
                )?;
            }
            let layers: Vec<_> = (0..LAYERS)
                .map(|l| cache.layer(l))
                .collect::<Result<_, _>>()?;
            let views: Vec<[_; 1]> = (0..LAYERS)
                .map(|l| cache.view(seq, l).map(|v| [v]))
                .collect::<Result<_, _>>()?;
            let (us, flops) = if form == "GQA" {
                let q = values(nh * d, 2);
                let shape = GqaShape {
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: d,
                };
                let us = time(reps, || {
                    for (layer, views) in layers.iter().zip(&views) {
                        std::hint::black_box(paged_gqa_attention(layer, views, &q, shape)?);
                    }
                    Ok(())
                })? / LAYERS as f64;
                (us, 2.0 * (ctx * nh * 2 * d) as f64)
            } else {
                let (q_lat, q_pe) = (values(nh * r, 3), values(nh * dr, 4));
                let query = DecodeQuery {
                    q_lat: &q_lat,
                    q_pe: &q_pe,
                    num_heads: nh,
                    scale: std::env::var("SCALE")
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0.1),
                };
                let params = DecodeParams::default();
                let us = time(reps, || {
                    for (layer, views) in layers.iter().zip(&views) {
                        std::hint::black_box(absorbed_decode(layer, views, &query, &params)?);
                    }
                    Ok(())
                })? / LAYERS as f64;
                (us, 2.0 * (ctx * nh * (2 * r + dr)) as f64)
            };
            let bytes = (ctx * width.width() * 4) as f64;
            println!(
                "| {ctx} | {form} | {us:.0} | {:.1} | {:.1} |",
                bytes / us / 1e3,
                flops / us / 1e3
            );
        }
    }
    Ok(())
}
