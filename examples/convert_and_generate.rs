//! Convert SmolLM2-135M to the one-shot CARE form in memory and compare greedy
//! continuations and cache sizes with the original.
//!
//! `cargo run --release -p care-convert --example convert_and_generate -- [KV_KEEP] [PROMPT]`

use care_convert::convert::ConvertMethod;
use care_convert::eval::run::NoProgress;
use care_convert::jobs::{Calibration, OneShotJob};
use mla_attention::io::tokenizer::{decode, encode};
use mla_attention::io::Checkpoint;
use mla_attention::model::Decoder;

/// Greedy decoding with the model's cache; returns the new tokens.
fn greedy(
    model: &Decoder,
    prompt: &[u32],
    n: usize,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let mut cache = model.new_cache();
    let mut logits = model.forward(prompt, &mut cache)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let last = logits.narrow(0, logits.dim(0)? - 1, 1)?;
        let next = last.argmax(1)?.to_vec1::<u32>()?[0];
        out.push(next);
        logits = model.forward(&[next], &mut cache)?;
    }
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let assets = mla_attention::io::asset_cache_dir();
    let mut args = std::env::args().skip(1);
    let keep: f64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0.5);
    let prompt = args
        .next()
        .unwrap_or_else(|| "The state of our union is".to_string());

    let model = assets.join("models/smollm2-135m-instruct/model.gguf");
    let ckpt = Checkpoint::open(&model)?;
    let tok = ckpt.tokenizer()?;
    let original = mla_attention::load::load_decoder(&ckpt)?;
    let ids = encode(tok, &prompt)?;
    let base = greedy(&original, &ids, 24)?;
    println!(
        "original ({} cached values/token): {}{}",
        original.cache_values_per_token(),
        prompt,
        decode(tok, &base)?
    );
    for method in [ConvertMethod::CareU, ConvertMethod::Palu] {
        let job = OneShotJob {
            model: model.clone(),
            method,
            kv_keep: keep,
            calibration: Calibration {
                texts: vec![assets.join("data/exllamav2-cal/wiki.utf8")],
                ..Default::default()
            },
            sequential: false,
        };
        let m = job.convert(&mut NoProgress)?.model;
        let out = greedy(&m, &ids, 24)?;
        println!(
            "{} @ {:.0}% ({} cached values/token): {}{}",
            method.name(),
            keep * 100.0,
            m.cache_values_per_token(),
            prompt,
            decode(tok, &out)?
        );
    }
    Ok(())
}
