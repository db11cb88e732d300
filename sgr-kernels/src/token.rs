//! Raw CPU loops of the row-wise Transformer ops: LayerNorm over the last axis, the exact GELU,
//! and biases (a linear layer's rows, a convolution's channels) with their gradient sums.
//!
//! Rows (tokens) are independent, so the per-row work runs in parallel with rayon. The one
//! cross-row reduction, LayerNorm's `dγ, dβ`, is cut into fixed blocks of [`ROW_BLOCK`] rows whose
//! f64 partial sums are added in block order: the result does not depend on the thread count.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::cpu::Real;
use crate::lanes;

/// Rows per block of a cross-row reduction. Fixed, so that the sums are the same on any number
/// of threads.
pub const ROW_BLOCK: usize = 32;

/// Elements per task of the element-wise passes (small enough to balance two or more threads
/// on one MLP activation, large enough to amortise the task).
const ELEMENT_BLOCK: usize = 1 << 13;

/// LayerNorm forward over rows of `d` features: `y = (x − μ)·r·γ + β` with `r = 1/√(σ² + ε)`,
/// μ and the biased σ² of the row (two passes, in f64, [`lanes`] sums). Writes `stats[2i] = μ`,
/// `stats[2i + 1] = r` for row `i`: all the backward needs besides `x` and `γ`.
pub fn layer_norm_forward<T: Real>(
    x: &[T],
    d: usize,
    gamma: &[T],
    beta: &[T],
    eps: f64,
    y: &mut [MaybeUninit<T>],
    stats: &mut [f64],
) {
    if d == 0 {
        return;
    }
    x.par_chunks(d)
        .zip(y.par_chunks_mut(d))
        .zip(stats.par_chunks_mut(2))
        .with_min_len(8)
        .for_each(|((xr, yr), st)| {
            let mean = lanes::sum(xr, T::to_f64) / d as f64;
            let var = lanes::sum(xr, |v| {
                let c = v.to_f64() - mean;
                c * c
            }) / d as f64;
            let r = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                o.write(T::from_f64(
                    (v.to_f64() - mean) * r * g.to_f64() + b.to_f64(),
                ));
            }
            st[0] = mean;
            st[1] = r;
        });
}

/// LayerNorm backward: `dx = r·(g·γ − mean(g·γ) − x̂·mean(g·γ·x̂))` per row into `dx`, and
/// `[dγ; dβ] = [Σ g·x̂; Σ g]` over all rows into `dgb` (length `2d`), with `x̂ = (x − μ)·r`
/// from the forward's `stats`.
pub fn layer_norm_backward<T: Real>(
    g: &[T],
    x: &[T],
    gamma: &[T],
    stats: &[f64],
    d: usize,
    dx: &mut [MaybeUninit<T>],
    dgb: &mut [MaybeUninit<T>],
) {
    if d == 0 {
        return;
    }
    let block = ROW_BLOCK * d;
    let partials: Vec<Vec<f64>> = g
        .par_chunks(block)
        .zip(x.par_chunks(block))
        .zip(dx.par_chunks_mut(block))
        .zip(stats.par_chunks(2 * ROW_BLOCK))
        .map(|(((gb, xb), db), sb)| {
            let mut part = vec![0.0f64; 2 * d];
            let (pg, pb) = part.split_at_mut(d);
            for (((gr, xr), dr), st) in gb
                .chunks(d)
                .zip(xb.chunks(d))
                .zip(db.chunks_mut(d))
                .zip(sb.chunks(2))
            {
                let (mean, r) = (st[0], st[1]);
                let (a, b) = lanes::sum_pair3(gr, xr, gamma, |gv, xv, gm| {
                    let gg = gv.to_f64() * gm.to_f64();
                    (gg, gg * ((xv.to_f64() - mean) * r))
                });
                let (a, b) = (a / d as f64, b / d as f64);
                for (j, ((&gv, &xv), o)) in gr.iter().zip(xr).zip(dr.iter_mut()).enumerate() {
                    let xh = (xv.to_f64() - mean) * r;
                    let gf = gv.to_f64();
                    o.write(T::from_f64(r * (gf * gamma[j].to_f64() - a - xh * b)));
                    pg[j] += gf * xh;
                    pb[j] += gf;
                }
            }
            part
        })
        .collect();
    let mut sum = vec![0.0f64; 2 * d];
    for p in &partials {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    for (o, v) in dgb.iter_mut().zip(sum) {
        o.write(T::from_f64(v));
    }
}

/// The exact GELU, `y = x·Φ(x)`, element-wise.
pub fn gelu<T: Real>(x: &[T], y: &mut [MaybeUninit<T>]) {
    x.par_chunks(ELEMENT_BLOCK)
        .zip(y.par_chunks_mut(ELEMENT_BLOCK))
        .for_each(|(xs, ys)| T::gelu_block(xs, ys));
}

/// GELU's input gradient, `dx = g·(Φ(x) + x·φ(x))`, element-wise.
pub fn gelu_backward<T: Real>(g: &[T], x: &[T], dx: &mut [MaybeUninit<T>]) {
    g.par_chunks(ELEMENT_BLOCK)
        .zip(x.par_chunks(ELEMENT_BLOCK))
        .zip(dx.par_chunks_mut(ELEMENT_BLOCK))
        .for_each(|((gs, xs), ds)| T::gelu_grad_block(gs, xs, ds));
}

/// Adds `bias` (length `d`) to every row of `y` in place, as candle's broadcast add rounds it.
pub fn add_bias_rows<T: Real>(y: &mut [T], bias: &[T]) {
    let d = bias.len();
    if d == 0 {
        return;
    }
    y.par_chunks_mut(d).with_min_len(16).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    });
}

/// Columns per task of [`column_sums`].
const COLUMN_BLOCK: usize = 64;

/// `out[j] = Σᵢ g[i·d + j]`: the column sums of a `rows × d` matrix (a bias gradient), each
/// column accumulated in `T` over the rows in order, as candle's sum over the first axis
/// accumulates it (the same bits), with blocks of columns in parallel.
pub fn column_sums<T: Real>(g: &[T], d: usize, out: &mut [MaybeUninit<T>]) {
    if d == 0 {
        return;
    }
    out.par_chunks_mut(COLUMN_BLOCK)
        .enumerate()
        .for_each(|(blk, o)| {
            let lo = blk * COLUMN_BLOCK;
            let mut acc = [T::ZERO; COLUMN_BLOCK];
            let acc = &mut acc[..o.len()];
            for row in g.chunks_exact(d) {
                for (a, &v) in acc.iter_mut().zip(&row[lo..lo + o.len()]) {
                    *a += v;
                }
            }
            for (o, &a) in o.iter_mut().zip(acc.iter()) {
                o.write(a);
            }
        });
}

/// Adds `bias[ch]` to every element of channel `ch` of `y`, viewed as `(outer, c, inner)` with
/// `c = bias.len()`, in place, as candle's broadcast add rounds it.
pub fn add_channel_bias<T: Real>(y: &mut [T], bias: &[T], inner: usize) {
    if inner == 1 {
        return add_bias_rows(y, bias);
    }
    if inner == 0 || bias.is_empty() {
        return;
    }
    y.par_chunks_mut(inner)
        .with_min_len((ELEMENT_BLOCK / inner).max(1))
        .enumerate()
        .for_each(|(i, plane)| {
            let b = bias[i % bias.len()];
            for v in plane.iter_mut() {
                *v += b;
            }
        });
}

/// `out[ch] = Σ g[o, ch, i]` over `(o, i)` of `g` viewed as `(outer, c, inner)`: each channel
/// accumulated in `T` in memory order, as candle's sum over the other axes accumulates it (the
/// same bits), channels in parallel.
pub fn channel_sums<T: Real>(g: &[T], c: usize, inner: usize, out: &mut [MaybeUninit<T>]) {
    if inner == 1 {
        return column_sums(g, c, out);
    }
    if c == 0 {
        return;
    }
    out.par_iter_mut().enumerate().for_each(|(ch, o)| {
        let mut acc = T::ZERO;
        if inner > 0 {
            for plane in g.chunks_exact(c * inner) {
                for &v in &plane[ch * inner..(ch + 1) * inner] {
                    acc += v;
                }
            }
        }
        o.write(acc);
    });
}
