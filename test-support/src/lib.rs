//! # test-support
//!
//! What tests, benches and examples share, and product code never uses:
//! - [`Rng`]: the one seeded generator (SplitMix64) behind every random input;
//! - [`fixture`]: random-weight checkpoint directories of each kind the engine serves
//!   (stock DeepSeek-V2 MLA, one-shot low rank, original GQA) for format, unit and speed
//!   tests, never for quality numbers;
//! - [`assets`], [`asset`]: paths into the asset cache that `scripts/fetch_assets.py` fills, with a
//!   message naming the script when a file is missing (tests read nothing else from disk);
//! - [`rel_err`]: the relative error every agreement check reports.

pub mod fixture;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// SplitMix64: small, seedable, the same sequence on every platform. Tests need
/// reproducible inputs, not statistical strength.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator with this seed (any seed, 0 included).
    pub fn new(seed: u64) -> Self {
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

    /// Uniform in `(0, 1)` (never exactly 0, so `ln` is safe).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// Uniform in `[-1, 1)` as f32.
    pub fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// `n` values uniform with mean 0 and standard deviation `std`.
    pub fn vec(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| self.symmetric() * std * 3f32.sqrt())
            .collect()
    }

    /// A CPU f32 tensor of [`Rng::vec`] values.
    pub fn tensor(&mut self, dims: &[usize], std: f32) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(self.vec(n, std), dims, &Device::Cpu).expect("sizes match")
    }

    /// `n` values uniform in `[-amp, amp)`.
    pub fn symmetric_vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.symmetric() * amp).collect()
    }

    /// A CPU f32 tensor of [`Rng::symmetric_vec`] values.
    pub fn symmetric_tensor(&mut self, dims: &[usize], amp: f32) -> Tensor {
        let n = dims.iter().product();
        Tensor::from_vec(self.symmetric_vec(n, amp), dims, &Device::Cpu).expect("sizes match")
    }

    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The asset cache (`$CARE_ASSETS`, default `~/.cache/care-assets`). Panics with the
/// command that fills it when the smallest model every test run needs is not there.
pub fn assets() -> PathBuf {
    let root = care_model::io::asset_cache_dir();
    assert!(
        root.join("models/smollm2-135m-instruct/model.gguf").exists(),
        "real assets missing under {} — run `python3 scripts/fetch_assets.py` (or scripts/test.sh) first",
        root.display()
    );
    root
}

/// `rel` inside the asset cache (`$CARE_ASSETS`, default `~/.cache/care-assets`). Panics
/// with the command that fetches it when the file is missing.
pub fn asset(rel: &str) -> PathBuf {
    let p = care_model::io::asset_cache_dir().join(rel);
    assert!(
        p.exists(),
        "missing asset {} — run `python3 scripts/fetch_assets.py` (or scripts/test.sh) first",
        p.display()
    );
    p
}

/// Relative Frobenius error `‖a − b‖ / ‖b‖`, computed in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).expect("f64 cast");
    let b = b.to_dtype(DType::F64).expect("f64 cast");
    let num = (&a - &b).and_then(|d| d.sqr()?.sum_all()?.to_scalar::<f64>());
    let den = b.sqr().and_then(|s| s.sum_all()?.to_scalar::<f64>());
    (num.expect("same shapes") / den.expect("finite")).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_its_published_sequence() {
        // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn vec_has_the_asked_spread() {
        let v = Rng::new(7).vec(100_000, 0.5);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
    }
}
