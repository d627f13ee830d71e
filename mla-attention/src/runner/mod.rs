//! Paged models: a decoder whose attention layers keep their K/V state in a paged cache
//! ([`LatentPagedCache`](crate::cache::LatentPagedCache) on the CPU, `cuda::CudaLatentCache`
//! on a GPU), for every kind of checkpoint a user serves:
//!
//! - **original GQA** (Llama / Qwen2): the cached row of a layer is `[K ; V]` of every KV
//!   head, `2 · n_kv · head_dim` values, attention over the blocks ([`crate::cpu::gqa`]);
//! - **stock MLA** (`care-convert mla`, DeepSeek-V2 format): the row is `[c ; RoPE(k_pe)]`,
//!   decode absorbed in latent space ([`crate::cpu::PagedMlaLayer`]); any width, per-layer
//!   ranks;
//! - **one-shot low rank** (`care-convert convert`): the row is the latents; K/V are rebuilt
//!   per step.
//!
//! A [`PagedModel`] runs passes of any number of rows per sequence (a decode step is one
//! row; verifying a draft of `k` tokens is `1 + k` rows, causal among themselves) and hands
//! back the logits; the scheduling — who runs, drafts, verification, stop rules — is the
//! [`Engine`](crate::engine::Engine)'s, once for every model.

pub(crate) mod cpu;
pub mod layers;

use candle_core::Tensor;

pub use cpu::CpuPagedModel;
pub use layers::RunnerLayer;

pub use crate::cache::PassRows;
use crate::cache::SeqId;
use crate::error::Result;

/// Paged cache geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool (each holds `block_size` tokens of every layer).
    pub num_blocks: usize,
}

/// A decoder over a paged cache: what the [`Engine`](crate::engine::Engine) schedules.
/// Implementations: [`CpuPagedModel`] and, with feature `cuda`, `cuda::CudaPagedModel`.
pub trait PagedModel {
    fn block_size(&self) -> usize;
    fn num_blocks(&self) -> usize;
    fn free_blocks(&self) -> usize;
    fn used_blocks(&self) -> usize;
    /// Blocks `seq` holds now (0 for an unknown sequence).
    fn held_blocks(&self, seq: SeqId) -> usize;
    fn num_sequences(&self) -> usize;
    /// Bytes one cached token costs over all layers: `Σ_l width_l · bytes`.
    fn bytes_per_token(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Positions the model supports (prompt and generation).
    fn max_context(&self) -> usize;
    /// Most rows [`Self::forward`] takes for one sequence (1: no multi-row verification).
    fn max_segment_rows(&self) -> usize;
    /// A new sequence holding `tokens` (possibly none; ids checked). On error the cache is
    /// as before.
    fn prefill(&mut self, tokens: &[u32]) -> Result<SeqId>;
    /// Tokens cached for `seq`.
    fn tokens(&self, seq: SeqId) -> Result<usize>;
    /// Drop `seq`'s rows beyond `tokens` in every layer (rejected drafts, a failed pass).
    fn rollback(&mut self, seq: SeqId, tokens: usize) -> Result<()>;
    /// One pass: `segments[i]` (non-empty, ids checked) continues `seqs[i]` (distinct) and
    /// is cached; returns the logits of every row, `(Σ_i len_i, vocab)` f32, in order. Row
    /// `j` of a segment attends to its sequence's cache and to rows `0..=j` of the segment.
    /// All or nothing: on error every sequence is as before.
    fn forward(&mut self, seqs: &[SeqId], segments: &[&[u32]]) -> Result<Tensor>;
    /// Give `seq`'s blocks back.
    fn free(&mut self, seq: SeqId) -> Result<()>;
}

/// Checks a pass's arguments against a model: as many non-empty segments as distinct
/// sequences, ids in the vocabulary, segments within `max_rows`.
pub(crate) fn check_pass(
    seqs: &[SeqId],
    segments: &[&[u32]],
    vocab: usize,
    max_rows: usize,
) -> Result<()> {
    use crate::error::Error;
    if seqs.is_empty() || seqs.len() != segments.len() {
        return Err(Error::InvalidInput(format!(
            "a pass needs one segment per sequence, got {} segments for {} sequences",
            segments.len(),
            seqs.len()
        )));
    }
    crate::cache::pass::check_distinct(seqs, "a pass")?;
    for s in segments {
        if s.is_empty() || s.len() > max_rows {
            return Err(Error::InvalidInput(format!(
                "a segment of {} rows (this model takes 1 to {max_rows})",
                s.len()
            )));
        }
        if let Some(&bad) = s.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
    }
    Ok(())
}
