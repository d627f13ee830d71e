//! Exactness of the stock DeepSeek-V2 assembly where the math says it must be exact: one
//! KV head, RoPE width = head width (every RoRoPE block is one frequency with one
//! component) and the full joint rank. Then the converted model must reproduce the
//! source model's logits up to the bias anchors' ‖x‖²/2A² — including Qwen2's q/k/v
//! biases (query bias through the anchored q-LoRA, key/value biases through the latent
//! anchor), the softmax-scale compensation, V padding, and the export round trip.

use candle_core::Tensor;
use care_convert::calibrate::collect_all;
use care_convert::export::deepseek::{
    write_deepseek_v2, SaveDtype, StockProvenance, TokenizerFiles,
};
use care_convert::export::CalibrationRecord;
use care_convert::stock::{
    convert_stock, effective_rank, max_rank, LatentBasis, LatentNorm, RopeSplitOptions,
    StockOptions,
};
use mla_attention::io::Checkpoint;
use mla_attention::model::Decoder;

mod common;
use common::{write_source, Rng, HEAD_DIM, HIDDEN, VOCAB};

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
        let ckpt = Checkpoint::open(&src).unwrap();
        let original = Decoder::load(&ckpt).unwrap();
        let mut r = Rng(5);
        let windows: Vec<Vec<u32>> = (0..40)
            .map(|_| (0..24).map(|_| ((r.next() + 1.0) * 48.0) as u32).collect())
            .collect();
        let stats = collect_all(&original, &windows, &mut |_, _| {}).unwrap();
        let mut opts = StockOptions {
            kv_lora_rank: 0,
            rank: None,
            rope: RopeSplitOptions {
                rope_dim: HEAD_DIM,
                freqfold: 1,
                pca: true,
            },
            basis: LatentBasis::Care,
            balance: true,
            latent_norm: LatentNorm::BiasAnchor,
            pad_v: true,
            damping: 0.0,
        };
        opts.kv_lora_rank = max_rank(&original.spec, &opts) + 1;
        assert_eq!(effective_rank(&original.spec, &opts), HEAD_DIM);
        let stock = convert_stock(
            &original.spec,
            ckpt.weights.as_ref(),
            &stats,
            &opts,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(stock.mla.q_lora_rank, qwen.then_some(HIDDEN + 1));
        let tokens: Vec<u32> = (0..20).map(|i| (i * 13 + 3) % VOCAB as u32).collect();
        let want = original
            .forward(&tokens, &mut original.new_cache())
            .unwrap();

        // In memory.
        let mut converted = Decoder::load(&ckpt).unwrap();
        stock.install(&mut converted).unwrap();
        let got = converted
            .forward(&tokens, &mut converted.new_cache())
            .unwrap();
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "qwen={qwen}: in-memory relative error {e:e}");

        // Through the exported DeepSeek-V2 directory.
        let out = tmp.path().join(format!("mla-{qwen}"));
        let prov = StockProvenance {
            format: "care-deepseek-v2",
            format_version: 1,
            source_model: src.display().to_string(),
            source_sha256: String::new(),
            conversion: stock.summary.clone(),
            calibration: CalibrationRecord {
                sources: vec![],
                samples: 40,
                seq_len: 24,
                seed: 5,
                tokens: 960,
                sequential: false,
            },
            tool: "test".into(),
        };
        write_deepseek_v2(
            &out,
            &original.spec,
            ckpt.weights.as_ref(),
            &stock,
            &TokenizerFiles::default(),
            &prov,
            SaveDtype::F32,
        )
        .unwrap();
        // Writing again over an existing directory is refused and leaves it intact.
        let again = write_deepseek_v2(
            &out,
            &original.spec,
            ckpt.weights.as_ref(),
            &stock,
            &TokenizerFiles::default(),
            &prov,
            SaveDtype::F32,
        );
        assert!(again.unwrap_err().to_string().contains("already exists"));
        let reloaded = Decoder::load(&Checkpoint::open(&out).unwrap()).unwrap();
        let got = reloaded
            .forward(&tokens, &mut reloaded.new_cache())
            .unwrap();
        let e = max_rel_diff(&got, &want);
        assert!(e < 1e-4, "qwen={qwen}: exported relative error {e:e}");
    }
}
