//! Decoupled RoPE for one layer: RoRoPE with FreqFold (TransMLA's partial-RoPE step,
//! CARE §1.6 step B), written from the math, not from their code.
//!
//! # Math
//!
//! Keys are in the Hugging Face half layout: head `h` (of `g` KV heads, width `d`, `P = d/2`
//! frequencies) rotates the pair `(k_h[j], k_h[j+P])` with frequency `ω_j = θ^(−j/P)`.
//! An orthogonal mix `U` of the pairs of *one* frequency across heads commutes with that
//! frequency's rotation, so `Σ_j q_jᵀ R(Δω) k_j = Σ_m q̃_mᵀ R(Δω) k'_m` with `k'_m = Σ U[·,m] k`
//! and `q̃_m = Σ U[·,m] q`. PCA of the pairs (real and imaginary parts are separate samples)
//! puts most of the key energy into the first components; those keep RoPE and become the one
//! shared `k_pe`, the rest lose it (NoPE) — the lossy step.
//!
//! With a RoPE width `d_rope = 2R < d`, pair `p` of the DeepSeek key rotates with
//! `θ^(−p/R)` = original frequency `j = p·c`, `c = P/R` (exact for the same θ). FreqFold
//! groups `F` adjacent frequencies (a multiple of `c`) into one block, does one PCA over
//! `g·F` pair features, and gives the block's `F/c` top components the block's `F/c`
//! DeepSeek frequencies — exact only if the block's frequencies were equal, hence the name.
//!
//! Everything is computed from the input second moment `C` (the covariance of `k = W_K x`
//! is `W_K C W_Kᵀ`); no second calibration pass is needed.
#![allow(non_snake_case)]

use faer::{Mat, MatRef, Side};

use crate::error::{Error, Result};

/// How the key's position information is split off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RopeSplitOptions {
    /// `d_rope`: width of the shared RoPE key (even, ≤ head_dim, `head_dim/d_rope` integer).
    pub rope_dim: usize,
    /// Adjacent frequencies per PCA block (a multiple of `head_dim / d_rope`, dividing
    /// `head_dim / 2`). The smallest legal value is the most exact.
    pub freqfold: usize,
    /// `false`: no PCA — each block keeps, per output pair, the single (head, frequency)
    /// pair with the most energy (the MHA2MLA-style partial-RoPE choice restricted to
    /// one shared key). `true`: RoRoPE.
    pub pca: bool,
}

/// The layer's keys re-expressed: `k_h = Σ_m U_h[·,m] k'_m`, split into the shared RoPE key
/// and the NoPE remainder, plus what the query side needs.
#[derive(Debug, Clone)]
pub struct RopeSplit {
    /// `[d_rope, hidden]`: rows `2p, 2p+1` are the (re, im) of DeepSeek pair `p` (interleaved).
    pub k_pe: Mat<f64>,
    /// `[g·d, hidden]`: per KV head, the NoPE part of its key in the original coordinates
    /// (`k_h − rope part`); rank `g·d − d_rope`.
    pub k_nope: Mat<f64>,
    /// `[g·d, d_rope]`: how head `h`'s original key coordinates read the rope components:
    /// `k_h(rope part)[j] = Σ_p coef[h·d+j, p]·k_pe[p]` — the query side uses its transpose.
    pub rope_coef: Mat<f64>,
    /// Fraction of the calibrated key energy that stays in the RoPE part.
    pub rope_energy: f64,
}

/// Check the options against the head width; the errors say what is legal.
pub fn validate(opts: &RopeSplitOptions, head_dim: usize) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidOption(m));
    let r = opts.rope_dim;
    if r == 0 || !r.is_multiple_of(2) {
        return bad(format!("--rope-dim {r} must be even and positive"));
    }
    if r > head_dim {
        return bad(format!(
            "--rope-dim {r} is larger than the head dimension {head_dim}"
        ));
    }
    let p = head_dim / 2;
    if !p.is_multiple_of(r / 2) {
        return bad(format!(
            "--rope-dim {r}: head_dim/2 = {p} must be a multiple of rope_dim/2 = {} \
             so every RoPE pair keeps an original frequency",
            r / 2
        ));
    }
    let c = p / (r / 2);
    let f = opts.freqfold;
    if f == 0 || !f.is_multiple_of(c) || !p.is_multiple_of(f) {
        return bad(format!(
            "--freqfold {f} must be a multiple of head_dim/rope_dim = {c} that divides \
             head_dim/2 = {p} (try {c})"
        ));
    }
    Ok(())
}

/// Split layer keys `W_K` `[g·d, hidden]` (HF half layout) given the input second moment `C`.
pub fn split_rope(
    W_K: MatRef<'_, f64>,
    C: MatRef<'_, f64>,
    num_kv_heads: usize,
    head_dim: usize,
    opts: &RopeSplitOptions,
) -> Result<RopeSplit> {
    validate(opts, head_dim)?;
    let (g, d) = (num_kv_heads, head_dim);
    if W_K.nrows() != g * d || W_K.ncols() != C.nrows() || C.nrows() != C.ncols() {
        return Err(Error::InvalidOption(format!(
            "key weight [{}, {}] does not match {g} KV heads × {d} and statistics [{}, {}]",
            W_K.nrows(),
            W_K.ncols(),
            C.nrows(),
            C.ncols()
        )));
    }
    let hidden = W_K.ncols();
    let p_half = d / 2;
    let n_pairs = opts.rope_dim / 2;
    let c = p_half / n_pairs;
    let fold = opts.freqfold;
    let per_block = fold / c;
    let blocks = p_half / fold;

    // Energy of the original keys, for the report.
    let KC = W_K * C;
    let total_energy: f64 = (0..g * d)
        .map(|i| (0..hidden).map(|k| KC[(i, k)] * W_K[(i, k)]).sum::<f64>())
        .sum();

    let mut k_pe = Mat::<f64>::zeros(opts.rope_dim, hidden);
    let mut rope_coef = Mat::<f64>::zeros(g * d, opts.rope_dim);
    let mut rope_energy = 0.0;
    for b in 0..blocks {
        // Features (h, j) of this block; real rows h·d+j, imaginary rows h·d+j+P.
        let feats: Vec<(usize, usize)> = (0..g)
            .flat_map(|h| (b * fold..(b + 1) * fold).map(move |j| (h, j)))
            .collect();
        let n = feats.len();
        let re = Mat::from_fn(n, hidden, |i, k| {
            let (h, j) = feats[i];
            W_K[(h * d + j, k)]
        });
        let im = Mat::from_fn(n, hidden, |i, k| {
            let (h, j) = feats[i];
            W_K[(h * d + j + p_half, k)]
        });
        let M = &re * C * re.transpose() + &im * C * im.transpose();
        let U = if opts.pca {
            let eig = M
                .self_adjoint_eigen(Side::Lower)
                .map_err(|_| Error::InvalidOption("eigendecomposition of key pairs".into()))?;
            // faer: ascending eigenvalues; we want descending columns.
            let u = eig.U();
            Mat::from_fn(n, n, |i, m| u[(i, n - 1 - m)])
        } else {
            // A permutation: features by decreasing energy.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&x, &y| M[(y, y)].total_cmp(&M[(x, x)]));
            Mat::from_fn(n, n, |i, m| if order[m] == i { 1.0 } else { 0.0 })
        };
        for s in 0..per_block {
            let pair = b * per_block + s;
            for k in 0..hidden {
                let (mut vr, mut vi) = (0.0, 0.0);
                for i in 0..n {
                    vr += U[(i, s)] * re[(i, k)];
                    vi += U[(i, s)] * im[(i, k)];
                }
                k_pe[(2 * pair, k)] = vr;
                k_pe[(2 * pair + 1, k)] = vi;
            }
            for (i, &(h, j)) in feats.iter().enumerate() {
                rope_coef[(h * d + j, 2 * pair)] = U[(i, s)];
                rope_coef[(h * d + j + p_half, 2 * pair + 1)] = U[(i, s)];
            }
            let col = Mat::from_fn(n, 1, |i, _| U[(i, s)]);
            rope_energy += (col.transpose() * &M * &col)[(0, 0)];
        }
    }
    // NoPE part in original coordinates: W_K − coef·k_pe.
    let k_nope = W_K.to_owned() - &rope_coef * &k_pe;
    Ok(RopeSplit {
        k_pe,
        k_nope,
        rope_coef,
        rope_energy: if total_energy > 0.0 {
            rope_energy / total_energy
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stock::test_rng::uniform_pm1;

    fn spd(n: usize, seed: u64) -> Mat<f64> {
        let mut r = uniform_pm1(seed);
        let X = Mat::from_fn(4 * n, n, |_, _| r());
        X.transpose() * &X
    }

    /// Rotate a half-layout head key by position `pos` (frequencies θ^(−j/P)).
    fn rope_half(k: &[f64], pos: f64, theta: f64) -> Vec<f64> {
        let p = k.len() / 2;
        let mut out = k.to_vec();
        for j in 0..p {
            let w = pos * theta.powf(-(j as f64) / p as f64);
            let (s, c) = w.sin_cos();
            out[j] = k[j] * c - k[j + p] * s;
            out[j + p] = k[j] * s + k[j + p] * c;
        }
        out
    }

    /// Rotate an interleaved key of width 2R (frequencies θ^(−p/R)).
    fn rope_interleaved(k: &[f64], pos: f64, theta: f64) -> Vec<f64> {
        let r = k.len() / 2;
        let mut out = k.to_vec();
        for p in 0..r {
            let w = pos * theta.powf(-(p as f64) / r as f64);
            let (s, c) = w.sin_cos();
            out[2 * p] = k[2 * p] * c - k[2 * p + 1] * s;
            out[2 * p + 1] = k[2 * p] * s + k[2 * p + 1] * c;
        }
        out
    }

    #[test]
    fn full_rope_width_is_exact_for_every_position() {
        // One KV head, d_rope = d, freqfold 1: every block is one frequency and keeps its
        // only component, so the interleaved DeepSeek score equals the original half-layout
        // score at every pair of positions (checks the layout and frequency mapping).
        let (g, d, hidden, theta) = (1, 8, 6, 10_000.0);
        let mut r = uniform_pm1(3);
        let W = Mat::from_fn(g * d, hidden, |_, _| r());
        let C = spd(hidden, 5);
        let opts = RopeSplitOptions {
            rope_dim: d,
            freqfold: 1,
            pca: true,
        };
        let s = split_rope(W.as_ref(), C.as_ref(), g, d, &opts).unwrap();
        assert!((s.rope_energy - 1.0).abs() < 1e-12);
        let x: Vec<f64> = (0..hidden).map(|_| r()).collect();
        let q: Vec<f64> = (0..d).map(|_| r()).collect();
        let k: Vec<f64> = (0..d)
            .map(|i| (0..hidden).map(|j| W[(i, j)] * x[j]).sum())
            .collect();
        let kpe: Vec<f64> = (0..d)
            .map(|i| (0..hidden).map(|j| s.k_pe[(i, j)] * x[j]).sum())
            .collect();
        // q̃ = coefᵀ q.
        let qt: Vec<f64> = (0..d)
            .map(|p| (0..d).map(|i| s.rope_coef[(i, p)] * q[i]).sum())
            .collect();
        for (pq, pk) in [(5.0, 2.0), (100.0, 0.0), (37.0, 36.0)] {
            let want: f64 = rope_half(&q, pq, theta)
                .iter()
                .zip(rope_half(&k, pk, theta))
                .map(|(a, b)| a * b)
                .sum();
            let got: f64 = rope_interleaved(&qt, pq, theta)
                .iter()
                .zip(rope_interleaved(&kpe, pk, theta))
                .map(|(a, b)| a * b)
                .sum();
            assert!(
                (want - got).abs() < 1e-9 * want.abs().max(1.0),
                "{want} {got}"
            );
        }
    }

    #[test]
    fn split_reconstructs_keys_and_concentrates_energy() {
        let (g, d, hidden) = (3, 16, 20);
        let mut r = uniform_pm1(11);
        let W = Mat::from_fn(g * d, hidden, |_, _| r());
        let C = spd(hidden, 13);
        for (rope_dim, freqfold, pca) in [(8, 2, true), (8, 4, true), (4, 4, true), (8, 2, false)] {
            let opts = RopeSplitOptions {
                rope_dim,
                freqfold,
                pca,
            };
            let s = split_rope(W.as_ref(), C.as_ref(), g, d, &opts).unwrap();
            let back = &s.rope_coef * &s.k_pe + &s.k_nope;
            let err = (&back - &W).norm_l2() / W.norm_l2();
            assert!(err < 1e-12, "{opts:?} {err}");
            // The coefficient columns are orthonormal (an orthogonal change of basis).
            let gram = s.rope_coef.transpose() * &s.rope_coef;
            let eye = Mat::<f64>::identity(rope_dim, rope_dim);
            assert!((&gram - &eye).norm_l2() < 1e-10);
            // PCA keeps at least the share of a uniform spread.
            assert!(
                s.rope_energy >= rope_dim as f64 / (g * d) as f64 - 1e-12,
                "{opts:?}"
            );
        }
        // PCA beats picking single pairs.
        let e = |pca| {
            let o = RopeSplitOptions {
                rope_dim: 8,
                freqfold: 2,
                pca,
            };
            split_rope(W.as_ref(), C.as_ref(), g, d, &o)
                .unwrap()
                .rope_energy
        };
        assert!(e(true) >= e(false) - 1e-12);
    }

    #[test]
    fn bad_widths_are_clear_errors() {
        for (rope_dim, freqfold, want) in [
            (0, 1, "even"),
            (7, 1, "even"),
            (32, 1, "larger than the head"),
            (12, 1, "multiple of rope_dim/2"),
            (8, 1, "--freqfold 1"),
            (8, 3, "--freqfold 3"),
        ] {
            let e = validate(
                &RopeSplitOptions {
                    rope_dim,
                    freqfold,
                    pca: true,
                },
                16,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{rope_dim}/{freqfold}: {e}");
        }
    }
}
