//! Direct 3×3 convolutions (padding 1, stride 1 or 2) in f32 with AVX-512: no column matrix,
//! no gemm packing.
//!
//! The im2col + gemm route ([`crate::cpu`]) writes a column matrix nine times the size of the
//! input and has gemm pack it again; for the weight gradient both operands are contiguous along
//! the reduction, so gemm packs the large one with a transposition. Here every tap is one
//! unaligned 16-lane load per output vector, at a fixed offset from the output pixel, with the
//! lanes whose input falls outside the plane (borders, row wrap, the plane's tail) masked off.
//!
//! * [`forward`] and [`input_grad`] are one kernel (`Plan`): `out[oc, q] = Σ_ic Σ_tap
//!   w(oc, ic, tap) · in[ic, plane(tap), q + off(tap)]`. Each call keeps an `8 output channels ×
//!   3 vectors` block of sums in registers over all input channels and taps and stores it once.
//!   The input gradient at stride 1 is the convolution of the output gradient with the flipped
//!   taps and the channel roles swapped.
//! * Stride 2 becomes stride 1 at output resolution: the input is split into its four phases
//!   (even/odd rows × even/odd columns, `space_to_depth`), and each tap reads one phase at
//!   offset −1 or 0. The input gradient is computed per phase of the input pixels — 1, 2, 2 and
//!   4 taps of the output gradient at offsets 0 or +1 — and interleaved back.
//! * [`weight_grad`] keeps the nine taps' sums of three output channels against one input
//!   channel in registers over all pixels of all images of a chunk, reading a zero-padded copy
//!   of the input (of its phases at stride 2), and reduces them once.
//!
//! The summation order depends only on the shapes (images are summed in fixed chunks), so the
//! results are bit-identical for any thread count. Every function here returns `false` without
//! touching its output when [`applies`] is false.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::geom::ConvGeom;

/// Lanes of an AVX-512 f32 vector.
const V: usize = 16;

/// Whether the CPU runs these kernels (x86-64 with AVX-512F), checked once.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the direct kernels handle `g`: a 3×3 kernel with padding 1 and stride 1, or
/// stride 2 on planes of even height and width, on a CPU that has them.
pub fn applies(g: &ConvGeom) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.pad == 1
        && (g.stride == 1 || (g.stride == 2 && (g.h | g.w) & 1 == 0))
        && available()
}

/// Geometry of one plane and of its zero-padded copy.
#[derive(Clone, Copy)]
struct Plane {
    w: usize,
    /// Pixels of the unpadded plane.
    hw: usize,
    /// Length of the padded plane.
    len: usize,
}

impl Plane {
    fn new(h: usize, w: usize) -> Self {
        Plane {
            w,
            hw: h * w,
            len: (h + 2) * w + 2 + V,
        }
    }

    /// Vectors per plane.
    fn nv(&self) -> usize {
        self.hw.div_ceil(V)
    }

    /// Per output vector, `N` lane masks: lane `l` of mask `i` is set where pixel `q = 16·v + l`
    /// lies in the plane and `valid(y, x, i)` holds for it.
    fn lane_masks<const N: usize>(
        &self,
        valid: impl Fn(usize, usize, usize) -> bool,
    ) -> Vec<[u16; N]> {
        (0..self.nv())
            .map(|v| {
                let mut m = [0u16; N];
                for l in 0..V {
                    let q = v * V + l;
                    if q >= self.hw {
                        continue;
                    }
                    for (i, mi) in m.iter_mut().enumerate() {
                        if valid(q / self.w, q % self.w, i) {
                            *mi |= 1 << l;
                        }
                    }
                }
                m
            })
            .collect()
    }

    /// Per output vector: the load masks of column offsets −1, 0, +1 in the padded layout (the
    /// input column `x + dx` inside the plane; offset 0 is the plane mask, which the gradient
    /// vectors use too).
    fn masks(&self) -> Vec<[u16; 3]> {
        self.lane_masks(|_, x, i| (1..=self.w).contains(&(x + i)))
    }

    /// Copies `planes` consecutive planes of `src` into `dst`, padded: pixel `(y, x)` at
    /// `1 + (y + 1)·W + x`, so that `(y + dy, x + dx)` is at `q + (dy + 1)·W + dx + 1`.
    fn pad(&self, src: &[f32], planes: usize, dst: &mut Vec<f32>) {
        // only the borders are zeroed: the interior is overwritten at once
        dst.resize(planes * self.len, 0.0);
        let lead = 1 + self.w;
        for (s, d) in src
            .chunks_exact(self.hw)
            .zip(dst.chunks_exact_mut(self.len))
        {
            d[..lead].fill(0.0);
            d[lead..lead + self.hw].copy_from_slice(s);
            d[lead + self.hw..].fill(0.0);
        }
    }
}

/// Where a stride-2 tap `k` (a kernel row or column index) reads in the space-to-depth
/// input: input row `2y + k − 1` is row `y − 1` of the odd phase for `k` = 0, row `y` of the
/// even phase for `k` = 1 and row `y` of the odd phase for `k` = 2. Returns (phase, offset).
const fn phase(k: usize) -> (usize, isize) {
    match k {
        0 => (1, -1),
        1 => (0, 0),
        _ => (1, 0),
    }
}

/// One tap of a direct convolution: output pixel `(y, x)` reads pixel `(y + dy, x + dx)` of
/// input plane `plane` of each input channel's group, weighted by kernel tap `k = 3·kh + kw`.
#[derive(Clone, Copy, Debug)]
struct Tap {
    k: usize,
    plane: usize,
    dy: isize,
    dx: isize,
}

/// The forward taps. Stride 1 reads one plane at `(kh − 1, kw − 1)`; stride 2 reads the four
/// phase planes of the space-to-depth input ([`space_to_depth`]) at output resolution.
fn forward_taps(stride: usize) -> Vec<Tap> {
    (0..9)
        .map(|k| {
            let (kh, kw) = (k / 3, k % 3);
            if stride == 1 {
                Tap {
                    k,
                    plane: 0,
                    dy: kh as isize - 1,
                    dx: kw as isize - 1,
                }
            } else {
                let ((pr, dy), (pc, dx)) = (phase(kh), phase(kw));
                Tap {
                    k,
                    plane: 2 * pr + pc,
                    dy,
                    dx,
                }
            }
        })
        .collect()
}

/// The input-gradient taps, reading the output gradient: `dx[c, i, j] = Σ_o Σ_(kh,kw) w[o, c,
/// kh, kw] · gy[o, y, x]` over `s·y + kh − 1 = i`, `s·x + kw − 1 = j`. Stride 1: all nine taps
/// at `(1 − kh, 1 − kw)`. Stride 2, for the input pixels of phase `ph` (row parity `ph / 2`,
/// column parity `ph % 2`): even rows take `kh` = 1 at offset 0, odd rows `kh` = 0 at +1 and
/// `kh` = 2 at 0, and likewise for columns (1, 2, 2 or 4 taps).
fn input_grad_taps(stride: usize, ph: usize) -> Vec<Tap> {
    if stride == 1 {
        return (0..9)
            .map(|k| Tap {
                k,
                plane: 0,
                dy: 1 - (k / 3) as isize,
                dx: 1 - (k % 3) as isize,
            })
            .collect();
    }
    let back = |parity: usize| -> &'static [(usize, isize)] {
        if parity == 0 {
            &[(1, 0)]
        } else {
            &[(0, 1), (2, 0)]
        }
    };
    let mut taps = Vec::new();
    for &(kh, dy) in back(ph / 2) {
        for &(kw, dx) in back(ph % 2) {
            taps.push(Tap {
                k: 3 * kh + kw,
                plane: 0,
                dy,
                dx,
            });
        }
    }
    taps
}

/// A direct convolution over planes of one geometry: per tap, the input plane and element
/// offset, and per output vector the tap load masks and the store mask.
struct Plan {
    p: Plane,
    /// Input planes per input channel (4 for the phases of a stride-2 input).
    planes: usize,
    /// (plane within the channel's group, element offset) per tap.
    taps: Vec<(usize, isize)>,
    /// Per output vector, per tap: the lanes whose input pixel lies inside its plane.
    masks: Vec<[u16; 9]>,
    /// Per output vector: the lanes inside the output plane.
    store: Vec<u16>,
}

impl Plan {
    fn new(h: usize, w: usize, planes: usize, taps: &[Tap]) -> Self {
        debug_assert!(taps.len() <= 9);
        let p = Plane::new(h, w);
        let inside = |i: usize, d: isize, n: usize| (0..n as isize).contains(&(i as isize + d));
        Plan {
            p,
            planes,
            taps: taps
                .iter()
                .map(|t| (t.plane, t.dy * w as isize + t.dx))
                .collect(),
            masks: p.lane_masks(|y, x, i| {
                taps.get(i)
                    .is_some_and(|t| inside(y, t.dy, h) && inside(x, t.dx, w))
            }),
            store: p
                .lane_masks::<1>(|_, _, _| true)
                .iter()
                .map(|m| m[0])
                .collect(),
        }
    }

    /// `out[oc, q] = Σ_tap Σ_ic wp[tap, ic, oc] · inp[ic, tap.plane, q + tap.off]`, masked to
    /// the planes, for one image.
    fn run(&self, ic: usize, oc: usize, inp: &[f32], wp: &[f32], out: &mut [MaybeUninit<f32>]) {
        assert!(inp.len() >= ic * self.planes * self.p.hw && out.len() >= oc * self.p.hw);
        assert!(wp.len() >= self.taps.len() * ic * oc);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers run plans only where `available()` holds; the lengths are checked
        // above and every load and store is masked to pixels inside its plane.
        unsafe {
            avx512::direct_image(self, ic, oc, inp, wp, out)
        };
    }
}

/// Splits each `h × w` plane of `src` into its four phases (`2·(i mod 2) + (j mod 2)` holds
/// pixel `(i, j)` at `(i / 2, j / 2)`), each `h/2 × w/2`, planes in order.
fn space_to_depth(src: &[f32], h: usize, w: usize, dst: &mut Vec<f32>) {
    let (ho, wo) = (h / 2, w / 2);
    let hw = ho * wo;
    dst.resize(src.len(), 0.0);
    for (s, d) in src.chunks_exact(h * w).zip(dst.chunks_exact_mut(h * w)) {
        for (i, row) in s.chunks_exact(w).enumerate() {
            let (a, y) = (i % 2, i / 2);
            let (even, rest) = d[(2 * a * hw + y * wo)..].split_at_mut(hw);
            for ((e, o), pair) in even[..wo]
                .iter_mut()
                .zip(&mut rest[..wo])
                .zip(row.chunks_exact(2))
            {
                *e = pair[0];
                *o = pair[1];
            }
        }
    }
}

/// The inverse of [`space_to_depth`] for `planes` planes stored phase-major
/// (`src[phase][plane]`, as the four phase passes of the stride-2 input gradient write them).
fn depth_to_space(src: &[f32], planes: usize, h: usize, w: usize, dst: &mut [MaybeUninit<f32>]) {
    let (ho, wo) = (h / 2, w / 2);
    let hw = ho * wo;
    for (pl, d) in dst.chunks_exact_mut(h * w).enumerate().take(planes) {
        for (i, row) in d.chunks_exact_mut(w).enumerate() {
            let (a, y) = (i % 2, i / 2);
            let at = |b: usize| ((2 * a + b) * planes + pl) * hw + y * wo;
            let (even, odd) = (&src[at(0)..at(0) + wo], &src[at(1)..at(1) + wo]);
            for ((pair, &e), &o) in row.chunks_exact_mut(2).zip(even).zip(odd) {
                pair[0].write(e);
                pair[1].write(o);
            }
        }
    }
}

/// `w [O, C, 3, 3]` as `[tap][in][out]` for `taps`: in = C, out = O for the forward; for the
/// input gradient (`transposed`) in = O, out = C.
fn pack_weights(g: &ConvGeom, w: &[f32], taps: &[Tap], transposed: bool) -> Vec<f32> {
    let (ni, no) = if transposed { (g.o, g.c) } else { (g.c, g.o) };
    let mut wp = vec![0.0f32; taps.len() * ni * no];
    for (t, tap) in taps.iter().enumerate() {
        for i in 0..ni {
            for j in 0..no {
                let (o, c) = if transposed { (i, j) } else { (j, i) };
                wp[(t * ni + i) * no + j] = w[(o * g.c + c) * 9 + tap.k];
            }
        }
    }
    wp
}

/// `y = conv3x3(x, w)` for a geometry [`applies`] to. Returns whether it ran.
pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) -> bool {
    if !applies(g) {
        return false;
    }
    let taps = forward_taps(g.stride);
    let plan = Plan::new(g.ho(), g.wo(), g.stride * g.stride, &taps);
    let wp = pack_weights(g, w, &taps, false);
    y.par_chunks_mut(g.o * plan.p.hw)
        .zip(x.par_chunks(g.c * g.h * g.w))
        .for_each_init(Vec::new, |buf, (o, i)| {
            let inp = if g.stride == 1 {
                i
            } else {
                space_to_depth(i, g.h, g.w, buf);
                &buf[..]
            };
            plan.run(g.c, g.o, inp, &wp, o);
        });
    true
}

/// Input gradient of [`forward`] for a geometry [`applies`] to. Returns whether it ran.
pub fn input_grad(g: &ConvGeom, gy: &[f32], w: &[f32], dx: &mut [MaybeUninit<f32>]) -> bool {
    if !applies(g) {
        return false;
    }
    let (img_in, img_out) = (g.c * g.h * g.w, g.o * g.ho() * g.wo());
    if g.stride == 1 {
        let taps = input_grad_taps(1, 0);
        let plan = Plan::new(g.h, g.w, 1, &taps);
        let wp = pack_weights(g, w, &taps, true);
        dx.par_chunks_mut(img_in)
            .zip(gy.par_chunks(img_out))
            .for_each(|(d, gi)| plan.run(g.o, g.c, gi, &wp, d));
        return true;
    }
    // Stride 2: each phase of the input pixels is a direct convolution of the output gradient
    // with its own taps; the four results are interleaved back.
    let phases: Vec<(Plan, Vec<f32>)> = (0..4)
        .map(|ph| {
            let taps = input_grad_taps(2, ph);
            let wp = pack_weights(g, w, &taps, true);
            (Plan::new(g.ho(), g.wo(), 1, &taps), wp)
        })
        .collect();
    let part = g.c * g.ho() * g.wo();
    dx.par_chunks_mut(img_in)
        .zip(gy.par_chunks(img_out))
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, (d, gi)| {
            buf.resize(4 * part, 0.0);
            for (ph, (plan, wp)) in phases.iter().enumerate() {
                let out = &mut buf[ph * part..(ph + 1) * part];
                // SAFETY: f32 and MaybeUninit<f32> have one layout; only f32 values are written.
                let out =
                    unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len()) };
                plan.run(g.o, g.c, gi, wp, out);
            }
            depth_to_space(buf, g.c, g.h, g.w, d);
        });
    true
}

/// Images per partial sum of [`weight_grad`] (fixed, so the summation order is too).
const DW_CHUNK: usize = 8;

/// Weight gradient of [`forward`] for a geometry [`applies`] to. Returns whether it ran.
pub fn weight_grad(g: &ConvGeom, x: &[f32], gy: &[f32], dw: &mut [MaybeUninit<f32>]) -> bool {
    if !applies(g) {
        return false;
    }
    // The gradient planes and the (phase) input planes share the output geometry.
    let p = Plane::new(g.ho(), g.wo());
    let masks = p.masks();
    let wsize = g.o * g.c * 9;
    let img_in = g.c * g.h * g.w;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(img_in * DW_CHUNK)
        .zip(gy.par_chunks(g.o * p.hw * DW_CHUNK))
        .map(|(xs, gys)| {
            let imgs = xs.len() / img_in;
            let mut buf = Vec::new();
            if g.stride == 1 {
                p.pad(xs, imgs * g.c, &mut buf);
            } else {
                let mut phases = Vec::new();
                space_to_depth(xs, g.h, g.w, &mut phases);
                p.pad(&phases, imgs * g.c * 4, &mut buf);
            }
            let mut acc = vec![0.0f32; wsize];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX-512F; `buf` holds `imgs · c · stride²` padded
            // planes and `gys` `imgs · o` planes; gradient loads are masked to the plane.
            unsafe {
                let k = (&p, &masks[..], imgs, g.c, g.o);
                if g.stride == 1 {
                    avx512::weight_grad_chunk::<1>(k, &buf, gys, &mut acc)
                } else {
                    avx512::weight_grad_chunk::<2>(k, &buf, gys, &mut acc)
                }
            };
            acc
        })
        .collect();
    let mut total = vec![0.0f32; wsize];
    for part in &partials {
        for (u, &v) in total.iter_mut().zip(part) {
            *u += v;
        }
    }
    for (d, v) in dw.iter_mut().zip(total) {
        d.write(v);
    }
    true
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{phase, Plan, Plane, V};

    /// One image of a direct convolution ([`Plan::run`]): every output channel block and
    /// vector block.
    ///
    /// # Safety
    /// AVX-512F must be available; `inp` holds `ic · plan.planes` planes of `plan.p.hw`, `wp`
    /// is `taps · ic · oc` long, `out` is `oc · plan.p.hw` long.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn direct_image(
        plan: &Plan,
        ic: usize,
        oc: usize,
        inp: &[f32],
        wp: &[f32],
        out: &mut [MaybeUninit<f32>],
    ) {
        let nv = plan.masks.len();
        let k = Kernel {
            plan,
            ic,
            oc,
            inp,
            wp,
        };
        let mut o0 = 0;
        while o0 < oc {
            let left = oc - o0;
            let mut v0 = 0;
            while v0 < nv {
                let vl = nv - v0;
                // SAFETY: forwarded from the caller; blocks stay inside `oc` and `nv`.
                unsafe {
                    match (left, vl) {
                        (8.., 3..) => k.block::<8, 3>(out, o0, v0),
                        (8.., 2) => k.block::<8, 2>(out, o0, v0),
                        (8.., _) => k.block::<8, 1>(out, o0, v0),
                        (4.., 3..) => k.block::<4, 3>(out, o0, v0),
                        (4.., 2) => k.block::<4, 2>(out, o0, v0),
                        (4.., _) => k.block::<4, 1>(out, o0, v0),
                        (_, 3..) => k.block::<1, 3>(out, o0, v0),
                        (_, 2) => k.block::<1, 2>(out, o0, v0),
                        (_, _) => k.block::<1, 1>(out, o0, v0),
                    }
                }
                v0 += vl.min(3);
            }
            o0 += if left >= 8 {
                8
            } else if left >= 4 {
                4
            } else {
                1
            };
        }
    }

    /// The operands of one image of [`direct_image`].
    struct Kernel<'a> {
        plan: &'a Plan,
        ic: usize,
        oc: usize,
        inp: &'a [f32],
        wp: &'a [f32],
    }

    impl Kernel<'_> {
        /// `OB` output channels from `o0` × `NV` vectors from `v0`, summed over every tap and
        /// input channel in registers, then stored.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn block<const OB: usize, const NV: usize>(
            &self,
            out: &mut [MaybeUninit<f32>],
            o0: usize,
            v0: usize,
        ) {
            let (plan, ic, oc) = (self.plan, self.ic, self.oc);
            let hw = plan.p.hw;
            let mut acc = [[_mm512_setzero_ps(); NV]; OB];
            let ip = self.inp.as_ptr();
            let wptr = self.wp.as_ptr();
            for (t, &(plane, off)) in plan.taps.iter().enumerate() {
                // the input of output pixel q under tap t is at q + off of its plane (possibly
                // outside it, where the mask is 0: masked lanes are never read)
                let mk: [u16; NV] = std::array::from_fn(|j| plan.masks[v0 + j][t]);
                for c in 0..ic {
                    let base = ip.wrapping_add((c * plan.planes + plane) * hw);
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for (j, xj) in xv.iter_mut().enumerate() {
                        let at = base.wrapping_offset(((v0 + j) * V) as isize + off);
                        // SAFETY: the lanes of `mk[j]` are pixels inside the plane.
                        *xj = unsafe { _mm512_maskz_loadu_ps(mk[j], at) };
                    }
                    // SAFETY: `(t·ic + c)·oc + o0 + OB ≤ taps·ic·oc`.
                    let wrow = unsafe { wptr.add((t * ic + c) * oc + o0) };
                    for (b, accb) in acc.iter_mut().enumerate() {
                        let wb = _mm512_set1_ps(unsafe { *wrow.add(b) });
                        for (a, &xj) in accb.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(wb, xj, *a);
                        }
                    }
                }
            }
            let op = out.as_mut_ptr().cast::<f32>();
            for (b, accb) in acc.iter().enumerate() {
                for (j, &a) in accb.iter().enumerate() {
                    let v = v0 + j;
                    // SAFETY: channel `o0 + b < oc`; the store is masked to the plane.
                    unsafe {
                        _mm512_mask_storeu_ps(op.add((o0 + b) * hw + v * V), plan.store[v], a)
                    };
                }
            }
        }
    }

    /// Adds one chunk's weight gradient to `acc` (`[o][c][9]`), for stride `S` (1, or 2 on the
    /// phase planes of [`super::space_to_depth`]).
    ///
    /// # Safety
    /// AVX-512F must be available; with `(p, masks, imgs, c, o) = k`, `xp` holds
    /// `imgs · c · S²` padded planes of `p`, `gy` holds `imgs · o` planes of `p.hw`, `acc` is
    /// `o · c · 9` long and `masks` are `p.masks()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weight_grad_chunk<const S: usize>(
        (p, masks, imgs, c, o): (&Plane, &[[u16; 3]], usize, usize, usize),
        xp: &[f32],
        gy: &[f32],
        acc: &mut [f32],
    ) {
        debug_assert!(xp.len() >= imgs * c * S * S * p.len && gy.len() >= imgs * o * p.hw);
        debug_assert!(acc.len() >= o * c * 9);
        let k = DwChunk {
            p,
            masks,
            imgs,
            c,
            o,
            xp,
            gy,
        };
        let mut o0 = 0;
        while o0 < o {
            for ci in 0..c {
                // SAFETY: forwarded from the caller.
                unsafe {
                    match o - o0 {
                        3.. => k.block::<3, S>(acc, o0, ci),
                        2 => k.block::<2, S>(acc, o0, ci),
                        _ => k.block::<1, S>(acc, o0, ci),
                    }
                }
            }
            o0 += (o - o0).min(3);
        }
    }

    /// The operands of one chunk of [`weight_grad_chunk`].
    struct DwChunk<'a> {
        p: &'a Plane,
        masks: &'a [[u16; 3]],
        imgs: usize,
        c: usize,
        o: usize,
        xp: &'a [f32],
        gy: &'a [f32],
    }

    impl DwChunk<'_> {
        /// The nine taps of `OB` output channels from `o0` against input channel `ci`, over
        /// every pixel of every image of the chunk, added to `acc`.
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn block<const OB: usize, const S: usize>(
            &self,
            acc: &mut [f32],
            o0: usize,
            ci: usize,
        ) {
            let DwChunk {
                p,
                masks,
                imgs,
                c,
                o,
                xp,
                gy,
            } = *self;
            // Tap (kh, kw) reads padded plane `plane` at q + row·W + col (constants once the
            // loops below are unrolled) with the column mask `col`.
            let at = |kh: usize, kw: usize| -> (usize, usize, usize) {
                if S == 1 {
                    (0, kh, kw)
                } else {
                    let ((pr, dy), (pc, dx)) = (phase(kh), phase(kw));
                    (2 * pr + pc, (dy + 1) as usize, (dx + 1) as usize)
                }
            };
            let mut s = [[_mm512_setzero_ps(); 9]; OB];
            for n in 0..imgs {
                // SAFETY (whole loop): the padded planes of (n, ci) start at (n·c + ci)·S²·p.len
                // and a tap load reads q + row·W + col .. +16 with q < hw, row, col ≤ 2, inside
                // its (h + 2)·W + 18 elements; gradient loads are masked to the plane.
                let xb = unsafe { xp.as_ptr().add((n * c + ci) * S * S * p.len) };
                let gb = unsafe { gy.as_ptr().add((n * o + o0) * p.hw) };
                for (v, &m) in masks.iter().enumerate() {
                    let q = v * V;
                    let mut gv = [_mm512_setzero_ps(); OB];
                    for (b, gvb) in gv.iter_mut().enumerate() {
                        *gvb = unsafe { _mm512_maskz_loadu_ps(m[1], gb.add(b * p.hw + q)) };
                    }
                    for kh in 0..3 {
                        for kw in 0..3 {
                            let (plane, row, col) = at(kh, kw);
                            let ptr = unsafe { xb.add(plane * p.len + q + row * p.w + col) };
                            let xv = unsafe { _mm512_maskz_loadu_ps(m[col], ptr) };
                            for (sb, &gvb) in s.iter_mut().zip(&gv) {
                                sb[kh * 3 + kw] = _mm512_fmadd_ps(gvb, xv, sb[kh * 3 + kw]);
                            }
                        }
                    }
                }
            }
            for (b, sb) in s.iter().enumerate() {
                for (t, &v) in sb.iter().enumerate() {
                    acc[((o0 + b) * c + ci) * 9 + t] += _mm512_reduce_add_ps(v);
                }
            }
        }
    }
}
