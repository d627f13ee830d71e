//! The per-head projections around the absorbed decode, on plain f32 slices:
//! `q̃_h = W_UK,hᵀ q_nope,h` before it and `o_h = W_UV,h õ_h` after it.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::mla::{MlaAttention, MlaShape};

/// `kv_b_proj` `[n_h·(d_nope + d_v), r]` as f32 rows: per head `d_nope` rows of
/// `W_UK,h` then `d_v` rows of `W_UV,h`, each of width `r`.
#[derive(Debug, Clone)]
pub struct LatentProjections {
    shape: MlaShape,
    kv_b: Vec<f32>,
}

impl LatentProjections {
    /// From a row-major `kv_b_proj` of `shape`.
    pub fn new(shape: MlaShape, kv_b_proj: Vec<f32>) -> Result<Self> {
        let want = shape.kv_b_rows() * shape.kv_lora_rank;
        if kv_b_proj.len() != want {
            return Err(Error::InvalidInput(format!(
                "kv_b_proj has {} values, expected {} x {} = {want}",
                kv_b_proj.len(),
                shape.kv_b_rows(),
                shape.kv_lora_rank
            )));
        }
        Ok(LatentProjections {
            shape,
            kv_b: kv_b_proj,
        })
    }

    /// The projections of `attn`'s `kv_b_proj`.
    pub fn from_layer(attn: &MlaAttention) -> Result<Self> {
        let kv_b = attn
            .weights()
            .kv_b_proj
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::new(attn.shape(), kv_b)
    }

    pub fn shape(&self) -> MlaShape {
        self.shape
    }

    /// Row `i` of head `h`'s block (`i < d_nope`: `W_UK`, else `W_UV`).
    fn row(&self, h: usize, i: usize) -> &[f32] {
        let MlaShape {
            qk_nope_head_dim: dn,
            v_head_dim: dv,
            kv_lora_rank: r,
            ..
        } = self.shape;
        &self.kv_b[((h * (dn + dv)) + i) * r..][..r]
    }

    /// `q_nope (batch, n_h, d_nope)` → `q̃ (batch, n_h, r)`, `q̃_h = W_UK,hᵀ q_nope,h`.
    pub fn absorb_queries(&self, q_nope: &[f32]) -> Result<Vec<f32>> {
        let MlaShape {
            num_heads: nh,
            qk_nope_head_dim: dn,
            kv_lora_rank: r,
            ..
        } = self.shape;
        if !q_nope.len().is_multiple_of(nh * dn) {
            return Err(Error::InvalidInput(format!(
                "q_nope has {} values, not (batch, {nh}, {dn})",
                q_nope.len()
            )));
        }
        let mut out = vec![0.0; q_nope.len() / dn * r];
        out.par_chunks_mut(r)
            .zip(q_nope.par_chunks(dn))
            .enumerate()
            .for_each(|(i, (o, q))| {
                let h = i % nh;
                for (k, &qk) in q.iter().enumerate() {
                    o.iter_mut()
                        .zip(self.row(h, k))
                        .for_each(|(a, &w)| *a += qk * w);
                }
            });
        Ok(out)
    }

    /// `õ (batch, n_h, r)` → `o (batch, n_h, d_v)`, `o_h = W_UV,h õ_h`.
    pub fn apply_w_uv(&self, o_lat: &[f32]) -> Result<Vec<f32>> {
        let MlaShape {
            num_heads: nh,
            qk_nope_head_dim: dn,
            v_head_dim: dv,
            kv_lora_rank: r,
            ..
        } = self.shape;
        if !o_lat.len().is_multiple_of(nh * r) {
            return Err(Error::InvalidInput(format!(
                "latent output has {} values, not (batch, {nh}, {r})",
                o_lat.len()
            )));
        }
        let mut out = vec![0.0; o_lat.len() / r * dv];
        out.par_chunks_mut(dv)
            .zip(o_lat.par_chunks(r))
            .enumerate()
            .for_each(|(i, (o, x))| {
                let h = i % nh;
                for (j, oj) in o.iter_mut().enumerate() {
                    *oj = self.row(h, dn + j).iter().zip(x).map(|(w, v)| w * v).sum();
                }
            });
        Ok(out)
    }
}
