//! Rotary position embedding in Hugging Face's rotate-half layout.
//!
//! Dimension `i < d/2` of a head is paired with `i + d/2` and both rotate by angle
//! `pos · inv_freq[i]`:
//!
//! ```text
//! [x_0 … x_{d/2-1} | x_{d/2} … x_{d-1}]
//!   └──── pair (i, i + d/2) rotates by pos·θ_i ────┘
//! out_lo = x_lo·cos − x_hi·sin,   out_hi = x_hi·cos + x_lo·sin
//! ```
//!
//! (llama.cpp's interleaved pairs `(2i, 2i+1)` are converted to this layout when GGUF
//! weights are loaded; see `io::gguf_weights`.)

use candle_core::{Device, Tensor, D};

use crate::config::{ModelSpec, RopeScaling};
use crate::error::Result;

/// RoPE inverse frequencies for a head of `dim` rotary dimensions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    /// Frequencies for the model's full head dimension, with its scaling applied.
    pub fn new(spec: &ModelSpec) -> Self {
        Self::with_dim(spec.rope_theta, spec.head_dim, &spec.rope_scaling)
    }

    /// Frequencies `θ_i = base^(-2i/dim)`, `i < dim/2`, then scaled.
    pub fn with_dim(base: f64, dim: usize, scaling: &RopeScaling) -> Self {
        let mut inv_freq: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f64 / dim as f64))
            .collect();
        match scaling {
            RopeScaling::None => {}
            RopeScaling::FreqFactors(f) => {
                for (q, &s) in inv_freq.iter_mut().zip(f) {
                    *q /= s as f64;
                }
            }
            RopeScaling::Llama3(s) => {
                let old = s.original_max_position_embeddings as f64;
                let low_wavelen = old / s.low_freq_factor;
                let high_wavelen = old / s.high_freq_factor;
                for q in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *q;
                    if wavelen > low_wavelen {
                        *q /= s.factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        *q = (1.0 - smooth) * *q / s.factor + smooth * *q;
                    }
                }
            }
        }
        Rope { inv_freq }
    }

    /// The inverse frequencies, highest first.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// `(cos, sin)`, each `(seq, dim/2)` f32, for positions `start..start + seq`.
    pub fn tables(&self, start: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for p in start..start + seq {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (seq, half), &Device::Cpu)?;
        let sin = Tensor::from_vec(sin, (seq, half), &Device::Cpu)?;
        Ok((cos, sin))
    }

    /// Rotate `x` of shape `(batch, heads, seq, dim)` for positions `start..start + seq`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_b, _h, seq, dim) = x.dims4()?;
        let half = dim / 2;
        let (cos, sin) = self.tables(start, seq)?;
        let (cos, sin) = (cos.to_device(x.device())?, sin.to_device(x.device())?);
        let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
        let lo = x.narrow(D::Minus1, 0, half)?;
        let hi = x.narrow(D::Minus1, half, half)?;
        let out_lo = (lo.broadcast_mul(&cos)? - hi.broadcast_mul(&sin)?)?;
        let out_hi = (hi.broadcast_mul(&cos)? + lo.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[out_lo, out_hi], D::Minus1)?)
    }
}

/// Slow elementwise rotation used to check [`Rope::apply`].
#[cfg(test)]
fn apply_slow(rope: &Rope, x: &[f32], pos: usize) -> Vec<f32> {
    let half = x.len() / 2;
    let mut out = vec![0f32; x.len()];
    for i in 0..half {
        let a = pos as f64 * rope.inv_freq[i];
        let (c, s) = (a.cos(), a.sin());
        out[i] = (x[i] as f64 * c - x[i + half] as f64 * s) as f32;
        out[i + half] = (x[i + half] as f64 * c + x[i] as f64 * s) as f32;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Llama3RopeScaling;

    #[test]
    fn apply_matches_slow_rotation() {
        let rope = Rope::with_dim(10_000.0, 8, &RopeScaling::None);
        let data: Vec<f32> = (0..2 * 3 * 8).map(|v| (v as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(data.clone(), (1, 2, 3, 8), &Device::Cpu).unwrap();
        let y = rope
            .apply(&x, 5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for h in 0..2 {
            for t in 0..3 {
                let o = (h * 3 + t) * 8;
                let want = apply_slow(&rope, &data[o..o + 8], 5 + t);
                for i in 0..8 {
                    assert!((y[o + i] - want[i]).abs() < 1e-5, "h{h} t{t} i{i}");
                }
            }
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = Rope::with_dim(500_000.0, 128, &RopeScaling::None);
        let scaled = Rope::with_dim(500_000.0, 128, &RopeScaling::Llama3(s));
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-18);
    }
}
