//! The crate's error type. Every variant names what was being read or computed, so a
//! message points at the file, tensor or layer at fault.

use std::path::PathBuf;

/// Errors of model loading, the reference forward and the MLA layers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its bytes do not follow the format.
    #[error("{path}: malformed {format} file: {reason}")]
    Malformed {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// A tensor stored in a type we cannot decode.
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedDType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    /// A tensor has the wrong shape for the configured architecture.
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    /// The checkpoint's architecture is not one this crate implements.
    #[error("{path}: unsupported architecture `{arch}` (supported: {supported})")]
    UnsupportedArchitecture {
        path: PathBuf,
        arch: String,
        supported: &'static str,
    },
    /// A configuration value is missing or out of range.
    #[error("{path}: invalid config: {reason}")]
    InvalidConfig { path: PathBuf, reason: String },
    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A tensor contains NaN or infinity where finite values are required.
    #[error("non-finite values in {what}")]
    NonFinite { what: String },
    /// An argument (token id, position, shape) is out of range.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The paged latent cache has too few free blocks for an append or fork; nothing
    /// was written.
    #[error(
        "latent cache full: layer {layer} needs {needed_blocks} more block(s), \
         {free_blocks} free of {total_blocks}"
    )]
    CacheFull {
        layer: usize,
        needed_blocks: usize,
        free_blocks: usize,
        total_blocks: usize,
    },
    /// A sequence id the paged cache does not hold (never added, or already freed).
    #[error("unknown sequence {seq}")]
    UnknownSequence { seq: u64 },
    /// Latent rows or queries whose width does not match the layer's `rank + rope`.
    #[error("layer {layer}: {what} has width {got}, expected {expected}")]
    WidthMismatch {
        layer: usize,
        what: &'static str,
        got: usize,
        expected: usize,
    },
    /// A block id outside the pool, or a block table too short for its length.
    #[error("bad block {block} (pool has {num_blocks} blocks): {reason}")]
    BadBlock {
        block: usize,
        num_blocks: usize,
        reason: String,
    },
    /// A tensor operation failed (shape errors inside the math are bugs or bad weights).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for this crate's results.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn malformed(
        path: impl Into<PathBuf>,
        format: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Error::Malformed {
            path: path.into(),
            format,
            reason: reason.into(),
        }
    }
}
