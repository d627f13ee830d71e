//! ASVD's activation-aware scaling (arXiv:2312.05821): S = diag(mean|x|)^α.
//!
//! Input dimensions with mean|x| below 1e-6·max are raised to that floor (S must be
//! invertible) and counted in [`Rescues::abs_mean_floored`].

use super::error::{FactorError, Result};
use super::input::Rescues;
use super::scaling::Scaling;

/// Floor of mean|x| relative to its maximum.
const ABS_MEAN_FLOOR: f64 = 1e-6;

pub(crate) fn scaling(abs_mean: &[f64], alpha: f64, rescues: &mut Rescues) -> Result<Scaling> {
    if !(alpha.is_finite() && alpha >= 0.0) {
        return Err(FactorError::InvalidOption {
            name: "asvd alpha",
            value: alpha,
            reason: "must be finite and >= 0",
        });
    }
    let max_abs_mean = abs_mean.iter().copied().fold(0.0, f64::max);
    if max_abs_mean.is_nan() || max_abs_mean <= 0.0 {
        return Err(FactorError::ZeroAbsMean { max_abs_mean });
    }
    let floor = ABS_MEAN_FLOOR * max_abs_mean;
    let s = abs_mean
        .iter()
        .map(|&m| {
            if m < floor {
                rescues.abs_mean_floored += 1;
                floor.powf(alpha)
            } else {
                m.powf(alpha)
            }
        })
        .collect();
    Ok(Scaling::Diagonal(s))
}
