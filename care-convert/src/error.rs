//! The crate's error type.

use std::path::PathBuf;

/// Errors of conversion and evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] mla_attention::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An evaluation or data file does not have the expected content.
    #[error("{path}: {reason}")]
    BadData { path: PathBuf, reason: String },
    /// A user-supplied option is out of range or inconsistent.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The model produced NaN or infinite values.
    #[error("non-finite values in {0}")]
    NonFinite(String),
    /// A factorization failed (the numeric fact is in the inner error).
    #[error(transparent)]
    Factor(#[from] crate::factorize::FactorError),
    /// A rank plan or budget is infeasible.
    #[error(transparent)]
    Ranks(#[from] crate::ranks::RankError),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
