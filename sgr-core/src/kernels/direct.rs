//! Direct 3×3 convolutions (stride 1, padding 1) in f32 with AVX-512: no column matrix, no
//! gemm packing.
//!
//! The im2col + gemm route ([`super::cpu`]) writes a column matrix nine times the size of the
//! input and has gemm pack it again; for the weight gradient both operands are contiguous along
//! the reduction, so gemm packs the large one with a transposition. Here each image plane is
//! copied once into a zero-padded layout — one zero row above and below, one guard element
//! before and after, and a tail of one vector — in which the input of output pixel `q = y·W + x`
//! under tap `(kh, kw)` sits at `q + kh·W + kw`. A tap is then one unaligned 16-lane load per
//! output vector; the two column-wrapping taps (`kw` = 0 at `x` = 0, `kw` = 2 at `x` = W−1) are
//! masked loads, and the last vector of a plane is masked to the plane. Any `H × W` works.
//!
//! * [`forward`] and [`input_grad`] are one kernel: `out[oc, q] = Σ_ic Σ_tap w(oc, ic, tap) ·
//!   in[ic, q + off(tap)]`, with the taps flipped and the channel roles swapped for the input
//!   gradient. Each call keeps an `8 output channels × 3 vectors` block of sums in registers
//!   over all input channels and taps and stores it once.
//! * [`weight_grad`] keeps the nine taps' sums of two output channels against one input channel
//!   in registers over all pixels of all images of a chunk and reduces them once.
//!
//! The summation order depends only on the shapes (images are summed in fixed chunks), so the
//! results are bit-identical for any thread count. Every function here returns `false` without
//! touching its output when [`available`] is false or the geometry is not 3×3/1/1.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::cpu::ConvGeom;

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

/// Whether the direct kernels handle `g`: a 3×3 kernel, stride 1, padding 1, on a CPU that has
/// them.
pub fn applies(g: &ConvGeom) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1 && available()
}

/// Geometry of one padded plane.
#[derive(Clone, Copy)]
struct Plane {
    h: usize,
    w: usize,
    /// Pixels of the unpadded plane.
    hw: usize,
    /// Length of the padded plane.
    len: usize,
}

impl Plane {
    fn new(h: usize, w: usize) -> Self {
        Plane {
            h,
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

    /// Per output vector: the load masks of taps with `kw` = 0, 1, 2 in the padded layout (the
    /// input column `x + kw − 1` inside the plane; `kw` = 1 is the plane mask, which the
    /// gradient vectors use too).
    fn masks(&self) -> Vec<[u16; 3]> {
        self.lane_masks(|_, x, kw| (1..=self.w).contains(&(x + kw)))
    }

    /// Per output vector and tap `(kh, kw)` (index `3·kh + kw`): the lanes whose input pixel
    /// `(y + kh − 1, x + kw − 1)` lies inside the unpadded plane (tap 4 is the plane mask).
    fn tap_masks(&self) -> Vec<[u16; 9]> {
        self.lane_masks(|y, x, t| {
            (1..=self.h).contains(&(y + t / 3)) && (1..=self.w).contains(&(x + t % 3))
        })
    }

    /// Copies `planes` consecutive planes of `src` into `dst`, padded.
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

/// `y = conv3x3(x, w)` for a geometry [`applies`] to. Returns whether it ran.
pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) -> bool {
    if !applies(g) {
        return false;
    }
    run_direct(g.h, g.w, g.c, g.o, x, &pack_weights(g, w, false), y);
    true
}

/// Input gradient of [`forward`] for a geometry [`applies`] to. Returns whether it ran.
pub fn input_grad(g: &ConvGeom, gy: &[f32], w: &[f32], dx: &mut [MaybeUninit<f32>]) -> bool {
    if !applies(g) {
        return false;
    }
    run_direct(g.h, g.w, g.o, g.c, gy, &pack_weights(g, w, true), dx);
    true
}

/// The weights `[O, C, 3, 3]` as `[tap][in][out]` for [`run_direct`]: in = C, out = O for the
/// forward; for the input gradient (`transposed`), `dx[c, y, x] = Σ_o Σ_(kh,kw) w[o, c, kh, kw] ·
/// gy[o, y + 1 − kh, x + 1 − kw]` is a direct convolution of `gy` with the flipped taps, so
/// in = O, out = C and tap `t` takes `w[.., 8 − t]`.
fn pack_weights(g: &ConvGeom, w: &[f32], transposed: bool) -> Vec<f32> {
    let mut wp = vec![0.0f32; 9 * g.c * g.o];
    for o in 0..g.o {
        for c in 0..g.c {
            for t in 0..9 {
                let at = if transposed {
                    ((8 - t) * g.o + o) * g.c + c
                } else {
                    (t * g.c + c) * g.o + o
                };
                wp[at] = w[(o * g.c + c) * 9 + t];
            }
        }
    }
    wp
}

/// `out[n, oc] = Σ_tap Σ_ic wp[tap, ic, oc] · inp[n, ic, · + off(tap)]`, masked to the plane,
/// parallel over images.
fn run_direct(
    h: usize,
    w: usize,
    ic: usize,
    oc: usize,
    inp: &[f32],
    wp: &[f32],
    out: &mut [MaybeUninit<f32>],
) {
    let p = Plane::new(h, w);
    let masks = p.tap_masks();
    out.par_chunks_mut(oc * p.hw)
        .zip(inp.par_chunks(ic * p.hw))
        .for_each(|(o, i)| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX-512F; `i` holds `ic` planes and `o` `oc` planes of
            // `h × w`; every load and store is masked to pixels inside its plane.
            unsafe {
                avx512::direct_image(&p, &masks, ic, oc, i, wp, o)
            };
        });
}

/// Images per partial sum of [`weight_grad`] (fixed, so the summation order is too).
const DW_CHUNK: usize = 8;

/// Weight gradient of [`forward`] for a geometry [`applies`] to. Returns whether it ran.
pub fn weight_grad(g: &ConvGeom, x: &[f32], gy: &[f32], dw: &mut [MaybeUninit<f32>]) -> bool {
    if !applies(g) {
        return false;
    }
    let p = Plane::new(g.h, g.w);
    let masks = p.masks();
    let wsize = g.o * g.c * 9;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(g.c * p.hw * DW_CHUNK)
        .zip(gy.par_chunks(g.o * p.hw * DW_CHUNK))
        .map(|(xs, gys)| {
            let imgs = xs.len() / (g.c * p.hw);
            let mut buf = Vec::new();
            p.pad(xs, imgs * g.c, &mut buf);
            let mut acc = vec![0.0f32; wsize];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `applies` checked AVX-512F; `buf` holds `imgs · c` padded planes and
            // `gys` `imgs · o` planes; gradient loads are masked to the plane.
            unsafe {
                avx512::weight_grad_chunk(&p, &masks, imgs, g.c, g.o, &buf, gys, &mut acc)
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

    use super::{Plane, V};

    /// One image of a direct convolution: every output channel block and vector block.
    ///
    /// # Safety
    /// AVX-512F must be available; `inp` holds `ic` planes of `p.hw`, `wp` is `9 · ic · oc`
    /// long, `out` is `oc · p.hw` long, `masks` are `p.tap_masks()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn direct_image(
        p: &Plane,
        masks: &[[u16; 9]],
        ic: usize,
        oc: usize,
        inp: &[f32],
        wp: &[f32],
        out: &mut [MaybeUninit<f32>],
    ) {
        debug_assert!(inp.len() >= ic * p.hw && wp.len() >= 9 * ic * oc);
        debug_assert!(out.len() >= oc * p.hw);
        let nv = masks.len();
        let k = Kernel {
            p,
            masks,
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
        p: &'a Plane,
        masks: &'a [[u16; 9]],
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
            let (p, ic, oc) = (self.p, self.ic, self.oc);
            let mut acc = [[_mm512_setzero_ps(); NV]; OB];
            let ip = self.inp.as_ptr();
            let wptr = self.wp.as_ptr();
            for t in 0..9 {
                // the input of output pixel q under tap t is at q + off (possibly outside the
                // plane, where the mask is 0: masked lanes are never read)
                let off = (t / 3) as isize * p.w as isize + (t % 3) as isize - p.w as isize - 1;
                let mk: [u16; NV] = std::array::from_fn(|j| self.masks[v0 + j][t]);
                for c in 0..ic {
                    let base = ip.wrapping_add(c * p.hw);
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for (j, xj) in xv.iter_mut().enumerate() {
                        let at = base.wrapping_offset(((v0 + j) * V) as isize + off);
                        // SAFETY: the lanes of `mk[j]` are pixels inside plane `c`.
                        *xj = unsafe { _mm512_maskz_loadu_ps(mk[j], at) };
                    }
                    // SAFETY: `(t·ic + c)·oc + o0 + OB ≤ 9·ic·oc`.
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
                        _mm512_mask_storeu_ps(op.add((o0 + b) * p.hw + v * V), self.masks[v][4], a)
                    };
                }
            }
        }
    }

    /// Adds one chunk's weight gradient to `acc` (`[o][c][9]`).
    ///
    /// # Safety
    /// AVX-512F must be available; `xp` holds `imgs · c` padded planes of `p`, `gy` holds
    /// `imgs · o` planes of `p.hw`, `acc` is `o · c · 9` long.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weight_grad_chunk(
        p: &Plane,
        masks: &[[u16; 3]],
        imgs: usize,
        c: usize,
        o: usize,
        xp: &[f32],
        gy: &[f32],
        acc: &mut [f32],
    ) {
        debug_assert!(xp.len() >= imgs * c * p.len && gy.len() >= imgs * o * p.hw);
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
                        3.. => k.block::<3>(acc, o0, ci),
                        2 => k.block::<2>(acc, o0, ci),
                        _ => k.block::<1>(acc, o0, ci),
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
        unsafe fn block<const OB: usize>(&self, acc: &mut [f32], o0: usize, ci: usize) {
            let DwChunk {
                p,
                masks,
                imgs,
                c,
                o,
                xp,
                gy,
            } = *self;
            let mut s = [[_mm512_setzero_ps(); 9]; OB];
            for n in 0..imgs {
                // SAFETY (whole loop): padded plane (n, ci) starts at (n·c + ci)·p.len and a tap
                // load reads q + kh·W + kw .. +16 with q < hw, inside its (h + 2)·W + 18
                // elements; gradient loads are masked to the plane.
                let xb = unsafe { xp.as_ptr().add((n * c + ci) * p.len) };
                let gb = unsafe { gy.as_ptr().add((n * o + o0) * p.hw) };
                for (v, &m) in masks.iter().enumerate() {
                    let q = v * V;
                    let mut gv = [_mm512_setzero_ps(); OB];
                    for (b, gvb) in gv.iter_mut().enumerate() {
                        *gvb = unsafe { _mm512_maskz_loadu_ps(m[1], gb.add(b * p.hw + q)) };
                    }
                    // taps unrolled with constant (kh, kw): offsets and masks stay in registers
                    for kh in 0..3 {
                        let row = unsafe { xb.add(q + kh * p.w) };
                        for kw in 0..3 {
                            let xv = unsafe { _mm512_maskz_loadu_ps(m[kw], row.add(kw)) };
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
