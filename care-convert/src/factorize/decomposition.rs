//! One SVD of the whitened weight, truncated to any rank on demand.
//!
//! With S the method's input scaling (see [`Method`]) and W `[out, in]`:
//! W·S = U Σ Vᵀ (thin SVD, k = min(out, in), Σ nonincreasing), and the rank-r factors are
//!
//! - `a` = Σ_r V_rᵀ S⁻¹ `[r, in]`: the latent c = a·x (the cached side; the paper's
//!   (W^a)ᵀ = (√C⁻¹ U_r Σ_r)ᵀ in its row-vector notation),
//! - `b` = U_r `[out, r]` with orthonormal columns (the paper's (W^b)ᵀ = V_r),
//!
//! so Ŵ = b·a = [W S]_r S⁻¹. For CARE with δ = 0 this minimizes ‖X(W − Ŵ)ᵀ‖_F over rank-r Ŵ,
//! and the minimum is √(Σ_{i>r} σ_i²) ([`Decomposition::tail_norm`]).

use faer::{Mat, MatRef};

use super::error::{FactorError, Result};
use super::input::{check_finite, FactorOptions, InputStats, Method, Rescues};
use super::whiten::Whitening;

/// Rank-r factors of W ≈ b·a (Hugging Face layout, y = W x).
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `[r, in]`: the latent c = a·x, what the cache stores.
    pub a: Mat<f64>,
    /// `[out, r]`: the up-projection, orthonormal columns; W ≈ b·a.
    pub b: Mat<f64>,
}

impl LowRank {
    pub fn rank(&self) -> usize {
        self.a.nrows()
    }

    /// Ŵ = b·a `[out, in]`.
    pub fn reconstruct(&self) -> Mat<f64> {
        &self.b * &self.a
    }
}

/// A weight's full factorization: every rank-r truncation is a slice of it.
#[derive(Debug, Clone)]
pub struct Decomposition {
    method: Method,
    /// Σ Vᵀ S⁻¹ `[k, in]`.
    a_full: Mat<f64>,
    /// U `[out, k]`.
    b_full: Mat<f64>,
    /// σ of W·S, nonincreasing, length k = min(out, in).
    spectrum: Vec<f64>,
    numerical_rank: usize,
    rescues: Rescues,
}

/// Factorizes `W` `[out, in]` with `method`, given the statistics of its input.
/// To factorize several weights that read the same input (K and V of one layer), build one
/// [`Whitening`] and call [`Whitening::decompose`] on each.
pub fn decompose(
    method: Method,
    W: MatRef<'_, f64>,
    stats: &InputStats,
    opts: &FactorOptions,
) -> Result<Decomposition> {
    Decomposition::new(&Whitening::new(method, stats, opts)?, W)
}

/// Factorizes the row-stacked `[W_0; W_1; …]` (each `[out_i, in]`, e.g. `[W_K; W_V]`) with one
/// shared latent `a`. Works for every method: CARE on the stacked map minimizes
/// Σ_i ‖X(W_i − Ŵ_i)ᵀ‖²_F jointly.
pub fn decompose_joint(
    method: Method,
    weights: &[MatRef<'_, f64>],
    stats: &InputStats,
    opts: &FactorOptions,
) -> Result<JointDecomposition> {
    JointDecomposition::new(&Whitening::new(method, stats, opts)?, weights)
}

impl Decomposition {
    /// Factorizes `W` `[out, in]` (one SVD of W·S) under `whitening`.
    pub fn new(whitening: &Whitening, W: MatRef<'_, f64>) -> Result<Self> {
        whitening.check_weight(W)?;
        let (out, dim) = (W.nrows(), W.ncols());
        let M = whitening.apply(W);
        check_finite("whitened weight W·S", M.as_ref())?;
        let svd = M.thin_svd().map_err(|_| FactorError::NoConvergence {
            what: "SVD of the whitened weight",
        })?;
        let spectrum: Vec<f64> = svd.S().column_vector().iter().copied().collect();
        let sigma_max = spectrum.first().copied().unwrap_or(0.0);
        let tolerance = sigma_max * out.max(dim) as f64 * f64::EPSILON;
        let numerical_rank = spectrum.iter().take_while(|&&s| s > tolerance).count();
        let V = svd.V();
        let G = Mat::from_fn(spectrum.len(), dim, |i, j| spectrum[i] * V[(j, i)]);
        let a_full = whitening.unapply(G);
        check_finite("factor a", a_full.as_ref())?;
        Ok(Self {
            method: whitening.method(),
            a_full,
            b_full: svd.U().to_owned(),
            spectrum,
            numerical_rank,
            rescues: *whitening.rescues(),
        })
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// Singular values σ of the whitened weight W·S, **nonincreasing**, length min(out, in).
    /// These are the values the rank allocator scores.
    pub fn spectrum(&self) -> &[f64] {
        &self.spectrum
    }

    /// σ above the round-off tolerance σ₁·max(out, in)·ε: the ranks [`truncate`](Self::truncate)
    /// accepts. Pass this (not [`spectrum`](Self::spectrum)) to the rank allocator when the
    /// weight may be rank deficient.
    pub fn usable_spectrum(&self) -> &[f64] {
        &self.spectrum[..self.numerical_rank]
    }

    /// Number of σ above σ₁·max(out, in)·ε.
    pub fn numerical_rank(&self) -> usize {
        self.numerical_rank
    }

    /// min(out, in).
    pub fn max_rank(&self) -> usize {
        self.spectrum.len()
    }

    /// Numeric rescues applied while whitening.
    pub fn rescues(&self) -> &Rescues {
        &self.rescues
    }

    /// √(Σ_{i>r} σ_i²): the whitened truncation error ‖(W − Ŵ_r)·S‖_F. For CARE with δ = 0
    /// this equals ‖X(W − Ŵ_r)ᵀ‖_F on the calibration data.
    pub fn tail_norm(&self, r: usize) -> f64 {
        // Summed from the smallest value up, for accuracy.
        self.spectrum
            .iter()
            .skip(r)
            .rev()
            .map(|s| s * s)
            .sum::<f64>()
            .sqrt()
    }

    /// The rank-r factors. Errors when r = 0 or r exceeds the numerical rank.
    pub fn truncate(&self, r: usize) -> Result<LowRank> {
        if r == 0 || r > self.numerical_rank {
            return Err(FactorError::RankOutOfRange {
                requested: r,
                numerical_rank: self.numerical_rank,
                max_rank: self.max_rank(),
            });
        }
        Ok(LowRank {
            a: self.a_full.subrows(0, r).to_owned(),
            b: self.b_full.subcols(0, r).to_owned(),
        })
    }
}

/// Rank-r factors with one shared latent: W_i ≈ b_i·a for every stacked block i.
#[derive(Debug, Clone)]
pub struct JointLowRank {
    /// `[r, in]`: the shared latent c = a·x.
    pub a: Mat<f64>,
    /// One `[out_i, r]` up-projection per input block, in input order (e.g. `[b_k, b_v]`).
    pub b: Vec<Mat<f64>>,
}

impl JointLowRank {
    pub fn rank(&self) -> usize {
        self.a.nrows()
    }

    /// Ŵ_i = b_i·a for each block.
    pub fn reconstruct(&self) -> Vec<Mat<f64>> {
        self.b.iter().map(|b| b * &self.a).collect()
    }
}

/// Factorization of a row-stacked map `[W_0; W_1; …]` with a shared latent.
#[derive(Debug, Clone)]
pub struct JointDecomposition {
    inner: Decomposition,
    block_rows: Vec<usize>,
}

impl JointDecomposition {
    /// Factorizes the row-stacked `[W_0; W_1; …]` (each `[out_i, in]`) with one shared
    /// latent under `whitening`.
    pub fn new(whitening: &Whitening, weights: &[MatRef<'_, f64>]) -> Result<Self> {
        if weights.is_empty() {
            return Err(FactorError::NoWeights);
        }
        for W in weights {
            whitening.check_weight(*W)?;
        }
        let block_rows: Vec<usize> = weights.iter().map(|W| W.nrows()).collect();
        let total_rows = block_rows.iter().sum();
        let mut stacked = Mat::zeros(total_rows, whitening.dim());
        let mut row = 0;
        for W in weights {
            stacked.as_mut().subrows_mut(row, W.nrows()).copy_from(*W);
            row += W.nrows();
        }
        Ok(Self {
            inner: Decomposition::new(whitening, stacked.as_ref())?,
            block_rows,
        })
    }

    /// The decomposition of the stacked matrix (spectrum, rank, rescues).
    pub fn stacked(&self) -> &Decomposition {
        &self.inner
    }

    /// σ of the whitened stacked map, nonincreasing.
    pub fn spectrum(&self) -> &[f64] {
        self.inner.spectrum()
    }

    /// Rows of each stacked block.
    pub fn block_rows(&self) -> &[usize] {
        &self.block_rows
    }

    /// The rank-r shared latent and per-block up-projections.
    pub fn truncate(&self, r: usize) -> Result<JointLowRank> {
        let LowRank { a, b } = self.inner.truncate(r)?;
        let mut row = 0;
        let blocks = self
            .block_rows
            .iter()
            .map(|&rows| {
                let block = b.as_ref().subrows(row, rows).to_owned();
                row += rows;
                block
            })
            .collect();
        Ok(JointLowRank { a, b: blocks })
    }
}
