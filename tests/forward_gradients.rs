//! The BP-free estimators against independent oracles, in f64 (docs/bpfree.md):
//! the tangent rules against reverse mode (∇L·v per local-loss copy), the forward-gradient
//! estimators' means against the reverse-mode gradient, the SGR term without back-propagation
//! against the exact double backward, and the trainer's seeding and errors.

use candle_core::{DType, Device, Tensor, Var};
use sgr_core::ctx::Ctx;
use sgr_core::forward::{
    boundary_probe, copy_jvp, module_pass, sgr_term, ForwardMode, ForwardSupport, Perturbation,
};
use sgr_core::method::{Estimator, Method};
use sgr_core::network::LocalNetwork;
use sgr_core::objective::Batch;
use sgr_core::sgr::{base_pass, sgr_term_grad, BasePoint, LocalModule, SgrConfig, SgrGrad, Site};
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_integration_tests::{flat, labels, randn};
use sgr_models::localmixer::LocalMixerConfig;
use sgr_models::ModelOptions;

const B: usize = 3;

/// A two-block LocalMixer on 8×8 images: 4 patches, 8 channels in `groups` groups, 3 classes,
/// cut into [block 0 | block 1 | read-out].
fn mixer(groups: usize, dtype: DType) -> LocalNetwork {
    let cfg = LocalMixerConfig {
        name: "localmixer-test".into(),
        image_size: 8,
        in_channels: 1,
        num_classes: 3,
        blocks: 2,
        patches: 2,
        channels: 8,
        groups,
    };
    sgr_models::family::build(
        &cfg,
        &ModelOptions {
            modules: 3,
            seed: 3,
            ..ModelOptions::default()
        },
        &Device::Cpu,
        dtype,
    )
    .unwrap()
}

fn batch(dtype: DType) -> Batch {
    Batch::labelled(randn(&[B, 1, 8, 8], 1.0, 11, dtype), labels(B, 12))
}

/// Module 1's input: module 0's output on the batch.
fn module_input(net: &LocalNetwork, b: &Batch) -> Tensor {
    net.module_body(0, &b.input, &mut Ctx::train())
        .unwrap()
        .detach()
}

fn block1(net: &LocalNetwork) -> &dyn ForwardMode {
    match net.module_stages(1)[0].1.forward_support() {
        ForwardSupport::Perturbable(m) => m,
        other => panic!("block 1 is {other:?}"),
    }
}

/// ∂L/∂h of module 1's head at the block output h, and the loss.
fn head_grad(net: &LocalNetwork, b: &Batch, h: &Tensor) -> Tensor {
    let hv = Var::from_tensor(h).unwrap();
    let o = net
        .module_objective(1)
        .unwrap()
        .loss(hv.as_tensor(), b, &mut Ctx::train())
        .unwrap();
    o.loss
        .backward()
        .unwrap()
        .get(hv.as_tensor())
        .unwrap()
        .clone()
}

fn per_example(t: &Tensor) -> Vec<f64> {
    t.flatten_from(1)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Every local-loss copy's directional derivative (the tangent rules along an input direction)
/// equals reverse mode's ∇_x L_copy · v, where L_copy is the pooled cross-entropy with the
/// other patches and groups under stop-gradient; and along a weight direction the copies sum to
/// Σ ∇_θ L · v.
#[test]
fn copy_directional_derivatives_equal_reverse_mode() {
    let (g, p, c) = (2, 4, 8);
    let net = mixer(g, DType::F64);
    let b = batch(DType::F64);
    let x = module_input(&net, &b);
    let v = randn(x.dims(), 1.0, 21, DType::F64);
    let mode = block1(&net);
    let pass = mode
        .forward_tangent(&x, Some(&v), Perturbation::None, &mut Ctx::train())
        .unwrap();
    let jvp = copy_jvp(
        &head_grad(&net, &b, &pass.output),
        &pass.tangent.unwrap(),
        g,
    )
    .unwrap();
    let stage = net.module_stages(1)[0].1;
    let mut worst: f64 = 0.0;
    for pi in 0..p {
        for gi in 0..g {
            let mut m = vec![0f64; p * c];
            for ch in gi * c / g..(gi + 1) * c / g {
                m[pi * c + ch] = 1.0;
            }
            let live = Tensor::from_vec(m, (1, p, c), &Device::Cpu).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let h = stage.forward(xv.as_tensor(), &mut Ctx::train()).unwrap();
            let h = (h.broadcast_mul(&live).unwrap()
                + h.detach().broadcast_mul(&(1.0 - &live).unwrap()).unwrap())
            .unwrap();
            let o = net
                .module_objective(1)
                .unwrap()
                .loss(&h, &b, &mut Ctx::train())
                .unwrap();
            let gx = o
                .loss
                .backward()
                .unwrap()
                .get(xv.as_tensor())
                .unwrap()
                .clone();
            let want = per_example(&(gx * &v).unwrap());
            let got: Vec<f64> = (0..B)
                .map(|e| {
                    jvp.get(e)
                        .unwrap()
                        .get(pi)
                        .unwrap()
                        .get(gi)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                })
                .collect();
            for (a, w) in got.iter().zip(&want) {
                worst = worst.max((a - w).abs() / w.abs().max(1e-8));
            }
        }
    }
    assert!(
        worst < 1e-9,
        "copy JVPs differ from reverse mode by {worst:e}"
    );

    // Weight direction: Σ copies = Σ_θ ∇_θ L · v_θ.
    let params = stage.params();
    let vs: Vec<Tensor> = params
        .iter()
        .enumerate()
        .map(|(i, q)| randn(q.var.dims(), 1.0, 100 + i as u64, DType::F64))
        .collect();
    let pass = mode
        .forward_tangent(&x, None, Perturbation::Weight(&vs), &mut Ctx::train())
        .unwrap();
    let total = copy_jvp(
        &head_grad(&net, &b, &pass.output),
        &pass.tangent.unwrap(),
        g,
    )
    .unwrap()
    .sum_all()
    .unwrap()
    .to_scalar::<f64>()
    .unwrap();
    let h = stage.forward(&x, &mut Ctx::train()).unwrap();
    let o = net
        .module_objective(1)
        .unwrap()
        .loss(&h, &b, &mut Ctx::train())
        .unwrap();
    let store = o.loss.backward().unwrap();
    let want: f64 = params
        .iter()
        .zip(&vs)
        .map(|(q, v)| {
            let g = store.get(q.var.as_tensor()).unwrap();
            (g * v)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum();
    assert!(
        (total - want).abs() < 1e-9 * want.abs().max(1e-6),
        "weight JVP {total} vs reverse mode {want}"
    );
}

/// Mean and standard error per element of `draws` (each a flat vector).
fn mean_se(draws: &[Vec<f64>]) -> (Vec<f64>, Vec<f64>) {
    let n = draws.len() as f64;
    let dim = draws[0].len();
    let mut mean = vec![0.0; dim];
    for d in draws {
        for (m, x) in mean.iter_mut().zip(d) {
            *m += x / n;
        }
    }
    let mut var = vec![0.0; dim];
    for d in draws {
        for ((s, x), m) in var.iter_mut().zip(d).zip(&mean) {
            *s += (x - m) * (x - m) / (n - 1.0);
        }
    }
    (mean, var.iter().map(|v| (v / n).sqrt()).collect())
}

/// The mean of `draws` agrees with `exact` within its standard errors (mean squared z-score
/// near 1, no |z| beyond 5, over the elements with spread), elements without spread are exact,
/// and the spread of the mean shrinks as 1/√draws (four times the draws: half the spread).
fn assert_unbiased(what: &str, draws: &[Vec<f64>], exact: &[f64]) {
    let (mean, se) = mean_se(draws);
    let (mut z2, mut n, mut zmax) = (0.0, 0usize, 0f64);
    for ((m, s), e) in mean.iter().zip(&se).zip(exact) {
        if *s < 1e-12 * (1.0 + e.abs()) {
            assert!(
                (m - e).abs() < 1e-9 * (1.0 + e.abs()),
                "{what}: exact part {m} vs {e}"
            );
            continue;
        }
        let z = (m - e) / s;
        z2 += z * z;
        zmax = zmax.max(z.abs());
        n += 1;
    }
    let z2 = z2 / n as f64;
    assert!(n > 20, "{what}: only {n} estimated elements");
    assert!(
        (0.5..1.6).contains(&z2) && zmax < 5.0,
        "{what}: mean z² {z2}, max |z| {zmax}"
    );
    // The spread of means of n draws, measured across disjoint groups of draws, at n and 4n.
    let spread = |n: usize| {
        let groups: Vec<Vec<f64>> = draws.chunks_exact(n).map(|c| mean_se(c).0).collect();
        let (_, se) = mean_se(&groups);
        let k = groups.len() as f64;
        (se.iter().map(|s| s * s * k).sum::<f64>() / se.len() as f64).sqrt()
    };
    let n = draws.len() / 64;
    let ratio = spread(n) / spread(4 * n);
    assert!(
        (1.5..2.7).contains(&ratio),
        "{what}: the spread of means of {n} draws is {ratio} times that of {} (1/√draws: 2)",
        4 * n
    );
}

/// With one group per patch every layer's estimate is unbiased: the mean over many draws of
/// forward-weight and forward-activity equals reverse mode's gradient of the module's loss.
#[test]
fn forward_estimators_are_unbiased_for_the_local_gradient() {
    let net = mixer(1, DType::F64);
    let b = batch(DType::F64);
    let x = module_input(&net, &b);
    let prob = LocalModule {
        net: &net,
        k: 1,
        batch: &b,
    };
    let exact = flat(&base_pass(&prob, &x, false, false).unwrap().grads);
    for (est, draws) in [
        (Estimator::ForwardActivity, 2000),
        (Estimator::ForwardWeight, 2000),
    ] {
        let d: Vec<Vec<f64>> = (0..draws)
            .map(|s| {
                flat(
                    &module_pass(&net, 1, &b, &x, est, 1, s, false)
                        .unwrap()
                        .grads,
                )
            })
            .collect();
        assert_unbiased(&est.to_string(), &d, &exact);
    }
}

/// The SGR term without back-propagation: its mean over draws of (u, noise) equals the exact
/// parameter gradient of D = B·Σ‖b − a‖² by double backward, for both estimators.
#[test]
fn bp_free_sgr_term_is_unbiased_for_the_exact_sgr_gradient() {
    let net = mixer(1, DType::F64);
    let b = batch(DType::F64);
    let x = module_input(&net, &b);
    let prob = LocalModule {
        net: &net,
        k: 1,
        batch: &b,
    };
    let base = base_pass(&prob, &x, true, true).unwrap();
    let b_exact = base.input_grad.clone().unwrap();
    // a target near b, as a previous module's gradient would be
    let a = (&b_exact * 0.5).unwrap();
    let a = (a + randn(x.dims(), 1.0, 5, DType::F64)
        .broadcast_mul(&b_exact.abs().unwrap().mean_all().unwrap())
        .unwrap())
    .unwrap();
    let cfg = SgrConfig {
        grad: SgrGrad::Exact,
        ..SgrConfig::default()
    };
    let exact = sgr_term_grad(
        &prob,
        &x,
        Site::Input,
        &b_exact,
        &a,
        BasePoint::of(&base),
        &cfg,
    )
    .unwrap();
    let exact = flat(&exact.grads);
    for est in [Estimator::ForwardActivity, Estimator::ForwardWeight] {
        let d: Vec<Vec<f64>> = (0..3000u64)
            .map(|s| {
                let pass = module_pass(&net, 1, &b, &x, est, 1, s, true).unwrap();
                let probe = boundary_probe(&net, 1, &x, &a, &pass, s).unwrap();
                flat(&sgr_term(&net, 1, &b, &x, &probe, &pass, est, 1, 1e-4, s).unwrap())
            })
            .collect();
        assert_unbiased(&format!("sgr {est}"), &d, &exact);
    }
}

fn trainer(net: LocalNetwork, estimator: Estimator, sgr: bool) -> Trainer {
    let mut method = if sgr {
        Method::sgr(SgrConfig::default())
    } else {
        Method::greedy()
    };
    method.estimator = estimator;
    let cfg = TrainerConfig {
        method,
        optimizer: sgr_core::optim::OptimizerConfig::Sgd {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            decay: sgr_core::optim::DecayScope::All,
        },
        lr: 0.05,
        schedule: sgr_core::optim::Schedule::Constant,
        epochs: 1,
        steps_per_epoch: 8,
        seed: 9,
        ..TrainerConfig::default()
    };
    Trainer::new(net, cfg).unwrap()
}

fn weights(net: &LocalNetwork) -> Vec<f32> {
    net.params()
        .iter()
        .flat_map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// The noise is drawn from (run seed, step, module): a run continued from step 2 in a new
/// trainer (weights copied, position set) ends bit-identical to an uninterrupted one.
#[test]
fn forward_steps_are_seeded_by_run_step_and_module() {
    let b = batch(DType::F32);
    for est in [Estimator::ForwardActivity, Estimator::ForwardWeight] {
        let mut whole = trainer(mixer(2, DType::F32), est, true);
        for _ in 0..4 {
            whole.train_step(&b).unwrap();
        }
        let mut first = trainer(mixer(2, DType::F32), est, true);
        for _ in 0..2 {
            first.train_step(&b).unwrap();
        }
        let mut second = trainer(mixer(2, DType::F32), est, true);
        for (to, from) in second
            .network()
            .params()
            .iter()
            .zip(first.network().params())
        {
            to.var.set(from.var.as_tensor()).unwrap();
        }
        second.set_position(0, 2);
        for _ in 0..2 {
            second.train_step(&b).unwrap();
        }
        assert_eq!(weights(whole.network()), weights(second.network()), "{est}");
        let mut other = trainer(mixer(2, DType::F32), est, true);
        for _ in 0..4 {
            other.train_step(&b).unwrap();
        }
        assert_eq!(weights(whole.network()), weights(other.network()), "{est}");
    }
}

/// Forward-activity, with and without SGR, lowers every module's loss on a fixed batch.
#[test]
fn forward_activity_lowers_the_local_losses() {
    let b = batch(DType::F32);
    for sgr in [false, true] {
        let mut t = trainer(mixer(2, DType::F32), Estimator::ForwardActivity, sgr);
        let losses = |t: &mut Trainer| -> Vec<f32> {
            t.train_step(&b)
                .unwrap()
                .module_losses
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let start = losses(&mut t);
        let mut end = start.clone();
        for _ in 0..60 {
            end = losses(&mut t);
        }
        for (k, (s, e)) in start.iter().zip(&end).enumerate() {
            assert!(e < &(0.8 * s), "sgr {sgr}: module {k} loss {s} -> {e}");
        }
    }
}

/// The estimators refuse what they cannot train, naming what works.
#[test]
fn unsupported_combinations_are_named() {
    let mut m = Method::bp();
    m.estimator = Estimator::ForwardActivity;
    let e = m.validate().unwrap_err().to_string();
    assert!(e.contains("greedy") && e.contains("backprop"), "{e}");
    let mut m = Method::sgr(SgrConfig {
        distance: sgr_core::sgr::Distance::Cosine,
        ..SgrConfig::default()
    });
    m.estimator = Estimator::ForwardWeight;
    let e = m.validate().unwrap_err().to_string();
    assert!(e.contains("squared-l2"), "{e}");
    let net =
        sgr_integration_tests::resnet(8, 3, 2, sgr_models::HeadKind::ZeroConvOneFc, 0, DType::F32);
    let mut method = Method::greedy();
    method.estimator = Estimator::ForwardActivity;
    let e = Trainer::new(
        net,
        TrainerConfig {
            method,
            steps_per_epoch: 1,
            ..TrainerConfig::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("localmixer") && e.contains("`stem`"), "{e}");
}
