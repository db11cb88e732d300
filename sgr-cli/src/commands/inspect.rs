//! `sgr inspect`: model summary, split plan, per-module parameters, and the training memory of
//! one real step per module against end-to-end BP (counted by this binary's allocator).

use crate::out::outln;
use std::sync::Arc;

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use sgr_core::method::Method;
use sgr_core::nn::{Param, ParamKind};
use sgr_models::SplitStrategy;
use sgr_run::memory::{balanced_spec, measure_step, random_batch, warm_trainer, MemoryMeter};
use sgr_run::RunSpec;

use crate::args::{InputArgs, MethodArgs};

/// Arguments of `sgr inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model (any of `sgr train --model`).
    #[arg(long, default_value = "resnet32")]
    model: String,
    #[command(flatten)]
    method: MethodArgs,
    /// Batch size of the measured step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    input: InputArgs,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn trainable(ps: &[Param], aux: bool) -> usize {
    ps.iter()
        .filter(|p| p.kind == ParamKind::Trainable && p.name.starts_with("aux.") == aux)
        .map(|p| p.var.elem_count())
        .sum()
}

/// `spec`'s model trained end to end.
fn bp_spec_of(spec: &RunSpec) -> RunSpec {
    RunSpec {
        modules: Some(1),
        split: SplitStrategy::Auto,
        split_ends: None,
        trainer: sgr_core::trainer::TrainerConfig {
            method: Method::bp(),
            ..spec.trainer.clone()
        },
        ..spec.clone()
    }
}

/// Runs `sgr inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    a.input.check(a.batch_size)?;
    let input = a.input.input();
    let device = Device::Cpu;
    let meter: Arc<dyn MemoryMeter> = Arc::new(sgr_run::counting::CountingMeter);
    let mut spec = a.method.spec(&a.model)?;
    // Both measured steps (the method's and end-to-end BP's) must fit before either runs.
    for s in [&spec, &bp_spec_of(&spec)] {
        let plan = sgr_run::budget::Plan::steps(a.batch_size, "--input-size");
        sgr_run::budget::check_fits(s, input, plan, Arc::clone(&meter), &device)?;
    }
    let mut costs = None;
    if spec.split == SplitStrategy::Balanced && spec.split_ends.is_none() {
        let (s, c) = balanced_spec(&spec, input, a.batch_size, Arc::clone(&meter), &device)?;
        spec = s;
        costs = Some(c);
    }
    let mut trainer = warm_trainer(&spec, input, &device)?;
    let net = trainer.network();
    let all = net.params();
    let (backbone, aux) = (trainable(&all, false), trainable(&all, true));
    // The parameters hold the network's tensors: drop them before anything is measured.
    drop(all);
    outln!(
        "{}: {} backbone parameters, {} in aux heads; {} units; input {}x{}x{}, {} classes",
        a.model,
        backbone,
        aux,
        net.plan().units(),
        input.channels,
        input.size,
        input.size,
        input.classes
    );
    let plan = net.plan().clone();
    let ends: Vec<&str> = plan.ends().iter().map(|&u| net.unit_label(u)).collect();
    outln!(
        "method {}, K={} with the {} split (modules end after {}), aux head {}; one training \
         step at batch {} measured as live heap bytes (weights, optimizer state, activations)",
        spec.trainer.method,
        plan.num_modules(),
        spec.split,
        ends.join(", "),
        spec.aux_head,
        a.batch_size
    );
    let modules: Vec<(String, usize, usize)> = (0..plan.num_modules())
        .map(|k| {
            let r = plan.range(k);
            let blocks = if r.len() == 1 {
                net.unit_label(r.start).to_string()
            } else {
                format!("{}..{}", net.unit_label(r.start), net.unit_label(r.end - 1))
            };
            let p = net.module_params(k);
            (blocks, trainable(&p, false), trainable(&p, true))
        })
        .collect();
    let batch = random_batch(input, a.batch_size, &device)?;
    let step = measure_step(&mut trainer, &batch, Arc::clone(&meter))?;
    outln!(
        "{:<7} {:<28} {:>12} {:>10} {:>14} {:>16}{}",
        "module",
        "blocks",
        "body params",
        "head",
        "step peak MiB",
        "above start MiB",
        if costs.is_some() {
            "  model MiB (above start)"
        } else {
            ""
        }
    );
    for (k, (blocks, body, head)) in modules.iter().enumerate() {
        let m = step.modules.iter().find(|m| m.module == k);
        let (peak, above) = m.map_or((f64::NAN, f64::NAN), |m| {
            (mib(m.peak), mib(m.peak.saturating_sub(m.start)))
        });
        let predicted = costs.as_ref().map_or(String::new(), |c| {
            let r = plan.range(k);
            let records = sgr_run::memory::sgr_modules_of(&spec).records(k, plan.num_modules());
            let cost = sgr_models::split::module_cost(c, r.start, r.end - 1, records);
            format!(" {:>24.1}", mib(cost))
        });
        outln!(
            "{:<7} {:<28} {:>12} {:>10} {:>14.1} {:>16.1}{predicted}",
            k + 1,
            blocks,
            body,
            head,
            peak,
            above
        );
    }
    drop(trainer);
    // The same model trained end to end, measured the same way.
    let mut bp = warm_trainer(&bp_spec_of(&spec), input, &device)?;
    let bp_step = measure_step(&mut bp, &batch, meter)?;
    outln!(
        "end-to-end (bp): step peak {:.1} MiB ({:.1} MiB before the step); {} K={}: step peak \
         {:.1} MiB ({:.1} MiB before), saving {:.1}% ({:.0}% of bp)",
        mib(bp_step.peak),
        mib(bp_step.before),
        spec.trainer.method,
        plan.num_modules(),
        mib(step.peak),
        mib(step.before),
        100.0 * (1.0 - step.peak as f64 / bp_step.peak.max(1) as f64),
        100.0 * step.peak as f64 / bp_step.peak.max(1) as f64
    );
    Ok(())
}
