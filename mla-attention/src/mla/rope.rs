//! RoPE of the MLA position dimensions, in DeepSeek's **interleaved** pairing
//! (GPT-J style; HF `rope_interleave`, vLLM `is_neox_style=False`, candle `rope_i`):
//!
//! ```text
//! [x_0 x_1 | x_2 x_3 | … | x_{d-2} x_{d-1}]
//!  pair 0    pair 1        pair d/2−1         pair i rotates by pos·inv_freq_i
//! out_{2i}   = m·(x_{2i}·cos − x_{2i+1}·sin)
//! out_{2i+1} = m·(x_{2i+1}·cos + x_{2i}·sin)
//! ```
//!
//! `m` is YaRN's cos/sin factor (1 without YaRN). HF's DeepseekV2 code de-interleaves
//! before rotating and so returns the rotate-half *layout* of the same values; q_pe
//! and k_pe get the same permutation there, so scores are identical. We keep the
//! interleaved layout, as mistral.rs does, so our cached k_pe is in checkpoint order.
//!
//! (The decoder's own [`Rope`](crate::model::Rope) pairs `(i, i + d/2)` instead.)

use candle_core::{Device, Tensor, D};

use super::config::{MlaRopeScaling, MlaSpec};
use crate::error::{Error, Result};

/// Interleaved RoPE over `d_rope` dimensions.
#[derive(Debug, Clone)]
pub struct InterleavedRope {
    inv_freq: Vec<f64>,
    /// Factor on cos and sin (YaRN `mscale` ratio; 1 otherwise).
    cos_sin_factor: f64,
}

impl InterleavedRope {
    /// Plain RoPE: `inv_freq_i = theta^(-2i/dim)`, `i < dim/2`.
    pub fn plain(theta: f64, dim: usize) -> Self {
        let inv_freq = (0..dim / 2)
            .map(|i| theta.powf(-2.0 * i as f64 / dim as f64))
            .collect();
        InterleavedRope {
            inv_freq,
            cos_sin_factor: 1.0,
        }
    }

    /// The RoPE an MLA layer of `spec` uses (its `d_rope`, θ and scaling).
    pub fn from_spec(spec: &MlaSpec) -> Self {
        let dim = spec.shape.qk_rope_head_dim;
        match &spec.rope_scaling {
            MlaRopeScaling::None => Self::plain(spec.rope_theta, dim),
            MlaRopeScaling::Yarn(y) => InterleavedRope {
                inv_freq: y.inv_freq(spec.rope_theta, dim),
                cos_sin_factor: y.cos_sin_factor(),
            },
        }
    }

    /// Inverse frequency of each pair, highest first.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Rotated width `d_rope`.
    pub fn dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `(cos, sin)` tables, each `(seq, d_rope/2, 1)` f32 (factor included), for
    /// positions `start..start + seq`.
    fn tables(&self, start: usize, seq: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        self.tables_at(start..start + seq, device)
    }

    /// `(cos, sin)` tables, each `(positions, d_rope/2, 1)` f32 (factor included).
    fn tables_at(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (n, half) = (positions.len(), self.inv_freq.len());
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in positions {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push((a.cos() * self.cos_sin_factor) as f32);
                sin.push((a.sin() * self.cos_sin_factor) as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (n, half, 1), device)?;
        let sin = Tensor::from_vec(sin, (n, half, 1), device)?;
        Ok((cos, sin))
    }

    /// Rotate one token per batch row, each at its own position: `x` `(batch, heads,
    /// d_rope)`, row `b` at `positions[b]` (a decode step of sequences of different
    /// lengths, in one launch per op on any device).
    pub fn apply_at(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let (b, h, dim) = x.dims3()?;
        if dim != self.dim() || b != positions.len() {
            return Err(Error::InvalidInput(format!(
                "RoPE input {:?} for {} positions, expected (batch = positions, heads, {})",
                x.dims(),
                positions.len(),
                self.dim()
            )));
        }
        let half = dim / 2;
        let (cos, sin) = self.tables_at(positions.iter().copied(), x.device())?;
        let cos = cos.to_dtype(x.dtype())?.reshape((b, 1, half, 1))?;
        let sin = sin.to_dtype(x.dtype())?.reshape((b, 1, half, 1))?;
        let pairs = x.reshape((b, h, half, 2))?;
        let even = pairs.narrow(D::Minus1, 0, 1)?;
        let odd = pairs.narrow(D::Minus1, 1, 1)?;
        let out_even = (even.broadcast_mul(&cos)? - odd.broadcast_mul(&sin)?)?;
        let out_odd = (odd.broadcast_mul(&cos)? + even.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[out_even, out_odd], D::Minus1)?.reshape((b, h, dim))?)
    }

    /// Rotate `x` `(batch, heads, seq, d_rope)` for positions `start..start + seq`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (b, h, seq, dim) = x.dims4()?;
        if dim != self.dim() {
            return Err(Error::InvalidInput(format!(
                "RoPE input has {dim} dims, expected d_rope = {}",
                self.dim()
            )));
        }
        let half = dim / 2;
        let (cos, sin) = self.tables(start, seq, x.device())?;
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        // (b, h, seq, d) → (b, h, seq, d/2, 2): the last axis is the pair.
        let pairs = x.reshape((b, h, seq, half, 2))?;
        let even = pairs.narrow(D::Minus1, 0, 1)?;
        let odd = pairs.narrow(D::Minus1, 1, 1)?;
        let out_even = (even.broadcast_mul(&cos)? - odd.broadcast_mul(&sin)?)?;
        let out_odd = (odd.broadcast_mul(&cos)? + even.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[out_even, out_odd], D::Minus1)?.reshape((b, h, seq, dim))?)
    }

    /// Slow elementwise rotation of one vector at `pos`, in f64 (the oracle for
    /// [`InterleavedRope::apply`] and for [`super::reference`]).
    pub fn apply_slow(&self, x: &[f64], pos: usize) -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let a = pos as f64 * f;
            let (c, s) = (a.cos() * self.cos_sin_factor, a.sin() * self.cos_sin_factor);
            out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s;
            out[2 * i + 1] = x[2 * i + 1] * c + x[2 * i] * s;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mla::config::{MlaShape, YarnScaling};

    #[test]
    fn apply_at_rotates_each_row_at_its_own_position() {
        let rope = InterleavedRope::plain(10000.0, 8);
        let (b, h) = (3, 2);
        let data: Vec<f32> = (0..b * h * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(data.clone(), (b, h, 8), &Device::Cpu).unwrap();
        let positions = [0, 17, 4096];
        let got = rope.apply_at(&x, &positions).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (bi, &p) in positions.iter().enumerate() {
            for hi in 0..h {
                let o = (bi * h + hi) * 8;
                let v: Vec<f64> = data[o..o + 8].iter().map(|&v| v as f64).collect();
                for (g, w) in got[o..o + 8].iter().zip(rope.apply_slow(&v, p)) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5,
                        "row {bi} head {hi}: {g} vs {w}"
                    );
                }
            }
        }
        assert!(rope.apply_at(&x, &[1, 2]).is_err());
    }

    fn check_against_slow(rope: &InterleavedRope, start: usize) {
        let dim = rope.dim();
        let (heads, seq) = (3, 4);
        let data: Vec<f32> = (0..2 * heads * seq * dim)
            .map(|v| (v as f32 * 0.37).sin() * 2.0)
            .collect();
        let x = Tensor::from_vec(data.clone(), (2, heads, seq, dim), &Device::Cpu).unwrap();
        let y = rope
            .apply(&x, start)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for row in 0..2 * heads * seq {
            let t = row % seq;
            let o = row * dim;
            let xs: Vec<f64> = data[o..o + dim].iter().map(|&v| v as f64).collect();
            let want = rope.apply_slow(&xs, start + t);
            for i in 0..dim {
                let err = (y[o + i] as f64 - want[i]).abs();
                assert!(err < 1e-5, "row {row} dim {i}: {} vs {}", y[o + i], want[i]);
            }
        }
    }

    #[test]
    fn apply_matches_slow_rotation_plain_and_yarn() {
        check_against_slow(&InterleavedRope::plain(10_000.0, 8), 0);
        check_against_slow(&InterleavedRope::plain(500_000.0, 64), 1234);
        let spec = MlaSpec {
            shape: MlaShape {
                num_heads: 1,
                qk_nope_head_dim: 2,
                qk_rope_head_dim: 16,
                v_head_dim: 2,
                kv_lora_rank: 2,
            },
            rope_theta: 10_000.0,
            rope_scaling: MlaRopeScaling::Yarn(YarnScaling {
                factor: 4.0,
                original_max_position_embeddings: 64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 0.0,
            }),
            norm_eps: 1e-6,
            attention_bias: false,
            q_lora_rank: None,
        };
        let rope = InterleavedRope::from_spec(&spec);
        assert!(rope.cos_sin_factor > 1.0, "mscale 1 over mscale_all_dim 0");
        check_against_slow(&rope, 77);
    }

    /// The pairing itself: a unit vector in dim 2 (pair 1's first slot) rotates into
    /// dims 2 and 3 only, by pos·inv_freq_1.
    #[test]
    fn pairs_are_adjacent_dims() {
        let rope = InterleavedRope::plain(100.0, 8);
        let mut x = vec![0f32; 8];
        x[2] = 1.0;
        let t = Tensor::from_vec(x, (1, 1, 1, 8), &Device::Cpu).unwrap();
        let y = rope
            .apply(&t, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let a = 3.0 * rope.inv_freq()[1];
        assert!((y[2] as f64 - a.cos()).abs() < 1e-6);
        assert!((y[3] as f64 - a.sin()).abs() < 1e-6);
        for i in [0, 1, 4, 5, 6, 7] {
            assert_eq!(y[i], 0.0, "dim {i} untouched");
        }
        let err = rope
            .apply(
                &Tensor::zeros((1, 1, 1, 6), candle_core::DType::F32, &Device::Cpu).unwrap(),
                0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("expected d_rope = 8"), "{err}");
    }
}
