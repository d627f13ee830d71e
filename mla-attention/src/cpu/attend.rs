//! The one CPU attention over the paged cache, for both kinds of cached rows: an original
//! GQA layer's `[K ; V]` (a KV head's key and value are two slices of the row) and an MLA
//! layer's `[c ; k_pe]` (every head's key is the whole row, its value the latent `c`).
//!
//! Split-KV ("flash-decoding"): a row's keys are cut into splits of `split_tokens` at
//! absolute positions; each task `(query row, split)` runs an online softmax for every
//! head over its keys (each cached row read from memory once, for all heads) and writes a
//! partial `(o_i = Σ p v / Σ p, lse_i = m + ln Σ e^{s − m})` per
//! head; a second pass merges a head's partials in split order:
//!
//! ```text
//! LSE = M + ln Σ_i e^{lse_i − M},  M = max_i lse_i,     o = Σ_i e^{lse_i − LSE} o_i
//! ```
//!
//! Inside a split, keys are taken in tiles of one vector's lanes (8 with AVX2, 16 with
//! AVX-512; tiles start at block starts and every tile after; a block's last rows that do not
//! fill a tile are taken one by one): the tile's scores are computed together (independent
//! running sums over the head dimension, summed across lanes together), the running maximum
//! is updated once per tile, the tile's weights come from one vector `e^x`, and the values
//! are accumulated with the accumulator held in registers across the tile. Every split, tile and
//! summation boundary is a function of the row's own positions only, so a query row gets the
//! same bits alone in a decode step or inside a verify pass beside its drafts and other
//! sequences — which is what makes greedy drafting equal plain greedy decoding.

use std::ops::Range;

use rayon::prelude::*;

use half::bf16;

use crate::cache::{AnyLayerBlocks, LatentElem, LayerBlocks, SeqView};
use crate::simd::{self, Isa, Lanes, Portable};

/// Heads that read the same slices of every cached row: their key at `key` and value at
/// `value` (offsets into the row).
#[derive(Debug, Clone)]
pub(crate) struct HeadGroup {
    pub heads: Range<usize>,
    pub key: usize,
    pub value: usize,
}

/// The queries of one pass and how they read the cached rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attend<'a> {
    /// `(rows, num_heads, key_dim)`.
    pub q: &'a [f32],
    pub num_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub scale: f32,
    /// Every head in exactly one group.
    pub groups: &'a [HeadGroup],
    pub split_tokens: usize,
}

/// A task: every head of query row `row` over keys `tokens` (each cached row is read once
/// for all heads).
struct Task {
    row: usize,
    tokens: Range<usize>,
}

/// `out (rows, num_heads, value_dim)`: each query row `r` attends to the first
/// `views[r].tokens` rows of its blocks. The caller has checked shapes and block tables
/// (each view non-empty and inside `layer`).
pub(crate) fn attend_paged<T: LatentElem>(
    layer: &LayerBlocks<'_, T>,
    views: &[SeqView<'_>],
    a: &Attend<'_>,
    out: &mut [f32],
) {
    match T::erase(*layer) {
        AnyLayerBlocks::F32(l) => attend_f32(&l, views, a, out),
        AnyLayerBlocks::Bf16(l) => attend_bf16(&l, views, a, out),
    }
}

// Not generic, so compiled here at this crate's optimization level (a test or bench crate
// built at opt-level 1 would otherwise instantiate the loops itself, ~3x slower).
#[inline(never)]
fn attend_f32(
    layer: &LayerBlocks<'_, f32>,
    views: &[SeqView<'_>],
    a: &Attend<'_>,
    out: &mut [f32],
) {
    attend_typed(layer, views, a, out)
}

#[inline(never)]
fn attend_bf16(
    layer: &LayerBlocks<'_, bf16>,
    views: &[SeqView<'_>],
    a: &Attend<'_>,
    out: &mut [f32],
) {
    attend_typed(layer, views, a, out)
}

fn attend_typed<T: LatentElem>(
    layer: &LayerBlocks<'_, T>,
    views: &[SeqView<'_>],
    a: &Attend<'_>,
    out: &mut [f32],
) {
    let (nh, dv) = (a.num_heads, a.value_dim);
    let slot = dv + 1;
    let split = a.split_tokens.max(1);
    // Tasks ordered (row, split): a row's partials are contiguous.
    let mut tasks = Vec::new();
    let mut first = Vec::with_capacity(views.len() + 1);
    for (row, v) in views.iter().enumerate() {
        first.push(tasks.len());
        for t0 in (0..v.tokens).step_by(split) {
            tasks.push(Task {
                row,
                tokens: t0..(t0 + split).min(v.tokens),
            });
        }
    }
    first.push(tasks.len());
    let isa = simd::isa();
    let mut partials = vec![0.0f32; tasks.len() * nh * slot];
    partials
        .par_chunks_mut(nh * slot)
        .zip(&tasks)
        .for_each(|(dst, task)| {
            let split = Split {
                layer,
                view: &views[task.row],
                tokens: task.tokens.clone(),
                q: &a.q[task.row * nh * a.key_dim..][..nh * a.key_dim],
                a,
            };
            // SAFETY: the instruction set was detected; `fold` reads rows inside `layer`
            // (checked by the caller) and writes inside `dst`.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => fold_avx512(&split, dst),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2Fma => fold_avx2(&split, dst),
                    _ => fold::<T, Portable, 8>(&split, dst),
                }
            }
        });
    out.par_chunks_mut(dv).enumerate().for_each(|(i, o)| {
        let (row, h) = (i / nh, i % nh);
        merge(
            (first[row]..first[row + 1]).map(|t| &partials[(t * nh + h) * slot..][..slot]),
            o,
        );
    });
}

/// One task's inputs.
struct Split<'s, 'a, T> {
    layer: &'s LayerBlocks<'a, T>,
    view: &'s SeqView<'a>,
    tokens: Range<usize>,
    /// The row's queries, `(num_heads, key_dim)`.
    q: &'s [f32],
    a: &'s Attend<'s>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fold_avx512<T: LatentElem>(s: &Split<'_, '_, T>, dst: &mut [f32]) {
    fold::<T, simd::Avx512, 16>(s, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fold_avx2<T: LatentElem>(s: &Split<'_, '_, T>, dst: &mut [f32]) {
    fold::<T, simd::Avx2, 8>(s, dst)
}

/// The running softmax of a task's heads.
struct Running<'d> {
    max: Vec<f32>,
    sum: Vec<f32>,
    /// `(heads, value_dim + 1)`: the accumulator, then room for the lse.
    dst: &'d mut [f32],
}

/// Online softmax of the split's heads over its rows into `dst` (`[o ; lse]` per head), in
/// tiles of `TILE` keys (one vector of lanes).
#[inline(always)]
unsafe fn fold<T: LatentElem, L: Lanes, const TILE: usize>(s: &Split<'_, '_, T>, dst: &mut [f32]) {
    let (layer, a) = (s.layer, s.a);
    let w = layer.width.width();
    let bs = layer.block_size;
    let heads = a.num_heads;
    let slot = a.value_dim + 1;
    dst.fill(0.0);
    let mut st = Running {
        max: vec![f32::NEG_INFINITY; heads],
        sum: vec![0.0; heads],
        dst,
    };
    let mut scratch = Vec::new();
    let mut t = s.tokens.start;
    while t < s.tokens.end {
        // The run of this split's rows inside one block.
        let (blk, off) = (t / bs, t % bs);
        let n = (bs - off).min(s.tokens.end - t);
        let raw = &layer.rows(s.view.blocks[blk], off + n)[off * w..];
        let rows = T::row_as_f32(raw, &mut scratch);
        let mut i = 0;
        while i + TILE <= n {
            for g in a.groups {
                tile::<L, TILE>(&rows[i * w..(i + TILE) * w], w, s, g, &mut st);
            }
            i += TILE;
        }
        while i < n {
            for g in a.groups {
                tile::<L, 1>(&rows[i * w..(i + 1) * w], w, s, g, &mut st);
            }
            i += 1;
        }
        t += n;
    }
    for j in 0..heads {
        let o = &mut st.dst[j * slot..][..slot];
        let inv = 1.0 / st.sum[j];
        o[..a.value_dim].iter_mut().for_each(|x| *x *= inv);
        o[a.value_dim] = st.max[j] + st.sum[j].ln();
    }
}

/// Fold `M` consecutive cached rows (`rows`, `M × w`) into every head of `group`.
#[inline(always)]
unsafe fn tile<L: Lanes, const M: usize>(
    rows: &[f32],
    w: usize,
    s: &Split<'_, '_, impl Sized>,
    group: &HeadGroup,
    st: &mut Running<'_>,
) {
    let a = s.a;
    let (dk, dv) = (a.key_dim, a.value_dim);
    let (ko, vo) = (group.key, group.value);
    let kc = dk / L::N * L::N;
    let vc = dv / L::N * L::N;
    let slot = dv + 1;
    let r = rows.as_ptr();
    for j in group.heads.clone() {
        let q = &s.q[j * dk..][..dk];
        // Scores: one running sum per key over the lanes, then the tail.
        let mut acc = [L::zero(); M];
        let mut c = 0;
        while c < kc {
            // SAFETY: c + N <= kc <= dk; key slices lie inside each row (ko + dk <= w).
            let qv = L::load(q.as_ptr().add(c));
            for (t, at) in acc.iter_mut().enumerate() {
                *at = L::fma(qv, L::load(r.add(t * w + ko + c)), *at);
            }
            c += L::N;
        }
        let mut score = [0f32; M];
        L::sums(&acc, &mut score);
        for (t, sc) in score.iter_mut().enumerate() {
            let key = &rows[t * w + ko..][..dk];
            let mut tail = 0f32;
            for i in kc..dk {
                tail += q[i] * key[i];
            }
            *sc = (*sc + tail) * a.scale;
        }
        let top = score.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let o = &mut st.dst[j * slot..][..dv];
        if top > st.max[j] {
            // e^{-inf} = 0: the first tile rescales the zero accumulator to zero.
            let corr = simd::exp_neg(st.max[j] - top);
            st.sum[j] *= corr;
            let cv = L::splat(corr);
            let mut c = 0;
            while c < vc {
                // SAFETY: c + N <= vc <= dv = o.len().
                L::store(
                    o.as_mut_ptr().add(c),
                    L::mul(L::load(o.as_ptr().add(c)), cv),
                );
                c += L::N;
            }
            o[vc..].iter_mut().for_each(|x| *x *= corr);
            st.max[j] = top;
        }
        let mut p = [0f32; M];
        if M == L::N {
            // s − max in one rounding (1 · s − max), then e^x on the lanes.
            let x = L::fma(L::splat(1.0), L::load(score.as_ptr()), L::splat(-st.max[j]));
            L::store(p.as_mut_ptr(), L::exp_neg(x));
        } else {
            for (pt, &sc) in p.iter_mut().zip(&score) {
                *pt = simd::exp_neg(sc - st.max[j]);
            }
        }
        for &pt in &p {
            st.sum[j] += pt;
        }
        // Values: the accumulator stays in a register across the tile's rows.
        let pv: [L::V; M] = std::array::from_fn(|t| L::splat(p[t]));
        let mut c = 0;
        while c < vc {
            // SAFETY: c + N <= vc <= dv; value slices lie inside each row (vo + dv <= w).
            let mut x = L::load(o.as_ptr().add(c));
            for (t, &pt) in pv.iter().enumerate() {
                x = L::fma(pt, L::load(r.add(t * w + vo + c)), x);
            }
            L::store(o.as_mut_ptr().add(c), x);
            c += L::N;
        }
        for i in vc..dv {
            for (t, &pt) in p.iter().enumerate() {
                o[i] += pt * rows[t * w + vo + i];
            }
        }
    }
}

/// Merge split partials `[o_i ; lse_i]` of one head into `out` by log-sum-exp, in order.
fn merge<'p>(parts: impl Iterator<Item = &'p [f32]> + Clone, out: &mut [f32]) {
    let dv = out.len();
    let m = parts
        .clone()
        .map(|p| p[dv])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    out.fill(0.0);
    for p in parts {
        let wgt = (p[dv] - m).exp();
        total += wgt;
        out.iter_mut()
            .zip(&p[..dv])
            .for_each(|(o, &v)| *o += wgt * v);
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `heads` split into groups of at most `per_group` heads of near-equal size, each reading
/// the key and value at offset 0 (MLA: every head reads the whole row).
pub(crate) fn balanced_groups(heads: usize, per_group: usize) -> Vec<HeadGroup> {
    let per = per_group.max(1);
    let n = heads.div_ceil(per).max(1);
    (0..n)
        .map(|i| HeadGroup {
            heads: (i * heads / n)..((i + 1) * heads / n),
            key: 0,
            value: 0,
        })
        .collect()
}
