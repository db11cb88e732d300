//! Row sums in f64 that vectorise: [`LANES`] independent partial sums instead of one chain.
//!
//! A plain `iter().sum::<f64>()` is one chain of dependent adds (the compiler may not reorder
//! floating-point adds), so a 64-element row costs 64 add latencies. The sums here keep element
//! `i` in partial sum `i mod LANES` and add the partials in a fixed tree at the end: the order
//! depends only on the row's length, so the result is the same on any number of threads, and
//! the partials fit one vector register.

/// Independent partial sums per row.
pub const LANES: usize = 8;

/// Adds the partial sums in a fixed order.
#[inline(always)]
fn fold(acc: [f64; LANES]) -> f64 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// `Σᵢ f(xs[i], ys[i])` over the common length, in [`LANES`] partial sums.
#[inline(always)]
pub fn sum2<A: Copy, B: Copy>(xs: &[A], ys: &[B], f: impl Fn(A, B) -> f64) -> f64 {
    let n = xs.len().min(ys.len());
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mut acc = [0.0f64; LANES];
    let (xc, yc) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    for (l, (&x, &y)) in xr.iter().zip(yr).enumerate() {
        acc[l] += f(x, y);
    }
    fold(acc)
}

/// `Σᵢ f(xs[i])`, in [`LANES`] partial sums.
#[inline(always)]
pub fn sum<A: Copy>(xs: &[A], f: impl Fn(A) -> f64) -> f64 {
    sum2(xs, xs, |x, _| f(x))
}

/// `(Σᵢ f(…)ᵢ.0, Σᵢ f(…)ᵢ.1)`: two sums in one pass over `xs`, `ys` and `zs`, each in
/// [`LANES`] partial sums.
#[inline(always)]
pub fn sum_pair3<A: Copy, B: Copy, C: Copy>(
    xs: &[A],
    ys: &[B],
    zs: &[C],
    f: impl Fn(A, B, C) -> (f64, f64),
) -> (f64, f64) {
    let n = xs.len().min(ys.len()).min(zs.len());
    let (xs, ys, zs) = (&xs[..n], &ys[..n], &zs[..n]);
    let (mut p, mut q) = ([0.0f64; LANES], [0.0f64; LANES]);
    let (xc, yc, zc) = (
        xs.chunks_exact(LANES),
        ys.chunks_exact(LANES),
        zs.chunks_exact(LANES),
    );
    let (xr, yr, zr) = (xc.remainder(), yc.remainder(), zc.remainder());
    for ((x, y), z) in xc.zip(yc).zip(zc) {
        for l in 0..LANES {
            let (a, b) = f(x[l], y[l], z[l]);
            p[l] += a;
            q[l] += b;
        }
    }
    for (l, ((&x, &y), &z)) in xr.iter().zip(yr).zip(zr).enumerate() {
        let (a, b) = f(x, y, z);
        p[l] += a;
        q[l] += b;
    }
    (fold(p), fold(q))
}

/// The largest `f(xs[i])` (−∞ when empty; with a NaN, NaN or another element, as with
/// `f64::max`), compared in [`LANES`] running maxima.
#[inline(always)]
pub fn max<A: Copy>(xs: &[A], f: impl Fn(A) -> f64) -> f64 {
    let mut acc = [f64::NEG_INFINITY; LANES];
    let c = xs.chunks_exact(LANES);
    let r = c.remainder();
    for x in c {
        for l in 0..LANES {
            acc[l] = acc[l].max(f(x[l]));
        }
    }
    for (l, &x) in r.iter().enumerate() {
        acc[l] = acc[l].max(f(x));
    }
    acc.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against exact sums of small integers (every partial order gives the same value), over
    /// lengths around the lane width.
    #[test]
    fn sums_agree_with_exact_integer_sums() {
        for n in 0..40 {
            let xs: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
            let ys: Vec<f64> = (0..n).map(|i| (i % 5) as f64).collect();
            let exact: f64 = xs.iter().map(|&v| f64::from(v)).sum();
            assert_eq!(sum(&xs, f64::from), exact, "n={n}");
            let dot: f64 = xs.iter().zip(&ys).map(|(&a, &b)| f64::from(a) * b).sum();
            assert_eq!(sum2(&xs, &ys, |a, b| f64::from(a) * b), dot, "n={n}");
            let (p, q) = sum_pair3(&xs, &ys, &xs, |a, b, c| {
                (f64::from(a) + b, b * f64::from(c))
            });
            let p0: f64 = xs.iter().zip(&ys).map(|(&a, &b)| f64::from(a) + b).sum();
            let q0: f64 = xs.iter().zip(&ys).map(|(&a, &b)| b * f64::from(a)).sum();
            assert_eq!((p, q), (p0, q0), "n={n}");
            let m = xs
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            assert_eq!(max(&xs, f64::from), m, "n={n}");
        }
    }

    /// Rounding: within a few ulp of the f64 sum of the same terms in index order.
    #[test]
    fn rounding_is_that_of_an_f64_sum() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 101) as f32).sin() * 1e3)
            .collect();
        let seq: f64 = xs.iter().map(|&v| f64::from(v)).sum();
        let lanes = sum(&xs, f64::from);
        assert!((lanes - seq).abs() <= 1e-12 * xs.iter().map(|v| v.abs() as f64).sum::<f64>());
    }
}
