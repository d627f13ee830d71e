//! The one-shot converted attention (the form of CARE's Table 1, Palu-style): K and V
//! are each cached as a low-rank latent and reconstructed at attention time; RoPE is
//! applied to the reconstructed K, so positions stay exact.
//!
//! ```text
//! c_k = A_k x   (r_k values, cached)      K = B_k c_k + b_k → heads → RoPE
//! c_v = A_v x   (r_v values, cached)      V = B_v c_v + b_v → heads
//! ```
//!
//! With a shared latent (MHA2MLA's joint-SVD init) one `c = A x` feeds both K and V.
//! The cache holds only the latents: `r_k + r_v` (or `r`) values per token per layer.

use candle_core::Tensor;

use super::attention::{grouped_causal_attention, linear, Attention, AttnInput, LayerCache};
use crate::error::{Error, Result};

/// Latent factors of one branch: `a` `[r, hidden]`, `b` `[n_kv·d, r]`.
#[derive(Debug, Clone)]
pub struct LatentFactors {
    pub a: Tensor,
    pub b: Tensor,
}

impl LatentFactors {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}

/// Where K and V latents come from.
#[derive(Debug, Clone)]
pub enum LatentKv {
    /// Separate latents for K and V (`r_k + r_v` cached values).
    Separate { k: LatentFactors, v: LatentFactors },
    /// One latent `c = a·x` with two up-projections (`r` cached values).
    Shared { a: Tensor, b_k: Tensor, b_v: Tensor },
}

/// GQA attention whose K/V projections are low rank and whose cache holds latents.
#[derive(Debug, Clone)]
pub struct LowRankKvAttention {
    pub q_proj: Tensor,
    pub q_bias: Option<Tensor>,
    pub kv: LatentKv,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub o_proj: Tensor,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl LowRankKvAttention {
    /// Check the factor shapes against the head layout.
    pub fn validate(&self, hidden: usize) -> Result<()> {
        let kv_width = self.num_kv_heads * self.head_dim;
        let check =
            |what: &str, t: &Tensor, rows: Option<usize>, cols: Option<usize>| -> Result<()> {
                let d = t.dims();
                let ok = d.len() == 2
                    && rows.is_none_or(|r| d[0] == r)
                    && cols.is_none_or(|c| d[1] == c);
                if ok {
                    Ok(())
                } else {
                    Err(Error::InvalidInput(format!(
                        "{what} has shape {d:?}, expected [{}, {}]",
                        rows.map_or("r".into(), |r| r.to_string()),
                        cols.map_or("r".into(), |c| c.to_string())
                    )))
                }
            };
        match &self.kv {
            LatentKv::Separate { k, v } => {
                check("k latent a", &k.a, None, Some(hidden))?;
                check("k latent b", &k.b, Some(kv_width), Some(k.rank()))?;
                check("v latent a", &v.a, None, Some(hidden))?;
                check("v latent b", &v.b, Some(kv_width), Some(v.rank()))?;
            }
            LatentKv::Shared { a, b_k, b_v } => {
                let r = a.dims()[0];
                check("shared latent a", a, None, Some(hidden))?;
                check("k up-projection", b_k, Some(kv_width), Some(r))?;
                check("v up-projection", b_v, Some(kv_width), Some(r))?;
            }
        }
        Ok(())
    }
}

impl LowRankKvAttention {
    /// Widths of the cache entries, in cache order: `[r_k, r_v]`, or `[r]` when shared.
    pub fn entry_widths(&self) -> Vec<usize> {
        match &self.kv {
            LatentKv::Separate { k, v } => vec![k.rank(), v.rank()],
            LatentKv::Shared { a, .. } => vec![a.dims()[0]],
        }
    }

    /// Decode one token against latents kept elsewhere (a paged cache): `x`
    /// `(1, 1, hidden)` at position `T` after `latents` `(1, 1, T, Σ entry widths)` (the
    /// entries side by side). Returns the attention output `(1, 1, hidden)` and the
    /// token's own latent row `(1, 1, 1, Σ widths)` to store. K must be rebuilt from
    /// every cached latent (RoPE is applied after the up-projection, so it cannot be
    /// absorbed into the query as in MLA).
    pub fn decode_over(
        &self,
        x: &Tensor,
        latents: &Tensor,
        rope: &super::Rope,
    ) -> Result<(Tensor, Tensor)> {
        let widths = self.entry_widths();
        let (_b, _one, total, width) = latents.dims4()?;
        if width != widths.iter().sum::<usize>() {
            return Err(Error::InvalidInput(format!(
                "low-rank decode: latent rows of width {width}, the layer caches {widths:?}"
            )));
        }
        let mut entries = Vec::with_capacity(widths.len());
        let mut off = 0;
        for &w in &widths {
            entries.push(latents.narrow(3, off, w)?.contiguous()?);
            off += w;
        }
        let mut cache = LayerCache { entries };
        let input = AttnInput {
            x,
            start_pos: total,
            rope,
        };
        let out = self.forward(&input, &mut cache)?;
        let row: Vec<Tensor> = cache
            .entries
            .iter()
            .map(|e| e.narrow(2, total, 1))
            .collect::<candle_core::Result<_>>()?;
        Ok((out, Tensor::cat(&row, 3)?))
    }
}

impl Attention for LowRankKvAttention {
    fn forward(&self, input: &AttnInput<'_>, cache: &mut LayerCache) -> Result<Tensor> {
        let x = input.x;
        let (b, t, _hidden) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = linear(x, &self.q_proj, self.q_bias.as_ref())?
            .reshape((b, t, nh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = input.rope.apply(&q, input.start_pos)?;
        // Latents of the new tokens as (b, 1, t, r), appended to the cache.
        let lat = |a: &Tensor| -> Result<Tensor> { Ok(linear(x, a, None)?.unsqueeze(1)?) };
        let (k_lat, v_lat, b_k, b_v) = match &self.kv {
            LatentKv::Separate { k, v } => {
                let all = cache.append(vec![lat(&k.a)?, lat(&v.a)?])?;
                (all[0].clone(), all[1].clone(), &k.b, &v.b)
            }
            LatentKv::Shared { a, b_k, b_v } => {
                let all = cache.append(vec![lat(a)?])?;
                (all[0].clone(), all[0].clone(), b_k, b_v)
            }
        };
        let total = k_lat.dims()[2];
        // Reconstruct K/V for every cached position: (b, T, n_kv·d) → (b, n_kv, T, d).
        let heads = |lat: &Tensor, up: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
            Ok(linear(&lat.squeeze(1)?, up, bias)?
                .reshape((b, total, nkv, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let k = input
            .rope
            .apply(&heads(&k_lat, b_k, self.k_bias.as_ref())?, 0)?;
        let v = heads(&v_lat, b_v, self.v_bias.as_ref())?;
        let out = grouped_causal_attention(&q, &k, &v, 1.0 / (d as f64).sqrt())?;
        let out = out.transpose(1, 2)?.reshape((b, t, nh * d))?;
        linear(&out, &self.o_proj, None)
    }

    fn cache_values_per_token(&self) -> usize {
        match &self.kv {
            LatentKv::Separate { k, v } => k.rank() + v.rank(),
            LatentKv::Shared { a, .. } => a.dims()[0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeScaling;
    use crate::model::attention::GqaAttention;
    use crate::model::rope::Rope;
    use candle_core::Device;

    /// At full rank (A = I, B = W) the low-rank form equals GQA, prefill and decode.
    #[test]
    fn full_rank_latents_equal_gqa() {
        let dev = Device::Cpu;
        let (h, nh, nkv, d) = (16, 4, 2, 4);
        let w = |r, c| Tensor::randn(0f32, 0.3, (r, c), &dev).unwrap();
        let gqa = GqaAttention {
            q_proj: w(nh * d, h),
            k_proj: w(nkv * d, h),
            v_proj: w(nkv * d, h),
            o_proj: w(h, nh * d),
            q_bias: None,
            k_bias: Some(Tensor::randn(0f32, 0.1, nkv * d, &dev).unwrap()),
            v_bias: None,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        };
        let eye = Tensor::eye(h, candle_core::DType::F32, &dev).unwrap();
        let low = LowRankKvAttention {
            q_proj: gqa.q_proj.clone(),
            q_bias: None,
            kv: LatentKv::Separate {
                k: LatentFactors {
                    a: eye.clone(),
                    b: gqa.k_proj.clone(),
                },
                v: LatentFactors {
                    a: eye,
                    b: gqa.v_proj.clone(),
                },
            },
            k_bias: gqa.k_bias.clone(),
            v_bias: None,
            o_proj: gqa.o_proj.clone(),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        };
        low.validate(h).unwrap();
        let rope = Rope::with_dim(10_000.0, d, &RopeScaling::None);
        let x = Tensor::randn(0f32, 1., (1, 7, h), &dev).unwrap();
        let (mut c1, mut c2) = (LayerCache::default(), LayerCache::default());
        let run = |a: &dyn Attention, c: &mut LayerCache, x: &Tensor, s| {
            a.forward(
                &AttnInput {
                    x,
                    start_pos: s,
                    rope: &rope,
                },
                c,
            )
            .unwrap()
        };
        let y1 = Tensor::cat(
            &[
                run(&gqa, &mut c1, &x.narrow(1, 0, 5).unwrap(), 0),
                run(&gqa, &mut c1, &x.narrow(1, 5, 2).unwrap(), 5),
            ],
            1,
        )
        .unwrap();
        let y2 = Tensor::cat(
            &[
                run(&low, &mut c2, &x.narrow(1, 0, 5).unwrap(), 0),
                run(&low, &mut c2, &x.narrow(1, 5, 2).unwrap(), 5),
            ],
            1,
        )
        .unwrap();
        let diff = (y1 - y2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        assert_eq!(low.cache_values_per_token(), 2 * h);
        assert_eq!(c2.values_per_token(), 2 * h);
    }
}
