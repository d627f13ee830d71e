//! The crate's error type.

use std::path::PathBuf;

/// What went wrong while configuring or starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid configuration: {message}")]
    Config { path: PathBuf, message: String },
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    #[error("infinigram index {path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: infinigram_spec::Error,
    },
    #[error(
        "infinigram index {index} was built with a different tokenizer than {tokenizer} \
         (index tokenizer sha256 {index_hash}, model tokenizer sha256 {tokenizer_hash}); \
         rebuild the index with this tokenizer"
    )]
    TokenizerMismatch {
        index: PathBuf,
        tokenizer: PathBuf,
        index_hash: String,
        tokenizer_hash: String,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("writing the null drafter: {0}")]
    NullDrafter(#[source] candle_core::Error),
    #[error("mistral.rs: {0:#}")]
    Engine(anyhow::Error),
    #[error(
        "infinigram index {index} checked, but drafting cannot run: mistral.rs 0.8.1's \
         SpeculativePipeline deadlocks on its first step (pipeline/speculative.rs:577 and :580 \
         lock the draft pipeline twice in one expression), and no other public API verifies \
         several positions with a kept KV cache; see docs/SERVING.md. Serve without \
         --infinigram-index, or set CARE_SPECULATIVE_PIPELINE=force with a mistral.rs \
         that has the fix"
    )]
    SpeculativePipelineUnavailable { index: PathBuf },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
