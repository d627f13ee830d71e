//! What a serving engine needs to decide, step by step, how much to draft: a measured
//! model of the verify pass's cost ([`StepCost`], corrected online by [`LiveStepCost`]),
//! the [`ThroughputGate`] that keeps drafting only where it measurably pays, and
//! [`BatchPolicy`], which applies the configured [`PolicyKind`] to a whole batch.
//!
//! The engine that runs the passes lives in `mla_attention::engine`; everything here is
//! model-free, so it is tested with synthetic step times.

use serde::{Deserialize, Serialize};

use super::calibrated::{CalibratedPolicy, VerifyCost};
use super::policy::{expected_accepted, AcceptModel, DraftPolicy, FixedK, PolicyContext};
use super::Draft;

/// Row counts of the passes a [`StepCost`] is measured at (one sequence each).
pub const STEP_COST_ROWS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// Verify-step time model measured at startup: the time of a pass of one sequence with
/// each of [`STEP_COST_ROWS`] token rows, linearly interpolated between them (and
/// extended with the last slope), plus `per_sequence` for each sequence beyond the first
/// (its own attention). Measured points rather than a straight line, because the curve
/// bends: a pass of up to ~8 rows is bound by reading the weights (Qwen2.5-Coder-0.5B on the
/// 2-vCPU dev machine: 1 / 2 / 8 rows 32 / 41 / 67 ms), a larger one by the multiply-adds
/// (16 / 32 / 64 rows 103 / 180 / 386 ms) — a line through the first points made drafts at
/// concurrency 16 look a fifth cheaper than they are.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct StepCost {
    /// Seconds of a pass of `STEP_COST_ROWS[i]` rows of one sequence.
    pub passes: [f64; STEP_COST_ROWS.len()],
    pub per_sequence: f64,
}

impl StepCost {
    /// Pass time of `rows` token rows of one sequence.
    fn rows(&self, rows: usize) -> f64 {
        let r = STEP_COST_ROWS;
        let p = &self.passes;
        let last = r.len() - 1;
        let i = (0..last).find(|&i| rows <= r[i + 1]).unwrap_or(last - 1);
        let slope = (p[i + 1] - p[i]) / (r[i + 1] - r[i]) as f64;
        p[i] + slope * (rows as f64 - r[i] as f64)
    }

    /// A pass of `rows` token rows over `batch` sequences.
    fn multi(&self, batch: usize, rows: usize) -> f64 {
        self.rows(rows) + self.per_sequence * (batch.max(1) - 1) as f64
    }
}

impl VerifyCost for StepCost {
    fn verify_cost(&self, batch_size: usize, draft_len: usize) -> f64 {
        let b = batch_size.max(1);
        self.multi(b, b * (1 + draft_len))
    }
}

/// Weight of a new pass time in [`LiveStepCost`]'s moving averages.
const COST_EMA: f64 = 0.1;

/// The step-time model the calibrated policy uses: the startup measurement, corrected by
/// the passes the engine actually runs. The startup timing runs on freshly loaded weights
/// while the machine may still be busy (seen: a 1-row pass timed at 44 ms that takes 30 ms
/// in service), and a wrong ratio of the 1-row to the multi-row cost makes every draft
/// look cheaper or dearer than it is. So the 1-row cost is a moving average of measured
/// 1-row passes, and the multi-row cost is the startup curve scaled by a moving average of
/// measured / predicted.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LiveStepCost {
    /// As measured at startup.
    pub measured: StepCost,
    /// Current 1-row pass estimate (seconds).
    pub single: f64,
    /// Current factor on the startup curve of multi-row passes.
    pub multi_scale: f64,
}

impl LiveStepCost {
    pub fn new(measured: StepCost) -> Self {
        LiveStepCost {
            measured,
            single: measured.passes[0],
            multi_scale: 1.0,
        }
    }

    /// A target pass of `rows` rows over `batch` sequences took `secs`.
    pub fn observe(&mut self, batch: usize, rows: usize, secs: f64) {
        if !(secs.is_finite() && secs > 0.0) || rows == 0 {
            return;
        }
        if rows == 1 {
            self.single = (1.0 - COST_EMA) * self.single + COST_EMA * secs;
        } else {
            let ratio = secs / self.measured.multi(batch, rows).max(1e-9);
            self.multi_scale = (1.0 - COST_EMA) * self.multi_scale + COST_EMA * ratio;
        }
    }
}

impl LiveStepCost {
    /// The corrected model: the current 1-row estimate, the multi-row curve scaled.
    pub fn current(&self) -> StepCost {
        let m = &self.measured;
        let mut passes = m.passes.map(|t| self.multi_scale * t);
        passes[0] = self.single;
        StepCost {
            passes,
            per_sequence: self.multi_scale * m.per_sequence,
        }
    }
}

impl VerifyCost for LiveStepCost {
    fn verify_cost(&self, batch_size: usize, draft_len: usize) -> f64 {
        self.current().verify_cost(batch_size, draft_len)
    }
}

/// Batch-size levels of the [`ThroughputGate`]: 1, 2–3, 4–7, 8–15, 16–31, ≥ 32.
const GATE_LEVELS: usize = 6;
/// Confidence classes of a step: the policy's expected accepted tokens per request of the
/// drafts it chose, below 0.5, 0.5–1.5, 1.5–3, from 3.
const GATE_CLASS_BOUNDS: [f64; 3] = [0.5, 1.5, 3.0];
const GATE_CLASSES: usize = GATE_CLASS_BOUNDS.len() + 1;
/// Steps per arm before the gate trusts its averages, and its exploration periods: of
/// plain decoding while drafting (cheap), of drafting while plain (an exploration that
/// loses costs a whole batch's pass).
const GATE_WARMUP: u64 = 6;
const GATE_EXPLORE_CLOSE: u64 = 16;
const GATE_EXPLORE_FAR: u64 = 64;
/// How much faster drafting must measure to be chosen. A near tie is no reason to draft:
/// drafting steps vary more, each switch costs, and the averages are estimates, so at a
/// tie (a compute-bound batch on the CPU) plain decoding keeps throughput at 1.0×.
const GATE_MARGIN: f64 = 0.05;
/// How much slower plain decoding must measure, over at least this many explorations,
/// to be explored only rarely (one unlucky exploration must not stop the others).
const GATE_CLEAR: f64 = 0.5;
const GATE_CLEAR_AFTER: u64 = 4;
const GATE_EMA: f64 = 0.05;
/// Explorations are few, so their average moves faster.
const GATE_EXPLORE_EMA: f64 = 0.2;

/// The confidence class of a step whose drafts expect `expected` accepted tokens per
/// request in all.
pub fn gate_class(expected: f64) -> usize {
    GATE_CLASS_BOUNDS
        .iter()
        .take_while(|&&b| expected >= b)
        .count()
}

/// The calibrated policy's safety net: per batch-size level and confidence class, moving
/// averages of the tokens per second that steps with drafting and steps without it
/// actually achieved. After a warm-up that alternates the arms, one arm is the choice and
/// the other is explored now and then; the explored arm's steps are compared with the
/// chosen arm's rate at the same moments, and the choice switches when drafting is (or is
/// no longer) [`GATE_MARGIN`] faster. So a wrong cost model or a workload the index does
/// not know cannot make drafting slower than plain decoding for long. The confidence class keeps one request's phases apart: a chat answer that
/// first copies the prompt's code (long local matches, nearly all accepted) and then writes
/// new code (short corpus matches, mostly rejected) would otherwise flip one shared
/// average back and forth, always a phase late.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThroughputGate {
    /// Per level and class: [drafting, plain] tokens/s and steps seen.
    levels: [[[GateArm; 2]; GATE_CLASSES]; GATE_LEVELS],
    steps: [[u64; GATE_CLASSES]; GATE_LEVELS],
    /// Per level and class, once warmed up: whether steps draft (the other arm is only
    /// explored).
    choice: [[Option<bool>; GATE_CLASSES]; GATE_LEVELS],
}

/// One arm of a level: moving averages of tokens emitted and seconds spent per step (their
/// ratio is the throughput; a mean of per-step rates would be dominated by the steps that
/// happened to accept a long draft).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GateArm {
    pub tokens_per_s: f64,
    pub steps: u64,
    tokens: f64,
    secs: f64,
    /// This arm's exploration steps (taken while the other arm is the choice) against the
    /// other arm at the same moment: moving averages of the tokens they emitted and of the
    /// tokens the other arm's current rate gives in the same seconds. Their ratio compares
    /// the arms under the same context lengths and load — the plain averages do not, since
    /// a rarely explored arm's average comes from earlier (shorter, faster) steps.
    explored_tokens: f64,
    explored_baseline: f64,
    pub explored_steps: u64,
}

impl GateArm {
    /// Throughput of this arm's explorations relative to the chosen arm's, if explored.
    pub fn relative(&self) -> Option<f64> {
        (self.explored_steps > 0 && self.explored_baseline > 0.0)
            .then(|| self.explored_tokens / self.explored_baseline)
    }
}

fn gate_level(batch: usize) -> usize {
    (usize::BITS - batch.max(1).leading_zeros()) as usize - 1
}

fn gate_cell(batch: usize, class: usize) -> (usize, usize) {
    (
        gate_level(batch).min(GATE_LEVELS - 1),
        class.min(GATE_CLASSES - 1),
    )
}

impl ThroughputGate {
    /// Whether the next step of `batch` sequences, whose drafts are of confidence `class`
    /// ([`gate_class`]), drafts.
    pub fn allow(&mut self, batch: usize, class: usize) -> bool {
        let (l, c) = gate_cell(batch, class);
        self.steps[l][c] += 1;
        let [draft, plain] = self.levels[l][c];
        let Some(choice) = self.choice[l][c] else {
            if draft.steps >= GATE_WARMUP && plain.steps >= GATE_WARMUP {
                // Warm-up alternated the arms, so their averages are comparable once.
                self.choice[l][c] =
                    Some(draft.tokens_per_s >= (1.0 + GATE_MARGIN) * plain.tokens_per_s);
                return self.allow_chosen(l, c);
            }
            // Drafts of more confidence pay at least as well as drafts of less, and a
            // smaller batch at least as well as a larger one (its pass is further from
            // compute-bound). A cell still warming up follows a settled cell that
            // dominates it — one of a larger or equal batch and lower or equal confidence
            // that drafts, or one of a smaller or equal batch and higher or equal
            // confidence that does not — instead of spending its own warm-up steps.
            let settled = |ll: usize, cc: usize| self.choice[ll][cc];
            let cells = |levels: std::ops::Range<usize>, classes: std::ops::Range<usize>| {
                levels.flat_map(move |ll| classes.clone().map(move |cc| (ll, cc)))
            };
            if cells(l..GATE_LEVELS, 0..c + 1).any(|(ll, cc)| settled(ll, cc) == Some(true)) {
                return true;
            }
            if cells(0..l + 1, c..GATE_CLASSES).any(|(ll, cc)| settled(ll, cc) == Some(false)) {
                return false;
            }
            // Warm-up: alternate the arms.
            return draft.steps <= plain.steps;
        };
        // The explored arm's comparison at the same moments decides a switch; both
        // directions use one threshold (drafting must be `GATE_MARGIN` faster).
        let switch = if choice {
            plain
                .relative()
                .is_some_and(|r| r * (1.0 + GATE_MARGIN) > 1.0)
        } else {
            draft.relative().is_some_and(|r| r >= 1.0 + GATE_MARGIN)
        };
        if switch {
            self.choice[l][c] = Some(!choice);
            // The explorations so far compared the other way round.
            for arm in &mut self.levels[l][c] {
                arm.explored_steps = 0;
            }
        }
        self.allow_chosen(l, c)
    }

    /// The chosen arm, but every [`GATE_EXPLORE_CLOSE`]-th step plain while drafting and
    /// every [`GATE_EXPLORE_FAR`]-th step drafting while plain (an exploration of
    /// drafting that loses costs more than one of plain decoding). Plain decoding is also
    /// explored only every [`GATE_EXPLORE_FAR`]-th step once its explorations measure it
    /// [`GATE_CLEAR`] slower than drafting: in a chat answer that copies the prompt's code a
    /// plain step emits one token where a drafting step emits five or more.
    fn allow_chosen(&self, l: usize, c: usize) -> bool {
        let choice = self.choice[l][c].unwrap_or(false);
        let plain_clearly_slower = || {
            let plain = &self.levels[l][c][1];
            plain.explored_steps >= GATE_CLEAR_AFTER
                && plain
                    .relative()
                    .is_some_and(|r| r * (1.0 + GATE_CLEAR) < 1.0)
        };
        let every = if choice && !plain_clearly_slower() {
            GATE_EXPLORE_CLOSE
        } else {
            GATE_EXPLORE_FAR
        };
        if self.steps[l][c].is_multiple_of(every) {
            !choice
        } else {
            choice
        }
    }

    /// A step of `batch` sequences and confidence `class` that drafted (or not) emitted
    /// `tokens` in `secs`.
    pub fn record(&mut self, batch: usize, class: usize, drafted: bool, tokens: usize, secs: f64) {
        if secs <= 0.0 {
            return;
        }
        let (l, c) = gate_cell(batch, class);
        let [draft, plain] = self.levels[l][c];
        let other = if drafted { plain } else { draft };
        let explored = self.choice[l][c].is_some_and(|ch| ch != drafted);
        let arm = &mut self.levels[l][c][usize::from(!drafted)];
        if explored && other.steps > 0 {
            let baseline = secs * other.tokens_per_s;
            if arm.explored_steps == 0 {
                (arm.explored_tokens, arm.explored_baseline) = (tokens as f64, baseline);
            } else {
                arm.explored_tokens = (1.0 - GATE_EXPLORE_EMA) * arm.explored_tokens
                    + GATE_EXPLORE_EMA * tokens as f64;
                arm.explored_baseline =
                    (1.0 - GATE_EXPLORE_EMA) * arm.explored_baseline + GATE_EXPLORE_EMA * baseline;
            }
            arm.explored_steps += 1;
        }
        if arm.steps == 0 {
            (arm.tokens, arm.secs) = (tokens as f64, secs);
        } else {
            arm.tokens = (1.0 - GATE_EMA) * arm.tokens + GATE_EMA * tokens as f64;
            arm.secs = (1.0 - GATE_EMA) * arm.secs + GATE_EMA * secs;
        }
        arm.tokens_per_s = arm.tokens / arm.secs;
        arm.steps += 1;
    }

    /// Per level (from batch 1, 2, 4, …) and confidence class: the drafting and the plain
    /// arm.
    pub fn snapshot(&self) -> Vec<Vec<[GateArm; 2]>> {
        self.levels.iter().map(|l| l.to_vec()).collect()
    }
}

/// Which requests draft, and how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Every draft up to the longest allowed length.
    Fixed,
    /// Like `fixed`, but only while at most `max_concurrency` requests are active.
    MaxConcurrency,
    /// Draft lengths that maximize expected tokens per second under the measured step
    /// cost, behind the [`ThroughputGate`].
    Calibrated,
}

/// Settings of a [`BatchPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchPolicySettings {
    /// Longest draft per sequence and step.
    pub max_draft: usize,
    pub kind: PolicyKind,
    /// `max-concurrency`: draft only while at most this many requests are active.
    pub max_concurrency: usize,
}

enum Inner {
    Fixed(FixedK),
    Calibrated(Box<CalibratedPolicy<LiveStepCost>>),
}

/// A [`PolicyKind`] applied to whole steps: how long each sequence's draft is, whether the
/// gate lets the step draft at all, and what the engine learns from the step afterwards.
pub struct BatchPolicy {
    settings: BatchPolicySettings,
    inner: Inner,
    gate: ThroughputGate,
}

/// What [`BatchPolicy::plan`] decided for one step; hand it back to [`BatchPolicy::record`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPlan {
    /// The gate's cell (confidence class) and whether it let the step draft; `None` when
    /// the gate was not asked (nothing to draft, or not the calibrated policy).
    pub gated: Option<(usize, bool)>,
}

impl BatchPolicy {
    /// `cost` feeds the calibrated policy (ignored by the others).
    pub fn new(settings: BatchPolicySettings, cost: StepCost) -> Self {
        let inner = match settings.kind {
            PolicyKind::Calibrated => Inner::Calibrated(Box::new(CalibratedPolicy::new(
                LiveStepCost::new(cost),
                settings.max_draft,
            ))),
            PolicyKind::Fixed | PolicyKind::MaxConcurrency => {
                Inner::Fixed(FixedK(settings.max_draft))
            }
        };
        BatchPolicy {
            settings,
            inner,
            gate: ThroughputGate::default(),
        }
    }

    pub fn settings(&self) -> BatchPolicySettings {
        self.settings
    }

    /// The acceptance model drafters rank their candidates with.
    pub fn accept_model(&self) -> &dyn AcceptModel {
        match &self.inner {
            Inner::Fixed(p) => p,
            Inner::Calibrated(p) => p.as_ref(),
        }
    }

    fn policy(&self) -> &dyn DraftPolicy {
        match &self.inner {
            Inner::Fixed(p) => p,
            Inner::Calibrated(p) => p.as_ref(),
        }
    }

    /// Whether a batch of `batch` sequences may draft at all.
    pub fn may_draft(&self, batch: usize) -> bool {
        match self.settings.kind {
            PolicyKind::MaxConcurrency => batch <= self.settings.max_concurrency,
            PolicyKind::Fixed | PolicyKind::Calibrated => true,
        }
    }

    /// Cuts each draft of a step of `drafts.len()` sequences to the length the policy
    /// verifies (`room[i]` bounds sequence `i`), then lets the gate decide whether the step
    /// drafts at all; returns the lengths and the plan to [`Self::record`].
    pub fn plan(&mut self, drafts: &[Draft], room: &[usize]) -> (Vec<usize>, StepPlan) {
        let batch = drafts.len();
        let ctx = PolicyContext { batch_size: batch };
        let mut expected = 0.0;
        let mut ks: Vec<usize> = drafts
            .iter()
            .zip(room)
            .map(|(d, &r)| {
                let k = self.policy().draft_len(d, &ctx).min(d.len()).min(r);
                if k > 0 {
                    expected += expected_accepted(self.accept_model(), &d.features[..k])[k];
                }
                k
            })
            .collect();
        let gated = if matches!(self.inner, Inner::Calibrated(_)) && ks.iter().any(|&k| k > 0) {
            let class = gate_class(expected / batch.max(1) as f64);
            let allow = self.gate.allow(batch, class);
            if !allow {
                ks.iter_mut().for_each(|k| *k = 0);
            }
            Some((class, allow))
        } else {
            None
        };
        (ks, StepPlan { gated })
    }

    /// A sequence's draft of which the first `k` tokens were verified and `accepted` of
    /// them accepted.
    pub fn observe(&mut self, draft: &Draft, k: usize, accepted: usize) {
        match &mut self.inner {
            Inner::Fixed(p) => p.observe(draft, k, accepted),
            Inner::Calibrated(p) => p.observe(draft, k, accepted),
        }
    }

    /// The target's pass of `rows` rows over `batch` sequences took `pass_secs`; the whole
    /// step (drafting, pass, verification) emitted `emitted` tokens in `step_secs`.
    pub fn record(
        &mut self,
        plan: StepPlan,
        batch: usize,
        rows: usize,
        pass_secs: f64,
        emitted: usize,
        step_secs: f64,
    ) {
        if let Inner::Calibrated(p) = &mut self.inner {
            p.cost_mut().observe(batch, rows, pass_secs);
        }
        if let Some((class, drafted)) = plan.gated {
            self.gate.record(batch, class, drafted, emitted, step_secs);
        }
    }

    /// The gate's averages (empty unless calibrated) and the live step-cost model.
    pub fn snapshot(&self) -> (Vec<Vec<[GateArm; 2]>>, Option<LiveStepCost>) {
        match &self.inner {
            Inner::Calibrated(p) => (self.gate.snapshot(), Some(*p.cost())),
            Inner::Fixed(_) => (Vec::new(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs 400 steps at one batch size where a drafting step yields `draft_rate` tokens/s
    /// and a plain one `plain_rate`; returns the share of steps that drafted after warm-up.
    fn drafted_share(batch: usize, draft_rate: f64, plain_rate: f64) -> f64 {
        let mut g = ThroughputGate::default();
        let mut drafted = 0;
        for step in 0..400 {
            let d = g.allow(batch, 1);
            let rate = if d { draft_rate } else { plain_rate };
            g.record(batch, 1, d, 10, 10.0 / rate);
            if step >= 100 && d {
                drafted += 1;
            }
        }
        drafted as f64 / 300.0
    }

    #[test]
    fn gate_follows_the_faster_arm_and_keeps_exploring() {
        let on = drafted_share(1, 120.0, 100.0);
        assert!(on > 0.9 && on < 1.0, "drafting pays: {on}");
        let off = drafted_share(16, 80.0, 100.0);
        assert!(off > 0.0 && off < 0.1, "drafting does not pay: {off}");
    }

    /// Drafting steps alternate between 1 token in 4 time units and 10 tokens in 6 units
    /// (11 tokens per 10 units), plain steps emit 1 token per unit: drafting is 10 % faster
    /// although the mean of its per-step rates (0.96) is below plain's. The gate must
    /// judge throughput.
    #[test]
    fn gate_judges_noisy_steps_by_throughput() {
        let mut g = ThroughputGate::default();
        let (mut drafted, mut draft_steps) = (0, 0);
        for step in 0..600 {
            let d = g.allow(1, 2);
            draft_steps += usize::from(d);
            let (tokens, secs) = match (d, draft_steps % 2) {
                (false, _) => (1, 1.0),
                (true, 0) => (1, 4.0),
                (true, _) => (10, 6.0),
            };
            g.record(1, 2, d, tokens, secs);
            if step >= 100 && d {
                drafted += 1;
            }
        }
        assert!(drafted > 450, "drafted {drafted} of 500 steps");
    }

    /// One gated step of `batch` sequences in `class`: emits `tokens` in `draft_secs` if the
    /// gate lets it draft, else in `plain_secs`. Returns whether it drafted.
    fn gated_step(
        g: &mut ThroughputGate,
        (batch, class): (usize, usize),
        tokens: usize,
        draft_secs: f64,
        plain_secs: f64,
    ) -> bool {
        let d = g.allow(batch, class);
        g.record(
            batch,
            class,
            d,
            tokens,
            if d { draft_secs } else { plain_secs },
        );
        d
    }

    #[test]
    fn gate_levels_are_separate() {
        let mut g = ThroughputGate::default();
        for _ in 0..64 {
            gated_step(&mut g, (1, 0), 10, 0.05, 0.1);
            gated_step(&mut g, (32, 0), 10, 0.1, 0.05);
        }
        let s = g.snapshot();
        assert!(s[0][0][0].tokens_per_s > s[0][0][1].tokens_per_s);
        assert!(s[5][0][0].tokens_per_s < s[5][0][1].tokens_per_s);
        assert_eq!(
            (gate_level(1), gate_level(3), gate_level(4), gate_level(40)),
            (0, 1, 2, 5)
        );
    }

    /// One request alternates phases of 40 steps: confident drafts (class 3) that pay 3×,
    /// and doubtful ones (class 0) that cost 20 %. A gate shared by the phases drafts in
    /// neither or both; per class it drafts in the first and not in the second.
    #[test]
    fn gate_keeps_confidence_classes_apart() {
        let mut g = ThroughputGate::default();
        let (mut confident, mut doubtful) = ((0, 0), (0, 0));
        for step in 0..1600 {
            let class = if (step / 40) % 2 == 0 { 3 } else { 0 };
            let d = g.allow(1, class);
            let (tokens, secs) = match (d, class) {
                (false, _) => (1, 1.0),
                (true, 3) => (3, 1.0),
                (true, _) => (1, 1.2),
            };
            g.record(1, class, d, tokens, secs);
            if step >= 400 {
                let c = if class == 3 {
                    &mut confident
                } else {
                    &mut doubtful
                };
                c.0 += usize::from(d);
                c.1 += 1;
            }
        }
        assert!(
            confident.0 * 10 > confident.1 * 9,
            "confident {confident:?}"
        );
        assert!(doubtful.0 * 10 < doubtful.1, "doubtful {doubtful:?}");
        assert_eq!(
            (
                gate_class(0.0),
                gate_class(0.5),
                gate_class(2.0),
                gate_class(9.0)
            ),
            (0, 1, 2, 3)
        );
    }

    /// A class still warming up follows a settled neighbour: below one that drafts it
    /// drafts, above one that does not it does not; otherwise it alternates.
    #[test]
    fn gate_classes_borrow_a_settled_neighbour() {
        let mut g = ThroughputGate::default();
        for _ in 0..40 {
            gated_step(&mut g, (16, 1), 16, 0.3, 0.2);
            gated_step(&mut g, (1, 1), 2, 0.05, 0.1);
        }
        assert!(!g.allow(16, 0), "less confident than a losing class");
        assert!(g.allow(1, 3), "more confident than a winning class");
        let (first, second) = (g.allow(16, 2), g.allow(16, 2));
        assert!(
            first && second,
            "no settled class above: warm-up starts with drafting"
        );
        let mut h = ThroughputGate::default();
        let d = h.allow(1, 2);
        h.record(1, 2, d, 1, 1.0);
        assert_ne!(d, h.allow(1, 2), "alone, a class alternates its warm-up");
    }

    /// A larger batch warming up follows a smaller batch's settled "no" for the same or a
    /// more confident class, and a smaller batch follows a larger batch's settled "yes".
    #[test]
    fn gate_levels_borrow_a_settled_dominating_cell() {
        let mut g = ThroughputGate::default();
        for _ in 0..40 {
            gated_step(&mut g, (1, 2), 1, 1.5, 1.0); // batch 1, class 2: drafting loses
            gated_step(&mut g, (8, 0), 8, 0.5, 1.0); // batch 8, class 0: drafting wins
        }
        for _ in 0..10 {
            assert!(
                !g.allow(16, 1),
                "larger batch, less confident than a losing cell"
            );
            assert!(
                g.allow(2, 3),
                "smaller batch, more confident than a winning cell"
            );
        }
        let (first, second) = (g.allow(16, 3), g.allow(16, 3));
        assert!(
            first && second,
            "nothing dominates: warm-up starts with drafting"
        );
    }

    /// Steps slow down as contexts grow; drafting is exactly as fast as plain decoding at
    /// every moment. The rarely explored arm's plain average would come from earlier,
    /// faster steps and look better; compared at the same moments it does not.
    #[test]
    fn gate_compares_arms_at_the_same_moments() {
        let mut g = ThroughputGate::default();
        let mut drafted = 0;
        for step in 0..1000 {
            let secs = 1.0 + step as f64 / 100.0;
            if gated_step(&mut g, (16, 1), 16, secs, secs) && step >= 100 {
                drafted += 1;
            }
        }
        assert!(drafted < 30, "drafted {drafted} of 900 at a tie");
    }

    /// A near tie (drafting 3 % faster, within the margin) decodes plainly but for the
    /// exploration steps; a clear win (10 %) drafts.
    #[test]
    fn gate_needs_a_margin_to_draft() {
        for (draft_secs, want_drafting) in [(0.97, false), (0.90, true)] {
            let mut g = ThroughputGate::default();
            let mut drafted = 0;
            for step in 0..1000 {
                let d = gated_step(&mut g, (16, 1), 16, draft_secs, 1.0);
                if step >= 100 && d {
                    drafted += 1;
                }
            }
            if want_drafting {
                assert!(drafted > 800, "drafted {drafted} of 900 at {draft_secs}");
            } else {
                assert!(drafted < 100, "drafted {drafted} of 900 at {draft_secs}");
            }
        }
    }

    /// Once drafting is clearly slower, the gate explores it rarely.
    #[test]
    fn gate_explores_a_clearly_slower_arm_rarely() {
        let mut g = ThroughputGate::default();
        let mut explored = 0;
        for step in 0..1000 {
            let d = gated_step(&mut g, (16, 1), 16, 0.4, 0.2);
            if step >= 100 && d {
                explored += 1;
            }
        }
        assert!((10..=20).contains(&explored), "explored {explored} of 900");
    }

    /// Once plain decoding is clearly slower, the gate explores it rarely too; a merely
    /// faster drafting arm keeps plain explored every 16th step.
    #[test]
    fn gate_explores_clearly_slower_plain_decoding_rarely() {
        // Plain: 1 token in 0.2 s. Drafting: 8 tokens in 0.4 s (4×), 3 in 0.5 s (1.2×).
        for (draft_tokens, draft_secs, lo, hi) in [(8, 0.4, 10, 20), (3, 0.5, 45, 70)] {
            let mut g = ThroughputGate::default();
            let mut explored = 0;
            for step in 0..1000 {
                let d = g.allow(1, 3);
                let (tokens, secs) = if d {
                    (draft_tokens, draft_secs)
                } else {
                    (1, 0.2)
                };
                g.record(1, 3, d, tokens, secs);
                if step >= 100 && !d {
                    explored += 1;
                }
            }
            assert!(
                (lo..=hi).contains(&explored),
                "drafting {draft_tokens} tokens in {draft_secs} s: plain explored {explored} of 900"
            );
        }
    }

    /// The Qwen2.5-Coder-0.5B curve of the dev machine (seconds).
    fn qwen_cost() -> StepCost {
        StepCost {
            passes: [0.032, 0.041, 0.049, 0.067, 0.103, 0.180, 0.386],
            per_sequence: 0.001,
        }
    }

    /// The live model follows measured passes: a 1-row pass timed too slow at startup, and
    /// multi-row passes that run at half the startup curve.
    #[test]
    fn live_step_cost_follows_measured_passes() {
        let mut measured = qwen_cost();
        measured.passes[0] = 0.044;
        let mut c = LiveStepCost::new(measured);
        assert_eq!(c.verify_cost(1, 3), measured.verify_cost(1, 3));
        for _ in 0..100 {
            c.observe(1, 1, 0.030);
            c.observe(2, 6, 0.5 * measured.multi(2, 6));
        }
        assert!((c.verify_cost(1, 0) - 0.030).abs() < 1e-6);
        assert!((c.verify_cost(1, 3) / measured.verify_cost(1, 3) - 0.5).abs() < 1e-4);
        c.observe(1, 1, f64::NAN);
        c.observe(1, 0, 1.0);
        assert!(
            (c.verify_cost(1, 0) - 0.030).abs() < 1e-6,
            "bad samples ignored"
        );
    }

    /// Measured points are met exactly, rows between them interpolated, rows beyond the
    /// last extended with the last slope; more sequences add their own cost.
    #[test]
    fn step_cost_follows_the_measured_curve() {
        let c = qwen_cost();
        for (i, &rows) in STEP_COST_ROWS.iter().enumerate() {
            assert!((c.rows(rows) - c.passes[i]).abs() < 1e-12, "{rows} rows");
        }
        assert!((c.rows(3) - 0.045).abs() < 1e-12);
        assert!((c.rows(128) - (0.386 + 64.0 * (0.386 - 0.180) / 32.0)).abs() < 1e-12);
        assert_eq!(c.verify_cost(1, 0), 0.032);
        assert!((c.verify_cost(1, 3) - 0.049).abs() < 1e-12);
        assert!((c.verify_cost(4, 0) - (0.049 + 3.0 * 0.001)).abs() < 1e-12);
        // Concurrency 16: one drafted token each doubles the rows and costs 75 % more, so
        // the policy drafts there only when a token is accepted with probability > 0.75.
        let ratio = c.verify_cost(16, 1) / c.verify_cost(16, 0);
        assert!((ratio - (0.180 + 15e-3) / (0.103 + 15e-3)).abs() < 1e-12);
    }
}
