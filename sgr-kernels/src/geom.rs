//! Small types shared by the kernel modules, importing none of them: the geometry of a
//! convolution (with the shape checks of the three convolution ops) and the mask of a per-plane
//! gradient reduction.

/// Shape of one 2-D convolution (cross-correlation, no dilation, no groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes).
    pub pad: usize,
}

fn dims4(d: &[usize], what: &str) -> candle_core::Result<[usize; 4]> {
    match *d {
        [a, b, c, e] => Ok([a, b, c, e]),
        _ => candle_core::bail!("{what}: expected 4 dims, got {d:?}"),
    }
}

impl ConvGeom {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Rows of an image's column matrix: `C·KH·KW`.
    pub fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Values of one input image: `C·H·W`.
    pub(crate) fn in_img(&self) -> usize {
        self.c * self.h * self.w
    }
    /// Values of one output image: `O·HO·WO`.
    pub(crate) fn out_img(&self) -> usize {
        self.o * self.ho() * self.wo()
    }
    /// A 1×1, stride-1, unpadded convolution reads the image itself as its column matrix.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Range of output columns `ow` whose input column `ow·s + kj − p` lies inside `[0, w)`.
    pub(crate) fn valid_range(&self, k: usize, len_in: usize, len_out: usize) -> (usize, usize) {
        let (s, p) = (self.stride as isize, self.pad as isize);
        let k = k as isize;
        // ow*s + k - p >= 0  <=>  ow >= ceil((p - k) / s)
        let lo = if p - k > 0 { (p - k + s - 1) / s } else { 0 };
        // ow*s + k - p <= len_in - 1  <=>  ow <= floor((len_in - 1 + p - k) / s)
        let top = len_in as isize - 1 + p - k;
        let hi = if top < 0 { 0 } else { top / s + 1 };
        let lo = lo.min(len_out as isize) as usize;
        let hi = (hi.max(0) as usize).min(len_out);
        (lo, hi.max(lo))
    }

    /// The geometry of `conv(x, w)` from the dims of NCHW `x` and `(O, C, KH, KW)` `w`, checked:
    /// a positive stride, matching channels, a kernel no larger than the padded input.
    pub fn forward(
        x: &[usize],
        w: &[usize],
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        const OP: &str = "sgr-conv2d";
        let [n, c, h, wd] = dims4(x, "sgr-conv2d input")?;
        let [o, ci, kh, kw] = dims4(w, "sgr-conv2d weight")?;
        if ci != c {
            candle_core::bail!("{OP}: input has {c} channels, weight expects {ci}");
        }
        let g = Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            pad,
        };
        g.check_kernel(OP)?;
        Ok(g)
    }

    /// The geometry of the input gradient `conv_dx(gy, w)` for an `h × w` input, checked as
    /// [`ConvGeom::forward`], and `gy` of the output's size.
    pub fn input_grad(
        gy: &[usize],
        w: &[usize],
        (h, wd): (usize, usize),
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        const OP: &str = "sgr-conv2d-input-grad";
        let [n, o, ho, wo] = dims4(gy, "sgr-conv2d-input-grad gradient")?;
        let [ow, c, kh, kw] = dims4(w, "sgr-conv2d-input-grad weight")?;
        if ow != o {
            candle_core::bail!("{OP}: gradient has {o} channels, weight {ow}");
        }
        let g = Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            pad,
        };
        g.check_out(ho, wo, OP)?;
        Ok(g)
    }

    /// The geometry of the weight gradient `conv_dw(x, gy)` for a `kh × kw` kernel, checked as
    /// [`ConvGeom::input_grad`].
    pub fn weight_grad(
        x: &[usize],
        gy: &[usize],
        (kh, kw): (usize, usize),
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        const OP: &str = "sgr-conv2d-weight-grad";
        let [n, c, h, wd] = dims4(x, "sgr-conv2d-weight-grad input")?;
        let [ng, o, ho, wo] = dims4(gy, "sgr-conv2d-weight-grad gradient")?;
        if ng != n {
            candle_core::bail!("{OP}: batch {n} vs gradient batch {ng}");
        }
        let g = Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            pad,
        };
        g.check_out(ho, wo, OP)?;
        Ok(g)
    }

    fn check_kernel(&self, op: &str) -> candle_core::Result<()> {
        if self.stride == 0 {
            candle_core::bail!("{op}: stride must be positive");
        }
        if self.h + 2 * self.pad < self.kh || self.w + 2 * self.pad < self.kw {
            candle_core::bail!("{op}: kernel larger than the padded input");
        }
        Ok(())
    }

    fn check_out(&self, ho: usize, wo: usize, op: &str) -> candle_core::Result<()> {
        self.check_kernel(op)?;
        if self.ho() != ho || self.wo() != wo {
            candle_core::bail!(
                "{op}: output {ho}x{wo} does not match the geometry ({}x{})",
                self.ho(),
                self.wo()
            );
        }
        Ok(())
    }
}

/// How a per-plane gradient reduction (`cpu::Real::plane_sums`) masks the gradient of one
/// plane.
#[derive(Debug, Clone, Copy)]
pub enum PlaneMask<'a, T> {
    /// Not masked.
    None,
    /// By the ReLU `[scale·(x − mean) + shift ≥ 0]`, recomputed from `x`.
    Relu {
        /// μ of the BatchNorm.
        mean: T,
        /// γ/σ.
        scale: T,
        /// β.
        shift: T,
    },
    /// By a replayed mask: the plane's slice.
    Mask(&'a [T]),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for (h, k, s, p) in [
            (5, 3, 1, 1),
            (8, 3, 2, 1),
            (7, 1, 2, 0),
            (4, 3, 1, 0),
            (3, 5, 2, 2),
        ] {
            let g = ConvGeom {
                n: 1,
                c: 1,
                h,
                w: h,
                o: 1,
                kh: k,
                kw: k,
                stride: s,
                pad: p,
            };
            let out = g.ho();
            for kk in 0..k {
                let (lo, hi) = g.valid_range(kk, h, out);
                for o in 0..out {
                    let i = (o * s + kk) as isize - p as isize;
                    let inside = i >= 0 && i < h as isize;
                    assert_eq!(inside, o >= lo && o < hi, "h{h} k{k} s{s} p{p} kk{kk} o{o}");
                }
            }
        }
    }

    #[test]
    fn checks_reject_bad_geometry() {
        assert!(ConvGeom::forward(&[1, 3, 4, 4], &[2, 3, 3, 3], 0, 1).is_err());
        assert!(ConvGeom::forward(&[1, 3, 4, 4], &[2, 4, 3, 3], 1, 1).is_err());
        assert!(ConvGeom::input_grad(&[1, 2, 3, 3], &[2, 3, 3, 3], (4, 4), 1, 1).is_err());
        assert!(ConvGeom::weight_grad(&[1, 3, 4, 4], &[2, 2, 4, 4], (3, 3), 1, 1).is_err());
        assert!(ConvGeom::input_grad(&[1, 2, 4, 4], &[2, 3, 3, 3], (4, 4), 1, 1).is_ok());
    }
}
