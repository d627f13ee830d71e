//! The source's RoPE scaling expressed as DeepSeek YaRN.
//!
//! DeepSeek-V2's only position scaling is YaRN: pair `p` of the shared RoPE key rotates
//! with `f_p·(1 − ramp_p) + (f_p / factor)·ramp_p`, `f_p = θ^(−2p/d_rope)`, the ramp linear
//! in `p` between `low = ⌊corr(β_fast)⌋` and `high = ⌈corr(β_slow)⌉`. Llama 3's scaling (and
//! GGUF's per-frequency factors, which store it) keeps high frequencies, divides low ones by
//! `factor`, and blends in between — linearly in the *rotation count*, not in `p`. So:
//!
//! - `factor` is the source's largest ratio plain / scaled frequency;
//! - `β_fast`, `β_slow` put YaRN's integer ramp ends `low`, `high` (at half a pair from the
//!   wanted index, so rounding cannot move them) where the kept pairs (ratio 1) stay
//!   `p ≤ low` and the fully scaled ones `p ≥ high`; of those choices the one with the
//!   smallest worst frequency error in between;
//! - `mscale = mscale_all_dim = 0`: no attention-temperature change (Llama 3 has none).
//!
//! Pairs strictly between are blended on a different curve and are **inexact**; they are
//! listed with their relative frequency error ([`RopePairCheck`]). Pair `p` of the exported
//! key carries the source frequency `j = p·c`, `c = head_dim / d_rope` (see [`super::rope_split`]).

use serde::{Deserialize, Serialize};

use mla_attention::config::{ModelSpec, RopeScaling};
use mla_attention::mla::{MlaRopeScaling, YarnScaling};
use mla_attention::model::Rope;

/// One exported RoPE pair whose frequency differs from the source's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopePairCheck {
    /// Pair index in the exported key (`0..d_rope/2`).
    pub pair: usize,
    pub source_inv_freq: f64,
    pub exported_inv_freq: f64,
    /// `|exported − source| / source`.
    pub rel_error: f64,
}

/// The exported scaling and the pairs it cannot match.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeScalePlan {
    pub scaling: MlaRopeScaling,
    pub inexact: Vec<RopePairCheck>,
}

/// Relative tolerance under which two frequencies count as equal.
const EXACT: f64 = 1e-9;

/// The DeepSeek scaling that reproduces `spec`'s RoPE on a `rope_dim`-wide shared key.
pub fn plan(spec: &ModelSpec, rope_dim: usize) -> RopeScalePlan {
    let theta = spec.rope_theta;
    let d = spec.head_dim;
    let src = Rope::with_dim(theta, d, &spec.rope_scaling);
    let plain = Rope::with_dim(theta, d, &RopeScaling::None);
    let (src, plain) = (src.inv_freq(), plain.inv_freq());
    let pairs = rope_dim / 2;
    let c = (d / 2) / pairs.max(1);
    let ratio = |j: usize| plain[j] / src[j];
    let factor = (0..d / 2).map(ratio).fold(1.0, f64::max);
    if factor <= 1.0 + EXACT {
        return RopeScalePlan {
            scaling: MlaRopeScaling::None,
            inexact: Vec::new(),
        };
    }
    let kept = (0..pairs)
        .take_while(|&p| (ratio(p * c) - 1.0).abs() <= EXACT)
        .count();
    let first_scaled = (0..pairs)
        .find(|&p| (ratio(p * c) - factor).abs() <= EXACT * factor)
        .unwrap_or(pairs);
    let window = match &spec.rope_scaling {
        RopeScaling::Llama3(s) => s.original_max_position_embeddings,
        _ => spec.max_position_embeddings,
    } as f64;
    // Rotation count over `window` of (continuous) pair index x: inverse of YaRN's corr.
    let rotations =
        |x: f64| window / (2.0 * std::f64::consts::PI) * theta.powf(-2.0 * x / rope_dim as f64);
    let yarn_with = |low: usize, high: usize| YarnScaling {
        factor,
        original_max_position_embeddings: window as usize,
        beta_fast: rotations(low as f64 + 0.5),
        beta_slow: rotations(high as f64 - 0.5),
        mscale: 0.0,
        mscale_all_dim: 0.0,
    };
    let checks = |y: &YarnScaling| -> Vec<RopePairCheck> {
        let exported = y.inv_freq(theta, rope_dim);
        (0..pairs)
            .filter_map(|p| {
                let (s, e) = (src[p * c], exported[p]);
                let rel_error = (e - s).abs() / s;
                (rel_error > EXACT).then_some(RopePairCheck {
                    pair: p,
                    source_inv_freq: s,
                    exported_inv_freq: e,
                    rel_error,
                })
            })
            .collect()
    };
    // Any integer ramp ends with low ≥ kept − 1 and high ≤ first_scaled keep the outer
    // pairs exact; among them take the one with the smallest worst error in the band.
    let first_scaled = first_scaled.max(kept);
    let lowest = kept.saturating_sub(1);
    let mut best: Option<(f64, YarnScaling, Vec<RopePairCheck>)> = None;
    for low in lowest..first_scaled.max(lowest + 1) {
        for high in low + 1..=first_scaled.max(low + 1) {
            let y = yarn_with(low, high);
            let c = checks(&y);
            let worst = c.iter().map(|c| c.rel_error).fold(0.0, f64::max);
            if best.as_ref().is_none_or(|(w, _, _)| worst < *w) {
                best = Some((worst, y, c));
            }
        }
    }
    let (_, yarn, inexact) = best.expect("at least one ramp is tried");
    RopeScalePlan {
        scaling: MlaRopeScaling::Yarn(yarn),
        inexact,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mla_attention::config::Llama3RopeScaling;

    fn spec(scaling: RopeScaling, head_dim: usize, theta: f64) -> ModelSpec {
        let mut s = crate::stock::test_spec();
        s.head_dim = head_dim;
        s.rope_theta = theta;
        s.rope_scaling = scaling;
        s
    }

    fn llama31() -> RopeScaling {
        RopeScaling::Llama3(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })
    }

    #[test]
    fn unscaled_rope_stays_unscaled() {
        let p = plan(&spec(RopeScaling::None, 64, 1e4), 32);
        assert_eq!(p.scaling, MlaRopeScaling::None);
        assert!(p.inexact.is_empty());
    }

    #[test]
    fn llama31_maps_to_yarn_exact_outside_the_blend_band() {
        // Llama-3.1-8B: head 128, θ 5e5. Keep pairs with > 4 rotations over 8192 tokens,
        // divide those with < 1 by 8, blend between.
        let s = spec(llama31(), 128, 5e5);
        let p = plan(&s, 64);
        let MlaRopeScaling::Yarn(y) = p.scaling else {
            panic!("expected YaRN, got {:?}", p.scaling)
        };
        assert_eq!(y.factor, 8.0);
        assert_eq!((y.mscale, y.mscale_all_dim), (0.0, 0.0));
        let src = Rope::new(&s);
        let plain = Rope::with_dim(5e5, 128, &RopeScaling::None);
        let exported = y.inv_freq(5e5, 64);
        for (pair, &e) in exported.iter().enumerate() {
            let f = src.inv_freq()[2 * pair];
            // Rotations over the original window: Llama 3 blends for 1 ≤ r ≤ 4.
            let r = 8192.0 * plain.inv_freq()[2 * pair] / (2.0 * std::f64::consts::PI);
            let listed = p.inexact.iter().any(|c| c.pair == pair);
            let exact = ((e - f) / f).abs() <= EXACT;
            assert_eq!(listed, !exact, "pair {pair}");
            if !(1.0..=4.0).contains(&r) {
                assert!(
                    exact,
                    "pair {pair} ({r:.2} rotations) is outside the band, must be exact"
                );
            }
        }
        // The band holds only a few of the 32 pairs.
        assert!(
            !p.inexact.is_empty() && p.inexact.len() <= 4,
            "{:?}",
            p.inexact
        );
    }

    #[test]
    fn gguf_frequency_factors_map_like_llama3() {
        // GGUF stores Llama 3 scaling as per-frequency divisors: the same plan must result.
        let s = spec(llama31(), 128, 5e5);
        let src = Rope::new(&s);
        let plain = Rope::with_dim(5e5, 128, &RopeScaling::None);
        let factors: Vec<f32> = plain
            .inv_freq()
            .iter()
            .zip(src.inv_freq())
            .map(|(a, b)| (a / b) as f32)
            .collect();
        let mut g = spec(RopeScaling::FreqFactors(factors), 128, 5e5);
        g.max_position_embeddings = 8192;
        let p = plan(&g, 64);
        let q = plan(&s, 64);
        assert_eq!(
            p.inexact.iter().map(|c| c.pair).collect::<Vec<_>>(),
            q.inexact.iter().map(|c| c.pair).collect::<Vec<_>>()
        );
    }
}
