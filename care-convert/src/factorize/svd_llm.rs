//! SVD-LLM's truncation-aware whitening (arXiv:2403.07378): S = L, the Cholesky factor of
//! the (damped) second moment, with SVD-LLM's fallback when Cholesky fails: shift by
//! (−λ_min + ε₀·mean diag C)·I and factor again. The shift is reported in
//! [`Rescues::cholesky_shift`]. SVD-LLM's own code uses an absolute ε₀ = 1e-6; here it is
//! relative to mean(diag C) so the rescue does not depend on the scale of C.

use faer::{MatRef, Side};

use super::care::damped;
use super::error::{FactorError, Result};
use super::input::Rescues;
use super::scaling::Scaling;

/// Relative extra shift ε₀ above −λ_min after a failed Cholesky.
const SHIFT_EPSILON: f64 = 1e-6;

pub(crate) fn scaling(
    C: MatRef<'_, f64>,
    mean_diagonal: f64,
    damping: f64,
    rescues: &mut Rescues,
) -> Result<Scaling> {
    let mut C_d = damped(C, mean_diagonal, damping, rescues);
    if let Ok(llt) = C_d.llt(Side::Lower) {
        return Ok(Scaling::Lower(llt.L().to_owned()));
    }
    let eigenvalues =
        C_d.self_adjoint_eigenvalues(Side::Lower)
            .map_err(|_| FactorError::NoConvergence {
                what: "eigenvalues of the second moment (SVD-LLM shift)",
            })?;
    let min_eigenvalue = eigenvalues.first().copied().unwrap_or(0.0);
    let shift = (-min_eigenvalue).max(0.0) + SHIFT_EPSILON * mean_diagonal;
    for i in 0..C_d.nrows() {
        C_d[(i, i)] += shift;
    }
    rescues.cholesky_shift = shift;
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
