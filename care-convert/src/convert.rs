//! The one-shot conversion (CARE Table 1 form): every layer's `k_proj` and `v_proj` are
//! replaced by rank-r factors `W ≈ B·A` whose latents `A·x` are what the model caches.
//!
//! Pipeline per model: calibration statistics (already collected) → per-layer
//! decomposition (SVD once per layer and branch) → rank plan (uniform or water-filling
//! over the spectra, under one budget per branch) → truncation → the converted
//! [`Decoder`] with [`LowRankKvAttention`] layers. In sequential mode layer l is
//! calibrated on the outputs of the already-converted layers 0..l-1.

use std::time::Instant;

use candle_core::{Device, Tensor};
use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::calibrate::StatsCollector;
use crate::error::{Error, Result};
use crate::factorize::{
    Decomposition, FactorOptions, InputStats, JointDecomposition, JointLowRank, LowRank, Method,
    Rescues, SquareRoot, Whitening, DEFAULT_ASVD_ALPHA,
};
use crate::ranks::{budget_from_keep, water_fill, water_fill_authors, RankPlan};
use mla_attention::config::ModelSpec;
use mla_attention::io::WeightSource;
use mla_attention::model::{Decoder, LatentFactors, LatentKv, LowRankKvAttention};

/// A conversion method as users name it: factorization plus rank policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConvertMethod {
    /// CARE, uniform ranks (CARE-U).
    CareU,
    /// CARE, water-filling ranks with the paper's score (CARE-E).
    CareE,
    /// CARE, water-filling with the authors' code score (depth horizon, rank penalty).
    CareEDepth,
    /// CARE's C-based variant (SVD of C·W), uniform ranks.
    CareC,
    /// Plain SVD per matrix (Palu), uniform ranks.
    Palu,
    /// ASVD: diag(mean|x|)^0.5 scaling, uniform ranks.
    Asvd,
    /// SVD-LLM: Cholesky whitening, uniform ranks.
    SvdLlm,
    /// MHA2MLA joint-SVD init: one shared latent of 2r for K and V.
    Mha2mla,
    /// CARE in the joint form: one shared latent of 2r for K and V, covariance-aware
    /// (the same latent layout as MHA2MLA, CARE's objective).
    CareJoint,
}

impl ConvertMethod {
    pub const ALL: [ConvertMethod; 9] = [
        ConvertMethod::CareU,
        ConvertMethod::CareE,
        ConvertMethod::CareEDepth,
        ConvertMethod::CareC,
        ConvertMethod::Palu,
        ConvertMethod::Asvd,
        ConvertMethod::SvdLlm,
        ConvertMethod::Mha2mla,
        ConvertMethod::CareJoint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ConvertMethod::CareU => "care-u",
            ConvertMethod::CareE => "care-e",
            ConvertMethod::CareEDepth => "care-e-depth",
            ConvertMethod::CareC => "care-c",
            ConvertMethod::Palu => "palu",
            ConvertMethod::Asvd => "asvd",
            ConvertMethod::SvdLlm => "svd-llm",
            ConvertMethod::Mha2mla => "mha2mla",
            ConvertMethod::CareJoint => "care-joint",
        }
    }

    /// The factorization behind the method.
    pub fn factorization(self) -> Method {
        match self {
            ConvertMethod::CareU
            | ConvertMethod::CareE
            | ConvertMethod::CareEDepth
            | ConvertMethod::CareJoint => Method::Care {
                root: SquareRoot::Symmetric,
            },
            ConvertMethod::CareC => Method::CareCBased,
            ConvertMethod::Palu => Method::PlainSvd,
            ConvertMethod::Asvd => Method::Asvd {
                alpha: DEFAULT_ASVD_ALPHA,
            },
            ConvertMethod::SvdLlm => Method::SvdLlm,
            ConvertMethod::Mha2mla => Method::Mha2MlaJoint,
        }
    }

    /// Whether K and V share one latent (of r_K + r_V values).
    pub fn shared_latent(self) -> bool {
        matches!(self, ConvertMethod::Mha2mla | ConvertMethod::CareJoint)
    }
}

/// Options of one conversion.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertOptions {
    pub method: ConvertMethod,
    /// Fraction of the original per-layer K (and V) width kept as latent rank.
    pub kv_keep: f64,
    /// Relative damping δ of C (C + δ·mean(diag C)·I).
    pub damping: f64,
    /// Water-filling bounds as fractions of the nominal rank r̄ (authors: ½ and 2).
    pub min_rank_frac: f64,
    pub max_rank_frac: f64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            method: ConvertMethod::CareU,
            kv_keep: 0.5,
            damping: crate::factorize::DEFAULT_DAMPING,
            min_rank_frac: 0.5,
            max_rank_frac: 2.0,
        }
    }
}

/// What a conversion did, for the report and `care.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversionSummary {
    pub method: ConvertMethod,
    pub kv_keep: f64,
    /// Nominal rank per branch per layer.
    pub nominal_rank: usize,
    pub plan: RankPlan,
    /// Cached values per token over all layers, original and converted.
    pub kv_values_per_token_original: usize,
    pub kv_values_per_token_converted: usize,
    pub rescues: Vec<Rescues>,
    pub factorize_seconds: f64,
}

/// One layer's factors in f64 (HF layout: `a` `[r, hidden]`, `b` `[out, r]`).
#[derive(Debug, Clone)]
pub enum LayerFactors {
    Separate { k: LowRank, v: LowRank },
    Shared(JointLowRank),
}

/// Tensor `name` of `w` as an f64 matrix; NaN/∞ is an error naming the tensor.
pub(crate) fn weight_mat(w: &dyn WeightSource, name: &str) -> Result<Mat<f64>> {
    let v = w
        .tensor(name)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec2::<f64>()?;
    let (r, c) = (v.len(), v.first().map_or(0, Vec::len));
    if v.iter().flatten().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite(name.to_string()));
    }
    Ok(Mat::from_fn(r, c, |i, j| v[i][j]))
}

/// An f64 vector as an f32 CPU tensor.
pub(crate) fn vec_tensor(v: &[f64]) -> Result<Tensor> {
    let data: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(data, v.len(), &Device::Cpu)?)
}

/// An f64 matrix as an f32 CPU tensor of the same shape.
pub(crate) fn to_tensor(m: &Mat<f64>) -> Result<Tensor> {
    let data: Vec<f32> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
        .map(|(i, j)| m[(i, j)] as f32)
        .collect();
    Ok(Tensor::from_vec(
        data,
        (m.nrows(), m.ncols()),
        &Device::Cpu,
    )?)
}

/// The K and V weights of layer `l` as f64 matrices.
fn kv_weights(w: &dyn WeightSource, l: usize) -> Result<(Mat<f64>, Mat<f64>)> {
    let p = format!("model.layers.{l}.self_attn");
    Ok((
        weight_mat(w, &format!("{p}.k_proj.weight"))?,
        weight_mat(w, &format!("{p}.v_proj.weight"))?,
    ))
}

/// Decompositions of one layer, before truncation.
enum LayerDecomp {
    Separate(
        crate::factorize::Decomposition,
        crate::factorize::Decomposition,
    ),
    Shared(crate::factorize::JointDecomposition),
}

fn decompose_layer(
    method: Method,
    joint: bool,
    stats: &InputStats,
    damping: f64,
    w: &dyn WeightSource,
    l: usize,
) -> Result<(LayerDecomp, Rescues)> {
    let (wk, wv) = kv_weights(w, l)?;
    let wh = Whitening::new(method, stats, &FactorOptions { damping })?;
    let d = if joint {
        LayerDecomp::Shared(JointDecomposition::new(&wh, &[wk.as_ref(), wv.as_ref()])?)
    } else {
        LayerDecomp::Separate(
            Decomposition::new(&wh, wk.as_ref())?,
            Decomposition::new(&wh, wv.as_ref())?,
        )
    };
    Ok((d, *wh.rescues()))
}

/// Per-branch rank plan from the layers' spectra.
fn plan_ranks(
    opts: &ConvertOptions,
    spec: &ModelSpec,
    decomps: &[LayerDecomp],
) -> Result<RankPlan> {
    let n = spec.num_layers;
    let width = spec.num_kv_heads * spec.head_dim;
    let budget = budget_from_keep(opts.kv_keep, n, width)?;
    let r = budget.per_layer;
    match opts.method {
        ConvertMethod::CareE | ConvertMethod::CareEDepth => {
            let min = ((r as f64 * opts.min_rank_frac).floor() as usize).max(1);
            let max = ((r as f64 * opts.max_rank_frac).ceil() as usize).min(width);
            let spectra = |k: bool| -> Vec<Vec<f64>> {
                decomps
                    .iter()
                    .map(|d| match d {
                        LayerDecomp::Separate(dk, dv) => {
                            if k { dk } else { dv }.usable_spectrum().to_vec()
                        }
                        LayerDecomp::Shared(j) => j.spectrum().to_vec(),
                    })
                    .collect()
            };
            let fill = |s: &[Vec<f64>]| {
                if opts.method == ConvertMethod::CareEDepth {
                    water_fill_authors(s, budget.total, min, max)
                } else {
                    water_fill(s, budget.total, min, max, None)
                }
            };
            Ok(RankPlan::new(
                fill(&spectra(true))?,
                fill(&spectra(false))?,
            )?)
        }
        ConvertMethod::Mha2mla | ConvertMethod::CareJoint => {
            Ok(RankPlan::new(vec![r; n], vec![r; n])?)
        }
        _ => Ok(RankPlan::uniform(n, r)),
    }
}

fn truncate(d: &LayerDecomp, rk: usize, rv: usize) -> Result<LayerFactors> {
    Ok(match d {
        LayerDecomp::Separate(dk, dv) => LayerFactors::Separate {
            k: dk.truncate(rk)?,
            v: dv.truncate(rv)?,
        },
        // Equal KV budget: the shared latent has r_k + r_v values.
        LayerDecomp::Shared(j) => LayerFactors::Shared(j.truncate(rk + rv)?),
    })
}

/// Install converted attention for layer `l` of `model` from `factors`.
pub fn install(
    model: &mut Decoder,
    w: &dyn WeightSource,
    l: usize,
    f: &LayerFactors,
) -> Result<()> {
    let spec = model.spec.clone();
    let p = format!("model.layers.{l}.self_attn");
    let get = |n: &str| -> Result<Tensor> { Ok(w.tensor(&format!("{p}.{n}"))?) };
    let bias = |n: &str| -> Result<Option<Tensor>> {
        Ok(if spec.arch.has_qkv_bias() {
            Some(get(&format!("{n}.bias"))?)
        } else {
            None
        })
    };
    let kv = match f {
        LayerFactors::Separate { k, v } => LatentKv::Separate {
            k: LatentFactors {
                a: to_tensor(&k.a)?,
                b: to_tensor(&k.b)?,
            },
            v: LatentFactors {
                a: to_tensor(&v.a)?,
                b: to_tensor(&v.b)?,
            },
        },
        LayerFactors::Shared(j) => LatentKv::Shared {
            a: to_tensor(&j.a)?,
            b_k: to_tensor(&j.b[0])?,
            b_v: to_tensor(&j.b[1])?,
        },
    };
    let attn = LowRankKvAttention {
        q_proj: get("q_proj.weight")?,
        q_bias: bias("q_proj")?,
        kv,
        k_bias: bias("k_proj")?,
        v_bias: bias("v_proj")?,
        o_proj: get("o_proj.weight")?,
        num_heads: spec.num_heads,
        num_kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
    };
    attn.validate(spec.hidden_size)?;
    model.set_attention(l, Box::new(attn))?;
    Ok(())
}

/// Convert every layer of `model` (loaded from `w`) in place, from statistics collected
/// on the original model. Returns the factors and a summary.
pub fn convert_one_pass(
    model: &mut Decoder,
    w: &dyn WeightSource,
    stats: &[InputStats],
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerFactors>, ConversionSummary)> {
    let n = model.layers.len();
    if stats.len() != n {
        return Err(Error::InvalidOption(format!(
            "{} layer statistics for {n} layers",
            stats.len()
        )));
    }
    let started = Instant::now();
    let method = opts.method.factorization();
    let mut decomps = Vec::with_capacity(n);
    let mut rescues = Vec::with_capacity(n);
    for (l, s) in stats.iter().enumerate() {
        let (d, r) = decompose_layer(method, opts.method.shared_latent(), s, opts.damping, w, l)?;
        decomps.push(d);
        rescues.push(r);
        progress(l + 1, 2 * n);
    }
    let plan = plan_ranks(opts, &model.spec, &decomps)?;
    let mut factors = Vec::with_capacity(n);
    for (l, d) in decomps.iter().enumerate() {
        let f = truncate(d, plan.k[l], plan.v[l])?;
        install(model, w, l, &f)?;
        factors.push(f);
        progress(n + l + 1, 2 * n);
    }
    Ok((factors, summary(opts, &model.spec, plan, rescues, started)))
}

/// Layer-sequential conversion: layer l's statistics come from running the windows
/// through the already-converted layers 0..l-1. Ranks come from `plan` (for
/// water-filling, plan on one-pass spectra first).
pub fn convert_sequential(
    model: &mut Decoder,
    w: &dyn WeightSource,
    windows: &[Vec<u32>],
    plan: &RankPlan,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<LayerFactors>, ConversionSummary)> {
    let n = model.layers.len();
    let started = Instant::now();
    let method = opts.method.factorization();
    let mut xs: Vec<Tensor> = windows
        .iter()
        .map(|t| model.embed(t))
        .collect::<std::result::Result<_, _>>()?;
    let mut factors = Vec::with_capacity(n);
    let mut rescues = Vec::with_capacity(n);
    for l in 0..n {
        let mut obs = StatsCollector::only(n, l);
        // Statistics of layer l's input from the converted prefix.
        for x in &xs {
            let mut c = mla_attention::model::LayerCache::default();
            model.layer_forward(l, x, 0, &mut c, Some(&mut obs))?;
        }
        let stats = obs.finish(l)?;
        let (d, r) = decompose_layer(
            method,
            opts.method.shared_latent(),
            &stats,
            opts.damping,
            w,
            l,
        )?;
        let f = truncate(&d, plan.k[l], plan.v[l])?;
        install(model, w, l, &f)?;
        // Advance the residual streams through the converted layer.
        for x in xs.iter_mut() {
            let mut c = mla_attention::model::LayerCache::default();
            *x = model.layer_forward(l, x, 0, &mut c, None)?;
        }
        factors.push(f);
        rescues.push(r);
        progress(l + 1, n);
    }
    Ok((
        factors,
        summary(opts, &model.spec, plan.clone(), rescues, started),
    ))
}

fn summary(
    opts: &ConvertOptions,
    spec: &ModelSpec,
    plan: RankPlan,
    rescues: Vec<Rescues>,
    started: Instant,
) -> ConversionSummary {
    let width = spec.num_kv_heads * spec.head_dim;
    let (tk, tv) = plan.totals();
    ConversionSummary {
        method: opts.method,
        kv_keep: opts.kv_keep,
        nominal_rank: (opts.kv_keep * width as f64).round() as usize,
        kv_values_per_token_original: spec.num_layers * 2 * width,
        kv_values_per_token_converted: tk + tv,
        plan,
        rescues,
        factorize_seconds: started.elapsed().as_secs_f64(),
    }
}
