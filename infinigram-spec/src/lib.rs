//! Suffix-array n-gram index and query engine in the style of infini-gram.
//!
//! An index holds a tokenized corpus split into shards. Each shard stores its tokens (each
//! document followed by a separator) and a suffix array of token positions sorted by the
//! suffix they start. Any n-gram's occurrences are then one contiguous range of the suffix
//! array, found by binary search, which answers:
//!
//! - [`Index::count`]: occurrences of a token sequence;
//! - [`Index::ntd`]: the next-token distribution after it (top-k, capped support);
//! - [`Index::longest_suffix`]: the ∞-gram match, the longest suffix of a context that
//!   occurs (doubling then bisection), and [`MatchState::advance`], which keeps that match
//!   up to date token by token;
//! - [`Index::chain`] / [`Index::trie`]: continuations of a match, for drafting;
//! - [`Index::occurrences`]: positions and document ids.
//!
//! The [`spec`] module builds speculative decoding on it: an [`NgramDrafter`] proposes chains
//! and trees from the corpus match and a per-request index of the prompt and generated
//! tokens, a [`DraftPolicy`] decides how much to verify (up to a calibrated, cost-aware one),
//! and lossless greedy / sample-and-match verification drives [`speculative_generate`]
//! against any [`TargetModel`].
//!
//! Results over several shards add up. The same engine runs over a memory-mapped file
//! ([`Index::open`]) or any in-memory byte buffer ([`IndexBuilder::build_in_memory`]).
//!
//! ```
//! use infinigram_spec::{BuildConfig, IndexBuilder, NtdOptions};
//!
//! let docs = vec![vec![1u32, 2, 3, 1, 2, 4], vec![2, 3]];
//! let builder = IndexBuilder::new(BuildConfig::new(8)).unwrap();
//! let index = builder.build_in_memory(docs.into_iter().map(Ok)).unwrap();
//! assert_eq!(index.count(&[1, 2]).unwrap(), 2);
//! assert_eq!(index.count(&[2, 3]).unwrap(), 2);
//! let ntd = index.ntd(&[2], NtdOptions::default()).unwrap();
//! assert_eq!(ntd.next[0].token, Some(3)); // 2 is followed by 3 twice, by 4 once
//! let m = index.longest_suffix(&[7, 3, 1, 2], usize::MAX).unwrap();
//! assert_eq!(m.len(), 3); // [3, 1, 2] occurs, [7, 3, 1, 2] does not
//! ```
//!
//! The on-disk layout is described in [`format`](mod@format); see `docs/INFINIGRAM.md` for the design
//! and measurements.

pub mod build;
mod error;
pub mod format;
mod index;
pub mod interop;
pub mod spec;

pub use build::{BuildConfig, BuildProgress, BuildSummary, IndexBuilder, NoProgress};
pub use error::{Error, Result, Section};
pub use index::{
    ChainOptions, ChainStep, Index, MatchState, NextCount, Ntd, NtdOptions, Occurrence,
    OpenOptions, SaRange, Shard, Trie, TrieNode, TrieOptions,
};
pub use spec::{
    speculative_generate, CalibratedPolicy, Draft, DraftLog, DraftPolicy, DraftTree, Drafter,
    NgramDrafter, NgramDrafterConfig, Sampling, TargetModel, TokenFeatures,
};
