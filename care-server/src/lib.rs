//! `care-server`: mistral.rs 0.8.1's OpenAI-compatible server with Infinigram speculative
//! decoding, built only on mistral.rs's public API (no patched mistral.rs).
//!
//! - [`config`]: the command line (mistral.rs's `ModelSelected` subcommand plus
//!   `--infinigram-*` flags) and the `[infinigram]` TOML table.
//! - [`engine`]: mistral.rs's plain engine and, with an index, the [`draft_engine`] beside it;
//!   the index is opened, verified and checked against the model's tokenizer before any
//!   model loads.
//! - [`draft_engine`]: our draft/verify loop (n-gram drafts from `infinigram-spec`, greedy
//!   verification by the target in one batched pass per step, continuous batching), the route
//!   that works on unpatched mistral.rs 0.8.1.
//! - [`routes`]: stock routes, overridden chat/completions, `/v1/infinigram/stats`.
//!
//! `docs/SERVING.md` explains the choice of this route over the alternatives, with
//! measurements.

pub mod config;
pub mod draft_engine;
pub mod engine;
mod error;
pub mod routes;
pub mod stats;

pub use error::{Error, Result};

use std::net::SocketAddr;
use std::sync::Arc;

/// A server bound to its socket, not yet serving.
pub struct Server {
    pub addr: SocketAddr,
    listener: tokio::net::TcpListener,
    router: axum::Router,
}

impl Server {
    /// Checks the configuration, loads the engines and binds `ip:port` (port 0: any free one).
    /// Nothing listens unless everything succeeded.
    pub async fn start(args: &config::Args) -> anyhow::Result<Server> {
        let infinigram = args.resolve_infinigram()?;
        if let Some(c) = &infinigram {
            tracing::info!(config = ?c, "infinigram speculative decoding enabled");
        }
        let stats = Arc::new(stats::SpecStats::default());
        let engines = engine::build_engines(
            &args.model,
            args.max_seqs as usize,
            infinigram.as_ref(),
            Arc::clone(&stats),
        )
        .await?;
        let app = routes::AppState {
            engines: Arc::new(engines),
            stats,
        };
        let router = routes::router(app).await?;
        let listener = tokio::net::TcpListener::bind((args.serve_ip.as_str(), args.port)).await?;
        let addr = listener.local_addr()?;
        Ok(Server {
            addr,
            listener,
            router,
        })
    }

    /// Serves until the process ends.
    pub async fn serve(self) -> std::io::Result<()> {
        axum::serve(self.listener, self.router).await
    }
}
