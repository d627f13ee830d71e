//! Queries over all shards: count, next-token distribution, occurrences, documents.
//! Per-shard results are added up.

use serde::Serialize;

use super::shard::{Key, SaRange, Shard};
use super::Index;
use crate::error::{Error, Result};

/// A next token and how often it follows the pattern. `token` is `None` for the end of a
/// document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NextCount {
    pub token: Option<u32>,
    pub count: u64,
}

/// A next-token distribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ntd {
    /// Occurrences of the pattern.
    pub prompt_count: u64,
    /// Next tokens by count, largest first, ties by token id (end of document last).
    pub next: Vec<NextCount>,
    /// True when sampling may have missed rare next tokens (see [`NtdOptions::max_support`]).
    /// Every reported count is exact either way.
    pub approx: bool,
}

/// Options for [`Index::ntd`].
#[derive(Debug, Clone, Copy)]
pub struct NtdOptions {
    /// Keep only the `top_k` most frequent next tokens (`None`: all found).
    pub top_k: Option<usize>,
    /// When a shard has more than this many occurrences, inspect only about this many evenly
    /// spaced ones and count exactly the tokens found there: every token whose count is at
    /// least `occurrences / max_support` is found. 0 disables the cap.
    pub max_support: u64,
}

impl Default for NtdOptions {
    fn default() -> Self {
        NtdOptions {
            top_k: None,
            max_support: 1000,
        }
    }
}

/// One occurrence of a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Occurrence {
    pub shard: usize,
    /// Token slot in the shard where the occurrence starts.
    pub position: u64,
    /// Global document id.
    pub doc: u64,
    /// Offset of the occurrence inside the document, in tokens.
    pub offset: u64,
}

/// A child of a search node: next key, total count, and its range in every shard.
#[derive(Debug, Clone)]
pub(crate) struct Child {
    pub key: Key,
    pub count: u64,
    pub ranges: Vec<SaRange>,
}

/// The token of a key (`None` for end of document / end of text).
pub(crate) fn token_of_key(key: Key, separator: u32) -> Option<u32> {
    if key == 0 || key == separator as u64 + 1 {
        None
    } else {
        Some((key - 1) as u32)
    }
}

/// Splits `range` at `depth` into runs of equal key. With `max_support > 0` and a larger
/// range, only runs that contain one of about `max_support` evenly spaced sample ranks are
/// returned (their bounds are exact). Returns whether every run was returned.
pub(crate) fn runs(
    shard: &Shard<'_>,
    range: SaRange,
    depth: usize,
    max_support: u64,
    out: &mut Vec<(Key, SaRange)>,
) -> bool {
    let len = range.len();
    let stride = if max_support > 0 && len > max_support {
        len.div_ceil(max_support)
    } else {
        1
    };
    let (mut at, mut covered_to) = (range.start, range.start);
    let mut complete = true;
    while at < range.end {
        let key = shard.key_at(at, depth);
        let start = if at == covered_to {
            at
        } else {
            shard.run_start(covered_to, at, depth, key)
        };
        if start != covered_to {
            complete = false;
        }
        let end = shard.run_end(at, range.end, depth, key);
        out.push((key, SaRange { start, end }));
        covered_to = end;
        // Next sample rank at or after `end`.
        let steps = (end - range.start).div_ceil(stride);
        at = range.start + steps * stride;
        if at > end && at >= range.end {
            complete = false;
        }
    }
    complete && covered_to == range.end
}

impl<S: AsRef<[u8]>> Index<S> {
    /// Fails unless every token is below the vocabulary size.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t >= self.vocab_size()) {
            Some(&t) => Err(Error::TokenOutOfRange {
                token: t as u64,
                vocab_size: self.vocab_size(),
            }),
            None => Ok(()),
        }
    }

    /// The suffix-array range of `pattern` in every shard.
    pub fn find(&self, pattern: &[u32]) -> Result<Vec<SaRange>> {
        self.check_tokens(pattern)?;
        Ok(self.shards().map(|s| s.find(pattern)).collect())
    }

    /// Number of occurrences of `pattern`; the empty pattern counts every token.
    pub fn count(&self, pattern: &[u32]) -> Result<u64> {
        self.check_tokens(pattern)?;
        Ok(self.shards().map(|s| s.find(pattern).len()).sum())
    }

    /// Whether `pattern` occurs anywhere.
    pub fn contains(&self, pattern: &[u32]) -> Result<bool> {
        self.check_tokens(pattern)?;
        Ok(self.shards().any(|s| s.contains(pattern)))
    }

    /// The distribution of the token that follows `pattern`.
    pub fn ntd(&self, pattern: &[u32], options: NtdOptions) -> Result<Ntd> {
        let ranges = self.find(pattern)?;
        Ok(self.ntd_of_ranges(&ranges, pattern.len(), options))
    }

    /// The next-token distribution of a node given by its per-shard ranges at `depth`.
    pub fn ntd_of_ranges(&self, ranges: &[SaRange], depth: usize, options: NtdOptions) -> Ntd {
        let (children, complete) = self.children(ranges, depth, options.max_support, false);
        let separator = crate::format::separator(self.token_width());
        let mut next: Vec<NextCount> = children
            .iter()
            .map(|c| NextCount {
                token: token_of_key(c.key, separator),
                count: c.count,
            })
            .collect();
        next.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(
                    a.token
                        .unwrap_or(u32::MAX)
                        .cmp(&b.token.unwrap_or(u32::MAX)),
                )
                .then(b.token.is_some().cmp(&a.token.is_some()))
        });
        // Several keys (end of text, separator) are "end of document": merge them.
        merge_end_of_document(&mut next);
        if let Some(k) = options.top_k {
            next.truncate(k);
        }
        Ntd {
            prompt_count: ranges.iter().map(SaRange::len).sum(),
            next,
            approx: !complete,
        }
    }

    /// The children of a node: for every distinct next key its exact total count and
    /// per-shard ranges, in key order. With `keep_ranges == false` the ranges are left empty.
    pub(crate) fn children(
        &self,
        ranges: &[SaRange],
        depth: usize,
        max_support: u64,
        keep_ranges: bool,
    ) -> (Vec<Child>, bool) {
        let mut per_shard: Vec<Vec<(Key, SaRange)>> = Vec::with_capacity(ranges.len());
        let mut complete = vec![true; ranges.len()];
        // A state from another index may list more shards: extra ranges are ignored.
        for (s, &range) in ranges.iter().enumerate().take(self.shard_count()) {
            let mut out = Vec::new();
            if !range.is_empty() {
                complete[s] = runs(&self.shard(s), range, depth, max_support, &mut out);
            }
            per_shard.push(out);
        }
        let single = per_shard.iter().filter(|r| !r.is_empty()).count() <= 1;
        let mut keys: Vec<Key> = per_shard.iter().flatten().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut children = Vec::with_capacity(keys.len());
        for key in keys {
            let mut count = 0;
            let mut child_ranges = Vec::new();
            for (s, runs) in per_shard.iter().enumerate() {
                let found = runs
                    .binary_search_by_key(&key, |(k, _)| *k)
                    .ok()
                    .map(|i| runs[i].1);
                let r = match found {
                    Some(r) => r,
                    // A sampled shard may hold a run that no sample hit: count it exactly.
                    None if !complete[s] && !single && key != 0 => {
                        self.shard(s).narrow(ranges[s], depth, (key - 1) as u32)
                    }
                    None => SaRange::EMPTY,
                };
                count += r.len();
                if keep_ranges {
                    child_ranges.push(r);
                }
            }
            children.push(Child {
                key,
                count,
                ranges: child_ranges,
            });
        }
        (children, complete.iter().all(|&c| c))
    }

    /// Up to `limit` occurrences of `pattern`, in shard and suffix order.
    pub fn occurrences(&self, pattern: &[u32], limit: usize) -> Result<Vec<Occurrence>> {
        let ranges = self.find(pattern)?;
        let mut out = Vec::new();
        for (s, range) in ranges.iter().enumerate() {
            let shard = self.shard(s);
            for rank in range.start..range.end {
                if out.len() >= limit {
                    return Ok(out);
                }
                let position = shard.pointer(rank);
                if let Some((doc, offset)) = shard.document_of(position) {
                    out.push(Occurrence {
                        shard: s,
                        position,
                        doc,
                        offset,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Global document id holding token slot `position` of shard `shard`.
    pub fn document_of(&self, shard: usize, position: u64) -> Option<u64> {
        if shard >= self.shard_count() {
            return None;
        }
        self.shard(shard).document_of(position).map(|(d, _)| d)
    }

    /// The tokens of document `doc`.
    pub fn document(&self, doc: u64) -> Option<Vec<u32>> {
        self.shards()
            .find(|s| doc >= s.first_doc && doc < s.first_doc + s.docs)
            .and_then(|s| s.document_tokens(doc - s.first_doc))
    }
}

fn merge_end_of_document(next: &mut Vec<NextCount>) {
    let ends: u64 = next
        .iter()
        .filter(|n| n.token.is_none())
        .map(|n| n.count)
        .sum();
    let n_ends = next.iter().filter(|n| n.token.is_none()).count();
    if n_ends <= 1 {
        return;
    }
    next.retain(|n| n.token.is_some());
    let at = next.partition_point(|n| n.count >= ends);
    next.insert(
        at,
        NextCount {
            token: None,
            count: ends,
        },
    );
}
