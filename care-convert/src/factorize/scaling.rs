//! The input scaling S of a factorization in its cheap representations, and how it
//! multiplies a weight. A leaf: the methods (`care`, `asvd`, `svd_llm`) build one,
//! `whiten` picks the method's.

use faer::{Mat, MatRef};

/// The scaling S in one of its cheap representations.
#[derive(Debug, Clone)]
pub(crate) enum Scaling {
    /// S = I.
    Identity,
    /// S = diag(s), all s_j > 0.
    Diagonal(Vec<f64>),
    /// S symmetric positive definite, with its inverse.
    Dense { S: Mat<f64>, S_inv: Mat<f64> },
    /// S = L, lower triangular with positive diagonal.
    Lower(Mat<f64>),
}

impl Scaling {
    /// W·S, `[out, in]`.
    pub(crate) fn apply(&self, W: MatRef<'_, f64>) -> Mat<f64> {
        match self {
            Scaling::Identity => W.to_owned(),
            Scaling::Diagonal(s) => Mat::from_fn(W.nrows(), W.ncols(), |i, j| W[(i, j)] * s[j]),
            Scaling::Dense { S, .. } => W * S,
            Scaling::Lower(L) => W * L,
        }
    }

    /// G·S⁻¹ `[k, in]`.
    pub(crate) fn unapply(&self, G: Mat<f64>) -> Mat<f64> {
        match self {
            Scaling::Identity => G,
            Scaling::Diagonal(s) => Mat::from_fn(G.nrows(), G.ncols(), |i, j| G[(i, j)] / s[j]),
            Scaling::Dense { S_inv, .. } => &G * S_inv,
            Scaling::Lower(L) => {
                // (G L⁻¹)ᵀ = L⁻ᵀ Gᵀ: solve Lᵀ Y = Gᵀ, an upper-triangular system.
                let mut Y = G.transpose().to_owned();
                L.transpose().solve_upper_triangular_in_place(Y.as_mut());
                Y.transpose().to_owned()
            }
        }
    }
}
