//! The fused Transformer kernels (linear, LayerNorm, GELU, attention) and the fused SGD step,
//! against independent oracles: the compositions of candle's ops (`kernels::generic`) in f64,
//! central finite differences in f64, candle's exact double backward (linear), f64 references
//! for the f32 kernels, and themselves on other thread counts.

use candle_core::{DType, Tensor, Var};
use sgr_core::{autograd, kernels};
use sgr_integration_tests::{flat, max_rel, randn};

const F64: DType = DType::F64;

fn var(shape: &[usize], std: f64, seed: u64, dtype: DType) -> Var {
    Var::from_tensor(&randn(shape, std, seed, dtype)).expect("var")
}

/// An op under test: its output from the variables' tensors.
type Op<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// `L = Σ r·y + ½ Σ y²` (a gradient into `y` that depends on `y`).
fn loss(y: &Tensor, r: &Tensor) -> Tensor {
    ((y * r).unwrap().sum_all().unwrap() + (y.sqr().unwrap().sum_all().unwrap() * 0.5)).unwrap()
}

/// `[y, dL/dv for v in vars]`.
fn first_order(f: Op, vars: &[&Var], r: &Tensor) -> Vec<Tensor> {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let g = loss(&y, r).backward().unwrap();
    let mut out = vec![y.detach()];
    for v in vars {
        out.push(g.get(v.as_tensor()).expect("a gradient").detach());
    }
    out
}

/// The Hessian-vector products `d/dv (Σ_v ⟨dL/dv, dir_v⟩)` of `L = scalar(f(vars))`, through
/// candle's double backward (call under `autograd::with_second_order`).
fn hvp(f: Op, vars: &[&Var], dirs: &[Tensor], scalar: &dyn Fn(&Tensor) -> Tensor) -> Vec<Tensor> {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let g = scalar(&f(&ts).unwrap()).backward().unwrap();
    let mut j = Tensor::zeros((), F64, &candle_core::Device::Cpu).unwrap();
    for (var, dir) in vars.iter().zip(dirs) {
        let gv = g.get(var.as_tensor()).expect("gradient");
        assert!(gv.track_op(), "the gradient must carry a graph");
        j = (j + (gv * dir).unwrap().sum_all().unwrap()).unwrap();
    }
    let h = j.backward().unwrap();
    vars.iter()
        .map(|var| h.get(var.as_tensor()).expect("second order").detach())
        .collect()
}

/// The shapes each op is checked at: rows not a multiple of the kernels' row blocks, widths
/// not a multiple of a vector, one token, one head.
struct Case {
    b: usize,
    n: usize,
    heads: usize,
    hd: usize,
}

const CASES: &[Case] = &[
    Case {
        b: 2,
        n: 5,
        heads: 2,
        hd: 3,
    },
    Case {
        b: 1,
        n: 1,
        heads: 1,
        hd: 4,
    },
    Case {
        b: 3,
        n: 13,
        heads: 3,
        hd: 5,
    },
    Case {
        b: 2,
        n: 37,
        heads: 1,
        hd: 7,
    },
];

/// An op boxed, to list several.
type BoxOp = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// (name, fused, generic, variable shapes) for one case.
fn ops(c: &Case) -> Vec<(&'static str, BoxOp, BoxOp, Vec<Vec<usize>>)> {
    let (b, n, heads, hd) = (c.b, c.n, c.heads, c.hd);
    let d = heads * hd;
    let scale = (hd as f64).powf(-0.5);
    vec![
        (
            "linear",
            Box::new(|t: &[Tensor]| kernels::linear(&t[0], &t[1], &t[2])),
            Box::new(|t: &[Tensor]| kernels::generic::linear(&t[0], &t[1], &t[2])),
            vec![vec![b, n, d], vec![2 * d + 1, d], vec![2 * d + 1]],
        ),
        (
            "layer_norm",
            Box::new(|t: &[Tensor]| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-6)),
            Box::new(|t: &[Tensor]| kernels::generic::layer_norm(&t[0], &t[1], &t[2], 1e-6)),
            vec![vec![b, n, d], vec![d], vec![d]],
        ),
        (
            "gelu",
            Box::new(|t: &[Tensor]| kernels::gelu(&t[0])),
            Box::new(|t: &[Tensor]| kernels::generic::gelu(&t[0])),
            vec![vec![b, n, 4 * d]],
        ),
        (
            "attention",
            Box::new(move |t: &[Tensor]| kernels::attention(&t[0], heads, scale)),
            Box::new(move |t: &[Tensor]| kernels::generic::attention(&t[0], heads, scale)),
            vec![vec![b, n, 3 * d]],
        ),
    ]
}

#[test]
fn fused_ops_match_the_compositions_in_f64() {
    for (i, c) in CASES.iter().enumerate() {
        for (name, fused, generic, shapes) in ops(c) {
            let seed = 100 * i as u64;
            let vars: Vec<Var> = shapes
                .iter()
                .enumerate()
                .map(|(k, s)| var(s, 1.0, seed + k as u64, F64))
                .collect();
            let refs: Vec<&Var> = vars.iter().collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let r = randn(generic(&ts).unwrap().dims(), 1.0, seed + 9, F64);
            let got = first_order(&*fused, &refs, &r);
            let want = first_order(&*generic, &refs, &r);
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let e = max_rel(g, w);
                assert!(
                    e < 1e-10,
                    "{name}, case {i}, output {k}: relative error {e:.2e}"
                );
            }
        }
    }
}

/// Central differences of `L` in f64 for a few entries of every variable, against the fused
/// op's backward.
#[test]
fn fused_ops_match_finite_differences_in_f64() {
    let c = &CASES[2];
    for (name, fused, _, shapes) in ops(c) {
        let vars: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| var(s, 0.7, 50 + k as u64, F64))
            .collect();
        let refs: Vec<&Var> = vars.iter().collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let r = randn(fused(&ts).unwrap().dims(), 1.0, 59, F64);
        let grads = first_order(&*fused, &refs, &r);
        let h = 1e-5;
        for (k, v) in vars.iter().enumerate() {
            let g = flat(std::slice::from_ref(&grads[k + 1]));
            let base = flat(std::slice::from_ref(v.as_tensor()));
            let count = base.len();
            for j in [0, count / 3, count / 2, count - 1] {
                let at = |delta: f64| {
                    let mut p = base.clone();
                    p[j] += delta;
                    let mut ts = ts.clone();
                    ts[k] = Tensor::from_vec(p, v.dims(), v.device()).unwrap();
                    let y = fused(&ts).unwrap();
                    flat(&[loss(&y, &r)])[0]
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let scale = g.iter().fold(1.0f64, |m, x| m.max(x.abs()));
                assert!(
                    (fd - g[j]).abs() / scale < 1e-7,
                    "{name}: d/d(var {k})[{j}] finite difference {fd}, backward {}",
                    g[j]
                );
            }
        }
    }
}

#[test]
fn fused_linear_differentiates_twice_as_candle_does() {
    autograd::with_second_order(|| {
        let x = var(&[2, 7, 5], 1.0, 1, F64);
        let w = var(&[3, 5], 1.0, 2, F64);
        let b = var(&[3], 1.0, 3, F64);
        let r = randn(&[2, 7, 3], 1.0, 4, F64);
        let v = [
            randn(&[2, 7, 5], 1.0, 5, F64),
            randn(&[3, 5], 1.0, 6, F64),
            randn(&[3], 1.0, 7, F64),
        ];
        let l = |y: &Tensor| loss(y, &r);
        let got = hvp(
            &|t| kernels::linear(&t[0], &t[1], &t[2]),
            &[&x, &w, &b],
            &v,
            &l,
        );
        let want = hvp(
            &|t| kernels::generic::linear(&t[0], &t[1], &t[2]),
            &[&x, &w, &b],
            &v,
            &l,
        );
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = max_rel(g, w);
            assert!(
                e < 1e-12,
                "second order, variable {k}: relative error {e:.2e}"
            );
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn first_order_ops_refuse_to_be_differentiated_twice() {
    autograd::with_second_order(|| {
        let c = &CASES[0];
        for (name, fused, _, shapes) in ops(c) {
            if name == "linear" {
                continue;
            }
            let vars: Vec<Var> = shapes
                .iter()
                .enumerate()
                .map(|(k, s)| var(s, 1.0, k as u64, F64))
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = fused(&ts)?;
            let err = y
                .sqr()?
                .sum_all()?
                .backward()
                .expect_err("must refuse, not cut the graph");
            assert!(
                err.to_string().contains("first-order only"),
                "{name}: {err}"
            );
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn f32_kernels_match_an_f64_reference() {
    // DeiT-like widths at a small batch: attention rows of 50 tokens, LayerNorm over 96.
    let c = Case {
        b: 2,
        n: 50,
        heads: 3,
        hd: 32,
    };
    for (name, fused, generic, shapes) in ops(&c) {
        let v64: Vec<Var> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| var(s, if k == 0 { 1.0 } else { 0.2 }, 70 + k as u64, F64))
            .collect();
        let v32: Vec<Var> = v64
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = v64.iter().map(|v| v.as_tensor().clone()).collect();
        let r64 = randn(generic(&ts).unwrap().dims(), 1.0, 79, F64);
        let want = first_order(&*generic, &v64.iter().collect::<Vec<_>>(), &r64);
        let got = first_order(
            &*fused,
            &v32.iter().collect::<Vec<_>>(),
            &r64.to_dtype(DType::F32).unwrap(),
        );
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = max_rel(&g.to_dtype(F64).unwrap(), w);
            assert!(e < 2e-5, "{name}, output {k}: f32 relative error {e:.2e}");
        }
    }
}

#[test]
fn fused_ops_are_bit_identical_across_thread_counts() {
    // 3 × 70 = 210 rows cross several 32-row blocks; 4·96 = 384 columns and 80 640 GELU
    // elements cross several element blocks.
    let c = Case {
        b: 3,
        n: 70,
        heads: 4,
        hd: 24,
    };
    let run = || -> Vec<f64> {
        let mut out = Vec::new();
        for (_, fused, _, shapes) in ops(&c) {
            let vars: Vec<Var> = shapes
                .iter()
                .enumerate()
                .map(|(k, s)| var(s, 1.0, 90 + k as u64, DType::F32))
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let r = randn(fused(&ts).unwrap().dims(), 1.0, 99, DType::F32);
            out.extend(flat(&first_order(
                &*fused,
                &vars.iter().collect::<Vec<_>>(),
                &r,
            )));
        }
        out
    };
    let reference = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    for threads in [2, 3] {
        let got = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(run);
        let same = got
            .iter()
            .zip(&reference)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "results differ on {threads} threads");
    }
}

#[test]
fn other_dtypes_take_the_compositions() {
    let x = randn(&[2, 3, 8], 1.0, 1, DType::F32)
        .to_dtype(DType::BF16)
        .unwrap();
    let g = Tensor::ones(8, DType::BF16, x.device()).unwrap();
    let b = Tensor::zeros(8, DType::BF16, x.device()).unwrap();
    for (got, want) in [
        (
            kernels::layer_norm(&x, &g, &b, 1e-6).unwrap(),
            kernels::generic::layer_norm(&x, &g, &b, 1e-6).unwrap(),
        ),
        (
            kernels::gelu(&x).unwrap(),
            kernels::generic::gelu(&x).unwrap(),
        ),
    ] {
        assert_eq!(got.dtype(), DType::BF16);
        let (got, want) = (got.to_dtype(F64).unwrap(), want.to_dtype(F64).unwrap());
        assert_eq!(flat(&[got]), flat(&[want]));
    }
}

#[test]
fn bad_shapes_are_errors_that_say_what_is_wrong() {
    let x = randn(&[2, 3, 10], 1.0, 1, DType::F32);
    let err = kernels::attention(&x, 4, 1.0).unwrap_err().to_string();
    assert!(err.contains("not 3 × a multiple of the 4 heads"), "{err}");
    let err = kernels::attention(&randn(&[6, 9], 1.0, 1, DType::F32), 1, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("(batch, tokens, 3·width)"), "{err}");
    let g = randn(&[9], 1.0, 2, DType::F32);
    let err = kernels::layer_norm(&x, &g, &g, 1e-6)
        .unwrap_err()
        .to_string();
    assert!(err.contains("γ and β of shape [10]"), "{err}");
    let w = randn(&[4, 9], 1.0, 3, DType::F32);
    let b = randn(&[4], 1.0, 4, DType::F32);
    let err = kernels::linear(&x, &w, &b).unwrap_err().to_string();
    assert!(err.contains("do not match"), "{err}");
}

#[test]
fn fused_sgd_rounds_as_the_composition_does() {
    for dtype in [DType::F32, F64] {
        let w = randn(&[50_000], 1.0, 1, dtype);
        let g = randn(&[50_000], 0.1, 2, dtype);
        let buf = randn(&[50_000], 0.1, 3, dtype);
        for (momentum, nesterov, weight_decay) in [
            (0.0, false, 0.0),
            (0.9, false, 5e-4),
            (0.9, true, 1e-4),
            (0.5, true, 0.0),
        ] {
            let s = kernels::SgdStep {
                lr: 0.05,
                momentum,
                nesterov,
                weight_decay,
            };
            for b in [None, Some(&buf)] {
                let (fw, fb) = kernels::sgd_step(&w, &g, b, &s).unwrap();
                let (gw, gb) = kernels::generic::sgd_step(&w, &g, b, &s).unwrap();
                assert_eq!(flat(&[fw]), flat(&[gw]), "{dtype:?} {s:?} weights");
                assert_eq!(fb.is_some(), momentum != 0.0);
                if let (Some(fb), Some(gb)) = (fb, gb) {
                    assert_eq!(flat(&[fb]), flat(&[gb]), "{dtype:?} {s:?} buffer");
                }
            }
        }
    }
}

/// The fused linear layer gives `matmul` + `broadcast_add`'s values and gradients bit for bit
/// in f32 (the same gemm calls, the bias gradient summed in the same order), so the models
/// that used the composition train to the same bits.
#[test]
fn fused_linear_is_bit_identical_to_the_composition_in_f32() {
    for (rows, cin, cout) in [(128, 64, 10), (37, 300, 129), (3, 7, 5), (400, 40, 70)] {
        let x = var(&[rows, cin], 1.0, 1, DType::F32);
        let w = var(&[cout, cin], 0.1, 2, DType::F32);
        let b = var(&[cout], 0.1, 3, DType::F32);
        let r = randn(&[rows, cout], 1.0, 4, DType::F32);
        let vars = [&x, &w, &b];
        let got = first_order(&|t| kernels::linear(&t[0], &t[1], &t[2]), &vars, &r);
        let want = first_order(
            &|t| kernels::generic::linear(&t[0], &t[1], &t[2]),
            &vars,
            &r,
        );
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let (g, w) = (flat(std::slice::from_ref(g)), flat(std::slice::from_ref(w)));
            let same = g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{rows}×{cin}→{cout}: output {k} differs from the composition's"
            );
        }
    }
}

/// `add_bias` (a ViT's position embeddings, a convolution's bias) against `broadcast_add`: the
/// same bits in f32, values and both gradients, and the same second order in f64; shapes it
/// does not cover (the bias's axes not consecutive) fall back to `broadcast_add`.
#[test]
fn add_bias_is_broadcast_add_bit_for_bit_and_differentiates_twice() {
    let cases: [(&[usize], &[usize]); 7] = [
        (&[5, 7, 9], &[1, 7, 9]),
        (&[300, 70], &[70]),
        (&[2, 3, 4], &[4]),
        (&[2, 3], &[2, 1]),
        (&[16, 24, 9, 7], &[1, 24, 1, 1]),
        (&[3, 5, 4, 2], &[5, 4, 1]),
        (&[2, 3, 4, 5], &[3, 1, 5]),
    ];
    let bits = |t: &Tensor| -> Vec<u32> {
        flat(std::slice::from_ref(t))
            .iter()
            .map(|&v| (v as f32).to_bits())
            .collect()
    };
    for (xs, bs) in cases {
        let x = var(xs, 1.0, 1, DType::F32);
        let b = var(bs, 0.1, 2, DType::F32);
        let r = randn(xs, 1.0, 3, DType::F32);
        let got = first_order(&|t| kernels::add_bias(&t[0], &t[1]), &[&x, &b], &r);
        let want = first_order(&|t| t[0].broadcast_add(&t[1]), &[&x, &b], &r);
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.dims(), w.dims(), "{xs:?} + {bs:?}: output {k}'s shape");
            assert!(
                bits(g) == bits(w),
                "{xs:?} + {bs:?}: output {k} differs from broadcast_add's"
            );
        }
    }
    autograd::with_second_order(|| {
        let x = var(&[4, 3, 5], 1.0, 4, F64);
        let b = var(&[3, 1], 1.0, 5, F64);
        let r = randn(&[4, 3, 5], 1.0, 6, F64);
        let v = [randn(&[4, 3, 5], 1.0, 7, F64), randn(&[3, 1], 1.0, 8, F64)];
        // A loss with curvature through b's gradient: (Σ r·y + ½ Σ y²)·Σ y.
        let l = |y: &Tensor| (loss(y, &r) * y.sum_all().unwrap()).unwrap();
        let got = hvp(&|t| kernels::add_bias(&t[0], &t[1]), &[&x, &b], &v, &l);
        let want = hvp(&|t| t[0].broadcast_add(&t[1]), &[&x, &b], &v, &l);
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = max_rel(g, w);
            assert!(
                e < 1e-12,
                "second order, variable {k}: relative error {e:.2e}"
            );
        }
        Ok(())
    })
    .unwrap();
}
