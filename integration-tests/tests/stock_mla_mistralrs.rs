//! Convert real SmolLM2-135M and Qwen2.5-Coder-0.5B (q/k/v biases folded) into stock
//! DeepSeek-V2 MLA with care-convert, load the output with mistral.rs 0.8.1 on CPU
//! through its public API (`deepseekv2`, f32), and check that it computes what our
//! runtime computes:
//!
//! - logits at every position of a real prompt (mistral.rs's raw-logits response has one
//!   row per prompt position): max |Δ| reported, argmax equal on ≥ 99 %;
//! - greedy generation of 32 tokens identical, token by token through raw logits and as
//!   text through mistral.rs's own generation loop (KV cache, sampler).
//!
//! The same checks run on a *healed* SmolLM2 (a few distillation updates on real text):
//! healing keeps the stock format, so mistral.rs must load it unchanged.
//!
//! Needs the assets of `scripts/fetch_assets.py` (the GGUF models, ExLlamaV2 calibration
//! text, SOTU); `scripts/test.sh` fetches them.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use care_convert::eval::run::NoProgress;
use care_convert::export::deepseek::SaveDtype;
use care_convert::heal::data::{pack, CorpusOptions};
use care_convert::heal::student::{StudentParams, TrainScope};
use care_convert::heal::train::{HealOptions, Healer};
use care_convert::heal::{prepare_output, write_healed};
use care_convert::jobs::{Calibration, StockJob, StockLayout};
use mistralrs_core::{
    Constraint, MistralRs, ModelSelected, NormalRequest, Request, RequestMessage, Response,
    SamplingParams,
};
use mla_attention::io::{tokenizer, Checkpoint};
use mla_attention::load::load_decoder;

const PROMPT_TOKENS: usize = 40;
const GEN_TOKENS: usize = 32;

use test_support::assets;

/// Convert `model` (real weights, real calibration text) into `out`.
fn convert(model_name: &str, kv_lora_rank: usize, samples: usize, out: &Path) -> Result<()> {
    convert_with(model_name, kv_lora_rank, samples, None, out)
}

/// [`convert`] of the model read with `rope_scaling` in place of its own (a Llama 3 scaling
/// on SmolLM2 makes the export carry DeepSeek YaRN keys): `care-convert mla`'s own job with
/// real calibration text, the source opened by the test.
fn convert_with(
    model_name: &str,
    kv_lora_rank: usize,
    samples: usize,
    rope_scaling: Option<mla_attention::config::RopeScaling>,
    out: &Path,
) -> Result<()> {
    let src = assets().join(format!("models/{model_name}/model.gguf"));
    let job = StockJob {
        model: src.clone(),
        layout: StockLayout {
            kv_lora_rank: Some(kv_lora_rank),
            rope_dim: Some(32),
            freqfold: Some(2),
            ..Default::default()
        },
        calibration: Calibration {
            samples,
            seed: 7,
            ..Default::default()
        },
        dtype: SaveDtype::F32,
    };
    let mut ckpt = Checkpoint::open(&src)
        .with_context(|| format!("{} (run scripts/fetch_assets.py)", src.display()))?;
    if let Some(r) = rope_scaling {
        ckpt.spec.rope_scaling = r;
    }
    let original = load_decoder(&ckpt)?;
    let conv = job.convert_loaded(ckpt, original, &mut NoProgress)?;
    job.write(&conv, out)?;
    Ok(())
}

/// The prompt: the first tokens of a real speech (held out from calibration).
fn prompt(tok: &tokenizers::Tokenizer) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(assets().join("data/sotu/2016_barack_obama_d.txt"))?;
    let ids = tokenizer::encode(tok, &text)?;
    Ok(ids[..PROMPT_TOKENS].to_vec())
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Parser)]
struct Selector {
    #[command(subcommand)]
    model: ModelSelected,
}

async fn load_mistralrs(dir: &Path) -> Result<Arc<MistralRs>> {
    let sel = Selector::try_parse_from([
        "x",
        "plain",
        "-m",
        dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?,
        "-a",
        "deepseekv2",
        "--dtype",
        "f32",
    ])?;
    mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder::new()
        .with_model(sel.model)
        .with_cpu(true)
        .with_max_seqs(1)
        .with_token_source(mistralrs_core::TokenSource::None)
        .build()
        .await
}

fn request(
    messages: RequestMessage,
    sampling: SamplingParams,
    raw: bool,
    id: usize,
) -> (Request, tokio::sync::mpsc::Receiver<Response>) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut r = NormalRequest::new_simple(messages, sampling, tx, id, None, None);
    r.return_raw_logits = raw;
    r.constraint = Constraint::None;
    (Request::Normal(Box::new(r)), rx)
}

/// Logits at every position of `ids` as mistral.rs computes them (its raw-logits
/// response holds one row per prompt position).
async fn raw_logits(m: &MistralRs, ids: &[u32], id: usize) -> Result<Vec<Vec<f32>>> {
    let mut s = SamplingParams::deterministic();
    s.max_len = Some(1);
    let (req, mut rx) = request(RequestMessage::CompletionTokens(ids.to_vec()), s, true, id);
    m.get_sender(None)?.send(req).await?;
    match rx.recv().await {
        Some(Response::Raw { logits_chunks, .. }) => {
            let mut rows = Vec::new();
            for chunk in &logits_chunks {
                let c = chunk.to_dtype(candle_core::DType::F32)?;
                let c = c.reshape(((), c.dims().last().copied().unwrap_or(0)))?;
                rows.extend(c.to_vec2::<f32>()?);
            }
            if rows.len() != ids.len() {
                bail!("{} logit rows for {} prompt tokens", rows.len(), ids.len());
            }
            Ok(rows)
        }
        Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
            bail!("mistral.rs: {e}")
        }
        Some(Response::CompletionModelError(e, _)) | Some(Response::ModelError(e, _)) => {
            bail!("mistral.rs: {e}")
        }
        Some(Response::CompletionDone(c)) => bail!(
            "mistral.rs answered a raw-logits request with a completion: {:?}",
            c.choices.first().map(|c| &c.text)
        ),
        Some(_) => bail!("unexpected response type to a raw-logits request"),
        None => bail!("mistral.rs closed the response channel"),
    }
}

async fn greedy_text(m: &MistralRs, ids: &[u32]) -> Result<String> {
    let mut s = SamplingParams::deterministic();
    s.max_len = Some(GEN_TOKENS);
    let (req, mut rx) = request(
        RequestMessage::CompletionTokens(ids.to_vec()),
        s,
        false,
        9999,
    );
    m.get_sender(None)?.send(req).await?;
    loop {
        match rx.recv().await {
            Some(Response::CompletionDone(c)) => {
                return Ok(c
                    .choices
                    .first()
                    .map(|c| c.text.clone())
                    .unwrap_or_default())
            }
            Some(Response::CompletionChunk(_)) => continue,
            Some(Response::CompletionModelError(e, _)) => bail!("mistral.rs: {e}"),
            Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                bail!("mistral.rs: {e}")
            }
            Some(_) => bail!("unexpected response type"),
            None => bail!("mistral.rs closed the response channel"),
        }
    }
}

#[test]
fn converted_smollm2_runs_identically_in_mistralrs() -> Result<()> {
    check_against_mistralrs("smollm2-135m-instruct", 160, 128)
}

/// Qwen2 has q/k/v biases: the query bias goes through a q-LoRA with an anchored norm,
/// the key/value biases through the latent anchor; mistral.rs must agree on both.
#[test]
fn converted_qwen_with_folded_biases_runs_identically_in_mistralrs() -> Result<()> {
    check_against_mistralrs("qwen2.5-coder-0.5b-instruct", 96, 32)
}

/// A converted SmolLM2 healed for a few updates on real text (SOTU speeches other than the
/// prompt's) still loads in mistral.rs unchanged and computes what our runtime computes.
#[test]
fn healed_smollm2_runs_identically_in_mistralrs() -> Result<()> {
    let model_name = "smollm2-135m-instruct";
    let tmp = tempfile::tempdir()?;
    let student = tmp.path().join("mla");
    convert(model_name, 160, 128, &student)?;
    let teacher_path = assets().join(format!("models/{model_name}/model.gguf"));
    let teacher = load_decoder(&Checkpoint::open(&teacher_path)?)?;
    let ckpt = Checkpoint::open(&student)?;
    let sotu = assets().join("data/sotu");
    let corpus = pack(
        ckpt.tokenizer()?,
        ckpt.spec.eos_token_id,
        &CorpusOptions {
            sources: vec![
                sotu.join("2015_barack_obama_d.txt"),
                sotu.join("2014_barack_obama_d.txt"),
            ],
            exclude: vec![sotu.join("2016_barack_obama_d.txt")],
            seq_len: 64,
            max_tokens: 1024,
            heldout_sequences: 2,
            seed: 3,
        },
        &mut |_, _| {},
    )?;
    let params = StudentParams::open(&student, TrainScope::Attention, &candle_core::Device::Cpu)?;
    let before = params.trainable_tensors()?;
    let opts = HealOptions {
        micro_batch: 2,
        grad_accum: 1,
        tokens: 256,
        lr: 1e-4,
        min_lr_ratio: 0.1,
        warmup_ratio: 0.0,
        beta: 1.0,
        tau: 1.0,
        weight_decay: 0.01,
        adam_beta1: 0.9,
        adam_beta2: 0.95,
        clip: 1.0,
        scope: TrainScope::Attention,
        eval_every: 0,
        eval_sequences: 2,
        save_every: 0,
        seed: 3,
    };
    let healed = tmp.path().join("healed");
    prepare_output(&student, &healed)?;
    let mut h = Healer::new(&teacher, params, &corpus, opts, &healed.join("heal"), false)?;
    let done = h.run(None, &mut |_, _| {}, &mut |_, _| Ok(()))?;
    assert_eq!(done.steps_done, 2);
    write_healed(
        &healed,
        &h.student,
        candle_core::DType::F32,
        &serde_json::json!({"updates": 2}),
    )?;
    // Healing changed the attention weights (the check below is not of the student again).
    let after = h.student.trainable_tensors()?;
    let name = "model.layers.0.self_attn.kv_b_proj.weight";
    let moved = (&after[name] - &before[name])?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(moved > 0.0, "healing left {name} unchanged");
    eprintln!("healed {name}: max |Δw| = {moved:.3e} after 2 updates");
    check_dir_against_mistralrs(model_name, &healed)
}

/// mistral.rs reads the YaRN keys of a converted model whose source had Llama 3 RoPE
/// scaling (SmolLM2 read with a Llama 3 scaling: window 512, factor 4) as our runtime
/// does — frequencies, the mscale ratio and the softmax scale (`attention_factor` is an
/// extra key it must ignore).
#[test]
fn yarn_export_runs_identically_in_mistralrs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("mla-yarn");
    let scaling =
        mla_attention::config::RopeScaling::Llama3(mla_attention::config::Llama3RopeScaling {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 512,
        });
    convert_with("smollm2-135m-instruct", 160, 128, Some(scaling), &out)?;
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
    assert_eq!(
        cfg["rope_scaling"]["type"], "yarn",
        "{}",
        cfg["rope_scaling"]
    );
    check_dir_against_mistralrs("smollm2-135m-instruct (YaRN)", &out)
}

fn check_against_mistralrs(model_name: &str, kv_lora_rank: usize, samples: usize) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("mla");
    convert(model_name, kv_lora_rank, samples, &out)?;
    check_dir_against_mistralrs(model_name, &out)
}

fn check_dir_against_mistralrs(model_name: &str, out: &Path) -> Result<()> {
    let out = out.to_path_buf();

    // Our runtime on the exported checkpoint.
    let ckpt = Checkpoint::open(&out)?;
    assert!(ckpt.spec.mla.is_some(), "export did not resolve as MLA");
    let ours = load_decoder(&ckpt)?;
    let tok = ckpt.tokenizer()?.clone();
    let ids = prompt(&tok)?;
    let logits = ours
        .forward(&ids, &mut ours.new_cache())?
        .to_vec2::<f32>()?;
    let mut our_gen = Vec::new();
    {
        let mut cache = ours.new_cache();
        let mut step = ours.forward(&ids, &mut cache)?.to_vec2::<f32>()?;
        for _ in 0..GEN_TOKENS {
            let next = argmax(step.last().unwrap());
            our_gen.push(next);
            step = ours.forward(&[next], &mut cache)?.to_vec2::<f32>()?;
        }
    }

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let m = load_mistralrs(&out).await?;
        let (mut max_abs, mut max_ref, mut agree) = (0f32, 0f32, 0usize);
        let all = raw_logits(&m, &ids, 1).await?;
        for (theirs, mine) in all.iter().zip(&logits) {
            assert_eq!(theirs.len(), mine.len(), "vocab size");
            for (a, b) in theirs.iter().zip(mine) {
                max_abs = max_abs.max((a - b).abs());
                max_ref = max_ref.max(b.abs());
            }
            agree += usize::from(argmax(theirs) == argmax(mine));
        }
        let share = agree as f64 / ids.len() as f64;
        eprintln!(
            "{model_name}: mistral.rs vs ours over {} positions: max |Δlogit| = {max_abs:.3e} \
             (max |logit| {max_ref:.1}), argmax agreement {:.1} %",
            ids.len(),
            100.0 * share
        );
        assert!(share >= 0.99, "argmax agreement {share}");
        assert!(max_abs < 1e-2 * max_ref.max(1.0), "max |Δlogit| {max_abs}");

        // Greedy token by token through mistral.rs's raw logits.
        let mut ctx = ids.clone();
        for (i, &want) in our_gen.iter().enumerate() {
            let l = raw_logits(&m, &ctx, 1000 + i).await?;
            let got = argmax(l.last().expect("non-empty prompt"));
            assert_eq!(got, want, "greedy token {i} differs");
            ctx.push(got);
        }
        // And through mistral.rs's own generation loop (KV cache, sampler).
        let text = greedy_text(&m, &ids).await?;
        let want = tokenizer::decode(&tok, &our_gen)?;
        eprintln!("greedy continuation: {want:?}");
        // mistral.rs's completion text drops the leading space of the first generated
        // token; the token-by-token check above already pinned the ids.
        assert_eq!(
            text.trim_start(),
            want.trim_start(),
            "mistral.rs generation differs from ours"
        );
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(())
}
