//! Trainer-level properties: isolation, bp ≡ greedy at K=1, sgr(λ=0) ≡ greedy, optimizer
//! semantics and state round trips, checkpoints.

use candle_core::{DType, Device, Tensor};
use sgr_core::method::Method;
use sgr_core::network::LocalNetwork;
use sgr_core::nn::Ctx;
use sgr_core::objective::Batch;
use sgr_core::optim::OptimizerConfig;
use sgr_core::sgr::{base_pass, Direction, Distance, LocalModule, SgrConfig, SgrGrad};
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_integration_tests::{abs_sum, labels, max_param_diff, randn, resnet, trainer_config};
use sgr_models::HeadKind;

/// The method with `sgr` as its SGR settings when it has the term.
fn tcfg(method: Method, sgr: SgrConfig) -> TrainerConfig {
    trainer_config(Method {
        sgr: method.sgr.map(|_| sgr),
        ..method
    })
}

fn batch(seed: u64) -> (Tensor, Tensor) {
    (
        randn(&[16, 3, 8, 8], 1.0, seed, DType::F32),
        labels(16, seed + 100),
    )
}

fn snapshot(net: &LocalNetwork) -> Vec<(String, Tensor)> {
    net.params()
        .into_iter()
        .map(|p| (p.name, p.var.as_tensor().copy().unwrap()))
        .collect()
}

/// Test 4: with K = 1, `greedy` and `bp` take the same step (bp runs the whole network as one
/// graph through `LocalNetwork::forward`; greedy runs module 0 through the local machinery).
#[test]
fn k1_greedy_and_bp_take_the_same_step() {
    let a = resnet(8, 3, 1, HeadKind::OneConvTwoFc, 5, DType::F32);
    let b = resnet(8, 3, 1, HeadKind::OneConvTwoFc, 5, DType::F32);
    assert_eq!(max_param_diff(&a, &b), 0.0);
    let mut ta = Trainer::new(a, tcfg(Method::bp(), SgrConfig::default())).unwrap();
    let mut tb = Trainer::new(b, tcfg(Method::greedy(), SgrConfig::default())).unwrap();
    let before = snapshot(ta.network());
    for s in 0..3 {
        let (x, y) = batch(s);
        let ma = ta
            .train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
        let mb = tb
            .train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
        assert!((ma.losses().unwrap()[0] - mb.losses().unwrap()[0]).abs() < 1e-6);
    }
    let d = max_param_diff(ta.network(), tb.network());
    assert!(d < 1e-6, "bp and greedy K=1 differ by {d}");
    // And the step did move the weights (the comparison is not between two no-ops).
    let moved = before
        .iter()
        .zip(ta.network().params())
        .any(|((_, t), p)| abs_sum(&(t - p.var.as_tensor()).unwrap()) > 1e-3);
    assert!(moved);
}

/// `sgr` with λ = 0 is exactly `greedy`, for both ways of computing the term and both
/// directions: the extra passes leave BatchNorm statistics and everything else untouched.
#[test]
fn sgr_with_zero_lambda_is_exactly_greedy() {
    for (grad, direction) in [
        (SgrGrad::FiniteDifference, Direction::Forward),
        (SgrGrad::FiniteDifference, Direction::Backward),
        (SgrGrad::Exact, Direction::Forward),
    ] {
        let g = resnet(8, 3, 4, HeadKind::OneConvTwoFc, 9, DType::F32);
        let s = resnet(8, 3, 4, HeadKind::OneConvTwoFc, 9, DType::F32);
        let mut tg = Trainer::new(g, tcfg(Method::greedy(), SgrConfig::default())).unwrap();
        let sgr = SgrConfig {
            lambda: 0.0,
            grad,
            direction,
            ..SgrConfig::default()
        };
        let mut ts = Trainer::new(s, tcfg(Method::sgr(SgrConfig::default()), sgr)).unwrap();
        for st in 0..2 {
            let (x, y) = batch(10 + st);
            tg.train_step(&Batch::labelled(x.clone(), y.clone()))
                .unwrap();
            ts.train_step(&Batch::labelled(x.clone(), y.clone()))
                .unwrap();
        }
        let d = max_param_diff(tg.network(), ts.network());
        assert_eq!(
            d, 0.0,
            "{grad:?} {direction:?}: sgr(λ=0) differs from greedy by {d}"
        );
    }
}

/// With λ > 0 the SGR step differs from greedy (the term is applied), and it raises the
/// boundary cosine it is meant to raise, measured on the same batch after a few steps.
#[test]
fn sgr_term_changes_the_step_and_aligns_gradients() {
    let g = resnet(8, 3, 4, HeadKind::OneConvTwoFc, 9, DType::F32);
    let s = resnet(8, 3, 4, HeadKind::OneConvTwoFc, 9, DType::F32);
    let mut tg = Trainer::new(g, tcfg(Method::greedy(), SgrConfig::default())).unwrap();
    let sgr = SgrConfig {
        lambda: 1.0,
        distance: Distance::Cosine,
        ..SgrConfig::default()
    };
    let mut ts = Trainer::new(s, tcfg(Method::sgr(SgrConfig::default()), sgr)).unwrap();
    let (x, y) = batch(3);
    for _ in 0..8 {
        tg.train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
        ts.train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
    }
    assert!(max_param_diff(tg.network(), ts.network()) > 1e-4);
    let mut obs = sgr_core::events::NoObserver;
    // One more step each to read the boundary cosines at this point.
    tg.finish_epoch(&mut obs).unwrap();
    ts.finish_epoch(&mut obs).unwrap();
    tg.train_step(&Batch::labelled(x.clone(), y.clone()))
        .unwrap();
    ts.train_step(&Batch::labelled(x.clone(), y.clone()))
        .unwrap();
    let mg = tg.finish_epoch(&mut obs).unwrap();
    let ms = ts.finish_epoch(&mut obs).unwrap();
    let mean = |m: &sgr_core::events::EpochMetrics| {
        m.boundaries.iter().map(|b| b.cos).sum::<f64>() / m.boundaries.len() as f64
    };
    assert_eq!(ms.boundaries.len(), 3);
    assert!(ms.boundaries.iter().all(|b| b.sgr_distance.is_some()));
    assert!(mg.boundaries.iter().all(|b| b.sgr_distance.is_none()));
    assert!(
        mean(&ms) > mean(&mg) + 0.05,
        "SGR cos {} vs greedy {}",
        mean(&ms),
        mean(&mg)
    );
}

/// Test 3: isolation. After a step of `greedy` or `sgr` (forward direction), each module's
/// parameters equal those of an isolated local step of that module alone: its own local loss
/// (plus, for SGR, only its own term) on the detached output of the previous module; nothing
/// from later modules reached it. Checked against a hand-made SGD step, and directly: a
/// module's local backward from an input that still carries the previous module's graph leaves
/// no gradient on the previous module's parameters.
#[test]
fn no_gradient_from_module_k_reaches_earlier_modules() {
    for method in [Method::greedy(), Method::sgr(SgrConfig::default())] {
        let net = resnet(8, 3, 4, HeadKind::OneConvTwoFc, 21, DType::F32);
        let reference = resnet(8, 3, 4, HeadKind::OneConvTwoFc, 21, DType::F32);
        let cfg = TrainerConfig {
            optimizer: OptimizerConfig::Sgd {
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
                decay: sgr_core::optim::DecayScope::All,
            },
            ..tcfg(method.clone(), SgrConfig::default())
        };
        let lr = cfg.lr;
        let mut t = Trainer::new(net, cfg).unwrap();
        let (x, y) = batch(77);
        t.train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
        // Module 0 of the reference: its local loss only.
        let prob = LocalModule {
            net: &reference,
            k: 0,
            batch: &sgr_integration_tests::targets(&y),
        };
        let bp0 = base_pass(&prob, &x, false, false).unwrap();
        let trained: std::collections::HashMap<String, Tensor> = t
            .network()
            .module_trainable(0)
            .into_iter()
            .map(|p| (p.name, p.var.as_tensor().clone()))
            .collect();
        for (p, g) in reference.module_trainable(0).iter().zip(&bp0.grads) {
            let want = (p.var.as_tensor() - (g * lr).unwrap()).unwrap();
            let got = &trained[&p.name];
            let d = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d < 1e-6,
                "{method:?}: `{}` moved by more than its own local step ({d})",
                p.name
            );
        }
    }
    // Graph level: module 1's local pass from an input that carries module 0's graph.
    let net = resnet(8, 3, 4, HeadKind::OneConvTwoFc, 21, DType::F32);
    let (x, y) = batch(5);
    let mut ctx = Ctx::train();
    let h = net.module_body(0, &x, &mut ctx).unwrap();
    let undetached_loss = {
        let mut c = Ctx::train();
        let o = net.module_body(1, &h, &mut c).unwrap();
        net.module_objective(1)
            .unwrap()
            .loss(&o, &sgr_integration_tests::targets(&y), &mut c)
            .unwrap()
            .loss
    };
    // Control: without isolation the earlier module would receive gradients.
    let store = undetached_loss.backward().unwrap();
    assert!(net
        .module_trainable(0)
        .iter()
        .any(|p| store.get(p.var.as_tensor()).is_some()));
    let prob = LocalModule {
        net: &net,
        k: 1,
        batch: &sgr_integration_tests::targets(&y),
    };
    let b = base_pass(&prob, &h, true, true).unwrap();
    assert_eq!(b.grads.len(), net.module_trainable(1).len());
    let probe = sgr_core::sgr::LocalProblem::forward(
        &prob,
        &h.detach(),
        sgr_core::sgr::OutputShift::None,
        &mut Ctx::train_frozen_stats(),
    )
    .unwrap();
    let store = probe.loss.backward().unwrap();
    for p in net.module_trainable(0) {
        assert!(
            store.get(p.var.as_tensor()).is_none(),
            "`{}` received a gradient from module 1",
            p.name
        );
    }
}

/// SGD with Nesterov momentum and weight decay follows PyTorch's update rule, step by step.
#[test]
fn sgd_nesterov_matches_pytorch_rule() {
    let net = resnet(8, 3, 1, HeadKind::OneConvTwoFc, 1, DType::F32);
    let p = net.trainable().into_iter().next().unwrap();
    let mut opt = OptimizerConfig::Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.01,
        decay: sgr_core::optim::DecayScope::All,
    }
    .build(vec![p.clone()])
    .unwrap();
    let w0 = p
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let g1 = randn(p.var.dims(), 1.0, 1, DType::F32);
    let g2 = randn(p.var.dims(), 1.0, 2, DType::F32);
    opt.step(std::slice::from_ref(&g1), 0.1).unwrap();
    opt.step(std::slice::from_ref(&g2), 0.05).unwrap();
    let g1 = g1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let g2 = g2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got = p
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for i in 0..w0.len() {
        // torch.optim.SGD: d = g + wd·w; buf = d (first) | μ·buf + d; d = d + μ·buf; w -= lr·d
        let (mu, wd) = (0.9f64, 0.01f64);
        let mut w = w0[i] as f64;
        let d1 = g1[i] as f64 + wd * w;
        let buf1 = d1;
        w -= 0.1 * (d1 + mu * buf1);
        let d2 = g2[i] as f64 + wd * w;
        let buf2 = mu * buf1 + d2;
        w -= 0.05 * (d2 + mu * buf2);
        assert!(
            (got[i] as f64 - w).abs() < 1e-5,
            "element {i}: {} vs {w}",
            got[i]
        );
    }
}

/// Saving and restoring optimizer state and weights continues training identically.
#[test]
fn optimizer_state_and_weights_round_trip() {
    for opt in [
        OptimizerConfig::default(),
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
            decay: sgr_core::optim::DecayScope::All,
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TrainerConfig {
            optimizer: opt.clone(),
            ..tcfg(Method::greedy(), SgrConfig::default())
        };
        let mut a = Trainer::new(
            resnet(8, 3, 2, HeadKind::ZeroConvOneFc, 4, DType::F32),
            cfg.clone(),
        )
        .unwrap();
        for s in 0..2 {
            let (x, y) = batch(s);
            a.train_step(&Batch::labelled(x.clone(), y.clone()))
                .unwrap();
        }
        sgr_core::checkpoint::save_params(&dir.path().join("m.safetensors"), &a.network().params())
            .unwrap();
        let states: Vec<_> = a.optimizers().iter().map(|o| o.state().unwrap()).collect();
        // State must not hold an autodiff graph: each step's state would keep the previous
        // step's alive (a leak of the whole training history).
        for s in &states {
            assert!(!s.is_empty());
            for (name, t) in s {
                assert!(!t.track_op(), "{opt:?}: state `{name}` tracks a graph");
            }
        }
        let mut b = Trainer::new(
            resnet(8, 3, 2, HeadKind::ZeroConvOneFc, 99, DType::F32),
            cfg,
        )
        .unwrap();
        sgr_core::checkpoint::load_params(&dir.path().join("m.safetensors"), &b.network().params())
            .unwrap();
        for (o, s) in b.optimizers_mut().iter_mut().zip(&states) {
            o.load_state(s).unwrap();
        }
        b.set_position(0, a.global_step());
        let (x, y) = batch(7);
        a.train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
        b.train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
        assert_eq!(max_param_diff(a.network(), b.network()), 0.0, "{opt:?}");
    }
}

/// Loading a checkpoint of another model, a truncated file or a missing file is an error
/// naming the file and the tensor; the model is left untouched.
#[test]
fn corrupt_or_mismatched_checkpoints_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let small = resnet(8, 3, 1, HeadKind::OneConvTwoFc, 1, DType::F32);
    sgr_core::checkpoint::save_params(&path, &small.params()).unwrap();
    let other = resnet(14, 3, 1, HeadKind::OneConvTwoFc, 2, DType::F32);
    let before = snapshot(&other);
    let e = sgr_core::checkpoint::load_params(&path, &other.params())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("missing"),
        "{e}"
    );
    let wide = resnet(8, 1, 1, HeadKind::OneConvTwoFc, 2, DType::F32);
    let e = sgr_core::checkpoint::load_params(&path, &wide.params())
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv1.weight") && e.contains("shape"), "{e}");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = sgr_core::checkpoint::load_params(&path, &small.params())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    let after = snapshot(&other);
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        let d = abs_sum(&(a - b).unwrap());
        assert_eq!(d, 0.0, "{n} changed");
    }
    // No temporary files are left next to the checkpoint.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let _ = Device::Cpu;
}

/// bp refuses a multi-module network.
#[test]
fn bp_needs_one_module() {
    let e = Trainer::new(
        resnet(8, 3, 2, HeadKind::OneConvTwoFc, 1, DType::F32),
        tcfg(Method::bp(), SgrConfig::default()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("K=1"), "{e}");
}

/// The README's library example is `tests/examples/library.rs` verbatim (which CI compiles), so
/// the README never shows code that does not build.
#[test]
fn readme_library_example_is_the_compiled_example() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("tests/examples/library.rs")).unwrap();
    let start = readme
        .find("## Library")
        .expect("README has a Library section");
    let open = readme[start..].find("```rust\n").expect("a rust block") + start + "```rust\n".len();
    let close = readme[open..].find("```\n").expect("closed block") + open;
    assert_eq!(&readme[open..close], example);
}

/// The DeiT recipe's pieces in a training step: label smoothing, mixup/cutmix and gradient
/// clipping train, are deterministic under the seed, and change the step.
#[test]
fn recipe_steps_are_seeded_and_take_effect() {
    use sgr_core::mix::MixConfig;
    let (x, y) = batch(3);
    let b = Batch::labelled(x, y);
    let run = |label_smoothing: f64, mix: Option<MixConfig>, clip: Option<f64>| {
        let cfg = TrainerConfig {
            label_smoothing,
            mix,
            clip_grad_norm: clip,
            ..tcfg(Method::greedy(), SgrConfig::default())
        };
        let mut t =
            Trainer::new(resnet(8, 3, 2, HeadKind::ZeroConvOneFc, 4, DType::F32), cfg).unwrap();
        for _ in 0..2 {
            t.train_step(&b).unwrap();
        }
        t.network().params()[0]
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let plain = run(0.0, None, None);
    let mixed = run(0.1, Some(MixConfig::default()), Some(0.5));
    assert_eq!(
        mixed,
        run(0.1, Some(MixConfig::default()), Some(0.5)),
        "seeded"
    );
    assert_ne!(plain, mixed);
    assert_ne!(
        plain,
        run(0.1, None, None),
        "label smoothing changes the step"
    );
    assert_ne!(
        plain,
        run(0.0, None, Some(1e-3)),
        "a tight clip changes the step"
    );
    assert!(mixed.iter().all(|v| v.is_finite()));
}

/// Gradient clipping scales to the bound exactly and leaves small gradients alone.
#[test]
fn clip_grad_norm_bounds_the_joint_norm() {
    use sgr_core::trainer::clip_grad_norm;
    let dev = Device::Cpu;
    let mut g = vec![
        Tensor::new(&[3f32, 0.0], &dev).unwrap(),
        Tensor::new(&[[4f32]], &dev).unwrap(),
    ];
    clip_grad_norm(&mut g, 1.0).unwrap();
    let n: f32 = g
        .iter()
        .map(|t| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum::<f32>()
        .sqrt();
    assert!((n - 1.0).abs() < 1e-5, "{n}");
    let mut small = vec![Tensor::new(&[0.1f32, 0.2], &dev).unwrap()];
    clip_grad_norm(&mut small, 1.0).unwrap();
    assert_eq!(small[0].to_vec1::<f32>().unwrap(), vec![0.1, 0.2]);
}
