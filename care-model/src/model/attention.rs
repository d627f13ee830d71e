//! The replaceable attention part of a decoder layer, the per-layer cache it owns,
//! and the reference GQA attention of the original checkpoints.
//!
//! A decoder layer calls [`Attention::forward`] with the RMS-normalized hidden states;
//! what the layer keeps per token is the implementation's business ([`LayerCache`]
//! holds its tensors). The GQA form keeps `k` and `v`; the MLA forms keep latents.

use candle_core::{DType, Device, Tensor, D};

use super::rope::Rope;
use crate::error::{Error, Result};

/// Per-layer cache: tensors of shape `(batch, heads_or_1, tokens, width)` that grow
/// along dim 2. Their meaning is fixed by the [`Attention`] that writes them.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub entries: Vec<Tensor>,
}

impl LayerCache {
    /// Append `new` (one tensor per entry) along the token axis and return the full
    /// tensors.
    pub fn append(&mut self, new: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.entries.is_empty() {
            self.entries = new;
        } else {
            if new.len() != self.entries.len() {
                return Err(Error::InvalidInput(format!(
                    "cache has {} entries, got {}",
                    self.entries.len(),
                    new.len()
                )));
            }
            let joined: Result<Vec<Tensor>> = self
                .entries
                .iter()
                .zip(&new)
                .map(|(old, n)| Ok(Tensor::cat(&[old, n], 2)?))
                .collect();
            self.entries = joined?;
        }
        Ok(self.entries.clone())
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.entries.first().map_or(0, |t| t.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values stored per token (summed over entries and heads).
    pub fn values_per_token(&self) -> usize {
        self.entries
            .iter()
            .map(|t| {
                let d = t.dims();
                d[1] * d[3]
            })
            .sum()
    }
}

/// What every attention implementation receives.
pub struct AttnInput<'a> {
    /// Normalized hidden states `(batch, seq, hidden)`.
    pub x: &'a Tensor,
    /// Position of the first token of `x` (= tokens already in the cache).
    pub start_pos: usize,
    pub rope: &'a Rope,
}

/// The attention block of a decoder layer. Implementations: [`GqaAttention`] here, the
/// MLA forms in `mla_attention::mla`.
pub trait Attention: Send + Sync {
    /// `(batch, seq, hidden)` → `(batch, seq, hidden)`, appending this step's state to
    /// `cache`.
    fn forward(&self, input: &AttnInput<'_>, cache: &mut LayerCache) -> Result<Tensor>;
    /// Cached values per token for this layer (memory accounting).
    fn cache_values_per_token(&self) -> usize;
}

/// `x (…, in) · Wᵀ (+ b)` for a linear layer stored `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // One 2-D GEMM over the flattened rows, never copying the weight. candle's CPU
    // GEMM is fastest with the weight as the contiguous left operand for few rows and
    // as a transposed right operand for many (SmolLM2 forward, 2 cores: 8 rows 58 vs
    // 207 ms, 512 rows 3.07 vs 2.74 s); a broadcast batch matmul was slower still.
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k;
    let x2 = x.reshape((rows, k))?;
    let y2 = if let Some(y) = few_rows_linear(&x2, w)? {
        y
    } else if rows < 256 {
        w.matmul(&x2.t()?)?.t()?.contiguous()?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has at least one dim") = w.dim(0)?;
    let y = y2.reshape(out_dims)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// [`few_rows_matmul`](super::few_rows::few_rows_matmul) for at most `MAX_ROWS` f32 rows on
/// the CPU (decode and draft verification); `None` where it does not apply.
fn few_rows_linear(x2: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    use super::few_rows::{available, few_rows_matmul, MAX_ROWS};
    let (rows, k) = x2.dims2()?;
    // The kernel computes outside candle's graph: never where autograd needs the product
    // (healing trains through `linear`).
    if rows > MAX_ROWS
        || x2.track_op()
        || w.track_op()
        || x2.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !w.device().is_cpu()
        || !w.is_contiguous()
        || !available()
    {
        return Ok(None);
    }
    let out = w.dim(0)?;
    let xs = x2.flatten_all()?.to_vec1::<f32>()?;
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let start = layout.start_offset();
    let ws = &cpu.as_slice::<f32>()?[start..start + out * k];
    let mut y = vec![0f32; rows * out];
    if few_rows_matmul(&xs, rows, ws, out, k, &mut y).is_none() {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(y, (rows, out), x2.device())?))
}

/// Softmax over the last dimension, computed stably.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    // The shift does not change the result, so it carries no gradient (healing's
    // backward pass skips it).
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Additive causal mask `(seq, total)`: query `i` (absolute position `start + i`) may
/// see keys `0..=start + i`.
pub fn causal_mask(seq: usize, total: usize, device: &Device) -> Result<Tensor> {
    let start = total - seq;
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (seq, total), device)?)
}

/// Causal attention where `n_q = group · n_kv` query heads share each KV head
/// (HF `repeat_kv` order: query head `h` reads KV head `h / group`).
///
/// Shapes: `q (b, n_q, t, dk)`, `k (b, n_kv, T, dk)`, `v (b, n_kv, T, dv)` with
/// `T ≥ t` (the last `t` keys are the queries' own positions). Returns `(b, n_q, t, dv)`.
pub fn grouped_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, n_q, t, dk) = q.dims4()?;
    let (_, n_kv, total, _) = k.dims4()?;
    let dv = v.dim(3)?;
    let group = n_q / n_kv;
    // Fold the group into the query axis so each KV head is one batched matmul.
    let q = q.reshape((b, n_kv, group * t, dk))?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    // In the scores' dtype, so a decoder loaded in bf16 (the CUDA runner) runs too.
    let mask = causal_mask(t, total, q.device())?
        .to_dtype(scores.dtype())?
        .repeat((group, 1))?;
    let probs = softmax_last(&scores.broadcast_add(&mask)?)?;
    let out = probs.matmul(v)?;
    Ok(out.reshape((b, n_q, t, dv))?)
}

/// Grouped-query attention of Llama/Qwen2 (the unconverted reference).
#[derive(Debug, Clone)]
pub struct GqaAttention {
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention for GqaAttention {
    fn forward(&self, input: &AttnInput<'_>, cache: &mut LayerCache) -> Result<Tensor> {
        let x = input.x;
        let (b, t, _hidden) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // (b, t, heads·d) → (b, heads, t, d)
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(linear(x, &self.q_proj, self.q_bias.as_ref())?, nh)?;
        let k = heads(linear(x, &self.k_proj, self.k_bias.as_ref())?, nkv)?;
        let v = heads(linear(x, &self.v_proj, self.v_bias.as_ref())?, nkv)?;
        let q = input.rope.apply(&q, input.start_pos)?;
        let k = input.rope.apply(&k, input.start_pos)?;
        let kv = cache.append(vec![k, v])?;
        let out = grouped_causal_attention(&q, &kv[0], &kv[1], 1.0 / (d as f64).sqrt())?;
        let out = out.transpose(1, 2)?.reshape((b, t, nh * d))?;
        linear(&out, &self.o_proj, None)
    }

    fn cache_values_per_token(&self) -> usize {
        2 * self.num_kv_heads * self.head_dim
    }
}

/// Convert to f32 if needed (the reference forward runs in f32).
pub fn ensure_f32(t: Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t
    } else {
        t.to_dtype(DType::F32)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_lower_triangular_with_offset() {
        // seq 2 new tokens after 1 cached: rows see 0..=1 and 0..=2
        //        k0   k1   k2
        // q0  [  0    0  -inf ]
        // q1  [  0    0    0  ]
        let m = causal_mask(2, 3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][..2], [0.0, 0.0]);
        assert!(m[0][2].is_infinite());
        assert_eq!(m[1], vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn grouped_attention_equals_repeated_kv() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 4, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, 2, 5, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 2, 5, 6), &dev).unwrap();
        let got = grouped_causal_attention(&q, &k, &v, 0.3).unwrap();
        // Repeat each KV head for its 2 query heads, then plain attention per head.
        let rep = |x: &Tensor| {
            let (b, n, t, d) = x.dims4().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .expand((b, n, 2, t, d))
                .unwrap()
                .reshape((b, n * 2, t, d))
                .unwrap()
        };
        let (kr, vr) = (rep(&k), rep(&v));
        let s = (q.matmul(&kr.t().unwrap()).unwrap() * 0.3).unwrap();
        let s = s.broadcast_add(&causal_mask(3, 5, &dev).unwrap()).unwrap();
        let want = softmax_last(&s).unwrap().matmul(&vr).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max diff {diff}");
    }
}
