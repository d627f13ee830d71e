//! Calibration: per-layer statistics of the attention input.
//!
//! For every layer l the reference forward's normalized attention input x ∈ R^hidden
//! is accumulated over all calibration tokens into
//!
//! ```text
//! C_l = (1/N) Σ_t x_t x_tᵀ        (uncentred second moment, f64)
//! m_l = (1/N) Σ_t |x_t|           (mean absolute activation, for ASVD)
//! ```
//!
//! Calibration text is a set of random windows (`samples × seq_len` tokens, seeded)
//! drawn from a tokenized corpus; the paper's default is 256 × 32.

use candle_core::{DType, Tensor};
use faer::Mat;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::factorize::InputStats;
use crate::rng::SplitMix64;
use mla_attention::model::{Decoder, ForwardObserver};

/// How calibration windows are drawn.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationOptions {
    /// Number of windows.
    pub samples: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Seed of the window offsets.
    pub seed: u64,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions {
            samples: 256,
            seq_len: 32,
            seed: 42,
        }
    }
}

/// Draw `opts.samples` windows of `opts.seq_len` tokens at seeded random offsets.
pub fn sample_windows(tokens: &[u32], opts: &CalibrationOptions) -> Result<Vec<Vec<u32>>> {
    if opts.samples == 0 || opts.seq_len < 2 {
        return Err(Error::InvalidOption(format!(
            "calibration needs ≥ 1 sample of ≥ 2 tokens (got {} × {})",
            opts.samples, opts.seq_len
        )));
    }
    if tokens.len() < opts.seq_len {
        return Err(Error::InvalidOption(format!(
            "calibration corpus has {} tokens, fewer than one window of {}",
            tokens.len(),
            opts.seq_len
        )));
    }
    let mut rng = SplitMix64::new(opts.seed);
    let span = (tokens.len() - opts.seq_len + 1) as u64;
    Ok((0..opts.samples)
        .map(|_| {
            let o = rng.below(span) as usize;
            tokens[o..o + opts.seq_len].to_vec()
        })
        .collect())
}

/// How many calibration windows share an `n`-token run with `held_out` (evaluation text).
/// The pipeline refuses overlap: calibration and evaluation text must be disjoint.
pub fn overlapping_windows(windows: &[Vec<u32>], held_out: &[u32], n: usize) -> usize {
    if n == 0 || held_out.len() < n {
        return 0;
    }
    let seen: std::collections::HashSet<&[u32]> = held_out.windows(n).collect();
    windows
        .iter()
        .filter(|w| w.windows(n).any(|g| seen.contains(g)))
        .count()
}

/// Running sums of one layer.
#[derive(Debug, Clone)]
struct Accum {
    xtx: Tensor,
    abs_sum: Tensor,
    tokens: u64,
}

/// A [`ForwardObserver`] that accumulates [`InputStats`] for selected layers.
pub struct StatsCollector {
    layers: Vec<Option<Accum>>,
    wanted: Vec<bool>,
}

impl StatsCollector {
    /// Collect for every layer of a model with `n_layers` layers.
    pub fn all(n_layers: usize) -> Self {
        StatsCollector {
            layers: vec![None; n_layers],
            wanted: vec![true; n_layers],
        }
    }

    /// Collect for layer `l` only.
    pub fn only(n_layers: usize, l: usize) -> Self {
        let mut wanted = vec![false; n_layers];
        wanted[l] = true;
        StatsCollector {
            layers: vec![None; n_layers],
            wanted,
        }
    }

    /// The statistics of layer `l`, normalized by the token count.
    pub fn finish(&self, l: usize) -> Result<InputStats> {
        let acc =
            self.layers.get(l).and_then(Option::as_ref).ok_or_else(|| {
                Error::InvalidOption(format!("no calibration data for layer {l}"))
            })?;
        let n = acc.tokens as f64;
        let c = (acc.xtx.clone() / n)?.to_vec2::<f64>()?;
        let m = (acc.abs_sum.clone() / n)?.to_vec1::<f64>()?;
        let dim = c.len();
        if c.iter().flatten().chain(&m).any(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "calibration activations of layer {l}"
            )));
        }
        Ok(InputStats {
            second_moment: Mat::from_fn(dim, dim, |i, j| c[i][j]),
            abs_mean: Some(m),
            tokens: acc.tokens,
        })
    }
}

impl ForwardObserver for StatsCollector {
    fn attention_input(&mut self, layer: usize, x: &Tensor) -> mla_attention::Result<()> {
        if !self.wanted.get(layer).copied().unwrap_or(false) {
            return Ok(());
        }
        let hidden = x.dim(candle_core::D::Minus1)?;
        let x = x.reshape(((), hidden))?.to_dtype(DType::F64)?;
        let xtx = x.t()?.matmul(&x)?;
        let abs = x.abs()?.sum(0)?;
        let rows = x.dim(0)? as u64;
        let slot = &mut self.layers[layer];
        *slot = Some(match slot.take() {
            None => Accum {
                xtx,
                abs_sum: abs,
                tokens: rows,
            },
            Some(a) => Accum {
                xtx: (a.xtx + xtx)?,
                abs_sum: (a.abs_sum + abs)?,
                tokens: a.tokens + rows,
            },
        });
        Ok(())
    }
}

/// One pass of the windows through `model`, collecting statistics of every layer.
pub fn collect_all(
    model: &Decoder,
    windows: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<InputStats>> {
    let n = model.layers.len();
    let mut obs = StatsCollector::all(n);
    for (i, w) in windows.iter().enumerate() {
        let mut cache = model.new_cache();
        model.forward_hidden(w, &mut cache, Some(&mut obs))?;
        progress(i + 1, windows.len());
    }
    (0..n).map(|l| obs.finish(l)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn windows_are_seeded_and_in_range() {
        let toks: Vec<u32> = (0..100).collect();
        let o = CalibrationOptions {
            samples: 5,
            seq_len: 10,
            seed: 7,
        };
        let a = sample_windows(&toks, &o).unwrap();
        assert_eq!(a, sample_windows(&toks, &o).unwrap());
        assert!(a
            .iter()
            .all(|w| w.len() == 10 && w.windows(2).all(|p| p[1] == p[0] + 1)));
        let b = sample_windows(
            &toks,
            &CalibrationOptions {
                seed: 8,
                ..o.clone()
            },
        )
        .unwrap();
        assert_ne!(a, b);
        assert!(sample_windows(&toks[..5], &o).is_err());
        assert!(sample_windows(&toks, &CalibrationOptions { samples: 0, ..o }).is_err());
    }

    #[test]
    fn overlap_detects_shared_runs_only() {
        let held: Vec<u32> = (100..200).collect();
        let disjoint = vec![(0..32).collect::<Vec<u32>>()];
        assert_eq!(overlapping_windows(&disjoint, &held, 16), 0);
        let mut w: Vec<u32> = (0..16).collect();
        w.extend(150..166);
        assert_eq!(
            overlapping_windows(&[w.clone(), disjoint[0].clone()], &held, 16),
            1
        );
        assert_eq!(overlapping_windows(&[w], &held, 17), 0);
    }

    #[test]
    fn collector_computes_mean_second_moment() {
        let mut c = StatsCollector::all(1);
        let x1 = Tensor::new(&[[[1f32, 2.], [3., -4.]]], &Device::Cpu).unwrap();
        let x2 = Tensor::new(&[[[0f32, 1.]]], &Device::Cpu).unwrap();
        c.attention_input(0, &x1).unwrap();
        c.attention_input(0, &x2).unwrap();
        let s = c.finish(0).unwrap();
        assert_eq!(s.tokens, 3);
        // Σ x xᵀ = [[1+9, 2-12], [2-12, 4+16+1]] / 3
        assert!((s.second_moment[(0, 0)] - 10.0 / 3.0).abs() < 1e-12);
        assert!((s.second_moment[(0, 1)] + 10.0 / 3.0).abs() < 1e-12);
        assert!((s.second_moment[(1, 1)] - 21.0 / 3.0).abs() < 1e-12);
        assert!((s.abs_mean.as_ref().unwrap()[1] - 7.0 / 3.0).abs() < 1e-12);
        let nan = Tensor::new(&[[[f32::NAN, 0.]]], &Device::Cpu).unwrap();
        c.attention_input(0, &nan).unwrap();
        assert!(matches!(c.finish(0), Err(Error::NonFinite(_))));
    }
}
