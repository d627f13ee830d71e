//! Building an index: shard documents, sort each shard's suffixes with libsais, write.
//!
//! Documents stream in; a shard closes when the next document would take it past
//! [`BuildConfig::shard_tokens`] slots. [`BuildConfig::jobs`] shards are collected, their
//! suffix arrays built in parallel (one single-threaded libsais call per shard on the rayon
//! pool), and written in order. Peak memory is about
//! `jobs × shard_tokens × (token bytes + 4)` bytes (2 + 4 for vocabularies below 65 535,
//! 4 + 4 above), whatever the corpus size.

mod input;
mod shard;
mod writer;

pub use input::{
    collect_files, tokenizer_hash, tokenizer_mismatch, TextCorpus, TokenStream, STREAM_SEPARATOR,
};

use std::io::{BufWriter, Cursor, Seek, Write};
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format;
use crate::index::{Index, OpenOptions};
use shard::{BuiltShard, ShardInput};
use writer::IndexWriter;

/// Largest shard: libsais's 32-bit suffix array limit.
pub const MAX_SHARD_TOKENS: u64 = libsais::LIBSAIS_I32_OUTPUT_MAXIMUM_SIZE as u64;

/// Largest vocabulary: the separator of the 32-bit path must fit an `i32` symbol.
pub const MAX_VOCAB_SIZE: u64 = i32::MAX as u64 - 1;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Number of token ids; every input token must be below it. Decides the token width
    /// (2 bytes below 65 535, else 3, else 4).
    pub vocab_size: u32,
    /// Most token slots (tokens plus one separator per document) per shard.
    pub shard_tokens: u64,
    /// Shards built at the same time (0: one per rayon thread).
    pub jobs: usize,
    /// SHA-256 of the tokenizer definition, recorded in the header (zero: unknown).
    pub tokenizer_hash: [u8; 32],
}

impl BuildConfig {
    /// A config with one shard of up to 2^30 slots per rayon thread.
    pub fn new(vocab_size: u32) -> BuildConfig {
        BuildConfig {
            vocab_size,
            shard_tokens: 1 << 30,
            jobs: 0,
            tokenizer_hash: [0; 32],
        }
    }
}

/// Build progress, reported from the building thread. All methods default to nothing.
pub trait BuildProgress: Sync {
    /// Documents and tokens taken from the input so far.
    fn input(&self, _docs: u64, _tokens: u64) {}
    /// A shard's suffix array is being built.
    fn shard_started(&self, _shard: usize, _slots: u64) {}
    /// A shard has been written.
    fn shard_written(&self, _shard: usize, _slots: u64) {}
}

/// A [`BuildProgress`] that ignores everything.
pub struct NoProgress;
impl BuildProgress for NoProgress {}

/// What a build produced.
#[derive(Debug, Clone, Serialize)]
pub struct BuildSummary {
    pub tokens: u64,
    pub docs: u64,
    pub shards: usize,
    pub bytes: u64,
    pub bytes_per_token: f64,
    /// Wall time of the whole build, input reading and tokenization included.
    pub seconds: f64,
    /// Wall time spent in suffix sorting and writing (input excluded).
    pub index_seconds: f64,
    pub token_width: u8,
}

/// Builds indexes from document streams.
#[derive(Debug, Clone)]
pub struct IndexBuilder {
    config: BuildConfig,
    token_width: u8,
}

impl IndexBuilder {
    /// Checks the config.
    pub fn new(config: BuildConfig) -> Result<IndexBuilder> {
        if config.vocab_size == 0 || config.vocab_size as u64 > MAX_VOCAB_SIZE {
            return Err(Error::VocabTooLarge {
                vocab_size: config.vocab_size as u64,
                max: MAX_VOCAB_SIZE,
            });
        }
        if !(2..=MAX_SHARD_TOKENS).contains(&config.shard_tokens) {
            return Err(Error::ShardSize {
                shard_tokens: config.shard_tokens,
                max: MAX_SHARD_TOKENS,
            });
        }
        let token_width = format::token_width_for(config.vocab_size);
        Ok(IndexBuilder {
            config,
            token_width,
        })
    }

    /// Builds an index file. It is written to a temporary file beside `path` and renamed
    /// into place, so `path` never holds a partial index.
    pub fn build_file(
        &self,
        path: &Path,
        docs: impl Iterator<Item = Result<Vec<u32>>>,
        progress: &dyn BuildProgress,
    ) -> Result<BuildSummary> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".infinigram-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| Error::io(dir, e))?;
        let (out, summary) = self.build_into(BufWriter::new(tmp), path, docs, progress)?;
        let tmp = out
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?;
        tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
        tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
        Ok(summary)
    }

    /// Builds an index in memory.
    pub fn build_in_memory(
        &self,
        docs: impl Iterator<Item = Result<Vec<u32>>>,
    ) -> Result<Index<Vec<u8>>> {
        let (out, _) = self.build_into(
            Cursor::new(Vec::new()),
            Path::new("<memory>"),
            docs,
            &NoProgress,
        )?;
        Index::from_bytes(out.into_inner(), OpenOptions::default())
    }

    fn build_into<W: Write + Seek>(
        &self,
        out: W,
        path: &Path,
        mut docs: impl Iterator<Item = Result<Vec<u32>>>,
        progress: &dyn BuildProgress,
    ) -> Result<(W, BuildSummary)> {
        let started = Instant::now();
        let mut index_seconds = 0.0;
        let jobs = match self.config.jobs {
            0 => rayon::current_num_threads(),
            j => j,
        };
        let mut writer = IndexWriter::new(out, path, self.token_width)?;
        let mut pending: Option<Vec<u32>> = None;
        let (mut n_docs, mut n_tokens, mut n_shards) = (0u64, 0u64, 0usize);
        let mut exhausted = false;
        while !exhausted {
            let mut batch = Vec::with_capacity(jobs);
            while batch.len() < jobs && !exhausted {
                let mut shard = ShardInput::new(self.config.vocab_size, self.token_width);
                loop {
                    let doc = match pending.take() {
                        Some(d) => d,
                        None => match docs.next() {
                            Some(d) => self.checked(d?, n_docs)?,
                            None => {
                                exhausted = true;
                                break;
                            }
                        },
                    };
                    if shard.slots() + doc.len() as u64 + 1 > self.config.shard_tokens {
                        pending = Some(doc);
                        break;
                    }
                    shard.push(&doc);
                    n_docs += 1;
                    n_tokens += doc.len() as u64;
                    progress.input(n_docs, n_tokens);
                }
                if shard.docs() > 0 {
                    batch.push(shard);
                }
            }
            if batch.is_empty() {
                break;
            }
            let t = Instant::now();
            let first = n_shards;
            for (i, s) in batch.iter().enumerate() {
                progress.shard_started(first + i, s.slots());
            }
            let built: Vec<Result<BuiltShard>> = batch
                .into_par_iter()
                .enumerate()
                .map(|(i, s)| s.build(first + i))
                .collect();
            for b in built {
                let b = b?;
                writer.write_shard(&b)?;
                progress.shard_written(n_shards, b.sa.len() as u64);
                n_shards += 1;
            }
            index_seconds += t.elapsed().as_secs_f64();
        }
        if n_docs == 0 {
            return Err(Error::NoInput);
        }
        let t = Instant::now();
        let (out, bytes) = writer.finish(self.config.vocab_size, self.config.tokenizer_hash)?;
        index_seconds += t.elapsed().as_secs_f64();
        let summary = BuildSummary {
            tokens: n_tokens,
            docs: n_docs,
            shards: n_shards,
            bytes,
            bytes_per_token: bytes as f64 / n_tokens.max(1) as f64,
            seconds: started.elapsed().as_secs_f64(),
            index_seconds,
            token_width: self.token_width,
        };
        Ok((out, summary))
    }

    /// Checks a document's tokens and size.
    fn checked(&self, doc: Vec<u32>, doc_id: u64) -> Result<Vec<u32>> {
        if let Some(&t) = doc.iter().find(|&&t| t >= self.config.vocab_size) {
            return Err(Error::TokenOutOfRange {
                token: t as u64,
                vocab_size: self.config.vocab_size,
            });
        }
        if doc.len() as u64 + 1 > self.config.shard_tokens {
            return Err(Error::DocumentTooLarge {
                doc: doc_id,
                tokens: doc.len() as u64,
                shard_tokens: self.config.shard_tokens,
            });
        }
        Ok(doc)
    }
}
