//! `exp` and `erf` for f32 written so that the compiler vectorises their loops: no calls, no
//! branches, plain arithmetic (libm's `expf`/`erff` are scalar calls, and the GELU and attention
//! of a DeiT-S step evaluate over 10⁸ of them).
//!
//! * `exp(x) = 2ᵏ·exp(r)`, `k = ⌊x·log₂e + ½⌋`, `r = x − k·ln2` in two parts (Cody and Waite),
//!   `exp(r)` by its Taylor polynomial of degree 7 on `|r| ≤ ln2/2` (truncation below 5e-9
//!   relative), `2ᵏ` built in the exponent bits. Arguments below about −87.3 (where f32's normal
//!   numbers end) give about 1e-38, above 88.7 overflow to ∞ as `expf` does. Within
//!   4 ulp of the exact value.
//! * `erf(x) = sign(x)·(1 − t·P(t)·exp(−x²))`, `t = 1/(1 + p·|x|)` (Abramowitz and Stegun,
//!   7.1.26): absolute error below 1.5e-7 for the formula, 5e-7 in f32 arithmetic, a few ulp
//!   of values near 1, which is what GELU's `Φ(x) = (1 + erf(x/√2))/2` needs.
//!
//! The same formulas run in the portable loop and, where the CPU has AVX-512, in a copy of it
//! compiled for AVX-512; without fused multiply-adds (Rust never contracts) both round alike,
//! so results do not depend on which copy ran. f64 keeps libm.

use std::mem::MaybeUninit;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: the first exact in few bits, so `k·LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// The largest argument whose `exp` is finite in f32, and the smallest kept normal.
const EXP_MAX: f32 = 88.722_83;
const EXP_MIN: f32 = -87.336_54;

/// `eˣ` for f32, vectorisable (see the module docs). NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Comparisons written so that NaN passes through unchanged.
    let over = x > EXP_MAX;
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    let x = if over { EXP_MAX } else { x };
    let k = (x * LOG2E + 0.5).floor();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // k is in [−126, 128]: 2ᵏ is built as 2^⌊k/2⌋·2^(k−⌊k/2⌋), two normal f32s, so that both
    // ends stay in range (the product may round to a subnormal, as expf's does).
    // k as an integer through the bits of k + 1.5·2²³ (exact for |k| < 2²²): a float-to-int
    // cast would be scalar (Rust's casts saturate), this stays in vector registers.
    let ki = (k + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000) as i32;
    let k1 = ki >> 1;
    let s1 = f32::from_bits((k1.wrapping_add(127) as u32) << 23);
    let s2 = f32::from_bits((ki.wrapping_sub(k1).wrapping_add(127) as u32) << 23);
    let y = p * s1 * s2;
    if over {
        f32::INFINITY
    } else {
        y
    }
}

/// The error function for f32, vectorisable (see the module docs).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    erf_given(x, exp(-ax * ax))
}

/// `erf(x)` from `e = exp(−x²)`, computed by the caller (GELU's gradient needs the same
/// exponential for its density, so it computes it once).
#[inline(always)]
fn erf_given(x: f32, e: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let t = 1.0 / (1.0 + P * x.abs());
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    // copysign keeps NaN (a NaN x gives a NaN y).
    (1.0 - poly * e).copysign(x)
}

/// `Φ(x) = (1 + erf(x/√2))/2` for f32.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    0.5 + 0.5 * erf(x * std::f32::consts::FRAC_1_SQRT_2)
}

/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_loop(x: &[f32], y: &mut [MaybeUninit<f32>]) {
    for (o, &v) in y.iter_mut().zip(x) {
        o.write(v * normal_cdf(v));
    }
}

#[inline(always)]
fn gelu_grad_loop(g: &[f32], x: &[f32], dx: &mut [MaybeUninit<f32>]) {
    for ((o, &gv), &v) in dx.iter_mut().zip(g).zip(x) {
        // One exponential for both terms: exp(−v²/2) is erf's exp(−(v/√2)²) and φ's.
        let e = exp(-0.5 * v * v);
        let cdf = 0.5 + 0.5 * erf_given(v * std::f32::consts::FRAC_1_SQRT_2, e);
        o.write(gv * (cdf + v * (FRAC_1_SQRT_2PI * e)));
    }
}

#[inline(always)]
fn exp_sub_loop(row: &mut [f32], shift: f32) {
    for v in row.iter_mut() {
        *v = exp(*v - shift);
    }
}

/// Runs `$body` in a copy compiled for AVX-512 where the CPU has it, else portably.
macro_rules! dispatch {
    ($name:ident, $loop:ident, ($($arg:ident: $ty:ty),*)) => {
        #[doc = concat!("`", stringify!($loop), "` on AVX-512 where available, else portably.")]
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) {
                    $loop($($arg),*)
                }
                if crate::direct::available() {
                    // SAFETY: AVX-512F is available.
                    return unsafe { wide($($arg),*) };
                }
            }
            $loop($($arg),*)
        }
    };
}

dispatch!(gelu, gelu_loop, (x: &[f32], y: &mut [MaybeUninit<f32>]));
dispatch!(gelu_grad, gelu_grad_loop, (g: &[f32], x: &[f32], dx: &mut [MaybeUninit<f32>]));
dispatch!(exp_sub, exp_sub_loop, (row: &mut [f32], shift: f32));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm_and_keeps_the_special_values() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(-200.0) < 2e-38 && exp(f32::NEG_INFINITY) < 2e-38);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_is_within_its_bound_of_the_f64_erf() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - want).abs());
            x += 0.001;
        }
        assert!(worst < 5e-7, "absolute error {worst}");
        assert!(erf(f32::NAN).is_nan());
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn the_wide_and_portable_copies_agree_bit_for_bit() {
        let x: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0031).collect();
        let g: Vec<f32> = x.iter().map(|v| 1.0 - 0.5 * v).collect();
        let run = |f: &dyn Fn(&mut [MaybeUninit<f32>])| {
            let mut o = vec![MaybeUninit::new(0.0f32); x.len()];
            f(&mut o);
            // SAFETY: every element was initialised above.
            o.iter()
                .map(|v| unsafe { v.assume_init() }.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&|o| gelu(&x, o)), run(&|o| gelu_loop(&x, o)));
        assert_eq!(
            run(&|o| gelu_grad(&g, &x, o)),
            run(&|o| gelu_grad_loop(&g, &x, o))
        );
        let (mut a, mut b) = (x.clone(), x.clone());
        exp_sub(&mut a, 0.25);
        exp_sub_loop(&mut b, 0.25);
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
