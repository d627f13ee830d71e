//! The input scaling S `[in, in]` shared by all methods: Ŵ = [W S]_r S⁻¹.
//!
//! One [`Whitening`] per layer input serves every projection that reads that input (K and V
//! of one layer), so the `[in, in]` eigen/Cholesky work is done once.

use faer::{Mat, MatRef};

use super::error::{FactorError, Result};
use super::input::{check_finite, FactorOptions, InputStats, Method, Rescues, SquareRoot};
use super::scaling::Scaling;
use super::{asvd, care, svd_llm};

/// A method's input scaling S for one input (one layer's attention input), ready to
/// factorize any weight `[out, in]` that reads it.
#[derive(Debug, Clone)]
pub struct Whitening {
    method: Method,
    dim: usize,
    scaling: Scaling,
    rescues: Rescues,
}

impl Whitening {
    /// Builds S for `method` from the calibration statistics (`in` = `stats.dim()`).
    ///
    /// Methods that read C validate it fully (square, finite, symmetric, non-empty); ASVD
    /// validates `abs_mean`; plain SVD and MHA2MLA read only the dimension.
    pub fn new(method: Method, stats: &InputStats, opts: &FactorOptions) -> Result<Self> {
        opts.validate()?;
        let dim = stats.dim();
        let mut rescues = Rescues::default();
        let scaling = match method {
            Method::PlainSvd | Method::Mha2MlaJoint => Scaling::Identity,
            Method::Asvd { alpha } => {
                stats.validate()?;
                let abs_mean = stats
                    .abs_mean
                    .as_deref()
                    .ok_or(FactorError::MissingAbsMean)?;
                asvd::scaling(abs_mean, alpha, &mut rescues)?
            }
            Method::Care { root } => {
                let mean_diagonal = stats.validate()?;
                let C = stats.second_moment.as_ref();
                match root {
                    SquareRoot::Symmetric => {
                        care::symmetric_power(C, mean_diagonal, opts.damping, 0.5, &mut rescues)?
                    }
                    SquareRoot::Cholesky => {
                        care::cholesky_root(C, mean_diagonal, opts.damping, &mut rescues)?
                    }
                }
            }
            Method::CareCBased => {
                let mean_diagonal = stats.validate()?;
                care::symmetric_power(
                    stats.second_moment.as_ref(),
                    mean_diagonal,
                    opts.damping,
                    1.0,
                    &mut rescues,
                )?
            }
            Method::SvdLlm => {
                let mean_diagonal = stats.validate()?;
                svd_llm::scaling(
                    stats.second_moment.as_ref(),
                    mean_diagonal,
                    opts.damping,
                    &mut rescues,
                )?
            }
        };
        Ok(Self {
            method,
            dim,
            scaling,
            rescues,
        })
    }

    /// The identity scaling (plain SVD) for inputs of dimension `dim`; needs no statistics.
    pub fn identity(method: Method, dim: usize) -> Self {
        Self {
            method,
            dim,
            scaling: Scaling::Identity,
            rescues: Rescues::default(),
        }
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// The input dimension `in`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Numeric rescues applied while building S.
    pub fn rescues(&self) -> &Rescues {
        &self.rescues
    }

    /// Checks `W` against `in` and for NaN/∞.
    pub(crate) fn check_weight(&self, W: MatRef<'_, f64>) -> Result<()> {
        if W.ncols() != self.dim {
            return Err(FactorError::Shape {
                what: "weight [out, in] vs statistics dimension",
                expected: (W.nrows(), self.dim),
                got: (W.nrows(), W.ncols()),
            });
        }
        check_finite("weight", W)
    }

    /// W·S, `[out, in]`.
    pub(crate) fn apply(&self, W: MatRef<'_, f64>) -> Mat<f64> {
        self.scaling.apply(W)
    }

    /// Given G = Σ Vᵀ `[k, in]` (rows are scaled right singular vectors of W·S), returns
    /// G·S⁻¹ `[k, in]`.
    pub(crate) fn unapply(&self, G: Mat<f64>) -> Mat<f64> {
        self.scaling.unapply(G)
    }
}
