//! Accepting drafted tokens against the target model's outputs.
//!
//! Both helpers emit, at every position, the token the target itself would emit there
//! (its argmax, or one draw from its distribution) and keep going only while that token is
//! the drafted one. Greedy verification therefore reproduces plain greedy decoding, and
//! sample-and-match reproduces plain sampling exactly — for a point-mass (deterministic)
//! draft this *is* speculative sampling's acceptance rule, with acceptance probability equal
//! to the target's probability of the drafted token.

use super::sampling::{Rng, Sampling};
use super::tree::DraftTree;
use crate::error::{Error, Result};

/// The outcome of verifying a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// Leading drafted tokens accepted.
    pub accepted: usize,
    /// The target's token after them (always emitted).
    pub bonus: u32,
}

impl Verified {
    /// The emitted tokens: the accepted draft prefix, then the bonus token.
    pub fn emitted(&self, draft: &[u32]) -> Vec<u32> {
        let mut out = draft[..self.accepted.min(draft.len())].to_vec();
        out.push(self.bonus);
        out
    }
}

fn rows_error(what: &str, got: usize, want: usize) -> Error {
    Error::InvalidArgument(format!(
        "{what}: got {got} target positions, need {want} (one per drafted token plus one)"
    ))
}

/// Greedy verification from the target's argmax at each position: `target_argmax[i]` is the
/// target's token after the context and `draft[..i]`, so it has `draft.len() + 1` entries.
pub fn verify_greedy(draft: &[u32], target_argmax: &[u32]) -> Result<Verified> {
    if target_argmax.len() != draft.len() + 1 {
        return Err(rows_error(
            "verify_greedy",
            target_argmax.len(),
            draft.len() + 1,
        ));
    }
    let accepted = draft
        .iter()
        .zip(target_argmax)
        .take_while(|(d, t)| d == t)
        .count();
    Ok(Verified {
        accepted,
        bonus: target_argmax[accepted],
    })
}

/// Greedy verification from logits (`draft.len() + 1` rows).
pub fn verify_greedy_logits(draft: &[u32], logits: &[Vec<f32>]) -> Result<Verified> {
    verify_sample_match(draft, logits, &Sampling::Greedy, &mut Rng::new(0))
}

/// Sample-and-match: at each position draw the target's token (one draw from `rng`, or the
/// argmax for [`Sampling::Greedy`]); accept while it equals the drafted token. The first
/// draw that differs, or the draw after a fully accepted draft, is the bonus token. Only the
/// rows that are reached are read.
pub fn verify_sample_match(
    draft: &[u32],
    logits: &[Vec<f32>],
    sampling: &Sampling,
    rng: &mut Rng,
) -> Result<Verified> {
    if logits.len() != draft.len() + 1 {
        return Err(rows_error(
            "verify_sample_match",
            logits.len(),
            draft.len() + 1,
        ));
    }
    for (i, row) in logits.iter().enumerate() {
        let x = sampling.next_token(row, rng)?;
        if draft.get(i) != Some(&x) {
            return Ok(Verified {
                accepted: i,
                bonus: x,
            });
        }
    }
    // Unreachable: the last row has no drafted token to match.
    Err(Error::InvalidArgument(
        "verify_sample_match: no rows".into(),
    ))
}

/// The outcome of verifying a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeVerified {
    /// Accepted nodes from the root down.
    pub path: Vec<usize>,
    /// The target's token after them.
    pub bonus: u32,
}

impl TreeVerified {
    /// The emitted tokens: the accepted path, then the bonus token.
    pub fn emitted(&self, tree: &DraftTree) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .path
            .iter()
            .filter_map(|&i| tree.nodes.get(i).map(|n| n.token))
            .collect();
        out.push(self.bonus);
        out
    }
}

fn walk_tree(
    tree: &DraftTree,
    mut next: impl FnMut(Option<usize>) -> Result<u32>,
) -> Result<TreeVerified> {
    let mut path = Vec::new();
    let mut at: Option<usize> = None;
    loop {
        let x = next(at)?;
        match tree.child(at, x) {
            Some(c) => {
                path.push(c);
                at = Some(c);
            }
            None => return Ok(TreeVerified { path, bonus: x }),
        }
    }
}

/// Greedy verification of a tree: `root_argmax` is the target's token after the context,
/// `node_argmax[i]` its token after the path to node `i`.
pub fn verify_greedy_tree(
    tree: &DraftTree,
    root_argmax: u32,
    node_argmax: &[u32],
) -> Result<TreeVerified> {
    if node_argmax.len() != tree.len() {
        return Err(Error::InvalidArgument(format!(
            "verify_greedy_tree: {} argmax entries for {} nodes",
            node_argmax.len(),
            tree.len()
        )));
    }
    walk_tree(tree, |at| Ok(at.map_or(root_argmax, |i| node_argmax[i])))
}

/// Sample-and-match on a tree: draw the target's token at the root (`root_logits`), follow
/// the child with that token (`node_logits[i]`: the target's logits after the path to node
/// `i`), and stop at the first draw without a matching child. Exact for any tree, since
/// every emitted token is one draw from the target at the true context.
pub fn verify_sample_match_tree(
    tree: &DraftTree,
    root_logits: &[f32],
    node_logits: &[Vec<f32>],
    sampling: &Sampling,
    rng: &mut Rng,
) -> Result<TreeVerified> {
    if node_logits.len() != tree.len() {
        return Err(Error::InvalidArgument(format!(
            "verify_sample_match_tree: {} logit rows for {} nodes",
            node_logits.len(),
            tree.len()
        )));
    }
    walk_tree(tree, |at| {
        let row = at.map_or(root_logits, |i| &node_logits[i]);
        sampling.next_token(row, rng)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DraftNode, Source, TokenFeatures};

    #[test]
    fn greedy_prefix_and_bonus() {
        assert_eq!(
            verify_greedy(&[1, 2, 3], &[1, 2, 9, 4]).unwrap(),
            Verified {
                accepted: 2,
                bonus: 9
            }
        );
        assert_eq!(
            verify_greedy(&[1, 2], &[1, 2, 7]).unwrap(),
            Verified {
                accepted: 2,
                bonus: 7
            }
        );
        assert_eq!(verify_greedy(&[], &[5]).unwrap().emitted(&[]), vec![5]);
        assert!(verify_greedy(&[1], &[1]).is_err());
        let logits = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
        assert_eq!(
            verify_greedy_logits(&[1], &logits).unwrap().emitted(&[1]),
            vec![1, 0]
        );
    }

    #[test]
    fn tree_walk() {
        let f = TokenFeatures {
            source: Source::Corpus,
            match_len: 1,
            count: 1,
            top_share: 1.0,
            depth: 1,
            prob: 1.0,
        };
        let node = |token, parent| DraftNode {
            token,
            parent,
            features: f,
            score: 1.0,
        };
        let tree = DraftTree {
            nodes: vec![
                node(5, None),
                node(6, None),
                node(7, Some(1)),
                node(8, Some(1)),
            ],
        };
        let v = verify_greedy_tree(&tree, 6, &[0, 8, 0, 3]).unwrap();
        assert_eq!(v.path, vec![1, 3]);
        assert_eq!(v.emitted(&tree), vec![6, 8, 3]);
        let v = verify_greedy_tree(&tree, 9, &[0, 8, 0, 3]).unwrap();
        assert_eq!(v.emitted(&tree), vec![9]);
        assert!(verify_greedy_tree(&tree, 9, &[0]).is_err());
    }
}
