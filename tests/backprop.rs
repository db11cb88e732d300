//! The workspace builds candle-core with one change to its backward pass (vendor/README.md):
//! the first gradient that reaches a tensor is stored as is instead of being added to fresh
//! zeros. These tests check candle's backward, first and second order, against central finite
//! differences in f64 on a graph where tensors have one consumer, several consumers (fan-in
//! through add, mul, matmul, broadcasting, narrow and cat), the same operand on both sides of
//! an op, and custom ops that return no gradient for a constant operand. A first-order pass
//! stores detached gradients, so that none keeps another tensor alive.

use candle_core::{DType, Device, Tensor, Var, D};
use sgr_core::{autograd, kernels};
use sgr_integration_tests::{flat, randn, rel_err};

const F64: DType = DType::F64;

/// Held while a test sets `CANDLE_GRAD_DO_NOT_DETACH`, and by fresh threads of other tests
/// around their first backward pass, where candle reads the variable for the thread.
static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, 0.5, seed, F64)).expect("var")
}

/// A scalar function of (a [3,4], b [4], c [4,5], x [2,2,5,5], w [3,2,3,3]) that routes each
/// input through several consumers.
fn graph(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    x: &Tensor,
    w: &Tensor,
) -> candle_core::Result<Tensor> {
    let y1 = a.broadcast_add(b)?; // broadcast: b's gradient is a sum
    let y2 = (&y1 * &y1)?; // the same tensor as both operands
    let y3 = y2.matmul(c)?; // [3,5]
    let y4 = (y3.t()?.exp()? * 0.1)?; // transpose, exp
    let y5 = (a.matmul(c)? - &y3)?.sqr()?; // a used again; sub
    let y6 = Tensor::cat(&[&y1.narrow(1, 0, 2)?, &y1.narrow(1, 2, 2)?], 0)?; // narrow + cat
    let y7 = (y1.tanh()? / (b.sqr()? + 1.0)?.broadcast_as((3, 4))?)?; // div, tanh
    let conv = kernels::conv2d(x, w, 1, 1)?; // custom op [2,3,5,5]
    let k = randn(x.dims(), 0.5, 9, F64); // a constant input: its conv returns no dx
    let conv_const = kernels::conv2d(&k, w, 2, 1)?;
    let relu = kernels::relu(&(&conv + x.sum_keepdim(1)?.broadcast_as(conv.shape())?)?)?;
    let head = relu.mean(D::Minus1)?.mean(D::Minus1)?; // [2,3]
    let mixed = head.matmul(&y3.narrow(1, 0, 2)?.contiguous()?)?; // [2,2]
    let terms = [
        y4.sum_all()?,
        y5.sum_all()?,
        (y6.sqr()?.sum_all()? * 0.3)?,
        y7.sum_all()?,
        mixed.sqr()?.sum_all()?,
        (conv_const.sqr()?.mean_all()? * 2.0)?,
    ];
    let mut total = terms[0].clone();
    for t in &terms[1..] {
        total = (total + t)?;
    }
    Ok(total)
}

fn eval(vals: &[Tensor]) -> f64 {
    graph(&vals[0], &vals[1], &vals[2], &vals[3], &vals[4])
        .and_then(|t| t.to_scalar::<f64>())
        .expect("graph")
}

/// Central finite differences of `f` at `vals`, every entry of every input.
fn finite_differences(vals: &[Tensor], f: impl Fn(&[Tensor]) -> f64) -> Vec<f64> {
    let h = 1e-5;
    let mut out = Vec::new();
    for (i, v) in vals.iter().enumerate() {
        let base = flat(std::slice::from_ref(v));
        for j in 0..base.len() {
            let at = |d: f64| {
                let mut p = base.clone();
                p[j] += d;
                let mut vs = vals.to_vec();
                vs[i] = Tensor::from_vec(p, v.shape(), &Device::Cpu).expect("tensor");
                f(&vs)
            };
            out.push((at(h) - at(-h)) / (2.0 * h));
        }
    }
    out
}

fn inputs() -> Vec<Var> {
    vec![
        var(&[3, 4], 1),
        var(&[4], 2),
        var(&[4, 5], 3),
        var(&[2, 2, 5, 5], 4),
        var(&[3, 2, 3, 3], 5),
    ]
}

#[test]
fn backward_matches_finite_differences_in_f64() {
    let vars = inputs();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = graph(&ts[0], &ts[1], &ts[2], &ts[3], &ts[4]).unwrap();
    let store = loss.backward().unwrap();
    let grads: Vec<Tensor> = ts
        .iter()
        .map(|t| store.get(t).expect("grad").clone())
        .collect();
    for (g, t) in grads.iter().zip(&ts) {
        assert_eq!(g.shape(), t.shape());
        assert!(g.is_contiguous(), "stored gradients are contiguous");
    }
    let vals: Vec<Tensor> = ts.iter().map(|t| t.detach()).collect();
    let fd = finite_differences(&vals, eval);
    let err = rel_err(&flat(&grads), &fd);
    assert!(err < 1e-7, "backward vs finite differences: {err:e}");
}

#[test]
fn double_backward_matches_finite_differences_in_f64() {
    // ∇(g·u) for g = ∇L and a fixed u, against the central difference of g·u: exercises the
    // gradient graph kept by the second-order thread (where the first contribution that is
    // stored as is still carries its graph).
    let (got, vals, u) = autograd::with_second_order(|| {
        let vars = inputs();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = graph(&ts[0], &ts[1], &ts[2], &ts[3], &ts[4])?;
        let store = loss.backward()?;
        let u: Vec<Tensor> = ts
            .iter()
            .enumerate()
            .map(|(i, t)| randn(t.dims(), 1.0, 100 + i as u64, F64))
            .collect();
        let mut gu = Tensor::zeros((), F64, &Device::Cpu)?;
        for (t, ui) in ts.iter().zip(&u) {
            let g = store.get(t).expect("grad");
            assert!(g.track_op(), "second-order gradients keep their graph");
            gu = (gu + (g * ui)?.sum_all()?)?;
        }
        let store2 = gu.backward()?;
        let got: Vec<Tensor> = ts
            .iter()
            .map(|t| store2.get(t).expect("second-order grad").detach())
            .collect();
        let vals: Vec<Tensor> = ts.iter().map(|t| t.detach()).collect();
        Ok((got, vals, u))
    })
    .unwrap();
    let grad_dot_u = |vs: &[Tensor]| -> f64 {
        let vars: Vec<Var> = vs.iter().map(|v| Var::from_tensor(v).unwrap()).collect();
        let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let store = graph(ts[0], ts[1], ts[2], ts[3], ts[4])
            .unwrap()
            .backward()
            .unwrap();
        ts.iter()
            .zip(&u)
            .map(|(t, ui)| {
                (store.get(t).unwrap() * ui)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum()
    };
    let fd = finite_differences(&vals, grad_dot_u);
    let err = rel_err(&flat(&got), &fd);
    assert!(err < 1e-6, "double backward vs finite differences: {err:e}");
}

#[test]
fn fused_layers_fall_back_on_threads_whose_backward_keeps_graphs() {
    // candle caches `CANDLE_GRAD_DO_NOT_DETACH` per thread at its first backward, and the
    // variable is process-wide: a thread that starts under a user's setting keeps gradient
    // graphs, as does one inside `autograd::with_second_order`. Its first-order local steps
    // must still work (the fused BatchNorm is first order only).
    use sgr_core::sgr::{base_pass, LocalModule};
    use sgr_integration_tests::{labels, resnet};
    use sgr_models::HeadKind;
    // A plain thread keeps no graphs. (Only this test sets the variable, after this check; one
    // of three fresh threads is enough all the same.)
    let plain = (0..3).any(|_| {
        std::thread::spawn(|| !autograd::gradients_keep_graph())
            .join()
            .unwrap()
    });
    assert!(plain, "a plain thread keeps gradient graphs");
    let (tx, rx) = std::sync::mpsc::channel();
    let env = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    let worker = std::thread::spawn(move || {
        let keeps = autograd::thread_keeps_gradient_graph().unwrap();
        tx.send(()).unwrap();
        assert!(keeps, "the thread read the variable as set");
        assert!(autograd::gradients_keep_graph());
        let net = resnet(8, 3, 2, HeadKind::OneConvTwoFc, 3, DType::F32);
        let x = randn(&[4, 3, 8, 8], 1.0, 4, DType::F32);
        let y = labels(4, 5);
        let prob = LocalModule {
            net: &net,
            k: 0,
            batch: &sgr_integration_tests::targets(&y),
        };
        let base = base_pass(&prob, &x, true, true).expect("a first-order local step");
        assert!(base.loss_value().unwrap().is_finite());
    });
    rx.recv().unwrap();
    std::env::remove_var("CANDLE_GRAD_DO_NOT_DETACH");
    drop(env);
    worker.join().unwrap();
}

const CUBIC_AT: [f64; 4] = [0.3, -1.2, 0.7, 2.0];
const CUBIC_U: [f64; 4] = [1.0, -0.5, 0.25, 2.0];

/// `x` at [`CUBIC_AT`], the gradient of `L = Σ (x + 1)³` and (given `u`) the gradient of
/// `∇L · u`. `x` enters through an affine map, so `∇L` carries a graph only if candle kept the
/// gradient at `x + 1` undetached.
fn cubic_grads(u: Option<&Tensor>) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let x = Var::from_tensor(&Tensor::new(&CUBIC_AT, &Device::Cpu)?)?;
    let x1 = x.as_tensor().affine(1.0, 1.0)?;
    let loss = (x1.sqr()? * &x1)?.sum_all()?;
    let g = loss.backward()?.get(x.as_tensor()).expect("grad").clone();
    let hu = match u {
        Some(u) => {
            let store = (&g * u)?.sum_all()?.backward()?;
            Some(
                store
                    .get(x.as_tensor())
                    .expect("second-order grad")
                    .detach(),
            )
        }
        None => None,
    };
    Ok((x.as_tensor().detach(), g, hu))
}

fn assert_close(got: &Tensor, want: impl Fn(f64, f64) -> f64, what: &str) {
    let got = got.to_vec1::<f64>().unwrap();
    for (i, g) in got.iter().enumerate() {
        let w = want(CUBIC_AT[i], CUBIC_U[i]);
        assert!(
            (g - w).abs() <= 1e-12 * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn second_order_scope_leaves_concurrent_plain_threads_alone() {
    // One thread runs double backward passes in `autograd::with_second_order`, one loop starts
    // fresh threads that run plain backward passes meanwhile. The plain gradients must never
    // carry a graph. (Fresh threads, because candle reads `CANDLE_GRAD_DO_NOT_DETACH` once per
    // thread, at its first backward: an implementation that sets the process-wide variable
    // fails when such a first backward overlaps; the overlap is a matter of timing, so this
    // test catches it often, not always.)
    const ROUNDS: usize = 400;
    const MIN_PLAIN: usize = 100;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let before = autograd::gradients_keep_graph();
            let u = Tensor::new(&CUBIC_U, &Device::Cpu).unwrap();
            for _ in 0..ROUNDS {
                let (g, hu) = autograd::with_second_order(|| {
                    assert!(autograd::on_second_order_thread());
                    assert!(autograd::gradients_keep_graph());
                    let (_, g, hu) = cubic_grads(Some(&u))?;
                    assert!(g.track_op(), "second-order gradients keep their graph");
                    Ok((g.detach(), hu.expect("second-order grad")))
                })
                .unwrap();
                assert_close(&g, |x, _| 3.0 * (x + 1.0).powi(2), "∇L");
                assert_close(&hu, |x, u| 6.0 * (x + 1.0) * u, "∇(∇L·u)");
            }
            assert!(!autograd::on_second_order_thread());
            assert_eq!(
                autograd::gradients_keep_graph(),
                before,
                "the setting is restored"
            );
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        let mut plain = 0;
        while plain < MIN_PLAIN || !done.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::spawn(|| {
                let env = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                let first = cubic_grads(None).unwrap().1;
                drop(env);
                for g in [first, cubic_grads(None).unwrap().1] {
                    assert!(!g.track_op(), "a plain thread's gradient carries a graph");
                    assert_close(&g, |x, _| 3.0 * (x + 1.0).powi(2), "plain ∇L");
                }
                assert!(!autograd::gradients_keep_graph());
                assert!(!autograd::on_second_order_thread());
            })
            .join()
            .unwrap();
            plain += 1;
        }
    });
}

#[test]
fn second_order_scope_is_restored_after_errors_panics_and_nesting() {
    let before = autograd::gradients_keep_graph();
    let failed = autograd::with_second_order(|| -> sgr_core::Result<()> {
        assert!(autograd::gradients_keep_graph());
        Err(sgr_core::Error::InvalidConfig("inside".into()))
    });
    assert!(failed.is_err());
    assert_eq!(autograd::gradients_keep_graph(), before);
    assert!(!autograd::on_second_order_thread());
    let panicked = std::panic::catch_unwind(|| {
        autograd::with_second_order(|| -> sgr_core::Result<()> { panic!("inside") })
    });
    assert!(panicked.is_err());
    assert_eq!(autograd::gradients_keep_graph(), before);
    assert!(!autograd::on_second_order_thread());
    autograd::with_second_order(|| {
        autograd::with_second_order(|| Ok(()))?;
        assert!(
            autograd::on_second_order_thread(),
            "an inner scope leaves the outer one on"
        );
        assert!(autograd::gradients_keep_graph());
        assert!(autograd::thread_keeps_gradient_graph()?);
        Ok(())
    })
    .unwrap();
    assert_eq!(autograd::gradients_keep_graph(), before);
}

#[test]
fn second_order_scope_on_a_rayon_worker_runs_off_the_pool() {
    // A rayon worker that waits for parallel work may run unrelated jobs: they must not
    // inherit the switch, so `with_second_order` leaves the pool there.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        let before = autograd::gradients_keep_graph();
        let inside = autograd::with_second_order(|| {
            Ok((
                rayon::current_thread_index(),
                autograd::gradients_keep_graph(),
            ))
        })
        .unwrap();
        assert_eq!(inside, (None, true));
        assert_eq!(autograd::gradients_keep_graph(), before);
    });
}

/// A first-order backward stores detached gradients: a weight gradient computed from a tracked
/// operand (`xᵀ·g`) would otherwise keep its op, and with it the incoming gradient, alive until
/// the gradients are dropped (vendor/README.md, change 1). Under the second-order scope the
/// gradients keep their graphs. Covers candle's matmul and the fused linear, convolution and
/// ReLU ops.
#[test]
fn first_order_gradients_hold_no_graph() {
    let run = || -> candle_core::Result<Vec<bool>> {
        let x = Var::from_tensor(&randn(&[2, 3, 6, 6], 1.0, 1, DType::F64))?;
        let w = Var::from_tensor(&randn(&[4, 3, 3, 3], 1.0, 2, DType::F64))?;
        let fc = Var::from_tensor(&randn(&[5, 4], 1.0, 3, DType::F64))?;
        let b = Var::from_tensor(&randn(&[5], 1.0, 4, DType::F64))?;
        let m = Var::from_tensor(&randn(&[5, 5], 1.0, 5, DType::F64))?;
        let h = kernels::relu(&kernels::conv2d(x.as_tensor(), w.as_tensor(), 1, 1)?)?;
        let pooled = h.mean((2, 3))?;
        let y = kernels::linear(&pooled, fc.as_tensor(), b.as_tensor())?.matmul(m.as_tensor())?;
        let g = (y.sqr()?.sum_all()? + pooled.sqr()?.sum_all()?)?.backward()?;
        Ok([&x, &w, &fc, &b, &m]
            .iter()
            .map(|v| g.get(v.as_tensor()).expect("a gradient").track_op())
            .collect())
    };
    let _env = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(run().unwrap(), vec![false; 5], "first order: detached");
    let kept = autograd::with_second_order(|| Ok(run()?)).unwrap();
    assert_eq!(kept, vec![true; 5], "second order: graphs kept");
}
