//! [`DecoderRunner`]: greedy generation for many requests at once over a paged latent
//! cache (continuous batching), on the CPU ([`CpuPagedModel`]) or on a GPU
//! (`cuda::CudaPagedModel`, feature `cuda`).
//!
//! ```text
//! add_request(prompt)  PagedModel::prefill: contiguous materialized MLA over the prompt
//!                      → each layer's rows [c ; RoPE(k_pe)] into the paged cache
//!                      → first token (emitted by the next step)
//! step()               PagedModel::decode: every active request's last token, one batch,
//!                      each row at its own position, absorbed attention over the blocks
//! ```
//!
//! The runner owns the scheduling (admission, who decodes, when a request ends); the
//! [`PagedModel`] owns the math and the cache. Requests added between steps join the
//! next step's batch. A request finishes after `max_new` tokens or after emitting one
//! of its stop tokens (the stop token is part of its output); its blocks go back to the
//! cache at once.
//!
//! # Admission
//!
//! A request is admitted only if the blocks it could ever need
//! (`ceil((prompt + max_new − 1) / block_size)`) fit in the free blocks left after
//! every active request's remaining worst case. So [`DecoderRunner::step`] never runs
//! out of blocks, and a request that does not fit fails in
//! [`DecoderRunner::add_request`] with [`Error::CacheFull`], leaving the others as
//! they were.
//!
//! ```no_run
//! use mla_attention::{io::Checkpoint, runner::{DecoderRunner, RunnerConfig}};
//! let ckpt = Checkpoint::open("deepseek-v2-dense-dir")?;
//! let cfg = RunnerConfig { block_size: 16, num_blocks: 256 };
//! let mut runner: DecoderRunner = DecoderRunner::load(&ckpt.spec, ckpt.weights.as_ref(), cfg)?;
//! let a = runner.add_request(vec![1, 2, 3], 8, vec![2])?;
//! runner.step()?;
//! let b = runner.add_request(vec![1, 5], 4, vec![])?; // joins the next step
//! let out = runner.run_to_completion()?;
//! println!("{:?} {:?}", out[&a], out[&b]);
//! # Ok::<(), mla_attention::Error>(())
//! ```

pub(crate) mod cpu;
pub mod layers;

use std::collections::BTreeMap;

pub use cpu::CpuPagedModel;
pub use layers::RunnerLayer;

use crate::cache::{LatentElem, SeqId};
use crate::error::{Error, Result};

/// A request handle, unique within one runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Paged cache geometry of a [`DecoderRunner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool (each holds `block_size` tokens of every layer).
    pub num_blocks: usize,
}

/// A decoder whose MLA layers keep their latents in a paged cache: what a
/// [`DecoderRunner`] schedules. Implementations: [`CpuPagedModel`] and, with feature
/// `cuda`, `cuda::CudaPagedModel`.
pub trait PagedModel {
    fn block_size(&self) -> usize;
    fn num_blocks(&self) -> usize;
    fn free_blocks(&self) -> usize;
    fn used_blocks(&self) -> usize;
    /// Blocks `seq` holds now (0 for an unknown sequence).
    fn held_blocks(&self, seq: SeqId) -> usize;
    fn num_sequences(&self) -> usize;
    /// Bytes one cached token costs over all layers.
    fn bytes_per_token(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Run `prompt` (non-empty, ids checked) into a new sequence of the cache; its id
    /// and the greedy next token. On error the cache is as before.
    fn prefill(&mut self, prompt: &[u32]) -> Result<(SeqId, u32)>;
    /// Tokens cached for `seq`.
    fn tokens(&self, seq: SeqId) -> Result<usize>;
    /// Drop `seq`'s rows beyond `tokens` in every layer (undoing a failed step).
    fn rollback(&mut self, seq: SeqId, tokens: usize) -> Result<()>;
    /// Feed `tokens[b]` (ids checked) to `seqs[b]` (distinct), which hold `pos[b]` tokens;
    /// the greedy next tokens. On error the caller rolls the sequences back.
    fn decode_step(&mut self, tokens: &[u32], seqs: &[SeqId], pos: &[usize]) -> Result<Vec<u32>>;
    /// Give `seq`'s blocks back.
    fn free(&mut self, seq: SeqId) -> Result<()>;
}

/// One admitted, unfinished request.
#[derive(Debug, Clone)]
struct Request {
    id: RequestId,
    seq: SeqId,
    /// Blocks it may ever hold (its admission reservation).
    max_blocks: usize,
    max_new: usize,
    stop: Vec<u32>,
    generated: Vec<u32>,
    /// The prefill's token, not yet emitted by a step.
    first_pending: bool,
}

impl Request {
    fn is_done(&self) -> bool {
        self.generated.len() >= self.max_new
            || self.generated.last().is_some_and(|t| self.stop.contains(t))
    }
}

/// Greedy continuous batching over a [`PagedModel`] (see the [module docs](self)).
/// `DecoderRunner` alone is the CPU runner with an f32 cache.
pub struct DecoderRunner<M: PagedModel = CpuPagedModel<f32>> {
    model: M,
    /// Admission order.
    active: Vec<Request>,
    finished: BTreeMap<RequestId, Vec<u32>>,
    next_id: u64,
}

impl<M: PagedModel> std::fmt::Debug for DecoderRunner<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderRunner")
            .field("active", &self.active.len())
            .field("free_blocks", &self.model.free_blocks())
            .field("num_blocks", &self.model.num_blocks())
            .finish()
    }
}

/// Index of the largest value (the first of equal ones).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

impl<T: LatentElem> DecoderRunner<CpuPagedModel<T>> {
    /// A CPU runner for a stock DeepSeek-V2 (dense MLP) checkpoint
    /// ([`CpuPagedModel::load`]).
    pub fn load(
        spec: &crate::config::ModelSpec,
        w: &dyn crate::io::WeightSource,
        config: RunnerConfig,
    ) -> Result<Self> {
        Ok(Self::new(CpuPagedModel::load(spec, w, config)?))
    }

    /// A CPU runner from a decoder and its layers' MLA attention
    /// ([`CpuPagedModel::from_parts`]).
    pub fn from_parts(
        decoder: crate::model::Decoder,
        attns: Vec<crate::mla::MlaAttention>,
        config: RunnerConfig,
    ) -> Result<Self> {
        Ok(Self::new(CpuPagedModel::from_parts(
            decoder, attns, config,
        )?))
    }

    pub fn decoder(&self) -> &crate::model::Decoder {
        self.model.decoder()
    }

    pub fn cache(&self) -> &crate::cache::LatentPagedCache<T> {
        self.model.cache()
    }
}

impl<M: PagedModel> DecoderRunner<M> {
    pub fn new(model: M) -> Self {
        DecoderRunner {
            model,
            active: Vec::new(),
            finished: BTreeMap::new(),
            next_id: 0,
        }
    }

    pub fn model(&self) -> &M {
        &self.model
    }

    /// Bytes one cached token costs over all layers.
    pub fn cache_bytes_per_token(&self) -> usize {
        self.model.bytes_per_token()
    }

    pub fn free_blocks(&self) -> usize {
        self.model.free_blocks()
    }

    pub fn used_blocks(&self) -> usize {
        self.model.used_blocks()
    }

    /// Free blocks not promised to active requests' remaining tokens: what a new
    /// request may take.
    pub fn admittable_blocks(&self) -> usize {
        self.model
            .free_blocks()
            .saturating_sub(self.reserved_blocks())
    }

    /// Unfinished requests.
    pub fn num_active(&self) -> usize {
        self.active.len()
    }

    /// Tokens generated so far by an unfinished or finished (not yet taken) request.
    pub fn generated(&self, id: RequestId) -> Option<&[u32]> {
        self.active
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.generated.as_slice())
            .or_else(|| self.finished.get(&id).map(Vec::as_slice))
    }

    /// Finished requests' outputs, removed from the runner.
    pub fn take_finished(&mut self) -> BTreeMap<RequestId, Vec<u32>> {
        std::mem::take(&mut self.finished)
    }

    /// Blocks the active requests may still allocate.
    fn reserved_blocks(&self) -> usize {
        self.active
            .iter()
            .map(|r| r.max_blocks.saturating_sub(self.model.held_blocks(r.seq)))
            .sum()
    }

    /// Admit a request: prefill `prompt` into the paged cache and compute the first
    /// greedy token, which the next [`Self::step`] emits. Fails with
    /// [`Error::CacheFull`] if its worst case (`prompt + max_new − 1` tokens) does not
    /// fit beside the active requests'; on any error the runner is unchanged.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        max_new: usize,
        stop: Vec<u32>,
    ) -> Result<RequestId> {
        if prompt.is_empty() || max_new == 0 {
            return Err(Error::InvalidInput(format!(
                "a request needs a prompt and max_new > 0, got {} prompt tokens, max_new {max_new}",
                prompt.len()
            )));
        }
        let vocab = self.model.vocab_size();
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let bs = self.model.block_size();
        let max_blocks = (prompt.len() + max_new - 1).div_ceil(bs);
        let avail = self.admittable_blocks();
        if max_blocks > avail {
            return Err(Error::CacheFull {
                layer: 0,
                needed_blocks: max_blocks,
                free_blocks: avail,
                total_blocks: self.model.num_blocks(),
            });
        }
        let (seq, first) = self.model.prefill(&prompt)?;
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.active.push(Request {
            id,
            seq,
            max_blocks,
            max_new,
            stop,
            generated: vec![first],
            first_pending: true,
        });
        Ok(id)
    }

    /// One greedy token for every active request, in admission order. Requests
    /// admitted since the last step emit their prefill token; the others decode one
    /// token together as one batch, each at its own position. Finished requests free
    /// their blocks. On error no request has advanced.
    pub fn step(&mut self) -> Result<Vec<(RequestId, u32)>> {
        let decoding: Vec<usize> = (0..self.active.len())
            .filter(|&i| !self.active[i].first_pending)
            .collect();
        let next = if decoding.is_empty() {
            Vec::new()
        } else {
            let seqs: Vec<SeqId> = decoding.iter().map(|&i| self.active[i].seq).collect();
            let last: Vec<u32> = decoding
                .iter()
                .map(|&i| {
                    *self.active[i]
                        .generated
                        .last()
                        .expect("one token at admission")
                })
                .collect();
            self.decode(&last, &seqs)?
        };
        for (&i, &t) in decoding.iter().zip(&next) {
            self.active[i].generated.push(t);
        }
        let mut out = Vec::with_capacity(self.active.len());
        for r in &mut self.active {
            r.first_pending = false;
            out.push((r.id, *r.generated.last().expect("one token at admission")));
        }
        let mut kept = Vec::with_capacity(self.active.len());
        for r in std::mem::take(&mut self.active) {
            if r.is_done() {
                self.model.free(r.seq)?;
                self.finished.insert(r.id, r.generated);
            } else {
                kept.push(r);
            }
        }
        self.active = kept;
        Ok(out)
    }

    /// Feed `tokens[b]` to `seqs[b]`; the greedy next tokens. All or nothing: on error
    /// every sequence is rolled back to where it was.
    fn decode(&mut self, tokens: &[u32], seqs: &[SeqId]) -> Result<Vec<u32>> {
        let vocab = self.model.vocab_size();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let pos: Vec<usize> = seqs
            .iter()
            .map(|&s| self.model.tokens(s))
            .collect::<Result<_>>()?;
        self.model.decode_step(tokens, seqs, &pos).or_else(|e| {
            for (&s, &p) in seqs.iter().zip(&pos) {
                self.model.rollback(s, p)?;
            }
            Err(e)
        })
    }

    /// Step until no request is active; returns every finished request's tokens not
    /// taken before (see [`Self::take_finished`]).
    pub fn run_to_completion(&mut self) -> Result<BTreeMap<RequestId, Vec<u32>>> {
        while !self.active.is_empty() {
            self.step()?;
        }
        Ok(self.take_finished())
    }
}
