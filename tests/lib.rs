//! Helpers shared by the integration tests.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sgr_core::network::LocalNetwork;
use sgr_core::objective::Batch;
use sgr_core::sgr::{
    base_pass, sgr_term_grad, BasePass, BasePoint, Distance, LocalModule, SgrConfig, SgrGrad, Site,
};
use sgr_models::{CifarResNet, HeadKind, ModelOptions, ResNetConfig, SplitStrategy};

/// The device of the device tests (`tests/device.rs`): `SGR_TEST_DEVICE` = `cpu` (the default)
/// or `cuda` (the first GPU; the tests must be built with `--features cudnn` or `cuda`).
pub fn test_device() -> Device {
    match std::env::var("SGR_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).unwrap_or_else(|e| {
            panic!(
                "SGR_TEST_DEVICE=cuda: {e}. Build the tests with --features cuda, on a machine \
                 with an NVIDIA GPU and its driver"
            )
        }),
        Ok(other) => panic!("SGR_TEST_DEVICE must be cpu or cuda, got `{other}`"),
    }
}

/// A CIFAR ResNet of `depth` for `in_channels`-channel input and 10 classes.
pub fn resnet(
    depth: usize,
    in_channels: usize,
    k: usize,
    head: HeadKind,
    seed: u64,
    dtype: DType,
) -> LocalNetwork {
    CifarResNet {
        config: ResNetConfig {
            depth,
            in_channels,
            num_classes: 10,
        },
        options: ModelOptions {
            modules: k,
            split: SplitStrategy::Uniform,
            head,
            seed,
            ..ModelOptions::default()
        },
    }
    .build(&Device::Cpu, dtype)
    .expect("build network")
}

/// The trainer settings the tests share: `method`, SGD with PyTorch's defaults here, lr 0.1,
/// constant schedule, one epoch of 10 steps, seed 0.
pub fn trainer_config(method: sgr_core::method::Method) -> sgr_core::trainer::TrainerConfig {
    sgr_core::trainer::TrainerConfig {
        method,
        optimizer: sgr_core::optim::OptimizerConfig::default(),
        lr: 0.1,
        schedule: sgr_core::optim::Schedule::Constant,
        epochs: 1,
        steps_per_epoch: 10,
        seed: 0,
        ..Default::default()
    }
}

/// A tensor of N(0, std²) entries.
pub fn randn(shape: &[usize], std: f64, seed: u64, dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

/// A batch that carries `labels` as its targets (its input is not read by cross-entropy
/// objectives, which see the module's own input).
pub fn targets(labels: &Tensor) -> sgr_core::objective::Batch {
    let n = labels.dim(0).expect("labels");
    let dummy = Tensor::zeros((n, 1), DType::F32, labels.device()).expect("input");
    sgr_core::objective::Batch::labelled(dummy, labels.clone())
}

/// Integer labels in 0..10.
pub fn labels(n: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<u32> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    Tensor::from_vec(v, n, &Device::Cpu).expect("labels")
}

/// Flattens tensors into one f64 vector.
pub fn flat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter()
        .flat_map(|t| {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .expect("to vec")
        })
        .collect()
}

/// max |a − b| / max |b|: the largest element-wise difference relative to the reference's
/// largest magnitude.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (flat(std::slice::from_ref(a)), flat(std::slice::from_ref(b)));
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// ||a − b|| / ||b||.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

/// Max |a − b| over every named tensor of two networks with the same names.
pub fn max_param_diff(a: &LocalNetwork, b: &LocalNetwork) -> f64 {
    let pa = a.params();
    let pb = b.params();
    assert_eq!(pa.len(), pb.len());
    pa.iter()
        .zip(&pb)
        .map(|(x, y)| {
            assert_eq!(x.name, y.name);
            let d = (x.var.as_tensor() - y.var.as_tensor())
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_dtype(DType::F64))
                .and_then(|d| d.to_scalar::<f64>())
                .expect("diff");
            d
        })
        .fold(0.0, f64::max)
}

/// Σ|t| as f64.
pub fn abs_sum(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|t| t.sum_all())
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_scalar::<f64>())
        .expect("abs sum")
}

/// The local gradient a base pass computed at `site`.
pub fn site_grad(bp: &BasePass, site: Site) -> Tensor {
    match site {
        Site::Input => bp.input_grad.clone().expect("input grad"),
        Site::Output => bp.output_grad.clone().expect("output grad"),
    }
}

/// A target near s0 (so D is neither 0 nor dominated by t): s0 + noise of the same RMS.
pub fn target_near(s0: &Tensor, seed: u64) -> Tensor {
    let rms = s0
        .sqr()
        .and_then(|t| t.mean_all())
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_scalar::<f64>())
        .expect("rms")
        .sqrt();
    (s0 + randn(s0.dims(), rms, seed, s0.dtype())).expect("target")
}

/// SGR settings with `distance` and `grad`, the others at their defaults.
pub fn sgr_config(distance: Distance, grad: SgrGrad) -> SgrConfig {
    SgrConfig {
        distance,
        grad,
        ..SgrConfig::default()
    }
}

/// Runs module `k`'s base pass on its input `h` and asserts that every trainable parameter of
/// the module (body and objective) gets a non-zero, finite gradient from the local loss and
/// from the SGR term (squared L2) in each of `ways` at each of `sites`. Returns the base pass,
/// whose output is the next module's input. `label` prefixes failure messages.
pub fn assert_module_learns(
    net: &LocalNetwork,
    k: usize,
    batch: &Batch,
    h: &Tensor,
    sites: &[Site],
    ways: &[SgrGrad],
    label: &str,
) -> BasePass {
    let prob = LocalModule { net, k, batch };
    let names: Vec<String> = net
        .module_trainable(k)
        .into_iter()
        .map(|p| p.name)
        .collect();
    let base = base_pass(&prob, h, sites.contains(&Site::Input), true).expect("base pass");
    let mut checks = vec![("local loss".to_string(), base.grads.clone())];
    for &site in sites {
        let s0 = site_grad(&base, site);
        let t = target_near(&s0, 1);
        for &way in ways {
            let c = sgr_config(Distance::SquaredL2, way);
            let term =
                sgr_term_grad(&prob, h, site, &s0, &t, BasePoint::of(&base), &c).expect("SGR term");
            checks.push((format!("SGR {way:?} at {site:?}"), term.grads));
        }
    }
    for (what, grads) in checks {
        assert_eq!(grads.len(), names.len(), "{label} module {k} {what}");
        for (g, n) in grads.iter().zip(&names) {
            let s = abs_sum(g);
            assert!(
                s > 0.0 && s.is_finite(),
                "{label} module {k} {what}: `{n}` got {s}"
            );
        }
    }
    base
}

/// Sets every tensor of `params` from a PyTorch state dict `map` by name, unchanged except for
/// the dtype and `num_batches_tracked` (PyTorch's int64 scalar, a `[1]` tensor here). Names
/// starting with `__` are a fixture's extras; the rest must be exactly `params`' names.
pub fn load_state_dict(
    params: &[sgr_core::nn::Param],
    map: &std::collections::HashMap<String, Tensor>,
) {
    let mut theirs: Vec<&str> = map
        .keys()
        .filter(|k| !k.starts_with("__"))
        .map(|k| k.as_str())
        .collect();
    theirs.sort();
    let mut ours: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    ours.sort();
    assert_eq!(
        ours, theirs,
        "the state dict and the model name the same tensors"
    );
    for p in params {
        let t = &map[&p.name];
        let t = if p.name.ends_with("num_batches_tracked") {
            assert_eq!(t.dims(), &[] as &[usize]);
            t.reshape(p.var.dims()).expect("reshape")
        } else {
            assert_eq!(t.dims(), p.var.dims(), "{}", p.name);
            t.clone()
        };
        p.var
            .set(&t.to_dtype(p.var.dtype()).expect("dtype"))
            .expect("set");
    }
}

/// A CIFAR ResNet of `depth` cut uniformly into `k` modules with `objective`'s heads, for
/// 3-channel images normalised with fixed statistics (seed 5).
pub fn resnet_for(
    depth: usize,
    k: usize,
    objective: sgr_core::method::Objective,
    dtype: DType,
) -> LocalNetwork {
    CifarResNet {
        config: ResNetConfig {
            depth,
            in_channels: 3,
            num_classes: 10,
        },
        options: ModelOptions {
            modules: k,
            split: SplitStrategy::Uniform,
            seed: 5,
            objective,
            pixels: Some(sgr_core::objective::PixelStats {
                mean: vec![0.5, 0.4, 0.3],
                std: vec![0.25, 0.2, 0.3],
            }),
            ..ModelOptions::default()
        },
    }
    .build(&Device::Cpu, dtype)
    .expect("build network")
}
