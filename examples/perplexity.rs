//! Perplexity of a real model on the first tokens of a real text.
//!
//! `cargo run --release -p care-convert --example perplexity -- [MODEL] [TEXT] [TOKENS]`
//! Defaults: SmolLM2-135M-Instruct and the 2016 State of the Union, 512 tokens
//! (expected: PPL ≈ 24.84, the independent numpy reference).

use std::path::PathBuf;

use care_convert::eval::perplexity::{perplexity, PerplexityOptions};
use mla_attention::io::{tokenizer::encode, Checkpoint};
use mla_attention::load::load_decoder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let assets = mla_attention::io::asset_cache_dir();
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(assets.join("models/smollm2-135m-instruct/model.gguf"));
    let text = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(assets.join("data/sotu/2016_barack_obama_d.txt"));
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(512);

    let ckpt = Checkpoint::open(&model)?;
    let decoder = load_decoder(&ckpt)?;
    let ids = encode(ckpt.tokenizer()?, &std::fs::read_to_string(&text)?)?;
    let ids = &ids[..n.min(ids.len())];
    let r = perplexity(&decoder, ids, &PerplexityOptions::default(), &mut |_, _| {})?;
    println!(
        "{}: {} tokens, PPL {:.3}, top-1 {:.3}",
        text.display(),
        r.tokens,
        r.ppl,
        r.top1_acc
    );
    Ok(())
}
