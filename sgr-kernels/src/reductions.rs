//! AVX-512 f32 versions of the reductions of [`crate::cpu`]: the per-plane BatchNorm sums
//! ([`crate::cpu::Real::plane_sums`], [`crate::cpu::Real::plane_moments`]) and the boundary
//! diagnostics' pair sums ([`crate::cpu::Real::block_pair_sums`]). The generic versions keep
//! eight lanes that LLVM does not turn into vector code; these keep 16-lane accumulators and
//! widen to f64 once per plane (or accumulate in f64 where the generic version does). The ReLU
//! mask is recomputed exactly as the forward computes it (a multiply and an add, not a fused
//! multiply-add), so both agree on every element.

use std::arch::x86_64::*;

use crate::geom::PlaneMask;

/// Lanes of an AVX-512 f32 vector.
const V: usize = 16;

/// The load mask of the `rem < 16` last elements.
fn tail(rem: usize) -> __mmask16 {
    ((1u32 << rem) - 1) as __mmask16
}

/// The sum of the 16 lanes of `v`, in f64.
#[target_feature(enable = "avx512f")]
fn sum_f64(v: __m512) -> f64 {
    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
        _mm512_castps_pd(v),
    )));
    _mm512_reduce_add_pd(_mm512_add_pd(lo, hi))
}

/// Runs `step(i, lanes, a, b)` over `n` elements, 16 at a time: full vectors alternate
/// between two pairs of accumulators (two independent addition chains), the tail is masked.
/// Returns `(Σ a, Σ b)` in f64.
#[inline]
#[target_feature(enable = "avx512f")]
fn two_sums(n: usize, step: impl Fn(usize, __mmask16, &mut __m512, &mut __m512)) -> (f64, f64) {
    let zero = _mm512_setzero_ps();
    let (mut a0, mut b0, mut a1, mut b1) = (zero, zero, zero, zero);
    let mut i = 0;
    while i + 2 * V <= n {
        step(i, 0xFFFF, &mut a0, &mut b0);
        step(i + V, 0xFFFF, &mut a1, &mut b1);
        i += 2 * V;
    }
    while i < n {
        let lanes = if n - i >= V { 0xFFFF } else { tail(n - i) };
        step(i, lanes, &mut a0, &mut b0);
        i += V;
    }
    (
        sum_f64(_mm512_add_ps(a0, a1)),
        sum_f64(_mm512_add_ps(b0, b1)),
    )
}

/// `(Σ g', Σ g'·(x − μ))` over one plane, `g'` the gradient masked as `mask` says.
///
/// # Safety
/// AVX-512F must be available; `gs` (and a mask's slice) are at least as long as `xs`.
#[target_feature(enable = "avx512f")]
pub unsafe fn plane_sums(xs: &[f32], gs: &[f32], mu: f32, mask: PlaneMask<'_, f32>) -> (f64, f64) {
    let n = xs.len();
    debug_assert!(gs.len() >= n);
    let vmu = _mm512_set1_ps(mu);
    let zero = _mm512_setzero_ps();
    let (zm, sc, sh) = match mask {
        PlaneMask::Relu { mean, scale, shift } => (mean, scale, shift),
        _ => (0.0, 0.0, 0.0),
    };
    let (vzm, vsc, vsh) = (_mm512_set1_ps(zm), _mm512_set1_ps(sc), _mm512_set1_ps(sh));
    // SAFETY (closure): lanes of `k` lie inside `xs`, `gs` and the mask's slice.
    let step = |i: usize, k: __mmask16, a: &mut __m512, b: &mut __m512| unsafe {
        let x = _mm512_maskz_loadu_ps(k, xs.as_ptr().add(i));
        let mut g = _mm512_maskz_loadu_ps(k, gs.as_ptr().add(i));
        match mask {
            PlaneMask::None => {}
            PlaneMask::Relu { .. } => {
                let z = _mm512_add_ps(_mm512_mul_ps(vsc, _mm512_sub_ps(x, vzm)), vsh);
                g = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(z, zero), g);
            }
            PlaneMask::Mask(m) => {
                g = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(k, m.as_ptr().add(i)));
            }
        }
        *a = _mm512_add_ps(*a, g);
        *b = _mm512_fmadd_ps(g, _mm512_sub_ps(x, vmu), *b);
    };
    two_sums(n, step)
}

/// `(Σ (x − s), Σ (x − s)²)` over one plane.
///
/// # Safety
/// AVX-512F must be available.
#[target_feature(enable = "avx512f")]
pub unsafe fn plane_moments(xs: &[f32], s: f32) -> (f64, f64) {
    let n = xs.len();
    let vs = _mm512_set1_ps(s);
    // SAFETY (closure): lanes of `k` lie inside `xs`.
    let step = |i: usize, k: __mmask16, a: &mut __m512, b: &mut __m512| unsafe {
        let d = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, xs.as_ptr().add(i)), vs);
        *a = _mm512_add_ps(*a, d);
        *b = _mm512_fmadd_ps(d, d, *b);
    };
    two_sums(n, step)
}

/// `[Σ a·b, Σ a², Σ b², Σ (a − b)²]` of one block, in f64: each 16-lane vector is widened to
/// two 8-lane f64 vectors before the products.
///
/// # Safety
/// AVX-512F must be available; `b` is at least as long as `a`.
#[target_feature(enable = "avx512f")]
pub unsafe fn block_pair_sums(a: &[f32], b: &[f32]) -> [f64; 4] {
    let n = a.len();
    debug_assert!(b.len() >= n);
    let mut acc = [_mm512_setzero_pd(); 8];
    let mut i = 0;
    while i < n {
        let k = if n - i >= V { 0xFFFF } else { tail(n - i) };
        // SAFETY: lanes of `k` lie inside `a` and `b`.
        let (va, vb) = unsafe {
            (
                _mm512_maskz_loadu_ps(k, a.as_ptr().add(i)),
                _mm512_maskz_loadu_ps(k, b.as_ptr().add(i)),
            )
        };
        let wide = |v: __m512, hi: bool| {
            let half = if hi {
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
            } else {
                _mm512_castps512_ps256(v)
            };
            _mm512_cvtps_pd(half)
        };
        for (h, hi) in [false, true].into_iter().enumerate() {
            let (p, q) = (wide(va, hi), wide(vb, hi));
            let d = _mm512_sub_pd(p, q);
            let s = &mut acc[4 * h..4 * h + 4];
            s[0] = _mm512_fmadd_pd(p, q, s[0]);
            s[1] = _mm512_fmadd_pd(p, p, s[1]);
            s[2] = _mm512_fmadd_pd(q, q, s[2]);
            s[3] = _mm512_fmadd_pd(d, d, s[3]);
        }
        i += V;
    }
    std::array::from_fn(|j| _mm512_reduce_add_pd(_mm512_add_pd(acc[j], acc[4 + j])))
}
