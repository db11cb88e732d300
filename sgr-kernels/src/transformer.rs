//! The Transformer ops as candle custom ops: a linear layer with its bias, LayerNorm, the exact
//! GELU and multi-head attention.
//!
//! Their point is what they keep for backward. candle keeps every operand of every op until the
//! backward pass ends, so a composition of small ops holds all its intermediates (a LayerNorm
//! five token-sized tensors, a GELU six hidden-sized ones, attention four `B·H·N·N` score
//! tensors). Each op here keeps only its operands and its output, plus a few numbers per row
//! (LayerNorm's mean and 1/σ, attention's log-sum-exp), and recomputes the rest in backward.
//!
//! The linear layer's backward is written with candle's matmul and sum, so it differentiates
//! twice. LayerNorm, GELU and attention are first order only: their backward refuses a gradient
//! that is itself being differentiated, and callers that differentiate twice use the
//! [`generic`] compositions.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use crate::attention::{self, AttnGeom};
use crate::cpu::{self, Real, Strided};
use crate::{fast, for_grad, generic, slice, token, wanted};

/// The error of a first-order op asked for a differentiable gradient.
fn first_order_only(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op} is first-order only; use sgr_kernels::generic's version when differentiating twice"
    ))
}

/// The error of an op whose saved per-row numbers were poisoned by a panic in another thread.
fn poisoned(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: the forward's saved statistics were lost to a panic"
    ))
}

/// `(rows, last)`: the leading axes of `dims` flattened, and the last.
fn rows_last(dims: &[usize], op: &str) -> candle_core::Result<(usize, usize)> {
    match dims.split_last() {
        Some((&last, lead)) => Ok((lead.iter().product(), last)),
        None => candle_core::bail!("{op}: a tensor of rank ≥ 1 expected, got a scalar"),
    }
}

/// The parallelism candle's matmul gives gemm, so that the fused linear layer rounds as it does.
fn candle_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        threads if threads > 1 => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// `y = x·Wᵀ + b` on `(rows, cin)`.
struct LinearFwd;

fn run_linear<T: Real>(x: &[T], w: &[T], b: &[T], rows: usize, cin: usize) -> Vec<T> {
    let cout = b.len();
    let parallelism = candle_parallelism();
    // SAFETY: the gemm writes every element of the rows × cout output; x is rows × cin and
    // w is cout × cin, read as Wᵀ through its strides.
    let mut y = unsafe {
        cpu::alloc_filled(rows * cout, |y| {
            cpu::gemm_in(
                (rows, cout, cin),
                Strided(y.as_mut_ptr().cast::<T>(), cout, 1),
                Strided(x.as_ptr(), cin, 1),
                Strided(w.as_ptr(), 1, cin),
                false,
                T::ONE,
                parallelism,
            )
        })
    };
    token::add_bias_rows(&mut y, b);
    y
}

impl CustomOp3 for LinearFwd {
    fn name(&self) -> &'static str {
        "sgr-linear"
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
        let (rows, cin) = l1.shape().dims2()?;
        let (cout, wcin) = l2.shape().dims2()?;
        if wcin != cin || l3.dims() != [cout] {
            candle_core::bail!(
                "sgr-linear: input {:?}, weight {:?} and bias {:?} do not match",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let out = with_slices!(
            self.name(),
            [(s1, l1, x), (s2, l2, w), (s3, l3, b)],
            run_linear(x, w, b, rows, cin)
        );
        Ok((out, Shape::from((rows, cout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // candle's matmuls, differentiable again. The weight gradient is computed as `gᵀ·x`,
        // contiguous `(cout, cin)` (candle's `(xᵀ·g)ᵀ` is a transposed view that the gradient
        // store copies on one thread). The bias gradient is candle's (single-threaded, strided)
        // sum only when it must differentiate again; otherwise the same sums, column blocks in
        // parallel.
        let db = || {
            if grad.track_op() {
                grad.sum(0)
            } else {
                let (rows, d) = grad.dims2()?;
                grad.contiguous()?
                    .reshape((rows, d, 1))?
                    .apply_op1_no_bwd(&ChannelSums { inner: 1 })
            }
        };
        if !grad.track_op() {
            // First order: the same gemm calls as candle's matmul, into outputs that are not
            // zero-filled first.
            let (g, xd, wd) = (grad.contiguous()?, x.detach(), w.detach());
            return Ok((
                wanted(x, || g.apply_op2_no_bwd(&wd, &LinearGrad::Input))?,
                wanted(w, || g.apply_op2_no_bwd(&xd, &LinearGrad::Weight))?,
                wanted(b, db)?,
            ));
        }
        let (xd, wd) = (for_grad(x, grad), for_grad(w, grad));
        Ok((
            wanted(x, || grad.matmul(&wd))?,
            wanted(w, || grad.t()?.matmul(&xd))?,
            wanted(b, db)?,
        ))
    }
}

/// A first-order gradient of the linear layer from `g` `(rows, cout)`: `Input` is `g·W` with
/// operand `W` `(cout, cin)`, `Weight` is `gᵀ·x` with operand `x` `(rows, cin)`.
enum LinearGrad {
    Input,
    Weight,
}

impl CustomOp2 for LinearGrad {
    fn name(&self) -> &'static str {
        match self {
            LinearGrad::Input => "sgr-linear-input-grad",
            LinearGrad::Weight => "sgr-linear-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cout) = l1.shape().dims2()?;
        let (a, cin) = l2.shape().dims2()?;
        let want = match self {
            LinearGrad::Input => cout,
            LinearGrad::Weight => rows,
        };
        if a != want {
            candle_core::bail!(
                "{}: gradient {:?} and operand {:?} do not match",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let (m, k) = match self {
            LinearGrad::Input => (rows, cout),
            LinearGrad::Weight => (cout, rows),
        };
        let out = with_slices!(self.name(), [(s1, l1, g), (s2, l2, o)], {
            // The gradient's strides: g itself, or gᵀ.
            let gs = match self {
                LinearGrad::Input => (cout, 1),
                LinearGrad::Weight => (1, cout),
            };
            // SAFETY: the gemm writes every element of the m × cin output; g is rows × cout
            // and the operand a × cin, both contiguous, read through the strides above.
            unsafe {
                cpu::alloc_filled(m * cin, |y| {
                    cpu::gemm_in(
                        (m, cin, k),
                        Strided(y.as_mut_ptr().cast(), cin, 1),
                        Strided(g.as_ptr(), gs.0, gs.1),
                        Strided(o.as_ptr(), cin, 1),
                        false,
                        Real::ONE,
                        candle_parallelism(),
                    )
                })
            }
        });
        Ok((out, Shape::from((m, cin))))
    }
}

/// `x + b` on `x` viewed as `(outer, c, inner)` and `b` as `(c,)`.
struct AddBias {
    outer: usize,
    inner: usize,
}

impl AddBias {
    /// `c`, the length of the bias.
    fn channels(&self, l: &Layout) -> usize {
        l.shape().elem_count() / (self.outer * self.inner).max(1)
    }
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "sgr-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = self.channels(l1);
        if l2.dims() != [c] || self.outer * c * self.inner != l1.shape().elem_count() {
            candle_core::bail!(
                "sgr-add-bias: input {:?} and bias {:?} do not match",
                l1.dims(),
                l2.dims()
            );
        }
        let out = with_slices!(self.name(), [(s1, l1, x), (s2, l2, b)], {
            let mut y = x.to_vec();
            token::add_channel_bias(&mut y, b, self.inner);
            y
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // As the linear layer's bias: candle's sum when the gradient is differentiated again,
        // otherwise the same sums in the same order, channels in parallel.
        let c = b.dim(0)?;
        let db = || {
            let g = grad.reshape((self.outer, c, self.inner))?;
            if grad.track_op() {
                g.sum_keepdim(&[0usize, 2][..])?.reshape(c)
            } else {
                g.contiguous()?
                    .apply_op1_no_bwd(&ChannelSums { inner: self.inner })
            }
        };
        Ok((wanted(x, || Ok(grad.clone()))?, wanted(b, db)?))
    }
}

/// The sums of a `(outer, c, inner)` tensor over its first and last axes, `(c,)`.
struct ChannelSums {
    inner: usize,
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "sgr-channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, c, _) = l.shape().dims3()?;
        let out = with_slices!(self.name(), [(s, l, g)], {
            // SAFETY: channel_sums writes all c outputs.
            unsafe { cpu::alloc_filled(c, |o| token::channel_sums(g, c, self.inner, o)) }
        });
        Ok((out, Shape::from(c)))
    }
}

/// `(outer, c, inner)` for `x + b` when `b`'s axes other than size 1 (its shape aligned to the
/// right of `x`'s) are one run of consecutive axes equal to `x`'s; `None` otherwise.
fn bias_geometry(x: &[usize], b: &[usize]) -> Option<(usize, usize, usize)> {
    if b.len() > x.len() {
        return None;
    }
    let pad = x.len() - b.len();
    let big: Vec<usize> = (0..b.len())
        .filter(|&i| b[i] != 1)
        .map(|i| i + pad)
        .collect();
    let (&lo, &hi) = (big.first()?, big.last()?);
    if big.len() != hi - lo + 1 || big.iter().any(|&i| x[i] != b[i - pad]) {
        return None;
    }
    let p = |r: &[usize]| r.iter().product::<usize>();
    Some((p(&x[..lo]), p(&x[lo..=hi]), p(&x[hi + 1..])))
}

/// `x + b` with `b` broadcast to `x` (`broadcast_add`), where `b`'s axes other than size 1 are
/// consecutive: a ViT's position embeddings `(1, N, D)` on tokens `(B, N, D)`, a convolution's
/// bias `(1, C, 1, 1)` on `(B, C, H, W)`. The values and gradients of `broadcast_add`, bit for
/// bit, but `b`'s gradient is summed in parallel over its elements (candle sums a broadcast
/// operand's gradient on one thread, with a division per element and axis); twice
/// differentiable. Other shapes, devices and dtypes: `broadcast_add`.
pub fn add_bias(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let Some((outer, c, inner)) = bias_geometry(x.dims(), b.dims()) else {
        return x.broadcast_add(b);
    };
    if !fast(&[x, b]) {
        return x.broadcast_add(b);
    }
    let b1 = b.contiguous()?.reshape(c)?;
    let x = x.contiguous()?;
    let op = AddBias { outer, inner };
    if x.track_op() || b1.track_op() {
        x.apply_op2(&b1, op)
    } else {
        x.apply_op2_no_bwd(&b1, &op)
    }
}

/// `x·Wᵀ + b` over the last axis of `x` (`(..., cin)`, `w` `(cout, cin)`, `b` `(cout,)`): one op
/// that keeps `x`, `W`, `b` and its output, where `matmul` + `broadcast_add` keeps the product
/// as well. Same values and gradients as that composition, and twice differentiable. Off the
/// fast path: [`generic::linear`].
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !fast(&[x, w, b]) {
        return generic::linear(x, w, b);
    }
    let (rows, cin) = rows_last(x.dims(), "linear")?;
    let x2 = x.contiguous()?.reshape((rows, cin))?;
    let (w, b) = (w.contiguous()?, b.contiguous()?);
    let y = if x2.track_op() || w.track_op() || b.track_op() {
        x2.apply_op3(&w, &b, LinearFwd)?
    } else {
        x2.apply_op3_no_bwd(&w, &b, &LinearFwd)?
    };
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(dims)
}

/// LayerNorm over the last axis: operands `(x, γ, β)`. The forward leaves each row's mean and
/// 1/σ in `stats` for the backward.
struct LnFwd {
    eps: f64,
    stats: Mutex<Vec<f64>>,
}

/// LayerNorm's backward: operands `(g, x, γ)`; output `[dx; dγ; dβ]` flattened into one
/// buffer (one pass over the rows computes all three).
struct LnGrad {
    stats: Vec<f64>,
}

impl CustomOp3 for LnFwd {
    fn name(&self) -> &'static str {
        "sgr-layer-norm"
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
        let (rows, d) = rows_last(l1.dims(), self.name())?;
        if l2.dims() != [d] || l3.dims() != [d] {
            candle_core::bail!(
                "sgr-layer-norm: input {:?} needs γ and β of shape [{d}], got {:?} and {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let mut stats = vec![0.0; 2 * rows];
        let out = with_slices!(
            self.name(),
            [(s1, l1, x), (s2, l2, gamma), (s3, l3, beta)],
            // SAFETY: layer_norm_forward writes every output element.
            unsafe {
                cpu::alloc_filled(x.len(), |y| {
                    token::layer_norm_forward(x, d, gamma, beta, self.eps, y, &mut stats)
                })
            }
        );
        *self.stats.lock().map_err(|_| poisoned(self.name()))? = stats;
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
            return Err(first_order_only(self.name()));
        }
        let stats = self
            .stats
            .lock()
            .map_err(|_| poisoned(self.name()))?
            .clone();
        let (rows, d) = rows_last(x.dims(), self.name())?;
        let all = grad
            .contiguous()?
            .apply_op3_no_bwd(x, gamma, &LnGrad { stats })?;
        let n = rows * d;
        let dx = wanted(x, || all.narrow(0, 0, n)?.reshape(x.shape()))?;
        // Copies: a view would keep the whole buffer alive in the gradient store.
        let dgamma = all.narrow(0, n, d)?.copy()?;
        let dbeta = all.narrow(0, n + d, d)?.copy()?;
        Ok((dx, Some(dgamma), Some(dbeta)))
    }
}

impl CustomOp3 for LnGrad {
    fn name(&self) -> &'static str {
        "sgr-layer-norm-grad"
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
        let (rows, d) = rows_last(l2.dims(), self.name())?;
        if l1.shape() != l2.shape() || l3.dims() != [d] || self.stats.len() != 2 * rows {
            candle_core::bail!("sgr-layer-norm-grad: operand shapes do not match");
        }
        let n = rows * d;
        let out = with_slices!(
            self.name(),
            [(s1, l1, g), (s2, l2, x), (s3, l3, gamma)],
            // SAFETY: layer_norm_backward writes all n elements of dx and 2d of [dγ; dβ].
            unsafe {
                cpu::alloc_filled(n + 2 * d, |o| {
                    let (dx, dgb) = o.split_at_mut(n);
                    token::layer_norm_backward(g, x, gamma, &self.stats, d, dx, dgb)
                })
            }
        );
        Ok((out, Shape::from(n + 2 * d)))
    }
}

/// LayerNorm over the last axis of `x`, `(x − μ)/√(σ² + ε)·γ + β` with the biased variance
/// (PyTorch's `nn.LayerNorm`). Keeps `x`, `γ`, `β`, its output and two numbers per row. First
/// order only. Off the fast path: [`generic::layer_norm`].
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if !fast(&[x, gamma, beta]) {
        return generic::layer_norm(x, gamma, beta, eps);
    }
    let (x, gamma, beta) = (x.contiguous()?, gamma.contiguous()?, beta.contiguous()?);
    let op = LnFwd {
        eps,
        stats: Mutex::new(Vec::new()),
    };
    if x.track_op() || gamma.track_op() || beta.track_op() {
        x.apply_op3(&gamma, &beta, op)
    } else {
        x.apply_op3_no_bwd(&gamma, &beta, &op)
    }
}

/// The exact GELU, `x·Φ(x)`.
struct Gelu;

/// GELU's input gradient: operands `(g, x)`.
struct GeluGrad;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "sgr-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = with_slices!(self.name(), [(s, l, x)], {
            // SAFETY: gelu writes every output element.
            unsafe { cpu::alloc_filled(x.len(), |y| token::gelu(x, y)) }
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if grad.track_op() {
            return Err(first_order_only(self.name()));
        }
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(x, &GeluGrad)?))
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "sgr-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("sgr-gelu-grad: shape mismatch");
        }
        let out = with_slices!(self.name(), [(s1, l1, g), (s2, l2, x)], {
            // SAFETY: gelu_backward writes every output element.
            unsafe { cpu::alloc_filled(g.len(), |d| token::gelu_backward(g, x, d)) }
        });
        Ok((out, l1.shape().clone()))
    }
}

/// The exact GELU, `x·Φ(x) = x/2·(1 + erf(x/√2))` (PyTorch's `nn.GELU()`), in one pass that
/// keeps only `x` and its output. First order only. Off the fast path: [`generic::gelu`].
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fast(&[x]) {
        return generic::gelu(x);
    }
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(Gelu)
    } else {
        x.apply_op1_no_bwd(&Gelu)
    }
}

/// Attention on a packed `(B, N, 3C)` input; the forward leaves each softmax row's log-sum-exp
/// in `lse` for the backward.
struct AttnFwd {
    heads: usize,
    scale: f64,
    lse: Mutex<Vec<f64>>,
}

/// Attention's backward: operands `(qkv, out, g)`; output the packed input's gradient.
struct AttnGrad {
    heads: usize,
    scale: f64,
    lse: Vec<f64>,
}

/// The geometry of a packed `(B, N, 3C)` input with `heads` heads.
fn attn_geom(dims: &[usize], heads: usize, op: &str) -> candle_core::Result<AttnGeom> {
    let [b, n, c3] = dims else {
        candle_core::bail!("{op}: a packed (batch, tokens, 3·width) input expected, got {dims:?}");
    };
    if heads == 0 || c3 % (3 * heads) != 0 {
        candle_core::bail!(
            "{op}: the packed width {c3} is not 3 × a multiple of the {heads} heads"
        );
    }
    Ok(AttnGeom {
        b: *b,
        n: *n,
        heads,
        hd: c3 / (3 * heads),
    })
}

impl CustomOp1 for AttnFwd {
    fn name(&self) -> &'static str {
        "sgr-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = attn_geom(l.dims(), self.heads, self.name())?;
        let mut lse = vec![0.0; g.rows()];
        let out = with_slices!(self.name(), [(s, l, x)], {
            // SAFETY: attention_forward writes every output element.
            unsafe {
                cpu::alloc_filled(g.out_len(), |o| {
                    let scale = Real::from_f64(self.scale);
                    attention::attention_forward(&g, x, scale, o, &mut lse)
                })
            }
        });
        *self.lse.lock().map_err(|_| poisoned(self.name()))? = lse;
        Ok((out, Shape::from((g.b, g.n, g.c()))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if grad.track_op() {
            return Err(first_order_only(self.name()));
        }
        let lse = self.lse.lock().map_err(|_| poisoned(self.name()))?.clone();
        let op = AttnGrad {
            heads: self.heads,
            scale: self.scale,
            lse,
        };
        Ok(Some(qkv.apply_op3_no_bwd(res, &grad.contiguous()?, &op)?))
    }
}

impl CustomOp3 for AttnGrad {
    fn name(&self) -> &'static str {
        "sgr-attention-grad"
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
        let g = attn_geom(l1.dims(), self.heads, self.name())?;
        let out_dims = [g.b, g.n, g.c()];
        if l2.dims() != out_dims || l3.dims() != out_dims || self.lse.len() != g.rows() {
            candle_core::bail!("sgr-attention-grad: operand shapes do not match");
        }
        let out = with_slices!(self.name(), [(s1, l1, q), (s2, l2, o), (s3, l3, go)], {
            // SAFETY: attention_backward writes every element of the packed gradient.
            unsafe {
                cpu::alloc_filled(g.qkv_len(), |d| {
                    let scale = Real::from_f64(self.scale);
                    attention::attention_backward(&g, q, o, go, scale, &self.lse, d)
                })
            }
        });
        Ok((out, l1.shape().clone()))
    }
}

/// Multi-head scaled dot-product attention, `softmax(scale·q·kᵀ)·v` per head, on the packed
/// output of a `qkv` projection, `(B, N, 3C)` (timm's layout: q, k, v, each head-major), with
/// the heads merged in the `(B, N, C)` output. Keeps only its input, its output and one number
/// per softmax row: the `B·H·N·N` probabilities are recomputed in backward, one head at a
/// time. First order only, no dropout on the probabilities. Off the fast path:
/// [`generic::attention`].
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> candle_core::Result<Tensor> {
    attn_geom(qkv.dims(), heads, "attention")?;
    if !fast(&[qkv]) {
        return generic::attention(qkv, heads, scale);
    }
    let qkv = qkv.contiguous()?;
    let op = AttnFwd {
        heads,
        scale,
        lse: Mutex::new(Vec::new()),
    };
    if qkv.track_op() {
        qkv.apply_op1(op)
    } else {
        qkv.apply_op1_no_bwd(&op)
    }
}
