//! # sgr-kernels
//!
//! Fast CPU kernels for sgr as candle custom ops, each with a version built from candle's own
//! ops ([`generic`]) that it runs elsewhere.
//!
//! * Convolution is a closed family of three bilinear ops, each the others' backward, so
//!   second-order autodiff (the exact SGR gradient) goes through them with no loss:
//!   `conv(x, w)`, its input gradient `conv_dx(g, w)` (a transposed convolution: col2im of
//!   `Wᵀ·G`) and its weight gradient `conv_dw(x, g)` (`G·im2col(x)ᵀ`). In f32, 3×3 stride-1
//!   padding-1 convolutions (most of a ResNet) run as direct AVX-512 kernels where the CPU has
//!   them ([`direct`]: no column matrix, no gemm packing); every other case is im2col / col2im
//!   plus one gemm per image, with no column matrix kept between forward and backward.
//! * BatchNorm in training mode is one fused op, optionally with a residual add and a ReLU (or a
//!   replayed ReLU mask), whose backward is two fused passes (per-channel sums, then the input
//!   gradient; three with a residual, whose masked gradient is stored once). It is first order
//!   only: callers that differentiate twice use a primitive BatchNorm instead.
//! * ReLU with a one-pass backward, `g·[x ≥ 0]`, itself differentiable again.
//! * The Transformer ops ([`linear`], [`layer_norm`], [`gelu`], [`attention()`]), each one op that
//!   keeps only its operands, its output and a few numbers per row for backward, where the
//!   compositions of candle's ops keep every intermediate until the backward pass ends.
//!   Attention never holds the `B·H·N·N` scores: one head's tile at a time, recomputed in
//!   backward from each row's log-sum-exp. The linear layer differentiates twice; LayerNorm,
//!   GELU and attention are first order only (callers that differentiate twice use [`generic`]).
//! * One SGD update per parameter in one pass ([`sgd_step`]), rounded as candle's ops round it.
//! * Two element-wise passes of the SGR step: [`scaled_sum`] and the f64 [`pair_sums`].
//!
//! Every op dispatches by device inside itself: the fast kernels run when all its operands are
//! CPU tensors of one dtype, f32 or f64 (made contiguous first); on any other device or dtype
//! the op runs its [`generic`] version, with the same semantics and first-order gradients.
//! Reductions across rows, images or channels run over blocks of a fixed size whose partial
//! sums are added in order, so results do not depend on the number of threads.
//!
//! ## Modules
//!
//! The module graph is acyclic, the candle ops of this root on top:
//!
//! * the crate root (candle ops and dispatch) and its private `transformer` and `sgd` modules
//!   use [`cpu`], [`token`], [`attention`], [`generic`] and [`geom`];
//! * [`token`] (LayerNorm, GELU, bias rows) and [`attention`] use [`cpu`] and `lanes` (row
//!   sums in f64 that vectorise; uses none of the others);
//! * [`cpu`] (the raw loops, the [`cpu::Real`] element types) uses [`direct`], [`vmath`],
//!   `reductions` (x86-64 only) and [`geom`];
//! * [`direct`] (AVX-512 3×3 convolutions) and `reductions` (AVX-512 f32 sums) use [`geom`];
//! * [`vmath`] (vectorisable f32 `exp` and `erf`) uses [`direct`]'s CPU check only;
//! * [`generic`] (the candle-op versions) uses [`geom`];
//! * [`geom`] (convolution geometry, plane masks) uses none of them.

pub mod attention;
pub mod cpu;
#[cfg(feature = "cudnn")]
pub mod cuda;
pub mod direct;
pub mod generic;
pub mod geom;
mod lanes;
#[cfg(target_arch = "x86_64")]
mod reductions;
mod sgd;
pub mod token;
pub mod vmath;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use cpu::Real;
use geom::ConvGeom;

/// Whether the fast kernels serve an op on `ts`: CPU tensors of one dtype, f32 or f64.
fn fast(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// Whether the convolution ops serve `ts`: [`fast`], or (feature `cudnn`) CUDA tensors of one
/// dtype, f32 or f64, which run through cuDNN ([`cuda`]).
fn fast_conv(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    fast(ts)
        || (cfg!(feature = "cudnn")
            && matches!(dtype, DType::F32 | DType::F64)
            && ts
                .iter()
                .all(|t| t.device().is_cuda() && t.dtype() == dtype))
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

/// Unpacks matching f32/f64 storages of up to three operands into slices and runs `$body`
/// with the element type in scope.
macro_rules! with_slices {
    ($op:expr, [$(($s:expr, $l:expr, $v:ident)),+], $body:expr) => {
        match ($($s,)+) {
            ($(CpuStorage::F32($v),)+) => {
                $(let $v: &[f32] = slice($v, $l, $op)?;)+
                CpuStorage::F32($body)
            }
            ($(CpuStorage::F64($v),)+) => {
                $(let $v: &[f64] = slice($v, $l, $op)?;)+
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 operands of one dtype expected", $op),
        }
    };
}

/// Implements `CustomOp2` (operands `a, b`) and `CustomOp3` (operands `a, b, r`) for a
/// forward-only op whose `run(a, b, r: Option<_>, layout_of_a)` returns the output, shaped as `a`.
macro_rules! forward_only_op {
    ($ty:ty, $name:literal) => {
        impl CustomOp2 for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                let out = with_slices!($name, [(s1, l1, a), (s2, l2, b)], {
                    self.run(a, b, None, l1)?
                });
                Ok((out, l1.shape().clone()))
            }
        }

        impl CustomOp3 for $ty {
            fn name(&self) -> &'static str {
                $name
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
                let out = with_slices!($name, [(s1, l1, a), (s2, l2, b), (s3, l3, r)], {
                    self.run(a, b, Some(r), l1)?
                });
                Ok((out, l1.shape().clone()))
            }
        }
    };
}

mod transformer;
pub use sgd::{sgd_step, SgdStep};
pub use transformer::{add_bias, attention, gelu, layer_norm, linear};

/// Stride and padding shared by the three convolution ops; builds each of them.
#[derive(Debug, Clone, Copy)]
struct Conv {
    stride: usize,
    pad: usize,
}

impl Conv {
    fn fwd(self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let op = ConvFwd {
            stride: self.stride,
            pad: self.pad,
        };
        apply2(x, w, op)
    }

    fn dx(self, gy: &Tensor, w: &Tensor, (h, wd): (usize, usize)) -> candle_core::Result<Tensor> {
        let op = ConvDx {
            stride: self.stride,
            pad: self.pad,
            h,
            w: wd,
        };
        apply2(gy, w, op)
    }

    fn dw(self, x: &Tensor, gy: &Tensor, (kh, kw): (usize, usize)) -> candle_core::Result<Tensor> {
        let op = ConvDw {
            stride: self.stride,
            pad: self.pad,
            kh,
            kw,
        };
        apply2(x, gy, op)
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
    // SAFETY: conv_forward writes every output element.
    unsafe {
        cpu::alloc_filled(g.n * g.o * g.ho() * g.wo(), |y| {
            cpu::conv_forward(g, x, w, y)
        })
    }
}

fn run_conv_dx<T: Real>(g: &ConvGeom, gy: &[T], w: &[T]) -> Vec<T> {
    // SAFETY: conv_backward_input writes every output element.
    unsafe {
        cpu::alloc_filled(g.n * g.c * g.h * g.w, |dx| {
            cpu::conv_backward_input(g, gy, w, dx)
        })
    }
}

fn run_conv_dw<T: Real>(g: &ConvGeom, x: &[T], gy: &[T]) -> Vec<T> {
    // SAFETY: conv_backward_weight writes every output element.
    unsafe { cpu::alloc_filled(g.o * g.ckk(), |dw| cpu::conv_backward_weight(g, x, gy, dw)) }
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
        let g = ConvGeom::forward(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let out = with_slices!(
            self.name(),
            [(s1, l1, x), (s2, l2, wt)],
            run_conv_fwd(&g, x, wt)
        );
        Ok((out, Shape::from((g.n, g.o, g.ho(), g.wo()))))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let g = ConvGeom::forward(l1.dims(), l2.dims(), self.stride, self.pad)?;
        cuda::conv(cuda::Which::Forward, &g, s1, l1, s2, l2)
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
        let conv = Conv {
            stride: self.stride,
            pad: self.pad,
        };
        let (xd, wd_) = (for_grad(x, &grad), for_grad(w, &grad));
        let dx = wanted(x, || conv.dx(&grad, &wd_, (h, wd)))?;
        let dw = wanted(w, || conv.dw(&xd, &grad, (kh, kw)))?;
        Ok((dx, dw))
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
        let hw = (self.h, self.w);
        let g = ConvGeom::input_grad(l1.dims(), l2.dims(), hw, self.stride, self.pad)?;
        let out = with_slices!(
            self.name(),
            [(s1, l1, gy), (s2, l2, wt)],
            run_conv_dx(&g, gy, wt)
        );
        Ok((out, Shape::from((g.n, g.c, g.h, g.w))))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let hw = (self.h, self.w);
        let g = ConvGeom::input_grad(l1.dims(), l2.dims(), hw, self.stride, self.pad)?;
        cuda::conv(cuda::Which::InputGrad, &g, s1, l1, s2, l2)
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
        let conv = Conv {
            stride: self.stride,
            pad: self.pad,
        };
        let (gyd, wd) = (for_grad(gy, &grad), for_grad(w, &grad));
        Ok((
            wanted(gy, || conv.fwd(&grad, &wd))?,
            wanted(w, || conv.dw(&grad, &gyd, (kh, kw)))?,
        ))
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
        let k = (self.kh, self.kw);
        let g = ConvGeom::weight_grad(l1.dims(), l2.dims(), k, self.stride, self.pad)?;
        let out = with_slices!(
            self.name(),
            [(s1, l1, x), (s2, l2, gy)],
            run_conv_dw(&g, x, gy)
        );
        Ok((out, Shape::from((g.o, g.c, g.kh, g.kw))))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let k = (self.kh, self.kw);
        let g = ConvGeom::weight_grad(l1.dims(), l2.dims(), k, self.stride, self.pad)?;
        cuda::conv(cuda::Which::WeightGrad, &g, s1, l1, s2, l2)
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
        let conv = Conv {
            stride: self.stride,
            pad: self.pad,
        };
        let (xd, gyd) = (for_grad(x, &grad), for_grad(gy, &grad));
        Ok((
            wanted(x, || conv.dx(&gyd, &grad, (h, w)))?,
            wanted(gy, || conv.fwd(&xd, &grad))?,
        ))
    }
}

/// `Some(f())` when a gradient for `arg` can reach a variable (`arg` is one or depends on one),
/// else `None` without running `f`. candle calls a custom op's `bwd` for every operand and
/// accumulates whatever it returns (a `zeros_like` and an `add`), so a constant operand (such
/// as a local module's detached input) costs neither the kernel nor the accumulation.
fn wanted(
    arg: &Tensor,
    f: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if arg.track_op() {
        f().map(Some)
    } else {
        Ok(None)
    }
}

/// An operand as a backward pass should use it: as is when the incoming gradient is itself
/// being differentiated (second order), else detached. A gradient computed from a tracked
/// operand records its op, and a parameter's gradient is kept until the optimizer step: it
/// would hold the incoming gradient (an activation-sized tensor) alive with it.
fn for_grad(t: &Tensor, grad: &Tensor) -> Tensor {
    if grad.track_op() {
        t.clone()
    } else {
        t.detach()
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
/// Twice differentiable. Off the fast path: [`generic::conv2d`].
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    if !fast_conv(&[x, w]) {
        return generic::conv2d(x, w, stride, pad);
    }
    Conv { stride, pad }.fwd(&x.contiguous()?, &w.contiguous()?)
}

/// The input gradient of [`conv2d`] for an `h × w` input: `conv_transpose(gy, w)`. Twice
/// differentiable. Off the fast path: [`generic::conv2d_input_grad`].
pub fn conv2d_input_grad(
    gy: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    stride: usize,
    pad: usize,
) -> candle_core::Result<Tensor> {
    if !fast_conv(&[gy, w]) {
        return generic::conv2d_input_grad(gy, w, (h, wd), stride, pad);
    }
    Conv { stride, pad }.dx(&gy.contiguous()?, &w.contiguous()?, (h, wd))
}

/// The weight gradient of [`conv2d`] for a `kh × kw` kernel. Twice differentiable. Off the
/// fast path: [`generic::conv2d_weight_grad`].
pub fn conv2d_weight_grad(
    x: &Tensor,
    gy: &Tensor,
    (kh, kw): (usize, usize),
    stride: usize,
    pad: usize,
) -> candle_core::Result<Tensor> {
    if !fast_conv(&[x, gy]) {
        return generic::conv2d_weight_grad(x, gy, (kh, kw), stride, pad);
    }
    Conv { stride, pad }.dw(&x.contiguous()?, &gy.contiguous()?, (kh, kw))
}

fn vec_of<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// What follows a fused BatchNorm (see [`cpu::BnAct`]).
#[derive(Debug, Clone)]
enum Act {
    Identity,
    Relu,
    /// A recorded ReLU mask of the output's shape, detached.
    Mask(Tensor),
}

/// Training-mode BatchNorm with fixed batch statistics, optionally `+ residual`, then ReLU or a
/// replayed ReLU mask: `y = act(γ (x − μ)/σ + β [+ r])`. Operands `(x, [γ; β])` or
/// `(x, [γ; β], r)`. Its backward is up to three fused passes (mask, per-channel sums, input
/// gradient).
#[derive(Debug, Clone)]
struct BnFwd {
    /// `[2, C]`: batch mean and biased batch variance, detached.
    stats: Tensor,
    eps: f64,
    act: Act,
}

/// Runs `f` on the contiguous CPU data of `t`.
fn with_data<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => f(slice(c.as_slice::<T>()?, l, "sgr-batch-norm")?),
        _ => candle_core::bail!("sgr-batch-norm: CPU tensors expected"),
    }
}

fn nci(l: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize)> {
    let d = l.shape().dims();
    if d.len() < 2 {
        candle_core::bail!("{op}: expected at least 2 dims, got {d:?}");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

fn coefs<T: Real + candle_core::WithDType>(
    stats: &Tensor,
    gb: &[T],
    eps: f64,
) -> candle_core::Result<cpu::BnCoefs<T>> {
    let st = vec_of::<T>(stats)?;
    let c = gb.len() / 2;
    Ok(cpu::BnCoefs::new(&st, &gb[..c], &gb[c..], eps))
}

impl BnFwd {
    fn check(&self, lx: &Layout, lgb: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (n, c, inner) = nci(lx, "sgr-batch-norm")?;
        if lgb.shape().elem_count() != 2 * c {
            candle_core::bail!("sgr-batch-norm: [γ; β] must have {} entries", 2 * c);
        }
        Ok((n, c, inner))
    }

    fn run<T: Real + candle_core::WithDType>(
        &self,
        x: &[T],
        gb: &[T],
        r: Option<&[T]>,
        inner: usize,
    ) -> candle_core::Result<Vec<T>> {
        let k = coefs(&self.stats, gb, self.eps)?;
        let go = |act: cpu::BnAct<'_, T>| {
            // SAFETY: bn_forward writes every output element.
            Ok(unsafe { cpu::alloc_filled(x.len(), |y| cpu::bn_forward(x, r, y, inner, &k, act)) })
        };
        match &self.act {
            Act::Identity => go(cpu::BnAct::Identity),
            Act::Relu => go(cpu::BnAct::Relu),
            Act::Mask(m) => with_data(m, |m| {
                if m.len() != x.len() {
                    candle_core::bail!(
                        "sgr-batch-norm: mask of {} values, input {}",
                        m.len(),
                        x.len()
                    );
                }
                go(cpu::BnAct::Mask(m))
            }),
        }
    }

    /// Gradients of `x` (`None` when it is a constant), `[γ; β]` and (when present) the
    /// residual.
    fn backward(
        &self,
        x: &Tensor,
        gb: &Tensor,
        residual: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        if grad.track_op() {
            candle_core::bail!(
                "sgr-batch-norm is first-order only; use the primitive BatchNorm when \
                 differentiating twice"
            );
        }
        let c = x.dim(1)?;
        let grad = grad.contiguous()?;
        // With a residual, the masked gradient is the residual's gradient: store it once.
        // Without, the two passes below mask it on the fly (ReLU recomputed from x, or the
        // replayed mask read alongside).
        let (gz, mask) = match (&self.act, residual) {
            (Act::Relu, Some(r)) => {
                let op = BnReluGrad {
                    stats: self.stats.clone(),
                    gb: gb.detach(),
                    eps: self.eps,
                };
                (x.apply_op3_no_bwd(&grad, r, &op)?, None)
            }
            (Act::Relu, None) => (grad, Some(MaskSrc::Relu(gb.detach()))),
            (Act::Mask(m), Some(_)) => ((grad * m)?, None),
            (Act::Mask(m), None) => (grad, Some(MaskSrc::Mask(m.clone()))),
            (Act::Identity, _) => (grad, None),
        };
        let sums = x.apply_op2_no_bwd(
            &gz,
            &BnSums {
                stats: self.stats.clone(),
                eps: self.eps,
                mask: mask.clone(),
            },
        )?;
        let dx = wanted(x, || {
            x.apply_op3_no_bwd(
                &gz,
                &gb.narrow(0, 0, c)?,
                &BnDx {
                    stats: self.stats.clone(),
                    sums: sums.clone(),
                    eps: self.eps,
                    mask,
                },
            )
        })?;
        // sums = [Σg; Σg·x̂] = [dβ; dγ]
        let dgb = Tensor::cat(&[sums.narrow(0, c, c)?, sums.narrow(0, 0, c)?], 0)?;
        Ok((dx, dgb, gz))
    }
}

impl CustomOp2 for BnFwd {
    fn name(&self) -> &'static str {
        "sgr-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, inner) = self.check(l1, l2)?;
        let out = with_slices!(CustomOp2::name(self), [(s1, l1, x), (s2, l2, gb)], {
            self.run(x, gb, None, inner)?
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgb, _) = self.backward(x, gb, None, grad)?;
        Ok((dx, Some(dgb).filter(|_| gb.track_op())))
    }
}

impl CustomOp3 for BnFwd {
    fn name(&self) -> &'static str {
        "sgr-batch-norm-residual"
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
        let (_, _, inner) = self.check(l1, l2)?;
        if l3.shape() != l1.shape() {
            candle_core::bail!(
                "sgr-batch-norm-residual: residual {:?} vs input {:?}",
                l3.shape(),
                l1.shape()
            );
        }
        let out = with_slices!(
            CustomOp3::name(self),
            [(s1, l1, x), (s2, l2, gb), (s3, l3, r)],
            self.run(x, gb, Some(r), inner)?
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        r: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgb, dr) = self.backward(x, gb, Some(r), grad)?;
        Ok((
            dx,
            Some(dgb).filter(|_| gb.track_op()),
            Some(dr).filter(|_| r.track_op()),
        ))
    }
}

/// `g · [z ≥ 0]` at the pre-activation `z` of a fused BatchNorm + ReLU (recomputed from `x`).
struct BnReluGrad {
    stats: Tensor,
    gb: Tensor,
    eps: f64,
}

impl BnReluGrad {
    fn run<T: Real + candle_core::WithDType>(
        &self,
        x: &[T],
        g: &[T],
        r: Option<&[T]>,
        l: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let (_, _, inner) = nci(l, "sgr-batch-norm-relu-grad")?;
        let k = coefs(&self.stats, &vec_of::<T>(&self.gb)?, self.eps)?;
        // SAFETY: bn_relu_grad writes every output element.
        Ok(unsafe { cpu::alloc_filled(x.len(), |o| cpu::bn_relu_grad(x, r, g, o, inner, &k)) })
    }
}

forward_only_op!(BnReluGrad, "sgr-batch-norm-relu-grad");

/// Where the backward passes take the mask of the incoming gradient from.
#[derive(Debug, Clone)]
enum MaskSrc {
    /// The ReLU, recomputed from `x` with these `[γ; β]`.
    Relu(Tensor),
    /// A replayed mask.
    Mask(Tensor),
}

/// Runs `f` with the [`cpu::GradMask`] of `src`.
fn with_grad_mask<T: Real + candle_core::WithDType, R>(
    src: &Option<MaskSrc>,
    stats: &Tensor,
    eps: f64,
    f: impl FnOnce(cpu::GradMask<'_, T>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match src {
        None => f(cpu::GradMask::None),
        Some(MaskSrc::Relu(gb)) => {
            let k = coefs(stats, &vec_of::<T>(gb)?, eps)?;
            f(cpu::GradMask::Relu(&k))
        }
        Some(MaskSrc::Mask(m)) => with_data(m, |m| f(cpu::GradMask::Mask(m))),
    }
}

/// `[Σ g, Σ g·x̂]` per channel, `g` masked first as `mask` says.
struct BnSums {
    stats: Tensor,
    eps: f64,
    mask: Option<MaskSrc>,
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
        let out = with_slices!(self.name(), [(s1, l1, x), (s2, l2, g)], {
            let st = vec_of(&self.stats)?;
            with_grad_mask(&self.mask, &self.stats, eps, |mask| {
                Ok(cpu::bn_backward_sums(
                    x,
                    g,
                    n,
                    c,
                    inner,
                    &st[..c],
                    &st[c..],
                    eps,
                    mask,
                ))
            })?
        });
        Ok((out, Shape::from(2 * c)))
    }
}

/// Input gradient of training-mode BatchNorm (masked like [`BnSums`]).
struct BnDx {
    stats: Tensor,
    sums: Tensor,
    eps: f64,
    mask: Option<MaskSrc>,
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
        let out = with_slices!(self.name(), [(s1, l1, x), (s2, l2, g), (s3, l3, gm)], {
            let st = vec_of(&self.stats)?;
            let sums = vec_of(&self.sums)?;
            with_grad_mask(&self.mask, &self.stats, self.eps, |mask| {
                let fill = |dx: &mut [std::mem::MaybeUninit<_>]| {
                    cpu::bn_backward_input(
                        x,
                        g,
                        dx,
                        n,
                        c,
                        inner,
                        &st[..c],
                        &st[c..],
                        gm,
                        &sums,
                        self.eps,
                        mask,
                    )
                };
                // SAFETY: bn_backward_input writes every output element.
                Ok(unsafe { cpu::alloc_filled(x.len(), fill) })
            })?
        });
        Ok((out, l1.shape().clone()))
    }
}

/// Per-channel batch mean and biased variance of `x` (`[N, C, ...]`), detached, as `[2, C]`.
/// Off the fast path: [`generic::batch_stats`].
pub fn batch_stats(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fast(&[x]) {
        return generic::batch_stats(x);
    }
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

/// Training-mode BatchNorm `γ (x − μ)/√(σ² + ε) + β` with `stats` (`[2, C]`: μ, σ²) from
/// [`batch_stats`]; `stats` gets no gradient, the gradient of `x` includes the dependence of μ
/// and σ² on `x` (the batch statistics' formula, evaluated at `stats`). First order only on the
/// fast path; elsewhere [`generic::batch_norm_train`].
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    batch_norm_train_act(x, gamma, beta, None, false, stats, eps)
}

/// [`batch_norm_train_act`] with a replayed ReLU mask instead of the ReLU: `(BN(x) [+ r]) · m`,
/// `m` detached. Off the fast path: [`generic::batch_norm_train_masked`].
pub fn batch_norm_train_masked(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    mask: &Tensor,
    stats: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if !fast(&with_residual(&[x, gamma, beta, stats, mask], residual)) {
        return generic::batch_norm_train_masked(x, gamma, beta, residual, mask, stats, eps);
    }
    let act = Act::Mask(mask.detach().contiguous()?);
    bn_apply(x, gamma, beta, residual, act, stats, eps)
}

/// The ReLU mask `[BN(x) [+ r] ≥ 0]` (1 or 0, the input's dtype) that a recording forward
/// stores, computed in one pass without materialising the pre-activation. Detached. Off the
/// fast path: [`generic::batch_norm_relu_mask`].
pub fn batch_norm_relu_mask(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    stats: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if !fast(&with_residual(&[x, gamma, beta, stats], residual)) {
        return generic::batch_norm_relu_mask(x, gamma, beta, residual, stats, eps);
    }
    let x = x.contiguous()?;
    let gb = Tensor::cat(&[gamma.flatten_all()?, beta.flatten_all()?], 0)?.detach();
    let op = BnMask {
        stats: stats.detach(),
        eps,
    };
    match residual {
        Some(r) => x.apply_op3_no_bwd(&gb, &r.contiguous()?, &op),
        None => x.apply_op2_no_bwd(&gb, &op),
    }
}

/// The mask op behind [`batch_norm_relu_mask`].
struct BnMask {
    stats: Tensor,
    eps: f64,
}

impl BnMask {
    fn run<T: Real + candle_core::WithDType>(
        &self,
        x: &[T],
        gb: &[T],
        r: Option<&[T]>,
        l: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let (_, _, inner) = nci(l, "sgr-batch-norm-mask")?;
        let k = coefs(&self.stats, gb, self.eps)?;
        // SAFETY: bn_relu_mask writes every output element.
        Ok(unsafe { cpu::alloc_filled(x.len(), |o| cpu::bn_relu_mask(x, r, o, inner, &k)) })
    }
}

forward_only_op!(BnMask, "sgr-batch-norm-mask");

/// [`batch_norm_train`] with, fused in the same pass, an optional residual added after the
/// affine map and an optional ReLU (ReLU'(0) = 1, as candle's): `act(BN(x) [+ r])`. One output
/// tensor instead of up to three, and one backward node instead of three. Off the fast path:
/// [`generic::batch_norm_train_act`].
pub fn batch_norm_train_act(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    stats: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if !fast(&with_residual(&[x, gamma, beta, stats], residual)) {
        return generic::batch_norm_train_act(x, gamma, beta, residual, relu, stats, eps);
    }
    let act = if relu { Act::Relu } else { Act::Identity };
    bn_apply(x, gamma, beta, residual, act, stats, eps)
}

/// `ts` and the residual, if any.
fn with_residual<'a>(ts: &[&'a Tensor], residual: Option<&'a Tensor>) -> Vec<&'a Tensor> {
    ts.iter().copied().chain(residual).collect()
}

fn bn_apply(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    act: Act,
    stats: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let op = BnFwd {
        stats: stats.detach(),
        eps,
        act,
    };
    let x = x.contiguous()?;
    let gb = Tensor::cat(&[gamma.flatten_all()?, beta.flatten_all()?], 0)?;
    match residual {
        Some(r) => {
            let r = r.contiguous()?;
            if x.track_op() || gb.track_op() || r.track_op() {
                x.apply_op3(&gb, &r, op)
            } else {
                x.apply_op3_no_bwd(&gb, &r, &op)
            }
        }
        None => {
            if x.track_op() || gb.track_op() {
                x.apply_op2(&gb, op)
            } else {
                x.apply_op2_no_bwd(&gb, &op)
            }
        }
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
                // SAFETY: relu writes every output element.
                CpuStorage::F32(unsafe { cpu::alloc_filled(x.len(), |y| cpu::relu(x, y)) })
            }
            CpuStorage::F64(x) => {
                let x = slice(x, l, self.name())?;
                // SAFETY: relu writes every output element.
                CpuStorage::F64(unsafe { cpu::alloc_filled(x.len(), |y| cpu::relu(x, y)) })
            }
            _ => candle_core::bail!("sgr-relu: f32 or f64 expected"),
        };
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(apply2(
            &grad.contiguous()?,
            &for_grad(x, grad),
            ReluGrad,
        )?))
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
        let out = with_slices!(self.name(), [(s1, l1, g), (s2, l2, x)], {
            // SAFETY: relu_backward writes every output element.
            unsafe { cpu::alloc_filled(g.len(), |d| cpu::relu_backward(g, x, d)) }
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
        Ok((
            Some(apply2(&grad.contiguous()?, &for_grad(x, grad), ReluGrad)?),
            None,
        ))
    }
}

/// `α·(a + β·b)` of two tensors of one shape, rounded as those operations in that order, in
/// one parallel pass (candle's scalar `affine` runs on one thread), detached. Off the fast
/// path: [`generic::scaled_sum`], candle's ops in that order.
pub fn scaled_sum(a: &Tensor, b: &Tensor, beta: f64, alpha: f64) -> candle_core::Result<Tensor> {
    if a.shape() != b.shape() || !fast(&[a, b]) {
        return generic::scaled_sum(a, b, beta, alpha);
    }
    struct ScaledSum(f64, f64);
    impl CustomOp2 for ScaledSum {
        fn name(&self) -> &'static str {
            "sgr-scaled-sum"
        }
        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let out = with_slices!(self.name(), [(s1, l1, x), (s2, l2, y)], {
                // SAFETY: scaled_sum writes every output element.
                unsafe { cpu::alloc_filled(x.len(), |o| cpu::scaled_sum(x, y, self.0, self.1, o)) }
            });
            Ok((out, l1.shape().clone()))
        }
    }
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &ScaledSum(beta, alpha))
}

/// ReLU with candle's convention ReLU'(0) = 1; twice differentiable like candle's. Off the
/// fast path: [`generic::relu`] (candle's `relu`).
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fast(&[x]) {
        return generic::relu(x);
    }
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(Relu)
    } else {
        x.apply_op1_no_bwd(&Relu)
    }
}

/// `[Σ a·b, Σ a², Σ b², Σ (a − b)²]` of two tensors of one shape, accumulated in f64 (the
/// boundary diagnostics of every local step), as a detached F64 tensor of shape `[4]` on the
/// inputs' device, so that callers can keep step metrics there. On the fast path one pass over
/// fixed blocks (deterministic); elsewhere [`generic::pair_sums`], candle's ops in f64.
pub fn pair_sums(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.shape() != b.shape() || !fast(&[a, b]) {
        return generic::pair_sums(a, b);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let sums = {
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        match (&*sa, &*sb) {
            (candle_core::Storage::Cpu(ca), candle_core::Storage::Cpu(cb)) => match (ca, cb) {
                (CpuStorage::F32(x), CpuStorage::F32(y)) => {
                    cpu::pair_sums(slice(x, la, "pair_sums")?, slice(y, lb, "pair_sums")?)
                }
                (CpuStorage::F64(x), CpuStorage::F64(y)) => {
                    cpu::pair_sums(slice(x, la, "pair_sums")?, slice(y, lb, "pair_sums")?)
                }
                _ => candle_core::bail!("pair_sums: f32 or f64 operands of one dtype expected"),
            },
            _ => candle_core::bail!("pair_sums: CPU tensors expected"),
        }
    };
    Tensor::new(&sums, a.device())
}
