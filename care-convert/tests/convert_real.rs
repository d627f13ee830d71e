//! One-shot CARE conversion on the first layers of the real SmolLM2-135M weights:
//! full rank reproduces the original, CARE beats plain SVD on the real activation
//! objective, the exported checkpoint reloads to the same logits with a latent-only
//! cache, and bad options are clear errors that leave nothing behind.

use std::process::Command;

use candle_core::Tensor;
use care_convert::calibrate::{collect_all, sample_windows, CalibrationOptions};
use care_convert::convert::{convert_one_pass, ConvertMethod, ConvertOptions, LayerFactors};
use care_convert::eval::run::NoProgress;
use care_convert::jobs::{Calibration, OneShotJob};
use mla_attention::io::{tokenizer::encode, Checkpoint};
use mla_attention::model::Decoder;

use test_support::assets;

const LAYERS: usize = 4;

struct Fixture {
    ckpt: Checkpoint,
    spec: mla_attention::config::ModelSpec,
    windows: Vec<Vec<u32>>,
    eval_ids: Vec<u32>,
}

fn fixture() -> Fixture {
    let ckpt = Checkpoint::open(assets().join("models/smollm2-135m-instruct/model.gguf")).unwrap();
    let mut spec = ckpt.spec.clone();
    spec.num_layers = LAYERS;
    let tok = ckpt.tokenizer().unwrap();
    let cal = std::fs::read_to_string(assets().join("data/exllamav2-cal/wiki.utf8")).unwrap();
    let cal_ids = encode(tok, &cal[..200_000]).unwrap();
    let windows = sample_windows(
        &cal_ids,
        &CalibrationOptions {
            samples: 48,
            seq_len: 32,
            seed: 1,
        },
    )
    .unwrap();
    let prose =
        std::fs::read_to_string(assets().join("data/sotu/2016_barack_obama_d.txt")).unwrap();
    let eval_ids = encode(tok, &prose).unwrap()[..64].to_vec();
    Fixture {
        ckpt,
        spec,
        windows,
        eval_ids,
    }
}

fn model(f: &Fixture) -> Decoder {
    mla_attention::load::load_decoder_weights(&f.spec, f.ckpt.weights.as_ref()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Relative ‖X(W − Ŵ)ᵀ‖ of layer 0's K under a method, from real activations.
fn layer0_k_error(
    f: &Fixture,
    x: &Tensor,
    method: ConvertMethod,
    stats: &[care_convert::factorize::InputStats],
) -> f64 {
    let mut m = model(f);
    let opts = ConvertOptions {
        method,
        kv_keep: 0.25,
        ..Default::default()
    };
    let (factors, _) = convert_one_pass(
        &mut m,
        f.ckpt.weights.as_ref(),
        stats,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    let LayerFactors::Separate { k, .. } = &factors[0] else {
        panic!("separate factors expected")
    };
    let w = f
        .ckpt
        .weights
        .tensor("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    let what = k.reconstruct();
    let what = Tensor::from_vec(
        (0..what.nrows())
            .flat_map(|i| (0..what.ncols()).map(move |j| (i, j)))
            .map(|(i, j)| what[(i, j)] as f32)
            .collect::<Vec<_>>(),
        (what.nrows(), what.ncols()),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let y = x.matmul(&w.t().unwrap()).unwrap();
    let e = (&y - x.matmul(&what.t().unwrap()).unwrap()).unwrap();
    let n = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt() as f64
    };
    n(&e) / n(&y)
}

struct Capture(Vec<Tensor>);
impl mla_attention::model::ForwardObserver for Capture {
    fn attention_input(&mut self, layer: usize, x: &Tensor) -> mla_attention::Result<()> {
        if layer == 0 {
            self.0.push(x.squeeze(0)?);
        }
        Ok(())
    }
}

#[test]
fn full_rank_reproduces_original_and_care_beats_plain_svd_on_real_activations() {
    let f = fixture();
    let original = model(&f);
    let stats = collect_all(&original, &f.windows, &mut |_, _| {}).unwrap();
    let want = original
        .forward(&f.eval_ids, &mut original.new_cache())
        .unwrap();
    for method in [
        ConvertMethod::CareU,
        ConvertMethod::Palu,
        ConvertMethod::Mha2mla,
    ] {
        let mut m = model(&f);
        let opts = ConvertOptions {
            method,
            kv_keep: 1.0,
            ..Default::default()
        };
        convert_one_pass(
            &mut m,
            f.ckpt.weights.as_ref(),
            &stats,
            &opts,
            &mut |_, _| {},
        )
        .unwrap();
        let got = m.forward(&f.eval_ids, &mut m.new_cache()).unwrap();
        let d = max_diff(&want, &got);
        assert!(
            d < 2e-2,
            "{method:?} at full rank differs from the original by {d}"
        );
    }
    // Held-out activations of layer 0 (the evaluation text, not the calibration windows).
    let mut cap = Capture(Vec::new());
    original
        .forward_hidden(&f.eval_ids, &mut original.new_cache(), Some(&mut cap))
        .unwrap();
    let x = &cap.0[0];
    let care = layer0_k_error(&f, x, ConvertMethod::CareU, &stats);
    let palu = layer0_k_error(&f, x, ConvertMethod::Palu, &stats);
    let asvd = layer0_k_error(&f, x, ConvertMethod::Asvd, &stats);
    assert!(
        care < palu && care < asvd,
        "relative K error: CARE {care:.4}, Palu {palu:.4}, ASVD {asvd:.4}"
    );
}

/// `care-convert convert`'s job on the first layers: the budgets hold, the export is
/// atomic, reloads to the same logits with a latent-only cache, and sequential calibration
/// keeps the plan.
#[test]
fn exported_checkpoint_reloads_with_latent_only_cache() {
    let f = fixture();
    let job = |sequential| OneShotJob {
        model: assets().join("models/smollm2-135m-instruct/model.gguf"),
        method: ConvertMethod::CareE,
        kv_keep: 0.25,
        calibration: Calibration {
            texts: vec![assets().join("data/exllamav2-cal/c4.utf8")],
            samples: 48,
            seq_len: 32,
            seed: 1,
            ..Default::default()
        },
        sequential,
    };
    let one_pass = job(false);
    let source = || Checkpoint::open(&one_pass.model).unwrap();
    let conv = one_pass
        .convert_loaded(source(), model(&f), &mut NoProgress)
        .unwrap();
    let m = &conv.model;
    let (tk, tv) = conv.summary.plan.totals();
    assert_eq!(tk, LAYERS * 48, "K budget");
    assert_eq!(tv, LAYERS * 48, "V budget");
    assert_eq!(conv.summary.kv_values_per_token_original, LAYERS * 2 * 192);
    assert_eq!(m.cache_values_per_token(), tk + tv);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted");
    one_pass.write(&conv, &out).unwrap();
    // Writing again over an existing directory is refused and changes nothing.
    let err = one_pass.write(&conv, &out).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary directories left behind: {leftovers:?}"
    );

    let reloaded = Checkpoint::open(&out).unwrap();
    let care: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("care.json")).unwrap()).unwrap();
    assert_eq!(care["conversion"]["method"], "care-e");
    assert_eq!(
        care["conversion"]["plan"]["k"].as_array().unwrap().len(),
        LAYERS
    );
    assert_eq!(care["calibration"]["samples"], 48);
    let r = mla_attention::load::load_decoder(&reloaded).unwrap();
    let want = m.forward(&f.eval_ids, &mut m.new_cache()).unwrap();
    let mut cache = r.new_cache();
    let got = r.forward(&f.eval_ids, &mut cache).unwrap();
    assert!(max_diff(&want, &got) < 1e-4, "reloaded logits differ");
    // The cache holds only the latents: Σ (r_k + r_v) values per token.
    assert_eq!(cache.values_per_token(), tk + tv);
    // The tokenizer travels with the checkpoint.
    assert!(reloaded.tokenizer.is_some());

    // Sequential calibration runs and converts with the same plan.
    let seq = job(true)
        .convert_loaded(source(), model(&f), &mut NoProgress)
        .unwrap();
    assert_eq!(seq.summary.plan.totals(), (tk, tv));
    assert!(seq.calibration.sequential);
    let s = &seq.model;
    let logits = s.forward(&f.eval_ids, &mut s.new_cache()).unwrap();
    assert!(logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn cli_rejects_out_of_range_budgets_and_existing_outputs_without_writing() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let run = |keep: &str, out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_care-convert"))
            .args([
                "convert",
                "--quiet",
                "--calib-samples",
                "4",
                &format!("--kv-keep={keep}"),
                "--model",
            ])
            .arg(a.join("models/smollm2-135m-instruct/model.gguf"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    for keep in ["0", "1.5", "-0.2", "NaN"] {
        let out = dir.path().join(format!("o{keep}"));
        let o = run(keep, &out);
        assert_eq!(o.status.code(), Some(2), "--kv-keep {keep} accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("keep") || err.contains("invalid value"),
            "--kv-keep {keep}: {err}"
        );
        assert!(!out.exists(), "output written for --kv-keep {keep}");
    }
    let existing = dir.path().join("exists");
    std::fs::create_dir(&existing).unwrap();
    let o = run("0.5", &existing);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "something was written"
    );
}

/// `export-hf` writes what a server needs besides the weights: without
/// `tokenizer_config.json`'s chat template mistral.rs fails every chat request.
#[test]
fn export_hf_writes_the_tokenizer_files_a_server_needs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-f32");
    let export = || {
        Command::new(env!("CARGO_BIN_EXE_care-convert"))
            .args(["export-hf", "--model"])
            .arg(assets().join("models/smollm2-135m-instruct/model.gguf"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = export();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = tc["chat_template"].as_str().unwrap_or_default();
    assert!(template.contains("<|im_start|>"), "chat template: {tc}");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    // The export reloads as the same model.
    let reloaded = Checkpoint::open(&out).unwrap();
    assert_eq!(reloaded.spec.num_layers, 30);
    assert!(reloaded.spec.mla.is_none());
    // An existing output is refused and left as it was.
    let before = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let o = export();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));
    let after = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}
