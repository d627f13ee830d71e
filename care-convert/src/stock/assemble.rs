//! Assembling one stock DeepSeek-V2 MLA layer (`q_lora_rank = null`) from the RoPE split
//! and the joint latent, including the `kv_a_layernorm` handling and padding to one
//! `kv_lora_rank`.
//!
//! # The latent RMSNorm
//!
//! Stock loaders always apply `c ← RMSNorm(c)·γ` to the latent; a training-free
//! conversion has no such norm. Two ways to make it (nearly) the identity:
//!
//! - [`LatentNorm::BiasAnchor`] (default; needs `attention_bias = true`): one extra latent
//!   dim gets zero weights and a bias `A` far larger than any latent's norm (2¹⁶× the
//!   calibration RMS norm, rounded up to a power of two; 2¹⁰× left a measurable 10⁻⁴
//!   logit error in `tests/stock_exact.rs`). Then RMS over the `n` latent dims ≈ `A/√n`
//!   for every token, the norm is linear up to a relative error ‖c‖²/(2A²), and with
//!   γ = A/√n on the real dims it
//!   returns `c` itself. The anchor dim's output ≈ 1 (γ = 1/√n), so its `kv_b_proj`
//!   column carries constant key/value offsets: Qwen2's `k_proj`/`v_proj` biases fold in
//!   exactly there. Costs one latent dim and zero `o_proj` biases. Needs bf16/f32
//!   (A² overflows f16).
//! - [`LatentNorm::MeanRms`] (`attention_bias = false`): γ = RMS norm of the latent on the
//!   calibration data, so the norm is right on average and wrong per token by ‖c‖/E‖c‖.
//!
//! Per-layer ranks below `kv_lora_rank` are padded with zero rows in `kv_a`, zero columns
//! in `kv_b` and γ = 0; the padding is exact under both schemes because the RMS either
//! comes from the anchor or was calibrated over the padded width.
#![allow(non_snake_case)]

use faer::Mat;
use serde::{Deserialize, Serialize};

use super::joint::JointLatent;
use super::rope_split::RopeSplit;
use crate::error::{Error, Result};

/// How `kv_a_layernorm` is neutralized (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LatentNorm {
    /// A constant anchor dim through the `kv_a` bias: the norm becomes linear.
    #[default]
    BiasAnchor,
    /// γ = the calibration RMS norm of the latent: right on average only.
    MeanRms,
}

impl LatentNorm {
    /// Latent dims the scheme uses besides the real rank.
    pub fn extra_dims(self) -> usize {
        match self {
            LatentNorm::BiasAnchor => 1,
            LatentNorm::MeanRms => 0,
        }
    }
}

/// The original attention weights of one layer (HF layout, f64).
pub struct SourceAttention {
    /// `[n_h·d, hidden]`.
    pub q: Mat<f64>,
    pub q_bias: Option<Vec<f64>>,
    /// `[g·d, hidden]`.
    pub v: Mat<f64>,
    pub k_bias: Option<Vec<f64>>,
    pub v_bias: Option<Vec<f64>>,
    /// `[hidden, n_h·d]`.
    pub o: Mat<f64>,
}

/// Head layout shared by every layer.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    /// The padded latent width `n` (`kv_lora_rank` in config.json).
    pub kv_lora_rank: usize,
    /// `v_head_dim` ≥ head_dim: values padded with exact zeros (zero `kv_b` rows, zero
    /// `o_proj` columns). mistral.rs 0.8.1's CPU attention needs `v_head_dim` equal to
    /// the query head width `head_dim + rope_dim`.
    pub v_head_dim: usize,
}

/// A query bias folded through a q-LoRA whose norm is anchored like the latent's:
/// `q_a = [I; 0]` with bias `[0; A_q]`, γ_q = `[A_q/√m; 1/√m]` (m = hidden + 1), so
/// `RMSNorm(q_a x + b)·γ_q ≈ [x; 1]` and `q_b_proj = [W_q | b_q]` reproduces `W_q x + b_q`.
#[derive(Debug, Clone)]
pub struct QBiasFold {
    /// `[hidden + 1, hidden]`.
    pub q_a_proj: Mat<f64>,
    /// `[hidden + 1]`.
    pub q_a_bias: Vec<f64>,
    /// `[hidden + 1]`.
    pub q_a_layernorm: Vec<f64>,
    pub anchor: f64,
}

/// One stock layer's weights (f64, DeepSeek-V2 names and layouts).
#[derive(Debug, Clone)]
pub struct StockLayer {
    /// `[n_h·(d + d_rope), hidden]`; with a folded query bias this is `q_b_proj`,
    /// `[n_h·(d + d_rope), hidden + 1]` (last column: the bias).
    pub q_proj: Mat<f64>,
    /// The q-LoRA that carries a source query bias (Qwen2), if any.
    pub q_fold: Option<QBiasFold>,
    /// `[n + d_rope, hidden]`.
    pub kv_a_proj_with_mqa: Mat<f64>,
    /// `[n + d_rope]` iff `attention_bias`.
    pub kv_a_bias: Option<Vec<f64>>,
    /// `[n]`.
    pub kv_a_layernorm: Vec<f64>,
    /// `[n_h·(d + d_v), n]`.
    pub kv_b_proj: Mat<f64>,
    /// `[hidden, n_h·d_v]`.
    pub o_proj: Mat<f64>,
    /// `[hidden]` iff `attention_bias` (zeros: the source has none).
    pub o_bias: Option<Vec<f64>>,
    /// The anchor constant, if any.
    pub anchor: Option<f64>,
}

/// Assemble layer weights. `latent_energy` is E‖a·x‖² and `input_energy` E‖x‖² per token
/// on the calibration data.
pub fn assemble_layer(
    heads: Heads,
    src: &SourceAttention,
    split: &RopeSplit,
    joint: &JointLatent,
    latent_energy: f64,
    input_energy: f64,
    norm: LatentNorm,
) -> Result<StockLayer> {
    let Heads {
        num_heads: nh,
        num_kv_heads: g,
        head_dim: d,
        rope_dim: dr,
        kv_lora_rank: n,
        v_head_dim: dv,
    } = heads;
    if dv < d {
        return Err(Error::InvalidOption(format!(
            "v_head_dim {dv} is smaller than the head dimension {d}"
        )));
    }
    let hidden = src.q.ncols();
    let r = joint.a.nrows();
    if r + norm.extra_dims() > n {
        return Err(Error::InvalidOption(format!(
            "latent rank {r} + {} anchor dim(s) exceeds kv_lora_rank {n}",
            norm.extra_dims()
        )));
    }
    if (src.q_bias.is_some() || src.k_bias.is_some() || src.v_bias.is_some())
        && norm != LatentNorm::BiasAnchor
    {
        return Err(Error::InvalidOption(
            "q/k/v biases fold only through bias anchors: use --latent-norm bias-anchor".into(),
        ));
    }
    let rep = nh / g;
    // Softmax scale moves from 1/√d to 1/√(d + d_rope): pre-scale the queries.
    let q_scale = ((d + dr) as f64 / d as f64).sqrt();
    let qd = d + dr;
    let mut q_proj = Mat::<f64>::zeros(nh * qd, hidden);
    for i in 0..nh {
        let h = i / rep;
        for j in 0..d {
            for k in 0..hidden {
                q_proj[(i * qd + j, k)] = q_scale * src.q[(i * d + j, k)];
            }
        }
        // q̃_p = Σ_j coef[h·d + j, p]·q_i[j].
        for p in 0..dr {
            for k in 0..hidden {
                let mut s = 0.0;
                for j in 0..d {
                    let c = split.rope_coef[(h * d + j, p)];
                    if c != 0.0 {
                        s += c * src.q[(i * d + j, k)];
                    }
                }
                q_proj[(i * qd + d + p, k)] = q_scale * s;
            }
        }
    }

    // A source query bias becomes the last column of q_b_proj, transformed like the rows.
    let q_fold = match &src.q_bias {
        None => None,
        Some(bq) => {
            let m = hidden + 1;
            let a = 2f64.powi((65536.0 * input_energy.max(1e-12).sqrt()).log2().ceil() as i32);
            let mut col = vec![0.0; nh * qd];
            for i in 0..nh {
                let h = i / rep;
                for j in 0..d {
                    col[i * qd + j] = q_scale * bq[i * d + j];
                }
                for p in 0..dr {
                    col[i * qd + d + p] = q_scale
                        * (0..d)
                            .map(|j| split.rope_coef[(h * d + j, p)] * bq[i * d + j])
                            .sum::<f64>();
                }
            }
            q_proj = Mat::from_fn(
                nh * qd,
                m,
                |r, c| {
                    if c < hidden {
                        q_proj[(r, c)]
                    } else {
                        col[r]
                    }
                },
            );
            let mut bias = vec![0.0; m];
            bias[hidden] = a;
            let mut gamma = vec![a / (m as f64).sqrt(); m];
            gamma[hidden] = 1.0 / (m as f64).sqrt();
            Some(QBiasFold {
                q_a_proj: Mat::from_fn(m, hidden, |r, c| if r == c { 1.0 } else { 0.0 }),
                q_a_bias: bias,
                q_a_layernorm: gamma,
                anchor: a,
            })
        }
    };

    let mut kv_a = Mat::<f64>::zeros(n + dr, hidden);
    for m in 0..r {
        for k in 0..hidden {
            kv_a[(m, k)] = joint.a[(m, k)];
        }
    }
    for p in 0..dr {
        for k in 0..hidden {
            kv_a[(n + p, k)] = split.k_pe[(p, k)];
        }
    }
    let mut gamma = vec![0.0; n];
    // Per head: d key rows, then d_v value rows (the last d_v − d are zero padding).
    let kvd = d + dv;
    let mut kv_b = Mat::<f64>::zeros(nh * kvd, n);
    for i in 0..nh {
        let h = i / rep;
        for j in 0..d {
            for m in 0..r {
                kv_b[(i * kvd + j, m)] = joint.b_k[(h * d + j, m)];
                kv_b[(i * kvd + d + j, m)] = joint.b_v[(h * d + j, m)];
            }
        }
    }
    let rms_norm_of_latent = latent_energy.max(0.0).sqrt();
    let (kv_a_bias, anchor) = match norm {
        LatentNorm::BiasAnchor => {
            let want = 65536.0 * rms_norm_of_latent.max(1e-6);
            let a = 2f64.powi(want.log2().ceil() as i32);
            let mut bias = vec![0.0; n + dr];
            bias[n - 1] = a;
            for gm in gamma.iter_mut().take(r) {
                *gm = a / (n as f64).sqrt();
            }
            gamma[n - 1] = 1.0 / (n as f64).sqrt();
            if let Some(bk) = &src.k_bias {
                // RoPE part of the key bias goes into k_pe's bias (rotated with it, as in
                // the source); the NoPE rest into the anchor column.
                let b_pe: Vec<f64> = (0..dr)
                    .map(|p| (0..g * d).map(|t| split.rope_coef[(t, p)] * bk[t]).sum())
                    .collect();
                bias[n..n + dr].copy_from_slice(&b_pe);
                for i in 0..nh {
                    let h = i / rep;
                    for j in 0..d {
                        let t = h * d + j;
                        let rope: f64 = (0..dr).map(|p| split.rope_coef[(t, p)] * b_pe[p]).sum();
                        kv_b[(i * kvd + j, n - 1)] = bk[t] - rope;
                    }
                }
            }
            if let Some(bv) = &src.v_bias {
                for i in 0..nh {
                    let h = i / rep;
                    for j in 0..d {
                        kv_b[(i * kvd + d + j, n - 1)] = bv[h * d + j];
                    }
                }
            }
            (Some(bias), Some(a))
        }
        LatentNorm::MeanRms => {
            let g0 = rms_norm_of_latent / (n as f64).sqrt();
            for gm in gamma.iter_mut().take(r) {
                *gm = g0;
            }
            (None, None)
        }
    };
    let attention_bias = kv_a_bias.is_some();
    Ok(StockLayer {
        q_proj,
        q_fold,
        kv_a_proj_with_mqa: kv_a,
        kv_a_bias,
        kv_a_layernorm: gamma,
        kv_b_proj: kv_b,
        o_proj: Mat::from_fn(src.o.nrows(), nh * dv, |row, col| {
            let (i, j) = (col / dv, col % dv);
            if j < d {
                src.o[(row, i * d + j)]
            } else {
                0.0
            }
        }),
        o_bias: attention_bias.then(|| vec![0.0; hidden]),
        anchor,
    })
}
