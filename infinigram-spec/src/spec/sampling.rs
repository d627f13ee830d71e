//! Turning logits into tokens: greedy argmax or sampling with temperature, top-k and top-p,
//! one uniform draw per sampled token.

use serde::Serialize;

use crate::error::{Error, Result};

/// A small deterministic generator (SplitMix64); one `next_f64` per sampled token.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with this seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sampling parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SampleParams {
    /// Softmax temperature (> 0).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1.0: all).
    pub top_p: f32,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SampleParams {
    fn default() -> Self {
        SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// How the target's logits become tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Sampling {
    /// The most likely token (ties: the smallest id).
    Greedy,
    /// A sample from the (tempered, truncated) distribution.
    Sample(SampleParams),
}

/// Index of the largest logit (ties: the smallest index); NaN counts as −∞. `None` when no
/// logit is finite or +∞.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() || x == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}

impl SampleParams {
    fn check(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "temperature must be positive and finite, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// The sampling distribution over `logits` as (token, probability) pairs, most likely
    /// first (ties: smaller id), after temperature, top-k and top-p; probabilities sum to 1.
    pub fn distribution(&self, logits: &[f32]) -> Result<Vec<(u32, f64)>> {
        self.check()?;
        let t = self.temperature as f64;
        let mut items: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(_, x)| !x.is_nan() && **x != f32::NEG_INFINITY)
            .map(|(i, &x)| (i as u32, x as f64 / t))
            .collect();
        if items.is_empty() {
            return Err(Error::Target("no finite logit to sample from".into()));
        }
        items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.top_k > 0 {
            items.truncate(self.top_k);
        }
        let max = items[0].1;
        if max == f64::INFINITY {
            // Point mass on the +∞ logits.
            items.retain(|x| x.1 == f64::INFINITY);
            let p = 1.0 / items.len() as f64;
            return Ok(items.into_iter().map(|(i, _)| (i, p)).collect());
        }
        let mut sum = 0.0;
        for x in items.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1;
        }
        for x in items.iter_mut() {
            x.1 /= sum;
        }
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = items
                .iter()
                .position(|x| {
                    acc += x.1;
                    acc >= self.top_p as f64
                })
                .map_or(items.len(), |i| i + 1);
            items.truncate(keep);
            let s: f64 = items.iter().map(|x| x.1).sum();
            for x in items.iter_mut() {
                x.1 /= s;
            }
        }
        Ok(items)
    }
}

/// Inverse-CDF draw from a distribution with one uniform `u ∈ [0, 1)`.
pub(crate) fn draw(dist: &[(u32, f64)], u: f64) -> u32 {
    let mut acc = 0.0;
    for &(t, p) in dist {
        acc += p;
        if u < acc {
            return t;
        }
    }
    // Rounding left `u` past the total: the last token with positive probability.
    dist.iter()
        .rev()
        .find(|x| x.1 > 0.0)
        .or(dist.last())
        .map_or(0, |x| x.0)
}

impl Sampling {
    /// The next token from `logits`, drawing once from `rng` when sampling.
    pub fn next_token(&self, logits: &[f32], rng: &mut Rng) -> Result<u32> {
        match self {
            Sampling::Greedy => argmax(logits)
                .ok_or_else(|| Error::Target("no finite logit to take the argmax of".into())),
            Sampling::Sample(p) => {
                let dist = p.distribution(logits)?;
                Ok(draw(&dist, rng.next_f64()))
            }
        }
    }

    /// The generator for this sampling mode (its seed; 0 for greedy).
    pub fn rng(&self) -> Rng {
        match self {
            Sampling::Greedy => Rng::new(0),
            Sampling::Sample(p) => Rng::new(p.seed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), None);
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn distribution_top_k_top_p() {
        let p = SampleParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 0,
        };
        let d = p.distribution(&[0.0, 2.0, 1.0]).unwrap();
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((d.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        let p = SampleParams {
            top_k: 0,
            top_p: 0.5,
            ..p
        };
        assert_eq!(p.distribution(&[0.0, 5.0, 1.0]).unwrap(), vec![(1, 1.0)]);
        let bad = SampleParams {
            temperature: 0.0,
            ..p
        };
        assert!(bad.distribution(&[1.0]).is_err());
        assert!(p.distribution(&[f32::NAN]).is_err());
    }

    #[test]
    fn draw_is_inverse_cdf() {
        let d = [(5, 0.25), (7, 0.75)];
        assert_eq!(draw(&d, 0.0), 5);
        assert_eq!(draw(&d, 0.3), 7);
        assert_eq!(draw(&d, 0.999_999), 7);
    }
}
