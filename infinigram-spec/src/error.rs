//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

/// A part of an index file, named in corruption errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The fixed-size header at offset 0.
    Header,
    /// The table that describes every shard.
    ShardTable,
    /// A shard's token array.
    Tokens,
    /// A shard's suffix array.
    SuffixArray,
    /// A shard's document offsets.
    DocumentOffsets,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Header => "header",
            Section::ShardTable => "shard table",
            Section::Tokens => "token array",
            Section::SuffixArray => "suffix array",
            Section::DocumentOffsets => "document offsets",
        })
    }
}

/// Shard number for messages: `" (shard 3)"` or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLabel(pub Option<usize>);

impl fmt::Display for ShardLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, " (shard {s})"),
            None => Ok(()),
        }
    }
}

/// Everything that can go wrong while building, opening or querying an index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the index magic bytes.
    #[error("{}: not an infinigram-spec index (bad magic bytes)", path.display())]
    BadMagic { path: PathBuf },
    /// The file was written by a format version this build cannot read.
    #[error("{}: unsupported index format version {found} (this build reads version {supported})", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A section of the index is truncated, inconsistent or fails its checksum.
    #[error("{}: corrupt {section}{shard}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        section: Section,
        shard: ShardLabel,
        reason: String,
    },
    /// A query or input token is not below the index's vocabulary size.
    #[error("token id {token} is out of range for vocabulary size {vocab_size}")]
    TokenOutOfRange { token: u64, vocab_size: u32 },
    /// The vocabulary cannot be stored (too large for the 32-bit suffix-array path).
    #[error("vocabulary size {vocab_size} is not supported (must be 1..={max})")]
    VocabTooLarge { vocab_size: u64, max: u64 },
    /// The configured shard size is outside the supported range.
    #[error("shard size of {shard_tokens} tokens is not supported (must be 2..={max})")]
    ShardSize { shard_tokens: u64, max: u64 },
    /// One document does not fit into a single shard.
    #[error("document {doc} has {tokens} tokens, more than the shard size of {shard_tokens} (raise --shard-tokens)")]
    DocumentTooLarge {
        doc: u64,
        tokens: u64,
        shard_tokens: u64,
    },
    /// A pre-tokenized input file is malformed.
    #[error("{}: malformed token stream at byte {offset}: {reason}", path.display())]
    TokenStream {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The tokenizer could not be loaded or failed on a document.
    #[error("{}: tokenizer error: {source}", path.display())]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// libsais rejected a shard.
    #[error("suffix array construction failed for shard {shard}: {source}")]
    Libsais {
        shard: usize,
        #[source]
        source: libsais::LibsaisError,
    },
    /// An external program (infini-gram's indexer, Python) failed.
    #[error("{}: {reason}", program.display())]
    External { program: PathBuf, reason: String },
    /// The corpus has no documents.
    #[error("no input documents")]
    NoInput,
    /// An argument of a drafting, policy or generation call is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The target model broke its contract (wrong number of logit rows, no finite logit).
    #[error("target model: {0}")]
    Target(String),
    /// Writing a draft log failed.
    #[error("draft log: {0}")]
    Log(#[source] std::io::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        section: Section,
        shard: Option<usize>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            path: path.into(),
            section,
            shard: ShardLabel(shard),
            reason: reason.into(),
        }
    }
}
