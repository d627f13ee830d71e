//! Greedy speculative decoding replayed offline over the model's real greedy outputs.
//!
//! With greedy verification a drafted token is accepted exactly when it equals the target's
//! greedy token at that position, so replaying the `NgramDrafter` over the output the server
//! actually produced gives the acceptance a working verifier would see: per step the drafter
//! proposes up to γ tokens from the context (prompt + accepted output), the longest prefix
//! equal to the output is accepted, plus the target's own next token (the bonus token of
//! `infinigram_spec::verify_greedy`).

use std::sync::Arc;

use anyhow::{anyhow, Result};
use infinigram_spec::spec::PriorModel;
use infinigram_spec::{Drafter, Index, NgramDrafter, NgramDrafterConfig};
use serde::Serialize;

/// Outcome at one γ.
#[derive(Debug, Clone, Serialize)]
pub struct GammaRow {
    pub gamma: usize,
    pub steps: usize,
    pub tokens: usize,
    pub drafted: usize,
    pub accepted: usize,
}

/// One bucket of an acceptance table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bucket {
    pub label: String,
    pub drafted: u64,
    pub verified: u64,
    pub accepted: u64,
}

/// Outcome of tree drafting at one node budget: per step the drafter proposes a tree of at
/// most `budget` nodes (depth ≤ `max_depth`), and the longest root path equal to the output
/// is accepted, plus the bonus token (what `infinigram_spec::verify_greedy_tree` emits).
#[derive(Debug, Clone, Serialize)]
pub struct TreeRow {
    pub budget: usize,
    pub max_depth: usize,
    pub steps: usize,
    pub tokens: usize,
    /// Nodes proposed over all steps (the verify pass's extra rows).
    pub nodes: usize,
    pub accepted: usize,
}

/// Replay results: one row per γ, and at the largest γ the acceptance tables.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Replay {
    pub rows: Vec<GammaRow>,
    pub trees: Vec<TreeRow>,
    pub by_match_len: Vec<Bucket>,
    pub by_count: Vec<Bucket>,
}

fn log2_bucket(x: u64, n: usize) -> usize {
    if x == 0 {
        0
    } else {
        ((64 - x.leading_zeros()) as usize).min(n - 1)
    }
}

fn labels(n: usize) -> Vec<Bucket> {
    (0..n)
        .map(|b| Bucket {
            label: match b {
                0 => "0".into(),
                1 => "1".into(),
                _ if b + 1 == n => format!("≥{}", 1u64 << (b - 1)),
                _ => format!("{}–{}", 1u64 << (b - 1), (1u64 << b) - 1),
            },
            ..Default::default()
        })
        .collect()
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| anyhow!("{e}"))?
        .get_ids()
        .to_vec())
}

/// Replays `(prompt, output)` texts at each γ in `gammas` (ascending; tables at the last) and
/// with trees of each node budget in `budgets` (depth at most `max_depth`).
pub fn replay(
    index: &Arc<Index>,
    tok: &tokenizers::Tokenizer,
    items: &[(String, String)],
    gammas: &[usize],
    budgets: &[usize],
    max_depth: usize,
) -> Result<Replay> {
    let encoded: Vec<(Vec<u32>, Vec<u32>)> = items
        .iter()
        .map(|(p, o)| Ok((encode(tok, p)?, encode(tok, o)?)))
        .collect::<Result<_>>()?;
    let mut out = Replay {
        by_match_len: labels(9),
        by_count: labels(14),
        ..Default::default()
    };
    let last = gammas.last().copied().unwrap_or(0);
    for &gamma in gammas {
        let mut row = GammaRow {
            gamma,
            steps: 0,
            tokens: 0,
            drafted: 0,
            accepted: 0,
        };
        for (prompt, output) in &encoded {
            let mut d = NgramDrafter::new(Some(Arc::clone(index)), NgramDrafterConfig::default());
            d.start(prompt)?;
            let mut pos = 0;
            while pos < output.len() {
                let room = output.len() - pos - 1;
                let draft = d.draft(gamma.min(room), &PriorModel)?;
                let accepted = draft
                    .tokens
                    .iter()
                    .zip(&output[pos..])
                    .take_while(|(a, b)| a == b)
                    .count();
                if gamma == last {
                    for (i, f) in draft.features.iter().enumerate() {
                        let ml = log2_bucket(f.match_len as u64, out.by_match_len.len());
                        let ct = log2_bucket(f.count, out.by_count.len());
                        for b in [&mut out.by_match_len[ml], &mut out.by_count[ct]] {
                            b.drafted += 1;
                            b.verified += (i <= accepted) as u64;
                            b.accepted += (i < accepted) as u64;
                        }
                    }
                }
                pos = emit(&mut d, output, pos, accepted)?;
                row.steps += 1;
                row.drafted += draft.len();
                row.accepted += accepted;
            }
            row.tokens += output.len();
        }
        out.rows.push(row);
    }
    for &budget in budgets {
        out.trees
            .push(replay_trees(index, &encoded, budget, max_depth)?);
    }
    Ok(out)
}

/// Emits the `accepted` drafted tokens at `pos` and the target's bonus token (as the
/// verifier does), feeds them to the drafter, and returns the new position.
fn emit(d: &mut NgramDrafter, output: &[u32], pos: usize, accepted: usize) -> Result<usize> {
    let emitted = (accepted + 1).min(output.len() - pos);
    d.accept(&output[pos..pos + emitted])?;
    Ok(pos + emitted)
}

fn replay_trees(
    index: &Arc<Index>,
    encoded: &[(Vec<u32>, Vec<u32>)],
    budget: usize,
    max_depth: usize,
) -> Result<TreeRow> {
    let mut row = TreeRow {
        budget,
        max_depth,
        steps: 0,
        tokens: 0,
        nodes: 0,
        accepted: 0,
    };
    for (prompt, output) in encoded {
        let mut d = NgramDrafter::new(Some(Arc::clone(index)), NgramDrafterConfig::default());
        d.start(prompt)?;
        let mut pos = 0;
        while pos < output.len() {
            let room = output.len() - pos - 1;
            let tree = d.draft_tree(budget, max_depth.min(room), &PriorModel)?;
            // Walk the tree along the output: the deepest node whose path equals it.
            let mut parent = None;
            let mut accepted = 0;
            while pos + accepted < output.len() {
                match tree.child(parent, output[pos + accepted]) {
                    Some(node) => {
                        parent = Some(node);
                        accepted += 1;
                    }
                    None => break,
                }
            }
            pos = emit(&mut d, output, pos, accepted)?;
            row.steps += 1;
            row.nodes += tree.len();
            row.accepted += accepted;
        }
        row.tokens += output.len();
    }
    Ok(row)
}
