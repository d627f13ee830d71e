//! How much of a draft to verify: the [`DraftPolicy`] trait and the simple policies. The
//! learned one is [`crate::spec::CalibratedPolicy`].

use super::{Draft, DraftTree, TokenFeatures};

/// An estimate of the probability that a drafted token is accepted, given that every token
/// before it in the draft was. Drafters rank candidate drafts by the expected accepted tokens
/// it implies; policies use it to cut drafts.
pub trait AcceptModel {
    /// Conditional acceptance probability of a token with these features, in `[0, 1]`.
    fn accept_prob(&self, f: &TokenFeatures) -> f64 {
        PriorModel.accept_prob(f)
    }
}

/// The uncalibrated prior: the token's smoothed empirical share `count / (parent + 1)`,
/// discounted for short contexts by `1 − 0.5 / (1 + match_len + depth − 1)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PriorModel;

impl AcceptModel for PriorModel {
    fn accept_prob(&self, f: &TokenFeatures) -> f64 {
        let share = f.top_share.clamp(0.0, 1.0) as f64;
        if share <= 0.0 || f.count == 0 {
            return 0.0;
        }
        let parent = f.count as f64 / share;
        let smoothed = f.count as f64 / (parent + 1.0);
        let context = f.match_len as f64 + f.depth.max(1) as f64 - 1.0;
        smoothed * (1.0 - 0.5 / (1.0 + context))
    }
}

/// Expected accepted tokens of every prefix of a draft: entry `k` is
/// `Σ_{i<k} Π_{j≤i} p_j` for the model's conditional probabilities `p` (entry 0 is 0).
pub fn expected_accepted(
    model: &(impl AcceptModel + ?Sized),
    features: &[TokenFeatures],
) -> Vec<f64> {
    let mut out = Vec::with_capacity(features.len() + 1);
    out.push(0.0);
    let (mut path, mut sum) = (1.0f64, 0.0f64);
    for f in features {
        path *= model.accept_prob(f).clamp(0.0, 1.0);
        sum += path;
        out.push(sum);
    }
    out
}

/// What a policy knows about the verify step a draft would join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyContext {
    /// Sequences verified together in the step (1 for a single request).
    pub batch_size: usize,
}

impl Default for PolicyContext {
    fn default() -> Self {
        PolicyContext { batch_size: 1 }
    }
}

/// Decides how many drafted tokens to verify, and learns from the outcome.
pub trait DraftPolicy: AcceptModel {
    /// Number of leading tokens of `draft` to submit (at most `draft.len()`; 0: none).
    fn draft_len(&self, draft: &Draft, ctx: &PolicyContext) -> usize;

    /// Number of leading nodes of a best-first `tree` to submit. The default keeps a node
    /// when its parent is kept and [`DraftPolicy::draft_len`] of its path reaches it.
    fn tree_nodes(&self, tree: &DraftTree, ctx: &PolicyContext) -> usize {
        let mut kept: Vec<bool> = Vec::with_capacity(tree.len());
        for (i, n) in tree.nodes.iter().enumerate() {
            let parent_ok = n
                .parent
                .is_none_or(|p| kept.get(p).copied().unwrap_or(false));
            let path = tree.path(i);
            let keep = parent_ok && self.draft_len(&path, ctx) >= path.len();
            if !keep {
                break;
            }
            kept.push(keep);
        }
        kept.len()
    }

    /// The first `submitted` tokens of `draft` were verified and the first `accepted` of
    /// them were accepted.
    fn observe(&mut self, _draft: &Draft, _submitted: usize, _accepted: usize) {}
}

impl<P: AcceptModel + ?Sized> AcceptModel for Box<P> {
    fn accept_prob(&self, f: &TokenFeatures) -> f64 {
        (**self).accept_prob(f)
    }
}

/// A boxed policy (for choosing one at run time) is a policy.
impl<P: DraftPolicy + ?Sized> DraftPolicy for Box<P> {
    fn draft_len(&self, draft: &Draft, ctx: &PolicyContext) -> usize {
        (**self).draft_len(draft, ctx)
    }
    fn tree_nodes(&self, tree: &DraftTree, ctx: &PolicyContext) -> usize {
        (**self).tree_nodes(tree, ctx)
    }
    fn observe(&mut self, draft: &Draft, submitted: usize, accepted: usize) {
        (**self).observe(draft, submitted, accepted)
    }
}

/// Always `k` tokens (or the whole draft when shorter).
#[derive(Debug, Clone, Copy)]
pub struct FixedK(pub usize);

impl AcceptModel for FixedK {}
impl DraftPolicy for FixedK {
    fn draft_len(&self, draft: &Draft, _: &PolicyContext) -> usize {
        self.0.min(draft.len())
    }
}

/// The whole draft (up to `max_len`) when it comes from a match of at least `min_match_len`
/// tokens, else nothing.
#[derive(Debug, Clone, Copy)]
pub struct MatchLenThreshold {
    pub min_match_len: u32,
    pub max_len: usize,
}

impl AcceptModel for MatchLenThreshold {}
impl DraftPolicy for MatchLenThreshold {
    fn draft_len(&self, draft: &Draft, _: &PolicyContext) -> usize {
        match draft.features.first() {
            Some(f) if f.match_len >= self.min_match_len => draft.len().min(self.max_len),
            _ => 0,
        }
    }
}

/// The longest prefix (up to `max_len`) whose every token was seen at least `min_count`
/// times with a share of at least `min_top_share` of its context's continuations.
#[derive(Debug, Clone, Copy)]
pub struct CountThreshold {
    pub min_count: u64,
    pub min_top_share: f32,
    pub max_len: usize,
}

impl AcceptModel for CountThreshold {}
impl DraftPolicy for CountThreshold {
    fn draft_len(&self, draft: &Draft, _: &PolicyContext) -> usize {
        draft
            .features
            .iter()
            .take(self.max_len)
            .take_while(|f| f.count >= self.min_count && f.top_share >= self.min_top_share)
            .count()
    }
}

/// Score gating: keeps tokens while the estimated probability of reaching and accepting
/// them stays at least `min_token_prob`, and submits nothing when the expected accepted
/// tokens of what is left fall below `min_expected`.
#[derive(Debug, Clone, Copy)]
pub struct ScoreGate<M = PriorModel> {
    pub model: M,
    pub min_token_prob: f64,
    pub min_expected: f64,
    pub max_len: usize,
}

impl ScoreGate {
    /// A gate over the prior model.
    pub fn new(min_token_prob: f64, min_expected: f64, max_len: usize) -> Self {
        ScoreGate {
            model: PriorModel,
            min_token_prob,
            min_expected,
            max_len,
        }
    }
}

impl<M: AcceptModel> AcceptModel for ScoreGate<M> {
    fn accept_prob(&self, f: &TokenFeatures) -> f64 {
        self.model.accept_prob(f)
    }
}

impl<M: AcceptModel> DraftPolicy for ScoreGate<M> {
    fn draft_len(&self, draft: &Draft, _: &PolicyContext) -> usize {
        let n = draft.len().min(draft.features.len()).min(self.max_len);
        let e = expected_accepted(&self.model, &draft.features[..n]);
        // Marginal gain of token i is e[i + 1] − e[i]: its path acceptance probability.
        let k = (0..n)
            .take_while(|&i| e[i + 1] - e[i] >= self.min_token_prob)
            .count();
        if e[k] < self.min_expected {
            0
        } else {
            k
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Source;

    fn feat(count: u64, share: f32, match_len: u32, depth: u32) -> TokenFeatures {
        TokenFeatures {
            source: Source::Corpus,
            match_len,
            count,
            top_share: share,
            depth,
            prob: share,
        }
    }

    fn draft(fs: &[TokenFeatures]) -> Draft {
        Draft {
            tokens: (0..fs.len() as u32).collect(),
            features: fs.to_vec(),
        }
    }

    #[test]
    fn simple_policies() {
        let ctx = PolicyContext::default();
        let d = draft(&[feat(9, 0.9, 3, 1), feat(5, 0.5, 3, 2), feat(1, 1.0, 3, 3)]);
        assert_eq!(FixedK(2).draft_len(&d, &ctx), 2);
        assert_eq!(FixedK(9).draft_len(&d, &ctx), 3);
        let m = MatchLenThreshold {
            min_match_len: 4,
            max_len: 8,
        };
        assert_eq!(m.draft_len(&d, &ctx), 0);
        let m = MatchLenThreshold {
            min_match_len: 3,
            max_len: 2,
        };
        assert_eq!(m.draft_len(&d, &ctx), 2);
        let c = CountThreshold {
            min_count: 2,
            min_top_share: 0.4,
            max_len: 8,
        };
        assert_eq!(c.draft_len(&d, &ctx), 2);
        let c = CountThreshold {
            min_top_share: 0.6,
            ..c
        };
        assert_eq!(c.draft_len(&d, &ctx), 1);
        assert_eq!(FixedK(3).draft_len(&Draft::default(), &ctx), 0);
    }

    #[test]
    fn score_gate_cuts_and_gates() {
        let ctx = PolicyContext::default();
        let d = draft(&[
            feat(99, 0.99, 8, 1),
            feat(50, 0.5, 8, 2),
            feat(1, 0.02, 8, 3),
        ]);
        let e = expected_accepted(&PriorModel, &d.features);
        assert!(e.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(ScoreGate::new(0.3, 0.0, 8).draft_len(&d, &ctx), 2);
        assert_eq!(ScoreGate::new(0.6, 0.0, 8).draft_len(&d, &ctx), 1);
        assert_eq!(ScoreGate::new(0.3, 5.0, 8).draft_len(&d, &ctx), 0);
    }

    #[test]
    fn prior_is_a_probability() {
        for count in [0, 1, 2, 10, 1000] {
            for share in [0.0f32, 0.1, 0.5, 1.0, 2.0] {
                for ml in [0, 1, 5, 100] {
                    let p = PriorModel.accept_prob(&feat(count, share, ml, 1));
                    assert!((0.0..=1.0).contains(&p), "{p}");
                }
            }
        }
        // More evidence, higher estimate.
        let a = PriorModel.accept_prob(&feat(1, 1.0, 2, 1));
        let b = PriorModel.accept_prob(&feat(50, 1.0, 2, 1));
        let c = PriorModel.accept_prob(&feat(50, 1.0, 20, 1));
        assert!(a < b && b < c);
    }
}
