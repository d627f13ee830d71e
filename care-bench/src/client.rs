//! A minimal OpenAI-compatible client over loopback, and the server process it talks to.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// A `care-server` child process, killed on drop.
pub struct ServerProcess {
    child: Child,
    pub base: String,
}

impl ServerProcess {
    /// Starts `bin` with `args` and waits for its "listening on" line.
    pub fn start(bin: &Path, args: &[String]) -> Result<ServerProcess> {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let Some(line) = lines.next() else {
                let status = child.wait()?;
                bail!("care-server exited before listening ({status})");
            };
            let line = line?;
            if let Some(url) = line.strip_prefix("care-server listening on ") {
                break url.trim().to_string();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(ServerProcess { child, base })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub completion_tokens: usize,
    pub route: String,
    pub latency: Duration,
}

/// Which OpenAI endpoint a prompt goes to.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// `/v1/completions` with raw text.
    Text(String),
    /// `/v1/chat/completions` with `(role, content)` messages.
    Chat(Vec<(String, String)>),
}

impl Prompt {
    /// The prompt's text (chat: the messages' contents, one per line).
    pub fn text(&self) -> String {
        match self {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(m) => m
                .iter()
                .map(|(_, c)| c.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    pub fn body(&self, max_tokens: usize, stream: bool) -> (&'static str, Value) {
        let mut body = serde_json::json!({
            "model": "default",
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
        });
        let path = match self {
            Prompt::Text(t) => {
                body["prompt"] = Value::String(t.clone());
                "/v1/completions"
            }
            Prompt::Chat(msgs) => {
                body["messages"] = msgs
                    .iter()
                    .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
                    .collect();
                "/v1/chat/completions"
            }
        };
        (path, body)
    }
}

/// The headers of a mode: `on` / `off` / `auto` set `x-infinigram`; `host` sends the
/// request to mistral.rs itself (`x-engine: mistralrs`).
fn with_mode(req: reqwest::RequestBuilder, mode: &str) -> reqwest::RequestBuilder {
    if mode == "host" {
        req.header("x-engine", "mistralrs")
    } else {
        req.header("x-infinigram", mode)
    }
}

/// Sends one non-streaming greedy request in `mode` (see [`with_mode`]).
pub async fn complete(
    http: &reqwest::Client,
    base: &str,
    prompt: &Prompt,
    max_tokens: usize,
    mode: &str,
) -> Result<Completion> {
    let (path, body) = prompt.body(max_tokens, false);
    let t0 = Instant::now();
    let resp = with_mode(http.post(format!("{base}{path}")), mode)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    // "engine/on", "engine/off" or "mistralrs/".
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let route = format!(
        "{}/{}",
        header("x-infinigram-route"),
        header("x-infinigram-draft")
    );
    let (v, text) = read_answer(path, resp).await?;
    let completion_tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
    Ok(Completion {
        text,
        completion_tokens,
        route,
        latency: t0.elapsed(),
    })
}

/// A non-streaming response's JSON and its first choice's text (chat or completion); an
/// HTTP error status is an error carrying the body.
pub async fn read_answer(path: &str, resp: reqwest::Response) -> Result<(Value, String)> {
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&bytes));
    }
    let v: Value = serde_json::from_slice(&bytes)?;
    let choice = &v["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .ok_or_else(|| anyhow!("{path}: no text in {v}"))?
        .to_string();
    Ok((v, text))
}

/// Sends one streaming request and reads the SSE stream to `[DONE]`; returns the number of
/// content chunks.
pub async fn stream(
    http: &reqwest::Client,
    base: &str,
    prompt: &Prompt,
    max_tokens: usize,
    mode: &str,
) -> Result<usize> {
    let (path, body) = prompt.body(max_tokens, true);
    let mut resp = with_mode(http.post(format!("{base}{path}")), mode)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("{path}: HTTP {}", resp.status());
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        buf.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(buf)?;
    let mut chunks = 0;
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).with_context(|| format!("SSE line {data}"))?;
        if v.get("error").is_some() || v.get("message").is_some() && v.get("choices").is_none() {
            bail!("error event: {data}");
        }
        chunks += 1;
    }
    if !done {
        bail!("stream ended without [DONE]");
    }
    Ok(chunks)
}

/// `GET /v1/infinigram/stats`.
pub async fn stats(http: &reqwest::Client, base: &str) -> Result<Value> {
    let resp = http
        .get(format!("{base}/v1/infinigram/stats"))
        .send()
        .await?;
    Ok(serde_json::from_slice(&resp.bytes().await?)?)
}
