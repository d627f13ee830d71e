//! Serializes shards into the index format (see [`crate::format`]).

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::shard::{BuiltShard, Text};
use crate::error::{Error, Result};
use crate::format::{self, Checksum, Header, ShardEntry, HEADER_BYTES, ORDER_NUMERIC, PAD_BYTES};

/// Bytes converted per write call.
const CHUNK_BYTES: usize = 1 << 20;

pub(crate) struct IndexWriter<W: Write + Seek> {
    out: W,
    path: PathBuf,
    pos: u64,
    token_width: u8,
    entries: Vec<ShardEntry>,
    docs: u64,
    tokens: u64,
}

impl<W: Write + Seek> IndexWriter<W> {
    /// Starts an index; the header is written last.
    pub fn new(out: W, path: &Path, token_width: u8) -> Result<Self> {
        let mut w = IndexWriter {
            out,
            path: path.to_path_buf(),
            pos: 0,
            token_width,
            entries: Vec::new(),
            docs: 0,
            tokens: 0,
        };
        w.write_all(&[0u8; HEADER_BYTES])?;
        Ok(w)
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Zero bytes up to the next multiple of 8.
    fn align(&mut self) -> Result<()> {
        let pad = (format::align8(self.pos) - self.pos) as usize;
        self.write_all(&[0u8; 8][..pad])
    }

    /// Writes one section from an iterator of little-endian element bytes (`width` of each
    /// `u64`), padding included; returns its offset and checksum.
    fn section(&mut self, width: usize, values: impl Iterator<Item = u64>) -> Result<(u64, u64)> {
        self.align()?;
        let offset = self.pos;
        let mut sum = Checksum::default();
        let mut buf = Vec::with_capacity(CHUNK_BYTES + 8);
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes()[..width]);
            if buf.len() >= CHUNK_BYTES {
                sum.update(&buf);
                self.write_all(&buf)?;
                buf.clear();
            }
        }
        buf.extend_from_slice(&[0u8; PAD_BYTES]);
        sum.update(&buf);
        self.write_all(&buf)?;
        Ok((offset, sum.finish()))
    }

    /// Appends a shard.
    pub fn write_shard(&mut self, shard: &BuiltShard) -> Result<()> {
        let slots = shard.sa.len() as u64;
        let docs = shard.input.doc_offsets.len() as u64;
        let w = self.token_width as usize;
        let separator = format::separator(self.token_width) as u64;
        let (tokens_offset, tokens_checksum) = match &shard.input.text {
            Text::U16(t) => self.section(w, t.iter().map(|&x| x as u64))?,
            Text::I32(t) => {
                let vocab = shard.input.vocab_size as i32;
                self.section(
                    w,
                    t.iter()
                        .map(|&x| if x == vocab { separator } else { x as u64 }),
                )?
            }
        };
        let pointer_width = format::pointer_width_for(slots);
        let (sa_offset, sa_checksum) =
            self.section(pointer_width as usize, shard.sa.iter().map(|&p| p as u64))?;
        let (docs_offset, docs_checksum) =
            self.section(8, shard.input.doc_offsets.iter().copied())?;
        self.entries.push(ShardEntry {
            slots,
            docs,
            first_doc: self.docs,
            pointer_width,
            tokens_offset,
            sa_offset,
            docs_offset,
            tokens_checksum,
            sa_checksum,
            docs_checksum,
        });
        self.docs += docs;
        self.tokens += slots - docs;
        Ok(())
    }

    /// Writes the shard table and the header; returns the output and its size in bytes.
    pub fn finish(mut self, vocab_size: u32, tokenizer_hash: [u8; 32]) -> Result<(W, u64)> {
        self.align()?;
        let table_offset = self.pos;
        let table: Vec<u8> = self.entries.iter().flat_map(|e| e.encode()).collect();
        self.write_all(&table)?;
        let size = self.pos;
        let header = Header {
            token_width: self.token_width,
            order: ORDER_NUMERIC,
            vocab_size,
            shard_count: self.entries.len() as u32,
            doc_count: self.docs,
            token_count: self.tokens,
            table_offset,
            table_checksum: format::checksum(&table),
            tokenizer_hash,
        };
        let io = |e| Error::io(&self.path, e);
        self.out.seek(SeekFrom::Start(0)).map_err(io)?;
        self.out.write_all(&header.encode()).map_err(io)?;
        self.out.flush().map_err(io)?;
        Ok((self.out, size))
    }
}
