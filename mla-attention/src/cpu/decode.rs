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
//! The KV length is cut into splits of `split_tokens`. Each task `(b, head group,
//! split)` runs an online softmax over its rows, read straight from the blocks,
//! and writes a partial `(o_i = Σ p c / Σ p, lse_i = m + ln Σ e^{score − m})` per head.
//! A second pass merges a head's partials:
//!
//! ```text
//! LSE = M + ln Σ_i e^{lse_i − M},  M = max_i lse_i,     õ = Σ_i e^{lse_i − LSE} o_i
//! ```
//!
//! which is exactly the softmax over all rows. The CUDA kernel is meant to follow
//! the same two passes (one thread block per task, then a combine kernel), so this
//! is also its CPU twin. Heads of a group share each row they read (MQA: one cached
//! row serves every head).

use rayon::prelude::*;

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

/// A task: rows `tokens` of sequence `seq`, heads `heads`.
#[derive(Debug, Clone)]
struct Task {
    seq: usize,
    heads: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
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
    let (nh, r) = (query.num_heads, layer.width.rank);
    let g = params.heads_per_task.min(nh);
    // Tasks ordered (seq, group, split), so one head's partials are contiguous.
    let mut tasks = Vec::new();
    let mut first_task = Vec::with_capacity(seqs.len() * nh.div_ceil(g));
    for (seq, v) in seqs.iter().enumerate() {
        for h0 in (0..nh).step_by(g) {
            first_task.push(tasks.len());
            for t0 in (0..v.tokens).step_by(params.split_tokens) {
                tasks.push(Task {
                    seq,
                    heads: h0..(h0 + g).min(nh),
                    tokens: t0..(t0 + params.split_tokens).min(v.tokens),
                });
            }
        }
    }
    first_task.push(tasks.len());
    // Per task and head slot: o (r values), then lse.
    let slot = r + 1;
    let mut partials = vec![0.0f32; tasks.len() * g * slot];
    partials
        .par_chunks_mut(g * slot)
        .zip(&tasks)
        .for_each(|(dst, task)| split_partial(layer, &seqs[task.seq], query, task, dst));
    // Combine: one output row per (seq, head).
    let groups = nh.div_ceil(g);
    out.par_chunks_mut(r).enumerate().for_each(|(i, o)| {
        let (seq, h) = (i / nh, i % nh);
        let gi = seq * groups + h / g;
        let rows = (first_task[gi]..first_task[gi + 1])
            .map(|t| &partials[(t * g + h % g) * slot..][..slot]);
        merge_partials(rows, o);
    });
    Ok(())
}

/// Online softmax of `task`'s heads over its rows; writes `[o ; lse]` per head into
/// `dst` (`heads_per_task` slots of `rank + 1`).
fn split_partial<T: LatentElem>(
    layer: &LayerBlocks<'_, T>,
    view: &SeqView<'_>,
    q: &DecodeQuery<'_>,
    task: &Task,
    dst: &mut [f32],
) {
    let (r, dr, bs) = (layer.width.rank, layer.width.rope, layer.block_size);
    let w = r + dr;
    let slot = r + 1;
    let heads = task.heads.len();
    let mut max = vec![f32::NEG_INFINITY; heads];
    let mut sum = vec![0.0f32; heads];
    dst.fill(0.0);
    let mut scratch = Vec::new();
    let mut t = task.tokens.start;
    while t < task.tokens.end {
        // The run of rows of this split inside one block.
        let (blk, off) = (t / bs, t % bs);
        let n = (bs - off).min(task.tokens.end - t);
        let rows = &layer.rows(view.blocks[blk], off + n)[off * w..];
        for row in rows.chunks_exact(w) {
            let row = T::row_as_f32(row, &mut scratch);
            let (c, k_pe) = row.split_at(r);
            for (j, h) in task.heads.clone().enumerate() {
                let bh = task.seq * q.num_heads + h;
                let q_lat = &q.q_lat[bh * r..][..r];
                let q_pe = &q.q_pe[bh * dr..][..dr];
                let score = (dot(q_lat, c) + dot(q_pe, k_pe)) * q.scale;
                let acc = &mut dst[j * slot..][..r];
                online_softmax_row(score, c, &mut max[j], &mut sum[j], acc);
            }
        }
        t += n;
    }
    for j in 0..heads {
        let s = &mut dst[j * slot..][..slot];
        let inv = 1.0 / sum[j];
        s[..r].iter_mut().for_each(|a| *a *= inv);
        s[r] = max[j] + sum[j].ln();
    }
}

/// Merge split partials `[o_i ; lse_i]` of one head into `out` by log-sum-exp.
fn merge_partials<'a>(parts: impl Iterator<Item = &'a [f32]> + Clone, out: &mut [f32]) {
    let r = out.len();
    let m = parts
        .clone()
        .map(|p| p[r])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    out.fill(0.0);
    for p in parts {
        let wgt = (p[r] - m).exp();
        total += wgt;
        out.iter_mut()
            .zip(&p[..r])
            .for_each(|(o, &v)| *o += wgt * v);
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}

use super::gqa::{dot8 as dot, online_softmax_row};
