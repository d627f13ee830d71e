//! Vectors of f32 lanes for the CPU hot loops (the few-row matmul and the paged attention):
//! AVX-512 (16 lanes), AVX2 + FMA (8 lanes) and a portable 8-lane fallback, behind one
//! trait so each kernel is written once. Every reduction is in a fixed order, so a kernel's
//! result depends on its inputs and the instruction set, never on what else runs beside it.

/// What the kernels need from an instruction set.
pub trait Lanes {
    type V: Copy;
    const N: usize;
    /// # Safety
    /// The instruction set is available.
    unsafe fn zero() -> Self::V;
    /// # Safety
    /// `p` points to `N` readable values.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// `p` points to `N` writable values.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// # Safety
    /// The instruction set is available.
    unsafe fn splat(x: f32) -> Self::V;
    /// `a · b + c` (fused where the instruction set has it).
    /// # Safety
    /// The instruction set is available.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// # Safety
    /// The instruction set is available.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// The lanes' sum, in a fixed order.
    /// # Safety
    /// The instruction set is available.
    unsafe fn sum(v: Self::V) -> f32;
    /// `out[i] = sum(v[i])` (the same sums, possibly computed together).
    /// # Safety
    /// The instruction set is available.
    #[inline(always)]
    unsafe fn sums(v: &[Self::V], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o = Self::sum(x);
        }
    }
    /// `e^x` lane by lane for `x ≤ 0` (softmax weights), 0 below −87 (no subnormals).
    /// # Safety
    /// The instruction set is available.
    unsafe fn exp_neg(x: Self::V) -> Self::V;
}

/// `e^x` for `x ≤ 0` as the softmax folds use it one value at a time: 0 below −87, so no
/// subnormal weight reaches an accumulator.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    if x < -87.0 {
        0.0
    } else {
        x.exp()
    }
}

/// Cephes-style `e^x` on lanes: `x = n ln 2 + r`, `|r| ≤ ln 2 / 2`, a degree-6 polynomial in
/// `r`; evaluates to `(n, e^r)` — the caller scales by `2^n` through the exponent bits.
#[cfg(target_arch = "x86_64")]
macro_rules! exp_poly {
    ($x:expr, $n:expr, $splat:ident, $fma:ident, $mul:ident) => {{
        let (x, n) = ($x, $n);
        let r = $fma(n, $splat(-0.693_359_4), x);
        let r = $fma(n, $splat(2.121_944_4e-4), r);
        let mut p = $splat(1.987_569_1e-4);
        p = $fma(p, r, $splat(1.398_199_9e-3));
        p = $fma(p, r, $splat(8.333_452e-3));
        p = $fma(p, r, $splat(4.166_579_6e-2));
        p = $fma(p, r, $splat(1.666_666_5e-1));
        p = $fma(p, r, $splat(0.5));
        let y = $fma($mul(p, r), r, r);
        $fma($splat(1.0), $splat(1.0), y)
    }};
}

/// Eight lanes in plain Rust: any CPU (no fused multiply-add).
pub struct Portable;

impl Lanes for Portable {
    type V = [f32; 8];
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        // SAFETY: the caller guarantees 8 readable values.
        std::ptr::read_unaligned(p as *const [f32; 8])
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        // SAFETY: the caller guarantees 8 writable values.
        std::ptr::write_unaligned(p as *mut [f32; 8], v)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> [f32; 8] {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn mul(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn sum(l: [f32; 8]) -> f32 {
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
    }
    #[inline(always)]
    unsafe fn exp_neg(x: [f32; 8]) -> [f32; 8] {
        x.map(exp_neg)
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    pub struct Avx512;
    pub struct Avx2;

    impl Lanes for Avx512 {
        type V = __m512;
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            _mm512_reduce_add_ps(v)
        }
        #[inline(always)]
        unsafe fn exp_neg(x: __m512) -> __m512 {
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            let y = exp_poly!(x, n, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_mul_ps);
            let i = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            let y = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(i)));
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
            _mm512_maskz_mov_ps(keep, y)
        }
    }

    impl Lanes for Avx2 {
        type V = __m256;
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), v);
            ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
        }
        #[inline(always)]
        unsafe fn sums(v: &[__m256], out: &mut [f32]) {
            if v.len() != 8 || out.len() != 8 {
                for (o, &x) in out.iter_mut().zip(v) {
                    *o = Self::sum(x);
                }
                return;
            }
            // Eight sums at once: pairwise adds, then the two 128-bit halves.
            let t0 = _mm256_hadd_ps(v[0], v[1]);
            let t1 = _mm256_hadd_ps(v[2], v[3]);
            let t2 = _mm256_hadd_ps(v[4], v[5]);
            let t3 = _mm256_hadd_ps(v[6], v[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
            let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(lo, hi));
        }
        #[inline(always)]
        unsafe fn exp_neg(x: __m256) -> __m256 {
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let y = exp_poly!(x, n, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_mul_ps);
            let i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            let y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(i)));
            let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
            _mm256_and_ps(keep, y)
        }
    }
}

/// The widest instruction set of this CPU the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

/// Detected once per call site cheaply (`is_x86_feature_detected` caches).
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2Fma;
        }
    }
    Isa::Portable
}
