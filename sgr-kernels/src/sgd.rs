//! One SGD update of one parameter (PyTorch's `torch.optim.SGD`: L2 weight decay added to the
//! gradient, momentum, Nesterov) in one parallel pass, where the composition of candle's ops
//! makes up to eight passes over the parameter, four of them (the scalar products) on one
//! thread. Each element is rounded as that composition rounds it, operation by operation, so
//! the two give the same values.

use rayon::prelude::*;

use candle_core::{DType, Layout, Storage, Tensor, WithDType};

use std::mem::MaybeUninit;

use crate::cpu::{self, Real};
use crate::{fast, slice};

/// Elements per task.
const BLOCK: usize = 1 << 14;

/// A block of an output being written.
type Out<'a, T> = &'a mut [MaybeUninit<T>];

/// The coefficients of an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f64,
    /// Momentum coefficient; 0 keeps no buffer.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient (0: none).
    pub weight_decay: f64,
}

/// `x·c` as candle's `Tensor * f64` computes it (`affine(c, 0)`: `x·c + 0`).
fn scaled<T: Real>(x: T, c: T) -> T {
    x * c + T::ZERO
}

/// One element: the new weight and the new momentum buffer.
fn update<T: Real>(w: T, g: T, buf: Option<T>, k: &[T; 3], s: &SgdStep) -> (T, T) {
    let [lr, m, wd] = *k;
    let mut d = if s.weight_decay != 0.0 {
        g + scaled(w, wd)
    } else {
        g
    };
    let mut nb = d;
    if s.momentum != 0.0 {
        nb = match buf {
            Some(b) => scaled(b, m) + d,
            None => d,
        };
        d = if s.nesterov { d + scaled(nb, m) } else { nb };
    }
    (w - scaled(d, lr), nb)
}

fn run<T: Real>(w: &[T], g: &[T], buf: Option<&[T]>, s: &SgdStep) -> (Vec<T>, Vec<T>) {
    let k = [
        T::from_f64(s.lr),
        T::from_f64(s.momentum),
        T::from_f64(s.weight_decay),
    ];
    let keep = s.momentum != 0.0;
    let go = |(i, (ow, ob)): (usize, (Out<'_, T>, Out<'_, T>))| {
        let lo = i * BLOCK;
        for j in 0..ow.len() {
            let (a, b) = update(w[lo + j], g[lo + j], buf.map(|b| b[lo + j]), &k, s);
            ow[j].write(a);
            if keep {
                ob[j].write(b);
            }
        }
    };
    let n = w.len();
    // SAFETY: the pass below writes every element of both outputs (of the buffer only with
    // momentum, which is empty otherwise).
    unsafe {
        let mut nb = Vec::new();
        let nw = cpu::alloc_filled(n, |nw| {
            if keep {
                nb = cpu::alloc_filled(n, |nb| {
                    nw.par_chunks_mut(BLOCK)
                        .zip(nb.par_chunks_mut(BLOCK))
                        .enumerate()
                        .for_each(go)
                });
            } else {
                nw.par_chunks_mut(BLOCK)
                    .enumerate()
                    .for_each(|(i, ow)| go((i, (ow, &mut []))));
            }
        });
        (nw, nb)
    }
}

/// One SGD update of the weight `w` with gradient `g` and momentum buffer `buf` (`None` on the
/// first step, when the buffer starts as the decayed gradient): the new weight and, with
/// momentum, the new buffer, both detached. Off the fast path (other devices or dtypes, or
/// operands of different shapes): [`crate::generic::sgd_step`], the composition of candle's ops.
pub fn sgd_step(
    w: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    s: &SgdStep,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let mut all = vec![w, g];
    all.extend(buf);
    if !fast(&all) || g.shape() != w.shape() || buf.is_some_and(|b| b.shape() != w.shape()) {
        return crate::generic::sgd_step(w, g, buf, s);
    }
    let (w, g) = (w.detach().contiguous()?, g.detach().contiguous()?);
    let buf = buf.map(|b| b.detach().contiguous()).transpose()?;
    match w.dtype() {
        DType::F32 => on_cpu::<f32>(&w, &g, buf.as_ref(), s),
        _ => on_cpu::<f64>(&w, &g, buf.as_ref(), s),
    }
}

/// The CPU data of a contiguous tensor of element type `T`.
fn data<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [T]> {
    match storage {
        Storage::Cpu(c) => slice(c.as_slice::<T>()?, layout, "sgd_step"),
        _ => candle_core::bail!("sgd_step: CPU tensors expected"),
    }
}

fn on_cpu<T: Real + WithDType>(
    w: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    s: &SgdStep,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let (nw, nb) = {
        let (gw, gg) = (w.storage_and_layout(), g.storage_and_layout());
        let gb = buf.map(|b| b.storage_and_layout());
        let b = gb.as_ref().map(|(s, l)| data::<T>(s, l)).transpose()?;
        run(data::<T>(&gw.0, gw.1)?, data::<T>(&gg.0, gg.1)?, b, s)
    };
    let nw = Tensor::from_vec(nw, w.shape(), w.device())?;
    let nb = if s.momentum != 0.0 {
        Some(Tensor::from_vec(nb, w.shape(), w.device())?)
    } else {
        None
    };
    Ok((nw, nb))
}
