//! The fast CPU kernels (`sgr_core::kernels`) against candle's reference ops, in f64: values,
//! first-order gradients and (for the ops that support it) exact second-order gradients.

use candle_core::{DType, Tensor, Var};
use sgr_core::{autograd, kernels};
use sgr_integration_tests::{flat, max_rel, randn};

const F64: DType = DType::F64;

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, 1.0, seed, F64)).expect("var")
}

/// `[y, dL/dv for v in vars]` for L = Σ r·y.
fn weighted_grads(y: Tensor, r: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y.detach()];
    for v in vars {
        out.push(g.get(v.as_tensor()).expect("a gradient").detach());
    }
    out
}

/// (input shape, output channels, kernel, stride, padding)
type Geometry = ([usize; 4], usize, (usize, usize), usize, usize);

const GEOMETRIES: &[Geometry] = &[
    ([2, 3, 7, 6], 4, (3, 3), 1, 1),
    ([2, 3, 8, 8], 5, (3, 3), 2, 1),
    ([3, 4, 5, 7], 2, (1, 1), 1, 0),
    ([2, 4, 9, 9], 3, (1, 1), 2, 0),
    ([1, 2, 6, 5], 3, (3, 2), 1, 0),
    ([2, 2, 4, 4], 3, (5, 5), 2, 2),
    ([2, 3, 7, 7], 2, (3, 3), 3, 1),
];

type ConvFn = fn(&Tensor, &Tensor, usize, usize) -> Tensor;

fn fast_conv(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Tensor {
    kernels::conv2d(x, w, s, p).expect("fast conv")
}

fn candle_conv(x: &Tensor, w: &Tensor, s: usize, p: usize) -> Tensor {
    x.conv2d(w, p, s, 1, 1).expect("candle conv")
}

/// y, dL/dx, dL/dw for L = Σ r·y + ½ Σ y².
fn conv_first_order(f: ConvFn, x: &Var, w: &Var, r: &Tensor, s: usize, p: usize) -> [Tensor; 3] {
    let y = f(x.as_tensor(), w.as_tensor(), s, p);
    let loss = ((&y * r).unwrap().sum_all().unwrap() + (y.sqr().unwrap().sum_all().unwrap() * 0.5))
        .unwrap();
    let g = loss.backward().unwrap();
    [
        y.detach(),
        g.get(x.as_tensor()).unwrap().detach(),
        g.get(w.as_tensor()).unwrap().detach(),
    ]
}

#[test]
fn conv_forward_and_gradients_match_candle_in_f64() {
    for (i, &(shape, o, (kh, kw), s, p)) in GEOMETRIES.iter().enumerate() {
        let seed = 100 * i as u64;
        let x = var(&shape, seed);
        let w = var(&[o, shape[1], kh, kw], seed + 1);
        let yshape = candle_conv(x.as_tensor(), w.as_tensor(), s, p)
            .dims()
            .to_vec();
        let r = randn(&yshape, 1.0, seed + 2, F64);
        let fast = conv_first_order(fast_conv, &x, &w, &r, s, p);
        let reference = conv_first_order(candle_conv, &x, &w, &r, s, p);
        for (what, a, b) in [
            ("y", &fast[0], &reference[0]),
            ("dx", &fast[1], &reference[1]),
            ("dw", &fast[2], &reference[2]),
        ] {
            assert_eq!(a.dims(), b.dims(), "{what} shape, geometry {i}");
            let e = max_rel(a, b);
            assert!(e < 1e-12, "{what} geometry {i}: max rel diff {e:e}");
        }
    }
}

/// The gradients of J = Σ vₓ·dL/dx + Σ v_w·dL/dw (a Hessian-vector product of L).
fn conv_second_order(
    f: ConvFn,
    x: &Var,
    w: &Var,
    r: &Tensor,
    v: &[Tensor; 2],
    s: usize,
    p: usize,
) -> [Tensor; 2] {
    let y = f(x.as_tensor(), w.as_tensor(), s, p);
    let loss = ((&y * r).unwrap().sum_all().unwrap() + (y.sqr().unwrap().sum_all().unwrap() * 0.5))
        .unwrap();
    let g = loss.backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap();
    let gw = g.get(w.as_tensor()).unwrap();
    assert!(
        gx.track_op() && gw.track_op(),
        "gradients must carry a graph"
    );
    let j = ((gx * &v[0]).unwrap().sum_all().unwrap() + (gw * &v[1]).unwrap().sum_all().unwrap())
        .unwrap();
    let h = j.backward().unwrap();
    [
        h.get(x.as_tensor()).expect("d/dx of J").detach(),
        h.get(w.as_tensor()).expect("d/dw of J").detach(),
    ]
}

#[test]
fn conv_second_order_matches_candle_in_f64() {
    autograd::with_second_order(|| {
        for (i, &(shape, o, (kh, kw), s, p)) in GEOMETRIES.iter().enumerate() {
            let seed = 1000 + 100 * i as u64;
            let x = var(&shape, seed);
            let w = var(&[o, shape[1], kh, kw], seed + 1);
            let yshape = candle_conv(x.as_tensor(), w.as_tensor(), s, p)
                .dims()
                .to_vec();
            let r = randn(&yshape, 1.0, seed + 2, F64);
            let v = [
                randn(&shape, 1.0, seed + 3, F64),
                randn(w.dims(), 1.0, seed + 4, F64),
            ];
            let fast = conv_second_order(fast_conv, &x, &w, &r, &v, s, p);
            let reference = conv_second_order(candle_conv, &x, &w, &r, &v, s, p);
            for (what, a, b) in [
                ("x", &fast[0], &reference[0]),
                ("w", &fast[1], &reference[1]),
            ] {
                let e = max_rel(a, b);
                assert!(e < 1e-12, "second order wrt {what}, geometry {i}: {e:e}");
            }
        }
        Ok(())
    })
    .unwrap();
}

/// BatchNorm in training mode written from candle primitives (the reference).
fn bn_reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Tensor {
    let rank = x.rank();
    let reduce: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
    let mut shape = vec![1usize; rank];
    shape[1] = x.dim(1).unwrap();
    let mean = x.mean_keepdim(reduce.as_slice()).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(reduce.as_slice()).unwrap();
    let xhat = c
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap();
    xhat.broadcast_mul(&gamma.reshape(shape.as_slice()).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape(shape.as_slice()).unwrap())
        .unwrap()
}

#[test]
fn batch_norm_matches_primitive_formula_in_f64() {
    let cases = [vec![4usize, 3, 5, 5], vec![6, 4], vec![2, 5, 3, 1]];
    for (i, shape) in cases.into_iter().enumerate() {
        // plain BN, BN + ReLU, BN + residual + ReLU (the ResNet block's tail), BN + residual
        for (residual, relu) in [(false, false), (false, true), (true, true), (true, false)] {
            let seed = 5000 + 10 * i as u64;
            let c = shape[1];
            // A mean far from 0 exercises the variance computation.
            let x = Var::from_tensor(&(randn(&shape, 2.0, seed, F64) + 3.0).unwrap()).unwrap();
            let gamma = var(&[c], seed + 1);
            let beta = var(&[c], seed + 2);
            let res = var(&shape, seed + 4);
            let r = randn(&shape, 1.0, seed + 3, F64);
            let eps = 1e-5;
            let stats = kernels::batch_stats(x.as_tensor()).unwrap();
            let mut vars = vec![&x, &gamma, &beta];
            if residual {
                vars.push(&res);
            }
            let run = |y: Tensor| weighted_grads(y, &r, &vars);
            let (xt, gt, bt) = (x.as_tensor(), gamma.as_tensor(), beta.as_tensor());
            let rt = residual.then(|| res.as_tensor());
            let fast =
                run(kernels::batch_norm_train_act(xt, gt, bt, rt, relu, &stats, eps).unwrap());
            let mut y = bn_reference(xt, gt, bt, eps);
            if let Some(rt) = rt {
                y = (y + rt).unwrap();
            }
            if relu {
                y = y.relu().unwrap();
            }
            let reference = run(y);
            for (k, what) in ["y", "dx", "dgamma", "dbeta", "dresidual"]
                .iter()
                .take(fast.len())
                .enumerate()
            {
                let e = max_rel(&fast[k], &reference[k]);
                assert!(
                    e < 1e-11,
                    "{what}, shape {shape:?}, residual {residual}, relu {relu}: max rel diff {e:e}"
                );
            }
            // Statistics: mean and biased variance.
            let reduce: Vec<usize> = (0..shape.len()).filter(|&d| d != 1).collect();
            let mean = xt.mean_keepdim(reduce.as_slice()).unwrap();
            let var_ = xt
                .broadcast_sub(&mean)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_keepdim(reduce.as_slice())
                .unwrap();
            let expected = Tensor::cat(
                &[mean.flatten_all().unwrap(), var_.flatten_all().unwrap()],
                0,
            )
            .unwrap()
            .reshape((2, c))
            .unwrap();
            assert!(max_rel(&stats, &expected) < 1e-13);
        }
    }
}

/// The fused BatchNorm in f32 (its vectorised AVX-512 reductions where the CPU has them)
/// against the primitive formula in f64 on the same (f32-rounded) values: statistics, output and
/// every gradient, for planes whose length is a multiple of the vector width and planes that end
/// mid-vector, with and without residual and ReLU, and with the ReLU mask replayed.
#[test]
fn batch_norm_f32_matches_primitive_formula_in_f64() {
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let cases = [
        vec![5usize, 3, 7, 9],
        vec![4, 2, 8, 8],
        vec![3, 2, 33, 1],
        vec![6, 4],
    ];
    for (i, shape) in cases.into_iter().enumerate() {
        for (residual, relu) in [(false, false), (false, true), (true, true), (true, false)] {
            let seed = 7000 + 10 * i as u64;
            let c = shape[1];
            // f32-representable values, so both precisions see the same inputs
            let round = |t: Tensor| f32_of(&t).to_dtype(F64).unwrap();
            let x64 = round((randn(&shape, 2.0, seed, F64) + 3.0).unwrap());
            let g64 = round(randn(&[c], 1.0, seed + 1, F64));
            let b64 = round(randn(&[c], 1.0, seed + 2, F64));
            let res64 = round(randn(&shape, 1.0, seed + 4, F64));
            let r64 = round(randn(&shape, 1.0, seed + 3, F64));
            let vars = |ts: &[&Tensor]| -> Vec<Var> {
                ts.iter().map(|t| Var::from_tensor(t).unwrap()).collect()
            };
            let v64 = vars(&[&x64, &g64, &b64, &res64]);
            let v32 = vars(&[&f32_of(&x64), &f32_of(&g64), &f32_of(&b64), &f32_of(&res64)]);
            let used = if residual { 4 } else { 3 };
            let eps = 1e-5;
            let reference = {
                let [x, g, b, rs] = [0, 1, 2, 3].map(|k| v64[k].as_tensor());
                let mut y = bn_reference(x, g, b, eps);
                if residual {
                    y = (y + rs).unwrap();
                }
                if relu {
                    y = y.relu().unwrap();
                }
                weighted_grads(y, &r64, &v64.iter().take(used).collect::<Vec<_>>())
            };
            let [x, g, b, rs] = [0, 1, 2, 3].map(|k| v32[k].as_tensor());
            let rt = residual.then_some(rs);
            let stats = kernels::batch_stats(x).unwrap();
            let reduce: Vec<usize> = (0..shape.len()).filter(|&d| d != 1).collect();
            let mean = x64.mean_keepdim(reduce.as_slice()).unwrap();
            let var_ = (x64.broadcast_sub(&mean).unwrap().sqr().unwrap())
                .mean_keepdim(reduce.as_slice())
                .unwrap();
            for (k, want) in [mean, var_].iter().enumerate() {
                let got = stats.get(k).unwrap().to_dtype(F64).unwrap();
                let e = max_rel(&got, &want.flatten_all().unwrap());
                assert!(
                    e < 1e-6,
                    "statistics {k}, shape {shape:?}: max rel diff {e:e}"
                );
            }
            let r32 = f32_of(&r64);
            let fused =
                |y: Tensor| weighted_grads(y, &r32, &v32.iter().take(used).collect::<Vec<_>>());
            let fast =
                fused(kernels::batch_norm_train_act(x, g, b, rt, relu, &stats, eps).unwrap());
            for (k, what) in ["y", "dx", "dgamma", "dbeta", "dresidual"]
                .iter()
                .take(fast.len())
                .enumerate()
            {
                let e = max_rel(&fast[k].to_dtype(F64).unwrap(), &reference[k]);
                assert!(
                    e < 2e-5,
                    "{what}, shape {shape:?}, residual {residual}, relu {relu}: max rel diff {e:e}"
                );
            }
            if relu {
                // the replayed mask gives the ReLU's results exactly
                let mask = kernels::batch_norm_relu_mask(x, g, b, rt, &stats, eps).unwrap();
                let replayed = fused(
                    kernels::batch_norm_train_masked(x, g, b, rt, &mask, &stats, eps).unwrap(),
                );
                for (k, (a, b)) in replayed.iter().zip(&fast).enumerate() {
                    assert_eq!(
                        flat(std::slice::from_ref(a)),
                        flat(std::slice::from_ref(b)),
                        "replayed mask, output {k}, shape {shape:?}, residual {residual}"
                    );
                }
            }
        }
    }
}

/// The fused ReLU keeps candle's ReLU'(0) = 1 at pre-activations that are exactly 0.
#[test]
fn fused_relu_derivative_at_zero_is_one() {
    // x = [−1, 1] per channel: μ = 0, x̂ = ±1/√(1+ε); with γ = 1, β = 0 and residual −x̂ the
    // pre-activation is exactly 0 everywhere.
    let x = Var::from_tensor(&Tensor::new(&[[-1.0f64], [1.0]], &candle_core::Device::Cpu).unwrap())
        .unwrap();
    let gamma =
        Var::from_tensor(&Tensor::new(&[1.0f64], &candle_core::Device::Cpu).unwrap()).unwrap();
    let beta =
        Var::from_tensor(&Tensor::new(&[0.0f64], &candle_core::Device::Cpu).unwrap()).unwrap();
    let stats = kernels::batch_stats(x.as_tensor()).unwrap();
    let xhat = kernels::batch_norm_train(
        x.as_tensor(),
        gamma.as_tensor(),
        beta.as_tensor(),
        &stats,
        1e-5,
    )
    .unwrap()
    .detach();
    let res = Var::from_tensor(&xhat.neg().unwrap()).unwrap();
    let y = kernels::batch_norm_train_act(
        x.as_tensor(),
        gamma.as_tensor(),
        beta.as_tensor(),
        Some(res.as_tensor()),
        true,
        &stats,
        1e-5,
    )
    .unwrap();
    assert_eq!(flat(std::slice::from_ref(&y)), vec![0.0, 0.0]);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        flat(&[g.get(res.as_tensor()).unwrap().clone()]),
        vec![1.0, 1.0]
    );
}

#[test]
fn fused_batch_norm_refuses_second_order() {
    autograd::with_second_order(|| {
        let x = var(&[3, 2, 2, 2], 1);
        let gamma = var(&[2], 2);
        let beta = var(&[2], 3);
        let stats = kernels::batch_stats(x.as_tensor())?;
        let y = kernels::batch_norm_train(
            x.as_tensor(),
            gamma.as_tensor(),
            beta.as_tensor(),
            &stats,
            1e-5,
        )?;
        let err = y
            .sqr()?
            .sum_all()?
            .backward()
            .expect_err("must refuse, not cut the graph");
        assert!(err.to_string().contains("first-order only"), "{err}");
        Ok(())
    })
    .unwrap();
}

#[test]
fn relu_matches_candle_to_second_order_in_f64() {
    autograd::with_second_order(|| {
        let mut v = flat(&[randn(&[4, 3, 5], 1.0, 9, F64)]);
        // exact zeros: candle's convention ReLU'(0) = 1 must hold in both
        v[0] = 0.0;
        v[7] = 0.0;
        let x = Var::from_tensor(&Tensor::from_vec(v, (4, 3, 5), &candle_core::Device::Cpu)?)?;
        let r = randn(&[4, 3, 5], 1.0, 10, F64);
        let dir = randn(&[4, 3, 5], 1.0, 11, F64);
        let run = |y: Tensor| -> [Tensor; 3] {
            // L = Σ r·y·x (second derivative non-zero through the mask-weighted product)
            let l = ((&y * &r).unwrap() * x.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap();
            let g = l.backward().unwrap();
            let gx = g.get(x.as_tensor()).unwrap();
            let h = (gx * &dir).unwrap().sum_all().unwrap().backward().unwrap();
            [
                y.detach(),
                gx.detach(),
                h.get(x.as_tensor()).unwrap().detach(),
            ]
        };
        let fast = run(kernels::relu(x.as_tensor())?);
        let reference = run(x.as_tensor().relu()?);
        for (k, what) in ["y", "dx", "d2x"].iter().enumerate() {
            assert!(max_rel(&fast[k], &reference[k]) < 1e-14, "{what}");
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn kernels_reject_bad_input_clearly() {
    let x = randn(&[2, 3, 4, 4], 1.0, 1, F64);
    let w = randn(&[2, 4, 3, 3], 1.0, 2, F64);
    let err = kernels::conv2d(&x, &w, 1, 1).unwrap_err().to_string();
    assert!(
        err.contains("3 channels") && err.contains("expects 4"),
        "{err}"
    );
    let w = randn(&[2, 3, 7, 7], 1.0, 2, F64);
    let err = kernels::conv2d(&x, &w, 1, 0).unwrap_err().to_string();
    assert!(err.contains("kernel larger"), "{err}");
    let mixed = randn(&[2, 3, 3, 3], 1.0, 2, DType::F32);
    assert!(kernels::conv2d(&x, &mixed, 1, 1).is_err());
}

/// Every kernel gives bit-identical results whatever the thread count (fixed partitions, no
/// reduction whose order depends on work stealing): training runs are reproducible.
/// The direct 3×3 kernels (f32, AVX-512) against candle's convolution in f64: values and both
/// gradients, on shapes that exercise every remainder (output channel blocks of 8/4/1, vector
/// blocks of 3/2/1, planes that end mid-vector, widths below and above one vector, a 1×1
/// plane, image chunks of 8 with a remainder), at stride 1 and at stride 2 (even planes, down
/// to 2×2, with phase planes of odd size and of more than one vector).
#[test]
fn direct_conv3x3_matches_candle_f64() {
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        kernels::direct::available(),
        std::arch::is_x86_feature_detected!("avx512f"),
        "direct kernels must run wherever AVX-512F does"
    );
    if !kernels::direct::available() {
        eprintln!("no AVX-512F here: the direct kernels are not used, nothing to compare");
        return;
    }
    for (i, &(shape, o, stride)) in [
        ([9usize, 3, 5, 7], 17usize, 1usize),
        ([10, 16, 8, 8], 16, 1),
        ([3, 5, 1, 1], 6, 1),
        ([2, 4, 16, 33], 4, 1),
        ([17, 6, 3, 16], 13, 1),
        ([9, 3, 10, 14], 17, 2),
        ([10, 16, 32, 32], 9, 2),
        ([3, 5, 2, 2], 6, 2),
        ([2, 4, 6, 66], 4, 2),
    ]
    .iter()
    .enumerate()
    {
        assert!(kernels::direct::applies(&kernels::cpu::ConvGeom {
            n: shape[0],
            c: shape[1],
            h: shape[2],
            w: shape[3],
            o,
            kh: 3,
            kw: 3,
            stride,
            pad: 1,
        }));
        let seed = 100 + 10 * i as u64;
        let x64 = var(&shape, seed);
        let w64 = Var::from_tensor(&randn(&[o, shape[1], 3, 3], 0.3, seed + 1, F64)).unwrap();
        let y_shape = [
            shape[0],
            o,
            shape[2].div_ceil(stride),
            shape[3].div_ceil(stride),
        ];
        let r64 = randn(&y_shape, 1.0, seed + 2, F64);
        let want = conv_first_order(candle_conv, &x64, &w64, &r64, stride, 1);
        let f32v =
            |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let (x32, w32) = (f32v(&x64), f32v(&w64));
        let r32 = r64.to_dtype(DType::F32).unwrap();
        let got = conv_first_order(fast_conv, &x32, &w32, &r32, stride, 1);
        for (name, g, w) in [
            ("y", &got[0], &want[0]),
            ("dx", &got[1], &want[1]),
            ("dw", &got[2], &want[2]),
        ] {
            let err = max_rel(&g.to_dtype(F64).unwrap(), w);
            assert!(
                err < 2e-6,
                "{shape:?}→{o} stride {stride}: {name} relative error {err:.2e}"
            );
        }
    }
}

#[test]
fn kernels_are_bit_identical_across_thread_counts() {
    let x = Var::from_tensor(&randn(&[37, 8, 12, 12], 1.0, 1, DType::F32)).unwrap();
    let w = Var::from_tensor(&randn(&[16, 8, 3, 3], 0.2, 2, DType::F32)).unwrap();
    // a 3×3 stride-1 convolution first: the direct kernels where AVX-512F runs
    let w1 = Var::from_tensor(&randn(&[8, 8, 3, 3], 0.2, 6, DType::F32)).unwrap();
    let gamma = Var::from_tensor(&randn(&[16], 1.0, 3, DType::F32)).unwrap();
    let beta = Var::from_tensor(&randn(&[16], 1.0, 4, DType::F32)).unwrap();
    let r = randn(&[37, 16, 6, 6], 1.0, 5, DType::F32);
    let run = || -> Vec<f64> {
        let y1 = kernels::conv2d(x.as_tensor(), w1.as_tensor(), 1, 1).unwrap();
        let y = kernels::conv2d(&y1, w.as_tensor(), 2, 1).unwrap();
        let st = kernels::batch_stats(&y).unwrap();
        let z = kernels::batch_norm_train_act(
            &y,
            gamma.as_tensor(),
            beta.as_tensor(),
            None,
            true,
            &st,
            1e-5,
        )
        .unwrap();
        let g = (z * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let ts: Vec<Tensor> = [&x, &w1, &w, &gamma, &beta]
            .iter()
            .map(|v| g.get(v.as_tensor()).unwrap().clone())
            .chain([st])
            .collect();
        flat(&ts)
    };
    let reference = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(run);
    for threads in [2, 3, 4] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for _ in 0..3 {
            let got = pool.install(run);
            assert!(
                got.iter()
                    .zip(&reference)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{threads} threads differ from 1 thread"
            );
        }
    }
}

#[test]
fn pair_sums_match_candle_in_f64() {
    for (n, dt) in [
        (100_003usize, F64),
        (37, DType::F32),
        (16_384 * 3, DType::F32),
        (16_384 + 21, DType::F32),
    ] {
        let a = randn(&[n], 1.0, 1, dt);
        let b = (randn(&[n], 1.0, 2, dt) + 0.5).unwrap();
        let got = kernels::pair_sums(&a, &b)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let (a, b) = (a.to_dtype(F64).unwrap(), b.to_dtype(F64).unwrap());
        let s = |t: Tensor| t.sum_all().unwrap().to_scalar::<f64>().unwrap();
        let want = [
            s((&a * &b).unwrap()),
            s(a.sqr().unwrap()),
            s(b.sqr().unwrap()),
            s((&a - &b).unwrap().sqr().unwrap()),
        ];
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }
    let a = randn(&[3, 4], 1.0, 1, F64);
    let b = randn(&[4, 3], 1.0, 1, F64);
    assert!(kernels::pair_sums(&a, &b).is_err());
}

/// The recording and replaying forms of the fused BatchNorm + ReLU: the recorded mask is
/// `[pre-activation ≥ 0]`, and replaying it gives the ReLU's values and gradients.
#[test]
fn batch_norm_mask_record_and_replay_match_the_relu() {
    for residual in [false, true] {
        let shape = [4usize, 3, 5, 5];
        let x = var(&shape, 71);
        let gamma = var(&[3], 72);
        let beta = var(&[3], 73);
        let res = var(&shape, 74);
        let r = randn(&shape, 1.0, 75, F64);
        let (xt, gt, bt) = (x.as_tensor(), gamma.as_tensor(), beta.as_tensor());
        let rt = residual.then(|| res.as_tensor());
        let stats = kernels::batch_stats(xt).unwrap();
        let mut pre = bn_reference(xt, gt, bt, 1e-5);
        if let Some(rt) = rt {
            pre = (pre + rt).unwrap();
        }
        let want_mask = pre.ge(0.0).unwrap().to_dtype(F64).unwrap();
        let mask = kernels::batch_norm_relu_mask(xt, gt, bt, rt, &stats, 1e-5).unwrap();
        assert!(!mask.track_op());
        assert_eq!(flat(std::slice::from_ref(&mask)), flat(&[want_mask]));
        let mut vars = vec![&x, &gamma, &beta];
        if residual {
            vars.push(&res);
        }
        let grads = |y: Tensor| weighted_grads(y, &r, &vars);
        let replayed =
            grads(kernels::batch_norm_train_masked(xt, gt, bt, rt, &mask, &stats, 1e-5).unwrap());
        let relu =
            grads(kernels::batch_norm_train_act(xt, gt, bt, rt, true, &stats, 1e-5).unwrap());
        for (k, (a, b)) in replayed.iter().zip(&relu).enumerate() {
            let e = max_rel(a, b);
            assert!(e < 1e-13, "output {k}, residual {residual}: {e:e}");
        }
    }
}

#[test]
fn scaled_sum_matches_candle_ops_exactly() {
    for (n, dt) in [
        (100_003usize, F64),
        (37, DType::F32),
        (16_384 * 2 + 5, DType::F32),
    ] {
        let a = randn(&[n], 1.0, 11, dt);
        let b = randn(&[n], 1.0, 12, dt);
        for (beta, alpha) in [(-1.0, 256.0), (0.37, 1.0), (0.0, -3.5)] {
            let got = kernels::scaled_sum(&a, &b, beta, alpha).unwrap();
            let want = (&a + b.affine(beta, 0.0).unwrap())
                .unwrap()
                .affine(alpha, 0.0)
                .unwrap();
            assert_eq!(got.dtype(), dt);
            assert_eq!(
                flat(std::slice::from_ref(&got)),
                flat(std::slice::from_ref(&want)),
                "n {n}, β {beta}, α {alpha}"
            );
        }
    }
    let a = randn(&[3, 4], 1.0, 1, F64);
    let b = randn(&[4, 3], 1.0, 1, F64);
    assert!(kernels::scaled_sum(&a, &b, 1.0, 1.0).is_err());
}
