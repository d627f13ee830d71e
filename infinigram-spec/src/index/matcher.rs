//! The ∞-gram match: the longest suffix of a context that occurs in the index, found cold
//! (doubling, then bisection on the suffix length) or kept up to date token by token.

use super::shard::SaRange;
use super::Index;
use crate::error::Result;

/// The longest suffix of a token stream that occurs in an index, with its range in every
/// shard. Cheap to clone (a length and one small range per shard); it does not keep the
/// tokens, which are read back from the index when needed. Use a state only with the index
/// that made it: with another one the answers are meaningless (though nothing panics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchState {
    len: usize,
    max_len: usize,
    ranges: Vec<SaRange>,
}

impl MatchState {
    /// Length of the matched suffix in tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is matched (the empty suffix: every position).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Occurrences of the matched suffix over all shards.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(SaRange::len).sum()
    }

    /// The matched suffix's range in every shard.
    pub fn ranges(&self) -> &[SaRange] {
        &self.ranges
    }

    /// Longest suffix length this state keeps.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Extends the match by `token`, the next token of the stream, and returns the new match
    /// length. When the longer suffix does not occur, the match backs off to the longest
    /// suffix that does (doubling, then bisection, over at most `len() + 1` lengths). Since
    /// the length grows by at most one per token, the back-off work is amortized.
    pub fn advance<S: AsRef<[u8]>>(&mut self, index: &Index<S>, token: u32) -> Result<usize> {
        index.check_tokens(&[token])?;
        // Narrow in place, remembering where the old match can be read back.
        let mut anchor = None;
        let mut found = false;
        for (s, range) in self.ranges.iter_mut().enumerate().take(index.shard_count()) {
            if range.is_empty() {
                continue;
            }
            anchor.get_or_insert((s, range.start));
            *range = index.shard(s).narrow(*range, self.len, token);
            found |= !range.is_empty();
        }
        if found && self.len < self.max_len {
            self.len += 1;
            return Ok(self.len);
        }
        let mut tail = match anchor {
            Some((s, rank)) => read_tokens(index, s, rank, self.len),
            None => Vec::new(),
        };
        tail.push(token);
        if found {
            // At the length cap and the extension occurs: drop the oldest token.
            tail.remove(0);
            self.ranges = index.find(&tail)?;
            self.len = tail.len();
            return Ok(self.len);
        }
        // Lengths up to len() are possible; len() + 1 is known to fail.
        *self = index.longest_suffix_within(&tail, self.len, self.max_len);
        Ok(self.len)
    }

    /// A state for a suffix of length `len` whose ranges are already known.
    pub(crate) fn from_ranges(len: usize, max_len: usize, ranges: Vec<SaRange>) -> MatchState {
        MatchState {
            len,
            max_len,
            ranges,
        }
    }

    /// The matched suffix, read back from the index.
    pub fn matched_tokens<S: AsRef<[u8]>>(&self, index: &Index<S>) -> Vec<u32> {
        self.ranges
            .iter()
            .enumerate()
            .take(index.shard_count())
            .find(|(_, r)| !r.is_empty())
            .map(|(s, r)| read_tokens(index, s, r.start, self.len))
            .unwrap_or_default()
    }
}

/// `len` tokens of the suffix at `rank` of shard `s`.
fn read_tokens<S: AsRef<[u8]>>(index: &Index<S>, s: usize, rank: u64, len: usize) -> Vec<u32> {
    let shard = index.shard(s);
    let pos = shard.pointer(rank);
    (0..len as u64)
        .filter_map(|i| shard.slot(pos.saturating_add(i)))
        .collect()
}

impl<S: AsRef<[u8]>> Index<S> {
    /// The empty match: nothing seen yet. `max_len` caps the suffix length kept
    /// (`usize::MAX`: no cap).
    pub fn empty_match(&self, max_len: usize) -> MatchState {
        MatchState {
            len: 0,
            max_len,
            ranges: self.shards().map(|s| s.all_tokens()).collect(),
        }
    }

    /// The longest suffix of `context` (at most `max_len` tokens) that occurs, found from
    /// scratch: lengths 1, 2, 4, … are tried until one fails, then the gap is bisected
    /// (suffix occurrence is monotone in the length). O(log L) searches.
    pub fn longest_suffix(&self, context: &[u32], max_len: usize) -> Result<MatchState> {
        self.check_tokens(context)?;
        Ok(self.longest_suffix_within(context, context.len(), max_len))
    }

    /// As [`Index::longest_suffix`], trying lengths up to `limit` only. Tokens must be valid.
    pub(crate) fn longest_suffix_within(
        &self,
        context: &[u32],
        limit: usize,
        max_len: usize,
    ) -> MatchState {
        let n = context.len();
        let limit = limit.min(n).min(max_len);
        // Each successful probe keeps its range (shard, range) so the best length needs no
        // second search in that shard.
        let mut hit: Option<(usize, usize, SaRange)> = None;
        let mut exists = |l: usize| {
            let found = self
                .shards()
                .enumerate()
                .find_map(|(s, shard)| shard.find_nonempty(&context[n - l..]).map(|r| (s, r)));
            if let Some((s, r)) = found {
                hit = Some((l, s, r));
            }
            found.is_some()
        };
        // Invariant: length `good` occurs, length `bad` does not (or exceeds the limit).
        let (mut good, mut bad) = (0usize, limit + 1);
        let mut l = 1usize;
        while l < bad {
            if exists(l) {
                good = l;
                let next = (2 * l).min(bad - 1);
                if next == good {
                    break;
                }
                l = next;
            } else {
                bad = l;
            }
        }
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            if exists(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        let suffix = &context[n - good..];
        let known = hit.filter(|h| h.0 == good);
        let ranges = self
            .shards()
            .enumerate()
            .map(|(s, shard)| match known {
                Some((_, hs, r)) if hs == s => r,
                // Shards before the hit do not hold the suffix (they were searched first).
                Some((_, hs, _)) if s < hs => SaRange::EMPTY,
                _ => shard.find(suffix),
            })
            .collect();
        MatchState {
            len: good,
            max_len,
            ranges,
        }
    }
}
