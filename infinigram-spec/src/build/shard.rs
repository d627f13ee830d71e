//! One shard's text and its suffix array, built by libsais on the calling thread.

use libsais::suffix_array::AlphabetSize;
use libsais::SuffixArrayConstruction;

use crate::error::{Error, Result};

/// A shard's token slots in the form libsais takes.
#[derive(Debug)]
pub(crate) enum Text {
    /// Vocabulary below 65 535: tokens as `u16`, separator `0xFFFF` (the libsais16 path).
    U16(Vec<u16>),
    /// Larger vocabularies: tokens as `i32`, separator mapped to `vocab_size` (the
    /// large-alphabet path with alphabet size `vocab_size + 1`).
    I32(Vec<i32>),
}

/// Documents collected for one shard.
#[derive(Debug)]
pub(crate) struct ShardInput {
    pub text: Text,
    pub doc_offsets: Vec<u64>,
    pub vocab_size: u32,
}

/// A shard with its suffix array.
#[derive(Debug)]
pub(crate) struct BuiltShard {
    pub input: ShardInput,
    pub sa: Vec<i32>,
}

impl ShardInput {
    pub fn new(vocab_size: u32, token_width: u8) -> ShardInput {
        let text = if token_width == 2 {
            Text::U16(Vec::new())
        } else {
            Text::I32(Vec::new())
        };
        ShardInput {
            text,
            doc_offsets: Vec::new(),
            vocab_size,
        }
    }

    /// Token slots so far, separators included.
    pub fn slots(&self) -> u64 {
        match &self.text {
            Text::U16(t) => t.len() as u64,
            Text::I32(t) => t.len() as u64,
        }
    }

    /// Documents so far.
    pub fn docs(&self) -> u64 {
        self.doc_offsets.len() as u64
    }

    /// Appends a document and its separator. Tokens must already be below the vocabulary
    /// size (checked by the builder).
    pub fn push(&mut self, doc: &[u32]) {
        self.doc_offsets.push(self.slots());
        match &mut self.text {
            Text::U16(t) => {
                t.extend(doc.iter().map(|&x| x as u16));
                t.push(u16::MAX);
            }
            Text::I32(t) => {
                t.extend(doc.iter().map(|&x| x as i32));
                t.push(self.vocab_size as i32);
            }
        }
    }

    /// Builds the suffix array (single-threaded; shards run in parallel).
    pub fn build(mut self, shard: usize) -> Result<BuiltShard> {
        let vocab_size = self.vocab_size;
        let sa = match &mut self.text {
            Text::U16(t) => SuffixArrayConstruction::for_text(t.as_slice())
                .in_owned_buffer32()
                .single_threaded()
                .run()
                .map_err(|source| Error::Libsais { shard, source })?
                .into_vec(),
            Text::I32(t) => {
                let construction = SuffixArrayConstruction::for_text_mut(t.as_mut_slice())
                    .in_owned_buffer32()
                    .single_threaded();
                // SAFETY: every token is in 0..vocab_size (checked before `push`) and the
                // separator is vocab_size, so all symbols are below the alphabet size
                // vocab_size + 1, which fits an i32 (the builder rejects larger vocabularies).
                let construction = unsafe {
                    construction.with_alphabet_size(AlphabetSize::new(vocab_size as i32 + 1))
                };
                construction
                    .run()
                    .map_err(|source| Error::Libsais { shard, source })?
                    .into_vec()
            }
        };
        Ok(BuiltShard { input: self, sa })
    }
}
