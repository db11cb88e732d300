//! Bring your own model: a small CNN built with candle-nn on a `VarMap`, cut into three
//! gradient-isolated modules and trained with greedy+sgr for 6 epochs on the embedded 8×8 digits.
//! Run with `cargo run --release -p sgr-integration-tests --example own_model`.
//!
//! The ReLUs go through the forward context (`ctx.relu`), so the finite-difference SGR passes
//! replay their masks; candle-nn's BatchNorm keeps its running statistics in the `VarMap`,
//! which sgr treats as buffers and restores after every SGR pass.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{batch_norm, conv2d, linear, Conv2dConfig, Module, ModuleT, VarBuilder, VarMap};
use sgr_core::events::Event;
use sgr_core::foreign::ForeignStage;
use sgr_core::method::Method;
use sgr_core::network::{LocalNetwork, SplitPlan, Stage};
use sgr_core::nn::{global_avg_pool, Ctx};
use sgr_core::objective::{CrossEntropy, LocalObjective};
use sgr_core::sgr::SgrConfig;
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_data::{Loader, LoaderConfig, Normalize, Pipeline};

/// conv 3×3 → BatchNorm → ReLU (through the context), as one stage named `prefix`.
fn conv_bn_relu(
    vars: &VarMap,
    vb: &VarBuilder,
    prefix: &str,
    cin: usize,
    cout: usize,
    stride: usize,
) -> sgr_core::Result<Box<dyn Stage>> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    let conv = conv2d(cin, cout, 3, cfg, vb.pp(prefix).pp("conv"))?;
    let bn = batch_norm(cout, 1e-5, vb.pp(prefix).pp("bn"))?;
    let stage = ForeignStage::from_fn(prefix, vars, prefix, move |x: &Tensor, ctx: &mut Ctx| {
        let h = bn.forward_t(&conv.forward(x)?, ctx.is_train())?;
        ctx.relu(&h)
    })?;
    Ok(Box::new(stage))
}

/// Global average pool → Linear: the classifier and every auxiliary head.
fn pool_linear(
    vars: &VarMap,
    vb: &VarBuilder,
    prefix: &str,
    cin: usize,
    classes: usize,
) -> sgr_core::Result<Box<dyn Stage>> {
    let fc = linear(cin, classes, vb.pp(prefix))?;
    let stage = ForeignStage::from_fn(prefix, vars, prefix, move |x: &Tensor, _: &mut Ctx| {
        Ok(fc.forward(&global_avg_pool(x)?)?)
    })?;
    Ok(Box::new(stage))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let train = sgr_data::digits(true)?;
    let test = sgr_data::digits(false)?;
    let norm = Pipeline::new(vec![Normalize::from_dataset(&train).transform()]);
    let train_loader = Loader::new(
        Arc::new(train),
        LoaderConfig::train(64, 0),
        norm.clone(),
        &device,
    )?;
    let test_loader = Loader::new(Arc::new(test), LoaderConfig::eval(256), norm, &device)?;

    // The user's model: three conv blocks and a classifier, plus one aux head per local module.
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
    let units = vec![
        conv_bn_relu(&vars, &vb, "block1", 1, 16, 1)?,
        conv_bn_relu(&vars, &vb, "block2", 16, 32, 2)?,
        conv_bn_relu(&vars, &vb, "block3", 32, 32, 1)?,
    ];
    let classifier = pool_linear(&vars, &vb, "fc", 32, 10)?;
    let objectives: Vec<Box<dyn LocalObjective>> = vec![
        Box::new(CrossEntropy::on_head(pool_linear(
            &vars, &vb, "aux1", 16, 10,
        )?)),
        Box::new(CrossEntropy::on_head(pool_linear(
            &vars, &vb, "aux2", 32, 10,
        )?)),
        Box::new(CrossEntropy::on_logits()),
    ];
    // One module per block: K = 3.
    let net = LocalNetwork::new(
        "own-cnn",
        units,
        classifier,
        objectives,
        SplitPlan::uniform(3, 3)?,
        10,
    )?;

    let epochs = 6;
    let mut trainer = Trainer::new(
        net,
        TrainerConfig {
            method: Method::sgr(SgrConfig::default()),
            lr: 0.05,
            epochs,
            steps_per_epoch: train_loader.batches_per_epoch(),
            ..TrainerConfig::default()
        },
    )?;
    for epoch in 0..epochs {
        let m = trainer.run_epoch(train_loader.epoch(epoch), &mut |_: &Event<'_>| {})?;
        let eval = trainer.evaluate(test_loader.epoch(0))?;
        let cos: Vec<String> = m
            .boundaries
            .iter()
            .map(|b| format!("{:.3}", b.cos))
            .collect();
        println!(
            "epoch {epoch}: train loss {:.4}, test accuracy {:.4}, cos(a, b) per boundary [{}]",
            m.train_loss,
            eval.accuracy,
            cos.join(", ")
        );
    }
    // The VarMap holds the trained weights and running statistics under the user's names.
    let out = std::env::temp_dir().join("sgr-own-model.safetensors");
    vars.save(&out)?;
    println!(
        "saved {} tensors to {}",
        vars.all_vars().len(),
        out.display()
    );
    Ok(())
}
