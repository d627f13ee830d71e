//! Exactness of the stock DeepSeek-V2 assembly where the math says it must be exact: one
//! KV head, RoPE width = head width (every RoRoPE block is one frequency with one
//! component) and the full joint rank. Then the converted model must reproduce the
//! source model's logits up to the bias anchors' ‖x‖²/2A² — including Qwen2's q/k/v
//! biases (query bias through the anchored q-LoRA, key/value biases through the latent
//! anchor), the softmax-scale compensation, V padding, and the export round trip.

use candle_core::Tensor;
use care_convert::stock::{effective_rank, max_rank};
use mla_attention::io::Checkpoint;
use mla_attention::load::load_decoder;

mod common;
use common::{
    convert_tiny, export_tiny, stock_options, write_source, write_source_with, HEAD_DIM, HIDDEN,
    VOCAB,
};

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap()
}

#[test]
fn full_rank_single_kv_head_conversion_is_exact_with_and_without_biases() {
    let tmp = tempfile::tempdir().unwrap();
    for qwen in [false, true] {
        let src = tmp.path().join(if qwen { "qwen" } else { "llama" });
        write_source(&src, qwen);
        let (ckpt, original, stock) = convert_tiny(&src, |spec| {
            let mut opts = stock_options(0, HEAD_DIM);
            opts.kv_lora_rank = max_rank(spec, &opts) + 1;
            assert_eq!(effective_rank(spec, &opts), HEAD_DIM);
            opts
        });
        assert_eq!(stock.mla.q_lora_rank, qwen.then_some(HIDDEN + 1));
        let tokens: Vec<u32> = (0..20).map(|i| (i * 13 + 3) % VOCAB as u32).collect();
        let want = original
            .forward(&tokens, &mut original.new_cache())
            .unwrap();

        // In memory.
        let mut converted = load_decoder(&ckpt).unwrap();
        stock.install(&mut converted).unwrap();
        let got = converted
            .forward(&tokens, &mut converted.new_cache())
            .unwrap();
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "qwen={qwen}: in-memory relative error {e:e}");

        // Through the exported DeepSeek-V2 directory.
        let out = tmp.path().join(format!("mla-{qwen}"));
        export_tiny(&src, &out, &ckpt, &stock).unwrap();
        // Writing again over an existing directory is refused and leaves it intact.
        let again = export_tiny(&src, &out, &ckpt, &stock);
        assert!(again.unwrap_err().to_string().contains("already exists"));
        let reloaded = load_decoder(&Checkpoint::open(&out).unwrap()).unwrap();
        let got = reloaded
            .forward(&tokens, &mut reloaded.new_cache())
            .unwrap();
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "qwen={qwen}: exported relative error {e:e}");
    }
}

/// A source with Llama 3 RoPE scaling becomes DeepSeek YaRN, exact for every pair outside
/// Llama 3's blend band (the band's pairs are listed as inexact; unit tests in
/// `stock::rope_scale`). With no pair in the band the full-rank conversion is exact again
/// — positions past the original window included — while dropping the scaling is not.
#[test]
fn llama3_rope_scaling_is_emulated_by_yarn() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("llama3");
    // 8 frequencies θ^(−j/8), θ = 1e4, over an original window of 64 tokens: 10.2 ω_j
    // rotations = 10.2, 3.2, 1.02, 0.32, … Blending between 1.1 and 3 rotations: pairs 0–1
    // keep, pairs 2–7 are divided by 4, none blends.
    write_source_with(
        &src,
        false,
        serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 4.0,
            "low_freq_factor": 1.1, "high_freq_factor": 3.0,
            "original_max_position_embeddings": 64}}),
    );
    let (ckpt, original, stock) = convert_tiny(&src, |spec| {
        let mut opts = stock_options(0, HEAD_DIM);
        opts.kv_lora_rank = max_rank(spec, &opts) + 1;
        opts
    });
    let inexact: Vec<usize> = stock
        .summary
        .rope_pairs_inexact
        .iter()
        .map(|c| c.pair)
        .collect();
    eprintln!("inexact pairs: {:?}", stock.summary.rope_pairs_inexact);
    assert!(inexact.is_empty(), "{inexact:?}");
    let tokens: Vec<u32> = (0..96).map(|i| (i * 13 + 3) % VOCAB as u32).collect();
    let want = original
        .forward(&tokens, &mut original.new_cache())
        .unwrap();
    let mut converted = load_decoder(&ckpt).unwrap();
    stock.install(&mut converted).unwrap();
    let got = converted
        .forward(&tokens, &mut converted.new_cache())
        .unwrap();
    let mut naive_model = stock.clone();
    naive_model.mla.rope_scaling = mla_attention::mla::MlaRopeScaling::None;
    let mut naive = load_decoder(&ckpt).unwrap();
    naive_model.install(&mut naive).unwrap();
    let dropped = naive.forward(&tokens, &mut naive.new_cache()).unwrap();
    let (e_yarn, e_naive) = (max_rel_diff(&got, &want), max_rel_diff(&dropped, &want));
    eprintln!("max relative logit error over 96 positions: YaRN {e_yarn:.2e}, scaling dropped {e_naive:.2e}");
    assert!(e_yarn < 1e-4, "YaRN emulation error {e_yarn:e}");
    assert!(
        e_naive > 1e-2,
        "dropping the scaling should matter: {e_naive:e}"
    );

    // The export carries the YaRN keys and reloads to the same model.
    let out = tmp.path().join("mla");
    export_tiny(&src, &out, &ckpt, &stock).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["rope_scaling"]["type"], "yarn");
    assert_eq!(cfg["rope_scaling"]["mscale_all_dim"], 0.0);
    assert_eq!(cfg["rope_parameters"]["attention_factor"], 1.0);
    let reloaded = load_decoder(&Checkpoint::open(&out).unwrap()).unwrap();
    let again = reloaded
        .forward(&tokens, &mut reloaded.new_cache())
        .unwrap();
    assert!(max_rel_diff(&again, &got) < 1e-5);
}
