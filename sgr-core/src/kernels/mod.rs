//! Fast CPU kernels as candle custom ops.
//!
//! * Convolution is a closed family of three bilinear ops, each the others' backward, so
//!   second-order autodiff (the exact SGR gradient) goes through them with no loss:
//!   `conv(x, w)`, its input gradient `conv_dx(g, w)` (a transposed convolution: col2im of
//!   `Wᵀ·G`) and its weight gradient `conv_dw(x, g)` (`G·im2col(x)ᵀ`). All three are im2col /
//!   col2im plus one gemm per image, with no column matrix kept between forward and backward.
//! * BatchNorm in training mode is one fused op whose backward is two fused passes (per-channel
//!   sums, then the input gradient); it is first order only, and [`crate::nn::BatchNorm`] uses
//!   the primitive formula on threads that differentiate twice.
//! * ReLU with a one-pass backward, `g·[x ≥ 0]`, itself differentiable again.
//!
//! They run on the CPU for f32 and f64; callers fall back to candle's ops elsewhere
//! ([`supported`]).

pub mod cpu;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use cpu::{ConvGeom, Real};

/// Whether the fast kernels can run on `t` (CPU, f32 or f64).
pub fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

fn slice<'a, T: candle_core::WithDType>(
    s: &'a [T],
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

macro_rules! dispatch2 {
    ($op:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(x), CpuStorage::F32(y)) => {
                let $a = slice(x, $l1, $op)?;
                let $b = slice(y, $l2, $op)?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(x), CpuStorage::F64(y)) => {
                let $a = slice(x, $l1, $op)?;
                let $b = slice(y, $l2, $op)?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 operands of one dtype expected", $op),
        }
    };
}

fn dims4(l: &Layout, what: &str) -> candle_core::Result<[usize; 4]> {
    match l.shape().dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        d => candle_core::bail!("{what}: expected 4 dims, got {d:?}"),
    }
}

/// `y = conv(x, w)` (forward).
#[derive(Debug, Clone, Copy)]
struct ConvFwd {
    stride: usize,
    pad: usize,
}

/// `dx = conv_dx(gy, w)`: the input gradient, for an input of `h × w`.
#[derive(Debug, Clone, Copy)]
struct ConvDx {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

/// `dw = conv_dw(x, gy)`: the weight gradient, for a `kh × kw` kernel.
#[derive(Debug, Clone, Copy)]
struct ConvDw {
    stride: usize,
    pad: usize,
    kh: usize,
    kw: usize,
}

fn run_conv_fwd<T: Real>(g: &ConvGeom, x: &[T], w: &[T]) -> Vec<T> {
    let mut y = vec![T::ZERO; g.n * g.o * g.ho() * g.wo()];
    cpu::conv_forward(g, x, w, &mut y);
    y
}

fn run_conv_dx<T: Real>(g: &ConvGeom, gy: &[T], w: &[T]) -> Vec<T> {
    let mut dx = vec![T::ZERO; g.n * g.c * g.h * g.w];
    cpu::conv_backward_input(g, gy, w, &mut dx);
    dx
}

fn run_conv_dw<T: Real>(g: &ConvGeom, x: &[T], gy: &[T]) -> Vec<T> {
    let mut dw = vec![T::ZERO; g.o * g.ckk()];
    cpu::conv_backward_weight(g, x, gy, &mut dw);
    dw
}

fn check_kernel(g: &ConvGeom, op: &str) -> candle_core::Result<()> {
    if g.h + 2 * g.pad < g.kh || g.w + 2 * g.pad < g.kw {
        candle_core::bail!("{op}: kernel larger than the padded input");
    }
    Ok(())
}

fn check_out(g: &ConvGeom, ho: usize, wo: usize, op: &str) -> candle_core::Result<()> {
    check_kernel(g, op)?;
    if g.ho() != ho || g.wo() != wo {
        candle_core::bail!(
            "{op}: output {ho}x{wo} does not match the geometry ({}x{})",
            g.ho(),
            g.wo()
        );
    }
    Ok(())
}

impl CustomOp2 for ConvFwd {
    fn name(&self) -> &'static str {
        "sgr-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [n, c, h, w] = dims4(l1, "sgr-conv2d input")?;
        let [o, ci, kh, kw] = dims4(l2, "sgr-conv2d weight")?;
        if ci != c {
            candle_core::bail!("sgr-conv2d: input has {c} channels, weight expects {ci}");
        }
        let g = ConvGeom {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            stride: self.stride,
            pad: self.pad,
        };
        check_kernel(&g, self.name())?;
        let out = dispatch2!(self.name(), s1, l1, s2, l2, |x, wt| run_conv_fwd(&g, x, wt));
        Ok((out, Shape::from((n, o, g.ho(), g.wo()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let grad = grad.contiguous()?;
        let dx = apply2(
            &grad,
            w,
            ConvDx {
                stride: self.stride,
                pad: self.pad,
                h,
                w: wd,
            },
        )?;
        let dw = apply2(
            x,
            &grad,
            ConvDw {
                stride: self.stride,
                pad: self.pad,
                kh,
                kw,
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp2 for ConvDx {
    fn name(&self) -> &'static str {
        "sgr-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [n, o, ho, wo] = dims4(l1, "sgr-conv2d-input-grad gradient")?;
        let [ow, c, kh, kw] = dims4(l2, "sgr-conv2d-input-grad weight")?;
        if ow != o {
            candle_core::bail!("sgr-conv2d-input-grad: gradient has {o} channels, weight {ow}");
        }
        let g = ConvGeom {
            n,
            c,
            h: self.h,
            w: self.w,
            o,
            kh,
            kw,
            stride: self.stride,
            pad: self.pad,
        };
        check_out(&g, ho, wo, self.name())?;
        let out = dispatch2!(self.name(), s1, l1, s2, l2, |gy, wt| run_conv_dx(
            &g, gy, wt
        ));
        Ok((out, Shape::from((n, c, self.h, self.w))))
    }

    fn bwd(
        &self,
        gy: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, kh, kw) = w.dims4()?;
        let grad = grad.contiguous()?;
        let d_gy = apply2(
            &grad,
            w,
            ConvFwd {
                stride: self.stride,
                pad: self.pad,
            },
        )?;
        let d_w = apply2(
            &grad,
            gy,
            ConvDw {
                stride: self.stride,
                pad: self.pad,
                kh,
                kw,
            },
        )?;
        Ok((Some(d_gy), Some(d_w)))
    }
}

impl CustomOp2 for ConvDw {
    fn name(&self) -> &'static str {
        "sgr-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [n, c, h, w] = dims4(l1, "sgr-conv2d-weight-grad input")?;
        let [ng, o, ho, wo] = dims4(l2, "sgr-conv2d-weight-grad gradient")?;
        if ng != n {
            candle_core::bail!("sgr-conv2d-weight-grad: batch {n} vs gradient batch {ng}");
        }
        let g = ConvGeom {
            n,
            c,
            h,
            w,
            o,
            kh: self.kh,
            kw: self.kw,
            stride: self.stride,
            pad: self.pad,
        };
        check_out(&g, ho, wo, self.name())?;
        let out = dispatch2!(self.name(), s1, l1, s2, l2, |x, gy| run_conv_dw(&g, x, gy));
        Ok((out, Shape::from((o, c, self.kh, self.kw))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gy: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let grad = grad.contiguous()?;
        let d_x = apply2(
            gy,
            &grad,
            ConvDx {
                stride: self.stride,
                pad: self.pad,
                h,
                w,
            },
        )?;
        let d_gy = apply2(
            x,
            &grad,
            ConvFwd {
                stride: self.stride,
                pad: self.pad,
            },
        )?;
        Ok((Some(d_x), Some(d_gy)))
    }
}

/// Applies a binary op, recording it for backward only when an operand is tracked.
fn apply2<C: CustomOp2 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    if a.track_op() || b.track_op() {
        a.apply_op2(b, op)
    } else {
        a.apply_op2_no_bwd(b, &op)
    }
}

/// 2-D cross-correlation of NCHW `x` with `(O, C, KH, KW)` `w`, square stride and padding.
/// Twice differentiable. CPU f32/f64 only (see [`supported`]).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    if stride == 0 {
        candle_core::bail!("sgr-conv2d: stride must be positive");
    }
    apply2(&x.contiguous()?, &w.contiguous()?, ConvFwd { stride, pad })
}

fn vec_of<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Training-mode BatchNorm forward with fixed batch statistics; backward is two fused passes.
#[derive(Debug, Clone)]
struct BnTrain {
    /// `[2, C]`: batch mean and biased batch variance, detached.
    stats: Tensor,
    eps: f64,
}

fn nci(l: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize)> {
    let d = l.shape().dims();
    if d.len() < 2 {
        candle_core::bail!("{op}: expected at least 2 dims, got {d:?}");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

fn bn_fwd_typed<T: Real + candle_core::WithDType>(
    x: &[T],
    c: usize,
    inner: usize,
    stats: &Tensor,
    gamma: &[T],
    beta: &[T],
    eps: f64,
) -> candle_core::Result<Vec<T>> {
    let st = vec_of::<T>(stats)?;
    let mut y = vec![T::ZERO; x.len()];
    cpu::bn_forward(x, &mut y, c, inner, &st[..c], &st[c..], gamma, beta, eps);
    Ok(y)
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "sgr-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, inner) = nci(l1, self.name())?;
        if l2.shape().elem_count() != c || l3.shape().elem_count() != c {
            candle_core::bail!("sgr-batch-norm: γ and β must have {c} entries");
        }
        let op = self.name();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                CpuStorage::F32(bn_fwd_typed(
                    slice(x, l1, op)?,
                    c,
                    inner,
                    &self.stats,
                    slice(g, l2, op)?,
                    slice(b, l3, op)?,
                    self.eps,
                )?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                CpuStorage::F64(bn_fwd_typed(
                    slice(x, l1, op)?,
                    c,
                    inner,
                    &self.stats,
                    slice(g, l2, op)?,
                    slice(b, l3, op)?,
                    self.eps,
                )?)
            }
            _ => candle_core::bail!("sgr-batch-norm: f32 or f64 operands of one dtype expected"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if grad.track_op() {
            candle_core::bail!(
                "sgr-batch-norm is first-order only; use the primitive BatchNorm when \
                 differentiating twice"
            );
        }
        let grad = grad.contiguous()?;
        let c = x.dim(1)?;
        let sums = x.apply_op2_no_bwd(
            &grad,
            &BnSums {
                stats: self.stats.clone(),
                eps: self.eps,
            },
        )?;
        let dx = x.apply_op3_no_bwd(
            &grad,
            gamma,
            &BnDx {
                stats: self.stats.clone(),
                sums: sums.clone(),
                eps: self.eps,
            },
        )?;
        let dbeta = sums.narrow(0, 0, c)?;
        let dgamma = sums.narrow(0, c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `[Σ g, Σ g·x̂]` per channel.
struct BnSums {
    stats: Tensor,
    eps: f64,
}

impl CustomOp2 for BnSums {
    fn name(&self) -> &'static str {
        "sgr-batch-norm-sums"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, inner) = nci(l1, self.name())?;
        let eps = self.eps;
        let out = dispatch2!(self.name(), s1, l1, s2, l2, |x, g| {
            let st = vec_of(&self.stats)?;
            cpu::bn_backward_sums(x, g, n, c, inner, &st[..c], &st[c..], eps)
        });
        Ok((out, Shape::from(2 * c)))
    }
}

/// Input gradient of training-mode BatchNorm.
struct BnDx {
    stats: Tensor,
    sums: Tensor,
    eps: f64,
}

impl CustomOp3 for BnDx {
    fn name(&self) -> &'static str {
        "sgr-batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, inner) = nci(l1, self.name())?;
        let op = self.name();
        macro_rules! run {
            ($x:expr, $g:expr, $gm:expr) => {{
                let (x, g, gm) = (slice($x, l1, op)?, slice($g, l2, op)?, slice($gm, l3, op)?);
                let st = vec_of(&self.stats)?;
                let sums = vec_of(&self.sums)?;
                let mut dx = vec![Real::ZERO; x.len()];
                cpu::bn_backward_input(
                    x,
                    g,
                    &mut dx,
                    n,
                    c,
                    inner,
                    &st[..c],
                    &st[c..],
                    gm,
                    &sums,
                    self.eps,
                );
                dx
            }};
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(gm)) => {
                CpuStorage::F32(run!(x, g, gm))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(gm)) => {
                CpuStorage::F64(run!(x, g, gm))
            }
            _ => candle_core::bail!("{op}: f32 or f64 operands of one dtype expected"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Per-channel batch mean and biased variance of `x` (`[N, C, ...]`), detached, as `[2, C]`.
pub fn batch_stats(x: &Tensor) -> candle_core::Result<Tensor> {
    struct Stats;
    impl CustomOp1 for Stats {
        fn name(&self) -> &'static str {
            "sgr-batch-stats"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            let (n, c, inner) = nci(l, self.name())?;
            let out = match s {
                CpuStorage::F32(x) => {
                    CpuStorage::F32(cpu::bn_stats(slice(x, l, self.name())?, n, c, inner))
                }
                CpuStorage::F64(x) => {
                    CpuStorage::F64(cpu::bn_stats(slice(x, l, self.name())?, n, c, inner))
                }
                _ => candle_core::bail!("sgr-batch-stats: f32 or f64 expected"),
            };
            Ok((out, Shape::from((2, c))))
        }
    }
    x.contiguous()?.apply_op1_no_bwd(&Stats)
}

/// Training-mode BatchNorm `γ (x − μ)/√(σ² + ε) + β` with `stats` from [`batch_stats`];
/// the gradient includes the dependence of μ and σ² on `x`. First order only.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let op = BnTrain {
        stats: stats.detach(),
        eps,
    };
    let x = x.contiguous()?;
    if x.track_op() || gamma.track_op() || beta.track_op() {
        x.apply_op3(gamma, beta, op)
    } else {
        x.apply_op3_no_bwd(gamma, beta, &op)
    }
}

/// ReLU forward.
struct Relu;

/// `g · [x ≥ 0]`, linear in `g`.
struct ReluGrad;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "sgr-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => {
                let x = slice(x, l, self.name())?;
                let mut y = vec![0f32; x.len()];
                cpu::relu(x, &mut y);
                CpuStorage::F32(y)
            }
            CpuStorage::F64(x) => {
                let x = slice(x, l, self.name())?;
                let mut y = vec![0f64; x.len()];
                cpu::relu(x, &mut y);
                CpuStorage::F64(y)
            }
            _ => candle_core::bail!("sgr-relu: f32 or f64 expected"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(apply2(&grad.contiguous()?, x, ReluGrad)?))
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "sgr-relu-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("sgr-relu-grad: shape mismatch");
        }
        let out = dispatch2!(self.name(), s1, l1, s2, l2, |g, x| {
            let mut d = vec![Real::ZERO; g.len()];
            cpu::relu_backward(g, x, &mut d);
            d
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(
        &self,
        _g: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Linear in g; the mask is piecewise constant in x (zero derivative almost everywhere).
        Ok((Some(apply2(&grad.contiguous()?, x, ReluGrad)?), None))
    }
}

/// ReLU with candle's convention ReLU'(0) = 1; twice differentiable like candle's.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(Relu)
    } else {
        x.apply_op1_no_bwd(&Relu)
    }
}
