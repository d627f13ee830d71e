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
         (index tokenizer fingerprint {index_hash}, model tokenizer fingerprint {tokenizer_hash}); \
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
    #[error("mistral.rs: {0:#}")]
    Engine(anyhow::Error),
    #[error("target model for drafting: {0}")]
    Target(String),
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
