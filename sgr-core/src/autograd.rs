//! Second-order autodiff in candle.
//!
//! candle's `backward()` detaches every gradient it computes, so gradients cannot be
//! differentiated again, unless the thread keeps gradient graphs. Keeping graphs multiplies the
//! memory of plain backward passes, so [`with_second_order`] turns that on for one scope of one
//! thread; every other thread keeps candle's default.
//!
//! Upstream candle has only a process-wide switch (`CANDLE_GRAD_DO_NOT_DETACH`, read once per
//! thread), which no library can flip for one scope safely. The per-thread switch it needs
//! ([`candle_core::backprop::KeepGradGraph`]) exists in the candle-core this workspace patches
//! in (docs/library.md), so the scope is behind this crate's `second-order` feature, which
//! builds only against that candle-core. Without the feature [`with_second_order`] is
//! [`Error::SecondOrderUnavailable`], and so is the exact SGR way; the finite-difference ways
//! need no second order and work on upstream candle.

use std::cell::Cell;

#[cfg(feature = "second-order")]
use candle_core::backprop::{keep_grad_graph, KeepGradGraph};
use candle_core::{Device, Tensor, Var};

use crate::{Error, Result};

/// Whether this build can differentiate gradients again ([`with_second_order`] works): sgr-core
/// was built with its `second-order` feature, against the patched candle-core.
pub const SECOND_ORDER: bool = cfg!(feature = "second-order");

thread_local! {
    /// How many [`with_second_order`] closures the current thread is running.
    static SECOND_ORDER_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Keeps gradient graphs on the current thread and counts it as in a [`with_second_order`]
/// scope until dropped, also when the closure fails or panics.
#[cfg(feature = "second-order")]
struct SecondOrderScope {
    _keep: KeepGradGraph,
}

#[cfg(feature = "second-order")]
impl SecondOrderScope {
    fn enter() -> Self {
        SECOND_ORDER_DEPTH.with(|d| d.set(d.get() + 1));
        Self {
            _keep: KeepGradGraph::enable(),
        }
    }
}

#[cfg(feature = "second-order")]
impl Drop for SecondOrderScope {
    fn drop(&mut self) {
        SECOND_ORDER_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Whether the current thread is running a [`with_second_order`] closure. Layers whose fast
/// kernels are first order only (the fused BatchNorm) switch to their primitive formulation
/// there; [`gradients_keep_graph`] is the broader test they use.
pub fn on_second_order_thread() -> bool {
    SECOND_ORDER_DEPTH.with(|d| d.get() > 0)
}

/// Whether `backward()` on the current thread keeps the graph of its gradients now: inside
/// [`with_second_order`] or another `KeepGradGraph` guard, or where the user set
/// `CANDLE_GRAD_DO_NOT_DETACH` (as candle read it at the thread's first backward). Layers whose
/// fast kernels are first order only take their differentiable formulation then. It reads two
/// thread-locals, so it is cheap per layer and pass and follows the switch as it changes.
pub fn gradients_keep_graph() -> bool {
    #[cfg(feature = "second-order")]
    return keep_grad_graph();
    #[cfg(not(feature = "second-order"))]
    return env_keeps_grad_graph();
}

/// Upstream candle's own rule for `CANDLE_GRAD_DO_NOT_DETACH`: set, non-empty and not `0`, read
/// once per thread.
#[cfg(not(feature = "second-order"))]
fn env_keeps_grad_graph() -> bool {
    thread_local! {
        static KEEP: bool = std::env::var("CANDLE_GRAD_DO_NOT_DETACH")
            .is_ok_and(|s| !s.is_empty() && s != "0");
    }
    KEEP.with(|k| *k)
}

/// Whether gradients computed on the current thread carry a graph (so can be differentiated
/// again), found by a backward pass through a tiny graph: a check of [`gradients_keep_graph`]
/// against what candle's backward does.
pub fn thread_keeps_gradient_graph() -> Result<bool> {
    // x enters through an affine map, so its gradient is the gradient arriving at `x + 1`
    // unchanged: it carries a graph only if candle kept that node's gradient undetached. (With
    // `x²` the gradient `2x·g` would carry one anyway, through the variable x.)
    let x = Var::from_tensor(&Tensor::new(&[1.5f32], &Device::Cpu)?)?;
    let y = x.as_tensor().affine(1.0, 1.0)?.sqr()?.sum_all()?;
    let g = y.backward()?;
    let gx = g
        .get(x.as_tensor())
        .ok_or_else(|| Error::Internal("autograd lost a trivial gradient".into()))?;
    Ok(gx.track_op())
}

/// Runs `f` with candle's backward keeping gradient graphs, and returns its result. The
/// previous setting comes back after, also when `f` fails or panics (the panic propagates);
/// other threads are not affected. Keep and return only detached tensors from `f`: tensors
/// made inside hold their graphs.
///
/// `f` runs on the current thread, except on a rayon worker: there, waiting for the parallel
/// work inside `f` (candle's and this crate's kernels use rayon) lets the thread run unrelated
/// rayon jobs, which would inherit the switch, so `f` runs on a scoped thread of its own,
/// which waits without taking jobs. That is why `F` and `R` are `Send`.
///
/// Without the `second-order` feature this is [`Error::SecondOrderUnavailable`], and `f` does
/// not run.
pub fn with_second_order<R, F>(f: F) -> Result<R>
where
    R: Send,
    F: FnOnce() -> Result<R> + Send,
{
    #[cfg(not(feature = "second-order"))]
    {
        drop(f);
        Err(Error::SecondOrderUnavailable {
            what: "a second-order derivative (double backward)",
        })
    }
    #[cfg(feature = "second-order")]
    {
        let run = || {
            let _scope = SecondOrderScope::enter();
            f()
        };
        if rayon::current_thread_index().is_none() {
            return run();
        }
        std::thread::scope(|s| {
            s.spawn(run)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sgr::{SgrConfig, SgrGrad};

    #[test]
    fn second_order_follows_the_feature() {
        let exact = SgrConfig {
            grad: SgrGrad::Exact,
            ..SgrConfig::default()
        };
        let ran = with_second_order(|| Ok(on_second_order_thread()));
        if SECOND_ORDER {
            assert!(ran.unwrap());
            exact.validate().unwrap();
        } else {
            // Upstream candle: the exact way is refused up front with what to do, and the
            // finite-difference ways stay available.
            assert!(matches!(ran, Err(Error::SecondOrderUnavailable { .. })));
            let msg = exact.validate().unwrap_err().to_string();
            assert!(msg.contains("`second-order` feature"), "{msg}");
            assert!(msg.contains("forward-difference"), "{msg}");
            SgrConfig::default().validate().unwrap();
        }
        assert!(!on_second_order_thread());
    }
}
