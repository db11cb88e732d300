//! The candle-op versions of the ops (`sgr_kernels::generic`, what runs off the CPU) against the
//! fast CPU kernels, in f64: values and first-order gradients through candle's backward agree
//! to 1e-10 of the largest magnitude; and dtypes other than f32/f64 take the candle-op path.

use candle_core::{DType, Device, Tensor, Var};
use sgr_kernels::{self as fast, generic};

const TOL: f64 = 1e-10;

type Result<T> = candle_core::Result<T>;
/// `conv2d`.
type ConvFn = fn(&Tensor, &Tensor, usize, usize) -> Result<Tensor>;
/// `conv2d_input_grad` and `conv2d_weight_grad`.
type ConvGradFn = fn(&Tensor, &Tensor, (usize, usize), usize, usize) -> Result<Tensor>;

/// A deterministic tensor of N(0, 1) entries (splitmix64 and Box-Muller).
fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - next(), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, seed)).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a − b|` over the largest `|b|`.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The value of `y` and the gradients of `Σ y·r` with respect to `vars` (zeros where none).
fn value_and_grads(y: Tensor, r: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y.detach()];
    out.extend(vars.iter().map(|v| {
        grads
            .get(v.as_tensor())
            .cloned()
            .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
    }));
    out
}

fn assert_close(got: &[Tensor], want: &[Tensor], what: &str) {
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        let e = max_rel(g, w);
        assert!(e < TOL, "{what}: output {k} (0 = value) differs by {e:e}");
    }
}

/// Every convolution op and both of its first-order gradients, over geometries with 1×1, 3×3,
/// 5×5 and 3×2 kernels, strides 1–3, padding 0–2, axes of different remainders at stride 2 and
/// padding that reaches past the kernel.
#[test]
fn conv_ops_match_the_fast_kernels() {
    for (i, &(x_shape, o, (kh, kw), stride, pad)) in [
        ([2usize, 3, 5, 5], 4usize, (3usize, 3usize), 1usize, 1usize),
        ([2, 3, 7, 8], 4, (3, 3), 2, 1),
        ([3, 2, 6, 6], 3, (1, 1), 1, 0),
        ([2, 2, 9, 7], 3, (5, 5), 3, 2),
        ([1, 2, 5, 6], 2, (3, 2), 2, 0),
        ([2, 2, 3, 3], 2, (1, 1), 3, 2),
    ]
    .iter()
    .enumerate()
    {
        let what = format!("{x_shape:?}→{o} k{kh}x{kw} s{stride} p{pad}");
        let seed = 10 * i as u64;
        let (h, w) = (x_shape[2], x_shape[3]);
        let x = var(&x_shape, seed);
        let wt = var(&[o, x_shape[1], kh, kw], seed + 1);
        let y_dims = fast::conv2d(x.as_tensor(), wt.as_tensor(), stride, pad)
            .unwrap()
            .dims()
            .to_vec();
        let gy = var(&y_dims, seed + 2);

        let r = randn(&y_dims, seed + 3);
        let run = |f: ConvFn| {
            let y = f(x.as_tensor(), wt.as_tensor(), stride, pad).unwrap();
            value_and_grads(y, &r, &[&x, &wt])
        };
        assert_close(
            &run(generic::conv2d),
            &run(fast::conv2d),
            &format!("conv2d {what}"),
        );

        let r = randn(&x_shape, seed + 4);
        let y = |f: ConvGradFn| {
            let y = f(gy.as_tensor(), wt.as_tensor(), (h, w), stride, pad).unwrap();
            value_and_grads(y, &r, &[&gy, &wt])
        };
        assert_close(
            &y(generic::conv2d_input_grad),
            &y(fast::conv2d_input_grad),
            &format!("conv2d_input_grad {what}"),
        );

        let r = randn(wt.dims(), seed + 5);
        let y = |f: ConvGradFn| {
            let y = f(x.as_tensor(), gy.as_tensor(), (kh, kw), stride, pad).unwrap();
            value_and_grads(y, &r, &[&x, &gy])
        };
        assert_close(
            &y(generic::conv2d_weight_grad),
            &y(fast::conv2d_weight_grad),
            &format!("conv2d_weight_grad {what}"),
        );
    }
}

#[test]
fn conv_ops_reject_bad_geometry_on_both_paths() {
    let x = randn(&[2, 3, 4, 4], 1);
    let w = randn(&[2, 4, 3, 3], 2);
    for err in [
        fast::conv2d(&x, &w, 1, 1).unwrap_err(),
        generic::conv2d(&x, &w, 1, 1).unwrap_err(),
    ] {
        let err = err.to_string();
        assert!(
            err.contains("3 channels") && err.contains("expects 4"),
            "{err}"
        );
    }
    let w = randn(&[2, 3, 3, 3], 2);
    assert!(fast::conv2d(&x, &w, 0, 1).is_err());
    assert!(generic::conv2d(&x, &w, 0, 1).is_err());
    let gy = randn(&[2, 2, 3, 3], 3);
    assert!(fast::conv2d_input_grad(&gy, &w, (4, 4), 1, 1).is_err());
    assert!(generic::conv2d_input_grad(&gy, &w, (4, 4), 1, 1).is_err());
    assert!(fast::conv2d_weight_grad(&x, &gy, (3, 3), 1, 1).is_err());
    assert!(generic::conv2d_weight_grad(&x, &gy, (3, 3), 1, 1).is_err());
}

#[test]
fn batch_stats_match() {
    for shape in [vec![4usize, 3, 5, 5], vec![6, 4], vec![3, 2, 7]] {
        let x = randn(&shape, 7).affine(2.0, 3.0).unwrap();
        let (f, g) = (
            fast::batch_stats(&x).unwrap(),
            generic::batch_stats(&x).unwrap(),
        );
        assert_eq!(g.dims(), [2, shape[1]]);
        assert!(!f.track_op() && !g.track_op());
        assert_close(&[g], &[f], &format!("batch_stats {shape:?}"));
    }
    // detached even for a variable
    let x = var(&[4, 3, 2, 2], 8);
    assert!(!generic::batch_stats(x.as_tensor()).unwrap().track_op());
}

/// The BatchNorm ops, with the batch's own statistics and with statistics of another batch
/// (the input gradient follows the batch-statistics formula evaluated at the given ones):
/// values, gradients of x, γ, β and the residual; the statistics get no gradient on either path.
#[test]
fn batch_norm_ops_match_the_fused_kernels() {
    let eps = 1e-5;
    for shape in [vec![4usize, 3, 5, 5], vec![6, 4]] {
        let c = shape[1];
        let x = var(&shape, 21);
        let gamma = var(&[c], 22);
        let beta = var(&[c], 23);
        let res = var(&shape, 24);
        let r = randn(&shape, 25);
        let own = fast::batch_stats(x.as_tensor()).unwrap();
        let other = fast::batch_stats(&randn(&shape, 26).affine(1.5, 0.3).unwrap()).unwrap();
        for (stats_name, stats) in [("own", &own), ("other", &other)] {
            // a variable, to see that neither path sends it a gradient
            let stats = Var::from_tensor(stats).unwrap();
            for residual in [false, true] {
                let rt = residual.then(|| res.as_tensor());
                let mut vars = vec![&x, &gamma, &beta, &stats];
                if residual {
                    vars.push(&res);
                }
                let (xt, gt, bt, st) = (
                    x.as_tensor(),
                    gamma.as_tensor(),
                    beta.as_tensor(),
                    stats.as_tensor(),
                );
                let what = format!("{shape:?}, {stats_name} stats, residual {residual}");
                let check = |name: &str, got: Vec<Tensor>, want: Vec<Tensor>| {
                    assert_eq!(flat(&got[4]), vec![0.0; 2 * c], "{name} {what}: stats grad");
                    assert_close(&got, &want, &format!("{name} {what}"));
                };
                for relu in [false, true] {
                    let run = |y: Tensor| value_and_grads(y, &r, &vars);
                    check(
                        &format!("batch_norm_train_act relu {relu}"),
                        run(generic::batch_norm_train_act(xt, gt, bt, rt, relu, st, eps).unwrap()),
                        run(fast::batch_norm_train_act(xt, gt, bt, rt, relu, st, eps).unwrap()),
                    );
                }
                if !residual {
                    let run = |y: Tensor| value_and_grads(y, &r, &vars);
                    check(
                        "batch_norm_train",
                        run(generic::batch_norm_train(xt, gt, bt, st, eps).unwrap()),
                        run(fast::batch_norm_train(xt, gt, bt, st, eps).unwrap()),
                    );
                }
                let mask = fast::batch_norm_relu_mask(xt, gt, bt, rt, st, eps).unwrap();
                let gmask = generic::batch_norm_relu_mask(xt, gt, bt, rt, st, eps).unwrap();
                assert!(!gmask.track_op(), "{what}");
                assert_eq!(gmask.dtype(), DType::F64);
                assert_eq!(flat(&gmask), flat(&mask), "relu mask {what}");
                let coin = randn(&shape, 27)
                    .ge(0.0)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap();
                for (mask_name, m) in [("recorded", &mask), ("random", &coin)] {
                    let run = |y: Tensor| value_and_grads(y, &r, &vars);
                    check(
                        &format!("batch_norm_train_masked, {mask_name} mask"),
                        run(generic::batch_norm_train_masked(xt, gt, bt, rt, m, st, eps).unwrap()),
                        run(fast::batch_norm_train_masked(xt, gt, bt, rt, m, st, eps).unwrap()),
                    );
                }
            }
        }
    }
}

#[test]
fn relu_matches_with_derivative_one_at_zero() {
    let x = randn(&[5, 7, 3], 31);
    let x = x
        .ge(0.5)
        .unwrap()
        .where_cond(&x.zeros_like().unwrap(), &x)
        .unwrap();
    assert!(flat(&x).contains(&0.0));
    let x = Var::from_tensor(&x).unwrap();
    let r = randn(&[5, 7, 3], 32);
    let run = |y: Tensor| value_and_grads(y, &r, &[&x]);
    let (g, f) = (
        run(generic::relu(x.as_tensor()).unwrap()),
        run(fast::relu(x.as_tensor()).unwrap()),
    );
    assert_close(&g, &f, "relu");
    let (xs, rs, gs) = (flat(x.as_tensor()), flat(&r), flat(&g[1]));
    for ((&xv, &rv), &gv) in xs.iter().zip(&rs).zip(&gs) {
        if xv == 0.0 {
            assert_eq!(gv, rv, "ReLU'(0) = 1");
        }
    }
}

#[test]
fn scaled_sum_matches_exactly() {
    let a = var(&[1000, 3], 41);
    let b = randn(&[1000, 3], 42);
    for (beta, alpha) in [(-1.0, 256.0), (0.37, 1.0), (0.0, -3.5)] {
        let f = fast::scaled_sum(a.as_tensor(), &b, beta, alpha).unwrap();
        let g = generic::scaled_sum(a.as_tensor(), &b, beta, alpha).unwrap();
        assert!(!f.track_op() && !g.track_op());
        assert_eq!(flat(&g), flat(&f), "β {beta}, α {alpha}");
    }
    let c = randn(&[3, 1000], 43);
    assert!(fast::scaled_sum(&b, &c, 1.0, 1.0).is_err());
    assert!(generic::scaled_sum(&b, &c, 1.0, 1.0).is_err());
}

#[test]
fn pair_sums_match_as_f64_tensors() {
    for (n, dtype) in [(100_003usize, DType::F64), (16_384 + 21, DType::F32)] {
        let a = randn(&[n], 51).to_dtype(dtype).unwrap();
        let b = (randn(&[n], 52) + 0.5).unwrap().to_dtype(dtype).unwrap();
        let f = fast::pair_sums(&a, &b).unwrap();
        let g = generic::pair_sums(&a, &b).unwrap();
        for t in [&f, &g] {
            assert_eq!((t.dtype(), t.dims()), (DType::F64, &[4usize][..]));
            assert!(!t.track_op());
        }
        let e = max_rel(&g, &f);
        assert!(e < 1e-12, "{dtype:?}: {e:e}");
    }
    let (a, b) = (randn(&[3, 4], 53), randn(&[4, 3], 54));
    assert!(fast::pair_sums(&a, &b).is_err());
    assert!(generic::pair_sums(&a, &b).is_err());
}

/// On the CPU in f16 (or with operands of two dtypes) every op runs its candle-op version.
#[test]
fn other_dtypes_take_the_candle_op_path() {
    let h = |t: Tensor| t.to_dtype(DType::F16).unwrap();
    let x = h(randn(&[2, 3, 6, 6], 61));
    let w = h((randn(&[4, 3, 3, 3], 62) * 0.3).unwrap());
    let same = |a: Tensor, b: Tensor, what: &str| {
        assert_eq!(a.dtype(), b.dtype(), "{what}");
        assert_eq!(flat(&a), flat(&b), "{what}");
    };
    same(
        fast::conv2d(&x, &w, 2, 1).unwrap(),
        generic::conv2d(&x, &w, 2, 1).unwrap(),
        "conv2d",
    );
    let gy = h(randn(&[2, 4, 3, 3], 63));
    same(
        fast::conv2d_input_grad(&gy, &w, (6, 6), 2, 1).unwrap(),
        generic::conv2d_input_grad(&gy, &w, (6, 6), 2, 1).unwrap(),
        "conv2d_input_grad",
    );
    same(
        fast::conv2d_weight_grad(&x, &gy, (3, 3), 2, 1).unwrap(),
        generic::conv2d_weight_grad(&x, &gy, (3, 3), 2, 1).unwrap(),
        "conv2d_weight_grad",
    );
    same(fast::relu(&x).unwrap(), generic::relu(&x).unwrap(), "relu");
    let st = fast::batch_stats(&x).unwrap();
    same(st.clone(), generic::batch_stats(&x).unwrap(), "batch_stats");
    let (g, b) = (h(randn(&[3], 64)), h(randn(&[3], 65)));
    let r = h(randn(&[2, 3, 6, 6], 66));
    same(
        fast::batch_norm_train_act(&x, &g, &b, Some(&r), true, &st, 1e-5).unwrap(),
        generic::batch_norm_train_act(&x, &g, &b, Some(&r), true, &st, 1e-5).unwrap(),
        "batch_norm_train_act",
    );
    let m = fast::batch_norm_relu_mask(&x, &g, &b, Some(&r), &st, 1e-5).unwrap();
    same(
        m.clone(),
        generic::batch_norm_relu_mask(&x, &g, &b, Some(&r), &st, 1e-5).unwrap(),
        "batch_norm_relu_mask",
    );
    same(
        fast::batch_norm_train_masked(&x, &g, &b, None, &m, &st, 1e-5).unwrap(),
        generic::batch_norm_train_masked(&x, &g, &b, None, &m, &st, 1e-5).unwrap(),
        "batch_norm_train_masked",
    );
    same(
        fast::scaled_sum(&x, &r, 0.5, 2.0).unwrap(),
        generic::scaled_sum(&x, &r, 0.5, 2.0).unwrap(),
        "scaled_sum",
    );
    // two dtypes: f16 against f32
    let x32 = x.to_dtype(DType::F32).unwrap();
    let p = fast::pair_sums(&x, &x32).unwrap();
    assert_eq!(p.dtype(), DType::F64);
    same(p, generic::pair_sums(&x, &x32).unwrap(), "pair_sums");
}
