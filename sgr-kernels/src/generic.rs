//! Every op of this crate composed of candle's own ops, with the semantics of the fast kernels:
//! what the ops at the crate root run off the CPU or for dtypes other than f32 and f64. Public
//! so that they can be checked against the fast kernels on the CPU.
//!
//! The convolutions are differentiable twice through candle's backward. The BatchNorm ops give
//! the fused ops' first-order gradients, the dependence of the batch statistics on `x`
//! included; their second order is that of this composition, which the fused ops (first order
//! only) do not have.

use candle_core::{DType, Result, Tensor};

use crate::geom::ConvGeom;

/// [`crate::conv2d`]: 2-D cross-correlation of NCHW `x` with `(O, C, KH, KW)` `w`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let g = ConvGeom::forward(x.dims(), w.dims(), stride, pad)?;
    let (rh, rw) = (
        (g.h + 2 * pad - g.kh) % stride,
        (g.w + 2 * pad - g.kw) % stride,
    );
    if rh == rw {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    // candle's backward of conv2d sizes the input gradient with one output padding for both
    // axes, right only when the axes leave the same remainder: pad explicitly and keep the
    // rows and columns that the kernel reads, which leaves none.
    let (eh, ew) = ((g.ho() - 1) * stride + g.kh, (g.wo() - 1) * stride + g.kw);
    x.pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?
        .narrow(2, 0, eh)?
        .narrow(3, 0, ew)?
        .conv2d(w, 0, stride, 1, 1)
}

/// [`crate::conv2d_input_grad`]: the transposed convolution of `gy` with `w`, cropped to the
/// `h × w` input.
pub fn conv2d_input_grad(
    gy: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    ConvGeom::input_grad(gy.dims(), w.dims(), (h, wd), stride, pad)?;
    // The unpadded transposed convolution: input pixel (i, j) sits at (i + pad, j + pad); rows
    // and columns past its end receive nothing.
    let full = gy.conv_transpose2d(w, 0, 0, stride, 1)?;
    let (fh, fw) = (full.dim(2)?, full.dim(3)?);
    full.pad_with_zeros(2, 0, (pad + h).saturating_sub(fh))?
        .pad_with_zeros(3, 0, (pad + wd).saturating_sub(fw))?
        .narrow(2, pad, h)?
        .narrow(3, pad, wd)
}

/// [`crate::conv2d_weight_grad`]: the batch-axis convolution of `x` with `gy` (dilated by the
/// stride), cropped to the `kh × kw` kernel.
pub fn conv2d_weight_grad(
    x: &Tensor,
    gy: &Tensor,
    (kh, kw): (usize, usize),
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    ConvGeom::weight_grad(x.dims(), gy.dims(), (kh, kw), stride, pad)?;
    x.transpose(0, 1)?
        .conv2d(&gy.transpose(0, 1)?, pad, 1, stride, 1)?
        .transpose(0, 1)?
        .narrow(2, 0, kh)?
        .narrow(3, 0, kw)
}

/// The axes other than the channel axis 1 of `x`, and the shape `[1, C, 1, ..]` that broadcasts
/// a per-channel vector against `x`.
fn channel_axes(x: &Tensor, op: &str) -> Result<(Vec<usize>, Vec<usize>)> {
    let rank = x.rank();
    if rank < 2 {
        candle_core::bail!("{op}: expected at least 2 dims, got {:?}", x.dims());
    }
    let mut shape = vec![1usize; rank];
    shape[1] = x.dim(1)?;
    Ok(((0..rank).filter(|&d| d != 1).collect(), shape))
}

/// [`crate::batch_stats`]: per-channel batch mean and biased variance as `[2, C]`, detached.
pub fn batch_stats(x: &Tensor) -> Result<Tensor> {
    let x = x.detach();
    let (axes, _) = channel_axes(&x, "sgr-batch-stats")?;
    let mean = x.mean_keepdim(axes.as_slice())?;
    let var = x
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(axes.as_slice())?;
    Tensor::stack(&[mean.flatten_all()?, var.flatten_all()?], 0)
}

/// The pre-activation `γ (x − μ)/√(σ² + ε) + β [+ r]` with `[μ; σ²] = stats`, computed as the
/// fused kernels compute it. `stats` gets no gradient; when `x` is tracked, μ and σ² carry the
/// gradients of the batch mean and of `mean((x − μ)²)` with unchanged values, which gives the
/// fused op's input gradient `γ/σ · (g − Σg/M − x̂ · Σ(g x̂)/M)` whatever `stats` holds.
fn bn_pre(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    stats: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    const OP: &str = "sgr-batch-norm";
    let (axes, shape) = channel_axes(x, OP)?;
    let c = shape[1];
    if gamma.elem_count() != c || beta.elem_count() != c {
        candle_core::bail!("{OP}: γ and β must have {c} entries each");
    }
    if stats.dims() != [2, c] {
        candle_core::bail!("{OP}: statistics {:?}, expected [2, {c}]", stats.dims());
    }
    if let Some(r) = residual {
        if r.shape() != x.shape() {
            candle_core::bail!("{OP}: residual {:?} vs input {:?}", r.shape(), x.shape());
        }
    }
    let stats = stats.detach();
    let (mut mean, mut var) = (stats.get(0)?, stats.get(1)?);
    if x.track_op() {
        let m = x.mean_keepdim(axes.as_slice())?.flatten_all()?;
        let v = x
            .broadcast_sub(&mean.reshape(shape.as_slice())?)?
            .sqr()?
            .mean_keepdim(axes.as_slice())?
            .flatten_all()?;
        mean = (mean + (&m - m.detach())?)?;
        var = (var + (&v - v.detach())?)?;
    }
    let scale = gamma.flatten_all()?.div(&(var + eps)?.sqrt()?)?;
    let z = x
        .broadcast_sub(&mean.reshape(shape.as_slice())?)?
        .broadcast_mul(&scale.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.flatten_all()?.reshape(shape.as_slice())?)?;
    match residual {
        Some(r) => z + r,
        None => Ok(z),
    }
}

/// [`crate::batch_norm_train`]: training-mode BatchNorm with the given batch statistics.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    stats: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    bn_pre(x, gamma, beta, None, stats, eps)
}

/// [`crate::batch_norm_train_act`]: `act(BN(x) [+ r])`, ReLU'(0) = 1 (candle's `relu`).
pub fn batch_norm_train_act(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    relu: bool,
    stats: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let z = bn_pre(x, gamma, beta, residual, stats, eps)?;
    if relu {
        z.relu()
    } else {
        Ok(z)
    }
}

/// [`crate::batch_norm_train_masked`]: `(BN(x) [+ r]) · m` with the mask `m` detached.
pub fn batch_norm_train_masked(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    mask: &Tensor,
    stats: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let z = bn_pre(x, gamma, beta, residual, stats, eps)?;
    if mask.shape() != z.shape() {
        candle_core::bail!(
            "sgr-batch-norm: mask {:?}, input {:?}",
            mask.shape(),
            z.shape()
        );
    }
    z * mask.detach()
}

/// [`crate::batch_norm_relu_mask`]: `[BN(x) [+ r] ≥ 0]` as 1 or 0 in the input's dtype,
/// detached.
pub fn batch_norm_relu_mask(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    residual: Option<&Tensor>,
    stats: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let r = residual.map(Tensor::detach);
    bn_pre(
        &x.detach(),
        &gamma.detach(),
        &beta.detach(),
        r.as_ref(),
        stats,
        eps,
    )?
    .ge(0.0)?
    .to_dtype(x.dtype())
}

/// [`crate::relu`]: candle's `relu` (ReLU'(0) = 1).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.relu()
}

/// [`crate::scaled_sum`]: `α·(a + β·b)`, detached, as candle's `affine` and `add` round it.
pub fn scaled_sum(a: &Tensor, b: &Tensor, beta: f64, alpha: f64) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!(
            "scaled_sum: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        );
    }
    (a.detach() + b.detach().affine(beta, 0.0)?)?.affine(alpha, 0.0)
}

/// [`crate::pair_sums`]: `[Σ a·b, Σ a², Σ b², Σ (a − b)²]` in f64 as a detached `[4]` tensor on
/// the inputs' device.
pub fn pair_sums(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!(
            "pair_sums: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        );
    }
    let a = a.detach().to_dtype(DType::F64)?;
    let b = b.detach().to_dtype(DType::F64)?;
    Tensor::stack(
        &[
            (&a * &b)?.sum_all()?,
            a.sqr()?.sum_all()?,
            b.sqr()?.sum_all()?,
            (&a - &b)?.sqr()?.sum_all()?,
        ],
        0,
    )
}

/// [`crate::linear`]: `x·Wᵀ + b` over the last axis of `x`, as `matmul` + `broadcast_add`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&cin, lead)) = dims.split_last() else {
        candle_core::bail!("linear: a tensor of rank ≥ 1 expected, got a scalar");
    };
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, cin))?.matmul(&w.t()?)?.broadcast_add(b)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// [`crate::layer_norm`]: LayerNorm over the last axis, biased variance, from candle's ops
/// (twice differentiable).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    use candle_core::D;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&inv)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)
}

/// [`crate::gelu`]: `x·Φ(x)` from `erf`, whose candle backward `2/√π·exp(−x²)` is exact and
/// differentiable again.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let phi = x
        .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?
        .erf()?
        .affine(0.5, 0.5)?;
    x * phi
}

/// Softmax over the last axis, `exp(x − max) / Σ exp(x − max)`, the maximum detached (the
/// shift does not change the value, so its gradient is exactly zero).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    use candle_core::D;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// The first half of [`attention`]: from the packed `(B, N, 3C)` input, the probabilities
/// `softmax(scale·q·kᵀ)` `(B, H, N, N)` and the values `(B, H, N, C/H)`, so that a caller can
/// apply dropout to the probabilities before [`attention_merge`].
pub fn attention_probs(qkv: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, Tensor)> {
    let (b, n, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        candle_core::bail!(
            "attention: the packed width {c3} is not 3 × a multiple of the {heads} heads"
        );
    }
    let hd = c3 / (3 * heads);
    // (B, N, 3·C) → (3, B, H, N, hd), one copy; q, k, v are contiguous slices of it.
    let qkv = qkv
        .reshape((b, n, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    let q = (qkv.get(0)? * scale)?;
    let k = qkv.get(1)?;
    let v = qkv.get(2)?;
    Ok((softmax_last_dim(&q.matmul(&k.t()?)?)?, v))
}

/// The second half of [`attention`]: `probs·v`, heads merged into `(B, N, C)`.
pub fn attention_merge(probs: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, n, hd) = v.dims4()?;
    probs.matmul(v)?.transpose(1, 2)?.reshape((b, n, h * hd))
}

/// [`crate::attention`]: multi-head attention on a packed `(B, N, 3C)` input, from candle's
/// ops (twice differentiable).
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (p, v) = attention_probs(qkv, heads, scale)?;
    attention_merge(&p, &v)
}

/// [`crate::sgd_step`]: one SGD update from candle's ops (PyTorch's order: decay, momentum,
/// Nesterov, step), all detached.
pub fn sgd_step(
    w: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    s: &crate::SgdStep,
) -> Result<(Tensor, Option<Tensor>)> {
    let w = w.detach();
    let g = g.detach();
    let mut d = if s.weight_decay != 0.0 {
        (&g + (&w * s.weight_decay)?)?
    } else {
        g
    };
    let mut nb = None;
    if s.momentum != 0.0 {
        let b = match buf {
            Some(b) => ((b.detach() * s.momentum)? + &d)?,
            None => d.clone(),
        };
        d = if s.nesterov {
            (&d + (&b * s.momentum)?)?
        } else {
            b.clone()
        };
        nb = Some(b);
    }
    Ok(((&w - (d * s.lr)?)?, nb))
}
