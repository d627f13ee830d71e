//! Continuations of a match: the most likely chain of next tokens, or a best-first trie.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde::Serialize;

use super::matcher::MatchState;
use super::query::token_of_key;
use super::shard::SaRange;
use super::Index;
use crate::format;

/// Options for [`Index::chain`].
#[derive(Debug, Clone, Copy)]
pub struct ChainOptions {
    /// Longest chain in tokens.
    pub max_tokens: usize,
    /// Stop before a token seen fewer times than this.
    pub min_count: u64,
    /// Stop before the path probability (product of count ratios) drops below this.
    pub min_prob: f64,
    /// Sampling cap per step, as in [`crate::NtdOptions::max_support`].
    pub max_support: u64,
}

impl Default for ChainOptions {
    fn default() -> Self {
        ChainOptions {
            max_tokens: 8,
            min_count: 1,
            min_prob: 0.0,
            max_support: 1000,
        }
    }
}

/// One token of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChainStep {
    pub token: u32,
    /// Occurrences of the match followed by the chain up to and including this token.
    pub count: u64,
    /// `count` divided by the previous step's count (the empirical probability).
    pub prob: f64,
}

/// Options for [`Index::trie`].
#[derive(Debug, Clone, Copy)]
pub struct TrieOptions {
    /// Deepest node, in tokens after the match.
    pub max_depth: usize,
    /// Most nodes.
    pub max_nodes: usize,
    /// Skip nodes seen fewer times than this.
    pub min_count: u64,
    /// Skip nodes whose path probability (count / match count) is below this.
    pub min_prob: f64,
    /// Sampling cap per expansion, as in [`crate::NtdOptions::max_support`].
    pub max_support: u64,
}

impl Default for TrieOptions {
    fn default() -> Self {
        TrieOptions {
            max_depth: 8,
            max_nodes: 32,
            min_count: 1,
            min_prob: 0.0,
            max_support: 1000,
        }
    }
}

/// A node of a continuation trie.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TrieNode {
    pub token: u32,
    /// Index of the parent node; `None` for children of the match itself.
    pub parent: Option<usize>,
    /// 1 for children of the match.
    pub depth: usize,
    /// Occurrences of the match followed by the path to this node.
    pub count: u64,
    /// `count` divided by the match count.
    pub prob: f64,
}

/// A continuation trie; nodes come in best-first order, so parents precede children.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trie {
    /// Occurrences of the match.
    pub root_count: u64,
    pub nodes: Vec<TrieNode>,
}

struct Candidate {
    count: u64,
    seq: u64,
    token: u32,
    parent: Option<usize>,
    depth: usize,
    ranges: Vec<SaRange>,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Larger count first; among equal counts, the earlier candidate.
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then(other.seq.cmp(&self.seq))
    }
}

impl<S: AsRef<[u8]>> Index<S> {
    /// The most frequent continuation of the match, token by token, until the end of a
    /// document, a threshold, or `max_tokens`.
    pub fn chain(&self, state: &MatchState, options: ChainOptions) -> Vec<ChainStep> {
        let separator = format::separator(self.token_width());
        let mut ranges = state.ranges().to_vec();
        let mut depth = state.len();
        let mut parent = state.count();
        let mut path_prob = 1.0f64;
        let mut out = Vec::new();
        while out.len() < options.max_tokens && parent > 0 {
            if parent == 1 {
                // A single occurrence: read the rest straight from the token array.
                self.extend_single(&ranges, depth, options, path_prob, &mut out);
                break;
            }
            let (children, _) = self.children(&ranges, depth, options.max_support, true);
            let Some(best) = children
                .into_iter()
                .max_by(|a, b| a.count.cmp(&b.count).then(b.key.cmp(&a.key)))
            else {
                break;
            };
            let Some(token) = token_of_key(best.key, separator) else {
                break;
            };
            let prob = best.count as f64 / parent as f64;
            if best.count < options.min_count || path_prob * prob < options.min_prob {
                break;
            }
            path_prob *= prob;
            out.push(ChainStep {
                token,
                count: best.count,
                prob,
            });
            ranges = best.ranges;
            depth += 1;
            parent = best.count;
        }
        out
    }

    fn extend_single(
        &self,
        ranges: &[SaRange],
        depth: usize,
        options: ChainOptions,
        path_prob: f64,
        out: &mut Vec<ChainStep>,
    ) {
        let Some((s, range)) = ranges
            .iter()
            .enumerate()
            .take(self.shard_count())
            .find(|(_, r)| !r.is_empty())
        else {
            return;
        };
        if options.min_count > 1 || path_prob < options.min_prob {
            return;
        }
        let shard = self.shard(s);
        let start = shard.pointer(range.start).saturating_add(depth as u64);
        for i in 0.. {
            if out.len() >= options.max_tokens {
                break;
            }
            match shard.slot(start.saturating_add(i)) {
                Some(t) if t != shard.separator => out.push(ChainStep {
                    token: t,
                    count: 1,
                    prob: 1.0,
                }),
                _ => break,
            }
        }
    }

    /// A best-first trie of continuations: nodes are added in decreasing count order (the
    /// empirical path probability) until `max_nodes`, skipping ends of documents.
    pub fn trie(&self, state: &MatchState, options: TrieOptions) -> Trie {
        let separator = format::separator(self.token_width());
        let root_count = state.count();
        let mut nodes = Vec::new();
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut expand = |heap: &mut BinaryHeap<Candidate>,
                          ranges: &[SaRange],
                          depth: usize,
                          parent: Option<usize>,
                          node_depth: usize| {
            let (children, _) = self.children(ranges, depth, options.max_support, true);
            for c in children {
                if let Some(token) = token_of_key(c.key, separator) {
                    seq += 1;
                    heap.push(Candidate {
                        count: c.count,
                        seq,
                        token,
                        parent,
                        depth: node_depth + 1,
                        ranges: c.ranges,
                    });
                }
            }
        };
        if root_count > 0 && options.max_depth > 0 {
            expand(&mut heap, state.ranges(), state.len(), None, 0);
        }
        while nodes.len() < options.max_nodes {
            let Some(c) = heap.pop() else { break };
            let prob = c.count as f64 / root_count as f64;
            if c.count < options.min_count || prob < options.min_prob {
                break;
            }
            let id = nodes.len();
            nodes.push(TrieNode {
                token: c.token,
                parent: c.parent,
                depth: c.depth,
                count: c.count,
                prob,
            });
            if c.depth < options.max_depth {
                expand(
                    &mut heap,
                    &c.ranges,
                    state.len() + c.depth,
                    Some(id),
                    c.depth,
                );
            }
        }
        Trie { root_count, nodes }
    }
}
