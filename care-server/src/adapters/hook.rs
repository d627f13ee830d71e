//! [`InfinigramHook`]: the `CustomLogitsProcessor` that turns the null drafter of a stock
//! mistral.rs `SpeculativePipeline` into an n-gram drafter.
//!
//! Per verify step mistral.rs 0.8.1 (`pipeline/speculative.rs`) calls the draft model γ times
//! and samples each draft token through the request's logits processors, with the context
//! `committed tokens + drafts so far`; then it runs the target once over the γ positions and
//! samples each position (again through the processors, context = committed tokens) until the
//! first mismatch. The hook tells the two kinds of calls apart by the null drafter's signature
//! logit ([`SIGNATURE_THRESHOLD`]):
//!
//! - **draft call `i`**: on `i = 0` it brings the [`NgramDrafter`] up to date with the newly
//!   committed tokens and drafts a chain of up to γ tokens; every call returns logits that
//!   make slot `i`'s token the argmax (slots past the chain repeat its last token);
//! - **target call `j`**: returns the logits unchanged and records whether the target's
//!   greedy token equals slot `j`'s — the acceptance outcome, logged per drafted token.
//!
//! Verification stays mistral.rs's: greedy token matching, so greedy output is unchanged.

use std::fs::File;
use std::io::BufWriter;
use std::sync::{Arc, Mutex};

use candle_core::{IndexOp, Tensor};
use infinigram_spec::spec::{DraftRecord, JsonlLog};
use infinigram_spec::{
    CalibratedPolicy, Draft, DraftLog, DraftPolicy, Drafter, Index, NgramDrafter,
    NgramDrafterConfig,
};
use mistralrs_core::CustomLogitsProcessor;

use super::null_drafter::SIGNATURE_THRESHOLD;
use crate::stats::{SpecStats, StepOutcome};

/// Verify cost handed to the shared [`CalibratedPolicy`]. The policy here only ranks the
/// drafter's candidates (its learned acceptance rates); γ is fixed by the pipeline.
pub type CostFn = fn(usize, usize) -> f64;

/// State shared by every request's hook.
pub struct HookShared {
    pub index: Arc<Index>,
    pub drafter_config: NgramDrafterConfig,
    /// γ: slots per verify step.
    pub gamma: usize,
    /// Token whose draft logit marks a null-drafter call.
    pub signature: u32,
    /// Learns acceptance by (match length, count, depth, source) from every step.
    pub policy: Mutex<CalibratedPolicy<CostFn>>,
    pub stats: Arc<SpecStats>,
    pub log: Option<Mutex<JsonlLog<BufWriter<File>>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No step yet.
    Idle,
    /// `next` draft slots were handed out in this step.
    Drafting { next: usize },
    /// `checked` target positions seen, `accepted` of them matched.
    Verifying { checked: usize, accepted: usize },
}

struct RequestState {
    drafter: NgramDrafter,
    started: bool,
    /// The n-gram chain (≤ γ) and the tokens of all γ slots.
    draft: Draft,
    slots: Vec<u32>,
    phase: Phase,
    step: u64,
}

/// One request's logits processor. Create one per request with [`InfinigramHook::new`].
pub struct InfinigramHook {
    shared: Arc<HookShared>,
    request_id: u64,
    state: Mutex<RequestState>,
}

impl InfinigramHook {
    pub fn new(shared: Arc<HookShared>, request_id: u64) -> Self {
        let drafter = NgramDrafter::new(
            Some(Arc::clone(&shared.index)),
            shared.drafter_config.clone(),
        );
        InfinigramHook {
            shared,
            request_id,
            state: Mutex::new(RequestState {
                drafter,
                started: false,
                draft: Draft::default(),
                slots: Vec::new(),
                phase: Phase::Idle,
                step: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RequestState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the drafter to `context` and drafts the next step's slots.
    fn new_step(&self, st: &mut RequestState, context: &[u32]) -> candle_core::Result<()> {
        self.finish_step(st);
        let known = st.drafter.context().len();
        let result =
            if st.started && context.len() >= known && context[..known] == *st.drafter.context() {
                st.drafter.accept(&context[known..])
            } else {
                st.started = true;
                st.drafter.start(context)
            };
        let gamma = self.shared.gamma;
        let draft = result.and_then(|()| {
            let policy = self.shared.policy.lock().unwrap_or_else(|e| e.into_inner());
            st.drafter.draft(gamma, &*policy)
        });
        // A drafting failure must not fail the request: the slots then only repeat the
        // last token and are rejected by the target.
        st.draft = draft.unwrap_or_default();
        let pad = st
            .draft
            .tokens
            .last()
            .or(context.last())
            .copied()
            .unwrap_or(0);
        st.slots = st.draft.tokens.clone();
        st.slots.resize(gamma, pad);
        st.phase = Phase::Drafting { next: 0 };
        Ok(())
    }

    /// Records the outcome of the step in progress, if any.
    fn finish_step(&self, st: &mut RequestState) {
        let Phase::Verifying { checked, accepted } = st.phase else {
            return;
        };
        st.phase = Phase::Idle;
        let shared = &self.shared;
        let n = st.draft.len();
        shared.stats.record_step(StepOutcome {
            slots: shared.gamma,
            drafted: &st.draft.features,
            accepted_slots: accepted,
            reached: checked,
        });
        let accepted_drafted = accepted.min(n);
        shared
            .policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(&st.draft, n, accepted_drafted);
        if let Some(log) = &shared.log {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            for (i, (&token, &features)) in
                st.draft.tokens.iter().zip(&st.draft.features).enumerate()
            {
                let record = DraftRecord {
                    request: self.request_id,
                    step: st.step,
                    batch_size: 1,
                    submitted_len: n,
                    position: i,
                    token,
                    features,
                    submitted: true,
                    verified: i < checked,
                    accepted: i < accepted_drafted,
                };
                if let Err(e) = log.record(&record) {
                    tracing::warn!("infinigram log: {e}");
                }
            }
        }
        st.step += 1;
    }
}

/// Logits whose argmax is `token` (a large margin, so no sampling filter can move it).
fn one_hot(like: &Tensor, token: u32) -> candle_core::Result<Tensor> {
    let n = like.dim(0)?;
    let mut v = vec![0f32; n];
    if let Some(x) = v.get_mut(token as usize) {
        *x = 1.0e4;
    }
    Tensor::from_vec(v, n, like.device())?.to_dtype(like.dtype())
}

fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    let v: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    Ok(infinigram_spec::spec::argmax(&v).unwrap_or(0))
}

impl CustomLogitsProcessor for InfinigramHook {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> candle_core::Result<Tensor> {
        let signature = logits
            .i(self.shared.signature as usize)?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        let mut st = self.lock();
        if signature > SIGNATURE_THRESHOLD {
            // Draft call.
            if !matches!(st.phase, Phase::Drafting { .. }) {
                self.new_step(&mut st, context)?;
            }
            let Phase::Drafting { next } = st.phase else {
                unreachable!("new_step sets Drafting");
            };
            let token = st.slots[next.min(st.slots.len() - 1)];
            st.phase = Phase::Drafting { next: next + 1 };
            return one_hot(logits, token);
        }
        // Target call: pass through, record the outcome of slot `checked`.
        let (checked, accepted) = match st.phase {
            Phase::Drafting { .. } => (0, 0),
            Phase::Verifying { checked, accepted } => (checked, accepted),
            Phase::Idle => return Ok(logits.clone()),
        };
        let hit = st.slots.get(checked) == Some(&argmax(logits)?) && accepted == checked;
        st.phase = Phase::Verifying {
            checked: checked + 1,
            accepted: accepted + hit as usize,
        };
        Ok(logits.clone())
    }
}

impl Drop for InfinigramHook {
    fn drop(&mut self) {
        let mut st = self.lock();
        self.finish_step(&mut st);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infinigram_spec::{BuildConfig, IndexBuilder, NoProgress, OpenOptions};

    const VOCAB: usize = 16;
    const SIG: u32 = 0;

    fn logits(hot: Option<u32>, signature: bool) -> Tensor {
        let mut v = vec![0f32; VOCAB];
        if let Some(t) = hot {
            v[t as usize] = 5.0;
        }
        if signature {
            v[SIG as usize] = 16_000.0;
        }
        Tensor::from_vec(v, VOCAB, &candle_core::Device::Cpu).unwrap()
    }

    fn argmax_of(t: &Tensor) -> u32 {
        argmax(t).unwrap()
    }

    /// Drives the hook the way mistral.rs's speculative step calls it: γ draft calls, then
    /// target calls until the first mismatch.
    #[test]
    fn drafts_from_the_index_and_records_acceptance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.igs");
        let docs = vec![vec![1u32, 2, 3, 4, 5, 6, 7], vec![1, 2, 3, 4, 5, 6, 8]];
        IndexBuilder::new(BuildConfig::new(VOCAB as u32))
            .unwrap()
            .build_file(&path, docs.into_iter().map(Ok), &NoProgress)
            .unwrap();
        let index = Index::open(&path, OpenOptions::default()).unwrap();
        let stats = Arc::new(SpecStats::default());
        let flat: CostFn = |_, _| 1.0;
        let shared = Arc::new(HookShared {
            index: Arc::new(index),
            drafter_config: NgramDrafterConfig::default(),
            gamma: 3,
            signature: SIG,
            policy: Mutex::new(CalibratedPolicy::new(flat, 3)),
            stats: Arc::clone(&stats),
            log: None,
        });
        let hook = InfinigramHook::new(Arc::clone(&shared), 7);
        // Step 1, prompt [9, 1, 2]: the corpus continues "1 2" with 3 4 5.
        let mut ctx = vec![9u32, 1, 2];
        let mut drafted = Vec::new();
        for i in 0..3 {
            let out = hook.apply(&logits(None, true), &ctx).unwrap();
            let t = argmax_of(&out);
            drafted.push(t);
            ctx.push(t); // mistral.rs's temporary draft tokens
            assert_eq!(ctx.len(), 4 + i);
        }
        assert_eq!(drafted, vec![3, 4, 5]);
        ctx.truncate(3);
        // The target agrees on 3 and 4, then says 9: three target calls, passed through.
        for t in [3u32, 4, 9] {
            let l = logits(Some(t), false);
            let out = hook.apply(&l, &ctx).unwrap();
            assert_eq!(argmax_of(&out), t, "target logits pass through");
        }
        ctx.extend([3, 4, 9]);
        // Step 2 starts with the next draft call: step 1 is recorded.
        hook.apply(&logits(None, true), &ctx).unwrap();
        let s = stats.snapshot();
        assert_eq!(
            (s.steps, s.slots, s.drafted_tokens, s.accepted_tokens),
            (1, 3, 3, 2)
        );
        assert_eq!(s.emitted_tokens, 3);
        // Finishing the request records the step in progress (no target call: nothing
        // reached, so only the step counters move).
        drop(hook);
        assert_eq!(
            stats.snapshot().steps,
            1,
            "a step without target calls is not counted"
        );
    }
}
