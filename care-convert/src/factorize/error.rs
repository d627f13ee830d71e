//! Errors of the factorizations. Each variant carries the numeric fact that failed.

/// Why a factorization could not be computed or truncated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FactorError {
    /// An input matrix or vector holds NaN or ±∞.
    #[error("non-finite value {value} in {what} at ({row}, {col})")]
    NonFinite {
        what: &'static str,
        row: usize,
        col: usize,
        value: f64,
    },
    /// Two inputs do not have compatible shapes.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        what: &'static str,
        expected: (usize, usize),
        got: (usize, usize),
    },
    /// The second moment is not symmetric (relative to its largest diagonal entry).
    #[error(
        "second moment is not symmetric: |C[{row},{col}] - C[{col},{row}]| = {difference:e} \
         exceeds {tolerance:e}"
    )]
    Asymmetric {
        row: usize,
        col: usize,
        difference: f64,
        tolerance: f64,
    },
    /// The calibration statistics saw no tokens, or only zero inputs.
    #[error("empty calibration statistics: {tokens} tokens, mean(diag C) = {mean_diagonal:e}")]
    EmptyStats { tokens: u64, mean_diagonal: f64 },
    /// ASVD needs mean|x| per input dimension, and the statistics have none.
    #[error("ASVD needs mean |x| per input dimension (InputStats::abs_mean is None)")]
    MissingAbsMean,
    /// Every input dimension has mean |x| = 0, so the ASVD scaling is zero.
    #[error("ASVD scaling is zero: max mean|x| = {max_abs_mean:e}")]
    ZeroAbsMean { max_abs_mean: f64 },
    /// An entry of `abs_mean` is negative.
    #[error("mean |x| of input dimension {index} is negative: {value}")]
    NegativeAbsMean { index: usize, value: f64 },
    /// Damping is zero and the second moment is numerically singular.
    #[error(
        "second moment is numerically singular (eigenvalues {min_eigenvalue:e} .. \
         {max_eigenvalue:e}, floor {floor:e}) and damping is 0; use damping > 0"
    )]
    SingularCovariance {
        min_eigenvalue: f64,
        max_eigenvalue: f64,
        floor: f64,
    },
    /// The Cholesky factorization of the damped second moment met a non-positive pivot.
    #[error(
        "damped second moment (damping {damping}) is not positive definite: Cholesky pivot \
         {pivot} is not positive; increase damping"
    )]
    NotPositiveDefinite { pivot: usize, damping: f64 },
    /// An option is out of range.
    #[error("invalid option {name} = {value}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: f64,
        reason: &'static str,
    },
    /// The requested rank is 0 or exceeds what the matrix supports.
    #[error(
        "rank {requested} is not available: numerical rank {numerical_rank}, \
         min(out, in) = {max_rank}"
    )]
    RankOutOfRange {
        requested: usize,
        numerical_rank: usize,
        max_rank: usize,
    },
    /// A joint factorization was given no matrices.
    #[error("joint factorization needs at least one weight matrix")]
    NoWeights,
    /// faer's SVD or eigendecomposition did not converge.
    #[error("{what} did not converge")]
    NoConvergence { what: &'static str },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, FactorError>;
