//! `care-server`: mistral.rs 0.8.1's OpenAI-compatible server with Infinigram speculative
//! decoding, built only on mistral.rs's public API (no patched mistral.rs).
//!
//! - [`config`]: the command line (mistral.rs's `ModelSelected` subcommand plus
//!   `--infinigram-*` flags) and the `[infinigram]` TOML table.
//! - [`engine`]: mistral.rs's engine and ours (`mla_attention::engine::Engine` over a paged
//!   model of the same weights, drafting with an index); the index is opened, verified and
//!   checked against the model's tokenizer before any model loads.
//! - [`worker`]: the thread that owns our engine and relays its events to the routes.
//! - [`routes`]: stock routes, overridden chat/completions, `/v1/infinigram/stats`.
//!
//! `docs/SERVING.md` explains the choice of this route over the alternatives, with
//! measurements.

pub mod config;
pub mod engine;
mod error;
pub mod routes;
pub mod worker;

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
        let stats = Arc::new(infinigram_spec::spec::SpecStats::default());
        let engines = engine::build_engines(
            &args.model,
            engine::EngineOptions {
                max_seqs: args.max_seqs as usize,
                prefix_cache_n: args.prefix_cache_n,
                infinigram: infinigram.as_ref(),
                engine: args.engine,
                kv_cache_mib: args.kv_cache_mib as usize,
                stats: Arc::clone(&stats),
            },
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
