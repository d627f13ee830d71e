//! A policy that learns acceptance rates online and picks the draft length with the most
//! expected tokens per unit of verify time.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::policy::{expected_accepted, AcceptModel, DraftPolicy, PolicyContext, PriorModel};
use super::{Draft, DraftTree, TokenFeatures};

/// Time (any unit) of one verify step of `batch_size` sequences, each with `draft_len`
/// drafted tokens besides its one regular token. Supplied by the caller (measured or
/// modelled); must be positive.
pub trait VerifyCost {
    fn verify_cost(&self, batch_size: usize, draft_len: usize) -> f64;
}

impl<F: Fn(usize, usize) -> f64> VerifyCost for F {
    fn verify_cost(&self, batch_size: usize, draft_len: usize) -> f64 {
        self(batch_size, draft_len)
    }
}

/// A roofline cost model: `overhead + max(weights, per_token × batch × (1 + draft_len))`.
/// Small batches are bound by reading the weights, so drafted tokens are nearly free; large
/// batches are compute bound, so each drafted token costs as much as a regular one.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RooflineCost {
    pub overhead: f64,
    pub weights: f64,
    pub per_token: f64,
}

impl VerifyCost for RooflineCost {
    fn verify_cost(&self, batch_size: usize, draft_len: usize) -> f64 {
        let tokens = batch_size as f64 * (1 + draft_len) as f64;
        self.overhead + self.weights.max(self.per_token * tokens)
    }
}

const BUCKETS: usize = 8;
const SOURCES: usize = 2;

/// `0` for 0, else `1 + floor(log2(x))`, capped at `BUCKETS − 1`.
fn log_bucket(x: u64) -> usize {
    if x == 0 {
        0
    } else {
        ((64 - x.leading_zeros()) as usize).min(BUCKETS - 1)
    }
}

fn depth_bucket(depth: u32) -> usize {
    (depth.max(1) as usize - 1).min(BUCKETS - 1)
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Cell {
    accepted: f64,
    trials: f64,
}

impl Cell {
    fn rate(&self, prior: f64, strength: f64) -> f64 {
        (self.accepted + strength * prior) / (self.trials + strength)
    }
}

/// One learned cell, for inspection.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CalibratedSnapshot {
    pub source: usize,
    pub depth_bucket: usize,
    pub match_len_bucket: usize,
    pub count_bucket: usize,
    pub accepted: f64,
    pub trials: f64,
}

/// Learns the conditional acceptance rate of drafted tokens online, per (match-length bucket,
/// count bucket, depth, source) — buckets are `0, 1, 2–3, 4–7, …, ≥ 64` and depths `1..=7, ≥ 8`
/// — shrunk toward a coarser (source, depth) rate, which is shrunk toward [`PriorModel`]
/// (each with `prior_strength` pseudo-trials). For a draft it picks the length `k` maximizing
/// `(1 + E[accepted | k]) / verify_cost(batch, k)`: tokens emitted per unit of verify time
/// (the one regular token is always emitted). When drafted tokens cost as much as regular
/// ones (large batches) this is `k = 0`. Ties go to the shorter draft.
///
/// Only tokens the verifier reached are learned from (the accepted ones and the first
/// rejected one). So that lengths the prior undervalues still get tried, every
/// `explore_every`-th draft that would submit `k ≥ 1` tokens submits one more (0: never).
#[derive(Debug)]
pub struct CalibratedPolicy<C> {
    cost: C,
    /// Longest draft submitted.
    pub max_len: usize,
    /// Pseudo-trials of each prior.
    pub prior_strength: f64,
    /// Exploration period (0: off).
    pub explore_every: u64,
    fine: Vec<Cell>,
    coarse: Vec<Cell>,
    decisions: AtomicU64,
}

impl<C: Clone> Clone for CalibratedPolicy<C> {
    fn clone(&self) -> Self {
        CalibratedPolicy {
            cost: self.cost.clone(),
            max_len: self.max_len,
            prior_strength: self.prior_strength,
            explore_every: self.explore_every,
            fine: self.fine.clone(),
            coarse: self.coarse.clone(),
            decisions: AtomicU64::new(self.decisions.load(Ordering::Relaxed)),
        }
    }
}

impl<C: VerifyCost> CalibratedPolicy<C> {
    /// A policy with nothing learned yet.
    pub fn new(cost: C, max_len: usize) -> Self {
        CalibratedPolicy {
            cost,
            max_len,
            prior_strength: 4.0,
            explore_every: 16,
            fine: vec![Cell::default(); SOURCES * BUCKETS * BUCKETS * BUCKETS],
            coarse: vec![Cell::default(); SOURCES * BUCKETS],
            decisions: AtomicU64::new(0),
        }
    }

    /// The cost model.
    pub fn cost(&self) -> &C {
        &self.cost
    }

    /// The cost model, for callers that refine it from measured steps.
    pub fn cost_mut(&mut self) -> &mut C {
        &mut self.cost
    }

    fn coarse_index(f: &TokenFeatures) -> usize {
        f.source.ordinal() * BUCKETS + depth_bucket(f.depth)
    }

    fn fine_index(f: &TokenFeatures) -> usize {
        ((Self::coarse_index(f) * BUCKETS) + log_bucket(f.match_len as u64)) * BUCKETS
            + log_bucket(f.count)
    }

    /// Records one verified token.
    pub fn record(&mut self, f: &TokenFeatures, accepted: bool) {
        let a = if accepted { 1.0 } else { 0.0 };
        for cell in [
            &mut self.fine[Self::fine_index(f)],
            &mut self.coarse[Self::coarse_index(f)],
        ] {
            cell.accepted += a;
            cell.trials += 1.0;
        }
    }

    /// Every cell with at least one trial.
    pub fn snapshot(&self) -> Vec<CalibratedSnapshot> {
        self.fine
            .iter()
            .enumerate()
            .filter(|(_, c)| c.trials > 0.0)
            .map(|(i, c)| CalibratedSnapshot {
                count_bucket: i % BUCKETS,
                match_len_bucket: (i / BUCKETS) % BUCKETS,
                depth_bucket: (i / BUCKETS / BUCKETS) % BUCKETS,
                source: i / BUCKETS / BUCKETS / BUCKETS,
                accepted: c.accepted,
                trials: c.trials,
            })
            .collect()
    }

    /// Tokens emitted per unit of verify time with `k` drafted tokens expected to yield
    /// `expected` accepted ones; `None` for an unusable cost.
    fn rate(&self, batch: usize, k: usize, expected: f64) -> Option<f64> {
        let c = self.cost.verify_cost(batch.max(1), k);
        (c.is_finite() && c > 0.0).then(|| (1.0 + expected) / c)
    }

    /// Index of the best rate over prefix expectations `e` (ties: the smaller index).
    fn best(&self, batch: usize, e: &[f64]) -> usize {
        let mut best = (0usize, f64::NEG_INFINITY);
        for (k, &x) in e.iter().enumerate() {
            if let Some(r) = self.rate(batch, k, x) {
                if r > best.1 * (1.0 + 1e-12) {
                    best = (k, r);
                }
            }
        }
        best.0
    }

    fn explore(&self, k: usize, available: usize) -> usize {
        let n = self.decisions.fetch_add(1, Ordering::Relaxed) + 1;
        if self.explore_every > 0 && k >= 1 && k < available && n.is_multiple_of(self.explore_every)
        {
            k + 1
        } else {
            k
        }
    }
}

impl<C: VerifyCost> AcceptModel for CalibratedPolicy<C> {
    fn accept_prob(&self, f: &TokenFeatures) -> f64 {
        let prior = PriorModel.accept_prob(f);
        let coarse = self.coarse[Self::coarse_index(f)].rate(prior, self.prior_strength);
        self.fine[Self::fine_index(f)].rate(coarse, self.prior_strength)
    }
}

impl<C: VerifyCost> DraftPolicy for CalibratedPolicy<C> {
    fn draft_len(&self, draft: &Draft, ctx: &PolicyContext) -> usize {
        let n = draft.len().min(draft.features.len()).min(self.max_len);
        let e = expected_accepted(self, &draft.features[..n]);
        let k = self.best(ctx.batch_size, &e);
        self.explore(k, n)
    }

    /// Expected accepted tokens of a tree prefix: the sum of its nodes' path acceptance
    /// probabilities (at most one child of a node can match the target's token).
    fn tree_nodes(&self, tree: &DraftTree, ctx: &PolicyContext) -> usize {
        let n = tree.len().min(self.max_len.max(1) * 8);
        let mut path: Vec<f64> = Vec::with_capacity(n);
        let mut e = Vec::with_capacity(n + 1);
        e.push(0.0);
        for node in &tree.nodes[..n] {
            let up = node
                .parent
                .and_then(|p| path.get(p).copied())
                .unwrap_or(1.0);
            let p = up * self.accept_prob(&node.features).clamp(0.0, 1.0);
            path.push(p);
            e.push(e.last().copied().unwrap_or(0.0) + p);
        }
        self.best(ctx.batch_size, &e)
    }

    fn observe(&mut self, draft: &Draft, submitted: usize, accepted: usize) {
        let reached = submitted.min(accepted.saturating_add(1));
        for (i, f) in draft.features.iter().take(reached).enumerate() {
            self.record(f, i < accepted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Rng, Source};

    fn draft(len: usize) -> Draft {
        let mut d = Draft::default();
        for i in 0..len {
            d.push(
                i as u32,
                TokenFeatures {
                    source: Source::Corpus,
                    match_len: 4,
                    count: 3,
                    top_share: 0.6,
                    depth: i as u32 + 1,
                    prob: 0.5,
                },
            );
        }
        d
    }

    /// Best length under the true conditional acceptance rates.
    fn optimum(q: &[f64], cost: &impl VerifyCost, batch: usize) -> usize {
        let mut best = (0, f64::NEG_INFINITY);
        let (mut e, mut path) = (0.0, 1.0);
        for k in 0..=q.len() {
            if k > 0 {
                path *= q[k - 1];
                e += path;
            }
            let r = (1.0 + e) / cost.verify_cost(batch, k);
            if r > best.1 * (1.0 + 1e-12) {
                best = (k, r);
            }
        }
        best.0
    }

    #[test]
    fn converges_to_the_best_length() {
        // True acceptance falls with depth; verify cost grows linearly with drafted tokens.
        let q = [0.95, 0.9, 0.85, 0.8, 0.6, 0.4, 0.3, 0.2];
        let cost = |b: usize, k: usize| 1.0 + 0.08 * (b * (1 + k)) as f64;
        let want = optimum(&q, &cost, 1);
        assert!(want > 1 && want < q.len(), "test setup: optimum {want}");
        let mut policy = CalibratedPolicy::new(cost, q.len());
        let d = draft(q.len());
        let ctx = PolicyContext { batch_size: 1 };
        let mut rng = Rng::new(7);
        for _ in 0..20_000 {
            let k = policy.draft_len(&d, &ctx);
            let accepted = (0..k).take_while(|&i| rng.next_f64() < q[i]).count();
            policy.observe(&d, k, accepted);
        }
        policy.explore_every = 0;
        assert_eq!(policy.draft_len(&d, &ctx), want);
        for (i, &qi) in q.iter().enumerate().take(want) {
            let p = policy.accept_prob(&d.features[i]);
            assert!((p - qi).abs() < 0.05, "depth {}: {p} vs {qi}", i + 1);
        }
    }

    #[test]
    fn zero_at_large_batch() {
        let cost = RooflineCost {
            overhead: 0.5,
            weights: 10.0,
            per_token: 0.05,
        };
        let mut policy = CalibratedPolicy::new(cost, 8);
        let d = draft(8);
        // Teach it that drafts are good: 80 % of reached tokens are accepted.
        let mut rng = Rng::new(3);
        for _ in 0..2000 {
            let accepted = (0..8).take_while(|_| rng.next_f64() < 0.8).count();
            policy.observe(&d, 8, accepted);
        }
        let len = |b| policy.draft_len(&d, &PolicyContext { batch_size: b });
        assert_eq!(len(1), 8, "weight-bound: drafting is free");
        assert_eq!(len(512), 0, "compute-bound: drafting only costs");
        // Lengths shrink as the batch grows.
        let lens: Vec<usize> = [1, 16, 32, 64, 128, 512].iter().map(|&b| len(b)).collect();
        assert!(lens.windows(2).all(|w| w[1] <= w[0]), "{lens:?}");
    }

    #[test]
    fn bad_costs_mean_no_draft() {
        let policy =
            CalibratedPolicy::new(|_: usize, k: usize| if k == 0 { 1.0 } else { f64::NAN }, 8);
        assert_eq!(policy.draft_len(&draft(4), &PolicyContext::default()), 0);
        assert_eq!(
            policy.draft_len(&Draft::default(), &PolicyContext::default()),
            0
        );
    }
}
