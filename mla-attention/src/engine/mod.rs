//! [`Engine`]: the one scheduler. Every request served — on the CPU or a GPU, original
//! (GQA) or converted (MLA) checkpoint, with Infinigram drafting or without — is decoded
//! here, over a [`PagedModel`].
//!
//! ```text
//! submit(request) → queue → admitted when its worst case fits the free blocks
//!                   (prompt minus its last token prefilled into the paged cache)
//! step():
//!   for each active sequence: the drafter proposes, the BatchPolicy cuts (k may be 0)
//!   PagedModel::forward([last token, draft…] per sequence)    one pass, all sequences
//!   verify (greedy, or sample-and-match) → accepted prefix + the target's own token
//!   roll rejected rows back in the cache
//!   stop tokens, stop strings, max tokens (one definition) → events; finished → blocks freed
//! ```
//!
//! Greedy output with drafting equals greedy output without it, token for token: the
//! paged CPU model computes every row alone in a fixed order, so a token's logits are the
//! same bits in a one-row step and in a verify pass. Sampled requests keep exactly the
//! model's distribution (sample-and-match draws one number per emitted token, so they even
//! equal plain sampling with the same seed).
//!
//! # Stop rules
//!
//! A request ends at the first of: one of the engine's end tokens or the request's stop
//! tokens (not part of the output, counted as generated), `max_new` generated tokens, a stop
//! string in the text (neither it nor anything after it is returned). Text is streamed in
//! pieces that never change ([`TextStream`]).
//!
//! # Admission and faults
//!
//! A request is admitted only when the blocks it could ever need (`prompt + max_new − 1`
//! tokens) fit beside the active requests' remaining worst cases, so a step never runs out
//! of blocks; until then it waits in the queue, and one that could never fit fails at
//! once. [`Engine::cancel`] frees a request's blocks immediately. A pass that fails is
//! retried sequence by sequence, so only a request that fails alone fails.
//!
//! ```no_run
//! use mla_attention::engine::{Engine, EngineConfig, GenerationRequest};
//! use mla_attention::runner::{CpuPagedModel, RunnerConfig};
//! use mla_attention::io::Checkpoint;
//! let ckpt = Checkpoint::open("Qwen2.5-Coder-0.5B-Instruct.gguf")?;
//! let model: CpuPagedModel = CpuPagedModel::load(&ckpt.spec, ckpt.weights.as_ref(),
//!     RunnerConfig { block_size: 16, num_blocks: 1024 })?;
//! let mut engine = Engine::new(model, EngineConfig::default());
//! let id = engine.submit(GenerationRequest::greedy(vec![1, 2, 3], 16))?;
//! let out = engine.run_to_completion()?;
//! println!("{:?}", out[&id]);
//! # Ok::<(), mla_attention::Error>(())
//! ```

mod cost;
mod text;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use infinigram_spec::spec::{
    log_draft, verify_greedy, verify_sample_match, BatchPolicy, DraftLog, Drafter, GateArm,
    LiveStepCost, NgramDrafter, NgramDrafterConfig, Rng, Sampling, SpecStats, StepCost, StepInfo,
    StepOutcome,
};
use infinigram_spec::{Draft, Index};
use serde::Serialize;
use tokenizers::Tokenizer;

pub use cost::measure_step_cost;
pub use text::{TextPiece, TextStream};

use crate::cache::SeqId;
use crate::error::{Error, Result};
use crate::runner::PagedModel;

/// A request handle, unique within one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RequestId(pub u64);

/// Scheduling limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Requests decoded at once; more wait in the queue.
    pub max_active: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_active: 32 }
    }
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (≥ 1; a stop token counts).
    pub max_new: usize,
    /// Tokens that end the request besides the engine's end tokens.
    pub stop_tokens: Vec<u32>,
    /// Strings that end the request (needs the engine's tokenizer).
    pub stop_strings: Vec<String>,
    pub sampling: Sampling,
    /// Whether this request drafts (when the engine has drafting).
    pub draft: bool,
}

impl GenerationRequest {
    /// Greedy decoding of `max_new` tokens, drafting where the engine can.
    pub fn greedy(prompt: Vec<u32>, max_new: usize) -> Self {
        GenerationRequest {
            prompt,
            max_new,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            sampling: Sampling::Greedy,
            draft: true,
        }
    }
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or a stop string.
    Stop,
    /// `max_new` reached.
    Length,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Counters of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RequestStats {
    pub prompt_tokens: usize,
    /// Generated tokens (a stop token included).
    pub completion_tokens: usize,
    /// Passes this request took part in.
    pub steps: usize,
    /// Drafted tokens verified, and how many were accepted.
    pub submitted: usize,
    pub accepted: usize,
    /// Seconds in the queue, prefilling, decoding.
    pub queue_secs: f64,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// What a step tells the requests' owners.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// New tokens (a stop token excluded) and the text that became final with them
    /// (empty without a tokenizer).
    Tokens {
        id: RequestId,
        tokens: Vec<u32>,
        text: String,
    },
    /// The request ended; `text` is its last piece. Nothing follows.
    Finished {
        id: RequestId,
        reason: FinishReason,
        text: String,
        stats: RequestStats,
    },
    /// The request failed; nothing follows. The others are unaffected.
    Failed { id: RequestId, message: String },
}

impl EngineEvent {
    pub fn id(&self) -> RequestId {
        match self {
            EngineEvent::Tokens { id, .. }
            | EngineEvent::Finished { id, .. }
            | EngineEvent::Failed { id, .. } => *id,
        }
    }
}

/// Infinigram drafting: the corpus index, the drafter settings, the policy for whole
/// steps, the acceptance statistics and an optional per-token log.
pub struct Drafting {
    pub index: Arc<Index>,
    pub drafter: NgramDrafterConfig,
    pub policy: BatchPolicy,
    pub stats: Arc<SpecStats>,
    pub log: Option<Box<dyn DraftLog + Send>>,
}

/// What [`Engine::snapshot`] shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineSnapshot {
    pub active: usize,
    pub queued: usize,
    /// Cache geometry and occupancy; bytes one cached token costs (`Σ_l width_l · bytes`).
    pub kv_bytes_per_token: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub used_blocks: usize,
    /// Steps run, and where their time went (seconds): drafting (index lookups, policy),
    /// the model's passes, the rest (verification, rollback, text, events); prefill.
    pub steps: u64,
    pub draft_secs: f64,
    pub target_secs: f64,
    pub other_secs: f64,
    pub prefill_secs: f64,
    /// Rows the passes ran (each sequence's last token and its drafts).
    pub target_rows: u64,
    /// Longest draft, the policy's step-time model (measured, live), and its gate's
    /// measured tokens/s per batch level and confidence class (calibrated policy only).
    pub max_draft: usize,
    pub step_cost: Option<StepCost>,
    pub live_step_cost: Option<LiveStepCost>,
    pub gate: Vec<Vec<[GateArm; 2]>>,
}

struct Queued {
    id: RequestId,
    req: GenerationRequest,
    since: Instant,
}

struct Active {
    id: RequestId,
    req: GenerationRequest,
    seq: SeqId,
    /// Blocks it may ever hold (its admission reservation).
    max_blocks: usize,
    /// Last emitted (or last prompt) token, not yet run through the model.
    pending: u32,
    /// Generated so far (a stop token included).
    generated: usize,
    tokens: Vec<u32>,
    text: Option<TextStream>,
    drafter: Option<NgramDrafter>,
    rng: Rng,
    stats: RequestStats,
    decode_start: Instant,
}

/// What a verified step did to one request.
enum Outcome {
    Continue,
    Finished(FinishReason),
}

/// The scheduler over a [`PagedModel`] (see the [module docs](self)).
pub struct Engine<M: PagedModel> {
    model: M,
    config: EngineConfig,
    end_tokens: Vec<u32>,
    tokenizer: Option<Arc<Tokenizer>>,
    drafting: Option<Drafting>,
    step_cost: Option<StepCost>,
    queue: VecDeque<Queued>,
    active: Vec<Active>,
    finished: BTreeMap<RequestId, Vec<u32>>,
    keep_finished: bool,
    next_id: u64,
    snap: EngineSnapshot,
}

impl<M: PagedModel> std::fmt::Debug for Engine<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("active", &self.active.len())
            .field("queued", &self.queue.len())
            .field("free_blocks", &self.model.free_blocks())
            .finish()
    }
}

/// Argmax of every row of `logits` `(rows, vocab)`.
fn greedy_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(1)?.to_vec1::<u32>()?)
}

impl<M: PagedModel> Engine<M> {
    pub fn new(model: M, config: EngineConfig) -> Self {
        let snap = EngineSnapshot {
            kv_bytes_per_token: model.bytes_per_token(),
            block_size: model.block_size(),
            num_blocks: model.num_blocks(),
            ..Default::default()
        };
        Engine {
            model,
            config,
            end_tokens: Vec::new(),
            tokenizer: None,
            drafting: None,
            step_cost: None,
            queue: VecDeque::new(),
            active: Vec::new(),
            finished: BTreeMap::new(),
            keep_finished: true,
            next_id: 0,
            snap,
        }
    }

    /// Tokens that end every request (EOS, end of turn).
    pub fn with_end_tokens(mut self, end_tokens: Vec<u32>) -> Self {
        self.end_tokens = end_tokens;
        self
    }

    /// Detokenizes the output (text in the events) and allows stop strings.
    pub fn with_tokenizer(mut self, tokenizer: Arc<Tokenizer>) -> Self {
        self.tokenizer = Some(tokenizer);
        self
    }

    /// Drafts with `drafting` (requests with `draft` set); `cost` is the step-time model
    /// its policy was built with, shown in the snapshot.
    pub fn with_drafting(mut self, drafting: Drafting, cost: Option<StepCost>) -> Self {
        self.snap.max_draft = drafting.policy.settings().max_draft;
        self.step_cost = cost;
        self.drafting = Some(drafting);
        self
    }

    /// Whether finished requests' tokens are kept for [`Self::take_finished`] (default on;
    /// a server that consumes events turns it off).
    pub fn keep_finished(mut self, keep: bool) -> Self {
        self.keep_finished = keep;
        self
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    pub fn end_tokens(&self) -> &[u32] {
        &self.end_tokens
    }

    /// Unfinished admitted requests.
    pub fn num_active(&self) -> usize {
        self.active.len()
    }

    pub fn num_queued(&self) -> usize {
        self.queue.len()
    }

    /// Whether anything is left to do.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.queue.is_empty()
    }

    /// Free blocks not promised to active requests' remaining tokens: what a new
    /// request may take.
    pub fn admittable_blocks(&self) -> usize {
        let reserved: usize = self
            .active
            .iter()
            .map(|r| r.max_blocks.saturating_sub(self.model.held_blocks(r.seq)))
            .sum();
        self.model.free_blocks().saturating_sub(reserved)
    }

    /// Tokens generated so far by an active request (a stop token excluded).
    pub fn generated(&self, id: RequestId) -> Option<&[u32]> {
        self.active
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.tokens.as_slice())
            .or_else(|| self.finished.get(&id).map(Vec::as_slice))
    }

    /// Finished requests' tokens (a stop token excluded), removed from the engine.
    pub fn take_finished(&mut self) -> BTreeMap<RequestId, Vec<u32>> {
        std::mem::take(&mut self.finished)
    }

    pub fn snapshot(&self) -> EngineSnapshot {
        let mut s = self.snap.clone();
        s.active = self.active.len();
        s.queued = self.queue.len();
        s.used_blocks = self.model.used_blocks();
        s.step_cost = self.step_cost;
        if let Some(d) = &self.drafting {
            (s.gate, s.live_step_cost) = d.policy.snapshot();
        }
        s
    }

    /// Blocks a request of `prompt` tokens and `max_new` new ones may ever hold.
    fn blocks_for(&self, prompt: usize, max_new: usize) -> usize {
        (prompt + max_new - 1).div_ceil(self.model.block_size())
    }

    /// Queues a request; it is admitted by a later [`Self::step`]. Checked here: a
    /// non-empty prompt, `max_new ≥ 1`, ids in the vocabulary, the model's context, stop
    /// strings only with a tokenizer, and a worst case that fits the whole cache.
    pub fn submit(&mut self, req: GenerationRequest) -> Result<RequestId> {
        if req.prompt.is_empty() || req.max_new == 0 {
            return Err(Error::InvalidInput(format!(
                "a request needs a prompt and max_tokens ≥ 1, got {} prompt tokens and {}",
                req.prompt.len(),
                req.max_new
            )));
        }
        let vocab = self.model.vocab_size();
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let ctx = self.model.max_context();
        if req.prompt.len() + req.max_new > ctx {
            return Err(Error::InvalidInput(format!(
                "prompt ({} tokens) + max_tokens ({}) exceed the model's context of {ctx} tokens",
                req.prompt.len(),
                req.max_new
            )));
        }
        if !req.stop_strings.is_empty() && self.tokenizer.is_none() {
            return Err(Error::InvalidInput(
                "stop strings need the engine's tokenizer".into(),
            ));
        }
        let need = self.blocks_for(req.prompt.len(), req.max_new);
        if need > self.model.num_blocks() {
            return Err(Error::CacheFull {
                layer: 0,
                needed_blocks: need,
                free_blocks: self.model.free_blocks(),
                total_blocks: self.model.num_blocks(),
            });
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.queue.push_back(Queued {
            id,
            req,
            since: Instant::now(),
        });
        Ok(id)
    }

    /// Drops a queued or active request at once (its blocks go back to the cache); false
    /// if it is not here (finished, failed, unknown).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.queue.iter().position(|q| q.id == id) {
            self.queue.remove(i);
            return true;
        }
        if let Some(i) = self.active.iter().position(|a| a.id == id) {
            let a = self.active.remove(i);
            // The sequence is the engine's own: freeing it cannot fail but for a bug.
            let _ = self.model.free(a.seq);
            return true;
        }
        false
    }

    /// Admits queued requests in order while they fit (prefilling each); a request that
    /// does not fit yet waits, and so do the ones behind it.
    fn admit(&mut self, events: &mut Vec<EngineEvent>) {
        while self.active.len() < self.config.max_active.max(1) {
            let Some(q) = self.queue.front() else { break };
            let need = self.blocks_for(q.req.prompt.len(), q.req.max_new);
            if need > self.admittable_blocks() {
                break;
            }
            let q = self.queue.pop_front().expect("front exists");
            let start = Instant::now();
            let (&last, head) = q.req.prompt.split_last().expect("checked at submit");
            let seq = match self.model.prefill(head) {
                Ok(s) => s,
                Err(e) => {
                    events.push(EngineEvent::Failed {
                        id: q.id,
                        message: format!("prefill failed: {e}"),
                    });
                    continue;
                }
            };
            let drafter = match &self.drafting {
                Some(d) if q.req.draft => {
                    let mut dr = NgramDrafter::new(Some(Arc::clone(&d.index)), d.drafter.clone());
                    if let Err(e) = dr.start(&q.req.prompt) {
                        let _ = self.model.free(seq);
                        events.push(EngineEvent::Failed {
                            id: q.id,
                            message: format!("drafter: {e}"),
                        });
                        continue;
                    }
                    Some(dr)
                }
                _ => None,
            };
            if let Some(d) = &self.drafting {
                d.stats.record_request(drafter.is_some());
            }
            let prefill_secs = start.elapsed().as_secs_f64();
            self.snap.prefill_secs += prefill_secs;
            let text = self
                .tokenizer
                .as_ref()
                .map(|t| TextStream::new(Arc::clone(t), q.req.stop_strings.clone()));
            self.active.push(Active {
                id: q.id,
                seq,
                max_blocks: need,
                pending: last,
                generated: 0,
                tokens: Vec::new(),
                text,
                drafter,
                rng: q.req.sampling.rng(),
                stats: RequestStats {
                    prompt_tokens: q.req.prompt.len(),
                    queue_secs: (start - q.since).as_secs_f64(),
                    prefill_secs,
                    ..Default::default()
                },
                decode_start: Instant::now(),
                req: q.req,
            });
        }
    }

    /// Drafts for every active request (empty where it does not draft), cut by the policy.
    fn drafts(
        &mut self,
    ) -> Result<(
        Vec<Draft>,
        Vec<usize>,
        Option<infinigram_spec::spec::StepPlan>,
    )> {
        let n = self.active.len();
        let max_rows = self.model.max_segment_rows();
        let Some(d) = self.drafting.as_mut() else {
            return Ok((vec![Draft::default(); n], vec![0; n], None));
        };
        if max_rows < 2 || !d.policy.may_draft(n) {
            return Ok((vec![Draft::default(); n], vec![0; n], None));
        }
        let max_draft = d.policy.settings().max_draft.min(max_rows - 1);
        let mut drafts = Vec::with_capacity(n);
        let mut room = Vec::with_capacity(n);
        for a in &mut self.active {
            // The model's own token always comes, so at most `left − 1` drafted tokens fit.
            let left = a.req.max_new - a.generated - 1;
            match a.drafter.as_mut() {
                Some(dr) if left > 0 => {
                    drafts.push(
                        dr.draft(max_draft.min(left), d.policy.accept_model())
                            .map_err(|e| Error::InvalidInput(format!("drafter: {e}")))?,
                    );
                    room.push(left);
                }
                _ => {
                    drafts.push(Draft::default());
                    room.push(0);
                }
            }
        }
        if drafts.iter().all(Draft::is_empty) {
            return Ok((drafts, vec![0; n], None));
        }
        let (ks, plan) = d.policy.plan(&drafts, &room);
        Ok((drafts, ks, Some(plan)))
    }

    /// One step: admit what fits, then one pass over every active request (its last token
    /// and its draft), verification, stop rules. Returns the events of this step.
    pub fn step(&mut self) -> Result<Vec<EngineEvent>> {
        let mut events = Vec::new();
        self.admit(&mut events);
        if self.active.is_empty() {
            return Ok(events);
        }
        let t0 = Instant::now();
        let (drafts, ks, plan) = self.drafts()?;
        let segments: Vec<Vec<u32>> = self
            .active
            .iter()
            .zip(drafts.iter().zip(&ks))
            .map(|(a, (d, &k))| {
                let mut s = Vec::with_capacity(k + 1);
                s.push(a.pending);
                s.extend_from_slice(&d.tokens[..k]);
                s
            })
            .collect();
        let starts: Vec<usize> = self
            .active
            .iter()
            .map(|a| self.model.tokens(a.seq))
            .collect::<Result<_>>()?;
        let t1 = Instant::now();
        let seqs: Vec<SeqId> = self.active.iter().map(|a| a.seq).collect();
        let segs: Vec<&[u32]> = segments.iter().map(Vec::as_slice).collect();
        let rows: usize = segs.iter().map(|s| s.len()).sum();
        let batch = self.active.len();
        let mut outcomes: Vec<Option<std::result::Result<Outcome, String>>> =
            (0..batch).map(|_| None).collect();
        match self.model.forward(&seqs, &segs) {
            Ok(logits) => {
                let argmax = greedy_rows(&logits)?;
                let mut offset = 0;
                for i in 0..batch {
                    let n = segs[i].len();
                    outcomes[i] = Some(self.conclude(
                        i,
                        &logits,
                        &argmax,
                        offset,
                        &drafts[i],
                        ks[i],
                        starts[i],
                        &mut events,
                    ));
                    offset += n;
                }
            }
            Err(e) if batch == 1 => outcomes[0] = Some(Err(format!("model pass failed: {e}"))),
            Err(e) => {
                tracing::warn!("a pass of {batch} sequences failed ({e}); retrying one by one");
                for i in 0..batch {
                    let one = self
                        .model
                        .forward(&seqs[i..=i], &segs[i..=i])
                        .map_err(|e| format!("model pass failed: {e}"))
                        .and_then(|logits| {
                            let argmax = greedy_rows(&logits).map_err(|e| e.to_string())?;
                            self.conclude(
                                i,
                                &logits,
                                &argmax,
                                0,
                                &drafts[i],
                                ks[i],
                                starts[i],
                                &mut events,
                            )
                        });
                    outcomes[i] = Some(one);
                }
            }
        }
        let t2 = Instant::now();
        let mut kept = Vec::with_capacity(batch);
        for (a, outcome) in std::mem::take(&mut self.active).into_iter().zip(outcomes) {
            match outcome.expect("every request concluded") {
                Ok(Outcome::Continue) => kept.push(a),
                Ok(Outcome::Finished(reason)) => self.finish(a, reason, &mut events),
                Err(message) => {
                    let _ = self.model.free(a.seq);
                    events.push(EngineEvent::Failed { id: a.id, message });
                }
            }
        }
        self.active = kept;
        let step_emitted: usize = events
            .iter()
            .map(|e| match e {
                EngineEvent::Tokens { tokens, .. } => tokens.len(),
                _ => 0,
            })
            .sum();
        if let (Some(d), Some(plan)) = (self.drafting.as_mut(), plan) {
            d.policy.record(
                plan,
                batch,
                rows,
                (t2 - t1).as_secs_f64(),
                step_emitted.max(1),
                t0.elapsed().as_secs_f64(),
            );
            if let Some(log) = d.log.as_mut() {
                if let Err(e) = log.flush() {
                    tracing::warn!("draft log: {e}");
                }
            }
        }
        self.snap.steps += 1;
        self.snap.draft_secs += (t1 - t0).as_secs_f64();
        self.snap.target_secs += (t2 - t1).as_secs_f64();
        self.snap.other_secs += t2.elapsed().as_secs_f64();
        self.snap.target_rows += rows as u64;
        Ok(events)
    }

    /// Verifies request `i`'s rows `offset..offset + k + 1` of `logits`, rolls rejected
    /// rows back, applies the stop rules and emits its events.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        i: usize,
        logits: &Tensor,
        argmax: &[u32],
        offset: usize,
        draft: &Draft,
        k: usize,
        start: usize,
        events: &mut Vec<EngineEvent>,
    ) -> std::result::Result<Outcome, String> {
        let batch_size = self.active.len();
        let a = &mut self.active[i];
        let drafted = &draft.tokens[..k];
        let v = match &a.req.sampling {
            Sampling::Greedy => verify_greedy(drafted, &argmax[offset..offset + k + 1]),
            sampling => {
                let rows = logits
                    .narrow(0, offset, k + 1)
                    .and_then(|t| t.to_vec2::<f32>())
                    .map_err(|e| e.to_string())?;
                verify_sample_match(drafted, &rows, sampling, &mut a.rng)
            }
        }
        .map_err(|e| e.to_string())?;
        self.model
            .rollback(a.seq, start + 1 + v.accepted)
            .map_err(|e| e.to_string())?;
        a.stats.steps += 1;
        a.stats.submitted += k;
        a.stats.accepted += v.accepted;
        if let Some(d) = self.drafting.as_mut() {
            if a.drafter.is_some() {
                d.stats.record_step(StepOutcome {
                    submitted: k,
                    drafted: &draft.features[..k],
                    accepted: v.accepted,
                    emitted: v.accepted + 1,
                });
                if k > 0 {
                    d.policy.observe(draft, k, v.accepted);
                    if let Some(log) = d.log.as_mut() {
                        let info = StepInfo {
                            request: a.id.0,
                            step: a.stats.steps as u64 - 1,
                            batch_size,
                        };
                        if let Err(e) = log_draft(log.as_mut(), info, draft, k, v.accepted) {
                            tracing::warn!("draft log: {e}");
                        }
                    }
                }
            }
        }
        // Stop rules, in emission order.
        let mut new = Vec::with_capacity(k + 1);
        let mut finish = None;
        for t in v.emitted(drafted) {
            a.generated += 1;
            if self.end_tokens.contains(&t) || a.req.stop_tokens.contains(&t) {
                finish = Some(FinishReason::Stop);
                break;
            }
            new.push(t);
            if a.generated >= a.req.max_new {
                finish = Some(FinishReason::Length);
                break;
            }
        }
        a.stats.completion_tokens = a.generated;
        a.tokens.extend_from_slice(&new);
        let mut text = String::new();
        if let Some(ts) = a.text.as_mut() {
            let piece = ts.push(&new).map_err(|e| e.to_string())?;
            text = piece.text;
            if piece.stopped {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() {
            if let Some(dr) = a.drafter.as_mut() {
                dr.accept(&new).map_err(|e| format!("drafter: {e}"))?;
            }
            a.pending = *new.last().expect("a continuing step emits a token");
        }
        if !new.is_empty() || !text.is_empty() {
            events.push(EngineEvent::Tokens {
                id: a.id,
                tokens: new,
                text,
            });
        }
        Ok(match finish {
            Some(r) => Outcome::Finished(r),
            None => Outcome::Continue,
        })
    }

    fn finish(&mut self, mut a: Active, reason: FinishReason, events: &mut Vec<EngineEvent>) {
        let _ = self.model.free(a.seq);
        a.stats.decode_secs = a.decode_start.elapsed().as_secs_f64();
        // What the text held back (a stop string already cut it: nothing).
        let text = a
            .text
            .as_mut()
            .map(|ts| ts.finish().unwrap_or_default())
            .unwrap_or_default();
        events.push(EngineEvent::Finished {
            id: a.id,
            reason,
            text,
            stats: a.stats,
        });
        if self.keep_finished {
            self.finished.insert(a.id, a.tokens);
        }
    }

    /// Steps until nothing is queued or active; returns the finished requests' tokens not
    /// taken before. A request that failed is missing from the map.
    pub fn run_to_completion(&mut self) -> Result<BTreeMap<RequestId, Vec<u32>>> {
        while !self.is_idle() {
            let events = self.step()?;
            if self.active.is_empty() && !self.queue.is_empty() && events.is_empty() {
                return Err(Error::InvalidInput(
                    "queued requests cannot be admitted (the cache is too small)".into(),
                ));
            }
        }
        Ok(self.take_finished())
    }
}
