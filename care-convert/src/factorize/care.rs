//! CARE's whitening (CARE §3.3, eq. 3–4): S with S·Sᵀ = C_δ, or S = C_δ for the C-based
//! variant.
//!
//! Symbols: C `[in, in]` the input second moment, δ the relative damping,
//! C_δ = C + δ·mean(diag C)·I, C_δ = Q Λ Qᵀ its eigendecomposition (faer returns Λ
//! nondecreasing), L its Cholesky factor.

use faer::{Mat, MatRef, Side};

use super::error::{FactorError, Result};
use super::input::Rescues;
use super::scaling::Scaling;

/// C_δ = C + δ·mean(diag C)·I; records the added amount.
pub(crate) fn damped(
    C: MatRef<'_, f64>,
    mean_diagonal: f64,
    damping: f64,
    rescues: &mut Rescues,
) -> Mat<f64> {
    let added = damping * mean_diagonal;
    let mut C_d = C.to_owned();
    for i in 0..C_d.nrows() {
        C_d[(i, i)] += added;
    }
    rescues.damping_added = added;
    C_d
}

/// S = C_δ^p and S⁻¹ = C_δ^{−p} through C_δ = Q Λ Qᵀ (p = 1/2: CARE, p = 1: C-based).
///
/// Eigenvalues below the round-off floor λ_max·in·ε are an error when δ = 0 (C is
/// numerically singular) and are raised to the floor (and counted) when δ > 0.
pub(crate) fn symmetric_power(
    C: MatRef<'_, f64>,
    mean_diagonal: f64,
    damping: f64,
    power: f64,
    rescues: &mut Rescues,
) -> Result<Scaling> {
    let dim = C.nrows();
    let C_d = damped(C, mean_diagonal, damping, rescues);
    let eigen = C_d
        .self_adjoint_eigen(Side::Lower)
        .map_err(|_| FactorError::NoConvergence {
            what: "eigendecomposition of the damped second moment",
        })?;
    let Q = eigen.U();
    let lambda: Vec<f64> = eigen.S().column_vector().iter().copied().collect();
    let max_eigenvalue = lambda.last().copied().unwrap_or(0.0);
    let min_eigenvalue = lambda.first().copied().unwrap_or(0.0);
    let floor = max_eigenvalue * dim as f64 * f64::EPSILON;
    if max_eigenvalue.is_nan()
        || max_eigenvalue <= 0.0
        || (damping == 0.0 && min_eigenvalue <= floor)
    {
        return Err(FactorError::SingularCovariance {
            min_eigenvalue,
            max_eigenvalue,
            floor,
        });
    }
    let clamped: Vec<f64> = lambda
        .iter()
        .map(|&l| {
            if l < floor {
                rescues.eigenvalues_clamped += 1;
                floor
            } else {
                l
            }
        })
        .collect();
    let scaled = |exponent: f64| {
        let Qd = Mat::from_fn(dim, dim, |i, j| Q[(i, j)] * clamped[j].powf(exponent));
        &Qd * Q.transpose()
    };
    Ok(Scaling::Dense {
        S: scaled(power),
        S_inv: scaled(-power),
    })
}

/// S = L with C_δ = L Lᵀ. A non-positive pivot is an error (raise δ).
pub(crate) fn cholesky_root(
    C: MatRef<'_, f64>,
    mean_diagonal: f64,
    damping: f64,
    rescues: &mut Rescues,
) -> Result<Scaling> {
    let C_d = damped(C, mean_diagonal, damping, rescues);
    match C_d.llt(Side::Lower) {
        Ok(llt) => Ok(Scaling::Lower(llt.L().to_owned())),
        Err(faer::linalg::cholesky::llt::factor::LltError::NonPositivePivot { index }) => {
            Err(FactorError::NotPositiveDefinite {
                pivot: index,
                damping,
            })
        }
    }
}
