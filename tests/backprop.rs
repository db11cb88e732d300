//! The workspace builds candle-core with one change to its backward pass (vendor/README.md):
//! the first gradient that reaches a tensor is stored as is instead of being added to fresh
//! zeros. These tests check candle's backward, first and second order, against central finite
//! differences in f64 on a graph where tensors have one consumer, several consumers (fan-in
//! through add, mul, matmul, broadcasting, narrow and cat), the same operand on both sides of
//! an op, and custom ops that return no gradient for a constant operand.

use candle_core::{DType, Device, Tensor, Var, D};
use sgr_core::{autograd, kernels};
use sgr_integration_tests::{flat, randn, rel_err};

const F64: DType = DType::F64;

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
    // variable is process-wide: a thread that starts while another runs
    // `autograd::with_second_order` (or under a user's setting) keeps gradient graphs. Its
    // first-order local steps must still work (the fused BatchNorm is first order only).
    use sgr_core::sgr::{base_pass, CrossEntropyModule};
    use sgr_integration_tests::{labels, resnet};
    use sgr_models::HeadKind;
    // A plain thread keeps no graphs. (Another test's `with_second_order` sets the variable
    // for a moment; a fresh thread that starts in that moment would read it as set, so one of
    // three fresh threads is enough.)
    let plain = (0..3).any(|_| {
        std::thread::spawn(|| !autograd::gradients_keep_graph())
            .join()
            .unwrap()
    });
    assert!(plain, "a plain thread keeps gradient graphs");
    let (tx, rx) = std::sync::mpsc::channel();
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    let worker = std::thread::spawn(move || {
        let keeps = autograd::thread_keeps_gradient_graph().unwrap();
        tx.send(()).unwrap();
        assert!(keeps, "the thread read the variable as set");
        assert!(autograd::gradients_keep_graph());
        let net = resnet(8, 3, 2, HeadKind::OneConvTwoFc, 3, DType::F32);
        let x = randn(&[4, 3, 8, 8], 1.0, 4, DType::F32);
        let y = labels(4, 5);
        let prob = CrossEntropyModule {
            net: &net,
            k: 0,
            labels: &y,
        };
        let base = base_pass(&prob, &x, true, true).expect("a first-order local step");
        assert!(base.loss.is_finite());
    });
    rx.recv().unwrap();
    std::env::remove_var("CANDLE_GRAD_DO_NOT_DETACH");
    worker.join().unwrap();
}
