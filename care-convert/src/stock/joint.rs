//! The joint latent of a stock MLA layer: one rank-r map x → c whose decompression gives
//! every KV head's NoPE key and value (`kv_a` latent rows and `kv_b_proj`), CARE §1.6
//! steps C–D, written from the math.
//!
//! The target is the stacked map `T = [K_nope/α ; V]` `[2·g·d, hidden]` (per KV head, in
//! the original coordinates; query heads that share a KV head read the same rows).
//!
//! - **CARE**: the covariance-aware optimum of ‖X(T − T̂)ᵀ‖_F (SVD of T·√C), i.e. the
//!   decompressed keys and values are as close as possible *on the calibration inputs*.
//! - **TransMLA PCA**: the top-r principal subspace R_r of the outputs `T x` (eigenvectors of
//!   T C Tᵀ); `a = R_rᵀ T`, `b = R_r`. It sees the same statistics but optimizes the
//!   subspace of the outputs, not the map.
//!
//! `α` (K/V balance) = RMS of a NoPE key coordinate ÷ RMS of a value coordinate on the
//! calibration data; dividing keys by α weights key and value errors equally. The factor
//! is undone in `b`, so the product is unchanged. With `balance = false`, α = 1.
#![allow(non_snake_case)]

use faer::{Mat, MatRef, Side};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::factorize::{Decomposition, FactorOptions, InputStats, Method, SquareRoot, Whitening};

/// Which basis the joint latent uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LatentBasis {
    /// CARE: covariance-aware SVD of the joint map.
    #[default]
    Care,
    /// TransMLA: PCA of the joint outputs (the baseline).
    TransmlaPca,
}

/// A rank-r joint latent of one layer.
#[derive(Debug, Clone)]
pub struct JointLatent {
    /// `[r, hidden]`: c = a·x.
    pub a: Mat<f64>,
    /// `[g·d, r]`: NoPE keys of every KV head, `k_nope ≈ b_k·c`.
    pub b_k: Mat<f64>,
    /// `[g·d, r]`: values of every KV head, `v ≈ b_v·c`.
    pub b_v: Mat<f64>,
    /// The balance factor used.
    pub alpha: f64,
    /// Singular values (CARE) or √eigenvalues (PCA) of the whole joint map, nonincreasing.
    pub spectrum: Vec<f64>,
}

/// Mean of the diagonal of W C Wᵀ (mean squared output coordinate × tokens).
fn mean_output_energy(W: MatRef<'_, f64>, C: MatRef<'_, f64>) -> f64 {
    let WC = W * C;
    let n = W.nrows().max(1);
    (0..W.nrows())
        .map(|i| (0..W.ncols()).map(|k| WC[(i, k)] * W[(i, k)]).sum::<f64>())
        .sum::<f64>()
        / n as f64
}

/// Factor the joint map of `k_nope` `[g·d, hidden]` and `v` `[g·d, hidden]` at rank `r`.
pub fn joint_latent(
    k_nope: MatRef<'_, f64>,
    v: MatRef<'_, f64>,
    stats: &InputStats,
    rank: usize,
    basis: LatentBasis,
    balance: bool,
    damping: f64,
) -> Result<JointLatent> {
    let (kd, hidden) = (k_nope.nrows(), k_nope.ncols());
    if v.ncols() != hidden || stats.dim() != hidden {
        return Err(Error::InvalidOption(format!(
            "joint latent: key [{kd}, {hidden}], value [{}, {}] and statistics dim {} disagree",
            v.nrows(),
            v.ncols(),
            stats.dim()
        )));
    }
    let C = stats.second_moment.as_ref();
    let alpha = if balance {
        let (ek, ev) = (mean_output_energy(k_nope, C), mean_output_energy(v, C));
        if ek > 0.0 && ev > 0.0 {
            (ek / ev).sqrt()
        } else {
            1.0
        }
    } else {
        1.0
    };
    let T = Mat::from_fn(kd + v.nrows(), hidden, |i, k| {
        if i < kd {
            k_nope[(i, k)] / alpha
        } else {
            v[(i - kd, k)]
        }
    });
    let (a, b, spectrum) = match basis {
        LatentBasis::Care => {
            let wh = Whitening::new(
                Method::Care {
                    root: SquareRoot::Symmetric,
                },
                stats,
                &FactorOptions { damping },
            )?;
            let d = Decomposition::new(&wh, T.as_ref())?;
            if rank > d.numerical_rank() {
                return Err(Error::InvalidOption(format!(
                    "kv latent rank {rank} exceeds the joint map's numerical rank {} \
                     (NoPE keys + values of this layer)",
                    d.numerical_rank()
                )));
            }
            let f = d.truncate(rank)?;
            (f.a, f.b, d.spectrum().to_vec())
        }
        LatentBasis::TransmlaPca => {
            // Damped output covariance T C Tᵀ, damping relative to its mean diagonal.
            let mut H = &T * C * T.transpose();
            let n = H.nrows();
            let mean_diag = (0..n).map(|i| H[(i, i)]).sum::<f64>() / n.max(1) as f64;
            for i in 0..n {
                H[(i, i)] += damping * mean_diag;
            }
            let eig = H
                .self_adjoint_eigen(Side::Lower)
                .map_err(|_| Error::InvalidOption("eigendecomposition of T C Tᵀ".into()))?;
            let lam: Vec<f64> = eig.S().column_vector().iter().rev().copied().collect();
            let floor = lam.first().copied().unwrap_or(0.0) * n as f64 * f64::EPSILON;
            let numerical = lam
                .iter()
                .take_while(|&&l| l > floor + damping * mean_diag)
                .count();
            if rank > numerical {
                return Err(Error::InvalidOption(format!(
                    "kv latent rank {rank} exceeds the joint outputs' numerical rank {numerical}"
                )));
            }
            let U = eig.U();
            let R = Mat::from_fn(n, rank, |i, m| U[(i, n - 1 - m)]);
            let a = R.transpose() * &T;
            (
                a,
                R,
                lam.iter().map(|l| l.max(0.0).sqrt()).collect::<Vec<_>>(),
            )
        }
    };
    let b_k = Mat::from_fn(kd, rank, |i, m| b[(i, m)] * alpha);
    let b_v = Mat::from_fn(v.nrows(), rank, |i, m| b[(kd + i, m)]);
    Ok(JointLatent {
        a,
        b_k,
        b_v,
        alpha,
        spectrum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stock::test_rng::uniform_pm1;

    /// Output error ‖X(T − T̂)ᵀ‖² on the samples, keys and values together (unweighted).
    fn output_error(X: &Mat<f64>, k: &Mat<f64>, v: &Mat<f64>, j: &JointLatent) -> f64 {
        let ek = X * (k - &j.b_k * &j.a).transpose();
        let ev = X * (v - &j.b_v * &j.a).transpose();
        ek.squared_norm_l2() + ev.squared_norm_l2()
    }

    #[test]
    fn care_beats_pca_on_the_calibration_outputs_and_full_rank_is_exact() {
        let (hidden, kd, n) = (24, 10, 400);
        let mut r = uniform_pm1(7);
        // Anisotropic inputs: the map matters most along a few input directions.
        let X = Mat::from_fn(n, hidden, |_, j| r() * (1.0 + 6.0 * (j < 4) as i32 as f64));
        let k = Mat::from_fn(kd, hidden, |_, _| r());
        let v = Mat::from_fn(kd, hidden, |_, _| r() * 0.3);
        let stats = InputStats::from_samples(X.as_ref());
        for balance in [false, true] {
            let care = |r| {
                joint_latent(
                    k.as_ref(),
                    v.as_ref(),
                    &stats,
                    r,
                    LatentBasis::Care,
                    balance,
                    0.0,
                )
                .unwrap()
            };
            let pca = |r| {
                joint_latent(
                    k.as_ref(),
                    v.as_ref(),
                    &stats,
                    r,
                    LatentBasis::TransmlaPca,
                    balance,
                    0.0,
                )
                .unwrap()
            };
            let full = care(2 * kd);
            assert!(output_error(&X, &k, &v, &full) < 1e-16 * X.squared_norm_l2());
            if !balance {
                // Unbalanced CARE is the optimum of exactly this error.
                for rank in [3, 6, 12] {
                    let (c, p) = (care(rank), pca(rank));
                    assert!(
                        output_error(&X, &k, &v, &c) <= output_error(&X, &k, &v, &p) * (1.0 + 1e-9),
                        "rank {rank}"
                    );
                }
            } else {
                assert!(full.alpha > 1.0, "keys are larger than values here");
            }
        }
    }

    #[test]
    fn rank_above_the_joint_rank_is_an_error() {
        let mut r = uniform_pm1(1);
        let X = Mat::from_fn(100, 8, |_, _| r());
        let k = Mat::from_fn(4, 8, |_, _| r());
        let v = Mat::from_fn(4, 8, |_, _| r());
        let stats = InputStats::from_samples(X.as_ref());
        for basis in [LatentBasis::Care, LatentBasis::TransmlaPca] {
            let e = joint_latent(k.as_ref(), v.as_ref(), &stats, 9, basis, true, 0.01)
                .unwrap_err()
                .to_string();
            assert!(e.contains("numerical rank"), "{e}");
        }
    }
}
