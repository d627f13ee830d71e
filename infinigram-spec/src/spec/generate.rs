//! The speculative decoding loop over any target model.

use serde::Serialize;

use super::drafter::Drafter;
use super::log::{log_draft, DraftLog, StepInfo};
use super::policy::{DraftPolicy, PolicyContext};
use super::sampling::Sampling;
use super::verify::verify_sample_match;
use crate::error::{Error, Result};

/// The model whose output speculative decoding must reproduce. It keeps its own state (a KV
/// cache): `forward` appends tokens to it, `rollback` removes the last ones.
pub trait TargetModel {
    /// Appends `new_tokens` to the state and returns one row of logits per new token: row
    /// `i` is the distribution of the token after `new_tokens[i]`.
    fn forward(&mut self, new_tokens: &[u32]) -> Vec<Vec<f32>>;
    /// Drops the last `n_tokens` tokens from the state.
    fn rollback(&mut self, n_tokens: usize);
}

/// Counters of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GenerationStats {
    /// Target forward calls (prompt prefill included).
    pub target_calls: usize,
    /// Verify steps (one target call each).
    pub steps: usize,
    /// Tokens the drafter proposed.
    pub drafted: usize,
    /// Drafted tokens submitted for verification.
    pub submitted: usize,
    /// Submitted tokens accepted.
    pub accepted: usize,
}

/// What [`speculative_generate`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Generation {
    /// Generated tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    pub stats: GenerationStats,
}

/// Optional settings of [`speculative_generate_with`].
pub struct GenerateOptions<'a> {
    /// Stop after emitting any of these tokens (it is included in the output).
    pub stop_tokens: Vec<u32>,
    /// Longest draft requested from the drafter.
    pub max_draft: usize,
    /// Batch size reported to the policy.
    pub batch_size: usize,
    /// Request id written to the log.
    pub request_id: u64,
    /// Where to log every drafted token.
    pub log: Option<&'a mut dyn DraftLog>,
}

impl Default for GenerateOptions<'_> {
    fn default() -> Self {
        GenerateOptions {
            stop_tokens: Vec::new(),
            max_draft: 8,
            batch_size: 1,
            request_id: 0,
            log: None,
        }
    }
}

fn check_rows(rows: &[Vec<f32>], want: usize) -> Result<()> {
    if rows.len() != want {
        return Err(Error::Target(format!(
            "forward returned {} logit rows for {want} new tokens",
            rows.len()
        )));
    }
    Ok(())
}

/// Generates up to `max_new` tokens after `prompt` with drafting, default options. See
/// [`speculative_generate_with`].
pub fn speculative_generate(
    target: &mut impl TargetModel,
    drafter: &mut impl Drafter,
    policy: &mut impl DraftPolicy,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
) -> Result<Generation> {
    speculative_generate_with(
        target,
        drafter,
        policy,
        prompt,
        max_new,
        sampling,
        GenerateOptions::default(),
    )
}

/// Generates up to `max_new` tokens after `prompt` (non-empty; the target's state must be
/// empty). Each step drafts from the accepted context, lets the policy cut the draft, runs
/// the target once on the last emitted token plus the draft, accepts by sample-and-match
/// (greedy or sampled, see [`verify_sample_match`]), rolls the rejected tokens back out of
/// the target and tells the drafter and the policy. The output equals
/// [`generate_plain`]'s for the same target and sampling (same seed included).
pub fn speculative_generate_with(
    target: &mut impl TargetModel,
    drafter: &mut impl Drafter,
    policy: &mut impl DraftPolicy,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    mut options: GenerateOptions<'_>,
) -> Result<Generation> {
    let Some((&last, head)) = prompt.split_last() else {
        return Err(Error::InvalidArgument("empty prompt".into()));
    };
    let mut stats = GenerationStats::default();
    let mut out = Vec::new();
    if max_new == 0 {
        return Ok(Generation { tokens: out, stats });
    }
    drafter.start(prompt)?;
    if !head.is_empty() {
        check_rows(&target.forward(head), head.len())?;
        stats.target_calls += 1;
    }
    let mut rng = sampling.rng();
    let ctx = PolicyContext {
        batch_size: options.batch_size.max(1),
    };
    // The last emitted token, not yet fed to the target.
    let mut pending = last;
    while out.len() < max_new {
        let room = max_new - out.len() - 1; // the bonus token always comes
        let draft = if room == 0 {
            Default::default()
        } else {
            drafter.draft(options.max_draft.min(room), &*policy)?
        };
        if draft.tokens.len() != draft.features.len() {
            return Err(Error::InvalidArgument(format!(
                "drafter returned {} tokens with {} feature entries",
                draft.tokens.len(),
                draft.features.len()
            )));
        }
        let k = policy.draft_len(&draft, &ctx).min(draft.len()).min(room);
        let mut input = Vec::with_capacity(k + 1);
        input.push(pending);
        input.extend_from_slice(&draft.tokens[..k]);
        let rows = target.forward(&input);
        check_rows(&rows, k + 1)?;
        let v = verify_sample_match(&draft.tokens[..k], &rows, sampling, &mut rng)?;
        target.rollback(k - v.accepted);
        stats.target_calls += 1;
        stats.steps += 1;
        stats.drafted += draft.len();
        stats.submitted += k;
        stats.accepted += v.accepted;
        if let Some(log) = options.log.as_deref_mut() {
            let info = StepInfo {
                request: options.request_id,
                step: stats.steps as u64 - 1,
                batch_size: ctx.batch_size,
            };
            log_draft(log, info, &draft, k, v.accepted)?;
        }
        policy.observe(&draft, k, v.accepted);
        let mut emitted = v.emitted(&draft.tokens[..k]);
        if let Some(stop) = emitted.iter().position(|t| options.stop_tokens.contains(t)) {
            emitted.truncate(stop + 1);
            out.extend_from_slice(&emitted);
            break;
        }
        drafter.accept(&emitted)?;
        out.extend_from_slice(&emitted);
        pending = v.bonus;
    }
    if let Some(log) = options.log.as_deref_mut() {
        log.flush()?;
    }
    Ok(Generation { tokens: out, stats })
}

/// Plain decoding, one target call per token: the reference the speculative loop must match.
pub fn generate_plain(
    target: &mut impl TargetModel,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop_tokens: &[u32],
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".into()));
    }
    let mut rng = sampling.rng();
    let mut out = Vec::new();
    let mut rows = target.forward(prompt);
    check_rows(&rows, prompt.len())?;
    while out.len() < max_new {
        let row = rows
            .last()
            .ok_or_else(|| Error::Target("forward returned no logits".into()))?;
        let x = sampling.next_token(row, &mut rng)?;
        out.push(x);
        if stop_tokens.contains(&x) || out.len() == max_new {
            break;
        }
        rows = target.forward(&[x]);
        check_rows(&rows, 1)?;
    }
    Ok(out)
}
