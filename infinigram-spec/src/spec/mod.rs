//! Speculative decoding on top of the index: drafting, confidence policies, verification.
//!
//! - [`NgramDrafter`] (a [`Drafter`]) keeps one request's state: the corpus [`MatchState`],
//!   advanced with every accepted token, and a [`LocalIndex`] of the prompt and the tokens
//!   generated so far. It proposes a chain ([`Draft`]) or a tree ([`DraftTree`]) from the
//!   longest corpus match, a few shorter corpus matches and the local index, keeping the
//!   candidate with the most expected accepted tokens under an [`AcceptModel`].
//! - A [`DraftPolicy`] decides how much of a draft to verify: [`FixedK`],
//!   [`MatchLenThreshold`], [`CountThreshold`], [`ScoreGate`], and [`CalibratedPolicy`], which
//!   learns acceptance rates online and maximizes expected tokens per unit of verify time
//!   under a caller's [`VerifyCost`].
//! - [`verify_greedy`] / [`verify_sample_match`] (and their tree forms) accept a draft
//!   against the target's outputs; both are lossless: greedy output equals plain greedy
//!   decoding, sampled output has exactly the target's distribution (it even equals plain
//!   sampling with the same seed, since each emitted token takes one draw).
//! - [`BatchPolicy`] applies a policy to a serving engine's whole step, with a measured
//!   [`StepCost`] and the [`ThroughputGate`]; [`SpecStats`] keeps the acceptance tables.
//! - [`speculative_generate`] runs the whole loop against any [`TargetModel`], logging every
//!   drafted token to a [`DraftLog`].
//!
//! [`MatchState`]: crate::MatchState

mod calibrated;
mod drafter;
mod generate;
mod local;
mod log;
mod policy;
mod sampling;
mod serving;
mod stats;
pub mod toy;
mod tree;
mod verify;

pub use calibrated::{CalibratedPolicy, CalibratedSnapshot, RooflineCost, VerifyCost};
pub use drafter::{Drafter, NgramDrafter, NgramDrafterConfig};
pub use generate::{
    generate_plain, speculative_generate, speculative_generate_with, GenerateOptions, Generation,
    GenerationStats, TargetModel,
};
pub use local::{LocalIndex, LocalMatch};
pub use log::{log_draft, DraftLog, DraftRecord, JsonlLog, NoLog, StepInfo};
pub use policy::{
    expected_accepted, AcceptModel, CountThreshold, DraftPolicy, FixedK, MatchLenThreshold,
    PolicyContext, PriorModel, ScoreGate,
};
pub use sampling::{argmax, Rng, SampleParams, Sampling};
pub use serving::{
    gate_class, BatchPolicy, BatchPolicySettings, GateArm, LiveStepCost, PolicyKind, StepCost,
    StepPlan, ThroughputGate, STEP_COST_ROWS,
};
pub use stats::{BucketRow, SpecStats, StatsSnapshot, StepOutcome};
pub use tree::{DraftNode, DraftTree};
pub use verify::{
    verify_greedy, verify_greedy_logits, verify_greedy_tree, verify_sample_match,
    verify_sample_match_tree, TreeVerified, Verified,
};

use serde::Serialize;

/// Where a drafted token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The corpus index (suffix array).
    Corpus,
    /// The per-request index of the prompt and the generated tokens.
    Local,
}

impl Source {
    /// 0 for the corpus, 1 for the local index (for tables indexed by source).
    pub fn ordinal(self) -> usize {
        match self {
            Source::Corpus => 0,
            Source::Local => 1,
        }
    }
}

/// What the drafter knew about one drafted token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenFeatures {
    /// Index the token came from.
    pub source: Source,
    /// Length of the context suffix the draft was read from (the match at the draft's root).
    pub match_len: u32,
    /// Occurrences of that suffix followed by the draft up to and including this token.
    pub count: u64,
    /// `count` divided by the occurrences of the suffix followed by the draft before this
    /// token: the empirical probability of this token (1.0 for a single occurrence).
    pub top_share: f32,
    /// Position in the draft, 1 for the first drafted token.
    pub depth: u32,
    /// Empirical path probability: the product of `top_share` from the root to this token.
    pub prob: f32,
}

/// A chain draft: tokens to verify in order, with what the drafter knew about each.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Draft {
    pub tokens: Vec<u32>,
    /// One entry per token.
    pub features: Vec<TokenFeatures>,
}

impl Draft {
    /// Number of drafted tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing was drafted.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Keeps the first `n` tokens.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
        self.features.truncate(n);
    }

    /// Appends a token.
    pub fn push(&mut self, token: u32, features: TokenFeatures) {
        self.tokens.push(token);
        self.features.push(features);
    }
}
