//! One shard: a token array and its suffix array, read straight from bytes.
//!
//! Every read is bounds-checked against the byte slices, so a corrupt suffix array yields
//! wrong answers but never an out-of-bounds access or a panic. Positions at or past the end
//! of the token array read as "end of text", which sorts before every token (as in libsais).

use std::cmp::Ordering;

use serde::Serialize;

/// A half-open range `[start, end)` of suffix-array ranks in one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SaRange {
    pub start: u64,
    pub end: u64,
}

impl SaRange {
    /// An empty range.
    pub const EMPTY: SaRange = SaRange { start: 0, end: 0 };

    /// Number of suffixes in the range.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no suffix.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Comparison key of a token slot: 0 is end of text, `id + 1` otherwise; the separator has
/// the largest key of its width.
pub(crate) type Key = u64;

/// Key of a query token.
#[inline]
pub(crate) fn key_of(token: u32) -> Key {
    token as u64 + 1
}

/// A borrowed view of one shard.
#[derive(Debug, Clone, Copy)]
pub struct Shard<'a> {
    pub(crate) tokens: &'a [u8],
    pub(crate) sa: &'a [u8],
    pub(crate) doc_offsets: &'a [u8],
    pub(crate) slots: u64,
    pub(crate) docs: u64,
    pub(crate) first_doc: u64,
    pub(crate) token_width: usize,
    pub(crate) token_mask: u32,
    pub(crate) pointer_width: usize,
    pub(crate) pointer_mask: u64,
    pub(crate) separator: u32,
}

impl<'a> Shard<'a> {
    /// Token slots, separators included.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Documents in the shard.
    pub fn docs(&self) -> u64 {
        self.docs
    }

    /// Tokens in the shard, separators excluded.
    pub fn tokens(&self) -> u64 {
        self.slots.saturating_sub(self.docs)
    }

    /// The range of all suffixes that start with a token (not with a separator). Separator
    /// suffixes sort last because the separator is the largest symbol.
    pub fn all_tokens(&self) -> SaRange {
        SaRange {
            start: 0,
            end: self.tokens(),
        }
    }

    /// Suffix-array entry at `rank`; `u64::MAX` when the rank is outside the array.
    #[inline]
    pub(crate) fn pointer(&self, rank: u64) -> u64 {
        let at = (rank as usize).wrapping_mul(self.pointer_width);
        match self.sa.get(at..).and_then(|s| s.first_chunk::<8>()) {
            Some(w) => u64::from_le_bytes(*w) & self.pointer_mask,
            None => u64::MAX,
        }
    }

    /// Raw token slot at `pos` (token id or separator), `None` at or past the end.
    #[inline]
    pub(crate) fn slot(&self, pos: u64) -> Option<u32> {
        if pos >= self.slots {
            return None;
        }
        let at = pos as usize * self.token_width;
        let w = self.tokens.get(at..)?.first_chunk::<4>()?;
        Some(u32::from_le_bytes(*w) & self.token_mask)
    }

    /// Comparison key of the slot at `pos`.
    #[inline]
    pub(crate) fn key(&self, pos: u64) -> Key {
        match self.slot(pos) {
            Some(t) => t as u64 + 1,
            None => 0,
        }
    }

    /// Key of the token `depth` slots after the start of the suffix at `rank`.
    #[inline]
    pub(crate) fn key_at(&self, rank: u64, depth: usize) -> Key {
        self.key(self.pointer(rank).saturating_add(depth as u64))
    }

    /// Compares the suffix at `pos` with `pattern`, skipping the first `skip` tokens already
    /// known to be equal. Returns the order of the suffix relative to the pattern, treating a
    /// suffix that starts with the pattern as equal, and the number of equal leading tokens.
    #[inline]
    fn compare(&self, pos: u64, pattern: &[u32], skip: usize) -> (Ordering, usize) {
        for (i, &t) in pattern.iter().enumerate().skip(skip) {
            let k = self.key(pos.saturating_add(i as u64));
            let q = key_of(t);
            if k != q {
                return (k.cmp(&q), i);
            }
        }
        (Ordering::Equal, pattern.len())
    }

    /// Binary search for any suffix starting with `pattern`; on success also returns the
    /// search bounds and matched prefix lengths at both ends, for the two boundary searches.
    fn probe(&self, pattern: &[u32]) -> Probe {
        let (mut lo, mut hi) = (0u64, self.slots);
        let (mut lcp_lo, mut lcp_hi) = (0usize, 0usize);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (ord, m) = self.compare(self.pointer(mid), pattern, lcp_lo.min(lcp_hi));
            match ord {
                Ordering::Less => {
                    lo = mid + 1;
                    lcp_lo = m;
                }
                Ordering::Greater => {
                    hi = mid;
                    lcp_hi = m;
                }
                Ordering::Equal => {
                    return Probe::Found {
                        lo,
                        mid,
                        hi,
                        lcp_lo,
                        lcp_hi,
                    };
                }
            }
        }
        Probe::Absent
    }

    /// Whether `pattern` occurs in the shard. The empty pattern occurs when the shard has a
    /// token.
    pub fn contains(&self, pattern: &[u32]) -> bool {
        if pattern.is_empty() {
            return self.tokens() > 0;
        }
        matches!(self.probe(pattern), Probe::Found { .. })
    }

    /// The suffix-array range of all occurrences of `pattern` ([`SaRange::EMPTY`] if none).
    pub fn find(&self, pattern: &[u32]) -> SaRange {
        if pattern.is_empty() {
            return self.all_tokens();
        }
        self.range_of(pattern, self.probe(pattern))
    }

    /// Looks for `pattern` and, when it occurs, returns its range: one search where
    /// [`Shard::contains`] followed by [`Shard::find`] would take two.
    pub(crate) fn find_nonempty(&self, pattern: &[u32]) -> Option<SaRange> {
        if pattern.is_empty() {
            return (self.tokens() > 0).then(|| self.all_tokens());
        }
        match self.probe(pattern) {
            Probe::Absent => None,
            found => Some(self.range_of(pattern, found)),
        }
    }

    /// Finishes a probe: the two boundary searches around the matching rank it found.
    fn range_of(&self, pattern: &[u32], probe: Probe) -> SaRange {
        match probe {
            Probe::Absent => SaRange::EMPTY,
            Probe::Found {
                lo,
                mid,
                hi,
                lcp_lo,
                lcp_hi,
            } => {
                let full = pattern.len();
                let start = self.bound(pattern, lo, mid, lcp_lo, full, false);
                let end = self.bound(pattern, mid + 1, hi, full, lcp_hi, true);
                SaRange { start, end }
            }
        }
    }

    /// Lower (`upper == false`: first suffix not below the pattern) or upper (first suffix
    /// above it) bound inside `[lo, hi)`, given the matched prefix lengths at both ends.
    fn bound(
        &self,
        pattern: &[u32],
        mut lo: u64,
        mut hi: u64,
        mut lcp_lo: usize,
        mut lcp_hi: usize,
        upper: bool,
    ) -> u64 {
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (ord, m) = self.compare(self.pointer(mid), pattern, lcp_lo.min(lcp_hi));
            let right = match ord {
                Ordering::Less => true,
                Ordering::Equal => upper,
                Ordering::Greater => false,
            };
            if right {
                lo = mid + 1;
                lcp_lo = m;
            } else {
                hi = mid;
                lcp_hi = m;
            }
        }
        lo
    }

    /// Narrows `range` (all suffixes sharing a prefix of `depth` tokens) to those whose token
    /// at `depth` is `token`.
    pub fn narrow(&self, range: SaRange, depth: usize, token: u32) -> SaRange {
        let target = key_of(token);
        let (mut lo, mut hi) = (range.start, range.end.min(self.slots));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let k = self.key_at(mid, depth);
            match k.cmp(&target) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => {
                    let start = self.partition(lo, mid, depth, |k| k < target);
                    let end = self.partition(mid + 1, hi, depth, |k| k <= target);
                    return SaRange { start, end };
                }
            }
        }
        SaRange::EMPTY
    }

    /// First rank in `[lo, hi)` whose key at `depth` fails `before`.
    #[inline]
    fn partition(
        &self,
        mut lo: u64,
        mut hi: u64,
        depth: usize,
        before: impl Fn(Key) -> bool,
    ) -> u64 {
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if before(self.key_at(mid, depth)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// End of the run of suffixes whose key at `depth` equals `key`, starting at `start`
    /// (which is in the run), by galloping: O(log run length) probes.
    #[inline]
    pub(crate) fn run_end(&self, start: u64, end: u64, depth: usize, key: Key) -> u64 {
        let mut step = 1u64;
        let mut lo = start + 1;
        loop {
            let probe = start.saturating_add(step);
            if probe >= end {
                return self.partition(lo, end, depth, |k| k <= key);
            }
            if self.key_at(probe, depth) != key {
                return self.partition(lo, probe, depth, |k| k <= key);
            }
            lo = probe + 1;
            step = step.saturating_mul(2);
        }
    }

    /// Start of the run of `key` that contains `inside`, searching no further left than
    /// `floor`.
    #[inline]
    pub(crate) fn run_start(&self, floor: u64, inside: u64, depth: usize, key: Key) -> u64 {
        self.partition(floor, inside, depth, |k| k < key)
    }

    /// Global id of the document holding slot `pos`, and the slot's offset inside it.
    pub fn document_of(&self, pos: u64) -> Option<(u64, u64)> {
        if pos >= self.slots || self.docs == 0 {
            return None;
        }
        // Largest i with offset[i] <= pos.
        let (mut lo, mut hi) = (0u64, self.docs);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.doc_offset(mid)? <= pos {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let start = self.doc_offset(lo)?;
        Some((self.first_doc + lo, pos.checked_sub(start)?))
    }

    /// Start slot of local document `i`.
    pub(crate) fn doc_offset(&self, i: u64) -> Option<u64> {
        let at = usize::try_from(i).ok()?.checked_mul(8)?;
        let w = self.doc_offsets.get(at..)?.first_chunk::<8>()?;
        Some(u64::from_le_bytes(*w))
    }

    /// Tokens of local document `i` (without its separator).
    pub(crate) fn document_tokens(&self, i: u64) -> Option<Vec<u32>> {
        let start = self.doc_offset(i)?;
        let end = if i + 1 < self.docs {
            self.doc_offset(i + 1)?.checked_sub(1)?
        } else {
            self.slots.checked_sub(1)?
        };
        (start..end).map(|p| self.slot(p)).collect()
    }
}

enum Probe {
    Found {
        lo: u64,
        mid: u64,
        hi: u64,
        lcp_lo: usize,
        lcp_hi: usize,
    },
    Absent,
}
