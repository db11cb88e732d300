//! Pooling layers (max-pool with padding and a correct backward).
//!
//! candle's `max_pool2d` has no padding, a first-order gradient scaled by 1/k², and no backward
//! at all when the kernel differs from the stride (docs/candle.md). [`max_pool2d`] is written
//! from primitives instead:
//!
//! 1. the *selection*: for every output element, the input element its window picks, the
//!    FIRST maximal one in row-major window order, as PyTorch does (ties are common after a
//!    ReLU: all-zero windows), padding never picked; computed on detached values;
//! 2. the output: the selected elements, gathered from the input (`gather` on the flattened
//!    spatial axes). Given the selection this is linear in the input, so it is differentiable
//!    twice, and its gradient is PyTorch's: each output's gradient goes to its selected element,
//!    summed where windows overlap and pick the same one.
//!
//! The selection is a non-smooth decision: the context records it ([`Decision::MaxPool`]) on
//! the base pass of a finite difference and replays it on the perturbed passes, as it does ReLU
//! masks, so that those passes differentiate the same piecewise-linear function.
//!
//! [`adaptive_avg_pool2d`] is PyTorch's `adaptive_avg_pool2d` (bins `⌊i·H/o⌋..⌈(i+1)·H/o⌉`,
//! overlapping when `o` does not divide `H`), separable and linear.

use candle_core::{DType, Tensor};

use crate::ctx::{Ctx, Decision, ReluMode};
use crate::{Error, Result};

/// 2-D max-pool over NCHW input: `kernel`×`kernel` windows, `stride`, `padding` on each side
/// (padding is never selected: it acts as −∞), floor output size, dilation 1 (PyTorch's
/// `MaxPool2d(kernel, stride, padding)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    /// Window side.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Implicit −∞ padding on each side, at most `kernel / 2`.
    pub padding: usize,
}

impl MaxPool2d {
    /// A max-pool; the arguments are checked against the input at the first forward.
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel,
            stride,
            padding,
        }
    }

    /// Forward pass, taking (or recording, or replaying) its selection through `ctx`.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        max_pool2d(x, self.kernel, self.stride, self.padding, ctx)
    }
}

/// Output side of a pooling window sweep (floor mode).
fn out_size(n: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (n + 2 * padding - kernel) / stride + 1
}

/// Checks the arguments against input `x`; returns `(b, c, h, w, oh, ow)`.
fn geometry(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, c, h, w) = x.dims4()?;
    if kernel == 0 || stride == 0 {
        return Err(Error::InvalidConfig(format!(
            "max-pool kernel and stride must be >= 1, got kernel {kernel}, stride {stride}"
        )));
    }
    if 2 * padding > kernel {
        return Err(Error::InvalidConfig(format!(
            "max-pool padding must be at most half the kernel (as in PyTorch), got padding \
             {padding} for kernel {kernel}"
        )));
    }
    if h + 2 * padding < kernel || w + 2 * padding < kernel {
        return Err(Error::InvalidConfig(format!(
            "max-pool kernel {kernel} (padding {padding}) does not fit an input of {h}x{w}"
        )));
    }
    if b * c * h * w > u32::MAX as usize {
        return Err(Error::InvalidConfig(format!(
            "max-pool input of shape {:?} is too large to index with u32",
            x.dims()
        )));
    }
    Ok((
        b,
        c,
        h,
        w,
        out_size(h, kernel, stride, padding),
        out_size(w, kernel, stride, padding),
    ))
}

/// Elements `start, start + stride, ...` (`count` of them) of `x` along `dim`; `x` must have at
/// least `start + count·stride` elements there.
fn strided(x: &Tensor, dim: usize, start: usize, count: usize, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.narrow(dim, start, count)?);
    }
    let mut dims = x.dims().to_vec();
    dims[dim] = count;
    dims.insert(dim + 1, stride);
    Ok(x.narrow(dim, start, count * stride)?
        .reshape(dims)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)?)
}

/// The selection of a max-pool of `x`: a detached `u32` tensor `(b, c, oh, ow)` holding, for
/// each output element, the flat index (row-major over the whole NCHW input) of the input
/// element its window picks: the first maximal one in row-major window order (a NaN wins, as
/// in PyTorch); a window whose elements are all −∞ picks its first element inside the input,
/// as PyTorch does.
pub fn max_pool2d_selection(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, h, w, oh, ow) = geometry(x, kernel, stride, padding)?;
    let (dev, dtype) = (x.device(), x.dtype());
    let p = padding;
    // Pad so that every strided view fits: start (< kernel) + count·stride elements.
    let extra_h = (kernel - 1 + oh * stride).saturating_sub(h + 2 * p);
    let extra_w = (kernel - 1 + ow * stride).saturating_sub(w + 2 * p);
    let (hp, wp) = (h + 2 * p + extra_h, w + 2 * p + extra_w);
    let xd = x.detach();
    let mut xp = xd
        .pad_with_zeros(2, p, p + extra_h)?
        .pad_with_zeros(3, p, p + extra_w)?;
    if (hp, wp) != (h, w) {
        let inside: Vec<u8> = (0..hp * wp)
            .map(|i| {
                let (r, q) = (i / wp, i % wp);
                u8::from((p..p + h).contains(&r) && (p..p + w).contains(&q))
            })
            .collect();
        let inside = Tensor::from_vec(inside, (1, 1, hp, wp), dev)?.broadcast_as(xp.shape())?;
        let neg = Tensor::new(f64::NEG_INFINITY, dev)?
            .to_dtype(dtype)?
            .broadcast_as(xp.shape())?;
        xp = inside.where_cond(&xp, &neg)?;
    }
    let clamp = |v: isize, n: usize| v.clamp(0, n as isize - 1) as usize;
    let mut best: Option<(Tensor, Tensor)> = None;
    for i in 0..kernel {
        let rows = strided(&xp, 2, i, oh, stride)?;
        for j in 0..kernel {
            let view = strided(&rows, 3, j, ow, stride)?;
            // Flat input index of offset (i, j) of every window; padding positions are clamped
            // into the input (never picked unless the whole window is −∞).
            let lin: Vec<u32> = (0..oh * ow)
                .map(|o| {
                    let r = clamp((o / ow * stride + i) as isize - p as isize, h);
                    let q = clamp((o % ow * stride + j) as isize - p as isize, w);
                    (r * w + q) as u32
                })
                .collect();
            let lin = Tensor::from_vec(lin, (1, 1, oh, ow), dev)?.broadcast_as((b, c, oh, ow))?;
            best = Some(match best {
                None => (view.contiguous()?, lin.contiguous()?),
                Some((v, idx)) => {
                    let take = view.gt(&v)?.maximum(&view.ne(&view)?)?;
                    (take.where_cond(&view, &v)?, take.where_cond(&lin, &idx)?)
                }
            });
        }
    }
    let (_, idx) = best.expect("kernel >= 1");
    // From indices within each channel's plane to indices into the whole input.
    let planes: Vec<u32> = (0..(b * c) as u32).map(|i| i * (h * w) as u32).collect();
    let planes = Tensor::from_vec(planes, (b, c, 1, 1), dev)?;
    Ok(idx.broadcast_add(&planes)?.detach())
}

/// The elements of `x` (NCHW) at `selection` (`u32` `(b, c, oh, ow)` flat indices into `x`,
/// as [`max_pool2d_selection`] returns): `(b, c, oh, ow)`. Linear in `x`; its gradient adds
/// each output's gradient to the selected element. Built on `index_select`, whose backward
/// (`index_add`) is differentiable again; candle's `gather` is not (its `scatter_add` backward
/// fails on shapes).
pub fn gather_selected(x: &Tensor, selection: &Tensor) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let (sb, sc, _, _) = selection.dims4()?;
    if (sb, sc) != (b, c) || selection.dtype() != DType::U32 {
        return Err(Error::InvalidConfig(format!(
            "replay mismatch: a recorded max-pool selection of shape {:?} ({:?}) does not fit an \
             input of shape {:?}",
            selection.dims(),
            selection.dtype(),
            x.dims()
        )));
    }
    let flat = x.flatten_all()?;
    Ok(flat
        .index_select(&selection.flatten_all()?, 0)?
        .reshape(selection.shape())?)
}

/// Max-pool of NCHW `x` ([`MaxPool2d`]): the selection is made afresh, or made and recorded, or
/// replayed, as `ctx` says ([`Ctx::max_pool_mode`]); the output gathers the selected elements.
pub fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let (b, c, _, _, oh, ow) = geometry(x, kernel, stride, padding)?;
    let selection = match ctx.max_pool_mode()? {
        ReluMode::Plain => max_pool2d_selection(x, kernel, stride, padding)?,
        ReluMode::Record => {
            let s = max_pool2d_selection(x, kernel, stride, padding)?;
            ctx.record(Decision::MaxPool(s.clone()));
            s
        }
        ReluMode::Replay(s) => {
            if s.dims() != [b, c, oh, ow] {
                return Err(Error::InvalidConfig(format!(
                    "replay mismatch: a recorded max-pool selection of shape {:?} does not fit \
                     the output shape {:?}",
                    s.dims(),
                    [b, c, oh, ow]
                )));
            }
            s
        }
    };
    gather_selected(x, &selection)
}

/// Bins of an adaptive pool of `n` into `o` (PyTorch: `⌊i·n/o⌋..⌈(i+1)·n/o⌉`).
fn adaptive_bins(n: usize, o: usize) -> Vec<(usize, usize)> {
    (0..o)
        .map(|i| {
            let start = i * n / o;
            let end = ((i + 1) * n).div_ceil(o);
            (start, end - start)
        })
        .collect()
}

/// Mean over the adaptive bins of axis `dim`.
fn adaptive_mean(x: &Tensor, dim: usize, o: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    if n == o {
        return Ok(x.clone());
    }
    if n % o == 0 {
        let mut dims = x.dims().to_vec();
        dims[dim] = o;
        dims.insert(dim + 1, n / o);
        return Ok(x.reshape(dims)?.mean(dim + 1)?);
    }
    let parts = adaptive_bins(n, o)
        .into_iter()
        .map(|(start, len)| Ok(x.narrow(dim, start, len)?.mean_keepdim(dim)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, dim)?)
}

/// PyTorch's `adaptive_avg_pool2d(x, (oh, ow))` on NCHW input: the mean of each bin
/// `⌊i·H/oh⌋..⌈(i+1)·H/oh⌉` × `⌊j·W/ow⌋..⌈(j+1)·W/ow⌉` (bins overlap when the output side
/// does not divide the input side; an output larger than the input repeats elements).
/// Separable: rows first, then columns. Linear, differentiable twice.
pub fn adaptive_avg_pool2d(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    x.dims4()?;
    if oh == 0 || ow == 0 {
        return Err(Error::InvalidConfig(format!(
            "adaptive average pool to {oh}x{ow}: output sides must be >= 1"
        )));
    }
    adaptive_mean(&adaptive_mean(x, 2, oh)?, 3, ow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const F64: DType = DType::F64;

    fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen::<f64>() * 2.0 - 1.0).collect()
    }

    fn tensor(v: Vec<f64>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// PyTorch's CPU max-pool as a plain loop: per window, the first element (row-major) that
    /// is greater than the running maximum (or NaN), starting from −∞ at the first in-bounds
    /// element. Returns the output and the flat index picked per output.
    fn brute(
        x: &[f64],
        (b, c, h, w): (usize, usize, usize, usize),
        k: usize,
        s: usize,
        p: usize,
    ) -> (Vec<f64>, Vec<usize>) {
        let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
        let (mut out, mut arg) = (Vec::new(), Vec::new());
        for n in 0..b * c {
            let plane = &x[n * h * w..(n + 1) * h * w];
            for oi in 0..oh {
                for oj in 0..ow {
                    let hs = (oi * s) as isize - p as isize;
                    let ws = (oj * s) as isize - p as isize;
                    let (h0, w0) = (hs.max(0) as usize, ws.max(0) as usize);
                    let h1 = ((hs + k as isize) as usize).min(h);
                    let w1 = ((ws + k as isize) as usize).min(w);
                    let (mut best, mut at) = (f64::NEG_INFINITY, h0 * w + w0);
                    for r in h0..h1 {
                        for q in w0..w1 {
                            let v = plane[r * w + q];
                            if v > best || v.is_nan() {
                                best = v;
                                at = r * w + q;
                            }
                        }
                    }
                    out.push(plane[at]);
                    arg.push(at);
                }
            }
        }
        (out, arg)
    }

    /// Σ u·maxpool(x): value and gradient with respect to x, by the implementation.
    fn value_and_grad(
        x: &Tensor,
        u: &Tensor,
        k: usize,
        s: usize,
        p: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let xv = Var::from_tensor(x).unwrap();
        let y = max_pool2d(xv.as_tensor(), k, s, p, &mut Ctx::train()).unwrap();
        let g = (&y * u).unwrap().sum_all().unwrap().backward().unwrap();
        (flat(&y), flat(g.get(xv.as_tensor()).unwrap()))
    }

    const CASES: [(usize, usize, usize, usize, usize); 7] = [
        // (h, w, kernel, stride, padding)
        (9, 9, 3, 2, 1),
        (8, 7, 3, 2, 1),
        (6, 6, 2, 2, 0),
        (7, 5, 3, 1, 1),
        (9, 8, 3, 3, 0),
        (5, 6, 4, 3, 2),
        (4, 4, 1, 1, 0),
    ];

    #[test]
    fn values_and_gradients_match_a_brute_force_loop() {
        for (ci, &(h, w, k, s, p)) in CASES.iter().enumerate() {
            let (b, c) = (2, 3);
            // Coarse values: many ties, as after a ReLU (zeros) and quantised activations.
            let xs: Vec<f64> = rand_vec(b * c * h * w, ci as u64)
                .into_iter()
                .map(|v| (v * 3.0).round().max(0.0))
                .collect();
            let x = tensor(xs.clone(), &[b, c, h, w]);
            let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
            let us = rand_vec(b * c * oh * ow, 100 + ci as u64);
            let u = tensor(us.clone(), &[b, c, oh, ow]);
            let (y, g) = value_and_grad(&x, &u, k, s, p);
            let (want_y, arg) = brute(&xs, (b, c, h, w), k, s, p);
            assert_eq!(y, want_y, "case {ci}: values");
            let mut want_g = vec![0.0; xs.len()];
            for (o, &a) in arg.iter().enumerate() {
                let plane = o / (oh * ow);
                want_g[plane * h * w + a] += us[o];
            }
            for (i, (a, e)) in g.iter().zip(&want_g).enumerate() {
                assert!((a - e).abs() < 1e-12, "case {ci}: grad[{i}] {a} vs {e}");
            }
            let sel = max_pool2d_selection(&x, k, s, p).unwrap();
            let sel: Vec<u32> = sel.flatten_all().unwrap().to_vec1().unwrap();
            let want_sel: Vec<usize> = arg
                .iter()
                .enumerate()
                .map(|(o, &a)| o / (oh * ow) * h * w + a)
                .collect();
            assert_eq!(
                sel.iter().map(|&v| v as usize).collect::<Vec<_>>(),
                want_sel,
                "case {ci}: selections"
            );
        }
    }

    #[test]
    fn gradient_matches_central_finite_differences() {
        for (ci, &(h, w, k, s, p)) in CASES.iter().enumerate() {
            let (b, c) = (2, 2);
            let xs = rand_vec(b * c * h * w, 10 + ci as u64);
            let x = tensor(xs.clone(), &[b, c, h, w]);
            let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
            let u = tensor(rand_vec(b * c * oh * ow, 20 + ci as u64), &[b, c, oh, ow]);
            let (_, g) = value_and_grad(&x, &u, k, s, p);
            let f = |v: Vec<f64>| {
                let y = max_pool2d(&tensor(v, &[b, c, h, w]), k, s, p, &mut Ctx::eval()).unwrap();
                (&y * &u)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let eps = 1e-6;
            for i in 0..xs.len() {
                let mut a = xs.clone();
                a[i] += eps;
                let mut m = xs.clone();
                m[i] -= eps;
                let fd = (f(a) - f(m)) / (2.0 * eps);
                assert!(
                    (fd - g[i]).abs() < 1e-8,
                    "case {ci}: grad[{i}] {} vs FD {fd}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn ties_route_to_the_first_element_as_pytorch() {
        // All-zero input (a dead ReLU): every window picks its first in-bounds element.
        let x = Tensor::zeros((1, 1, 4, 4), F64, &Device::Cpu).unwrap();
        let sel = max_pool2d_selection(&x, 3, 2, 1).unwrap();
        // Windows start at rows/cols -1 and 1: first in-bounds elements (0,0), (0,1), (1,0), (1,1).
        assert_eq!(
            sel.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            [0, 1, 4, 5]
        );
        let u = Tensor::ones((1, 1, 2, 2), F64, &Device::Cpu).unwrap();
        let (_, g) = value_and_grad(&x, &u, 3, 2, 1);
        let mut want = vec![0.0; 16];
        for i in [0, 1, 4, 5] {
            want[i] = 1.0;
        }
        assert_eq!(g, want);
        // A tie between two maxima: the one first in row-major order wins.
        let mut v = vec![0.0; 9];
        v[5] = 2.0; // (1, 2)
        v[6] = 2.0; // (2, 0)
        let x = tensor(v, &[1, 1, 3, 3]);
        let sel = max_pool2d_selection(&x, 3, 1, 0).unwrap();
        assert_eq!(sel.flatten_all().unwrap().to_vec1::<u32>().unwrap(), [5]);
        // -inf everywhere: the first in-bounds element, value -inf.
        let x = tensor(vec![f64::NEG_INFINITY; 4], &[1, 1, 2, 2]);
        let y = max_pool2d(&x, 3, 2, 1, &mut Ctx::eval()).unwrap();
        assert_eq!(flat(&y), [f64::NEG_INFINITY]);
    }

    #[test]
    fn replay_reproduces_the_recorded_selections() {
        let (b, c, h, w) = (2, 3, 9, 9);
        let x = tensor(rand_vec(b * c * h * w, 3), &[b, c, h, w]);
        let mut rec = Ctx::train_recording();
        let r0 = rec.relu(&x).unwrap();
        let y0 = max_pool2d(&r0, 3, 2, 1, &mut rec).unwrap();
        let tape = rec.take_masks();
        assert_eq!(tape.len(), 2);
        assert!(matches!(tape[1], Decision::MaxPool(_)));
        // A perturbation large enough to change the maxima; the replay keeps the selections.
        let x2 = (&x + tensor(rand_vec(b * c * h * w, 4), &[b, c, h, w])).unwrap();
        let mut rep = Ctx::train_replaying(tape.clone());
        let r2 = rep.relu(&x2).unwrap();
        let y2 = max_pool2d(&r2, 3, 2, 1, &mut rep).unwrap();
        assert_eq!(rep.replay_position(), Some(2));
        let want = gather_selected(&r2, tape[1].mask()).unwrap();
        assert_eq!(flat(&y2), flat(&want));
        let fresh = max_pool2d(&r2, 3, 2, 1, &mut Ctx::train()).unwrap();
        assert_ne!(
            flat(&y2),
            flat(&fresh),
            "the perturbation changes some maxima"
        );
        // Replaying at the base point reproduces the base output exactly.
        let mut again = Ctx::train_replaying(tape.clone());
        let r = again.relu(&x).unwrap();
        assert_eq!(
            flat(&max_pool2d(&r, 3, 2, 1, &mut again).unwrap()),
            flat(&y0)
        );
        // A replay whose pass asks for decisions in another order, or of another shape, fails.
        let mut wrong = Ctx::train_replaying(tape.clone());
        let e = max_pool2d(&x, 3, 2, 1, &mut wrong).unwrap_err().to_string();
        assert!(e.contains("replay mismatch"), "{e}");
        let mut wrong = Ctx::train_replaying(tape);
        wrong.relu(&x).unwrap();
        let e = max_pool2d(&x, 2, 2, 0, &mut wrong).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    #[cfg(feature = "second-order")]
    fn differentiates_twice() {
        // L = Σ u·maxpool(x)²: ∂L/∂x_j = Σ_{o picks j} 2 u_o y_o, and the gradient of
        // (∂L/∂x)·v is Σ_{o picks j} 2 u_o v_j (a diagonal Hessian).
        let (b, c, h, w, k, s, p) = (1, 2, 7, 7, 3, 2, 1);
        let xs = rand_vec(b * c * h * w, 5);
        let (oh, ow) = (out_size(h, k, s, p), out_size(w, k, s, p));
        let us = rand_vec(b * c * oh * ow, 6);
        let vs = rand_vec(xs.len(), 7);
        let got = crate::autograd::with_second_order(|| {
            let xv = Var::from_tensor(&tensor(xs.clone(), &[b, c, h, w]))?;
            let u = tensor(us.clone(), &[b, c, oh, ow]);
            let y = max_pool2d(xv.as_tensor(), k, s, p, &mut Ctx::train())?;
            let g1 = (y.sqr()? * &u)?.sum_all()?.backward()?;
            let gx = g1.get(xv.as_tensor()).expect("grad").clone();
            let v = tensor(vs.clone(), &[b, c, h, w]);
            let g2 = (gx * v)?.sum_all()?.backward()?;
            Ok(flat(g2.get(xv.as_tensor()).expect("second-order grad")))
        })
        .unwrap();
        let (_, arg) = brute(&xs, (b, c, h, w), k, s, p);
        let mut want = vec![0.0; xs.len()];
        for (o, &a) in arg.iter().enumerate() {
            let j = o / (oh * ow) * h * w + a;
            want[j] += 2.0 * us[o] * vs[j];
        }
        for (i, (a, e)) in got.iter().zip(&want).enumerate() {
            assert!((a - e).abs() < 1e-12, "H·v[{i}] {a} vs {e}");
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let x = Tensor::zeros((1, 1, 4, 4), F64, &Device::Cpu).unwrap();
        let mut ctx = Ctx::eval();
        assert!(max_pool2d(&x, 3, 2, 2, &mut ctx).is_err());
        assert!(max_pool2d(&x, 0, 1, 0, &mut ctx).is_err());
        assert!(max_pool2d(&x, 3, 0, 0, &mut ctx).is_err());
        assert!(max_pool2d(&x, 5, 1, 0, &mut ctx).is_err());
        assert!(adaptive_avg_pool2d(&x, 0, 1).is_err());
    }

    #[test]
    fn adaptive_average_pool_matches_pytorch_bins() {
        for &(h, w, oh, ow) in &[
            (14, 14, 4, 4),
            (7, 7, 2, 2),
            (1, 1, 2, 2),
            (8, 6, 2, 3),
            (5, 7, 1, 1),
            (6, 9, 6, 4),
        ] {
            let (b, c) = (2, 3);
            let xs = rand_vec(b * c * h * w, (h * 31 + w) as u64);
            let x = tensor(xs.clone(), &[b, c, h, w]);
            let y = flat(&adaptive_avg_pool2d(&x, oh, ow).unwrap());
            let mut want = Vec::new();
            for n in 0..b * c {
                for i in 0..oh {
                    let (r0, r1) = (i * h / oh, ((i + 1) * h).div_ceil(oh));
                    for j in 0..ow {
                        let (q0, q1) = (j * w / ow, ((j + 1) * w).div_ceil(ow));
                        let mut sum = 0.0;
                        for r in r0..r1 {
                            for q in q0..q1 {
                                sum += xs[n * h * w + r * w + q];
                            }
                        }
                        want.push(sum / ((r1 - r0) * (q1 - q0)) as f64);
                    }
                }
            }
            assert_eq!(y.len(), want.len());
            for (a, e) in y.iter().zip(&want) {
                assert!((a - e).abs() < 1e-12, "{h}x{w} -> {oh}x{ow}: {a} vs {e}");
            }
        }
    }
}
