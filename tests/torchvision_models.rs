//! torchvision ResNets: parameter counts, gradients, and logits against PyTorch fixtures.
//!
//! The fixtures (tests/fixtures/models/torchvision_*.safetensors, written by
//! scripts/fixtures_torchvision.py) hold the state dicts of reduced-width torchvision ResNets
//! (torchvision's own BasicBlock / Bottleneck classes and forward) with BatchNorm in a
//! non-trivial state, a fixed input, and PyTorch's logits.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sgr_core::method::Method;
use sgr_core::network::LocalNetwork;
use sgr_core::nn::{Ctx, Decision, ParamKind};
use sgr_core::objective::Batch;
use sgr_core::sgr::{
    base_pass, sgr_term_grad, BasePoint, Distance, LocalModule, SgrConfig, SgrGrad, Site,
};
use sgr_core::trainer::Trainer;
use sgr_integration_tests::{
    abs_sum, assert_module_learns, flat, labels, load_state_dict, randn, rel_err, sgr_config,
    site_grad, target_near, targets, trainer_config,
};
use sgr_models::resnet_imagenet::{BlockKind, ImageNetResNet, ImageNetResNetConfig};
use sgr_models::{HeadKind, ModelOptions, SplitStrategy};

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(format!("torchvision_{name}.safetensors"))
}

/// The fixture's tensors and the configuration recorded in its metadata.
fn fixture(name: &str) -> (HashMap<String, Tensor>, ImageNetResNetConfig) {
    let path = fixture_path(name);
    let bytes = std::fs::read(&path).expect("fixture");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
    let meta = meta.metadata().clone().expect("metadata");
    assert!(meta["torch"].starts_with("2."), "{meta:?}");
    assert!(meta.contains_key("torchvision"), "{meta:?}");
    let cfg: ImageNetResNetConfig = serde_json::from_str(&meta["config"]).expect("config");
    let map = sgr_core::checkpoint::load_tensors(&path, &Device::Cpu).expect("tensors");
    (map, cfg)
}

fn build(cfg: &ImageNetResNetConfig, options: ModelOptions, dtype: DType) -> LocalNetwork {
    ImageNetResNet {
        config: cfg.clone(),
        options,
    }
    .build(&Device::Cpu, dtype)
    .expect("build")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = flat(std::slice::from_ref(a));
    let b = flat(std::slice::from_ref(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn buffers(net: &LocalNetwork) -> Vec<(String, Vec<f64>)> {
    net.params()
        .into_iter()
        .filter(|p| p.kind == ParamKind::Buffer)
        .map(|p| (p.name, flat(&[p.var.as_tensor().clone()])))
        .collect()
}

#[test]
fn torchvision_weights_load_unchanged_and_give_pytorchs_logits() {
    for name in ["basic", "bottleneck"] {
        let (map, cfg) = fixture(name);
        let want_block = if name == "basic" {
            BlockKind::Basic
        } else {
            BlockKind::Bottleneck
        };
        assert_eq!(cfg.block, want_block);
        let x = &map["__input__"];
        for (dtype, key, bound) in [
            (DType::F32, "__logits__", 1e-4),
            (DType::F64, "__logits_f64__", 1e-10),
        ] {
            let net = build(&cfg, ModelOptions::default(), dtype);
            load_state_dict(&net.params(), &map);
            let y = net
                .forward(&x.to_dtype(dtype).unwrap(), &mut Ctx::eval())
                .unwrap();
            let d = max_abs_diff(&y, &map[key]);
            eprintln!("{name} {dtype:?}: max |logit - PyTorch| = {d:.2e}");
            assert!(
                d <= bound,
                "{name} {dtype:?}: max |logit diff| {d:e} > {bound:e}"
            );
            let scale = abs_sum(&map[key]) / map[key].elem_count() as f64;
            assert!(
                scale > 0.05,
                "{name}: the logits are not trivially small ({scale})"
            );
        }
    }
}

/// Training mode uses batch statistics and updates the running statistics as PyTorch does
/// (checked against PyTorch's train-mode forward and its updated buffers); evaluation mode
/// uses the running statistics and leaves them alone; `train_frozen_stats` uses batch
/// statistics and leaves them alone.
#[test]
fn batchnorm_train_and_eval_modes_behave_as_pytorchs() {
    for name in ["basic", "bottleneck"] {
        let (map, cfg) = fixture(name);
        let net = build(&cfg, ModelOptions::default(), DType::F64);
        load_state_dict(&net.params(), &map);
        let x = map["__input__"].to_dtype(DType::F64).unwrap();
        let before = buffers(&net);
        let e1 = net.forward(&x, &mut Ctx::eval()).unwrap();
        let e2 = net.forward(&x, &mut Ctx::eval()).unwrap();
        assert_eq!(
            buffers(&net),
            before,
            "{name}: eval changed the running statistics"
        );
        assert_eq!(flat(std::slice::from_ref(&e1)), flat(&[e2]));
        let frozen = net.forward(&x, &mut Ctx::train_frozen_stats()).unwrap();
        assert_eq!(buffers(&net), before, "{name}: frozen statistics changed");
        let t = net.forward(&x, &mut Ctx::train()).unwrap();
        let d = max_abs_diff(&t, &map["__train_logits_f64__"]);
        assert!(
            d < 1e-9,
            "{name}: train-mode logits differ from PyTorch's by {d:e}"
        );
        assert!(max_abs_diff(&t, &frozen) < 1e-12);
        assert!(
            max_abs_diff(&t, &e1) > 1e-3,
            "{name}: batch and running statistics give the same logits"
        );
        for p in net
            .params()
            .into_iter()
            .filter(|p| p.kind == ParamKind::Buffer)
        {
            let want = &map[&format!("__after__.{}", p.name)];
            let got = p.var.as_tensor().flatten_all().unwrap();
            let d = max_abs_diff(
                &got,
                &want.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
            );
            assert!(
                d < 1e-10,
                "{name}: `{}` after a train step differs by {d:e}",
                p.name
            );
        }
        let nbt = net
            .params()
            .into_iter()
            .find(|p| p.name == "bn1.num_batches_tracked")
            .unwrap();
        assert_eq!(flat(&[nbt.var.as_tensor().clone()]), [4.0]);
    }
}

fn tiny(block: BlockKind) -> ImageNetResNetConfig {
    ImageNetResNetConfig {
        block,
        layers: [1, 1, 1, 1],
        widths: [4, 8, 16, 32],
        stem_width: 8,
        in_channels: 3,
        num_classes: 10,
    }
}

fn options(k: usize, head: HeadKind, seed: u64) -> ModelOptions {
    ModelOptions {
        modules: k,
        split: SplitStrategy::Uniform,
        head,
        seed,
        ..ModelOptions::default()
    }
}

/// Every trainable parameter gets a non-zero gradient: from end-to-end back-propagation (bp),
/// from each module's local loss (greedy), and from the SGR term in both ways at both sites,
/// for BasicBlock and Bottleneck ResNets with InfoPro's and DGL's heads.
#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    for block in [BlockKind::Basic, BlockKind::Bottleneck] {
        let cfg = tiny(block);
        for head in [HeadKind::Infopro, HeadKind::Dgl] {
            let net = build(&cfg, options(3, head, 3), DType::F32);
            let batch = targets(&labels(8, 2));
            let mut h = randn(&[8, 3, 32, 32], 1.0, 1, DType::F32);
            for k in 0..net.num_modules() {
                let mut sites = vec![Site::Input];
                if k + 1 < net.num_modules() {
                    sites.push(Site::Output);
                }
                let ways = [SgrGrad::FiniteDifference, SgrGrad::Exact];
                let label = format!("{block:?} {head:?}");
                let base = assert_module_learns(&net, k, &batch, &h, &sites, &ways, &label);
                if k == 0 {
                    assert!(base.masks.iter().any(|d| matches!(d, Decision::MaxPool(_))));
                }
                h = base.output;
            }
        }
        // bp: the whole network as one graph.
        let net = build(&cfg, options(1, HeadKind::Auto, 3), DType::F32);
        let x = randn(&[8, 3, 32, 32], 1.0, 1, DType::F32);
        let y = labels(8, 2);
        let logits = net.forward(&x, &mut Ctx::train()).unwrap();
        let store = sgr_core::loss::cross_entropy(&logits, &y)
            .unwrap()
            .backward()
            .unwrap();
        for p in net.trainable() {
            let g = store
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("bp {block:?}: `{}` got no gradient", p.name));
            assert!(
                abs_sum(g) > 0.0,
                "bp {block:?}: `{}` got a zero gradient",
                p.name
            );
        }
    }
}

/// bp, greedy and sgr train a small ImageNet ResNet through the Trainer: finite losses, and
/// every trainable tensor moves.
#[test]
fn trainer_steps_with_bp_greedy_and_sgr() {
    let cfg = tiny(BlockKind::Bottleneck);
    for (what, method, k) in [
        ("bp", Method::bp(), 1),
        ("greedy", Method::greedy(), 3),
        ("sgr", Method::sgr(SgrConfig::default()), 3),
    ] {
        let net = build(&cfg, options(k, HeadKind::Infopro, 5), DType::F32);
        let before: Vec<Tensor> = net
            .trainable()
            .iter()
            .map(|p| p.var.as_tensor().copy().unwrap())
            .collect();
        let mut t = Trainer::new(net, trainer_config(method)).unwrap();
        for s in 0..2 {
            let x = randn(&[8, 3, 32, 32], 1.0, 10 + s, DType::F32);
            let m = t
                .train_step(&Batch::labelled(x, labels(8, 20 + s)))
                .unwrap();
            assert!(m.losses().unwrap().iter().all(|l| l.is_finite()));
        }
        for (p, b) in t.network().trainable().iter().zip(&before) {
            let moved = abs_sum(&(p.var.as_tensor() - b).unwrap());
            assert!(moved > 0.0, "{what}: `{}` did not move", p.name);
        }
    }
}

/// The finite-difference SGR gradient (ReLU masks and max-pool selections replayed, BatchNorm
/// statistics untouched) equals the exact double backward on Bottleneck modules: the stem
/// (max-pool included) with layer1.0, and the strided layer2.0 with layer3.0, in f64.
#[test]
fn finite_difference_sgr_gradient_matches_exact_on_bottleneck_modules() {
    let cfg = tiny(BlockKind::Bottleneck);
    // Uniform K=3 over 5 units: [stem, layer1.0], [layer2.0, layer3.0], [layer4.0 + fc].
    let net = build(&cfg, options(3, HeadKind::Infopro, 7), DType::F64);
    assert_eq!(net.plan().ends(), &[1, 3, 4]);
    let y = labels(8, 1);
    let x0 = randn(&[8, 3, 32, 32], 1.0, 40, DType::F64);
    let stem_out = {
        let prob = LocalModule {
            net: &net,
            k: 0,
            batch: &targets(&y),
        };
        base_pass(&prob, &x0, false, false).unwrap().output
    };
    let cases = [
        (0usize, Site::Input, Distance::SquaredL2),
        (0, Site::Output, Distance::Cosine),
        (1, Site::Input, Distance::SquaredL2),
        (1, Site::Output, Distance::CosinePerSample),
    ];
    for (ci, (k, site, distance)) in cases.into_iter().enumerate() {
        let x = if k == 0 { x0.clone() } else { stem_out.clone() };
        let prob = LocalModule {
            net: &net,
            k,
            batch: &targets(&y),
        };
        let base = base_pass(&prob, &x, true, true).unwrap();
        let pools = base
            .masks
            .iter()
            .filter(|d| matches!(d, Decision::MaxPool(_)))
            .count();
        assert_eq!(pools, usize::from(k == 0));
        let s0 = site_grad(&base, site);
        let t = target_near(&s0, 7 + ci as u64);
        let term = |way, eps| {
            let c = SgrConfig {
                fd_epsilon: eps,
                ..sgr_config(distance, way)
            };
            sgr_term_grad(&prob, &x, site, &s0, &t, BasePoint::of(&base), &c).unwrap()
        };
        let ex = term(SgrGrad::Exact, None);
        let err = |eps| {
            let fd = term(SgrGrad::FiniteDifference, eps);
            (rel_err(&flat(&fd.grads), &flat(&ex.grads)), fd)
        };
        // With every decision replayed the perturbed passes are smooth: the central difference
        // converges as ε² down to f64 round-off (the default ε is sized for f32 and real
        // widths; this tiny network's BatchNorms over 2×2 maps are strongly curved). A decision
        // left unreplayed would leave an O(1) error at kink crossings however small ε is.
        let (e_default, fd) = err(None);
        let (e4, _) = err(Some(1e-4));
        let (e5, _) = err(Some(1e-5));
        eprintln!(
            "module {k} {site:?} {distance:?}: finite difference vs exact {e_default:.2e} \
             (default ε), {e4:.2e} (ε = 1e-4), {e5:.2e} (ε = 1e-5)"
        );
        assert!(
            e_default < 5e-2,
            "module {k} {site:?} {distance:?}: {e_default:e}"
        );
        assert!(
            e5 < 1e-7,
            "module {k} {site:?} {distance:?}: {e5:e} at ε = 1e-5"
        );
        assert!(
            e5 < e4 / 30.0,
            "module {k} {site:?} {distance:?}: no ε² convergence"
        );
        let (a, b) = (
            fd.distance.to_scalar::<f64>().unwrap(),
            ex.distance.to_scalar::<f64>().unwrap(),
        );
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1e-12));
    }
}
