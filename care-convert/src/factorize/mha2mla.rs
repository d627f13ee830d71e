//! MHA2MLA's SVD initialization (arXiv:2502.14837): one plain SVD of [W_K; W_V] so that K
//! and V share one latent c = a·x, with W_K ≈ b_k·a and W_V ≈ b_v·a. No calibration data.

use faer::MatRef;

use super::decomposition::JointDecomposition;
use super::error::{FactorError, Result};
use super::input::Method;
use super::whiten::Whitening;

/// Joint plain SVD of `W_k` `[out_k, in]` and `W_v` `[out_v, in]`. `truncate(r)` yields
/// `b = [b_k, b_v]`.
pub fn mha2mla_joint(W_k: MatRef<'_, f64>, W_v: MatRef<'_, f64>) -> Result<JointDecomposition> {
    if W_k.ncols() != W_v.ncols() {
        return Err(FactorError::Shape {
            what: "W_V [out_v, in] vs W_K [out_k, in]",
            expected: (W_v.nrows(), W_k.ncols()),
            got: (W_v.nrows(), W_v.ncols()),
        });
    }
    JointDecomposition::new(
        &Whitening::identity(Method::Mha2MlaJoint, W_k.ncols()),
        &[W_k, W_v],
    )
}
