//! The HTTP surface: mistral.rs's stock router, with `/v1/chat/completions` and
//! `/v1/completions` overridden, and `GET /v1/infinigram/stats`.
//!
//! Both overrides parse the request with mistral.rs's own code and answer with its own
//! response types and streamers (`mistralrs_server_core::{chat_completion, completions}`).
//! An eligible request (one choice, no grammar, no tools; greedy, or sampled with only
//! temperature / top-k / top-p) is decoded by our engine (`mla_attention::engine`, on the
//! paged model of the same weights, drafting with an index): mistral.rs turns its messages
//! into prompt tokens (its chat template, through a `Tokenize` request), our engine
//! generates text, and [`relay`] turns the engine's events into mistral.rs's `Response`
//! chunks. Everything else goes to mistral.rs's engine unchanged.
//!
//! The header `x-infinigram: on|off` turns drafting on or off for one eligible request (off:
//! the same engine without drafts, the reference for losslessness and speed);
//! `x-engine: mistralrs` sends an eligible request to mistral.rs instead (the host, for
//! comparisons). Every response says where it was decoded in `x-infinigram-route` (`engine`
//! or `mistralrs`) and, for our engine, `x-infinigram-draft: on|off`. `x-infinigram-seed: N` fixes the
//! seed of a sampled request (the OpenAI request of mistral.rs 0.8.1 has no `seed`), so that
//! its output can be compared with and without drafting.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use either::Either;
use mistralrs_core::{
    ChatCompletionChunkResponse, ChatCompletionResponse, Choice, ChunkChoice, CompletionChoice,
    CompletionChunkChoice, CompletionChunkResponse, CompletionResponse, Delta, MistralRs,
    NormalRequest, Request, RequestMessage, Response, ResponseMessage, StopTokens,
    TokenizationRequest, Usage,
};
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;
use mistralrs_server_core::openai::{ChatCompletionRequest, CompletionRequest};
use mistralrs_server_core::{chat_completion, completions, handler_core};
use serde::Serialize;
use tokio::sync::mpsc::{Sender, UnboundedReceiver};

use infinigram_spec::spec::{SampleParams, Sampling};

use infinigram_spec::spec::{SpecStats, StatsSnapshot};
use mla_attention::engine::{
    EngineEvent, EngineSnapshot, FinishReason, GenerationRequest, RequestStats,
};

use crate::engine::{CareEngine, Engines};
use crate::worker::Job;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engines: Arc<Engines>,
    pub stats: Arc<SpecStats>,
}

/// Builds the router: our routes first, mistral.rs's stock router for everything else.
pub async fn router(app: AppState) -> anyhow::Result<Router> {
    let stock = MistralRsServerRouterBuilder::new()
        .with_mistralrs(Arc::clone(&app.engines.plain))
        .build()
        .await?;
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(complete))
        .route("/v1/infinigram/stats", get(stats))
        .with_state(app)
        .fallback_service(stock))
}

/// Drafting as forced by the `x-infinigram` header, if any.
fn forced_draft(headers: &HeaderMap) -> Option<bool> {
    match headers.get("x-infinigram")?.to_str().ok()? {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// One choice, no grammar, no tools (the rest is checked on the parsed request).
fn eligible(n_choices: usize, constrained: bool, tools: bool) -> bool {
    n_choices == 1 && !constrained && !tools
}

/// The sampling of a parsed request if the draft-verify engine reproduces it exactly:
/// greedy (temperature below mistral.rs's 1e-7 cut-off) or temperature with top-k / top-p.
/// Penalties, logit bias, min-p, DRY, logprobs and an unset temperature (mistral.rs's own
/// default) stay with mistral.rs.
fn engine_sampling(req: &NormalRequest, seed: u64) -> Option<Sampling> {
    let p = &req.sampling_params;
    let unset = |x: Option<f32>, neutral: f32| x.is_none_or(|v| v == neutral);
    if !unset(p.frequency_penalty, 0.0)
        || !unset(p.presence_penalty, 0.0)
        || !unset(p.repetition_penalty, 1.0)
        || p.logits_bias.as_ref().is_some_and(|b| !b.is_empty())
        || p.min_p.is_some_and(|m| m > 0.0)
        || p.dry_params.is_some()
        || req.return_logprobs
        || p.n_choices != 1
    {
        return None;
    }
    let t = p.temperature?;
    if t < 1e-7 {
        return Some(Sampling::Greedy);
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(t.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return None;
    }
    Some(Sampling::Sample(SampleParams {
        temperature: t as f32,
        top_k: p.top_k.unwrap_or(0),
        top_p: top_p as f32,
        seed,
    }))
}

/// The seed of the `x-infinigram-seed` header, else one from the clock and the request id.
fn request_seed(headers: &HeaderMap, id: usize) -> u64 {
    headers
        .get("x-infinigram-seed")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (id as u64).rotate_left(32)
        })
}

fn with_headers<R: IntoResponse>(r: R, draft: Option<bool>) -> HttpResponse {
    let mut resp = r.into_response();
    let h = resp.headers_mut();
    let route = if draft.is_some() {
        "engine"
    } else {
        "mistralrs"
    };
    h.insert("x-infinigram-route", HeaderValue::from_static(route));
    if let Some(d) = draft {
        h.insert(
            "x-infinigram-draft",
            HeaderValue::from_static(if d { "on" } else { "off" }),
        );
    }
    resp
}

/// The two OpenAI shapes the engine answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Completion,
}

/// What an engine request needs besides its tokens.
struct Prepared {
    sampling: Sampling,
    job_prompt: Vec<u32>,
    max_new: usize,
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    echo: Option<String>,
    streaming: bool,
    id: usize,
    response: Sender<Response>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Prompt tokens of a parsed request, by mistral.rs's own templating and tokenizer.
async fn prompt_tokens(
    engine: &Arc<MistralRs>,
    req: &NormalRequest,
) -> anyhow::Result<(Vec<u32>, Option<String>)> {
    let (text, echo) = match &req.messages {
        RequestMessage::Chat {
            messages,
            enable_thinking,
            reasoning_effort,
        } => (
            (
                Either::Left(messages.clone()),
                *enable_thinking,
                *reasoning_effort,
            ),
            None,
        ),
        RequestMessage::Completion {
            text, echo_prompt, ..
        } => (
            (Either::Right(text.clone()), None, None),
            echo_prompt.then(|| text.clone()),
        ),
        RequestMessage::CompletionTokens(ids) => return Ok((ids.clone(), None)),
        _ => anyhow::bail!("this request kind is not served by the draft-verify engine"),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = Request::Tokenize(TokenizationRequest {
        text: text.0,
        tools: None,
        add_generation_prompt: true,
        add_special_tokens: true,
        enable_thinking: text.1,
        reasoning_effort: text.2,
        response: tx,
    });
    engine.get_sender(None)?.send(request).await?;
    let ids = rx
        .recv()
        .await
        .ok_or_else(|| anyhow::anyhow!("mistral.rs sent no prompt tokens"))??;
    Ok((ids, echo))
}

/// Parses the request's settings for the draft-verify engine.
async fn prepare(
    spec: &CareEngine,
    plain: &Arc<MistralRs>,
    req: NormalRequest,
    sampling: Sampling,
) -> anyhow::Result<Prepared> {
    let (prompt, echo) = prompt_tokens(plain, &req).await?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let max_context = spec.engine.max_context;
    if prompt.len() >= max_context {
        anyhow::bail!(
            "the prompt has {} tokens, the model's context is {max_context}",
            prompt.len()
        );
    }
    let max_new = req
        .sampling_params
        .max_len
        .unwrap_or(max_context - prompt.len());
    let (stop_ids, stop_strings) = match &req.sampling_params.stop_toks {
        Some(StopTokens::Ids(ids)) => (ids.clone(), Vec::new()),
        Some(StopTokens::Seqs(s)) => (Vec::new(), s.clone()),
        None => (Vec::new(), Vec::new()),
    };
    Ok(Prepared {
        sampling,
        job_prompt: prompt,
        max_new,
        stop_ids,
        stop_strings,
        echo,
        streaming: req.is_streaming,
        id: req.id,
        response: req.response,
    })
}

/// Everything the relay needs to shape responses.
struct Meta {
    shape: Shape,
    id: String,
    model: String,
    created: u64,
    streaming: bool,
    echo: Option<String>,
    started: Instant,
}

fn usage(s: &RequestStats, started: Instant) -> Usage {
    let total = started.elapsed().as_secs_f32().max(1e-9);
    let prompt = (s.prefill_secs as f32).max(1e-9);
    let decode = (s.decode_secs as f32).max(1e-9);
    Usage {
        completion_tokens: s.completion_tokens,
        prompt_tokens: s.prompt_tokens,
        total_tokens: s.prompt_tokens + s.completion_tokens,
        avg_tok_per_sec: (s.prompt_tokens + s.completion_tokens) as f32 / total,
        avg_prompt_tok_per_sec: s.prompt_tokens as f32 / prompt,
        avg_compl_tok_per_sec: s.completion_tokens as f32 / decode,
        total_time_sec: total,
        total_prompt_time_sec: prompt,
        total_completion_time_sec: decode,
    }
}

impl Meta {
    fn chunk(&self, text: String, finish: Option<FinishReason>, usage: Option<Usage>) -> Response {
        let finish_reason = finish.map(|f| f.as_str().to_string());
        match self.shape {
            Shape::Chat => Response::Chunk(ChatCompletionChunkResponse {
                id: self.id.clone(),
                choices: vec![ChunkChoice {
                    finish_reason,
                    index: 0,
                    delta: Delta {
                        content: Some(text),
                        role: "assistant".into(),
                        tool_calls: None,
                        reasoning_content: None,
                    },
                    logprobs: None,
                }],
                created: self.created as u128,
                model: self.model.clone(),
                system_fingerprint: "local".into(),
                object: "chat.completion.chunk".into(),
                usage,
            }),
            Shape::Completion => Response::CompletionChunk(CompletionChunkResponse {
                id: self.id.clone(),
                choices: vec![CompletionChunkChoice {
                    text,
                    index: 0,
                    logprobs: None,
                    finish_reason,
                }],
                created: self.created as u128,
                model: self.model.clone(),
                system_fingerprint: "local".into(),
                object: "text_completion".into(),
            }),
        }
    }

    fn done(&self, text: String, finish: FinishReason, usage: Usage) -> Response {
        let finish_reason = finish.as_str().to_string();
        match self.shape {
            Shape::Chat => Response::Done(ChatCompletionResponse {
                id: self.id.clone(),
                choices: vec![Choice {
                    finish_reason,
                    index: 0,
                    message: ResponseMessage {
                        content: Some(text),
                        role: "assistant".into(),
                        tool_calls: None,
                        reasoning_content: None,
                    },
                    logprobs: None,
                }],
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: "local".into(),
                object: "chat.completion".into(),
                usage,
            }),
            Shape::Completion => Response::CompletionDone(CompletionResponse {
                id: self.id.clone(),
                choices: vec![CompletionChoice {
                    finish_reason,
                    index: 0,
                    text: match &self.echo {
                        Some(p) => format!("{p}{text}"),
                        None => text,
                    },
                    logprobs: None,
                }],
                created: self.created,
                model: self.model.clone(),
                system_fingerprint: "local".into(),
                object: "text_completion".into(),
                usage,
            }),
        }
    }
}

/// Turns the engine's events for one request into mistral.rs responses on `out`.
/// Streaming sends each piece of final text as it comes and a last chunk with the finish
/// reason and usage; otherwise one response at the end. Returning drops `events`, which
/// tells the engine to drop the request (the client went away).
async fn relay(mut events: UnboundedReceiver<EngineEvent>, out: Sender<Response>, meta: Meta) {
    let mut text = String::new();
    if meta.streaming {
        if let Some(p) = &meta.echo {
            if out.send(meta.chunk(p.clone(), None, None)).await.is_err() {
                return;
            }
        }
    }
    while let Some(ev) = events.recv().await {
        match ev {
            EngineEvent::Tokens { text: piece, .. } => {
                if meta.streaming {
                    if !piece.is_empty() && out.send(meta.chunk(piece, None, None)).await.is_err() {
                        return;
                    }
                } else {
                    text += &piece;
                }
            }
            EngineEvent::Finished {
                reason,
                text: piece,
                stats,
                ..
            } => {
                text += &piece;
                finish(&out, &meta, text, piece, reason, &stats).await;
                return;
            }
            EngineEvent::Failed { message, .. } => {
                let _ = out.send(Response::ValidationError(message.into())).await;
                return;
            }
        }
    }
    let _ = out
        .send(Response::InternalError("the engine stopped".into()))
        .await;
}

/// The last response: the whole `text` (non-streaming), or the `last` piece with the
/// finish reason and usage (streaming).
async fn finish(
    out: &Sender<Response>,
    meta: &Meta,
    text: String,
    last: String,
    reason: FinishReason,
    stats: &RequestStats,
) {
    let usage = usage(stats, meta.started);
    let resp = if meta.streaming {
        meta.chunk(last, Some(reason), Some(usage))
    } else {
        meta.done(text, reason, usage)
    };
    let _ = out.send(resp).await;
}

/// Runs a parsed eligible request on our engine and answers with mistral.rs's streamer or
/// response matcher.
#[allow(clippy::too_many_arguments)]
async fn on_engine(
    app: &AppState,
    spec: &CareEngine,
    shape: Shape,
    model: String,
    headers: &HeaderMap,
    request: NormalRequest,
    sampling: Sampling,
    rx: tokio::sync::mpsc::Receiver<Response>,
) -> HttpResponse {
    let plain = Arc::clone(&app.engines.plain);
    let draft = spec.infinigram.is_some() && forced_draft(headers).unwrap_or(true);
    let error = |e: anyhow::Error| -> HttpResponse {
        let r = match shape {
            Shape::Chat => {
                chat_completion::handle_error(Arc::clone(&plain), e.into()).into_response()
            }
            Shape::Completion => {
                completions::handle_error(Arc::clone(&plain), e.into()).into_response()
            }
        };
        with_headers(r, Some(draft))
    };
    let p = match prepare(spec, &plain, request, sampling).await {
        Ok(p) => p,
        Err(e) => return error(e),
    };
    let (etx, erx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        request: GenerationRequest {
            prompt: p.job_prompt,
            max_new: p.max_new,
            stop_tokens: p.stop_ids,
            stop_strings: p.stop_strings,
            sampling: p.sampling,
            draft,
        },
        events: etx,
    };
    if let Err(e) = spec.engine.submit(job) {
        return error(anyhow::anyhow!(e));
    }
    let meta = Meta {
        shape,
        id: format!(
            "{}-{}",
            match shape {
                Shape::Chat => "chatcmpl",
                Shape::Completion => "cmpl",
            },
            p.id
        ),
        model,
        created: now_secs(),
        streaming: p.streaming,
        echo: p.echo,
        started: Instant::now(),
    };
    tokio::spawn(relay(erx, p.response, meta));
    let mut rx = rx;
    let resp = match (shape, p.streaming) {
        (Shape::Chat, true) => {
            chat_completion::create_streamer(rx, plain, None, None).into_response()
        }
        (Shape::Completion, true) => {
            completions::create_streamer(rx, plain, None, None).into_response()
        }
        (Shape::Chat, false) => match rx.recv().await {
            Some(r) => chat_completion::match_responses(plain, r).into_response(),
            None => return error(anyhow::anyhow!("no response received from the model")),
        },
        (Shape::Completion, false) => match rx.recv().await {
            Some(r) => completions::match_responses(plain, r).into_response(),
            None => return error(anyhow::anyhow!("no response received from the model")),
        },
    };
    with_headers(resp, Some(draft))
}

type Rx = tokio::sync::mpsc::Receiver<Response>;

/// Our engine and the request's sampling when it takes the request; the request back
/// otherwise (not eligible, or `x-engine: mistralrs`).
#[allow(clippy::result_large_err)]
fn route_to_engine<'a>(
    app: &'a AppState,
    eligible: bool,
    headers: &HeaderMap,
    request: Request,
    rx: Rx,
) -> std::result::Result<(&'a CareEngine, NormalRequest, Sampling, Rx), (Request, Rx)> {
    let to_host = headers
        .get("x-engine")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"mistralrs"));
    let (true, false, Some(spec), Request::Normal(req)) =
        (eligible, to_host, app.engines.care.as_ref(), &request)
    else {
        return Err((request, rx));
    };
    let Some(sampling) = engine_sampling(req, request_seed(headers, req.id)) else {
        return Err((request, rx));
    };
    let Request::Normal(req) = request else {
        unreachable!("matched above")
    };
    Ok((spec, *req, sampling, rx))
}

async fn chat(
    State(app): State<AppState>,
    headers: HeaderMap,
    Json(oai): Json<ChatCompletionRequest>,
) -> HttpResponse {
    let ok = eligible(oai.n_choices, oai.grammar.is_some(), oai.tools.is_some());
    let model = oai.model.clone();
    let engine = Arc::clone(&app.engines.plain);
    let (tx, rx) = handler_core::create_response_channel(None);
    let (request, streaming) =
        match chat_completion::parse_request(oai, Arc::clone(&engine), tx).await {
            Ok(x) => x,
            Err(e) => return with_headers(chat_completion::handle_error(engine, e.into()), None),
        };
    let (request, mut rx) = match route_to_engine(&app, ok, &headers, request, rx) {
        Ok((spec, req, sampling, rx)) => {
            return on_engine(&app, spec, Shape::Chat, model, &headers, req, sampling, rx).await
        }
        Err(x) => x,
    };
    app.stats.record_request(false);
    if let Err(e) = handler_core::send_request(&engine, request).await {
        return with_headers(chat_completion::handle_error(engine, e.into()), None);
    }
    if streaming {
        return with_headers(
            chat_completion::create_streamer(rx, engine, None, None),
            None,
        );
    }
    let resp = match rx.recv().await {
        Some(r) => chat_completion::match_responses(engine, r),
        None => chat_completion::handle_error(
            engine,
            anyhow::anyhow!("no response received from the model").into(),
        ),
    };
    with_headers(resp, None)
}

async fn complete(
    State(app): State<AppState>,
    headers: HeaderMap,
    Json(oai): Json<CompletionRequest>,
) -> HttpResponse {
    let ok = eligible(oai.n_choices, oai.grammar.is_some(), oai.tools.is_some());
    let model = oai.model.clone();
    let engine = Arc::clone(&app.engines.plain);
    let (tx, rx) = handler_core::create_response_channel(None);
    let (request, streaming) = match completions::parse_request(oai, Arc::clone(&engine), tx) {
        Ok(x) => x,
        Err(e) => return with_headers(completions::handle_error(engine, e.into()), None),
    };
    let (request, mut rx) = match route_to_engine(&app, ok, &headers, request, rx) {
        Ok((spec, req, sampling, rx)) => {
            return on_engine(
                &app,
                spec,
                Shape::Completion,
                model,
                &headers,
                req,
                sampling,
                rx,
            )
            .await
        }
        Err(x) => x,
    };
    app.stats.record_request(false);
    if let Err(e) = handler_core::send_request(&engine, request).await {
        return with_headers(completions::handle_error(engine, e.into()), None);
    }
    if streaming {
        return with_headers(completions::create_streamer(rx, engine, None, None), None);
    }
    let resp = match rx.recv().await {
        Some(r) => completions::match_responses(engine, r),
        None => completions::handle_error(
            engine,
            anyhow::anyhow!("no response received from the model").into(),
        ),
    };
    with_headers(resp, None)
}

/// What `GET /v1/infinigram/stats` returns.
#[derive(Debug, Serialize)]
pub struct StatsResponse {
    /// Drafting configured (an index).
    pub enabled: bool,
    pub max_draft: Option<usize>,
    pub policy: Option<crate::config::PolicyKind>,
    /// Our engine: active and queued requests, paged-cache occupancy, KV bytes per token,
    /// where step time goes, the policy's step-time model (absent: mistral.rs serves all).
    pub engine: Option<EngineSnapshot>,
    #[serde(flatten)]
    pub acceptance: StatsSnapshot,
}

async fn stats(State(app): State<AppState>) -> Json<StatsResponse> {
    let care = app.engines.care.as_ref();
    let ig = care.and_then(|c| c.infinigram.as_ref());
    Json(StatsResponse {
        enabled: ig.is_some(),
        max_draft: ig.map(|c| c.max_draft),
        policy: ig.map(|c| c.policy),
        engine: care.map(|s| s.engine.snapshot()),
        acceptance: app.stats.snapshot(),
    })
}
