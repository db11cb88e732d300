//! Raw CPU loops behind the fused ops: im2col/col2im, gemm calls, BatchNorm reductions, ReLU.
//!
//! Every function works on contiguous row-major slices (NCHW activations, `(O, C, KH, KW)`
//! weights) and is generic over `f32`/`f64`. Work is split over images (convolutions) or channels
//! (BatchNorm) with rayon; each gemm inside runs single-threaded, so the two levels never
//! oversubscribe the cores.

use std::mem::MaybeUninit;

use rayon::prelude::*;

pub use crate::geom::{ConvGeom, PlaneMask};

/// The element types the kernels run on.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Widening conversion.
    fn to_f64(self) -> f64;
    /// Narrowing conversion.
    fn from_f64(v: f64) -> Self;
    /// `eˣ`.
    fn exp(self) -> Self;
    /// The error function (libm's, as candle's own `erf`).
    fn erf(self) -> Self;
    /// Runs the direct 3×3 kernel `op` ([`crate::direct`]) on operands `a`, `b` where it
    /// applies; whether it ran.
    fn direct(
        _: DirectOp,
        _: &ConvGeom,
        _: &[Self],
        _: &[Self],
        _: &mut [MaybeUninit<Self>],
    ) -> bool {
        false
    }
    /// `(Σ g', Σ g'·(x − μ))` over one plane, `g'` the gradient `gs` masked as `mask` says.
    fn plane_sums(xs: &[Self], gs: &[Self], mu: Self, mask: PlaneMask<'_, Self>) -> (f64, f64) {
        lane_plane_sums(xs, gs, mu, mask)
    }
    /// `(Σ (x − s), Σ (x − s)²)` over one plane.
    fn plane_moments(xs: &[Self], s: Self) -> (f64, f64) {
        lane_moments(xs, s)
    }
    /// `[Σ a·b, Σ a², Σ b², Σ (a − b)²]` over one block of [`pair_sums`], in f64.
    fn block_pair_sums(a: &[Self], b: &[Self]) -> [f64; 4] {
        lane_pair_sums(a, b)
    }
    /// The exact GELU `y = x·Φ(x)` over a block (f32: [`crate::vmath`]).
    fn gelu_block(x: &[Self], y: &mut [MaybeUninit<Self>]) {
        for (o, &v) in y.iter_mut().zip(x) {
            o.write(v * normal_cdf(v));
        }
    }
    /// GELU's input gradient `dx = g·(Φ(x) + x·φ(x))` over a block (f32: [`crate::vmath`]).
    fn gelu_grad_block(g: &[Self], x: &[Self], dx: &mut [MaybeUninit<Self>]) {
        let minus_half = Self::from_f64(-0.5);
        let c = Self::from_f64(FRAC_1_SQRT_2PI);
        for ((o, &gv), &v) in dx.iter_mut().zip(g).zip(x) {
            let pdf = c * (minus_half * v * v).exp();
            o.write(gv * (normal_cdf(v) + v * pdf));
        }
    }
    /// `v ← exp(v − shift)` over a row (f32: [`crate::vmath`]).
    fn exp_sub_block(row: &mut [Self], shift: Self) {
        for v in row.iter_mut() {
            *v = (*v - shift).exp();
        }
    }
}

/// `1/√(2π)`, the standard normal density at 0.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `Φ(x) = (1 + erf(x/√2))/2`, the standard normal distribution function.
fn normal_cdf<T: Real>(x: T) -> T {
    let half = T::from_f64(0.5);
    half + half * (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf()
}

/// Which direct 3×3 kernel [`Real::direct`] runs.
#[derive(Debug, Clone, Copy)]
pub enum DirectOp {
    /// `y = conv(x, w)`: operands `x, w`.
    Forward,
    /// The input gradient: operands `gy, w`.
    InputGrad,
    /// The weight gradient: operands `x, gy`.
    WeightGrad,
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
    fn direct(
        op: DirectOp,
        g: &ConvGeom,
        a: &[f32],
        b: &[f32],
        out: &mut [MaybeUninit<f32>],
    ) -> bool {
        match op {
            DirectOp::Forward => crate::direct::forward(g, a, b, out),
            DirectOp::InputGrad => crate::direct::input_grad(g, a, b, out),
            DirectOp::WeightGrad => crate::direct::weight_grad(g, a, b, out),
        }
    }
    fn plane_sums(xs: &[f32], gs: &[f32], mu: f32, mask: PlaneMask<'_, f32>) -> (f64, f64) {
        assert!(gs.len() >= xs.len());
        if let PlaneMask::Mask(m) = mask {
            assert!(m.len() >= xs.len());
        }
        #[cfg(target_arch = "x86_64")]
        if crate::direct::available() {
            // SAFETY: AVX-512F is available; the lengths are checked above.
            return unsafe { crate::reductions::plane_sums(xs, gs, mu, mask) };
        }
        lane_plane_sums(xs, gs, mu, mask)
    }
    fn plane_moments(xs: &[f32], s: f32) -> (f64, f64) {
        #[cfg(target_arch = "x86_64")]
        if crate::direct::available() {
            // SAFETY: AVX-512F is available.
            return unsafe { crate::reductions::plane_moments(xs, s) };
        }
        lane_moments(xs, s)
    }
    fn block_pair_sums(a: &[f32], b: &[f32]) -> [f64; 4] {
        assert!(b.len() >= a.len());
        #[cfg(target_arch = "x86_64")]
        if crate::direct::available() {
            // SAFETY: AVX-512F is available; the lengths are checked above.
            return unsafe { crate::reductions::block_pair_sums(a, b) };
        }
        lane_pair_sums(a, b)
    }
    fn gelu_block(x: &[f32], y: &mut [MaybeUninit<f32>]) {
        crate::vmath::gelu(x, y)
    }
    fn gelu_grad_block(g: &[f32], x: &[f32], dx: &mut [MaybeUninit<f32>]) {
        crate::vmath::gelu_grad(g, x, dx)
    }
    fn exp_sub_block(row: &mut [f32], shift: f32) {
        crate::vmath::exp_sub(row, shift)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// Allocates `n` elements and lets `fill` write them, skipping the memset of `vec![0; n]` (as
/// candle's own kernels do). Every public kernel here that takes a `&mut [MaybeUninit<T>]`
/// output writes each of its elements.
///
/// # Safety
/// `fill` must initialise all `n` elements.
pub unsafe fn alloc_filled<T: Real>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v: Vec<MaybeUninit<T>> = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit<T>` needs no initialisation and the capacity is `n`.
    unsafe { v.set_len(n) };
    fill(&mut v);
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: the caller guarantees that `fill` wrote every element; `MaybeUninit<T>` has the
    // layout of `T`; pointer, length and capacity come from the same allocation.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// Writes `T::ZERO` everywhere and returns the now initialised slice.
fn zero_init<T: Real>(x: &mut [MaybeUninit<T>]) -> &mut [T] {
    for v in x.iter_mut() {
        v.write(T::ZERO);
    }
    // SAFETY: every element was just written; `MaybeUninit<T>` has the layout of `T`.
    unsafe { &mut *(x as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Views an initialised slice as a write-only output (never used to write uninitialised data).
fn as_out<T>(x: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: `MaybeUninit<T>` has the layout of `T`; callers only write initialised values.
    unsafe { &mut *(x as *mut [T] as *mut [MaybeUninit<T>]) }
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, each operand given by its row and column strides.
/// Without `accumulate`, `dst` is only written (it may be uninitialised); with it, `dst` must
/// be initialised.
#[allow(clippy::too_many_arguments)]
fn mm<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<T>],
    dst_rs: usize,
    dst_cs: usize,
    lhs: &[T],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[T],
    rhs_rs: usize,
    rhs_cs: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(dst.len() > (m - 1) * dst_rs + (n - 1) * dst_cs);
    if k > 0 {
        debug_assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        debug_assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    let dst = Strided(dst.as_mut_ptr().cast::<T>(), dst_rs, dst_cs);
    // SAFETY: the asserted extents keep every access inside the three slices; `dst` is borrowed
    // mutably and does not alias the shared operands; gemm reads `dst` only with `accumulate`,
    // when the caller has initialised it.
    unsafe {
        gemm_raw(
            (m, n, k),
            dst,
            Strided(lhs.as_ptr(), lhs_rs, lhs_cs),
            Strided(rhs.as_ptr(), rhs_rs, rhs_cs),
            accumulate,
            T::ONE,
        )
    }
}

/// A matrix operand of [`gemm_raw`]: its first element, row stride and column stride.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Strided<P>(pub P, pub usize, pub usize);

/// `dst (+)= scale · lhs · rhs` for `(m, n, k)`, single-threaded (callers parallelise over
/// images or heads), on raw strided operands (attention writes one head's columns of a shared
/// output).
///
/// # Safety
/// Every element addressed by the strides and `(m, n, k)` must be inside its allocation; `dst`
/// must not alias `lhs` or `rhs` and must not be accessed by anyone else during the call; with
/// `accumulate`, `dst` must be initialised.
pub(crate) unsafe fn gemm_raw<T: Real>(
    dims: (usize, usize, usize),
    dst: Strided<*mut T>,
    lhs: Strided<*const T>,
    rhs: Strided<*const T>,
    accumulate: bool,
    scale: T,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm_in(
            dims,
            dst,
            lhs,
            rhs,
            accumulate,
            scale,
            gemm::Parallelism::None,
        )
    }
}

/// [`gemm_raw`] on `parallelism` (candle's matmul runs on the calling rayon pool's threads;
/// so does the fused linear layer, with the same call, so that both round alike).
///
/// # Safety
/// As [`gemm_raw`].
pub(crate) unsafe fn gemm_in<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut T>,
    lhs: Strided<*const T>,
    rhs: Strided<*const T>,
    accumulate: bool,
    scale: T,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: inside dst's extent (the caller's contract).
                    unsafe { dst.0.add(i * dst.1 + j * dst.2).write(T::ZERO) };
                }
            }
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            if accumulate { T::ONE } else { T::ZERO },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Writes the column matrix `(C·KH·KW) × (HO·WO)` of one image.
fn im2col<T: Real>(g: &ConvGeom, x: &[T], cols: &mut [T]) {
    let (ho, wo) = (g.ho(), g.wo());
    let hw_out = ho * wo;
    for c in 0..g.c {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (oh_lo, oh_hi) = g.valid_range(ki, g.h, ho);
            for kj in 0..g.kw {
                let (ow_lo, ow_hi) = g.valid_range(kj, g.w, wo);
                let row = ((c * g.kh + ki) * g.kw + kj) * hw_out;
                let dst = &mut cols[row..row + hw_out];
                for oh in 0..ho {
                    let line = &mut dst[oh * wo..(oh + 1) * wo];
                    if oh < oh_lo || oh >= oh_hi {
                        line.fill(T::ZERO);
                        continue;
                    }
                    let ih = oh * g.stride + ki - g.pad;
                    line[..ow_lo].fill(T::ZERO);
                    line[ow_hi..].fill(T::ZERO);
                    let src = &plane[ih * g.w..(ih + 1) * g.w];
                    if ow_lo == ow_hi {
                        continue;
                    }
                    if g.stride == 1 {
                        // a plain loop: lines are ~32 values, a memcpy call per line costs more
                        let start = ow_lo + kj - g.pad;
                        for (d, &v) in line[ow_lo..ow_hi]
                            .iter_mut()
                            .zip(&src[start..start + (ow_hi - ow_lo)])
                        {
                            *d = v;
                        }
                    } else {
                        for (ow, v) in line[ow_lo..ow_hi].iter_mut().enumerate() {
                            *v = src[(ow + ow_lo) * g.stride + kj - g.pad];
                        }
                    }
                }
            }
        }
    }
}

/// Adds the column matrix of one image back onto the image (the adjoint of [`im2col`]).
fn col2im<T: Real>(g: &ConvGeom, cols: &[T], x: &mut [MaybeUninit<T>]) {
    let (ho, wo) = (g.ho(), g.wo());
    let hw_out = ho * wo;
    let x = zero_init(x);
    for c in 0..g.c {
        let plane = &mut x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (oh_lo, oh_hi) = g.valid_range(ki, g.h, ho);
            for kj in 0..g.kw {
                let (ow_lo, ow_hi) = g.valid_range(kj, g.w, wo);
                let row = ((c * g.kh + ki) * g.kw + kj) * hw_out;
                let src = &cols[row..row + hw_out];
                for oh in oh_lo..oh_hi {
                    let ih = oh * g.stride + ki - g.pad;
                    let line = &src[oh * wo..(oh + 1) * wo];
                    let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
                    if ow_lo == ow_hi {
                        continue;
                    }
                    if g.stride == 1 {
                        let start = ow_lo + kj - g.pad;
                        for (d, &v) in dst[start..start + (ow_hi - ow_lo)]
                            .iter_mut()
                            .zip(&line[ow_lo..ow_hi])
                        {
                            *d += v;
                        }
                    } else {
                        for ow in ow_lo..ow_hi {
                            dst[ow * g.stride + kj - g.pad] += line[ow];
                        }
                    }
                }
            }
        }
    }
}

/// `y = conv(x, w)`: per image, `Y[O×HW] = W[O×CKK] · cols(x)[CKK×HW]`.
pub fn conv_forward<T: Real>(g: &ConvGeom, x: &[T], w: &[T], y: &mut [MaybeUninit<T>]) {
    if T::direct(DirectOp::Forward, g, x, w, y) {
        return;
    }
    let (ckk, hw) = (g.ckk(), g.ho() * g.wo());
    let (in_img, out_img) = (g.in_img(), g.out_img());
    y.par_chunks_mut(out_img)
        .zip(x.par_chunks(in_img))
        .for_each_init(
            || vec![T::ZERO; if g.is_pointwise() { 0 } else { ckk * hw }],
            |cols, (yi, xi)| {
                let cols: &[T] = if g.is_pointwise() {
                    xi
                } else {
                    im2col(g, xi, cols);
                    cols
                };
                mm(g.o, hw, ckk, yi, hw, 1, w, ckk, 1, cols, hw, 1, false);
            },
        );
}

/// Input gradient of [`conv_forward`]: per image, `col2im(Wᵀ · GY)`.
pub fn conv_backward_input<T: Real>(g: &ConvGeom, gy: &[T], w: &[T], dx: &mut [MaybeUninit<T>]) {
    if T::direct(DirectOp::InputGrad, g, gy, w, dx) {
        return;
    }
    let (ckk, hw) = (g.ckk(), g.ho() * g.wo());
    let (in_img, out_img) = (g.in_img(), g.out_img());
    dx.par_chunks_mut(in_img)
        .zip(gy.par_chunks(out_img))
        .for_each_init(
            || vec![T::ZERO; if g.is_pointwise() { 0 } else { ckk * hw }],
            |cols, (dxi, gyi)| {
                if g.is_pointwise() {
                    mm(ckk, hw, g.o, dxi, hw, 1, w, 1, ckk, gyi, hw, 1, false);
                } else {
                    mm(
                        ckk,
                        hw,
                        g.o,
                        as_out(cols),
                        hw,
                        1,
                        w,
                        1,
                        ckk,
                        gyi,
                        hw,
                        1,
                        false,
                    );
                    col2im(g, cols, dxi);
                }
            },
        );
}

/// Images per partial sum of [`conv_backward_weight`]: the partition is fixed (independent of
/// the thread count and of rayon's work stealing), so the summation order and the result are
/// the same on every run.
const DW_CHUNK: usize = 8;

/// Weight gradient of [`conv_forward`]: `Σ_images GY[O×HW] · cols(x)ᵀ`, deterministic.
pub fn conv_backward_weight<T: Real>(g: &ConvGeom, x: &[T], gy: &[T], dw: &mut [MaybeUninit<T>]) {
    if T::direct(DirectOp::WeightGrad, g, x, gy, dw) {
        return;
    }
    let (ckk, hw) = (g.ckk(), g.ho() * g.wo());
    let (in_img, out_img) = (g.in_img(), g.out_img());
    let wsize = g.o * ckk;
    let partials: Vec<Vec<T>> = x
        .par_chunks(in_img * DW_CHUNK)
        .zip(gy.par_chunks(out_img * DW_CHUNK))
        .map(|(xs, gys)| {
            let mut acc = vec![T::ZERO; wsize];
            let mut cols = vec![T::ZERO; if g.is_pointwise() { 0 } else { ckk * hw }];
            for (i, (xi, gyi)) in xs.chunks(in_img).zip(gys.chunks(out_img)).enumerate() {
                let c: &[T] = if g.is_pointwise() {
                    xi
                } else {
                    im2col(g, xi, &mut cols);
                    &cols
                };
                let out = as_out(&mut acc);
                mm(g.o, ckk, hw, out, ckk, 1, gyi, hw, 1, c, 1, hw, i > 0);
            }
            acc
        })
        .collect();
    let mut total = vec![T::ZERO; wsize];
    for p in &partials {
        for (u, &v) in total.iter_mut().zip(p) {
            *u += v;
        }
    }
    for (d, v) in dw.iter_mut().zip(total) {
        d.write(v);
    }
}

const LANES: usize = 8;

/// `Σ f(v)` over a plane: eight independent accumulators in `T` (vectorisable, no serial
/// dependency), combined in f64. Planes are one image's channel (`H·W` values), so each lane
/// adds at most a few hundred terms in `T`; planes are summed in f64.
fn lane_sum<T: Real>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
    let mut total: f64 = chunks.remainder().iter().map(|&v| f(v).to_f64()).sum();
    total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
    total
}

/// `g` where the pre-activation `z ≥ 0` (candle's ReLU'(0) = 1), else 0.
#[inline(always)]
fn masked<T: Real>(g: T, z: T) -> T {
    if z >= T::ZERO {
        g
    } else {
        T::ZERO
    }
}

/// How the incoming gradient of a fused BatchNorm is masked before its backward.
#[derive(Debug, Clone, Copy)]
pub enum GradMask<'a, T> {
    /// Not masked.
    None,
    /// By the ReLU, `[z ≥ 0]` with `z` recomputed from `x`.
    Relu(&'a BnCoefs<T>),
    /// By a replayed mask of the input's shape.
    Mask(&'a [T]),
}

/// `(Σ g·m, Σ g·m·(x − μ))` over a plane with a stored mask `m`, as [`lane_sum`].
fn lane_sum2_masked<T: Real>(xs: &[T], gs: &[T], ms: &[T], mu: T) -> (f64, f64) {
    let (mut a, mut b) = ([T::ZERO; LANES], [T::ZERO; LANES]);
    let (mut cx, mut cg, mut cm) = (
        xs.chunks_exact(LANES),
        gs.chunks_exact(LANES),
        ms.chunks_exact(LANES),
    );
    for ((xc, gc), mc) in (&mut cx).zip(&mut cg).zip(&mut cm) {
        for i in 0..LANES {
            let g = gc[i] * mc[i];
            a[i] += g;
            b[i] += g * (xc[i] - mu);
        }
    }
    let (mut sa, mut sb) = (0.0f64, 0.0f64);
    for ((&xv, &gv), &mv) in cx
        .remainder()
        .iter()
        .zip(cg.remainder())
        .zip(cm.remainder())
    {
        let g = gv * mv;
        sa += g.to_f64();
        sb += (g * (xv - mu)).to_f64();
    }
    sa += a.iter().map(|v| v.to_f64()).sum::<f64>();
    sb += b.iter().map(|v| v.to_f64()).sum::<f64>();
    (sa, sb)
}

/// [`Real::plane_sums`] in eight `T` lanes.
fn lane_plane_sums<T: Real>(xs: &[T], gs: &[T], mu: T, mask: PlaneMask<'_, T>) -> (f64, f64) {
    match mask {
        PlaneMask::None => lane_sum2(xs, gs, mu, |_, g| g),
        PlaneMask::Relu { mean, scale, shift } => {
            lane_sum2(xs, gs, mu, |x, g| masked(g, scale * (x - mean) + shift))
        }
        PlaneMask::Mask(m) => lane_sum2_masked(xs, gs, m, mu),
    }
}

/// `(Σ g', Σ g'·(x − μ))` over a plane with `g' = f(x, g)`, as [`lane_sum`].
fn lane_sum2<T: Real>(xs: &[T], gs: &[T], mu: T, f: impl Fn(T, T) -> T) -> (f64, f64) {
    let (mut a, mut b) = ([T::ZERO; LANES], [T::ZERO; LANES]);
    let (mut cx, mut cg) = (xs.chunks_exact(LANES), gs.chunks_exact(LANES));
    for (xc, gc) in (&mut cx).zip(&mut cg) {
        for i in 0..LANES {
            let g = f(xc[i], gc[i]);
            a[i] += g;
            b[i] += g * (xc[i] - mu);
        }
    }
    let (mut sa, mut sb) = (0.0f64, 0.0f64);
    for (&xv, &gv) in cx.remainder().iter().zip(cg.remainder()) {
        let g = f(xv, gv);
        sa += g.to_f64();
        sb += (g * (xv - mu)).to_f64();
    }
    sa += a.iter().map(|v| v.to_f64()).sum::<f64>();
    sb += b.iter().map(|v| v.to_f64()).sum::<f64>();
    (sa, sb)
}

/// `[Σ a·b, Σ a², Σ b², Σ (a − b)²]` in f64, over fixed 16 Ki-element blocks (deterministic).
pub fn pair_sums<T: Real>(a: &[T], b: &[T]) -> [f64; 4] {
    const BLOCK: usize = 1 << 14;
    let parts: Vec<[f64; 4]> = a
        .par_chunks(BLOCK)
        .zip(b.par_chunks(BLOCK))
        .map(|(xa, xb)| T::block_pair_sums(xa, xb))
        .collect();
    parts.iter().fold([0.0; 4], |mut t, p| {
        for i in 0..4 {
            t[i] += p[i];
        }
        t
    })
}

/// [`Real::block_pair_sums`] in eight f64 lanes.
fn lane_pair_sums<T: Real>(xa: &[T], xb: &[T]) -> [f64; 4] {
    let mut acc = [[0.0f64; LANES]; 4];
    let (mut ca, mut cb) = (xa.chunks_exact(LANES), xb.chunks_exact(LANES));
    for (u, v) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            let (p, q) = (u[i].to_f64(), v[i].to_f64());
            acc[0][i] += p * q;
            acc[1][i] += p * p;
            acc[2][i] += q * q;
            acc[3][i] += (p - q) * (p - q);
        }
    }
    let mut out = acc.map(|l| l.iter().sum::<f64>());
    for (&u, &v) in ca.remainder().iter().zip(cb.remainder()) {
        let (p, q) = (u.to_f64(), v.to_f64());
        out[0] += p * q;
        out[1] += p * p;
        out[2] += q * q;
        out[3] += (p - q) * (p - q);
    }
    out
}

/// Images per partial sum of the per-channel reductions ([`bn_stats`], [`bn_backward_sums`]):
/// fixed, so the summation order and the result are the same at any thread count. A chunk reads
/// its images' planes in memory order (one stream), instead of one channel's planes scattered
/// `C` planes apart.
const CHANNEL_CHUNK: usize = 8;

/// `Σ_i f(i·c + ch, ch)` per channel `ch` over images `i`, as pairs, in f64: image chunks in
/// parallel, their partial sums added in chunk order.
fn per_channel_sums(
    n: usize,
    c: usize,
    f: impl Fn(usize, usize) -> (f64, f64) + Sync,
) -> Vec<(f64, f64)> {
    let parts: Vec<Vec<(f64, f64)>> = (0..n.div_ceil(CHANNEL_CHUNK))
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![(0.0, 0.0); c];
            for i in k * CHANNEL_CHUNK..n.min((k + 1) * CHANNEL_CHUNK) {
                for (ch, a) in acc.iter_mut().enumerate() {
                    let (u, v) = f(i * c + ch, ch);
                    a.0 += u;
                    a.1 += v;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![(0.0, 0.0); c];
    for part in &parts {
        for (t, q) in total.iter_mut().zip(part) {
            t.0 += q.0;
            t.1 += q.1;
        }
    }
    total
}

/// `(Σ (x − s), Σ (x − s)²)` over a plane, as [`lane_sum`].
fn lane_moments<T: Real>(xs: &[T], s: T) -> (f64, f64) {
    let (mut a, mut b) = ([T::ZERO; LANES], [T::ZERO; LANES]);
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for i in 0..LANES {
            let d = ch[i] - s;
            a[i] += d;
            b[i] += d * d;
        }
    }
    let (mut sa, mut sb) = (0.0f64, 0.0f64);
    for &v in chunks.remainder() {
        let d = (v - s).to_f64();
        sa += d;
        sb += d * d;
    }
    sa += a.iter().map(|v| v.to_f64()).sum::<f64>();
    sb += b.iter().map(|v| v.to_f64()).sum::<f64>();
    (sa, sb)
}

/// Per-channel mean and biased variance of NCHW data (`inner` = H·W, 1 for NC), in one pass
/// accumulated in f64. Returns `[mean₀..mean_C, var₀..var_C]`. The sums are taken around a
/// shift `s` per channel, the mean of its first plane, so that `var = E[(x − s)²] − (μ − s)²`
/// does not cancel (`μ − s` is small against the spread).
pub fn bn_stats<T: Real>(x: &[T], n: usize, c: usize, inner: usize) -> Vec<T> {
    let m = (n * inner) as f64;
    let plane = |p: usize| &x[p * inner..(p + 1) * inner];
    let shift: Vec<T> = (0..c)
        .map(|ch| {
            if n == 0 || inner == 0 {
                T::ZERO
            } else {
                T::from_f64(lane_sum(plane(ch), |v| v) / inner as f64)
            }
        })
        .collect();
    let sums = per_channel_sums(n, c, |p, ch| T::plane_moments(plane(p), shift[ch]));
    let mut out = Vec::with_capacity(2 * c);
    out.extend(
        sums.iter()
            .zip(&shift)
            .map(|(&(s1, _), &s)| T::from_f64(s.to_f64() + s1 / m)),
    );
    out.extend(sums.iter().map(|&(s1, s2)| {
        let d = s1 / m;
        T::from_f64((s2 / m - d * d).max(0.0))
    }));
    out
}

/// Per-channel BatchNorm quantities for one call: `z = a_c·(x − μ_c) + β_c`, `a_c = γ_c/σ_c`.
#[derive(Debug, Clone)]
pub struct BnCoefs<T> {
    /// μ per channel.
    pub mean: Vec<T>,
    /// γ/√(σ² + ε) per channel.
    pub scale: Vec<T>,
    /// β per channel.
    pub shift: Vec<T>,
}

impl<T: Real> BnCoefs<T> {
    /// From the statistics `[μ.., σ²..]`, γ and β.
    pub fn new(stats: &[T], gamma: &[T], beta: &[T], eps: f64) -> Self {
        let c = gamma.len();
        let scale = (0..c)
            .map(|ch| T::from_f64(gamma[ch].to_f64() / (stats[c + ch].to_f64() + eps).sqrt()))
            .collect();
        Self {
            mean: stats[..c].to_vec(),
            scale,
            shift: beta.to_vec(),
        }
    }

    fn at(&self, ch: usize) -> (T, T, T) {
        (self.mean[ch], self.scale[ch], self.shift[ch])
    }
}

/// What follows the affine map (and the residual) of a fused BatchNorm.
#[derive(Debug, Clone, Copy)]
pub enum BnAct<'a, T> {
    /// Nothing.
    Identity,
    /// `max(z, 0)`.
    Relu,
    /// `z · m` with a recorded ReLU mask `m` of the input's shape (the replayed ReLU of the
    /// finite-difference SGR gradient).
    Mask(&'a [T]),
}

/// BatchNorm forward with given statistics, optionally adding a residual, then `act`:
/// `y = act(γ (x − μ)/√(σ² + ε) + β [+ r])`. Centred first, so that a large `a·x` does not
/// cancel against the shift (matters for the finite-difference SGR gradient).
pub fn bn_forward<T: Real>(
    x: &[T],
    residual: Option<&[T]>,
    y: &mut [MaybeUninit<T>],
    inner: usize,
    k: &BnCoefs<T>,
    act: BnAct<'_, T>,
) {
    let c = k.mean.len();
    y.par_chunks_mut(inner)
        .zip(x.par_chunks(inner))
        .enumerate()
        .for_each(|(row, (yr, xr))| {
            let (m, a, b) = k.at(row % c);
            let span = row * inner..(row + 1) * inner;
            let act = match act {
                BnAct::Mask(mask) => BnAct::Mask(&mask[span.clone()]),
                other => other,
            };
            match residual {
                Some(r) => {
                    let z = xr.iter().zip(&r[span]).map(|(&v, &w)| a * (v - m) + b + w);
                    write_act(yr, z, act)
                }
                None => write_act(yr, xr.iter().map(|&v| a * (v - m) + b), act),
            }
        });
}

/// `yr = act(z)` for one plane (`BnAct::Mask` holds the plane's mask).
#[inline(always)]
fn write_act<T: Real>(yr: &mut [MaybeUninit<T>], z: impl Iterator<Item = T>, act: BnAct<'_, T>) {
    match act {
        BnAct::Identity => {
            for (u, z) in yr.iter_mut().zip(z) {
                u.write(z);
            }
        }
        BnAct::Relu => {
            for (u, z) in yr.iter_mut().zip(z) {
                u.write(if z <= T::ZERO { T::ZERO } else { z });
            }
        }
        BnAct::Mask(mr) => {
            for ((u, z), &mk) in yr.iter_mut().zip(z).zip(mr) {
                u.write(z * mk);
            }
        }
    }
}

/// The ReLU mask `[z ≥ 0]` (1 or 0) of a fused BatchNorm's pre-activation, recomputed exactly
/// as [`bn_forward`] computes `z` (what `x.ge(0)` on the unfused pre-activation records).
pub fn bn_relu_mask<T: Real>(
    x: &[T],
    residual: Option<&[T]>,
    out: &mut [MaybeUninit<T>],
    inner: usize,
    k: &BnCoefs<T>,
) {
    let c = k.mean.len();
    out.par_chunks_mut(inner)
        .zip(x.par_chunks(inner))
        .enumerate()
        .for_each(|(row, (or, xr))| {
            let (m, a, b) = k.at(row % c);
            let step = |o: &mut MaybeUninit<T>, z: T| {
                o.write(if z >= T::ZERO { T::ONE } else { T::ZERO });
            };
            match residual {
                Some(r) => {
                    let rr = &r[row * inner..(row + 1) * inner];
                    for ((o, &v), &w) in or.iter_mut().zip(xr).zip(rr) {
                        step(o, a * (v - m) + b + w);
                    }
                }
                None => {
                    for (o, &v) in or.iter_mut().zip(xr) {
                        step(o, a * (v - m) + b);
                    }
                }
            }
        });
}

/// The gradient at the pre-activation of a fused BatchNorm + ReLU:
/// `g · [z ≥ 0]` with `z` recomputed exactly as [`bn_forward`] computed it.
pub fn bn_relu_grad<T: Real>(
    x: &[T],
    residual: Option<&[T]>,
    g: &[T],
    out: &mut [MaybeUninit<T>],
    inner: usize,
    k: &BnCoefs<T>,
) {
    let c = k.mean.len();
    out.par_chunks_mut(inner)
        .zip(x.par_chunks(inner).zip(g.par_chunks(inner)))
        .enumerate()
        .for_each(|(row, (or, (xr, gr)))| {
            let (m, a, b) = k.at(row % c);
            match residual {
                Some(r) => {
                    let rr = &r[row * inner..(row + 1) * inner];
                    for (((o, &v), &gv), &w) in or.iter_mut().zip(xr).zip(gr).zip(rr) {
                        o.write(masked(gv, a * (v - m) + b + w));
                    }
                }
                None => {
                    for ((o, &v), &gv) in or.iter_mut().zip(xr).zip(gr) {
                        o.write(masked(gv, a * (v - m) + b));
                    }
                }
            }
        });
}

/// `[Σ g, Σ g·x̂]` per channel (the gradients of β and γ). With `relu`, `g` is first masked by
/// `[z ≥ 0]`, the pre-activation `z` recomputed from `x` (no masked copy of `g` is stored).
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_sums<T: Real>(
    x: &[T],
    gy: &[T],
    n: usize,
    c: usize,
    inner: usize,
    mean: &[T],
    var: &[T],
    eps: f64,
    mask: GradMask<'_, T>,
) -> Vec<T> {
    let per = per_channel_sums(n, c, |p, ch| {
        let mu = mean[ch];
        let span = p * inner..(p + 1) * inner;
        let (xs, gs) = (&x[span.clone()], &gy[span.clone()]);
        let pm = match mask {
            GradMask::Relu(k) => {
                let (mean, scale, shift) = k.at(ch);
                PlaneMask::Relu { mean, scale, shift }
            }
            GradMask::Mask(m) => PlaneMask::Mask(&m[span]),
            GradMask::None => PlaneMask::None,
        };
        T::plane_sums(xs, gs, mu, pm)
    });
    let mut out = Vec::with_capacity(2 * c);
    out.extend(per.iter().map(|p| T::from_f64(p.0)));
    // Σ g x̂ = Σ g (x − μ) / σ
    out.extend(
        per.iter()
            .zip(var)
            .map(|(p, &v)| T::from_f64(p.1 / (v.to_f64() + eps).sqrt())),
    );
    out
}

/// Input gradient of training-mode BatchNorm:
/// `dx = γ/σ · (g − Σg/M − x̂ · Σ(g x̂)/M)` with `M = N·H·W`.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_input<T: Real>(
    x: &[T],
    gy: &[T],
    dx: &mut [MaybeUninit<T>],
    n: usize,
    c: usize,
    inner: usize,
    mean: &[T],
    var: &[T],
    gamma: &[T],
    sums: &[T],
    eps: f64,
    mask: GradMask<'_, T>,
) {
    let m = (n * inner) as f64;
    // dx = k·g + a·(x − μ) + b  with  k = γ/σ, a = −k·Σ(g x̂)/(M σ), b = −k·Σg/M
    let coef: Vec<[f64; 4]> = (0..c)
        .map(|ch| {
            let inv = 1.0 / (var[ch].to_f64() + eps).sqrt();
            let k = gamma[ch].to_f64() * inv;
            let a = -k * sums[c + ch].to_f64() * inv / m;
            let b = -k * sums[ch].to_f64() / m;
            [k, a, b, mean[ch].to_f64()]
        })
        .collect();
    dx.par_chunks_mut(inner)
        .zip(x.par_chunks(inner).zip(gy.par_chunks(inner)))
        .enumerate()
        .for_each(|(row, (dr, (xr, gr)))| {
            let [k, a, b, mu] = coef[row % c].map(T::from_f64);
            match mask {
                GradMask::Mask(m) => {
                    let mr = &m[row * inner..(row + 1) * inner];
                    for (((d, &xv), &gv), &mv) in dr.iter_mut().zip(xr).zip(gr).zip(mr) {
                        d.write(k * (gv * mv) + a * (xv - mu) + b);
                    }
                }
                GradMask::Relu(z) => {
                    let (zm, sc, sh) = z.at(row % c);
                    for ((d, &xv), &gv) in dr.iter_mut().zip(xr).zip(gr) {
                        let gv = masked(gv, sc * (xv - zm) + sh);
                        d.write(k * gv + a * (xv - mu) + b);
                    }
                }
                GradMask::None => {
                    for ((d, &xv), &gv) in dr.iter_mut().zip(xr).zip(gr) {
                        d.write(k * gv + a * (xv - mu) + b);
                    }
                }
            }
        });
}

/// `o = α·(a + β·b)`, in parallel blocks.
pub fn scaled_sum<T: Real>(a: &[T], b: &[T], beta: f64, alpha: f64, o: &mut [MaybeUninit<T>]) {
    let (al, be) = (T::from_f64(alpha), T::from_f64(beta));
    o.par_chunks_mut(1 << 14)
        .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
        .for_each(|(or, (ar, br))| {
            for ((u, &x), &y) in or.iter_mut().zip(ar).zip(br) {
                u.write(al * (x + be * y));
            }
        });
}

/// `max(x, 0)`.
pub fn relu<T: Real>(x: &[T], y: &mut [MaybeUninit<T>]) {
    y.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(yr, xr)| {
            for (u, &v) in yr.iter_mut().zip(xr) {
                u.write(if v > T::ZERO { v } else { T::ZERO });
            }
        });
}

/// `g · [x ≥ 0]` (candle's convention: the derivative at 0 is 1).
pub fn relu_backward<T: Real>(g: &[T], x: &[T], dx: &mut [MaybeUninit<T>]) {
    dx.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14).zip(x.par_chunks(1 << 14)))
        .for_each(|(dr, (gr, xr))| {
            for ((d, &gv), &xv) in dr.iter_mut().zip(gr).zip(xr) {
                d.write(if xv >= T::ZERO { gv } else { T::ZERO });
            }
        });
}
