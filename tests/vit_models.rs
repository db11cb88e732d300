//! ViT/DeiT: logits against timm fixtures, every parameter's gradient under bp, greedy and sgr
//! for each aux head kind, the finite-difference SGR gradient against the exact one with dropout
//! and drop-path active, and the dropout semantics (identity in eval, replayed in train).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sgr_core::method::Method;
use sgr_core::network::LocalNetwork;
use sgr_core::nn::{Ctx, Decision};
use sgr_core::objective::Batch;
use sgr_core::optim::{DecayScope, OptimizerConfig};
use sgr_core::sgr::{
    base_pass, base_pass_in, sgr_term_grad, BasePoint, Distance, LocalModule, SgrConfig, SgrGrad,
    Site,
};
use sgr_core::trainer::Trainer;
use sgr_integration_tests::{
    abs_sum, assert_module_learns, flat, labels, randn, rel_err, sgr_config, site_grad,
    target_near, targets, trainer_config,
};
use sgr_models::vit::{VisionTransformer, VitConfig};
use sgr_models::{HeadKind, ModelOptions, SplitStrategy};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(format!("timm_{name}.safetensors"))
}

/// The timm configuration recorded in a fixture's metadata, as a [`VitConfig`].
fn fixture_config(path: &Path) -> VitConfig {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().expect("metadata");
    assert!(meta.contains_key("torch") && meta.contains_key("timm"));
    let c: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    VitConfig {
        name: "timm-fixture".into(),
        image_size: u("img_size"),
        patch_size: u("patch_size"),
        in_channels: u("in_chans"),
        num_classes: u("num_classes"),
        embed_dim: u("embed_dim"),
        depth: u("depth"),
        num_heads: u("num_heads"),
        mlp_ratio: c["mlp_ratio"].as_f64().unwrap(),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (flat(std::slice::from_ref(a)), flat(std::slice::from_ref(b)));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// timm's own VisionTransformer (reduced sizes, random non-trivial weights) loads unchanged by
/// name and gives the same logits in eval mode, in f32 and in f64.
#[test]
fn timm_weights_load_unchanged_and_give_timms_logits() {
    for name in ["vit", "vit_p4"] {
        let path = fixture(name);
        let cfg = fixture_config(&path);
        let file = sgr_core::checkpoint::load_tensors(&path, &Device::Cpu).unwrap();
        let (extra, weights): (HashMap<_, _>, HashMap<_, _>) =
            file.into_iter().partition(|(k, _)| k.starts_with("__"));
        for (dtype, want, tol) in [
            (DType::F32, "__logits__", 1e-4),
            (DType::F64, "__logits_f64__", 1e-10),
        ] {
            let net = VisionTransformer {
                config: cfg.clone(),
                options: ModelOptions {
                    dropout: 0.1,
                    drop_path: 0.1,
                    ..ModelOptions::default()
                },
            }
            .build(&Device::Cpu, dtype)
            .unwrap();
            let params = net.params();
            let mut names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            let mut file_names: Vec<&str> = weights.keys().map(String::as_str).collect();
            names.sort_unstable();
            file_names.sort_unstable();
            assert_eq!(names, file_names, "{name}: timm's names");
            for p in &params {
                let t = &weights[&p.name];
                assert_eq!(t.dims(), p.var.dims(), "{name}: `{}`", p.name);
                p.var.set(&t.to_dtype(dtype).unwrap()).unwrap();
            }
            let x = extra["__input__"].to_dtype(dtype).unwrap();
            let logits = net.forward(&x, &mut Ctx::eval()).unwrap();
            let d = max_abs_diff(&logits, &extra[want]);
            eprintln!("{name} {dtype:?}: max |logits − timm's| = {d:.1e}");
            assert!(d <= tol, "{name} {dtype:?}: max |diff| {d:e}");
        }
    }
}

/// A tiny ViT on 3×16×16 images: patch 4 (17 tokens), width 16, 2 heads, MLP ratio 2.
fn tiny(depth: usize, k: usize, head: HeadKind, drop: (f64, f64), dtype: DType) -> LocalNetwork {
    let net = VisionTransformer {
        config: VitConfig {
            name: "vit-tiny".into(),
            image_size: 16,
            patch_size: 4,
            in_channels: 3,
            num_classes: 10,
            embed_dim: 16,
            depth,
            num_heads: 2,
            mlp_ratio: 2.0,
        },
        options: ModelOptions {
            modules: k,
            split: SplitStrategy::Uniform,
            head,
            seed: 3,
            dropout: drop.0,
            drop_path: drop.1,
            ..ModelOptions::default()
        },
    }
    .build(&Device::Cpu, dtype)
    .unwrap();
    randomise(&net);
    net
}

/// Order-one weights (timm's 0.02 init leaves attention nearly uniform and the class token at
/// ~1e-6): LayerNorm γ ≈ 1, biases and embeddings ~0.3, weights of unit gain.
fn randomise(net: &LocalNetwork) {
    for (i, p) in net.trainable().iter().enumerate() {
        let dims = p.var.dims().to_vec();
        let r = randn(&dims, 1.0, 1000 + i as u64, p.var.dtype());
        let leaf = p.name.rsplit('.').nth(1).unwrap_or("");
        let t = if p.name.ends_with(".weight") && leaf.starts_with("norm") {
            ((r * 0.3).unwrap() + 1.0).unwrap()
        } else if p.name.ends_with(".bias") || !p.name.contains('.') {
            (r * 0.3).unwrap()
        } else {
            let fan_in: usize = dims[1..].iter().product();
            (r / (fan_in as f64).sqrt()).unwrap()
        };
        p.var.set(&t).unwrap();
    }
}

fn images(n: usize, seed: u64) -> Tensor {
    randn(&[n, 3, 16, 16], 1.0, seed, DType::F32)
}

/// Every trainable parameter — cls_token and pos_embed, every block, the final norm and head,
/// every aux head — gets a non-zero gradient from bp, from each module's greedy local loss, and
/// from the SGR term (finite difference and exact, both sites), for each aux head kind.
#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    let x0 = images(4, 1);
    let y = labels(4, 2);
    let batch = targets(&y);
    // depth 3, K = 3: embed + blocks.0 | blocks.1 | blocks.2 + classifier; K = 4: the embedding
    // alone first (where `auto` is block-token).
    for (head, k) in [
        (HeadKind::Token, 3),
        (HeadKind::Mean, 3),
        (HeadKind::BlockToken, 3),
        (HeadKind::BlockMean, 3),
        (HeadKind::Auto, 4),
    ] {
        let net = tiny(3, k, head, (0.0, 0.0), DType::F32);
        assert_eq!(net.plan().ends().len(), k);
        let mut h = x0.clone();
        let mut seen = 0;
        for k in 0..net.num_modules() {
            seen += net.module_trainable(k).len();
            let mut sites = vec![Site::Input];
            if k + 1 < net.num_modules() {
                sites.push(Site::Output);
            }
            let ways = [SgrGrad::FiniteDifference, SgrGrad::Exact];
            let label = format!("{head:?}");
            h = assert_module_learns(&net, k, &batch, &h, &sites, &ways, &label).output;
        }
        assert_eq!(
            seen,
            net.trainable().len(),
            "every parameter is in a module"
        );
        let aux = net
            .trainable()
            .into_iter()
            .filter(|p| p.name.starts_with("aux."))
            .count();
        let want = match head {
            HeadKind::BlockToken | HeadKind::BlockMean => 2 * 16,
            HeadKind::Auto => 16 + 2 * 4,
            _ => 2 * 4,
        };
        assert_eq!(aux, want, "{head:?}");
    }
    // bp: the whole network as one graph.
    let net = tiny(3, 1, HeadKind::Auto, (0.0, 0.0), DType::F32);
    let loss =
        sgr_core::loss::cross_entropy(&net.forward(&x0, &mut Ctx::train()).unwrap(), &y).unwrap();
    let store = loss.backward().unwrap();
    for p in net.trainable() {
        let g = store
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("bp: `{}` got no gradient", p.name));
        assert!(abs_sum(g) > 0.0, "bp: `{}` got a zero gradient", p.name);
    }
}

/// One trainer step of bp, greedy and sgr (K = 2, dropout and drop-path on, no weight decay)
/// moves every trainable parameter.
#[test]
fn one_step_of_bp_greedy_and_sgr_moves_every_parameter() {
    let x = images(8, 3);
    let y = labels(8, 4);
    for (method, k) in [
        (Method::bp(), 1),
        (Method::greedy(), 2),
        (Method::sgr(SgrConfig::default()), 2),
    ] {
        let net = tiny(2, k, HeadKind::BlockMean, (0.1, 0.2), DType::F32);
        let before: Vec<(String, Tensor)> = net
            .trainable()
            .into_iter()
            .map(|p| (p.name, p.var.as_tensor().copy().unwrap()))
            .collect();
        let mut tc = trainer_config(method.clone());
        tc.optimizer = OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            decay: DecayScope::All,
        };
        let mut trainer = Trainer::new(net, tc).unwrap();
        let m = trainer
            .train_step(&Batch::labelled(x.clone(), y.clone()))
            .unwrap();
        assert!(m.losses().unwrap().iter().all(|l| l.is_finite()));
        let after = trainer.network().trainable();
        for ((name, b), p) in before.iter().zip(&after) {
            assert_eq!(name, &p.name);
            let d = abs_sum(&(p.var.as_tensor() - b).unwrap());
            assert!(d > 0.0, "{method:?}: `{name}` did not move");
        }
    }
}

fn dropout_masks(d: &[Decision]) -> Vec<&Tensor> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Dropout(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// The finite-difference SGR gradient (dropout and drop-path masks of the base pass replayed)
/// equals the exact double backward on ViT modules in training mode with dropout 0.1 and
/// drop-path up to 0.3, in f32; replaying another pass's masks instead is far off.
#[test]
fn finite_difference_sgr_gradient_matches_exact_with_dropout_and_drop_path() {
    // depth 3, K = 2: module 0 = embed + blocks.0 with a block-token aux head (dropout inside),
    // module 1 = blocks.1-2 (drop-path 0.15, 0.3) + classifier.
    let net = tiny(3, 2, HeadKind::BlockToken, (0.1, 0.3), DType::F32);
    let x0 = images(16, 5);
    let y = labels(16, 6);
    let batch = targets(&y);
    let m0 = LocalModule {
        net: &net,
        k: 0,
        batch: &batch,
    };
    let h1 = base_pass(&m0, &x0, false, false).unwrap().output;
    let cases = [
        (0usize, Site::Output, Distance::SquaredL2, x0.clone()),
        (1, Site::Input, Distance::SquaredL2, h1.clone()),
        (1, Site::Input, Distance::Cosine, h1.clone()),
    ];
    for (ci, (k, site, distance, x)) in cases.into_iter().enumerate() {
        let prob = LocalModule {
            net: &net,
            k,
            batch: &batch,
        };
        let base = base_pass(&prob, &x, true, true).unwrap();
        let masks = dropout_masks(&base.masks);
        // module 0: pos_drop, 4 in blocks.0 (no drop-path there), 4 in the aux block;
        // module 1: 4 per block + 2 drop-paths per block.
        assert_eq!(masks.len(), if k == 0 { 9 } else { 12 }, "module {k}");
        if k == 1 {
            let dropped = masks
                .iter()
                .filter(|m| m.rank() == 3 && m.dim(1).unwrap() == 1)
                .map(|m| {
                    flat(std::slice::from_ref(*m))
                        .iter()
                        .filter(|&&v| v == 0.0)
                        .count()
                })
                .sum::<usize>();
            assert!(dropped > 0, "some sample's branch is dropped");
        }
        let s0 = site_grad(&base, site);
        let t = target_near(&s0, 7 + ci as u64);
        let term = |way, point| {
            sgr_term_grad(&prob, &x, site, &s0, &t, point, &sgr_config(distance, way)).unwrap()
        };
        let ex = term(SgrGrad::Exact, BasePoint::of(&base));
        for (way, bound) in [
            (SgrGrad::FiniteDifference, 1e-3),
            (SgrGrad::ForwardDifference, 1e-2),
        ] {
            let fd = term(way, BasePoint::of(&base));
            let err = rel_err(&flat(&fd.grads), &flat(&ex.grads));
            eprintln!("module {k} {site:?} {distance:?}: {way:?} vs exact {err:.2e}");
            assert!(
                err < bound,
                "module {k} {site:?} {distance:?} {way:?}: {err:e}"
            );
        }
        // Another pass's masks (another seed): the difference no longer differentiates the
        // base point's function.
        let other = base_pass_in(&prob, &x, true, Ctx::train_recording().with_seed(77)).unwrap();
        let wrong = BasePoint {
            masks: &other.masks,
            ..BasePoint::of(&base)
        };
        let fd_wrong = term(SgrGrad::FiniteDifference, wrong);
        let e_wrong = rel_err(&flat(&fd_wrong.grads), &flat(&ex.grads));
        assert!(e_wrong > 0.05, "module {k}: other masks give {e_wrong:e}");
    }
}

/// Dropout and drop-path: the identity in eval mode (the same logits as without them), random
/// in train mode (another seed, another output), and replayed exactly from a recording.
#[test]
fn dropout_and_drop_path_are_identity_in_eval_and_replayed_in_train() {
    let with = tiny(3, 1, HeadKind::Auto, (0.2, 0.2), DType::F32);
    let without = tiny(3, 1, HeadKind::Auto, (0.0, 0.0), DType::F32);
    let x = images(8, 9);
    let v = |t: Tensor| flat(&[t]);
    let eval = v(with.forward(&x, &mut Ctx::eval()).unwrap());
    assert_eq!(eval, v(without.forward(&x, &mut Ctx::eval()).unwrap()));
    assert_eq!(eval, v(without.forward(&x, &mut Ctx::train()).unwrap()));
    let mut rec = Ctx::train_recording().with_seed(1);
    let a = v(with.forward(&x, &mut rec).unwrap());
    let masks = rec.take_masks();
    // pos_drop, 4 dropouts per block, drop-path (0, 0.1, 0.2) twice in blocks 1 and 2
    assert_eq!(dropout_masks(&masks).len(), 1 + 3 * 4 + 2 * 2);
    assert_ne!(a, eval);
    let b = v(with.forward(&x, &mut Ctx::train().with_seed(2)).unwrap());
    assert_ne!(a, b);
    let mut rep = Ctx::train_replaying(masks.clone()).with_seed(2);
    assert_eq!(a, v(with.forward(&x, &mut rep).unwrap()));
    assert_eq!(rep.replay_position(), Some(masks.len()));
}
