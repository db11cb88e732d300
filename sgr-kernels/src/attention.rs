//! Raw CPU loops of multi-head scaled dot-product attention, one task per (image, head).
//!
//! The input is the packed output of a `qkv` projection, `(B, N, 3C)` with `q`, `k`, `v` at
//! column offsets `0`, `C` and `2C` and head `h` at `h·d` within each; the output has the heads
//! merged, `(B, N, C)`. A task holds one `N × N` score tile of its own, so the `B·H·N·N`
//! scores never exist at once; the forward keeps only each row's log-sum-exp, from which the
//! backward recomputes the probabilities. Every task writes its own head's columns and its
//! gemms run single-threaded, so the results do not depend on the thread count.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::cpu::{gemm_raw, Real, Strided};
use crate::lanes;

/// The shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnGeom {
    /// Images.
    pub b: usize,
    /// Tokens per image.
    pub n: usize,
    /// Heads.
    pub heads: usize,
    /// Width of a head.
    pub hd: usize,
}

impl AttnGeom {
    /// Width of the merged output, `heads · hd`.
    pub fn c(&self) -> usize {
        self.heads * self.hd
    }

    /// Elements of the packed `(B, N, 3C)` input.
    pub fn qkv_len(&self) -> usize {
        self.b * self.n * 3 * self.c()
    }

    /// Elements of the `(B, N, C)` output.
    pub fn out_len(&self) -> usize {
        self.b * self.n * self.c()
    }

    /// Rows of softmax, `B·H·N`: the length of the log-sum-exp.
    pub fn rows(&self) -> usize {
        self.b * self.heads * self.n
    }

    /// Offset of `(image, token 0, part, head)` in the packed input (`part` 0, 1, 2 for q, k, v).
    fn qkv_at(&self, img: usize, part: usize, head: usize) -> usize {
        img * self.n * 3 * self.c() + part * self.c() + head * self.hd
    }

    /// Offset of `(image, token 0, head)` in the merged output.
    fn out_at(&self, img: usize, head: usize) -> usize {
        img * self.n * self.c() + head * self.hd
    }
}

/// A pointer the tasks share; each task writes only its own head's elements.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the tasks that share it write disjoint elements (one head of one image each).
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The element `offset` past the start (a method, so that closures capture the `Send`
    /// wrapper rather than its raw pointer field).
    ///
    /// # Safety
    /// `offset` must be inside the allocation.
    unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// `s = scale · q·kᵀ` for one task, `s` being `N × N`.
///
/// # Safety
/// `q`, `k` point at a head inside a packed input of geometry `g`.
unsafe fn scores<T: Real>(g: &AttnGeom, q: *const T, k: *const T, scale: T, s: &mut [T]) {
    let rs = 3 * g.c();
    // SAFETY: the head's N rows of width hd are inside the packed input; `s` is N × N.
    unsafe {
        gemm_raw(
            (g.n, g.n, g.hd),
            Strided(s.as_mut_ptr(), g.n, 1),
            Strided(q, rs, 1),
            Strided(k, 1, rs),
            false,
            scale,
        )
    }
}

/// Forward: `out = softmax(scale · q·kᵀ)·v` per head, heads merged, and the log-sum-exp of
/// every softmax row into `lse` (`B·H·N`, row `(img·H + head)·N + i`).
pub fn attention_forward<T: Real>(
    g: &AttnGeom,
    qkv: &[T],
    scale: T,
    out: &mut [MaybeUninit<T>],
    lse: &mut [f64],
) {
    assert_eq!(qkv.len(), g.qkv_len(), "attention: packed input size");
    assert_eq!(out.len(), g.out_len(), "attention: output size");
    assert_eq!(lse.len(), g.rows(), "attention: log-sum-exp size");
    let n = g.n;
    if n == 0 || g.hd == 0 {
        return;
    }
    let dst = Shared(out.as_mut_ptr().cast::<T>());
    lse.par_chunks_mut(n).enumerate().for_each_init(
        || vec![T::ZERO; n * n],
        |s, (task, lse_rows)| {
            let (img, head) = (task / g.heads, task % g.heads);
            let base = qkv.as_ptr();
            // SAFETY: the offsets address this task's head inside the packed input and the
            // output; no other task writes these output columns.
            unsafe {
                scores(
                    g,
                    base.add(g.qkv_at(img, 0, head)),
                    base.add(g.qkv_at(img, 1, head)),
                    scale,
                    s,
                );
                for (row, l) in s.chunks_mut(n).zip(lse_rows.iter_mut()) {
                    *l = softmax_row(row);
                }
                gemm_raw(
                    (n, g.hd, n),
                    Strided(dst.at(g.out_at(img, head)), g.c(), 1),
                    Strided(s.as_ptr(), n, 1),
                    Strided(base.add(g.qkv_at(img, 2, head)), 3 * g.c(), 1),
                    false,
                    T::ONE,
                );
            }
        },
    );
}

/// Replaces a row of scores by its softmax; returns the row's log-sum-exp.
fn softmax_row<T: Real>(row: &mut [T]) -> f64 {
    let m = lanes::max(row, T::to_f64);
    T::exp_sub_block(row, T::from_f64(m));
    let sum = lanes::sum(row, T::to_f64);
    let inv = T::from_f64(1.0 / sum);
    for v in row.iter_mut() {
        *v = *v * inv;
    }
    m + sum.ln()
}

/// Backward: from the packed input, the forward's output `out`, its gradient `gout` and the
/// log-sum-exp, writes the gradient of the packed input into `dqkv`. Per head, with
/// `P = exp(S − lse)` recomputed: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
/// `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`.
pub fn attention_backward<T: Real>(
    g: &AttnGeom,
    qkv: &[T],
    out: &[T],
    gout: &[T],
    scale: T,
    lse: &[f64],
    dqkv: &mut [MaybeUninit<T>],
) {
    assert_eq!(
        qkv.len(),
        g.qkv_len(),
        "attention backward: packed input size"
    );
    assert_eq!(dqkv.len(), g.qkv_len(), "attention backward: gradient size");
    assert_eq!(out.len(), g.out_len(), "attention backward: output size");
    assert_eq!(
        gout.len(),
        g.out_len(),
        "attention backward: output gradient size"
    );
    assert_eq!(lse.len(), g.rows(), "attention backward: log-sum-exp size");
    let (n, c, hd) = (g.n, g.c(), g.hd);
    if n == 0 || hd == 0 {
        return;
    }
    let dst = Shared(dqkv.as_mut_ptr().cast::<T>());
    lse.par_chunks(n).enumerate().for_each_init(
        || (vec![T::ZERO; n * n], vec![T::ZERO; n * n]),
        |(p, ds), (task, lse_rows)| {
            let (img, head) = (task / g.heads, task % g.heads);
            let base = qkv.as_ptr();
            let (q, k, v) = (
                g.qkv_at(img, 0, head),
                g.qkv_at(img, 1, head),
                g.qkv_at(img, 2, head),
            );
            let o = g.out_at(img, head);
            // SAFETY: every offset addresses this task's head inside its buffer; only this task
            // writes the head's columns of dqkv.
            unsafe {
                scores(g, base.add(q), base.add(k), scale, p);
                for (row, &l) in p.chunks_mut(n).zip(lse_rows) {
                    T::exp_sub_block(row, T::from_f64(l));
                }
                // dV = Pᵀ·dO
                gemm_raw(
                    (n, hd, n),
                    Strided(dst.at(v), 3 * c, 1),
                    Strided(p.as_ptr(), 1, n),
                    Strided(gout.as_ptr().add(o), c, 1),
                    false,
                    T::ONE,
                );
                // dP = dO·Vᵀ
                gemm_raw(
                    (n, n, hd),
                    Strided(ds.as_mut_ptr(), n, 1),
                    Strided(gout.as_ptr().add(o), c, 1),
                    Strided(base.add(v), 1, 3 * c),
                    false,
                    T::ONE,
                );
            }
            for i in 0..n {
                let row = o + i * c;
                let di = lanes::sum2(&gout[row..row + hd], &out[row..row + hd], |a, b| {
                    a.to_f64() * b.to_f64()
                });
                let di = T::from_f64(di);
                for (d, &pv) in ds[i * n..(i + 1) * n]
                    .iter_mut()
                    .zip(&p[i * n..(i + 1) * n])
                {
                    *d = pv * (*d - di);
                }
            }
            // SAFETY: as above.
            unsafe {
                // dQ = scale·dS·K
                gemm_raw(
                    (n, hd, n),
                    Strided(dst.at(q), 3 * c, 1),
                    Strided(ds.as_ptr(), n, 1),
                    Strided(base.add(k), 3 * c, 1),
                    false,
                    scale,
                );
                // dK = scale·dSᵀ·Q
                gemm_raw(
                    (n, hd, n),
                    Strided(dst.at(k), 3 * c, 1),
                    Strided(ds.as_ptr(), 1, n),
                    Strided(base.add(q), 3 * c, 1),
                    false,
                    scale,
                );
            }
        },
    );
}
