//! The kernels and the engine on the device that `SGR_TEST_DEVICE` names (`cpu`, the default,
//! or `cuda` in a build with the `cuda` feature), in f32, against references computed on the
//! CPU in f64 with candle's own primitive ops: the convolution family, BatchNorm, max-pool,
//! and short runs of every method, SGR's finite differences on the device against the exact
//! double backward on the CPU.

use candle_core::{DType, Device, Tensor, Var};
use sgr_core::ctx::Ctx;
use sgr_core::method::{Method, Objective};
use sgr_core::objective::Batch;
use sgr_core::sgr::SgrGrad;
use sgr_core::trainer::Trainer;
use sgr_integration_tests::{randn, test_device, trainer_config};
use sgr_models::{CifarResNet, HeadKind, ModelOptions, ResNetConfig, SplitStrategy};

/// Largest |a − b| over max(|b|, 1e-3 · max|b|), both read as f64 on the CPU.
fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| -> Vec<f64> {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("read tensor")
    };
    let (a, b) = (f(a), f(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())) * 1e-3;
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(scale).max(1e-30))
        .fold(0.0, f64::max)
}

/// `t` (a CPU f64 tensor) as f32 on `dev`.
fn on(t: &Tensor, dev: &Device) -> Tensor {
    t.to_dtype(DType::F32)
        .and_then(|t| t.to_device(dev))
        .expect("copy")
}

/// f32 on the device against f64 on the CPU.
const TOL: f64 = 2e-4;

/// The convolution, its input gradient and its weight gradient, at the geometries of the
/// zoo's networks (3×3 stride 1 and 2, 1×1 stride 1 and 2, the 7×7 stem), match candle's
/// convolution and its autograd in f64 on the CPU.
#[test]
fn convolution_family_matches_cpu_f64() {
    let dev = test_device();
    for (i, &(c, o, k, s, p, hw)) in [
        (8usize, 16usize, 3usize, 1usize, 1usize, 9usize),
        (8, 16, 3, 2, 1, 9),
        (16, 8, 1, 1, 0, 6),
        (16, 32, 1, 2, 0, 7),
        (3, 8, 7, 2, 3, 17),
    ]
    .iter()
    .enumerate()
    {
        let seed = 10 * i as u64;
        let x = Var::from_tensor(&randn(&[2, c, hw, hw], 1.0, seed, DType::F64)).unwrap();
        let w = Var::from_tensor(&randn(&[o, c, k, k], 0.3, seed + 1, DType::F64)).unwrap();
        let y = x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap();
        let g = randn(y.dims(), 1.0, seed + 2, DType::F64);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (dx, dw) = (grads.get(&x).unwrap(), grads.get(&w).unwrap());

        let (xd, wd, gd) = (
            on(x.as_tensor(), &dev),
            on(w.as_tensor(), &dev),
            on(&g, &dev),
        );
        let yd = sgr_kernels::conv2d(&xd, &wd, s, p).unwrap();
        let dxd = sgr_kernels::conv2d_input_grad(&gd, &wd, (hw, hw), s, p).unwrap();
        let dwd = sgr_kernels::conv2d_weight_grad(&xd, &gd, (k, k), s, p).unwrap();
        for (name, got, want) in [("y", &yd, &y), ("dx", &dxd, dx), ("dw", &dwd, dw)] {
            assert!(got.device().same_device(&dev), "{name} left the device");
            let e = max_rel(got, want);
            assert!(e < TOL, "{k}x{k}/{s} pad {p} {name}: rel err {e:e}");
        }
    }
}

/// Training-mode BatchNorm (fused, with residual and ReLU) and its gradients match the
/// formula in f64 on the CPU.
#[test]
fn batch_norm_matches_cpu_f64() {
    let dev = test_device();
    let (n, c, hw) = (4, 6, 5);
    let x = Var::from_tensor(&randn(&[n, c, hw, hw], 2.0, 1, DType::F64)).unwrap();
    let gamma = Var::from_tensor(&randn(&[c], 1.0, 2, DType::F64)).unwrap();
    let beta = Var::from_tensor(&randn(&[c], 1.0, 3, DType::F64)).unwrap();
    let r = Var::from_tensor(&randn(&[n, c, hw, hw], 1.0, 4, DType::F64)).unwrap();
    let eps = 1e-5;
    let reference = {
        let xs = x.as_tensor();
        let mean = xs
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .mean_keepdim(3)
            .unwrap();
        let d = xs.broadcast_sub(&mean).unwrap();
        let var = d
            .sqr()
            .unwrap()
            .mean_keepdim(0)
            .unwrap()
            .mean_keepdim(2)
            .unwrap();
        let var = var.mean_keepdim(3).unwrap();
        let xhat = d
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        let shape = (1, c, 1, 1);
        let y = xhat
            .broadcast_mul(&gamma.as_tensor().reshape(shape).unwrap())
            .unwrap()
            .broadcast_add(&beta.as_tensor().reshape(shape).unwrap())
            .unwrap();
        (y + r.as_tensor()).unwrap().relu().unwrap()
    };
    let g = randn(reference.dims(), 1.0, 5, DType::F64);
    let want = (&reference * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let vars: Vec<Var> = [&x, &gamma, &beta, &r]
        .iter()
        .map(|v| Var::from_tensor(&on(v.as_tensor(), &dev)).unwrap())
        .collect();
    let stats = sgr_kernels::batch_stats(vars[0].as_tensor()).unwrap();
    let y = sgr_kernels::batch_norm_train_act(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        Some(vars[3].as_tensor()),
        true,
        &stats,
        eps,
    )
    .unwrap();
    let e = max_rel(&y, &reference);
    assert!(e < TOL, "forward: rel err {e:e}");
    let got = (&y * &on(&g, &dev))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v, w) in [
        ("x", 0, &x),
        ("gamma", 1, &gamma),
        ("beta", 2, &beta),
        ("residual", 3, &r),
    ] {
        let e = max_rel(got.get(&vars[v]).unwrap(), want.get(w).unwrap());
        assert!(e < 1e-3, "d{name}: rel err {e:e}");
    }
}

/// Max-pool 3/2/1 (the ImageNet stem's) selects the same elements as the CPU in f64 and sends
/// the gradient back to them alone.
#[test]
fn max_pool_forward_and_backward_match_cpu_f64() {
    let dev = test_device();
    // Distinct values, so there are no ties for the devices to break differently.
    let n = 2 * 3 * 9 * 9;
    let mut v: Vec<f64> = (0..n).map(|i| ((i * 7919) % n) as f64 / n as f64).collect();
    v.iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x += 1e-3 * (i % 5) as f64);
    let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, 9, 9), &Device::Cpu).unwrap()).unwrap();
    let y = sgr_core::nn::pool::max_pool2d(x.as_tensor(), 3, 2, 1, &mut Ctx::train()).unwrap();
    let g = randn(y.dims(), 1.0, 7, DType::F64);
    let want = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();

    let xd = Var::from_tensor(&on(x.as_tensor(), &dev)).unwrap();
    let yd = sgr_core::nn::pool::max_pool2d(xd.as_tensor(), 3, 2, 1, &mut Ctx::train()).unwrap();
    assert!(max_rel(&yd, &y) < 1e-6);
    let got = (&yd * &on(&g, &dev))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = max_rel(got.get(&xd).unwrap(), want.get(&x).unwrap());
    assert!(e < TOL, "dx: rel err {e:e}");
}

/// A ResNet-8 of `k` modules for `method`, on `dev` in `dtype`, with the same initial weights
/// on every device and dtype (the initialiser draws on the host in f64).
fn network(
    method: &Method,
    k: usize,
    dev: &Device,
    dtype: DType,
) -> sgr_core::network::LocalNetwork {
    CifarResNet {
        config: ResNetConfig {
            depth: 8,
            in_channels: 3,
            num_classes: 10,
        },
        options: ModelOptions {
            modules: k,
            split: SplitStrategy::Uniform,
            head: if method.objective == Objective::Dgl {
                HeadKind::Dgl
            } else {
                HeadKind::Auto
            },
            objective: method.objective,
            seed: 3,
            ..ModelOptions::default()
        },
    }
    .build(dev, dtype)
    .expect("build")
}

/// Losses of `steps` steps of `method` on a fixed batch.
fn losses(method: Method, k: usize, dev: &Device, dtype: DType, steps: usize) -> Vec<Vec<f64>> {
    let net = network(&method, k, dev, dtype);
    let mut trainer = Trainer::new(net, trainer_config(method)).unwrap();
    let x = randn(&[8, 3, 8, 8], 1.0, 11, dtype).to_device(dev).unwrap();
    let y = Tensor::from_vec((0..8u32).map(|i| i % 10).collect::<Vec<_>>(), 8, dev).unwrap();
    let batch = Batch::labelled(x.clamp(0.0, 1.0).unwrap(), y);
    (0..steps)
        .map(|_| trainer.train_step(&batch).unwrap().losses().unwrap())
        .collect()
}

/// Three steps of every method on the device in f32 give the losses of the same steps on the
/// CPU in f64, where `+sgr` runs the exact double backward and the device runs central
/// differences: within 2e-3 relative (f32 rounding over three steps, plus the O(ε²) error of
/// the finite difference).
#[test]
fn every_method_runs_on_the_device_as_on_the_cpu() {
    let dev = test_device();
    for name in [
        "bp",
        "greedy",
        "sgr",
        "dgl+sgr",
        "infopro+sgr",
        "infopro-contrast",
    ] {
        let mut reference: Method = name.parse().unwrap();
        let mut device: Method = name.parse().unwrap();
        if let Some(s) = reference.sgr.as_mut() {
            s.grad = SgrGrad::Exact;
        }
        if let Some(s) = device.sgr.as_mut() {
            s.grad = SgrGrad::FiniteDifference;
        }
        let k = if name == "bp" { 1 } else { 2 };
        let want = losses(reference, k, &Device::Cpu, DType::F64, 3);
        let got = losses(device, k, &dev, DType::F32, 3);
        assert_close(name, &got, &want, 2e-3);
    }
}

/// The exact SGR way (the double backward through the convolution ops' device kernels) on the
/// device in f32 gives the losses of the CPU's f64 run: within 1e-3 relative.
#[test]
fn exact_sgr_runs_on_the_device_as_on_the_cpu() {
    let dev = test_device();
    for name in ["sgr", "infopro+sgr"] {
        let mut method: Method = name.parse().unwrap();
        if let Some(s) = method.sgr.as_mut() {
            s.grad = SgrGrad::Exact;
        }
        let want = losses(method.clone(), 2, &Device::Cpu, DType::F64, 3);
        let got = losses(method, 2, &dev, DType::F32, 3);
        assert_close(&format!("{name} (exact)"), &got, &want, 1e-3);
    }
}

/// Every module's loss of every step within `tol` relative.
fn assert_close(name: &str, got: &[Vec<f64>], want: &[Vec<f64>], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: steps");
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{name}: modules");
        for (m, (a, b)) in g.iter().zip(w).enumerate() {
            let e = (a - b).abs() / b.abs().max(1e-6);
            assert!(
                e < tol,
                "{name}: step {step} module {m}: {a} against {b} (rel {e:e})"
            );
        }
    }
}
