//! Absorbed MLA decode over a [`LatentPagedCache`](crate::cache::LatentPagedCache),
//! split-KV ("flash-decoding") with an online softmax, parallel with rayon.
//!
//! For sequence `b`, head `h`, with absorbed query `q̃_h ∈ ℝʳ`, RoPE query
//! `q_pe,h ∈ ℝ^{d_rope}` and cached rows `[c_s ; k_pe,s]`, `s < T_b`:
//!
//! ```text
//! score_s = (q̃_h·c_s + q_pe,h·k_pe,s)·scale
//! õ_h     = Σ_s softmax(score)_s c_s                          ∈ ℝʳ
//! ```
//!
//! Every head's key is the whole cached row and its query `[q̃_h ; q_pe,h]`, so this is the
//! paged attention of [`super::attend`] (split-KV online softmax, the splits merged by
//! log-sum-exp) with value `c_s`; heads of a task share each row they read (MQA: one
//! cached row serves every head). The CUDA kernel follows the same two passes (one thread
//! block per task, then a combine kernel), so this is also its CPU twin.

use crate::cache::{LatentElem, LayerBlocks, SeqView};
use crate::error::{Error, Result};

/// Tuning knobs of [`absorbed_decode`]. Results do not depend on them beyond f32
/// rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeParams {
    /// Rows per split (per task). Smaller splits give more parallelism on long,
    /// few sequences; larger ones fewer partials to merge.
    pub split_tokens: usize,
    /// Heads per task; they share every row the task reads.
    pub heads_per_task: usize,
}

impl Default for DecodeParams {
    /// Untuned defaults: 256-row splits, 8 heads per task.
    fn default() -> Self {
        DecodeParams {
            split_tokens: 256,
            heads_per_task: 8,
        }
    }
}

/// Queries of one decode step of one layer, for a batch of sequences.
#[derive(Debug, Clone, Copy)]
pub struct DecodeQuery<'a> {
    /// `(batch, num_heads, rank)`: `q̃_h = W_UK,hᵀ q_nope,h`.
    pub q_lat: &'a [f32],
    /// `(batch, num_heads, rope)`: RoPE'd `q_pe,h`.
    pub q_pe: &'a [f32],
    pub num_heads: usize,
    /// Softmax scale (`MlaSpec::softmax_scale`).
    pub scale: f32,
}

/// `õ (batch, num_heads, rank)` for every sequence in `seqs` (batch order). Each
/// sequence attends to its own `tokens` rows; lengths may differ but must be > 0.
pub fn absorbed_decode<T: LatentElem>(
    layer: &LayerBlocks<'_, T>,
    seqs: &[SeqView<'_>],
    query: &DecodeQuery<'_>,
    params: &DecodeParams,
) -> Result<Vec<f32>> {
    let mut out = vec![0.0; seqs.len() * query.num_heads * layer.width.rank];
    absorbed_decode_into(layer, seqs, query, params, &mut out)?;
    Ok(out)
}

/// Check shapes and block tables before any work.
fn check(
    layer: &LayerBlocks<'_, impl Sized>,
    seqs: &[SeqView<'_>],
    q: &DecodeQuery<'_>,
    params: &DecodeParams,
    out_len: usize,
) -> Result<()> {
    let (b, nh) = (seqs.len(), q.num_heads);
    let (r, dr) = (layer.width.rank, layer.width.rope);
    for (what, got, per) in [
        ("q_lat", q.q_lat.len(), r),
        ("q_pe", q.q_pe.len(), dr),
        ("output", out_len, r),
    ] {
        if got != b * nh * per {
            return Err(Error::WidthMismatch {
                layer: layer.layer,
                what,
                got,
                expected: b * nh * per,
            });
        }
    }
    if nh == 0 || params.split_tokens == 0 || params.heads_per_task == 0 {
        return Err(Error::InvalidInput(format!(
            "decode needs num_heads, split_tokens, heads_per_task > 0: {nh}, {params:?}"
        )));
    }
    for (i, v) in seqs.iter().enumerate() {
        if v.tokens == 0 {
            return Err(Error::InvalidInput(format!(
                "layer {}: sequence {i} of the batch has no cached rows to attend to",
                layer.layer
            )));
        }
        layer.check(v)?;
    }
    Ok(())
}

/// [`absorbed_decode`] into `out (batch, num_heads, rank)`. On error `out` is
/// untouched.
pub fn absorbed_decode_into<T: LatentElem>(
    layer: &LayerBlocks<'_, T>,
    seqs: &[SeqView<'_>],
    query: &DecodeQuery<'_>,
    params: &DecodeParams,
    out: &mut [f32],
) -> Result<()> {
    check(layer, seqs, query, params, out.len())?;
    let (nh, r, dr) = (query.num_heads, layer.width.rank, layer.width.rope);
    // Each head's key is the whole cached row `[c ; k_pe]`: its query is `[q̃ ; q_pe]`.
    let mut q = Vec::with_capacity(seqs.len() * nh * (r + dr));
    for bh in 0..seqs.len() * nh {
        q.extend_from_slice(&query.q_lat[bh * r..][..r]);
        q.extend_from_slice(&query.q_pe[bh * dr..][..dr]);
    }
    let groups = balanced_groups(nh, params.heads_per_task);
    let attend = Attend {
        q: &q,
        num_heads: nh,
        key_dim: r + dr,
        value_dim: r,
        scale: query.scale,
        groups: &groups,
        split_tokens: params.split_tokens,
    };
    attend_paged(layer, seqs, &attend, out);
    Ok(())
}

use super::attend::{attend_paged, balanced_groups, Attend};
