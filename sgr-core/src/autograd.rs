//! Second-order autodiff in candle.
//!
//! candle keeps the graph of gradients only when `CANDLE_GRAD_DO_NOT_DETACH` is set, and each
//! thread reads that variable once, at its first `backward()`, and caches it (candle-notes.md).
//! A thread that cached "on" keeps the graph of every gradient, which multiplies the memory of
//! plain backward passes. So second-order work runs on a short-lived thread of its own, whose
//! cache is set "on" while a global lock holds the environment variable; every other thread keeps
//! candle's default.

use std::sync::Mutex;

use candle_core::{Device, Tensor, Var};

use crate::{Error, Result};

const FLAG: &str = "CANDLE_GRAD_DO_NOT_DETACH";
static ENV_LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    static SECOND_ORDER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the current thread is a [`with_second_order`] worker. Layers whose fast kernels are
/// first order only (the fused BatchNorm) switch to their primitive formulation there.
pub fn on_second_order_thread() -> bool {
    SECOND_ORDER.with(|c| c.get())
}

/// Whether `backward()` on the current thread keeps the graph of its gradients: on a
/// [`with_second_order`] worker, and on any thread whose candle cache read
/// `CANDLE_GRAD_DO_NOT_DETACH` as set — which the user may have done, and which a thread whose
/// first `backward()` ran while another thread's [`with_second_order`] held the variable set
/// did too (the variable is process-wide). Layers whose fast kernels are first order only take
/// their differentiable formulation on such threads. Checked once per thread.
pub fn gradients_keep_graph() -> bool {
    thread_local! {
        static KEEPS: std::cell::OnceCell<bool> = const { std::cell::OnceCell::new() };
    }
    on_second_order_thread()
        || KEEPS.with(|k| *k.get_or_init(|| thread_keeps_gradient_graph().unwrap_or(true)))
}

/// Whether gradients computed on the current thread carry a graph (so can be differentiated
/// again). Calling it initialises the thread's cached flag if it was not yet.
pub fn thread_keeps_gradient_graph() -> Result<bool> {
    // x enters through an affine map, so its gradient is the gradient arriving at `x + 1`
    // unchanged: it carries a graph only if candle kept that node's gradient undetached. (With
    // `x²` the gradient `2x·g` would carry one anyway, through the variable x.)
    let x = Var::from_tensor(&Tensor::new(&[1.5f32], &Device::Cpu)?)?;
    let y = x.as_tensor().affine(1.0, 1.0)?.sqr()?.sum_all()?;
    let g = y.backward()?;
    let gx = g
        .get(x.as_tensor())
        .ok_or_else(|| Error::InvalidConfig("autograd lost a trivial gradient".into()))?;
    Ok(gx.track_op())
}

/// Runs `f` on a thread where candle's backward keeps gradient graphs, and returns its result.
/// Keep and return only detached tensors from `f`.
pub fn with_second_order<R, F>(f: F) -> Result<R>
where
    R: Send,
    F: FnOnce() -> Result<R> + Send,
{
    let (tx, rx) = std::sync::mpsc::channel::<Result<bool>>();
    std::thread::scope(|s| {
        let guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let previous = std::env::var_os(FLAG);
        std::env::set_var(FLAG, "1");
        let handle = s.spawn(move || {
            SECOND_ORDER.with(|c| c.set(true));
            let on = thread_keeps_gradient_graph();
            let ok = matches!(on, Ok(true));
            let _ = tx.send(on);
            if !ok {
                return Err(Error::InvalidConfig(
                    "candle did not enable second-order gradients on the worker thread".into(),
                ));
            }
            f()
        });
        let init = rx.recv();
        match previous {
            Some(v) => std::env::set_var(FLAG, v),
            None => std::env::remove_var(FLAG),
        }
        drop(guard);
        let joined = handle
            .join()
            .map_err(|_| Error::InvalidConfig("second-order worker thread panicked".into()))?;
        match init {
            Ok(Ok(true)) => joined,
            Ok(Ok(false)) => Err(Error::InvalidConfig(
                "candle did not enable second-order gradients on the worker thread".into(),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => joined,
        }
    })
}
