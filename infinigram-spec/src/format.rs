//! The on-disk index format, version 1.
//!
//! All integers are little-endian. Every section starts at a multiple of 8 bytes and is
//! followed by [`PAD_BYTES`] zero bytes, so that readers can load a whole `u32`/`u64` word at
//! the last element without a bounds problem.
//!
//! ```text
//! offset 0      Header (HEADER_BYTES)
//!               shard 0: tokens | suffix array | document offsets
//!               shard 1: ...
//! table_offset  shard table: SHARD_ENTRY_BYTES per shard
//! ```
//!
//! - **Tokens**: `slots` entries of `token_width` bytes. Each document is followed by the
//!   separator `2^(8 * token_width) - 1`, which is larger than every token id, so matches
//!   never cross documents.
//! - **Suffix array**: `slots` entries of `pointer_width` bytes, token positions (not byte
//!   offsets) sorted by the suffix they start, tokens compared as numbers, end of text
//!   smallest. The pointer width is the smallest number of bytes that holds `slots - 1`.
//! - **Document offsets**: one `u64` per document, the position of its first token.
//!
//! The header and the shard table carry checksums (first 8 bytes of SHA-256) that are
//! checked on every open; section checksums are checked by [`crate::OpenOptions::verify`].

use sha2::{Digest, Sha256};

/// Magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"IGSPEC\x00\x01";
/// The format version written and read by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 128;
/// Size of one shard-table entry.
pub const SHARD_ENTRY_BYTES: usize = 96;
/// Zero bytes after every section.
pub const PAD_BYTES: usize = 8;
/// Largest pointer width: shards hold at most 2^40 slots.
pub const MAX_POINTER_WIDTH: u8 = 5;
/// Token order of the suffix array: numeric token ids.
pub const ORDER_NUMERIC: u8 = 0;

/// The fixed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes per token: 2, 3 or 4.
    pub token_width: u8,
    /// Suffix order; only [`ORDER_NUMERIC`] exists.
    pub order: u8,
    /// Number of token ids; every stored id is below it.
    pub vocab_size: u32,
    /// Number of shards.
    pub shard_count: u32,
    /// Number of documents over all shards.
    pub doc_count: u64,
    /// Number of tokens over all shards, separators excluded.
    pub token_count: u64,
    /// Byte offset of the shard table.
    pub table_offset: u64,
    /// Checksum of the shard table.
    pub table_checksum: u64,
    /// SHA-256 of the tokenizer definition (all zero when unknown).
    pub tokenizer_hash: [u8; 32],
}

/// One entry of the shard table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardEntry {
    /// Token slots: tokens plus one separator per document.
    pub slots: u64,
    /// Documents in this shard.
    pub docs: u64,
    /// Global id of the shard's first document.
    pub first_doc: u64,
    /// Bytes per suffix-array entry.
    pub pointer_width: u8,
    /// Byte offset of the token array.
    pub tokens_offset: u64,
    /// Byte offset of the suffix array.
    pub sa_offset: u64,
    /// Byte offset of the document offsets.
    pub docs_offset: u64,
    /// Checksums of the three sections.
    pub tokens_checksum: u64,
    pub sa_checksum: u64,
    pub docs_checksum: u64,
}

/// First 8 bytes of SHA-256, as a little-endian `u64`.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut hasher = Checksum::default();
    hasher.update(bytes);
    hasher.finish()
}

/// Incremental [`checksum`].
#[derive(Default, Clone)]
pub struct Checksum(Sha256);

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> u64 {
        let digest = self.0.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

/// The document separator for a token width: the largest value of that width.
pub fn separator(token_width: u8) -> u32 {
    match token_width {
        2 => 0xFFFF,
        3 => 0xFF_FFFF,
        _ => u32::MAX,
    }
}

/// The token width for a vocabulary: the smallest of 2, 3, 4 bytes whose separator is not
/// a token id.
pub fn token_width_for(vocab_size: u32) -> u8 {
    if vocab_size <= separator(2) {
        2
    } else if vocab_size <= separator(3) {
        3
    } else {
        4
    }
}

/// The smallest pointer width that holds every position below `slots`.
pub fn pointer_width_for(slots: u64) -> u8 {
    let max = slots.saturating_sub(1);
    let bits = 64 - max.leading_zeros();
    bits.div_ceil(8).max(1) as u8
}

/// Bytes of a section holding `count` elements of `width` bytes, padding included.
pub fn section_bytes(count: u64, width: u64) -> Option<u64> {
    count.checked_mul(width)?.checked_add(PAD_BYTES as u64)
}

/// `offset` rounded up to a multiple of 8.
pub fn align8(offset: u64) -> u64 {
    offset.div_ceil(8) * 8
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Why a header could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderProblem {
    BadMagic,
    Version(u32),
    Checksum,
}

impl Header {
    /// Encodes the header, checksum included.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12] = self.token_width;
        b[13] = self.order;
        b[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.shard_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.doc_count.to_le_bytes());
        b[32..40].copy_from_slice(&self.token_count.to_le_bytes());
        b[40..48].copy_from_slice(&self.table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.table_checksum.to_le_bytes());
        b[56..88].copy_from_slice(&self.tokenizer_hash);
        let sum = checksum(&b[..HEADER_BYTES - 8]);
        b[HEADER_BYTES - 8..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Decodes a header; field values are checked by the index reader.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, HeaderProblem> {
        if b[0..8] != MAGIC {
            return Err(HeaderProblem::BadMagic);
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(HeaderProblem::Version(version));
        }
        if checksum(&b[..HEADER_BYTES - 8]) != get_u64(b, HEADER_BYTES - 8) {
            return Err(HeaderProblem::Checksum);
        }
        let mut tokenizer_hash = [0u8; 32];
        tokenizer_hash.copy_from_slice(&b[56..88]);
        Ok(Header {
            token_width: b[12],
            order: b[13],
            vocab_size: get_u32(b, 16),
            shard_count: get_u32(b, 20),
            doc_count: get_u64(b, 24),
            token_count: get_u64(b, 32),
            table_offset: get_u64(b, 40),
            table_checksum: get_u64(b, 48),
            tokenizer_hash,
        })
    }
}

impl ShardEntry {
    /// Encodes one table entry.
    pub fn encode(&self) -> [u8; SHARD_ENTRY_BYTES] {
        let mut b = [0u8; SHARD_ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.slots.to_le_bytes());
        b[8..16].copy_from_slice(&self.docs.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_doc.to_le_bytes());
        b[24] = self.pointer_width;
        b[32..40].copy_from_slice(&self.tokens_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.sa_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.docs_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.tokens_checksum.to_le_bytes());
        b[64..72].copy_from_slice(&self.sa_checksum.to_le_bytes());
        b[72..80].copy_from_slice(&self.docs_checksum.to_le_bytes());
        b
    }

    /// Decodes one table entry (exactly [`SHARD_ENTRY_BYTES`] bytes).
    pub fn decode(b: &[u8; SHARD_ENTRY_BYTES]) -> ShardEntry {
        ShardEntry {
            slots: get_u64(b, 0),
            docs: get_u64(b, 8),
            first_doc: get_u64(b, 16),
            pointer_width: b[24],
            tokens_offset: get_u64(b, 32),
            sa_offset: get_u64(b, 40),
            docs_offset: get_u64(b, 48),
            tokens_checksum: get_u64(b, 56),
            sa_checksum: get_u64(b, 64),
            docs_checksum: get_u64(b, 72),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checksum() {
        let h = Header {
            token_width: 3,
            order: ORDER_NUMERIC,
            vocab_size: 151_665,
            shard_count: 2,
            doc_count: 7,
            token_count: 1234,
            table_offset: 4096,
            table_checksum: 99,
            tokenizer_hash: [5; 32],
        };
        let mut b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        b[20] ^= 1;
        assert_eq!(Header::decode(&b), Err(HeaderProblem::Checksum));
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(HeaderProblem::BadMagic));
    }

    #[test]
    fn widths() {
        assert_eq!(token_width_for(1), 2);
        assert_eq!(token_width_for(65_535), 2);
        assert_eq!(token_width_for(65_536), 3);
        assert_eq!(token_width_for(151_665), 3);
        assert_eq!(token_width_for(1 << 24), 4);
        assert_eq!(pointer_width_for(1), 1);
        assert_eq!(pointer_width_for(256), 1);
        assert_eq!(pointer_width_for(257), 2);
        assert_eq!(pointer_width_for(1 << 24), 3);
        assert_eq!(pointer_width_for((1 << 24) + 1), 4);
        assert_eq!(pointer_width_for(1 << 32), 4);
        assert_eq!(pointer_width_for((1 << 32) + 1), 5);
    }
}
