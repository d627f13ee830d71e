//! Slow, obviously correct MLA: scalar f64 loops over tokens and heads, straight from
//! the formulas in [`super::layer`], with K and V materialized per head. It is the
//! oracle every fast form and kernel is tested against; it shares only the weights
//! and [`InterleavedRope::apply_slow`](super::InterleavedRope::apply_slow) with them.

use candle_core::{DType, Device, Tensor};

use super::config::MlaShape;
use super::layer::MlaAttention;
use crate::error::Result;

/// What [`reference_forward`] returns.
#[derive(Debug, Clone)]
pub struct ReferenceOutput {
    /// `(batch, seq, hidden)`, f32.
    pub out: Tensor,
    /// The cache rows `(batch, 1, seq, r + d_rope)`, f32: `[c ; RoPE(k_pe)]`.
    pub latents: Tensor,
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

fn vec1(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `W x (+ b)` for `W` stored as rows.
fn matvec(w: &[Vec<f64>], x: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    w.iter()
        .enumerate()
        .map(|(i, row)| dot(row, x) + b.map_or(0.0, |b| b[i]))
        .collect()
}

/// Absorbed attention of one sequence over its cached rows `(tokens, rank + rope)`
/// `[c ; k_pe]`, in f64 with a plain softmax: `õ (heads, rank)` for absorbed queries
/// `q_lat (heads, rank)` and RoPE queries `q_pe (heads, rope)`. The oracle of the paged
/// decode kernels (CPU and CUDA), which read the same rows from blocks.
pub fn latent_attention_f64(
    rows: &[f32],
    rank: usize,
    rope: usize,
    q_lat: &[f32],
    q_pe: &[f32],
    scale: f32,
) -> Vec<f64> {
    let width = rank + rope;
    let nh = q_lat.len() / rank;
    let mut out = Vec::with_capacity(nh * rank);
    for h in 0..nh {
        let (ql, qp) = (&q_lat[h * rank..][..rank], &q_pe[h * rope..][..rope]);
        let scores: Vec<f64> = rows
            .chunks_exact(width)
            .map(|row| {
                let d: f64 = ql
                    .iter()
                    .chain(qp)
                    .zip(row)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                d * scale as f64
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let mut o = vec![0.0; rank];
        for (p, row) in e.iter().zip(rows.chunks_exact(width)) {
            o.iter_mut()
                .zip(&row[..rank])
                .for_each(|(a, &c)| *a += p / z * c as f64);
        }
        out.extend(o);
    }
    out
}

/// Causal attention of `x` `(batch, seq, hidden)` at positions `0..seq` (an empty
/// cache), computed in f64.
pub fn reference_forward(attn: &MlaAttention, x: &Tensor) -> Result<ReferenceOutput> {
    let MlaShape {
        num_heads: nh,
        qk_nope_head_dim: dn,
        qk_rope_head_dim: dr,
        v_head_dim: dv,
        kv_lora_rank: r,
    } = attn.shape();
    let w = attn.weights();
    let (wq, wa, wb, wo) = (
        rows(&w.q_proj)?,
        rows(&w.kv_a_proj_with_mqa)?,
        rows(&w.kv_b_proj)?,
        rows(&w.o_proj)?,
    );
    let gamma = vec1(&w.kv_a_layernorm)?;
    let ba = w.kv_a_proj_with_mqa_bias.as_ref().map(vec1).transpose()?;
    let bo = w.o_proj_bias.as_ref().map(vec1).transpose()?;
    let eps = attn.spec().norm_eps;
    let scale = attn.softmax_scale();
    let xs = x.to_dtype(DType::F64)?.to_vec3::<f64>()?;
    let (mut outs, mut lats) = (Vec::new(), Vec::new());
    for seq in &xs {
        let t_len = seq.len();
        // Per token: latent c, rotated shared key, per-head queries.
        let mut c = Vec::with_capacity(t_len);
        let mut k_pe = Vec::with_capacity(t_len);
        let mut q = Vec::with_capacity(t_len);
        for (pos, xt) in seq.iter().enumerate() {
            let a = matvec(&wa, xt, ba.as_deref());
            let ms = a[..r].iter().map(|v| v * v).sum::<f64>() / r as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            let ct: Vec<f64> = (0..r).map(|i| a[i] * inv * gamma[i]).collect();
            k_pe.push(attn.rope().apply_slow(&a[r..], pos));
            lats.extend(ct.iter().chain(k_pe[pos].iter()).map(|&v| v as f32));
            c.push(ct);
            let qt = matvec(&wq, xt, None);
            let heads: Vec<(Vec<f64>, Vec<f64>)> = (0..nh)
                .map(|h| {
                    let o = h * (dn + dr);
                    let rope = attn.rope().apply_slow(&qt[o + dn..o + dn + dr], pos);
                    (qt[o..o + dn].to_vec(), rope)
                })
                .collect();
            q.push(heads);
        }
        // Per head: materialize k_nope and v for every token.
        let kv_head = |h: usize, s: usize| -> (Vec<f64>, Vec<f64>) {
            let o = h * (dn + dv);
            let k: Vec<f64> = (0..dn).map(|i| dot(&wb[o + i], &c[s])).collect();
            let v: Vec<f64> = (0..dv).map(|j| dot(&wb[o + dn + j], &c[s])).collect();
            (k, v)
        };
        let kv: Vec<Vec<(Vec<f64>, Vec<f64>)>> = (0..nh)
            .map(|h| (0..t_len).map(|s| kv_head(h, s)).collect())
            .collect();
        for (t, q_t) in q.iter().enumerate() {
            let mut concat = Vec::with_capacity(nh * dv);
            for (h, (qn, qp)) in q_t.iter().enumerate() {
                let scores: Vec<f64> = (0..=t)
                    .map(|s| (dot(qn, &kv[h][s].0) + dot(qp, &k_pe[s])) * scale)
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                let mut o = vec![0.0; dv];
                for (s, p) in e.iter().enumerate() {
                    for (oj, vj) in o.iter_mut().zip(&kv[h][s].1) {
                        *oj += p / z * vj;
                    }
                }
                concat.extend(o);
            }
            outs.extend(
                matvec(&wo, &concat, bo.as_deref())
                    .into_iter()
                    .map(|v| v as f32),
            );
        }
    }
    let (b, t_len) = (xs.len(), xs.first().map_or(0, Vec::len));
    let hidden = attn.hidden_size();
    Ok(ReferenceOutput {
        out: Tensor::from_vec(outs, (b, t_len, hidden), &Device::Cpu)?,
        latents: Tensor::from_vec(lats, (b, 1, t_len, r + dr), &Device::Cpu)?,
    })
}
