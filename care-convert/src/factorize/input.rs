//! Inputs of a factorization: calibration statistics, the method and its options.

use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};

use super::error::{FactorError, Result};

/// Default relative damping δ: the factorization whitens with C + δ·mean(diag C)·I.
///
/// 0.01 is the paper's shrinkage α (CARE §3.3, App. I.6 reports insensitivity over
/// 1e-3..1e-1). The authors' code adds 10·percdamp = 0.1; pass `damping: 0.1` to match it.
pub const DEFAULT_DAMPING: f64 = 0.01;

/// Default ASVD exponent α in diag(mean|x|)^α (the value CARE's ASVD baseline uses).
pub const DEFAULT_ASVD_ALPHA: f64 = 0.5;

/// Calibration statistics of one projection's input x ∈ R^in.
#[derive(Debug, Clone)]
pub struct InputStats {
    /// C = Σ_t x_tᵀ x_t, `[in, in]`, symmetric positive semidefinite, possibly singular.
    /// Uncentred; its global scale is irrelevant (damping is relative). Both triangles are
    /// checked for symmetry; the lower triangle is the one factorized.
    pub second_moment: Mat<f64>,
    /// mean_t |x_{t,j}| per input dimension j, `[in]`; only ASVD reads it.
    pub abs_mean: Option<Vec<f64>>,
    /// Number of calibration tokens that went into the statistics (must be > 0).
    pub tokens: u64,
}

impl InputStats {
    /// Statistics of a sample matrix `X` `[n, in]` (one token per row): C = XᵀX and mean|x|.
    /// A convenience for tests and small experiments; the pipeline streams its own.
    pub fn from_samples(X: MatRef<'_, f64>) -> Self {
        let (n, dim) = (X.nrows(), X.ncols());
        let second_moment = X.transpose() * X;
        let abs_mean = (0..dim)
            .map(|j| (0..n).map(|t| X[(t, j)].abs()).sum::<f64>() / n.max(1) as f64)
            .collect();
        Self {
            second_moment,
            abs_mean: Some(abs_mean),
            tokens: n as u64,
        }
    }

    /// The input dimension `in`.
    pub fn dim(&self) -> usize {
        self.second_moment.nrows()
    }

    /// Checks shape, finiteness, symmetry and non-emptiness. Returns mean(diag C).
    pub(crate) fn validate(&self) -> Result<f64> {
        let C = self.second_moment.as_ref();
        let dim = C.nrows();
        if C.ncols() != dim {
            return Err(FactorError::Shape {
                what: "second moment (must be square)",
                expected: (dim, dim),
                got: (C.nrows(), C.ncols()),
            });
        }
        check_finite("second moment", C)?;
        let mean_diagonal = (0..dim).map(|i| C[(i, i)]).sum::<f64>() / dim.max(1) as f64;
        if self.tokens == 0 || dim == 0 || mean_diagonal <= 0.0 {
            return Err(FactorError::EmptyStats {
                tokens: self.tokens,
                mean_diagonal,
            });
        }
        let max_diagonal = (0..dim).map(|i| C[(i, i)].abs()).fold(0.0, f64::max);
        // Accumulation round-off grows with the number of summed terms; 1e-10 relative to the
        // largest diagonal entry is far above it and far below any real asymmetry.
        let tolerance = 1e-10 * max_diagonal;
        for j in 0..dim {
            for i in (j + 1)..dim {
                let difference = (C[(i, j)] - C[(j, i)]).abs();
                if difference > tolerance {
                    return Err(FactorError::Asymmetric {
                        row: i,
                        col: j,
                        difference,
                        tolerance,
                    });
                }
            }
        }
        if let Some(abs_mean) = &self.abs_mean {
            if abs_mean.len() != dim {
                return Err(FactorError::Shape {
                    what: "abs_mean (length in)",
                    expected: (dim, 1),
                    got: (abs_mean.len(), 1),
                });
            }
            for (index, &value) in abs_mean.iter().enumerate() {
                if !value.is_finite() {
                    return Err(FactorError::NonFinite {
                        what: "abs_mean",
                        row: index,
                        col: 0,
                        value,
                    });
                }
                if value < 0.0 {
                    return Err(FactorError::NegativeAbsMean { index, value });
                }
            }
        }
        Ok(mean_diagonal)
    }
}

/// Which square root S (S·Sᵀ = C_δ) whitens the weight. Both give the same optimum in exact
/// arithmetic (Ŵ = [W S]_r S⁻¹ does not depend on the choice); they differ in cost and
/// conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SquareRoot {
    /// S = Q Λ^{1/2} Qᵀ from the symmetric eigendecomposition C_δ = Q Λ Qᵀ (the paper's √C).
    Symmetric,
    /// S = L from the Cholesky factorization C_δ = L Lᵀ (cheaper).
    Cholesky,
}

/// A factorization method. All of them compute Ŵ = [W S]_r S⁻¹ for some invertible input
/// scaling S `[in, in]`, where [·]_r is the rank-r truncated SVD; they differ in S.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// CARE: S·Sᵀ = C_δ = C + δ·mean(diag C)·I. Minimizes ‖X(W − Ŵ)ᵀ‖_F over rank-r Ŵ
    /// (exactly when δ = 0).
    Care { root: SquareRoot },
    /// CARE's "C-based" variant (`no-sqrt-care`): S = C_δ itself, i.e. eigen-weights squared
    /// compared with √C. Not the activation optimum; the paper finds it slightly better at
    /// small ranks.
    CareCBased,
    /// Palu(SVD): S = I, the plain truncated SVD of W.
    PlainSvd,
    /// ASVD: S = diag(mean|x|)^α.
    Asvd { alpha: f64 },
    /// SVD-LLM: Cholesky whitening of C_δ; where Cholesky fails it shifts C_δ by
    /// (−λ_min + δ₀·mean diag C)·I as SVD-LLM does, and reports the shift.
    SvdLlm,
    /// MHA2MLA's SVD initialization: plain SVD (S = I) of the stacked [W_K; W_V] with one
    /// shared latent. Use it with [`decompose_joint`](super::decompose_joint); on a single
    /// matrix it equals [`Method::PlainSvd`].
    Mha2MlaJoint,
}

impl Method {
    /// Short stable name for logs and provenance (`care`, `care-cholesky`, `care-c`, `palu`,
    /// `asvd`, `svd-llm`, `mha2mla`).
    pub fn name(&self) -> &'static str {
        match self {
            Method::Care {
                root: SquareRoot::Symmetric,
            } => "care",
            Method::Care {
                root: SquareRoot::Cholesky,
            } => "care-cholesky",
            Method::CareCBased => "care-c",
            Method::PlainSvd => "palu",
            Method::Asvd { .. } => "asvd",
            Method::SvdLlm => "svd-llm",
            Method::Mha2MlaJoint => "mha2mla",
        }
    }

    /// Whether the method converts K and V with one shared latent (joint factorization).
    pub fn is_joint(&self) -> bool {
        matches!(self, Method::Mha2MlaJoint)
    }

    /// Whether the method reads the second moment C (the others need only its dimension, or
    /// mean|x| for ASVD).
    pub fn uses_second_moment(&self) -> bool {
        matches!(
            self,
            Method::Care { .. } | Method::CareCBased | Method::SvdLlm
        )
    }
}

/// Knobs shared by the methods.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FactorOptions {
    /// Relative damping δ ≥ 0: C_δ = C + δ·mean(diag C)·I. 0 means none; then a numerically
    /// singular C is an error. See [`DEFAULT_DAMPING`].
    pub damping: f64,
}

impl Default for FactorOptions {
    fn default() -> Self {
        Self {
            damping: DEFAULT_DAMPING,
        }
    }
}

impl FactorOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.damping.is_finite() && self.damping >= 0.0) {
            return Err(FactorError::InvalidOption {
                name: "damping",
                value: self.damping,
                reason: "must be finite and >= 0",
            });
        }
        Ok(())
    }
}

/// Numeric rescues applied while whitening; all zero means none. Never silent: the
/// conversion report should carry these per layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rescues {
    /// Absolute amount added to diag(C): δ·mean(diag C) (0 when δ = 0 or unused).
    pub damping_added: f64,
    /// Eigenvalues of C_δ below the round-off floor λ_max·in·ε that were raised to it.
    pub eigenvalues_clamped: usize,
    /// Extra diagonal shift SVD-LLM added after its Cholesky failed (0 when it did not).
    pub cholesky_shift: f64,
    /// ASVD input dimensions whose mean|x| was below 1e-6·max and was raised to that floor.
    pub abs_mean_floored: usize,
}

impl Rescues {
    /// Whether anything beyond the configured damping was needed.
    pub fn any_beyond_damping(&self) -> bool {
        self.eigenvalues_clamped > 0 || self.cholesky_shift > 0.0 || self.abs_mean_floored > 0
    }
}

/// Errors with the position of the first NaN/∞ in `M`.
pub(crate) fn check_finite(what: &'static str, M: MatRef<'_, f64>) -> Result<()> {
    for col in 0..M.ncols() {
        for row in 0..M.nrows() {
            let value = M[(row, col)];
            if !value.is_finite() {
                return Err(FactorError::NonFinite {
                    what,
                    row,
                    col,
                    value,
                });
            }
        }
    }
    Ok(())
}
