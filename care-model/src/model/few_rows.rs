//! `y = x · Wᵀ` for a few rows of `x` (decode and speculative verification), f32, on CPUs
//! with AVX-512 or AVX2 + FMA (the same tiles over 16 or 8 lanes).
//!
//! candle's CPU matmul has a matrix-vector path for one row and a general GEMM for more,
//! which packs the weight on every call: on SmolLM2 (2-vCPU EPYC) a pass of 2–8 tokens costs
//! 1.7–2.2× a 1-token pass, so verifying a draft costs as much as it saves. Here each weight
//! row is read once and multiplied with every `x` row while it sits in registers/L1, so the
//! pass stays bound by reading the weights: measured on a 49 152 × 576 weight (the SmolLM2
//! head), 1 / 2 / 4 / 8 rows take 1.5 / 1.6 / 2.0 / 2.9 ms here against candle's 2.1 / 3.4 /
//! 3.8 / 4.3 ms. Past ~8 rows both are bound by the FMAs; this path still measured as fast
//! or faster up to 256 rows (Qwen2.5-Coder-0.5B passes of 16 / 64 / 256 rows: 103 / 386 /
//! 1 695 ms against candle's 116 / 464 / 1 685).
//!
//! Every output element is one running sum over the lanes' chunks in order, then the tail,
//! then a fixed reduction, whatever the number of rows: a row's products are bit-identical
//! whether it runs alone or beside up to [`MAX_ROWS`] − 1 other rows (its own drafts, other
//! requests of the batch). With the row-wise paged attention (`mla_attention::cpu`) this makes a
//! verify pass give each token the logits one-token decoding gives it.

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

/// Largest row count this path takes; more rows (long prompts' prefill) go to candle's
/// GEMM.
pub const MAX_ROWS: usize = 256;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the path off (or on again) for the whole process: benchmarks compare it with
/// candle's matmul this way.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Output rows per parallel task.
const OUT_CHUNK: usize = 64;

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether [`few_rows_matmul`] runs here: the CPU has AVX-512, or AVX2 with FMA, and the
/// path is enabled.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        ENABLED.load(Ordering::Relaxed)
            && (has_avx512()
                || (std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y[r, o] = Σ_i x[r, i] · w[o, i]` for `x` `(rows, k)`, `w` `(out, k)`, `y` `(rows, out)`,
/// row-major. `None` (nothing written) when the CPU lacks AVX-512 and AVX2, `rows` is 0 or above
/// [`MAX_ROWS`], or the lengths do not match.
pub fn few_rows_matmul(
    x: &[f32],
    rows: usize,
    w: &[f32],
    out: usize,
    k: usize,
    y: &mut [f32],
) -> Option<()> {
    if rows == 0
        || rows > MAX_ROWS
        || k == 0
        || x.len() != rows * k
        || w.len() != out * k
        || y.len() != rows * out
        || !available()
    {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Output-major blocks, one per task, then transposed into `y`.
        let mut yt = vec![0f32; out * rows];
        yt.par_chunks_mut(OUT_CHUNK * rows)
            .enumerate()
            .for_each(|(c, block)| {
                let o0 = c * OUT_CHUNK;
                let n = block.len() / rows;
                let ws = &w[o0 * k..(o0 + n) * k];
                // SAFETY: the instruction set was detected (`available`); the slices hold
                // `rows` rows of `k` values and `n` weight rows of `k` values, and `block`
                // is `n × rows`.
                unsafe {
                    if has_avx512() {
                        simd::kernel_avx512(x, rows, ws, n, k, block)
                    } else {
                        simd::kernel_avx2(x, rows, ws, n, k, block)
                    }
                };
            });
        for o in 0..out {
            for r in 0..rows {
                y[r * out + o] = yt[o * rows + r];
            }
        }
        Some(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use crate::simd::{Avx2, Avx512, Lanes};

    /// Weight rows per group: every row of `x` is multiplied with a group while it is in
    /// L1/L2, so each weight row comes from memory once whatever the row count (rows in an
    /// outer loop would stream a large weight block, e.g. an MLP down projection, twice).
    const GROUP: usize = 8;

    /// `yt[o, r]` for the `n` weight rows of `w` and the `rows` rows of `x`, AVX-512.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_avx512(
        x: &[f32],
        rows: usize,
        w: &[f32],
        n: usize,
        k: usize,
        yt: &mut [f32],
    ) {
        // 32 registers: tiles of 4×4, 2×8, 1×8 running sums.
        kernel::<Avx512, 4, 4, 2, 8>(x, rows, w, n, k, yt)
    }

    /// The same with AVX2 + FMA (16 registers: tiles of 2×4, 2×4, 1×8).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2(
        x: &[f32],
        rows: usize,
        w: &[f32],
        n: usize,
        k: usize,
        yt: &mut [f32],
    ) {
        kernel::<Avx2, 2, 4, 2, 4>(x, rows, w, n, k, yt)
    }

    /// Rows in tiles of `R4 × O4` (4 or more rows left… as many as `R4`), `R2 × O2`, then
    /// `1 × 8`.
    #[inline(always)]
    unsafe fn kernel<
        L: Lanes,
        const R4: usize,
        const O4: usize,
        const R2: usize,
        const O2: usize,
    >(
        x: &[f32],
        rows: usize,
        w: &[f32],
        n: usize,
        k: usize,
        yt: &mut [f32],
    ) {
        let mut o = 0;
        while o < n {
            let group = (n - o).min(GROUP);
            let mut r = 0;
            while r < rows {
                let left = rows - r;
                if left >= 4 {
                    tiles::<L, R4, O4>(x, w, o, group, k, r, rows, yt);
                    r += R4;
                } else if left >= 2 {
                    tiles::<L, R2, O2>(x, w, o, group, k, r, rows, yt);
                    r += R2;
                } else {
                    tiles::<L, 1, 8>(x, w, o, group, k, r, rows, yt);
                    r += 1;
                }
            }
            o += group;
        }
    }

    /// Rows `r..r + R` against weight rows `o0..o0 + n`, `O` at a time.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tiles<L: Lanes, const R: usize, const O: usize>(
        x: &[f32],
        w: &[f32],
        o0: usize,
        n: usize,
        k: usize,
        r: usize,
        rows: usize,
        yt: &mut [f32],
    ) {
        let xs: [&[f32]; R] = std::array::from_fn(|i| &x[(r + i) * k..(r + i + 1) * k]);
        let end = o0 + n;
        let mut o = o0;
        while o + O <= end {
            let ws: [&[f32]; O] = std::array::from_fn(|j| &w[(o + j) * k..(o + j + 1) * k]);
            let d = tile::<L, R, O>(ws, xs);
            for (i, di) in d.iter().enumerate() {
                for (j, &v) in di.iter().enumerate() {
                    yt[(o + j) * rows + r + i] = v;
                }
            }
            o += O;
        }
        while o < end {
            let d = tile::<L, R, 1>([&w[o * k..(o + 1) * k]], xs);
            for (i, di) in d.iter().enumerate() {
                yt[o * rows + r + i] = di[0];
            }
            o += 1;
        }
    }

    /// Dot products of `R` rows with `O` weight rows, all of length `k`: one running sum
    /// per pair over the lanes in order, then the tail, whatever `R` and `O` are.
    #[inline(always)]
    unsafe fn tile<L: Lanes, const R: usize, const O: usize>(
        w: [&[f32]; O],
        x: [&[f32]; R],
    ) -> [[f32; O]; R] {
        let k = w[0].len();
        let split = k / L::N * L::N;
        let mut acc = [[L::zero(); O]; R];
        let mut c = 0;
        while c < split {
            let mut wv = [L::zero(); O];
            for j in 0..O {
                // SAFETY: c + N <= split <= k = w[j].len().
                wv[j] = L::load(w[j].as_ptr().add(c));
            }
            for i in 0..R {
                // SAFETY: as above, x[i].len() = k.
                let xv = L::load(x[i].as_ptr().add(c));
                for j in 0..O {
                    acc[i][j] = L::fma(wv[j], xv, acc[i][j]);
                }
            }
            c += L::N;
        }
        let mut out = [[0f32; O]; R];
        for i in 0..R {
            for j in 0..O {
                let mut tail = 0f32;
                for q in split..k {
                    tail += w[j][q] * x[i][q];
                }
                out[i][j] = L::sum(acc[i][j]) + tail;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_values(n: usize, seed: u64) -> Vec<f32> {
        test_support::Rng::new(seed).symmetric_vec(n, 0.5)
    }

    /// Matches an f64 reference for every row count and awkward sizes (a tail after the
    /// 16-lane chunks, partial tiles and output blocks); a row's outputs are bit-identical
    /// whatever rows run beside it. Skipped (with a message) on CPUs without AVX-512 or AVX2.
    #[test]
    fn matches_reference_and_rows_are_independent() {
        if !available() {
            eprintln!("no AVX-512 or AVX2 on this CPU: the few-row path is not used here");
            return;
        }
        for (out, k) in [(1, 1), (7, 13), (130, 576), (65, 16), (9, 40)] {
            let w = uniform_values(out * k, 1);
            let x = uniform_values(MAX_ROWS * k, 7);
            let mut alone = vec![0f32; out];
            few_rows_matmul(&x[..k], 1, &w, out, k, &mut alone).unwrap();
            let counts = (1..=17).chain([31, 64, 145, MAX_ROWS - 1, MAX_ROWS]);
            for rows in counts {
                let mut y = vec![0f32; rows * out];
                few_rows_matmul(&x[..rows * k], rows, &w, out, k, &mut y).unwrap();
                assert_eq!(&y[..out], &alone[..], "row 0 changed with {rows} rows");
                for r in 0..rows {
                    for o in 0..out {
                        let want: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                            .sum();
                        let got = y[r * out + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "out {out} k {k} rows {rows} ({r},{o}): {got} vs {want}"
                        );
                    }
                }
            }
        }
        let mut y = vec![0f32; MAX_ROWS + 1];
        let x = vec![0f32; MAX_ROWS + 1];
        assert!(few_rows_matmul(&x, MAX_ROWS + 1, &[0.0; 1], 1, 1, &mut y).is_none());
        assert!(few_rows_matmul(&[0.0; 3], 1, &[0.0; 4], 2, 2, &mut y).is_none());
    }
}
