//! Per-layer rank allocation under a KV budget (CARE §3.2, App. C: "adjusted rank").
//!
//! Each layer l and branch (K or V) has the singular values σ_{l,1} ≥ σ_{l,2} ≥ … of its
//! whitened weight ([`crate::factorize::Decomposition::spectrum`]). Giving layer l one more
//! rank at current rank r is worth the paper's score (eq. 1)
//!
//! s_l(r) = σ²_{l,r+1} / Σ_{m>r} σ²_{l,m},
//!
//! the next energy over the remaining tail. [`water_fill`] starts every layer at `min` and
//! repeatedly gives one rank to the layer of highest (optionally weighted) score until
//! Σ_l r_l equals the budget, never above `max` or the layer's available rank. K and V get
//! separate calls and separate budgets. When every s_l is nonincreasing in r over the
//! allowed range, the greedy result maximizes Σ_l Σ_{j<r_l} w_l·s_l(j); s_l is not monotone in
//! general (it tends to 1 at the end of a finite spectrum), so "water-filling" is loose.
//!
//! [`water_fill_authors`] is the authors' code variant (`_propagated_residual_gain`):
//! score · √((L − l)/((L + 1)/2)) / √(max(r, 1)/max(min, 1)), with l 0-based, i.e. a depth
//! horizon favouring early layers and a rank-cost penalty.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Why a rank allocation or plot failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RankError {
    #[error("no layers to allocate ranks to")]
    NoLayers,
    #[error("rank budget must be > 0")]
    ZeroBudget,
    #[error("rank bounds are inverted: min {min} > max {max}")]
    BoundsInverted { min: usize, max: usize },
    #[error("budget {budget} is below {n_layers} layers × min {min} = {required}")]
    BudgetBelowMinimum {
        budget: usize,
        n_layers: usize,
        min: usize,
        required: usize,
    },
    #[error("budget {budget} exceeds {n_layers} layers × max {max} = {capacity}")]
    BudgetAboveMaximum {
        budget: usize,
        n_layers: usize,
        max: usize,
        capacity: usize,
    },
    #[error("budget {budget} exceeds the available rank {available} (Σ_l min(max, rank_l))")]
    BudgetAboveAvailable { budget: usize, available: usize },
    #[error("layer {layer} has rank {available}, below the minimum {min}")]
    LayerBelowMinimum {
        layer: usize,
        available: usize,
        min: usize,
    },
    #[error("singular value {index} of layer {layer} is {value} (must be finite and >= 0)")]
    BadSpectrum {
        layer: usize,
        index: usize,
        value: f64,
    },
    #[error("{got} layer weights for {expected} layers")]
    WeightsLength { expected: usize, got: usize },
    #[error("weight of layer {layer} is {value} (must be finite and >= 0)")]
    BadWeight { layer: usize, value: f64 },
    #[error("kv keep fraction {keep} is outside (0, 1]")]
    KeepFraction { keep: f64 },
    #[error("kv keep fraction {keep} of width {width} rounds to rank 0")]
    KeepRoundsToZero { keep: f64, width: usize },
    #[error("rank plan has {k} K layers but {v} V layers")]
    PlanLengths { k: usize, v: usize },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: drawing the plot failed: {source}")]
    Plot {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T> = std::result::Result<T, RankError>;

/// Ranks per layer for the K and V latents (separate, as in CARE's one-shot conversion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    pub k: Vec<usize>,
    pub v: Vec<usize>,
}

impl RankPlan {
    /// A plan from per-layer K and V ranks of equal length.
    pub fn new(k: Vec<usize>, v: Vec<usize>) -> Result<Self> {
        if k.len() != v.len() {
            return Err(RankError::PlanLengths {
                k: k.len(),
                v: v.len(),
            });
        }
        Ok(Self { k, v })
    }

    /// The same rank for K and V in every layer (CARE-U).
    pub fn uniform(n_layers: usize, rank: usize) -> Self {
        Self {
            k: vec![rank; n_layers],
            v: vec![rank; n_layers],
        }
    }

    pub fn n_layers(&self) -> usize {
        self.k.len()
    }

    /// Largest rank over layers and branches: the width a single global `kv_lora_rank`
    /// would need if smaller layers were zero-padded.
    pub fn max_rank(&self) -> usize {
        self.k.iter().chain(&self.v).copied().max().unwrap_or(0)
    }

    /// (Σ_l k_l, Σ_l v_l).
    pub fn totals(&self) -> (usize, usize) {
        (self.k.iter().sum(), self.v.iter().sum())
    }
}

/// A per-branch budget derived from a kept fraction of the original K (or V) width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepBudget {
    /// round(keep · kv_width).
    pub per_layer: usize,
    /// n_layers · per_layer.
    pub total: usize,
}

/// Keeps fraction `keep` ∈ (0, 1] of the original per-layer K (or V) width
/// `kv_width` = n_kv·head_dim: r = round(keep · kv_width) per layer, total n_layers · r.
pub fn budget_from_keep(keep: f64, n_layers: usize, kv_width: usize) -> Result<KeepBudget> {
    if !(keep > 0.0 && keep <= 1.0) {
        return Err(RankError::KeepFraction { keep });
    }
    if n_layers == 0 {
        return Err(RankError::NoLayers);
    }
    let per_layer = (keep * kv_width as f64).round() as usize;
    if per_layer == 0 {
        return Err(RankError::KeepRoundsToZero {
            keep,
            width: kv_width,
        });
    }
    Ok(KeepBudget {
        per_layer,
        total: n_layers * per_layer,
    })
}

/// The authors' depth horizon √((L − l)/((L + 1)/2)) for l = 0..L (mean of L − l is
/// (L + 1)/2, so the weights average about 1; the first layer gets the most).
pub fn depth_weights(n_layers: usize) -> Vec<f64> {
    let mean_remaining = (n_layers as f64 + 1.0) / 2.0;
    (0..n_layers)
        .map(|l| ((n_layers - l) as f64 / mean_remaining).sqrt())
        .collect()
}

/// Greedy allocation of `budget` ranks over layers by the paper's score s_l(r), each
/// multiplied by `weights[l]` if given. Returns r_l with Σ r_l = budget and
/// `min ≤ r_l ≤ min(max, spectra[l].len())`.
///
/// `spectra[l]` is layer l's nonincreasing σ; its length is the layer's available rank
/// (pass [`crate::factorize::Decomposition::usable_spectrum`]). Ties go to the lower layer.
/// Errors: no layers, budget 0, min > max, budget < n·min, budget > n·max, budget above the
/// available rank, a layer with fewer than `min` values, NaN/negative σ or weights.
pub fn water_fill(
    spectra: &[Vec<f64>],
    budget: usize,
    min: usize,
    max: usize,
    weights: Option<&[f64]>,
) -> Result<Vec<usize>> {
    allocate(spectra, budget, min, max, weights, false)
}

/// [`water_fill`] with the authors' code score: depth weights ([`depth_weights`]) and the
/// rank-cost penalty 1/√(max(r, 1)/max(min, 1)).
pub fn water_fill_authors(
    spectra: &[Vec<f64>],
    budget: usize,
    min: usize,
    max: usize,
) -> Result<Vec<usize>> {
    let weights = depth_weights(spectra.len());
    allocate(spectra, budget, min, max, Some(&weights), true)
}

/// Suffix energies T[r] = Σ_{m≥r} σ²_m (0-based), summed from the small end.
fn tails(spectrum: &[f64]) -> Vec<f64> {
    let mut tails = vec![0.0; spectrum.len() + 1];
    for r in (0..spectrum.len()).rev() {
        tails[r] = tails[r + 1] + spectrum[r] * spectrum[r];
    }
    tails
}

/// s(r) = σ²_r / T[r] (0-based: the value of the (r+1)-th direction); 0 once no energy is left.
fn paper_score(spectrum: &[f64], tails: &[f64], r: usize) -> f64 {
    if tails[r] > 0.0 {
        spectrum[r] * spectrum[r] / tails[r]
    } else {
        0.0
    }
}

/// Heap entry: highest score first, then lowest layer.
struct Candidate {
    score: f64,
    layer: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.layer.cmp(&self.layer))
    }
}

fn allocate(
    spectra: &[Vec<f64>],
    budget: usize,
    min: usize,
    max: usize,
    weights: Option<&[f64]>,
    rank_cost: bool,
) -> Result<Vec<usize>> {
    let n_layers = spectra.len();
    validate(spectra, budget, min, max, weights)?;
    let tails: Vec<Vec<f64>> = spectra.iter().map(|s| tails(s)).collect();
    let caps: Vec<usize> = spectra.iter().map(|s| s.len().min(max)).collect();
    let score = |layer: usize, r: usize| {
        let mut s = paper_score(&spectra[layer], &tails[layer], r);
        if let Some(w) = weights {
            s *= w[layer];
        }
        if rank_cost {
            s /= (r.max(1) as f64 / min.max(1) as f64).sqrt();
        }
        s
    };
    let mut ranks = vec![min; n_layers];
    let mut heap: BinaryHeap<Candidate> = (0..n_layers)
        .filter(|&layer| ranks[layer] < caps[layer])
        .map(|layer| Candidate {
            score: score(layer, min),
            layer,
        })
        .collect();
    let mut remaining = budget - n_layers * min;
    while remaining > 0 {
        let Candidate { layer, .. } = heap
            .pop()
            .expect("validated: Σ caps ≥ budget, so a layer with room remains");
        ranks[layer] += 1;
        remaining -= 1;
        if ranks[layer] < caps[layer] {
            heap.push(Candidate {
                score: score(layer, ranks[layer]),
                layer,
            });
        }
    }
    Ok(ranks)
}

fn validate(
    spectra: &[Vec<f64>],
    budget: usize,
    min: usize,
    max: usize,
    weights: Option<&[f64]>,
) -> Result<()> {
    let n_layers = spectra.len();
    if n_layers == 0 {
        return Err(RankError::NoLayers);
    }
    if budget == 0 {
        return Err(RankError::ZeroBudget);
    }
    if min > max {
        return Err(RankError::BoundsInverted { min, max });
    }
    let required = n_layers.saturating_mul(min);
    if budget < required {
        return Err(RankError::BudgetBelowMinimum {
            budget,
            n_layers,
            min,
            required,
        });
    }
    let capacity = n_layers.saturating_mul(max);
    if budget > capacity {
        return Err(RankError::BudgetAboveMaximum {
            budget,
            n_layers,
            max,
            capacity,
        });
    }
    for (layer, spectrum) in spectra.iter().enumerate() {
        if spectrum.len() < min {
            return Err(RankError::LayerBelowMinimum {
                layer,
                available: spectrum.len(),
                min,
            });
        }
        if let Some((index, &value)) = spectrum
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(RankError::BadSpectrum {
                layer,
                index,
                value,
            });
        }
    }
    let available: usize = spectra.iter().map(|s| s.len().min(max)).sum();
    if budget > available {
        return Err(RankError::BudgetAboveAvailable { budget, available });
    }
    if let Some(w) = weights {
        if w.len() != n_layers {
            return Err(RankError::WeightsLength {
                expected: n_layers,
                got: w.len(),
            });
        }
        if let Some((layer, &value)) = w
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(RankError::BadWeight { layer, value });
        }
    }
    Ok(())
}

pub use plot::plot_png;

/// PNG of a plan: rank per layer, K and V lines.
mod plot {
    use std::path::Path;

    use plotters::prelude::*;

    use super::{RankError, RankPlan, Result};
    use crate::png_plot::{fonts_available, write_png_atomically, FAMILY};

    const WIDTH: u32 = 900;
    const HEIGHT: u32 = 500;
    /// Draws `plan` (x: layer, y: rank; K blue, V red) with `title` and writes a PNG to
    /// `path` atomically (a temporary file in the same directory, then rename). Without a
    /// usable system font it draws axes and lines without text.
    pub fn plot_png(plan: &RankPlan, title: &str, path: &Path) -> Result<()> {
        render_png(plan, title, path, fonts_available())
    }

    pub(super) fn render_png(
        plan: &RankPlan,
        title: &str,
        path: &Path,
        with_text: bool,
    ) -> Result<()> {
        if plan.k.len() != plan.v.len() {
            return Err(RankError::PlanLengths {
                k: plan.k.len(),
                v: plan.v.len(),
            });
        }
        let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
        draw(plan, title, with_text, &mut rgb).map_err(|source| RankError::Plot {
            path: path.to_path_buf(),
            source,
        })?;
        write_atomically(path, &rgb)
    }

    type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn draw(plan: &RankPlan, title: &str, with_text: bool, rgb: &mut [u8]) -> DrawResult {
        let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        // Integer axes, so ticks fall on whole layers and ranks.
        let x_max = plan.n_layers().saturating_sub(1).max(1) as i64;
        let y_max = (plan.max_rank() as f64 * 1.1).ceil().max(1.0) as i64;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if with_text {
            builder
                .caption(title, (FAMILY, 22))
                .x_label_area_size(40)
                .y_label_area_size(60);
        } else {
            builder.x_label_area_size(5).y_label_area_size(5);
        }
        let mut chart = builder.build_cartesian_2d(0i64..x_max, 0i64..y_max)?;
        if with_text {
            chart
                .configure_mesh()
                .x_desc("layer")
                .y_desc("rank")
                .label_style((FAMILY, 14))
                .x_labels((x_max as usize + 1).min(17))
                .draw()?;
        } else {
            // Bare axes: plotters' integer tick search does not terminate for zero labels,
            // so the mesh is not drawn at all.
            chart.draw_series(LineSeries::new([(0, y_max), (0, 0), (x_max, 0)], BLACK))?;
        }
        for (ranks, color, label) in [(&plan.k, BLUE, "K"), (&plan.v, RED, "V")] {
            let points: Vec<(i64, i64)> = ranks
                .iter()
                .enumerate()
                .map(|(l, &r)| (l as i64, r as i64))
                .collect();
            let series =
                chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
            if with_text {
                series
                    .label(label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            }
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )?;
        }
        if with_text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font((FAMILY, 14))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }

    fn write_atomically(path: &Path, rgb: &[u8]) -> Result<()> {
        write_png_atomically(path, rgb, WIDTH, HEIGHT).map_err(|source| RankError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Power-law spectrum σ²_m = scale·(m + 1)^−p over `len` values: for p > 1 its score s(r)
    /// decreases over the leading ranks (asserted where used).
    fn power_law(len: usize, p: f64, scale: f64) -> Vec<f64> {
        (0..len)
            .map(|m| (scale * (m as f64 + 1.0).powf(-p)).sqrt())
            .collect()
    }

    /// Σ_l Σ_{j=min}^{r_l−1} score(l, j).
    fn objective(ranks: &[usize], min: usize, score: &dyn Fn(usize, usize) -> f64) -> f64 {
        ranks
            .iter()
            .enumerate()
            .map(|(l, &r)| (min..r).map(|j| score(l, j)).sum::<f64>())
            .sum()
    }

    /// Best objective over all allocations with Σ r_l = budget, min ≤ r_l ≤ caps[l].
    fn brute_force(
        caps: &[usize],
        budget: usize,
        min: usize,
        score: &dyn Fn(usize, usize) -> f64,
    ) -> f64 {
        fn go(
            layer: usize,
            left: usize,
            ranks: &mut Vec<usize>,
            caps: &[usize],
            min: usize,
            score: &dyn Fn(usize, usize) -> f64,
            best: &mut f64,
        ) {
            if layer == caps.len() {
                if left == 0 {
                    *best = best.max(objective(ranks, min, score));
                }
                return;
            }
            for r in min..=caps[layer].min(left) {
                ranks.push(r);
                go(layer + 1, left - r, ranks, caps, min, score, best);
                ranks.pop();
            }
        }
        let mut best = f64::NEG_INFINITY;
        go(0, budget, &mut Vec::new(), caps, min, score, &mut best);
        best
    }

    #[test]
    fn water_fill_matches_brute_force_when_scores_are_monotone() {
        let (min, max) = (1, 6);
        let exponents = [[1.3, 2.0, 3.5], [1.8, 1.1, 2.6], [4.0, 1.5, 1.2]];
        let mut nontrivial = 0;
        for (case, ps) in exponents.iter().enumerate() {
            let spectra: Vec<Vec<f64>> = ps
                .iter()
                .enumerate()
                .map(|(l, &p)| power_law(40, p, 1.0 + l as f64))
                .collect();
            let tails: Vec<Vec<f64>> = spectra.iter().map(|s| tails(s)).collect();
            let weights = [1.0, 0.7, 1.3];
            for weighted in [false, true] {
                let w = |l: usize| if weighted { weights[l] } else { 1.0 };
                let score = |l: usize, r: usize| w(l) * paper_score(&spectra[l], &tails[l], r);
                for l in 0..spectra.len() {
                    assert!(
                        (min..max).all(|r| score(l, r) <= score(l, r - 1)),
                        "case {case}: test spectra must have monotone scores"
                    );
                }
                for budget in 3..=18 {
                    let ranks =
                        water_fill(&spectra, budget, min, max, weighted.then_some(&weights[..]))
                            .unwrap();
                    assert_eq!(ranks.iter().sum::<usize>(), budget);
                    assert!(ranks.iter().all(|&r| (min..=max).contains(&r)), "{ranks:?}");
                    let best = brute_force(&[max; 3], budget, min, &score);
                    let got = objective(&ranks, min, &score);
                    assert!(
                        (got - best).abs() <= 1e-12 * best.abs().max(1.0),
                        "case {case} budget {budget}: greedy {got} vs brute force {best} ({ranks:?})"
                    );
                    nontrivial += usize::from(ranks.iter().any(|&r| r != ranks[0]));
                }
            }
        }
        assert!(nontrivial > 10, "allocations should differ across layers");
    }

    #[test]
    fn authors_variant_matches_its_brute_force() {
        let (min, max) = (2, 7);
        let spectra: Vec<Vec<f64>> = [1.2, 1.9, 1.4, 2.5]
            .iter()
            .map(|&p| power_law(50, p, 1.0))
            .collect();
        let tails: Vec<Vec<f64>> = spectra.iter().map(|s| tails(s)).collect();
        let depth = depth_weights(4);
        assert!(
            depth.windows(2).all(|p| p[0] > p[1]),
            "early layers weigh more"
        );
        let score = |l: usize, r: usize| {
            paper_score(&spectra[l], &tails[l], r) * depth[l] / (r as f64 / min as f64).sqrt()
        };
        for budget in [8, 11, 17, 24] {
            let ranks = water_fill_authors(&spectra, budget, min, max).unwrap();
            assert_eq!(ranks.iter().sum::<usize>(), budget);
            let best = brute_force(&[max; 4], budget, min, &score);
            let got = objective(&ranks, min, &score);
            assert!(
                (got - best).abs() <= 1e-12 * best,
                "budget {budget}: {got} vs {best}"
            );
        }
    }

    #[test]
    fn water_fill_respects_available_rank_and_ties() {
        // Layer 1 has only 3 values: it may not exceed rank 3 even though max = 5.
        let spectra = vec![vec![1.0; 8], vec![9.0, 8.0, 7.0]];
        let ranks = water_fill(&spectra, 8, 1, 5, None).unwrap();
        assert_eq!(ranks.iter().sum::<usize>(), 8);
        assert!(ranks[1] <= 3 && ranks[0] <= 5, "{ranks:?}");
        // Identical layers with decreasing scores: ranks differ by at most one, ties go to
        // the lower layer.
        let same = vec![power_law(40, 2.0, 1.0); 3];
        assert_eq!(water_fill(&same, 7, 1, 4, None).unwrap(), vec![3, 2, 2]);
    }

    #[test]
    fn infeasible_budgets_are_errors() {
        let spectra = vec![vec![3.0, 2.0, 1.0]; 4];
        let err = |budget, min, max| water_fill(&spectra, budget, min, max, None).unwrap_err();
        assert!(matches!(err(0, 0, 3), RankError::ZeroBudget));
        assert!(matches!(
            err(4, 3, 2),
            RankError::BoundsInverted { min: 3, max: 2 }
        ));
        assert!(matches!(
            err(7, 2, 3),
            RankError::BudgetBelowMinimum { required: 8, .. }
        ));
        assert!(matches!(
            err(9, 1, 2),
            RankError::BudgetAboveMaximum { capacity: 8, .. }
        ));
        assert!(matches!(
            err(13, 1, 5),
            RankError::BudgetAboveAvailable { available: 12, .. }
        ));
        assert!(matches!(
            err(16, 4, 4),
            RankError::LayerBelowMinimum { layer: 0, .. }
        ));
        assert!(matches!(
            water_fill(&[], 4, 1, 2, None).unwrap_err(),
            RankError::NoLayers
        ));
        let mut bad = spectra.clone();
        bad[2][1] = f64::NAN;
        assert!(matches!(
            water_fill(&bad, 6, 1, 3, None).unwrap_err(),
            RankError::BadSpectrum {
                layer: 2,
                index: 1,
                ..
            }
        ));
        assert!(matches!(
            water_fill(&spectra, 6, 1, 3, Some(&[1.0; 3])).unwrap_err(),
            RankError::WeightsLength {
                expected: 4,
                got: 3
            }
        ));
        assert!(matches!(
            water_fill(&spectra, 6, 1, 3, Some(&[1.0, -1.0, 1.0, 1.0])).unwrap_err(),
            RankError::BadWeight { layer: 1, .. }
        ));
    }

    #[test]
    fn keep_fraction_to_budget() {
        let b = budget_from_keep(0.25, 32, 1024).unwrap();
        assert_eq!(
            b,
            KeepBudget {
                per_layer: 256,
                total: 8192
            }
        );
        assert_eq!(budget_from_keep(1.0, 2, 1024).unwrap().per_layer, 1024);
        assert_eq!(budget_from_keep(0.3, 1, 10).unwrap().per_layer, 3);
        for keep in [0.0, -0.5, 1.01, f64::NAN] {
            assert!(matches!(
                budget_from_keep(keep, 32, 1024).unwrap_err(),
                RankError::KeepFraction { .. }
            ));
        }
        assert!(matches!(
            budget_from_keep(0.001, 32, 100).unwrap_err(),
            RankError::KeepRoundsToZero { .. }
        ));
    }

    #[test]
    fn plan_basics_and_serde() {
        let plan = RankPlan::uniform(3, 64);
        assert_eq!(
            (plan.n_layers(), plan.max_rank(), plan.totals()),
            (3, 64, (192, 192))
        );
        assert!(matches!(
            RankPlan::new(vec![1, 2], vec![3]).unwrap_err(),
            RankError::PlanLengths { k: 2, v: 1 }
        ));
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<RankPlan>(&json).unwrap(), plan);
    }

    #[test]
    fn plot_writes_a_png_with_and_without_text() {
        let dir = tempfile::tempdir().unwrap();
        let plan = RankPlan::new(vec![8, 12, 10, 6], vec![4, 9, 14, 11]).unwrap();
        for (name, with_text) in [("text.png", true), ("plain.png", false)] {
            let path = dir.path().join(name);
            let result = if with_text {
                plot_png(&plan, "rank plan", &path)
            } else {
                plot::render_png(&plan, "rank plan", &path, false)
            };
            result.unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name}: PNG signature");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
        // Edge cases must not panic: no layers, one layer, all ranks zero.
        for (i, plan) in [
            RankPlan::uniform(0, 8),
            RankPlan::uniform(1, 8),
            RankPlan::uniform(3, 0),
        ]
        .iter()
        .enumerate()
        {
            for with_text in [true, false] {
                let path = dir.path().join(format!("edge{i}{with_text}.png"));
                plot::render_png(plan, "edge", &path, with_text).unwrap();
            }
        }
        let missing = dir.path().join("no/such/dir/plot.png");
        assert!(matches!(
            plot_png(&plan, "x", &missing).unwrap_err(),
            RankError::Io { .. }
        ));
    }
}
