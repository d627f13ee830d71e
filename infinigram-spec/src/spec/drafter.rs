//! The n-gram drafter: candidates from the corpus index and the request's own tokens.

use std::collections::HashMap;
use std::sync::Arc;

use memmap2::Mmap;

use super::local::{LocalIndex, LocalMatch};
use super::policy::{expected_accepted, AcceptModel};
use super::tree::{DraftNode, DraftTree};
use super::{Draft, Source, TokenFeatures};
use crate::error::Result;
use crate::index::{ChainOptions, Index, MatchState, TrieOptions};

/// Proposes drafts for one request. Drafts depend only on the accepted context (the prompt
/// and the tokens emitted so far); a draft that is not accepted needs no undo.
pub trait Drafter {
    /// Starts a request with `prompt`, forgetting any previous one.
    fn start(&mut self, prompt: &[u32]) -> Result<()>;
    /// Appends emitted tokens to the context.
    fn accept(&mut self, tokens: &[u32]) -> Result<()>;
    /// A chain of at most `max_len` tokens; `model` ranks the candidates.
    fn draft(&mut self, max_len: usize, model: &dyn AcceptModel) -> Result<Draft>;
    /// A tree of at most `budget` nodes and `max_depth` levels, best-first by the path
    /// acceptance probability under `model`.
    fn draft_tree(
        &mut self,
        budget: usize,
        max_depth: usize,
        model: &dyn AcceptModel,
    ) -> Result<DraftTree>;
}

/// Settings of an [`NgramDrafter`].
#[derive(Debug, Clone)]
pub struct NgramDrafterConfig {
    /// Longest suffix match kept (corpus and local).
    pub max_match_len: usize,
    /// Matches shorter than this are not drafted from.
    pub min_match_len: usize,
    /// Shorter matches tried per source besides the longest (`len − 1`, `len / 2`, `len / 4`, …).
    pub backoff: usize,
    /// Draft from the corpus index.
    pub use_corpus: bool,
    /// Draft from the request's own tokens.
    pub use_local: bool,
    /// Longest n-gram hashed by the local index (longer matches are extended from it).
    pub local_max_n: usize,
    /// Most recent occurrences of a local match considered.
    pub local_max_occurrences: usize,
    /// Sampling cap of corpus continuations, as in [`crate::NtdOptions::max_support`]: every
    /// continuation with a share of at least `1 / max_support` is found, counts stay exact.
    pub max_support: u64,
}

impl Default for NgramDrafterConfig {
    fn default() -> Self {
        NgramDrafterConfig {
            max_match_len: 256,
            min_match_len: 1,
            backoff: 2,
            use_corpus: true,
            use_local: true,
            local_max_n: 12,
            local_max_occurrences: 256,
            max_support: 64,
        }
    }
}

/// A drafter over a shared corpus index (optional) and a per-request [`LocalIndex`].
///
/// The corpus match is a [`MatchState`] advanced with every accepted token (a token outside
/// the index's vocabulary resets it). Candidates: the longest corpus match, up to `backoff`
/// shorter corpus suffixes, and the same from the local index; the chain with the most
/// expected accepted tokens wins. Trees merge the candidates' continuation tries.
#[derive(Debug)]
pub struct NgramDrafter<S = Mmap> {
    index: Option<Arc<Index<S>>>,
    config: NgramDrafterConfig,
    state: Option<MatchState>,
    local: LocalIndex,
}

/// A candidate continuation: its source, match length and tokens with (count, parent count).
struct Candidate {
    source: Source,
    match_len: usize,
    steps: Vec<(u32, u64, u64)>,
}

/// A candidate trie: nodes (token, parent, depth, count, parent count) in best-first order.
struct CandidateTrie {
    source: Source,
    match_len: usize,
    nodes: Vec<(u32, Option<usize>, usize, u64, u64)>,
}

fn features(
    source: Source,
    match_len: usize,
    depth: usize,
    count: u64,
    parent: u64,
    prob: f64,
) -> TokenFeatures {
    let share = if parent == 0 {
        0.0
    } else {
        count as f64 / parent as f64
    };
    TokenFeatures {
        source,
        match_len: match_len.min(u32::MAX as usize) as u32,
        count,
        top_share: share as f32,
        depth: depth.min(u32::MAX as usize) as u32,
        prob: prob as f32,
    }
}

/// Shorter lengths to back off to: `len − 1`, then halving, at least `min`, distinct.
fn backoff_lengths(len: usize, min: usize, n: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let mut l = len.saturating_sub(1);
    while out.len() < n && l >= min.max(1) {
        if out.last() != Some(&l) {
            out.push(l);
        }
        l = if out.len() == 1 { len / 2 } else { l / 2 };
        if out.last().is_some_and(|&last| l >= last) {
            l = out.last().copied().unwrap_or(1) - 1;
        }
    }
    out
}

impl<S: AsRef<[u8]>> NgramDrafter<S> {
    /// A drafter over `index` (or only the request's tokens when `None`).
    pub fn new(index: Option<Arc<Index<S>>>, config: NgramDrafterConfig) -> Self {
        let local = LocalIndex::new(config.local_max_n);
        NgramDrafter {
            index,
            config,
            state: None,
            local,
        }
    }

    /// The settings.
    pub fn config(&self) -> &NgramDrafterConfig {
        &self.config
    }

    /// The context so far (prompt and accepted tokens).
    pub fn context(&self) -> &[u32] {
        self.local.tokens()
    }

    /// The corpus match of the context.
    pub fn corpus_match(&self) -> Option<&MatchState> {
        self.state.as_ref()
    }

    /// The local index of the context.
    pub fn local_index(&self) -> &LocalIndex {
        &self.local
    }

    fn index(&self) -> Option<&Index<S>> {
        self.index.as_deref().filter(|_| self.config.use_corpus)
    }

    /// The corpus match recomputed from scratch over the context's last tokens.
    fn cold_match(&self, index: &Index<S>) -> MatchState {
        let ctx = self.local.tokens();
        let max = self.config.max_match_len;
        let from = ctx.len().saturating_sub(max);
        // Only the tokens after the last out-of-vocabulary one can match.
        let start = ctx[from..]
            .iter()
            .rposition(|&t| t >= index.vocab_size())
            .map_or(from, |p| from + p + 1);
        index
            .longest_suffix(&ctx[start..], max)
            .unwrap_or_else(|_| index.empty_match(max))
    }

    /// Corpus match states: the longest, then the backoff lengths.
    fn corpus_states(&self, index: &Index<S>) -> Vec<MatchState> {
        let Some(state) = &self.state else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if state.len() >= self.config.min_match_len.max(1) {
            out.push(state.clone());
        }
        let ctx = self.local.tokens();
        for l in backoff_lengths(state.len(), self.config.min_match_len, self.config.backoff) {
            if let Ok(ranges) = index.find(&ctx[ctx.len() - l..]) {
                out.push(MatchState::from_ranges(l, state.max_len(), ranges));
            }
        }
        out
    }

    /// Local matches: the longest, then the backoff lengths.
    fn local_matches(&self) -> Vec<LocalMatch> {
        if !self.config.use_local {
            return Vec::new();
        }
        let limit = self.config.local_max_occurrences;
        let m = self.local.longest_match(self.config.max_match_len, limit);
        if m.len < self.config.min_match_len.max(1) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for l in backoff_lengths(m.len, self.config.min_match_len, self.config.backoff) {
            if l <= self.local.max_n() {
                out.push(self.local.suffix_match(l, limit));
            }
        }
        out.insert(0, m);
        out
    }

    fn chain_candidates(&self, max_len: usize) -> Vec<Candidate> {
        let mut out = Vec::new();
        if let Some(index) = self.index() {
            let options = ChainOptions {
                max_tokens: max_len,
                max_support: self.config.max_support,
                ..ChainOptions::default()
            };
            for st in self.corpus_states(index) {
                let steps = index
                    .chain(&st, options)
                    .into_iter()
                    .map(|s| {
                        // prob = count / occurrences of the context before this token.
                        let parent = if s.prob > 0.0 {
                            (s.count as f64 / s.prob).round() as u64
                        } else {
                            0
                        };
                        (s.token, s.count, parent)
                    })
                    .collect();
                out.push(Candidate {
                    source: Source::Corpus,
                    match_len: st.len(),
                    steps,
                });
            }
        }
        for m in self.local_matches() {
            let steps = self
                .local
                .chain(&m, max_len)
                .into_iter()
                .map(|s| (s.token, s.count, s.parent_count))
                .collect();
            out.push(Candidate {
                source: Source::Local,
                match_len: m.len,
                steps,
            });
        }
        out
    }

    fn trie_candidates(&self, budget: usize, max_depth: usize) -> Vec<CandidateTrie> {
        let mut out = Vec::new();
        if let Some(index) = self.index() {
            let options = TrieOptions {
                max_depth,
                max_nodes: budget,
                max_support: self.config.max_support,
                ..TrieOptions::default()
            };
            for st in self.corpus_states(index) {
                let trie = index.trie(&st, options);
                let nodes = trie
                    .nodes
                    .iter()
                    .map(|n| {
                        let parent = n.parent.map_or(trie.root_count, |p| trie.nodes[p].count);
                        (n.token, n.parent, n.depth, n.count, parent)
                    })
                    .collect();
                out.push(CandidateTrie {
                    source: Source::Corpus,
                    match_len: st.len(),
                    nodes,
                });
            }
        }
        for m in self.local_matches() {
            let nodes = self
                .local
                .trie(&m, budget, max_depth)
                .into_iter()
                .map(|n| (n.token, n.parent, n.depth, n.count, n.parent_count))
                .collect();
            out.push(CandidateTrie {
                source: Source::Local,
                match_len: m.len,
                nodes,
            });
        }
        out
    }
}

impl<S: AsRef<[u8]>> Drafter for NgramDrafter<S> {
    fn start(&mut self, prompt: &[u32]) -> Result<()> {
        self.local = LocalIndex::new(self.config.local_max_n);
        self.local.extend(prompt);
        self.state = self.index().map(|index| self.cold_match(index));
        Ok(())
    }

    fn accept(&mut self, tokens: &[u32]) -> Result<()> {
        self.local.extend(tokens);
        let max = self.config.max_match_len;
        if let (Some(index), Some(state)) = (self.index.as_deref(), self.state.as_mut()) {
            for &t in tokens {
                if t >= index.vocab_size() {
                    *state = index.empty_match(max);
                } else {
                    state.advance(index, t)?;
                }
            }
        }
        Ok(())
    }

    fn draft(&mut self, max_len: usize, model: &dyn AcceptModel) -> Result<Draft> {
        if max_len == 0 {
            return Ok(Draft::default());
        }
        let mut best: Option<(f64, Draft)> = None;
        for c in self.chain_candidates(max_len) {
            let mut d = Draft::default();
            let mut prob = 1.0f64;
            for (i, &(token, count, parent)) in c.steps.iter().enumerate().take(max_len) {
                prob *= if parent == 0 {
                    0.0
                } else {
                    count as f64 / parent as f64
                };
                d.push(
                    token,
                    features(c.source, c.match_len, i + 1, count, parent, prob),
                );
            }
            let score = expected_accepted(model, &d.features)
                .last()
                .copied()
                .unwrap_or(0.0);
            if !d.is_empty() && best.as_ref().is_none_or(|b| score > b.0) {
                best = Some((score, d));
            }
        }
        Ok(best.map(|b| b.1).unwrap_or_default())
    }

    fn draft_tree(
        &mut self,
        budget: usize,
        max_depth: usize,
        model: &dyn AcceptModel,
    ) -> Result<DraftTree> {
        // Every candidate node with its score and features.
        struct Scored {
            score: f64,
            depth: usize,
            cand: usize,
            node: usize,
        }
        let cands = self.trie_candidates(budget, max_depth);
        let mut scored = Vec::new();
        let mut feats: Vec<Vec<(TokenFeatures, f64)>> = Vec::with_capacity(cands.len());
        for (ci, c) in cands.iter().enumerate() {
            let mut f: Vec<(TokenFeatures, f64)> = Vec::with_capacity(c.nodes.len());
            for (ni, &(_, parent, depth, count, parent_count)) in c.nodes.iter().enumerate() {
                let (up_prob, up_score) = parent
                    .and_then(|p| f.get(p))
                    .map_or((1.0, 1.0), |x| (x.0.prob as f64, x.1));
                let share = if parent_count == 0 {
                    0.0
                } else {
                    count as f64 / parent_count as f64
                };
                let tf = features(
                    c.source,
                    c.match_len,
                    depth,
                    count,
                    parent_count,
                    up_prob * share,
                );
                let score = up_score * model.accept_prob(&tf).clamp(0.0, 1.0);
                f.push((tf, score));
                scored.push(Scored {
                    score,
                    depth,
                    cand: ci,
                    node: ni,
                });
            }
            feats.push(f);
        }
        // Best first; parents (score ≥ child's, smaller depth) come before their children.
        scored.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.depth.cmp(&b.depth))
                .then(a.cand.cmp(&b.cand))
                .then(a.node.cmp(&b.node))
        });
        let mut tree = DraftTree::default();
        let mut merged: Vec<Vec<Option<usize>>> =
            cands.iter().map(|c| vec![None; c.nodes.len()]).collect();
        let mut children: HashMap<(Option<usize>, u32), usize> = HashMap::new();
        for s in scored {
            let (token, parent, ..) = cands[s.cand].nodes[s.node];
            let tree_parent = match parent {
                None => None,
                Some(p) => match merged[s.cand][p] {
                    Some(id) => Some(id),
                    None => continue, // parent did not make it into the tree
                },
            };
            if let Some(&id) = children.get(&(tree_parent, token)) {
                merged[s.cand][s.node] = Some(id);
                continue;
            }
            if tree.len() >= budget {
                continue;
            }
            let (features, score) = feats[s.cand][s.node];
            let id = tree.len();
            tree.nodes.push(DraftNode {
                token,
                parent: tree_parent,
                features,
                score,
            });
            children.insert((tree_parent, token), id);
            merged[s.cand][s.node] = Some(id);
        }
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PriorModel;
    use crate::{BuildConfig, IndexBuilder};

    #[test]
    fn backoff_lengths_are_distinct_and_shorter() {
        assert_eq!(backoff_lengths(8, 1, 3), vec![7, 4, 2]);
        assert_eq!(backoff_lengths(2, 1, 3), vec![1]);
        assert_eq!(backoff_lengths(1, 1, 3), Vec::<usize>::new());
        assert_eq!(backoff_lengths(3, 1, 2), vec![2, 1]);
        assert_eq!(backoff_lengths(10, 4, 5), vec![9, 5]);
    }

    #[test]
    fn drafts_from_corpus_and_local() {
        let docs = vec![
            vec![1u32, 2, 3, 4, 5, 6],
            vec![1, 2, 3, 4, 5, 7],
            vec![9, 2, 3, 8],
        ];
        let index = IndexBuilder::new(BuildConfig::new(16))
            .unwrap()
            .build_in_memory(docs.into_iter().map(Ok))
            .unwrap();
        let mut d = NgramDrafter::new(Some(Arc::new(index)), NgramDrafterConfig::default());
        d.start(&[0, 1, 2]).unwrap();
        let draft = d.draft(8, &PriorModel).unwrap();
        assert_eq!(draft.tokens, vec![3, 4, 5, 6]);
        assert_eq!(draft.features[0].source, Source::Corpus);
        assert_eq!(draft.features[0].match_len, 2);
        assert_eq!(draft.features[0].count, 2);
        assert_eq!(draft.features[3].top_share, 0.5);
        // The request repeats itself: the local index knows what follows "10 11".
        d.accept(&[10, 11, 12, 13, 0, 10, 11]).unwrap();
        let draft = d.draft(3, &PriorModel).unwrap();
        assert_eq!(draft.tokens, vec![12, 13, 0]);
        assert_eq!(draft.features[0].source, Source::Local);
        // Out-of-vocabulary tokens reset the corpus match instead of failing.
        d.accept(&[99, 1, 2]).unwrap();
        assert_eq!(d.corpus_match().map(|m| m.len()), Some(2));
        let tree = d.draft_tree(6, 4, &PriorModel).unwrap();
        assert!(tree.len() <= 6 && !tree.is_empty());
        for (i, n) in tree.nodes.iter().enumerate() {
            assert!(n.parent.is_none_or(|p| p < i));
            assert!(n.parent.is_none_or(|p| tree.nodes[p].score >= n.score));
            assert_eq!(tree.child(n.parent, n.token), Some(i));
        }
        assert_eq!(tree.best_chain().tokens[0], 3);
    }
}
