//! Opening and validating an index; the per-shard view and the queries live in submodules.

mod continuation;
mod matcher;
mod query;
mod shard;
mod verify;

pub use continuation::{ChainOptions, ChainStep, Trie, TrieNode, TrieOptions};
pub use matcher::MatchState;
pub use query::{NextCount, Ntd, NtdOptions, Occurrence};
pub use shard::{SaRange, Shard};

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result, Section};
use crate::format::{
    self, Header, HeaderProblem, ShardEntry, HEADER_BYTES, MAX_POINTER_WIDTH, ORDER_NUMERIC,
    SHARD_ENTRY_BYTES,
};

/// How much to check when opening an index.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Also check every section checksum, token ranges, and that each suffix array is a
    /// sorted permutation: O(file size), for `stats --verify` and tests. Without it, open
    /// checks the header, the shard table and every size and document offset (O(documents)).
    pub verify: bool,
}

/// An opened, validated index over any byte storage: a memory map ([`Index::open`]) or an
/// in-memory buffer ([`Index::from_bytes`], [`crate::IndexBuilder::build_in_memory`]).
#[derive(Debug)]
pub struct Index<S = Mmap> {
    storage: S,
    origin: PathBuf,
    header: Header,
    shards: Vec<ShardEntry>,
}

impl Index<Mmap> {
    /// Opens an index file read-only by memory map and validates it.
    ///
    /// The file must not be modified or truncated while the index is open: the map would
    /// change under the reader (a truncation raises SIGBUS). Indexes are written to a
    /// temporary file and renamed into place, so rebuilding an index never changes a mapped
    /// file.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and the documented contract above is that the file is
        // not changed while mapped; all reads through it are bounds-checked.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        #[cfg(unix)]
        {
            // Queries jump around; read-ahead only wastes page cache. Advice is a hint, so a
            // failure is ignored.
            let _ = map.advise(memmap2::Advice::Random);
        }
        Index::from_bytes_at(map, path, options)
    }
}

impl<S: AsRef<[u8]>> Index<S> {
    /// Validates and wraps an index held in `storage` (for example a `Vec<u8>`).
    pub fn from_bytes(storage: S, options: OpenOptions) -> Result<Self> {
        Index::from_bytes_at(storage, Path::new("<memory>"), options)
    }

    /// As [`Index::from_bytes`], naming `origin` in errors.
    pub fn from_bytes_at(storage: S, origin: &Path, options: OpenOptions) -> Result<Self> {
        let bytes = storage.as_ref();
        let header = read_header(bytes, origin)?;
        let shards = read_shard_table(bytes, origin, &header)?;
        let index = Index {
            storage,
            origin: origin.to_path_buf(),
            header,
            shards,
        };
        for s in 0..index.shards.len() {
            index.check_documents(s)?;
        }
        if options.verify {
            index.verify()?;
        }
        Ok(index)
    }

    /// The file (or `<memory>`) this index was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Number of token ids; query tokens must be below it.
    pub fn vocab_size(&self) -> u32 {
        self.header.vocab_size
    }

    /// Bytes per stored token.
    pub fn token_width(&self) -> u8 {
        self.header.token_width
    }

    /// Tokens over all shards, separators excluded.
    pub fn token_count(&self) -> u64 {
        self.header.token_count
    }

    /// Documents over all shards.
    pub fn doc_count(&self) -> u64 {
        self.header.doc_count
    }

    /// SHA-256 of the tokenizer the index was built with (zero when unknown).
    pub fn tokenizer_hash(&self) -> [u8; 32] {
        self.header.tokenizer_hash
    }

    /// Size of the index in bytes.
    pub fn byte_len(&self) -> u64 {
        self.storage.as_ref().len() as u64
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Pointer width of shard `s`.
    pub fn pointer_width(&self, s: usize) -> Option<u8> {
        self.shards.get(s).map(|e| e.pointer_width)
    }

    /// A view of shard `s`.
    ///
    /// # Panics
    /// If `s >= shard_count()`.
    pub fn shard(&self, s: usize) -> Shard<'_> {
        let e = &self.shards[s];
        let bytes = self.storage.as_ref();
        let w = self.header.token_width as usize;
        let p = e.pointer_width as usize;
        // Section bounds were checked on open; `get` keeps this panic-free regardless.
        let slice = |offset: u64, len: u64| -> &[u8] {
            let start = offset as usize;
            bytes
                .get(start..start.saturating_add(len as usize))
                .unwrap_or(&[])
        };
        let pad = format::PAD_BYTES as u64;
        Shard {
            tokens: slice(e.tokens_offset, e.slots * w as u64 + pad),
            sa: slice(e.sa_offset, e.slots * p as u64 + pad),
            doc_offsets: slice(e.docs_offset, e.docs * 8),
            slots: e.slots,
            docs: e.docs,
            first_doc: e.first_doc,
            token_width: w,
            token_mask: if w >= 4 {
                u32::MAX
            } else {
                (1u32 << (8 * w)) - 1
            },
            pointer_width: p,
            pointer_mask: (1u64 << (8 * p)) - 1,
            separator: format::separator(self.header.token_width),
        }
    }

    /// Views of all shards.
    pub fn shards(&self) -> impl Iterator<Item = Shard<'_>> + '_ {
        (0..self.shards.len()).map(|s| self.shard(s))
    }

    pub(crate) fn entry(&self, s: usize) -> &ShardEntry {
        &self.shards[s]
    }

    /// The raw index bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.as_ref()
    }

    fn corrupt(&self, section: Section, shard: Option<usize>, reason: impl Into<String>) -> Error {
        Error::corrupt(&self.origin, section, shard, reason)
    }

    /// Document offsets start at 0, increase, and each document ends with a separator.
    fn check_documents(&self, s: usize) -> Result<()> {
        let shard = self.shard(s);
        let bad = |reason: String| self.corrupt(Section::DocumentOffsets, Some(s), reason);
        let mut expected = 0u64;
        for i in 0..shard.docs {
            let off = shard
                .doc_offset(i)
                .ok_or_else(|| bad(format!("offset {i} unreadable")))?;
            if (i == 0 && off != 0) || off < expected || off >= shard.slots {
                return Err(bad(format!(
                    "document {i} starts at {off}; expected {expected}..{}",
                    shard.slots
                )));
            }
            // The previous document ends right before this one, with a separator.
            if i > 0 && shard.slot(off - 1) != Some(shard.separator) {
                return Err(self.corrupt(
                    Section::Tokens,
                    Some(s),
                    format!("document {} does not end with a separator", i - 1),
                ));
            }
            expected = off + 1;
        }
        if shard.docs > 0 && shard.slot(shard.slots - 1) != Some(shard.separator) {
            return Err(self.corrupt(
                Section::Tokens,
                Some(s),
                "last document does not end with a separator",
            ));
        }
        Ok(())
    }
}

fn read_header(bytes: &[u8], origin: &Path) -> Result<Header> {
    let raw: &[u8; HEADER_BYTES] = bytes.first_chunk().ok_or_else(|| {
        Error::corrupt(
            origin,
            Section::Header,
            None,
            format!("file has {} bytes, less than the header", bytes.len()),
        )
    })?;
    let header = Header::decode(raw).map_err(|p| match p {
        HeaderProblem::BadMagic => Error::BadMagic {
            path: origin.to_path_buf(),
        },
        HeaderProblem::Version(found) => Error::UnsupportedVersion {
            path: origin.to_path_buf(),
            found,
            supported: format::FORMAT_VERSION,
        },
        HeaderProblem::Checksum => {
            Error::corrupt(origin, Section::Header, None, "checksum mismatch")
        }
    })?;
    let bad = |reason: String| Error::corrupt(origin, Section::Header, None, reason);
    if !(2..=4).contains(&header.token_width) {
        return Err(bad(format!("token width {}", header.token_width)));
    }
    if header.order != ORDER_NUMERIC {
        return Err(bad(format!("unknown suffix order {}", header.order)));
    }
    if header.vocab_size == 0 || header.vocab_size > format::separator(header.token_width) {
        return Err(bad(format!(
            "vocabulary size {} does not fit token width {}",
            header.vocab_size, header.token_width
        )));
    }
    Ok(header)
}

fn read_shard_table(bytes: &[u8], origin: &Path, header: &Header) -> Result<Vec<ShardEntry>> {
    let table_bad = |reason: String| Error::corrupt(origin, Section::ShardTable, None, reason);
    let len = (header.shard_count as u64)
        .checked_mul(SHARD_ENTRY_BYTES as u64)
        .ok_or_else(|| table_bad("shard count overflows".into()))?;
    let start = usize::try_from(header.table_offset)
        .map_err(|_| table_bad("offset out of range".into()))?;
    let table = start
        .checked_add(len as usize)
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| {
            table_bad(format!(
                "{} entries at offset {} exceed the file ({} bytes): truncated?",
                header.shard_count,
                header.table_offset,
                bytes.len()
            ))
        })?;
    if format::checksum(table) != header.table_checksum {
        return Err(table_bad("checksum mismatch".into()));
    }
    let w = header.token_width as u64;
    let mut shards = Vec::with_capacity(header.shard_count as usize);
    let (mut docs, mut tokens) = (0u64, 0u64);
    for (s, raw) in table.chunks_exact(SHARD_ENTRY_BYTES).enumerate() {
        let raw: &[u8; SHARD_ENTRY_BYTES] =
            raw.try_into().map_err(|_| table_bad("entry size".into()))?;
        let e = ShardEntry::decode(raw);
        let bad =
            |section: Section, reason: String| Error::corrupt(origin, section, Some(s), reason);
        if e.pointer_width == 0
            || e.pointer_width > MAX_POINTER_WIDTH
            || e.pointer_width < format::pointer_width_for(e.slots)
        {
            return Err(bad(
                Section::ShardTable,
                format!("pointer width {} for {} slots", e.pointer_width, e.slots),
            ));
        }
        if e.docs > e.slots || (e.slots > 0 && e.docs == 0) {
            return Err(bad(
                Section::ShardTable,
                format!("{} documents in {} slots", e.docs, e.slots),
            ));
        }
        if e.first_doc != docs {
            return Err(bad(
                Section::ShardTable,
                format!("first document {} should be {docs}", e.first_doc),
            ));
        }
        let sections = [
            (
                Section::Tokens,
                e.tokens_offset,
                format::section_bytes(e.slots, w),
            ),
            (
                Section::SuffixArray,
                e.sa_offset,
                format::section_bytes(e.slots, e.pointer_width as u64),
            ),
            (
                Section::DocumentOffsets,
                e.docs_offset,
                format::section_bytes(e.docs, 8),
            ),
        ];
        for (section, offset, size) in sections {
            let end = size.and_then(|size| offset.checked_add(size));
            match end {
                Some(end) if end <= bytes.len() as u64 && offset.is_multiple_of(8) => {}
                _ => {
                    return Err(bad(
                        section,
                        format!(
                            "section at offset {offset} ({size:?} bytes) exceeds the file ({} bytes): truncated?",
                            bytes.len()
                        ),
                    ))
                }
            }
        }
        docs += e.docs;
        tokens += e.slots - e.docs;
        shards.push(e);
    }
    if docs != header.doc_count || tokens != header.token_count {
        return Err(Error::corrupt(
            origin,
            Section::Header,
            None,
            format!(
                "header counts ({} documents, {} tokens) disagree with the shards ({docs}, {tokens})",
                header.doc_count, header.token_count
            ),
        ));
    }
    Ok(shards)
}
