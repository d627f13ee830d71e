//! Measures what each zero-patch integration route costs in mistral.rs 0.8.1 on this machine
//! (numbers for `docs/SERVING.md`), with the real SmolLM2-135M-Instruct GGUF:
//!
//! 1. plain decoding: ms per generated token (greedy, one sequence);
//! 2. route (b), a draft/verify loop of `return_raw_logits` requests: the time of one raw
//!    request over contexts of growing length (raw requests never enter the prefix cache,
//!    `pipeline/response.rs:108-130`, so every verify step re-runs the whole context);
//! 3. route (a), the stock `SpeculativePipeline` with the null drafter, at several γ, with an
//!    oracle hook that drafts the true greedy continuation (every draft accepted: the best
//!    case) and with one that drafts a wrong token (nothing accepted: the worst case). Outputs
//!    are compared with plain decoding.
//!
//! `cargo run --release -p care-server --example route_probe -- [ASSETS]`

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{IndexOp, Tensor};
use care_server::adapters::SIGNATURE_THRESHOLD;
use care_server::engine::{build_plain, build_speculative, SIGNATURE_TOKEN};
use mistralrs_core::{
    CustomLogitsProcessor, MistralRs, ModelDType, ModelSelected, NormalRequest, Request,
    RequestMessage, Response, SamplingParams,
};

/// Drafts `truth[k]` for the k-th generated position, or a fixed wrong token.
struct OracleHook {
    prompt_len: usize,
    truth: Option<Vec<u32>>,
}

impl CustomLogitsProcessor for OracleHook {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let sig = logits.i(SIGNATURE_TOKEN as usize)?.to_scalar::<f32>()?;
        if sig <= SIGNATURE_THRESHOLD {
            return Ok(logits.clone());
        }
        let k = context.len().saturating_sub(self.prompt_len);
        let token = match &self.truth {
            Some(t) => t.get(k).copied().unwrap_or(1),
            None => 1,
        };
        let n = logits.dim(0)?;
        let mut v = vec![0f32; n];
        v[token as usize] = 1.0e4;
        Tensor::from_vec(v, n, logits.device())
    }
}

/// Records the argmax of every (plain, greedy) sampling call: the generated token ids.
#[derive(Default)]
struct RecordHook(std::sync::Mutex<Vec<u32>>);

impl CustomLogitsProcessor for RecordHook {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let id = logits.argmax(0)?.to_scalar::<u32>()?;
        self.0.lock().expect("record").push(id);
        Ok(logits.clone())
    }
}

/// Greedy generation; returns (text, completion tokens, seconds).
async fn generate(
    engine: &Arc<MistralRs>,
    prompt: &[u32],
    max_tokens: usize,
    hook: Option<Arc<dyn CustomLogitsProcessor>>,
) -> Result<(String, usize, f64)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut params = SamplingParams::deterministic();
    params.max_len = Some(max_tokens);
    let mut req = NormalRequest::new_simple(
        RequestMessage::CompletionTokens(prompt.to_vec()),
        params,
        tx,
        engine.next_request_id(),
        None,
        None,
    );
    req.logits_processors = hook.map(|h| vec![h]);
    let t0 = Instant::now();
    engine
        .get_sender(None)?
        .send(Request::Normal(Box::new(req)))
        .await?;
    match rx.recv().await {
        Some(Response::CompletionDone(c)) => {
            let secs = t0.elapsed().as_secs_f64();
            Ok((c.choices[0].text.clone(), c.usage.completion_tokens, secs))
        }
        Some(Response::CompletionModelError(m, _)) | Some(Response::ModelError(m, _)) => {
            bail!("model error: {m}")
        }
        Some(other) => bail!("unexpected response {:?}", std::mem::discriminant(&other)),
        None => bail!("no response"),
    }
}

async fn raw(engine: &Arc<MistralRs>, tokens: &[u32]) -> Result<f64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let mut req = NormalRequest::new_simple(
        RequestMessage::CompletionTokens(tokens.to_vec()),
        SamplingParams::deterministic(),
        tx,
        engine.next_request_id(),
        None,
        None,
    );
    req.return_raw_logits = true;
    let t0 = Instant::now();
    engine
        .get_sender(None)?
        .send(Request::Normal(Box::new(req)))
        .await?;
    match rx.recv().await {
        Some(Response::Raw { logits_chunks, .. }) if !logits_chunks.is_empty() => {
            Ok(t0.elapsed().as_secs_f64())
        }
        _ => bail!("no raw logits"),
    }
}

/// Builds a speculative engine with γ = `gamma` and generates with an oracle and a wrong
/// drafter; returns (oracle text, ms/token, wrong-draft text, ms/token).
async fn speculative_run(
    model: &ModelSelected,
    tokenizer_path: &std::path::Path,
    vocab: usize,
    gamma: usize,
    prompt: &[u32],
    truth: Vec<u32>,
    gen: usize,
) -> Result<(String, f64, String, f64)> {
    let (spec, _dir) = build_speculative(model, 1, tokenizer_path, vocab, gamma).await?;
    let oracle: Arc<dyn CustomLogitsProcessor> = Arc::new(OracleHook {
        prompt_len: prompt.len(),
        truth: Some(truth),
    });
    generate(&spec, prompt, 8, Some(Arc::clone(&oracle))).await?; // warm-up
    let (best_text, bn, best) = generate(&spec, prompt, gen, Some(oracle)).await?;
    let wrong: Arc<dyn CustomLogitsProcessor> = Arc::new(OracleHook {
        prompt_len: prompt.len(),
        truth: None,
    });
    let (worst_text, wn, worst) = generate(&spec, prompt, gen, Some(wrong)).await?;
    Ok((
        best_text,
        1e3 * best / bn as f64,
        worst_text,
        1e3 * worst / wn as f64,
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let only_spec = std::env::var("PROBE_ONLY_SPEC").is_ok();
    let assets = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/care-assets")
        });
    let dir = assets.join("models/smollm2-135m-instruct");
    let model = ModelSelected::GGUF {
        tok_model_id: None,
        quantized_model_id: dir.display().to_string(),
        quantized_filename: "model.gguf".into(),
        dtype: ModelDType::Auto,
        topology: None,
        max_seq_len: 4096,
        max_batch_size: 1,
    };
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer =
        tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n";
    let prompt: Vec<u32> = tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .get_ids()
        .to_vec();
    let gen = 64;

    let plain = build_plain(&model, 1).await?;
    generate(&plain, &prompt, 8, None).await?; // warm-up
    let record = Arc::new(RecordHook::default());
    let (plain_text, n, secs) =
        generate(&plain, &prompt, gen, Some(Arc::clone(&record) as _)).await?;
    let truth = record.0.lock().expect("record").clone();
    let plain_ms = 1e3 * secs / n as f64;
    println!("plain: {n} tokens in {secs:.3} s = {plain_ms:.1} ms/token");

    // Route (b): one raw-logits request per verify step, context re-run every time.
    let long: Vec<u32> = tokenizer
        .encode(
            std::fs::read_to_string(assets.join("data/cpython3.11-stdlib/bisect.py"))?,
            false,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .get_ids()
        .to_vec();
    raw(&plain, &long[..16]).await?;
    for len in [16usize, 64, 128, 256, 512]
        .into_iter()
        .filter(|_| !only_spec)
    {
        let mut best = f64::INFINITY;
        for rep in 0..3 {
            // Shift the window so no two requests share a prefix.
            let s = rep * 7;
            best = best.min(raw(&plain, &long[s..s + len]).await?);
        }
        println!("raw request, {len} context tokens: {:.1} ms", best * 1e3);
    }

    // Route (a): stock speculative pipeline with oracle (all accepted) and wrong drafts.
    let vocab = tokenizer.get_vocab_size(true);
    let gammas: Vec<usize> = std::env::var("PROBE_GAMMAS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![2, 3, 4]);
    let timeout = std::time::Duration::from_secs(
        std::env::var("PROBE_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    for gamma in gammas {
        // The engine build ends with mistral.rs's one-token dummy run; run it on its own
        // thread so a hang is reported instead of waited for.
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, tp, p, t) = (
            model.clone(),
            tokenizer_path.clone(),
            prompt.clone(),
            truth.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build();
            let result = rt
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(speculative_run(&m, &tp, vocab, gamma, &p, t, gen)));
            let _ = tx.send(result);
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok((best_text, b_ms, worst_text, w_ms))) => println!(
                "speculative γ={gamma}: all accepted {b_ms:.1} ms/token ({:.2}× plain), none accepted {w_ms:.1} ms/token ({:.2}× plain); outputs equal plain: {} / {}",
                plain_ms / b_ms,
                plain_ms / w_ms,
                best_text == plain_text,
                worst_text == plain_text,
            ),
            Ok(Err(e)) => println!("speculative γ={gamma}: error: {e:#}"),
            Err(_) => {
                println!(
                    "speculative γ={gamma}: no result after {} s: the engine's dummy run did not finish (SpeculativePipeline::step deadlock)",
                    timeout.as_secs()
                );
                // The stuck engine thread cannot be cancelled.
                std::process::exit(3);
            }
        }
    }
    Ok(())
}
