//! `sgr bench`: time training steps on random inputs of the model's shape.

use crate::out::outln;
use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;
use sgr_core::objective::Batch;
use sgr_core::optim::{OptimizerConfig, Schedule};
use sgr_core::trainer::pipeline::Pipeline;
use sgr_core::trainer::{ModuleProfile, Trainer, TrainerConfig};
use sgr_run::run::build_network;
use sgr_run::DeviceKind;

use crate::args::{named, InputArgs, MethodArgs};

/// Arguments of `sgr bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model.
    #[arg(long, default_value = "resnet32")]
    model: String,
    #[command(flatten)]
    method: MethodArgs,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[command(flatten)]
    input: InputArgs,
    /// Where to run.
    #[arg(long, value_parser = named::<DeviceKind>(), default_value = "cpu")]
    device: DeviceKind,
    /// Run the modules on N pipeline worker threads, placed by measured step time: the step
    /// time is then the time between completed steps in the steady state (after the fill).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pipeline: Option<u16>,
    /// Compute threads of each pipeline worker [default: the cores divided among the workers]
    #[arg(long, value_name = "T", requires = "pipeline", value_parser = clap::value_parser!(u16).range(1..))]
    pipeline_threads: Option<u16>,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
    /// Print the resolved benchmark specification and its hash as one JSON line, and exit
    /// (what `cargo xtask reproduce` caches a measurement under).
    #[arg(long)]
    print_spec: bool,
}

/// Everything a measurement depends on but the binary: equal hashes measure the same thing.
#[derive(Debug, Serialize)]
struct BenchSpec<'a> {
    run: &'a sgr_run::RunSpec,
    batch_size: usize,
    steps: usize,
    input: [usize; 3],
    classes: usize,
    device: DeviceKind,
}

impl BenchArgs {
    /// Whether the modules run on more than one pipeline worker.
    pub fn pipelined(&self) -> bool {
        self.pipeline.is_some_and(|n| n > 1)
    }
}

/// Runs `sgr bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.steps == 0 || a.steps > 1_000_000 {
        bail!("--steps must be in 1..=1000000, got {}", a.steps);
    }
    a.input.check(a.batch_size)?;
    let mut spec = a.method.spec(&a.model)?;
    let device = a.device.device()?;
    // Before any step at the full batch: a step that cannot fit is refused, not aborted.
    let check_fits = |spec: &sgr_run::RunSpec| {
        let plan = sgr_run::budget::Plan::steps(a.batch_size, "--input-size");
        let meter = std::sync::Arc::new(sgr_run::counting::CountingMeter);
        sgr_run::budget::check_fits(spec, a.input.input(), plan, meter, &device)
            .map_err(anyhow::Error::from)
    };
    let balanced = spec.split == sgr_models::SplitStrategy::Balanced && spec.split_ends.is_none();
    if balanced {
        check_fits(&spec)?;
        let meter = std::sync::Arc::new(sgr_run::counting::CountingMeter);
        spec =
            sgr_run::memory::balanced_spec(&spec, a.input.input(), a.batch_size, meter, &device)?.0;
    }
    let input = [a.input.channels, a.input.size, a.input.size];
    let bench_spec = BenchSpec {
        run: &spec,
        batch_size: a.batch_size,
        steps: a.steps,
        input,
        classes: a.input.classes,
        device: a.device,
    };
    let spec_hash = sgr_run::spec::hash_json(&bench_spec)?;
    if a.print_spec {
        let v = serde_json::json!({ "spec_hash": spec_hash, "spec": bench_spec });
        outln!("{v}");
        return Ok(());
    }
    if !balanced {
        check_fits(&spec)?;
    }
    let method = spec.trainer.method.clone();
    let trainer_cfg = TrainerConfig {
        method: method.clone(),
        optimizer: OptimizerConfig::default(),
        lr: 0.05,
        schedule: Schedule::Constant,
        epochs: 1,
        steps_per_epoch: a.steps + 1,
        seed: 0,
        ..Default::default()
    };
    let net = build_network(&spec, a.input.input(), None, &device)?;
    let modules = net.num_modules();
    let mut trainer = Trainer::new(net, trainer_cfg)?;
    let shape = (a.batch_size, a.input.channels, a.input.size, a.input.size);
    let x = candle_core::Tensor::randn(0f32, 1.0, shape, &device)?;
    let labels: Vec<u32> = (0..a.batch_size)
        .map(|i| (i % a.input.classes) as u32)
        .collect();
    let y = candle_core::Tensor::from_vec(labels, a.batch_size, &device)?;
    let batch = Batch::labelled(x, y);
    let workers = a.pipeline.map_or(1, usize::from);
    let mut placement = None;
    if workers > 1 {
        if workers > modules {
            bail!(
                "--pipeline {workers}: the network has K={modules} modules and each worker owns \
                 at least one; use --pipeline 2..={modules}, or more modules (-k)"
            );
        }
        let threads = a.pipeline_threads.map_or_else(
            || (rayon::current_num_threads() / workers).max(1),
            usize::from,
        );
        let profile = trainer.profile_modules(&batch, 2)?;
        let seconds: Vec<f64> = profile.iter().map(|p| p.seconds).collect();
        let p = Pipeline::balanced(&seconds, workers, threads)?;
        // The measuring steps' memory stays with this thread's arena otherwise.
        sgr_core::memory::release_free_memory();
        trainer.set_pipeline(Some(p.clone()))?;
        placement = Some((p, profile));
    }
    sgr_run::counting::reset_peak();
    #[cfg(feature = "cuda")]
    sgr_core::memory::device::reset_peak(&device);
    let times = match &placement {
        None => {
            timed_step(&mut trainer, &batch, &device)?;
            let mut times = Vec::with_capacity(a.steps);
            for _ in 0..a.steps {
                times.push(timed_step(&mut trainer, &batch, &device)?);
            }
            times
        }
        Some(_) => {
            // The first `workers` completions include the pipeline's fill.
            let mut source = std::iter::repeat_with(|| Ok(batch.clone())).take(a.steps + workers);
            let mut times = Vec::with_capacity(a.steps + workers);
            trainer.train_batches(&mut source, &mut |m| {
                times.push(m.seconds);
                std::ops::ControlFlow::Continue(())
            })?;
            times.split_off(workers)
        }
    };
    let pipeline = match placement {
        Some((p, profile)) => Some(pipeline_report(&mut trainer, &batch, &p, &profile)?),
        None => None,
    };
    let mut sorted = times.clone();
    sorted.sort_by(|p, q| p.total_cmp(q));
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
    };
    let report = sgr_schema::BenchReport {
        model: a.model.clone(),
        method: method.to_string(),
        modules,
        sgr_grad: method.sgr.as_ref().map(|s| s.grad.to_string()),
        batch_size: a.batch_size,
        input,
        steps: a.steps,
        median_step_seconds: median,
        images_per_s: a.batch_size as f64 / median,
        step_seconds: times,
        peak_memory_bytes: sgr_core::memory::peak_rss_bytes(),
        peak_heap_bytes: sgr_run::counting::peak_bytes() as u64,
        peak_device_memory_bytes: device_peak(&device),
        spec_hash,
        pipeline,
    };
    if a.json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!(
            "{} {} K={}{} batch {} input {}x{}x{}: median step {:.3}s, {:.1} images/s, peak memory {} MiB (heap {} MiB)",
            report.model,
            report.method,
            report.modules,
            report
                .sgr_grad
                .as_ref()
                .map(|g| format!(" ({g})"))
                .unwrap_or_default(),
            report.batch_size,
            a.input.channels,
            a.input.size,
            a.input.size,
            report.median_step_seconds,
            report.images_per_s,
            report
                .peak_memory_bytes
                .map(|b| (b / (1024 * 1024)).to_string())
                .unwrap_or_else(|| "?".into()),
            report.peak_heap_bytes / (1024 * 1024)
        );
        if let Some(p) = &report.pipeline {
            for (j, (r, bytes)) in p.stages.iter().zip(&p.worker_heap_bytes).enumerate() {
                let ms: f64 = p.module_seconds[r[0]..r[1]].iter().sum::<f64>() * 1e3;
                outln!(
                    "  worker {j} ({} thread{}): modules {}..{}, {ms:.0} ms/step alone, heap ~{} MiB",
                    p.threads,
                    if p.threads == 1 { "" } else { "s" },
                    r[0],
                    r[1],
                    bytes / (1024 * 1024)
                );
            }
        }
    }
    Ok(())
}

/// The placement, and each worker's peak heap estimated from one measured sequential step
/// (`PipelineReport::worker_heap_bytes`). Leaves the trainer sequential.
fn pipeline_report(
    trainer: &mut Trainer,
    batch: &Batch,
    p: &Pipeline,
    profile: &[ModuleProfile],
) -> Result<sgr_schema::PipelineReport> {
    trainer.set_pipeline(None)?;
    let mem = sgr_run::memory::measure_step(
        trainer,
        batch,
        std::sync::Arc::new(sgr_run::counting::CountingMeter),
    )?;
    let tensor_bytes =
        |t: &candle_core::Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let mut held = Vec::new();
    for (k, opt) in trainer.optimizers().iter().enumerate() {
        let weights: u64 = trainer
            .network()
            .module_params(k)
            .iter()
            .map(|p| tensor_bytes(p.var.as_tensor()))
            .sum();
        let state: u64 = opt.state()?.values().map(tensor_bytes).sum();
        held.push(weights + state);
    }
    let transient = |k: usize| {
        mem.modules
            .iter()
            .find(|m| m.module == k)
            .map_or(0, |m| m.peak.saturating_sub(m.start))
    };
    let worker_heap_bytes = p
        .stages()
        .iter()
        .map(|r| held[r.clone()].iter().sum::<u64>() + r.clone().map(transient).max().unwrap_or(0))
        .collect();
    Ok(sgr_schema::PipelineReport {
        stages: p.stages().iter().map(|r| [r.start, r.end]).collect(),
        threads: p.threads(),
        module_seconds: profile.iter().map(|m| m.seconds).collect(),
        message_bytes: profile.iter().map(|m| m.message_bytes).collect(),
        worker_heap_bytes,
    })
}

/// Wall seconds of one step until the device has finished it: a GPU step returns once queued,
/// so its own `seconds` would time the queueing (a no-op wait on the CPU).
fn timed_step(trainer: &mut Trainer, batch: &Batch, device: &candle_core::Device) -> Result<f64> {
    device.synchronize()?;
    let t = std::time::Instant::now();
    trainer.train_step(batch)?;
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64())
}

/// The device memory peak of the steps, on CUDA (see `sgr_core::memory::device`).
fn device_peak(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        if let Some(s) = device.as_cuda_device().ok().map(|c| c.cuda_stream()) {
            let _ = s.synchronize();
        }
        return sgr_core::memory::device::peak_bytes(device);
    }
    let _ = device;
    None
}
