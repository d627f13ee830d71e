//! The HTTP surface: mistral.rs's stock router, with `/v1/chat/completions` and
//! `/v1/completions` overridden to dispatch between the plain and the speculative engine, and
//! `GET /v1/infinigram/stats`.
//!
//! Both overrides reuse mistral.rs's own request parsing, streaming and response code
//! (`mistralrs_server_core::{chat_completion, completions}`); they only choose the engine and,
//! for the speculative one, attach an [`InfinigramHook`] as the request's logits processor.
//! The header `x-infinigram: on|off` forces the route of an eligible request (benchmarks and
//! tests compare both on one server); every response says the route it took in
//! `x-infinigram-route`.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::{Json, Router};
use mistralrs_core::{MistralRs, Request, Response};
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;
use mistralrs_server_core::openai::{ChatCompletionRequest, CompletionRequest};
use mistralrs_server_core::types::OnDoneCallback;
use mistralrs_server_core::{chat_completion, completions, handler_core};
use serde::Serialize;

use crate::adapters::InfinigramHook;
use crate::admission::{Admission, LevelSnapshot, Route, Ticket};
use crate::engine::Engines;
use crate::stats::{SpecStats, StatsSnapshot};

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub engines: Arc<Engines>,
    pub admission: Arc<Admission>,
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

/// The route forced by the `x-infinigram` header, if any.
fn forced_route(headers: &HeaderMap) -> Option<Route> {
    match headers.get("x-infinigram")?.to_str().ok()? {
        "on" => Some(Route::Speculative),
        "off" => Some(Route::Plain),
        _ => None,
    }
}

/// Greedy (temperature below mistral.rs's 1e-7 cut-off), one choice, no grammar.
fn eligible(temperature: Option<f64>, n_choices: usize, constrained: bool) -> bool {
    temperature.is_some_and(|t| t < 1e-7) && n_choices == 1 && !constrained
}

impl AppState {
    /// Admits a request and returns the engine to send it to.
    fn admit(&self, headers: &HeaderMap, eligible: bool) -> (Ticket, Arc<MistralRs>) {
        let spec = self.engines.spec.as_ref();
        let ticket = self
            .admission
            .admit(eligible && spec.is_some(), forced_route(headers));
        self.stats
            .record_request(ticket.route == Route::Speculative);
        let engine = match (ticket.route, spec) {
            (Route::Speculative, Some(s)) => Arc::clone(&s.state),
            _ => Arc::clone(&self.engines.plain),
        };
        (ticket, engine)
    }

    /// Attaches a fresh hook to a speculative request.
    fn attach_hook(&self, ticket: &Ticket, request: &mut Request) {
        let (Route::Speculative, Some(spec), Request::Normal(req)) =
            (ticket.route, self.engines.spec.as_ref(), request)
        else {
            return;
        };
        let hook = InfinigramHook::new(Arc::clone(&spec.shared), req.id as u64);
        req.logits_processors = Some(vec![Arc::new(hook)]);
        // Both engines serve the same model; the speculative one answers to the default name.
        req.model_id = None;
    }
}

fn with_route<R: IntoResponse>(route: Route, r: R) -> HttpResponse {
    let mut resp = r.into_response();
    let v = match route {
        Route::Speculative => "speculative",
        Route::Plain => "plain",
    };
    resp.headers_mut()
        .insert("x-infinigram-route", HeaderValue::from_static(v));
    resp
}

/// Hands the ticket to a streamer's completion callback (or drops it with the streamer).
fn on_done_ticket<R: 'static>(ticket: Ticket, tokens: fn(&[R]) -> usize) -> OnDoneCallback<R> {
    let slot = Mutex::new(Some(ticket));
    Box::new(move |chunks: &[R]| {
        if let Some(t) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.finish(tokens(chunks));
        }
    })
}

async fn chat(
    State(app): State<AppState>,
    headers: HeaderMap,
    Json(mut oai): Json<ChatCompletionRequest>,
) -> HttpResponse {
    let ok = eligible(oai.temperature, oai.n_choices, oai.grammar.is_some());
    let (ticket, engine) = app.admit(&headers, ok);
    let route = ticket.route;
    if route == Route::Speculative {
        oai.model = "default".into();
    }
    let (tx, mut rx) = handler_core::create_response_channel(None);
    let (mut request, streaming) =
        match chat_completion::parse_request(oai, Arc::clone(&engine), tx).await {
            Ok(x) => x,
            Err(e) => return with_route(route, chat_completion::handle_error(engine, e.into())),
        };
    app.attach_hook(&ticket, &mut request);
    if let Err(e) = handler_core::send_request(&engine, request).await {
        return with_route(route, chat_completion::handle_error(engine, e.into()));
    }
    if streaming {
        let done = on_done_ticket(
            ticket,
            |chunks: &[mistralrs_core::ChatCompletionChunkResponse]| {
                chunks
                    .iter()
                    .rev()
                    .find_map(|c| c.usage.as_ref().map(|u| u.completion_tokens))
                    .unwrap_or(chunks.len())
            },
        );
        return with_route(
            route,
            chat_completion::create_streamer(rx, engine, None, Some(done)),
        );
    }
    let resp = match rx.recv().await {
        Some(r) => {
            if let Response::Done(c) = &r {
                ticket.finish(c.usage.completion_tokens);
            }
            chat_completion::match_responses(engine, r)
        }
        None => chat_completion::handle_error(
            engine,
            anyhow::anyhow!("no response received from the model").into(),
        ),
    };
    with_route(route, resp)
}

async fn complete(
    State(app): State<AppState>,
    headers: HeaderMap,
    Json(mut oai): Json<CompletionRequest>,
) -> HttpResponse {
    let ok = eligible(oai.temperature, oai.n_choices, oai.grammar.is_some());
    let (ticket, engine) = app.admit(&headers, ok);
    let route = ticket.route;
    if route == Route::Speculative {
        oai.model = "default".into();
    }
    let (tx, mut rx) = handler_core::create_response_channel(None);
    let (mut request, streaming) = match completions::parse_request(oai, Arc::clone(&engine), tx) {
        Ok(x) => x,
        Err(e) => return with_route(route, completions::handle_error(engine, e.into())),
    };
    app.attach_hook(&ticket, &mut request);
    if let Err(e) = handler_core::send_request(&engine, request).await {
        return with_route(route, completions::handle_error(engine, e.into()));
    }
    if streaming {
        let done = on_done_ticket(
            ticket,
            |chunks: &[mistralrs_core::CompletionChunkResponse]| chunks.len(),
        );
        return with_route(
            route,
            completions::create_streamer(rx, engine, None, Some(done)),
        );
    }
    let resp = match rx.recv().await {
        Some(r) => {
            if let Response::CompletionDone(c) = &r {
                ticket.finish(c.usage.completion_tokens);
            }
            completions::match_responses(engine, r)
        }
        None => completions::handle_error(
            engine,
            anyhow::anyhow!("no response received from the model").into(),
        ),
    };
    with_route(route, resp)
}

/// What `GET /v1/infinigram/stats` returns.
#[derive(Debug, Serialize)]
pub struct StatsResponse {
    pub enabled: bool,
    pub max_draft: Option<usize>,
    pub policy: Option<crate::config::PolicyKind>,
    pub in_flight: usize,
    #[serde(flatten)]
    pub acceptance: StatsSnapshot,
    pub admission: Vec<LevelSnapshot>,
}

async fn stats(State(app): State<AppState>) -> Json<StatsResponse> {
    let spec = app.engines.spec.as_ref();
    Json(StatsResponse {
        enabled: spec.is_some(),
        max_draft: spec.map(|s| s.config.max_draft),
        policy: spec.map(|s| s.config.policy),
        in_flight: app.admission.in_flight(),
        acceptance: app.stats.snapshot(),
        admission: app.admission.levels(),
    })
}
