//! A per-request n-gram index of the prompt and the generated tokens that grows by one token
//! at a time.
//!
//! Appending token `t` at end position `e` (exclusive) records, for every `n ≤ max_n`, the
//! n-gram ending at `e` under a 64-bit hash key: a map from key to the most recent end
//! position, and a `prev` array linking every (end, n) slot to the previous end of the same
//! n-gram. Appending costs `max_n` hash-map updates and no allocation beyond amortized growth;
//! the occurrences of any suffix of length `≤ max_n` are then a linked list, most recent first.
//! Longer matches are found by extending the `max_n` matches backwards. Hash collisions are
//! harmless: every occurrence is checked against the tokens before use.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Marks the end of a `prev` chain.
const NONE: u32 = u32::MAX;

/// Identity hasher for keys that are already well mixed.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[inline]
fn mix(h: u64, token: u32) -> u64 {
    // splitmix64 finalizer over the running hash and the token.
    let mut z = h ^ (token as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A suffix of the indexed tokens and where it occurred before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalMatch {
    /// Length of the matched suffix.
    pub len: usize,
    /// End positions (exclusive) of earlier occurrences, most recent first; each is followed
    /// by at least one token.
    pub ends: Vec<u32>,
}

/// A continuation step read from a [`LocalIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalStep {
    pub token: u32,
    /// Occurrences followed by the path including this token.
    pub count: u64,
    /// Occurrences followed by the path before this token (with any next token).
    pub parent_count: u64,
}

/// A node of a local continuation trie (best-first order, parents first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalNode {
    pub token: u32,
    pub parent: Option<usize>,
    pub depth: usize,
    pub count: u64,
    pub parent_count: u64,
}

/// The appendable n-gram index of one request's tokens.
#[derive(Debug, Clone)]
pub struct LocalIndex {
    tokens: Vec<u32>,
    max_n: usize,
    heads: HashMap<u64, u32, BuildHasherDefault<KeyHasher>>,
    /// `prev[(e - 1) * max_n + (n - 1)]`: previous end of the n-gram that ends at `e`.
    prev: Vec<u32>,
}

impl LocalIndex {
    /// An empty index keeping n-grams up to `max_n` tokens (at least 1).
    pub fn new(max_n: usize) -> LocalIndex {
        LocalIndex {
            tokens: Vec::new(),
            max_n: max_n.max(1),
            heads: HashMap::default(),
            prev: Vec::new(),
        }
    }

    /// The indexed tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of indexed tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether no token is indexed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Longest n-gram kept in the hash table.
    pub fn max_n(&self) -> usize {
        self.max_n
    }

    /// Appends tokens. Positions are 32-bit: tokens past `u32::MAX - 1` are not indexed.
    pub fn extend(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.push(t);
        }
    }

    /// Appends one token: `max_n` hash-map updates.
    pub fn push(&mut self, token: u32) {
        if self.tokens.len() >= (NONE - 1) as usize {
            return;
        }
        self.tokens.push(token);
        let e = self.tokens.len();
        let mut h = 0u64;
        for n in 1..=self.max_n {
            if n <= e {
                h = mix(h, self.tokens[e - n]);
                let prev = self.heads.insert(h, e as u32).unwrap_or(NONE);
                self.prev.push(prev);
            } else {
                self.prev.push(NONE);
            }
        }
    }

    /// Hash key of the `n` tokens ending at `end`.
    fn key(&self, end: usize, n: usize) -> u64 {
        self.tokens[end - n..end]
            .iter()
            .rev()
            .fold(0, |h, &t| mix(h, t))
    }

    /// Earlier ends of the last `n ≤ max_n` tokens, most recent first, checked against the
    /// tokens, at most `limit`.
    fn earlier_ends(&self, n: usize, limit: usize) -> Vec<u32> {
        let len = self.tokens.len();
        let mut out = Vec::new();
        if n == 0 || n > self.max_n || n >= len {
            return out;
        }
        let suffix = &self.tokens[len - n..];
        let mut at = self.heads.get(&self.key(len, n)).copied().unwrap_or(NONE);
        while at != NONE && out.len() < limit {
            let e = at as usize;
            if e < len && e >= n && &self.tokens[e - n..e] == suffix {
                out.push(at);
            }
            at = self
                .prev
                .get((e.saturating_sub(1)) * self.max_n + n - 1)
                .copied()
                .unwrap_or(NONE);
        }
        out
    }

    /// Whether the last `n ≤ max_n` tokens occurred earlier (followed by a token).
    fn occurs_earlier(&self, n: usize) -> bool {
        !self.earlier_ends(n, 1).is_empty()
    }

    /// The longest suffix that occurred earlier, up to `max_len` tokens, with at most `limit`
    /// of its most recent earlier occurrences. Beyond `max_n` tokens the match is extended
    /// backwards from the `max_n`-gram's occurrences, keeping those of the longest extension.
    pub fn longest_match(&self, max_len: usize, limit: usize) -> LocalMatch {
        let len = self.tokens.len();
        let cap = self.max_n.min(max_len).min(len.saturating_sub(1));
        // Occurrence is monotone in n: bisect for the longest n that occurs.
        let (mut good, mut bad) = (0usize, cap + 1);
        while bad - good > 1 {
            let mid = good + (bad - good) / 2;
            if self.occurs_earlier(mid) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        if good == 0 {
            return LocalMatch::default();
        }
        let ends = self.earlier_ends(good, limit);
        if good < self.max_n || max_len <= good {
            return LocalMatch { len: good, ends };
        }
        // Extend backwards; keep the occurrences with the longest match.
        let extended: Vec<(usize, u32)> = ends
            .iter()
            .map(|&e| {
                let e = e as usize;
                let mut l = good;
                while l < max_len && l < e && self.tokens[e - 1 - l] == self.tokens[len - 1 - l] {
                    l += 1;
                }
                (l, e as u32)
            })
            .collect();
        let best = extended.iter().map(|x| x.0).max().unwrap_or(good);
        LocalMatch {
            len: best,
            ends: extended
                .into_iter()
                .filter(|x| x.0 == best)
                .map(|x| x.1)
                .collect(),
        }
    }

    /// The earlier occurrences of the last `n` tokens (`n ≤ max_n`), at most `limit`.
    pub fn suffix_match(&self, n: usize, limit: usize) -> LocalMatch {
        LocalMatch {
            len: n,
            ends: self.earlier_ends(n, limit),
        }
    }

    /// Groups `ends` by the token `depth` places after each end; returns (token, ends) groups
    /// (ends keep their order) and the number of ends that have a token there.
    fn children(&self, ends: &[u32], depth: usize) -> (Vec<(u32, Vec<u32>)>, u64) {
        let len = self.tokens.len();
        let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut total = 0u64;
        for &e in ends {
            let at = e as usize + depth;
            if at >= len {
                continue;
            }
            let t = self.tokens[at];
            total += 1;
            match groups.iter_mut().find(|g| g.0 == t) {
                Some(g) => g.1.push(e),
                None => groups.push((t, vec![e])),
            }
        }
        (groups, total)
    }

    /// The most frequent continuation of a match, token by token (ties: the most recent
    /// occurrence), up to `max_tokens`.
    pub fn chain(&self, m: &LocalMatch, max_tokens: usize) -> Vec<LocalStep> {
        let mut ends = m.ends.clone();
        let mut out = Vec::new();
        while out.len() < max_tokens && !ends.is_empty() {
            let (groups, total) = self.children(&ends, out.len());
            // Groups come in order of their most recent occurrence; max_by_key keeps the
            // last maximum, so reverse to prefer the earliest group (most recent) on ties.
            let Some((token, next)) = groups.into_iter().rev().max_by_key(|g| g.1.len()) else {
                break;
            };
            out.push(LocalStep {
                token,
                count: next.len() as u64,
                parent_count: total,
            });
            ends = next;
        }
        out
    }

    /// A best-first trie of continuations by count, up to `max_nodes` nodes and `max_depth`.
    pub fn trie(&self, m: &LocalMatch, max_nodes: usize, max_depth: usize) -> Vec<LocalNode> {
        struct Cand {
            count: u64,
            seq: u64,
            node: LocalNode,
            ends: Vec<u32>,
        }
        impl PartialEq for Cand {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o) == Ordering::Equal
            }
        }
        impl Eq for Cand {}
        impl PartialOrd for Cand {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Cand {
            fn cmp(&self, o: &Self) -> Ordering {
                self.count.cmp(&o.count).then(o.seq.cmp(&self.seq))
            }
        }
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut expand = |heap: &mut BinaryHeap<Cand>, ends: &[u32], depth, parent| {
            let (groups, total) = self.children(ends, depth);
            for (token, ends) in groups {
                seq += 1;
                heap.push(Cand {
                    count: ends.len() as u64,
                    seq,
                    node: LocalNode {
                        token,
                        parent,
                        depth: depth + 1,
                        count: ends.len() as u64,
                        parent_count: total,
                    },
                    ends,
                });
            }
        };
        let mut nodes = Vec::new();
        if max_depth > 0 {
            expand(&mut heap, &m.ends, 0, None);
        }
        while nodes.len() < max_nodes {
            let Some(c) = heap.pop() else { break };
            let id = nodes.len();
            nodes.push(c.node);
            if c.node.depth < max_depth {
                expand(&mut heap, &c.ends, c.node.depth, Some(id));
            }
        }
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: longest suffix (≤ cap) occurring earlier with a following token.
    fn brute_longest(t: &[u32], cap: usize) -> usize {
        let len = t.len();
        (1..=cap.min(len.saturating_sub(1)))
            .rev()
            .find(|&n| (n..len).any(|e| t[e - n..e] == t[len - n..]))
            .unwrap_or(0)
    }

    #[test]
    fn longest_match_and_chain_equal_brute_force() {
        let mut state = 0x1234_5678u64;
        for round in 0..200 {
            let alpha = 2 + round % 5;
            let max_n = 1 + round % 6;
            let mut idx = LocalIndex::new(max_n);
            let mut toks = Vec::new();
            for _ in 0..60 {
                state = mix(state, 7);
                let t = (state % alpha as u64) as u32;
                toks.push(t);
                idx.push(t);
                let cap = 12;
                let m = idx.longest_match(cap, usize::MAX);
                assert_eq!(m.len, brute_longest(&toks, cap), "{toks:?} max_n {max_n}");
                if m.len > 0 {
                    let len = toks.len();
                    let mut want: Vec<u32> = (m.len..len)
                        .filter(|&e| toks[e - m.len..e] == toks[len - m.len..])
                        .map(|e| e as u32)
                        .collect();
                    want.reverse();
                    if m.len > max_n {
                        assert!(m.ends.iter().all(|e| want.contains(e)));
                    } else {
                        assert_eq!(m.ends, want);
                    }
                    let chain = idx.chain(&m, 4);
                    if let Some(first) = chain.first() {
                        let nexts: Vec<u32> = m.ends.iter().map(|&e| toks[e as usize]).collect();
                        let best = nexts.iter().filter(|&&x| x == first.token).count();
                        assert!(nexts
                            .iter()
                            .all(|x| nexts.iter().filter(|&y| y == x).count() <= best));
                        assert_eq!(first.count as usize, best);
                        assert_eq!(first.parent_count as usize, nexts.len());
                    }
                    let trie = idx.trie(&m, 10, 3);
                    for (i, n) in trie.iter().enumerate() {
                        assert!(n.parent.is_none_or(|p| p < i));
                        assert!(n.count <= n.parent_count && n.count > 0);
                    }
                }
            }
        }
    }

    #[test]
    fn empty_and_single_token() {
        let mut idx = LocalIndex::new(4);
        assert_eq!(idx.longest_match(8, 8), LocalMatch::default());
        idx.push(3);
        assert_eq!(idx.longest_match(8, 8).len, 0);
        idx.push(3);
        let m = idx.longest_match(8, 8);
        assert_eq!((m.len, m.ends.clone()), (1, vec![1]));
        assert_eq!(idx.chain(&m, 3)[0].token, 3);
    }
}
