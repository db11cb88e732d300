//! The baselines (`dgl`, `infopro`, `infopro-contrast`) and their composition with SGR, on
//! real ResNet modules: every parameter learns, the SGR gradient through each loss matches the
//! exact double backward, and λ = 0 is the base method bit for bit. The losses themselves are
//! checked against PyTorch in `baselines_reference.rs`.

use candle_core::{DType, Device};
use sgr_core::method::{Method, Objective};
use sgr_core::objective::{Batch, PixelStats};
use sgr_core::sgr::{
    base_pass, sgr_term_grad, BasePoint, Distance, LocalModule, SgrConfig, SgrGrad, Site,
};
use sgr_core::trainer::Trainer;
use sgr_integration_tests::{
    assert_module_learns, flat, labels, max_param_diff, randn, rel_err, resnet_for, sgr_config,
    site_grad, target_near, trainer_config,
};
use sgr_models::{CifarResNet, ModelOptions, ResNetConfig, SplitStrategy};

const BASELINES: [Objective; 3] = [
    Objective::Dgl,
    Objective::Infopro,
    Objective::InfoproContrast,
];

/// Images (normalised), labels with every class repeated (the contrastive loss needs positives).
fn batch(n: usize, side: usize, seed: u64, dtype: DType) -> Batch {
    Batch::labelled(
        randn(&[n, 3, side, side], 1.0, seed, dtype),
        labels(n, seed + 50),
    )
}

/// Under every baseline, each trainable parameter of each module, heads and decoders included,
/// gets a non-zero gradient from the local loss and from the SGR term in all three ways at
/// both sites.
#[test]
fn every_parameter_of_every_baseline_gets_a_gradient() {
    for objective in BASELINES {
        let net = resnet_for(8, 3, objective, DType::F32);
        let b = batch(12, 8, 1, DType::F32);
        let mut h = b.input.clone();
        for k in 0..net.num_modules() {
            let names: Vec<String> = net
                .module_trainable(k)
                .into_iter()
                .map(|p| p.name)
                .collect();
            if k + 1 < net.num_modules() {
                let head = format!("aux.{k}.");
                assert!(
                    names.iter().any(|n| n.starts_with(&head)),
                    "{objective}: module {k} has no head"
                );
                let decoder = format!("aux.{k}.decoder.3.");
                assert_eq!(
                    names.iter().any(|n| n.starts_with(&decoder)),
                    objective != Objective::Dgl,
                    "{objective}: module {k}: {names:?}"
                );
            }
            let mut sites = vec![];
            if k > 0 {
                sites.push(Site::Input);
            }
            if k + 1 < net.num_modules() {
                sites.push(Site::Output);
            }
            let ways = [
                SgrGrad::FiniteDifference,
                SgrGrad::ForwardDifference,
                SgrGrad::Exact,
            ];
            h = assert_module_learns(&net, k, &b, &h, &sites, &ways, objective.name()).output;
        }
    }
}

/// The SGR parameter gradient of each composed method, through its whole local loss (the
/// decoder's reconstruction and the contrastive loss included), by central and one-sided
/// differences with the decisions replayed, against the exact double backward.
#[test]
fn sgr_gradient_through_each_baseline_matches_the_exact_double_backward() {
    for objective in BASELINES {
        // ResNet-20 in 3 modules: the middle one holds the downsampling block.
        let net = resnet_for(20, 3, objective, DType::F32);
        let b = batch(24, 16, 7, DType::F32);
        for (k, site, distance) in [
            (1usize, Site::Input, Distance::SquaredL2),
            (0, Site::Output, Distance::Cosine),
        ] {
            // Module k's input: the image, or module 0's output.
            let x = if k == 0 {
                b.input.clone()
            } else {
                let p0 = LocalModule {
                    net: &net,
                    k: 0,
                    batch: &b,
                };
                base_pass(&p0, &b.input, false, false).unwrap().output
            };
            let prob = LocalModule {
                net: &net,
                k,
                batch: &b,
            };
            let base = base_pass(&prob, &x, k > 0, true).unwrap();
            let s0 = site_grad(&base, site);
            let t = target_near(&s0, 11);
            let term = |way| {
                sgr_term_grad(
                    &prob,
                    &x,
                    site,
                    &s0,
                    &t,
                    BasePoint::of(&base),
                    &sgr_config(distance, way),
                )
                .unwrap()
            };
            let exact = term(SgrGrad::Exact);
            for (way, bound) in [
                (SgrGrad::FiniteDifference, 1e-3),
                (SgrGrad::ForwardDifference, 1e-2),
            ] {
                let fd = term(way);
                let err = rel_err(&flat(&fd.grads), &flat(&exact.grads));
                eprintln!(
                    "{objective} module {k} {site:?} {distance:?}: {way:?} vs exact {err:.2e}"
                );
                assert!(
                    err < bound,
                    "{objective} module {k} {site:?}: {way:?} vs exact relative error {err:e}"
                );
            }
        }
    }
}

/// `<baseline>+sgr` with λ = 0 takes exactly the base method's steps.
#[test]
fn each_baseline_with_zero_lambda_sgr_is_the_baseline_bit_for_bit() {
    for objective in BASELINES {
        for grad in [SgrGrad::FiniteDifference, SgrGrad::Exact] {
            let plain = Trainer::new(
                resnet_for(8, 3, objective, DType::F32),
                trainer_config(Method::plain(objective)),
            );
            let with = Trainer::new(
                resnet_for(8, 3, objective, DType::F32),
                trainer_config(Method {
                    sgr: Some(SgrConfig {
                        lambda: 0.0,
                        ..sgr_config(Distance::SquaredL2, grad)
                    }),
                    ..Method::plain(objective)
                }),
            );
            let (mut plain, mut with) = (plain.unwrap(), with.unwrap());
            for step in 0..2 {
                let b = batch(12, 8, 20 + step, DType::F32);
                plain.train_step(&b).unwrap();
                with.train_step(&b).unwrap();
            }
            let d = max_param_diff(plain.network(), with.network());
            assert_eq!(d, 0.0, "{objective}+sgr (λ = 0, {grad:?}) differs by {d}");
        }
    }
}

/// InfoPro's weights move linearly from the first local module to the last one, and the
/// objectives carry them; a model without feature maps refuses InfoPro with a clear error.
#[test]
fn infopro_weights_are_interpolated_and_transformers_are_refused() {
    let cfg = sgr_core::objective::InfoproConfig::default();
    assert_eq!(cfg.weights(0, 16), (5.0, 0.05));
    let (r, t) = cfg.weights(14, 16);
    assert!((r - 0.2).abs() < 1e-12 && (t - 0.5).abs() < 1e-12);
    let (r, t) = cfg.weights(7, 16);
    assert!((r - 2.6).abs() < 1e-12 && (t - 0.275).abs() < 1e-12);
    assert_eq!(cfg.weights(0, 2), (5.0, 0.05));
    // Transformers have no feature map for InfoPro's decoder or DGL's head.
    for (objective, want) in [
        (Objective::Infopro, "feature map"),
        (Objective::Dgl, "method dgl"),
    ] {
        let e = sgr_models::zoo::build(
            "vit-cifar",
            sgr_models::Input {
                channels: 3,
                classes: 10,
                size: 32,
            },
            &ModelOptions {
                modules: 2,
                objective,
                ..ModelOptions::default()
            },
            &Device::Cpu,
            DType::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(want) && e.contains("greedy"), "{objective}: {e}");
    }
    // A batch of one has nothing to contrast with: a loss of 0, not NaN.
    let f = randn(&[1, 8], 1.0, 4, DType::F32);
    let y = labels(1, 4);
    let l = sgr_core::loss::supervised_contrastive(&f, &y, 0.07).unwrap();
    assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0);
    // The contrastive loss compares hard labels: soft targets are refused, not misread.
    let net = resnet_for(8, 2, Objective::InfoproContrast, DType::F32);
    let b = batch(8, 8, 3, DType::F32);
    let soft = Batch::soft(
        b.input.clone(),
        sgr_core::loss::one_hot(b.targets.labels().unwrap(), 10, DType::F32).unwrap(),
    );
    let e = net
        .module_objective(0)
        .unwrap()
        .loss(
            &net.module_body(0, &b.input, &mut sgr_core::nn::Ctx::train())
                .unwrap(),
            &soft,
            &mut sgr_core::nn::Ctx::train(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("hard labels") && e.contains("mixup"), "{e}");
}

/// An InfoPro module whose task (or reconstruction) weight is 0 has a head (or decoder) that
/// takes no part in its loss: those tensors are buffers, kept and saved but not trained, so a
/// step trains (a trainable tensor without gradient would be an error naming it) and leaves
/// them as they were.
#[test]
fn infopro_parts_with_zero_weight_are_not_trained() {
    use sgr_core::nn::ParamKind;
    for (recon, task, unused) in [(5.0, 0.0, "aux.0.fc1.weight"), (0.0, 1.0, "aux.0.decoder")] {
        let mut network = CifarResNet {
            config: ResNetConfig {
                depth: 8,
                in_channels: 3,
                num_classes: 10,
            },
            options: ModelOptions {
                modules: 2,
                split: SplitStrategy::Uniform,
                seed: 5,
                objective: Objective::Infopro,
                pixels: Some(PixelStats {
                    mean: vec![0.5, 0.4, 0.3],
                    std: vec![0.25, 0.2, 0.3],
                }),
                ..ModelOptions::default()
            },
        };
        network.options.infopro.recon_first = recon;
        network.options.infopro.task_first = task;
        let net = network.build(&Device::Cpu, DType::F32).unwrap();
        let frozen: Vec<_> = net
            .module_params(0)
            .into_iter()
            .filter(|p| p.name.starts_with(unused))
            .collect();
        assert!(!frozen.is_empty(), "{unused}");
        assert!(
            frozen.iter().all(|p| p.kind == ParamKind::Buffer),
            "{unused}"
        );
        let before: Vec<Vec<f32>> = frozen
            .iter()
            .map(|p| p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let mut t = Trainer::new(net, trainer_config(Method::plain(Objective::Infopro))).unwrap();
        t.train_step(&batch(8, 8, 1, DType::F32)).unwrap();
        let after: Vec<Vec<f32>> = frozen
            .iter()
            .map(|p| p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        assert_eq!(before, after, "{unused} stays as it was");
    }
}
