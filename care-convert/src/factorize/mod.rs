//! Low-rank factorizations of projection weights (CARE and baselines).
//!
//! # Math
//!
//! A projection W `[out, in]` (Hugging Face layout, y = W x) reads inputs x ∈ R^in whose
//! uncentred second moment over the calibration tokens X `[n, in]` is C = XᵀX `[in, in]`.
//! CARE (arXiv:2603.17946 §3.3) keeps the *outputs* on the calibration data:
//!
//! min_{rank Ŵ ≤ r} ‖X(W − Ŵ)ᵀ‖²_F = ‖(W − Ŵ)·S‖²_F for any S with S·Sᵀ = C.
//!
//! By Eckart–Young the minimizer is Ŵ = [W S]_r S⁻¹, the same for every square root S
//! (symmetric √C or Cholesky). Every method here is this formula with a different S (see
//! [`Method`]); damping δ replaces C by C_δ = C + δ·mean(diag C)·I so S is invertible.
//!
//! Symbols (used as variable names; hence `non_snake_case` in this module only): `W` the
//! weight, `C` the second moment, `S` the input scaling, `L` a Cholesky factor, `Q`/`Λ` an
//! eigendecomposition, `U`/`Σ`/`V` the SVD of W·S, `X` calibration samples.
//!
//! # Orderings
//!
//! faer returns singular values **nonincreasing** and self-adjoint eigenvalues
//! **nondecreasing**. [`Decomposition::spectrum`] is nonincreasing.
//!
//! # Use
//!
//! ```
//! use care_convert::factorize::{
//!     Decomposition, FactorOptions, InputStats, Method, SquareRoot, Whitening,
//! };
//! use faer::Mat;
//! let X = Mat::from_fn(64, 8, |t, j| ((t * 7 + j * 3) % 11) as f64 - 5.0 + j as f64);
//! let stats = InputStats::from_samples(X.as_ref());
//! let (W_k, W_v) = (Mat::from_fn(4, 8, |i, j| (i + 2 * j) as f64 % 3.0), Mat::<f64>::identity(6, 8));
//! // One whitening per layer input, shared by K and V.
//! let whitening = Whitening::new(Method::Care { root: SquareRoot::Symmetric }, &stats, &FactorOptions::default())?;
//! let k = Decomposition::new(&whitening, W_k.as_ref())?;
//! let v = Decomposition::new(&whitening, W_v.as_ref())?;
//! let factors = v.truncate(3)?; // a: [3, 8] (cached latent), b: [6, 3]
//! assert_eq!((factors.a.nrows(), factors.b.ncols()), (3, 3));
//! assert!(k.spectrum().windows(2).all(|p| p[0] >= p[1]));
//! # Ok::<(), care_convert::factorize::FactorError>(())
//! ```
#![allow(non_snake_case)]

mod asvd;
mod care;
mod decomposition;
mod error;
mod input;
mod mha2mla;
mod scaling;
mod svd_llm;
mod whiten;

#[cfg(test)]
mod tests;

pub use decomposition::{
    decompose, decompose_joint, Decomposition, JointDecomposition, JointLowRank, LowRank,
};
pub use error::{FactorError, Result};
pub use input::{
    FactorOptions, InputStats, Method, Rescues, SquareRoot, DEFAULT_ASVD_ALPHA, DEFAULT_DAMPING,
};
pub use mha2mla::mha2mla_joint;
pub use whiten::Whitening;
