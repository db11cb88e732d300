//! Helpers shared by the integration tests.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sgr_core::network::LocalNetwork;
use sgr_models::{CifarResNet, HeadKind, ModelOptions, ResNetConfig, SplitStrategy};

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
