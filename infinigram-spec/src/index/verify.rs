//! Full verification of an opened index: O(file size).

use std::cmp::Ordering;

use super::{Index, Shard};
use crate::error::{Result, Section};
use crate::format::{self, PAD_BYTES};

impl<S: AsRef<[u8]>> Index<S> {
    /// Checks every section checksum, that tokens are below the vocabulary size with
    /// separators exactly at document ends, and that each suffix array is a permutation
    /// sorted by suffix. Adjacent suffixes are compared in full, so a corpus with very long
    /// repeats makes this slow; it is meant for tests and `stats --verify`.
    pub fn verify(&self) -> Result<()> {
        for s in 0..self.shard_count() {
            self.verify_checksums(s)?;
            self.verify_tokens(s)?;
            self.verify_suffix_array(s)?;
        }
        Ok(())
    }

    fn verify_checksums(&self, s: usize) -> Result<()> {
        let e = self.entry(s);
        let w = self.token_width() as u64;
        let p = e.pointer_width as u64;
        let pad = PAD_BYTES as u64;
        let sections = [
            (
                Section::Tokens,
                e.tokens_offset,
                e.slots * w + pad,
                e.tokens_checksum,
            ),
            (
                Section::SuffixArray,
                e.sa_offset,
                e.slots * p + pad,
                e.sa_checksum,
            ),
            (
                Section::DocumentOffsets,
                e.docs_offset,
                e.docs * 8 + pad,
                e.docs_checksum,
            ),
        ];
        for (section, offset, len, expected) in sections {
            let bytes = self
                .as_bytes()
                .get(offset as usize..(offset + len) as usize)
                .ok_or_else(|| self.corrupt(section, Some(s), "section out of range"))?;
            if format::checksum(bytes) != expected {
                return Err(self.corrupt(section, Some(s), "checksum mismatch"));
            }
        }
        Ok(())
    }

    fn verify_tokens(&self, s: usize) -> Result<()> {
        let shard = self.shard(s);
        let mut separators = 0u64;
        for pos in 0..shard.slots {
            match shard.slot(pos) {
                Some(t) if t == shard.separator => separators += 1,
                Some(t) if t < self.vocab_size() => {}
                other => {
                    return Err(self.corrupt(
                        Section::Tokens,
                        Some(s),
                        format!("slot {pos} holds {other:?}, not a token id or separator"),
                    ))
                }
            }
        }
        if separators != shard.docs {
            return Err(self.corrupt(
                Section::Tokens,
                Some(s),
                format!("{separators} separators for {} documents", shard.docs),
            ));
        }
        Ok(())
    }

    fn verify_suffix_array(&self, s: usize) -> Result<()> {
        let shard = self.shard(s);
        let bad = |reason: String| self.corrupt(Section::SuffixArray, Some(s), reason);
        let mut seen = vec![0u64; (shard.slots as usize).div_ceil(64)];
        let mut prev: Option<u64> = None;
        for rank in 0..shard.slots {
            let pos = shard.pointer(rank);
            if pos >= shard.slots {
                return Err(bad(format!("entry {rank} points to {pos}, past the end")));
            }
            let (word, bit) = ((pos / 64) as usize, pos % 64);
            if seen[word] & (1 << bit) != 0 {
                return Err(bad(format!("position {pos} appears twice")));
            }
            seen[word] |= 1 << bit;
            if let Some(prev) = prev {
                if compare_suffixes(&shard, prev, pos) != Ordering::Less {
                    return Err(bad(format!(
                        "entries {} and {rank} are out of order",
                        rank - 1
                    )));
                }
            }
            prev = Some(pos);
        }
        Ok(())
    }
}

/// Full comparison of two suffixes (end of text smallest).
fn compare_suffixes(shard: &Shard<'_>, a: u64, b: u64) -> Ordering {
    let mut i = 0u64;
    loop {
        let (ka, kb) = (shard.key(a + i), shard.key(b + i));
        if ka != kb || ka == 0 {
            // Two distinct suffixes cannot both end here; equal keys of 0 mean a == b.
            return ka.cmp(&kb).then(b.cmp(&a));
        }
        i += 1;
    }
}
