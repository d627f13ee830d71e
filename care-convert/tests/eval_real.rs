//! The evaluation harness on real weights and real data, checked against figures from
//! an independent numpy forward over the same dequantized weights
//! (`../shared/research/assets.md`):
//!
//! - SmolLM2-135M-Instruct Q4_1, first 512 tokens of SOTU 2016: PPL 24.84, top-1 0.364.
//! - SmolLM2, ARC-Easy validation, first 200 questions, rc 0-shot: acc 0.500.
//! - Qwen2.5-Coder-0.5B, first 512 tokens of CPython 3.11 `functools.py`: PPL 5.96.
//!
//! The assets come from `scripts/fetch_assets.py`; these tests fail without them.

use std::path::PathBuf;
use std::process::Command;

use care_convert::eval::multiple_choice::{load_requests, score_doc, summarize, task_path};
use care_convert::eval::perplexity::{perplexity, PerplexityOptions};
use mla_attention::io::{tokenizer::encode, Checkpoint};
use mla_attention::load::load_decoder;

use test_support::assets;

fn ppl_first_512(model: &str, text: PathBuf) -> (f64, f64) {
    let ckpt = Checkpoint::open(assets().join(model)).unwrap();
    let decoder = load_decoder(&ckpt).unwrap();
    let text = std::fs::read_to_string(text).unwrap();
    let ids = encode(ckpt.tokenizer().unwrap(), &text).unwrap();
    let r = perplexity(
        &decoder,
        &ids[..512],
        &PerplexityOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(r.scored, 511);
    (r.ppl, r.top1_acc)
}

#[test]
fn smollm2_sotu_2016_perplexity_matches_independent_reference() {
    let (ppl, top1) = ppl_first_512(
        "models/smollm2-135m-instruct/model.gguf",
        assets().join("data/sotu/2016_barack_obama_d.txt"),
    );
    assert!(
        (ppl - 24.84).abs() <= 0.3,
        "PPL {ppl} (reference 24.84 ± 0.3)"
    );
    assert!(
        (top1 - 0.364).abs() <= 0.01,
        "top-1 {top1} (reference 0.364)"
    );
}

#[test]
fn qwen_coder_functools_perplexity_matches_independent_reference() {
    let (ppl, _) = ppl_first_512(
        "models/qwen2.5-coder-0.5b-instruct/model.gguf",
        assets().join("data/cpython3.11-stdlib/functools.py"),
    );
    assert!(
        (ppl - 5.96).abs() <= 0.2,
        "PPL {ppl} (reference 5.96 ± 0.2)"
    );
}

#[test]
fn smollm2_arc_easy_first_200_matches_independent_reference() {
    let ckpt = Checkpoint::open(assets().join("models/smollm2-135m-instruct/model.gguf")).unwrap();
    let model = load_decoder(&ckpt).unwrap();
    let path = task_path(&assets().join("data/oe_eval_tasks"), "arc_easy").unwrap();
    let docs = load_requests(&path, Some(200)).unwrap();
    assert_eq!(docs.len(), 200);
    let tok = ckpt.tokenizer().unwrap();
    let scores: Vec<_> = docs
        .iter()
        .map(|d| score_doc(&model, tok, d, 2, 2048).unwrap())
        .collect();
    let r = summarize("arc_easy", &scores);
    assert!(
        (r.acc - 0.50).abs() <= 0.03,
        "ARC-Easy acc {} (reference 0.50 ± 0.03)",
        r.acc
    );
    assert!(r.acc_norm > 0.3, "acc_norm {} near chance", r.acc_norm);
}

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_care-convert"))
}

#[test]
fn cli_eval_writes_json_report_and_rejects_bad_options() {
    let a = assets();
    let out = tempfile::tempdir().unwrap();
    let json_path = out.path().join("report.json");
    let o = cli()
        .args([
            "eval",
            "--quiet",
            "--format",
            "json",
            "--max-tokens",
            "96",
            "--window",
            "48",
        ])
        .arg("--model")
        .arg(a.join("models/smollm2-135m-instruct/model.gguf"))
        .arg("--ppl")
        .arg(a.join("data/sotu/2016_barack_obama_d.txt"))
        .args(["--tasks", "boolq,winogrande", "--limit", "3"])
        .arg("--json")
        .arg(&json_path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Two non-overlapping windows of 48: the first token of each is context only.
    assert_eq!(v["perplexity"][0]["result"]["scored"], 94);
    assert_eq!(v["perplexity"][0]["result"]["windows"], 2);
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);
    assert_eq!(v["tasks"][0]["docs"], 3);
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(file["tasks"], v["tasks"]);

    // Unknown task: exit 2, message names it and lists the known ones, before loading.
    let o = cli()
        .args(["eval", "--tasks", "arc_medium", "--model"])
        .arg(a.join("models/smollm2-135m-instruct/model.gguf"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown task `arc_medium`") && err.contains("arc_easy"),
        "{err}"
    );

    // Missing model file: exit 2 naming the path.
    let o = cli()
        .args(["eval", "--ppl"])
        .arg(a.join("data/cpython3.11-stdlib/functools.py"))
        .args(["--model", "/nonexistent/m.gguf"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/m.gguf"));

    // Stride larger than the window is rejected.
    let o = cli()
        .args([
            "eval", "--quiet", "--window", "16", "--stride", "32", "--ppl",
        ])
        .arg(a.join("data/cpython3.11-stdlib/functools.py"))
        .arg("--model")
        .arg(a.join("models/smollm2-135m-instruct/model.gguf"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("stride 32 must be in 1..=16"));
}
