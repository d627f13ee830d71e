//! Draft trees: several candidate continuations sharing prefixes.

use serde::Serialize;

use super::{Draft, TokenFeatures};

/// A node of a [`DraftTree`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DraftNode {
    pub token: u32,
    /// Parent node; `None` for children of the context.
    pub parent: Option<usize>,
    pub features: TokenFeatures,
    /// Estimated probability that the path to this node is accepted (product of the
    /// acceptance model's conditional estimates along the path).
    pub score: f64,
}

/// A tree of drafted tokens in best-first order: every parent precedes its children, and
/// siblings have distinct tokens. Any prefix of the nodes is again a tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DraftTree {
    pub nodes: Vec<DraftNode>,
}

impl DraftTree {
    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Keeps the first `n` nodes.
    pub fn truncate(&mut self, n: usize) {
        self.nodes.truncate(n);
    }

    /// The child of `parent` (`None`: the root) with `token`.
    pub fn child(&self, parent: Option<usize>, token: u32) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.parent == parent && n.token == token)
    }

    /// Node ids from the root to `node` (empty for an unknown node).
    pub fn path_ids(&self, node: usize) -> Vec<usize> {
        let mut ids = Vec::new();
        let mut at = Some(node);
        while let Some(i) = at {
            // Parents precede children, so a well-formed walk strictly decreases.
            if i >= self.nodes.len() || ids.last().is_some_and(|&last| i >= last) {
                return Vec::new();
            }
            ids.push(i);
            at = self.nodes[i].parent;
        }
        ids.reverse();
        ids
    }

    /// The chain from the root to `node` as a draft.
    pub fn path(&self, node: usize) -> Draft {
        let mut d = Draft::default();
        for i in self.path_ids(node) {
            d.push(self.nodes[i].token, self.nodes[i].features);
        }
        d
    }

    /// The path to the deepest node on the highest-scoring branch: from the root, repeatedly
    /// the best-scoring child.
    pub fn best_chain(&self) -> Draft {
        let mut d = Draft::default();
        let mut at: Option<usize> = None;
        loop {
            let next = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.parent == at)
                .max_by(|a, b| a.1.score.total_cmp(&b.1.score).then(b.0.cmp(&a.0)));
            match next {
                Some((i, n)) => {
                    d.push(n.token, n.features);
                    at = Some(i);
                }
                None => return d,
            }
        }
    }

    /// For attention masks: `ancestors[i][j]` is whether node `j` is node `i` or one of its
    /// ancestors.
    pub fn ancestor_mask(&self) -> Vec<Vec<bool>> {
        let n = self.nodes.len();
        let mut mask = vec![vec![false; n]; n];
        for (i, row) in mask.iter_mut().enumerate() {
            for j in self.path_ids(i) {
                row[j] = true;
            }
        }
        mask
    }
}
