//! `sgr inspect`: model summary, split plan, per-module parameters and measured activation
//! memory (with the counting allocator of this binary).

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use sgr_core::nn::Ctx;
use sgr_core::objective::Batch;
use sgr_models::ResNetConfig;
use sgr_run::run::build_network;
use sgr_run::RunSpec;

use crate::args::{InputArgs, MethodArgs};

/// Arguments of `sgr inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model.
    #[arg(long, default_value = "resnet32")]
    model: String,
    #[command(flatten)]
    method: MethodArgs,
    /// Batch size for the measured activation memory.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    input: InputArgs,
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs `sgr inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    use sgr_core::sgr::{LocalModule, LocalProblem, OutputShift};
    a.input.check(a.batch_size)?;
    let spec = a.method.spec(&a.model)?;
    let (modules, split, head) = (spec.num_modules(), spec.split, spec.aux_head);
    let arch = ResNetConfig::preset(&a.model, a.input.channels, a.input.classes)?;
    let device = Device::Cpu;
    let net = build_network(&spec, a.input.channels, a.input.classes, &device)?;
    let plan = net.plan().clone();
    let n = arch.blocks_per_stage();
    let unit_name = |u: usize| {
        if u == 0 {
            "stem".to_string()
        } else {
            format!("layer{}.{}", (u - 1) / n + 1, (u - 1) % n)
        }
    };
    let count = |ps: Vec<sgr_core::nn::Param>| -> usize {
        ps.iter()
            .filter(|p| p.kind == sgr_core::nn::ParamKind::Trainable)
            .map(|p| p.var.elem_count())
            .sum()
    };
    let backbone = count(
        net.params()
            .into_iter()
            .filter(|p| !p.name.starts_with("aux."))
            .collect(),
    );
    println!(
        "{}: depth {}, {} blocks per stage, {} backbone parameters, {} in aux heads; input {}x{}x{}, {} classes",
        a.model,
        arch.depth,
        n,
        backbone,
        net.num_trainable() - backbone,
        a.input.channels,
        a.input.size,
        a.input.size,
        a.input.classes
    );
    println!(
        "split: K={} ({:?}), aux head {}; activation memory measured at batch {} (live heap bytes held by the forward graph; peak while also running backward)",
        modules,
        split,
        head,
        a.batch_size
    );
    println!(
        "{:<7} {:<24} {:>14} {:>10} {:>10} {:>16} {:>16}",
        "module", "blocks", "output", "body", "head", "activations MiB", "fwd+bwd peak MiB"
    );
    let labels = candle_core::Tensor::from_vec(
        (0..a.batch_size)
            .map(|i| (i % a.input.classes) as u32)
            .collect::<Vec<_>>(),
        a.batch_size,
        &device,
    )?;
    let mut h = candle_core::Tensor::randn(
        0f32,
        1.0,
        (a.batch_size, a.input.channels, a.input.size, a.input.size),
        &device,
    )?;
    let batch = Batch::labelled(h.clone(), labels.clone());
    let mut worst = 0usize;
    for k in 0..net.num_modules() {
        let r = plan.range(k);
        let blocks = if r.len() == 1 {
            unit_name(r.start)
        } else {
            format!("{}..{}", unit_name(r.start), unit_name(r.end - 1))
        };
        let all = net.module_params(k);
        let head_params = count(
            all.iter()
                .filter(|p| p.name.starts_with("aux."))
                .cloned()
                .collect(),
        );
        let body_params = count(all) - head_params;
        let prob = LocalModule {
            net: &net,
            k,
            batch: &batch,
        };
        let x = h.detach();
        let before = crate::alloc::live_bytes();
        crate::alloc::reset_peak();
        let f = prob.forward(&x, OutputShift::None, &mut Ctx::train_frozen_stats())?;
        let held = crate::alloc::live_bytes().saturating_sub(before);
        let grads = f.loss.backward()?;
        let peak = crate::alloc::peak_bytes().saturating_sub(before);
        drop(grads);
        worst = worst.max(peak);
        let out_shape = if k + 1 < net.num_modules() {
            format!("{:?}", &f.output.dims()[1..])
        } else {
            format!("logits {}", a.input.classes)
        };
        println!(
            "{:<7} {:<24} {:>14} {:>10} {:>10} {:>16.1} {:>16.1}",
            k + 1,
            blocks,
            out_shape,
            body_params,
            head_params,
            mib(held),
            mib(peak)
        );
        h = f.output.detach();
    }
    // The same network trained end to end keeps the whole graph.
    let whole = build_network(
        &RunSpec {
            modules: Some(1),
            ..spec.clone()
        },
        a.input.channels,
        a.input.classes,
        &device,
    )?;
    let x = candle_core::Tensor::randn(
        0f32,
        1.0,
        (a.batch_size, a.input.channels, a.input.size, a.input.size),
        &device,
    )?;
    let before = crate::alloc::live_bytes();
    crate::alloc::reset_peak();
    let logits = whole.forward(&x, &mut Ctx::train_frozen_stats())?;
    let held = crate::alloc::live_bytes().saturating_sub(before);
    let loss = sgr_core::loss::cross_entropy(&logits, &labels)?;
    let grads = loss.backward()?;
    let peak = crate::alloc::peak_bytes().saturating_sub(before);
    drop(grads);
    println!(
        "end-to-end (bp): activations {:.1} MiB, fwd+bwd peak {:.1} MiB; largest local module peak {:.1} MiB ({:.0}% of bp)",
        mib(held),
        mib(peak),
        mib(worst),
        100.0 * worst as f64 / peak.max(1) as f64
    );
    Ok(())
}
