//! Training memory, measured on real training steps: the peak of each module's part of a step,
//! and the memory-balanced split computed from per-unit measurements (docs/models.md,
//! "Memory-balanced splits").
//!
//! The library allocates through whatever global allocator the binary installs, so the bytes
//! are counted by a [`MemoryMeter`] the binary provides (`sgr` has a counting allocator). The
//! trainer enters a `module` tracing span around each module's work (forward, backward, SGR
//! passes, optimizer step); [`measure_step`] listens to those spans and reads the meter at
//! their edges.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use sgr_core::nn::{Ctx, ParamKind};
use sgr_core::objective::Batch;
use sgr_core::sgr::{Direction, SgrGrad};
use sgr_core::trainer::{Trainer, TrainerConfig};
use sgr_models::split::{balanced_ends, SgrModules, UnitCost};
use sgr_models::{Input, SplitStrategy};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

use crate::run::build_network;
use crate::{Result, RunSpec};

/// Counts the bytes the process holds on the heap.
pub trait MemoryMeter: Send + Sync {
    /// Bytes allocated now.
    fn live(&self) -> u64;
    /// The highest [`MemoryMeter::live`] since the last [`MemoryMeter::reset_peak`].
    fn peak(&self) -> u64;
    /// Starts a new high-water mark at the current live bytes.
    fn reset_peak(&self);
}

/// The memory of one module's part of a training step (bytes, absolute: weights, optimizer
/// state and everything else the process holds are included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleMemory {
    /// Module index.
    pub module: usize,
    /// Live bytes when the module's work began.
    pub start: u64,
    /// Highest live bytes during the module's work.
    pub peak: u64,
}

/// The memory of one training step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepMemory {
    /// Live bytes before the step (weights, buffers, optimizer state, the batch).
    pub before: u64,
    /// Highest live bytes during the step.
    pub peak: u64,
    /// Per module, in order (empty for end-to-end steps, which have one graph).
    pub modules: Vec<ModuleMemory>,
}

/// Listens to the trainer's `module` spans on the measuring thread.
struct ModuleProbe {
    meter: Arc<dyn MemoryMeter>,
    next_id: AtomicU64,
    state: Mutex<ProbeState>,
}

#[derive(Default)]
struct ProbeState {
    /// Span id → module index, for `module` spans.
    spans: Vec<(u64, usize)>,
    /// The open module and the live bytes when it began.
    open: Option<(usize, u64)>,
    /// The highest live bytes seen before the last reset.
    max_before_reset: u64,
    modules: Vec<ModuleMemory>,
}

struct ModuleField(Option<usize>);

impl tracing::field::Visit for ModuleField {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "k" {
            self.0 = Some(value as usize);
        }
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        if field.name() == "k" {
            self.0 = usize::try_from(value).ok();
        }
    }

    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl ModuleProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Subscriber for ModuleProbe {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        if attrs.metadata().name() == "module" {
            let mut f = ModuleField(None);
            attrs.record(&mut f);
            if let Some(k) = f.0 {
                self.lock().spans.push((id, k));
            }
        }
        Id::from_u64(id)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, span: &Id) {
        let mut s = self.lock();
        if let Some(&(_, k)) = s.spans.iter().find(|(id, _)| *id == span.into_u64()) {
            s.max_before_reset = s.max_before_reset.max(self.meter.peak());
            let live = self.meter.live();
            self.meter.reset_peak();
            s.open = Some((k, live));
        }
    }

    fn exit(&self, span: &Id) {
        let mut s = self.lock();
        if s.spans.iter().any(|(id, _)| *id == span.into_u64()) {
            if let Some((k, start)) = s.open.take() {
                let peak = self.meter.peak();
                s.modules.push(ModuleMemory {
                    module: k,
                    start,
                    peak,
                });
            }
        }
    }
}

/// Runs one training step on `batch` and measures it. Run a step before (the optimizer state
/// is allocated by the first one), or the state is counted as the step's.
pub fn measure_step(
    trainer: &mut Trainer,
    batch: &Batch,
    meter: Arc<dyn MemoryMeter>,
) -> Result<StepMemory> {
    let probe = ModuleProbe {
        meter: Arc::clone(&meter),
        next_id: AtomicU64::new(0),
        state: Mutex::new(ProbeState::default()),
    };
    let probe = Arc::new(probe);
    let dispatch = tracing::Dispatch::from(Arc::clone(&probe) as Arc<dyn Subscriber + Send + Sync>);
    let before = meter.live();
    meter.reset_peak();
    let step = tracing::dispatcher::with_default(&dispatch, || trainer.train_step(batch));
    drop(step?);
    let s = probe.lock();
    let peak = s.max_before_reset.max(meter.peak());
    Ok(StepMemory {
        before,
        peak,
        modules: s.modules.clone(),
    })
}

/// A random batch of `input`'s shape on `device`.
pub fn random_batch(input: Input, batch: usize, device: &Device) -> Result<Batch> {
    let (x, y) = random_images(input, batch, device)?;
    Ok(Batch::labelled(x, y))
}

/// Random images of `input`'s shape and labels cycling through its classes.
pub fn random_images(input: Input, batch: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let shape = (batch, input.channels, input.size, input.size);
    let x = Tensor::randn(0f32, 1.0, shape, device).map_err(sgr_core::Error::from)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % input.classes) as u32).collect();
    let y = Tensor::from_vec(labels, batch, device).map_err(sgr_core::Error::from)?;
    Ok((x, y))
}

/// A trainer for `spec`'s model and method on `input`, with plain SGD settings (memory does
/// not depend on the learning rate), after one warm-up step on a batch of 2 so that the
/// optimizer state exists before anything is measured.
pub fn warm_trainer(spec: &RunSpec, input: Input, device: &Device) -> Result<Trainer> {
    let net = build_network(spec, input, None, device)?;
    let cfg = TrainerConfig {
        steps_per_epoch: 1_000_000,
        ..spec.trainer.clone()
    };
    let mut trainer = Trainer::new(net, cfg)?;
    drop(trainer.train_step(&random_batch(input, 2, device)?)?);
    Ok(trainer)
}

/// Measures what each unit of `spec`'s model costs in a training step of `spec`'s method at
/// `batch` images of `input`: the model is cut one module per unit, every module runs a real
/// step (SGR passes included), and each unit's forward graph is measured on its own.
pub fn unit_costs(
    spec: &RunSpec,
    input: Input,
    batch: usize,
    meter: Arc<dyn MemoryMeter>,
    device: &Device,
) -> Result<Vec<UnitCost>> {
    let units = sgr_models::zoo::units(&spec.model)?;
    let per_unit = RunSpec {
        modules: Some(units),
        split: SplitStrategy::Block,
        split_ends: None,
        ..spec.clone()
    };
    let mut trainer = warm_trainer(&per_unit, input, device)?;
    let b = random_batch(input, batch, device)?;
    let step = measure_step(&mut trainer, &b, Arc::clone(&meter))?;
    // Each unit's forward graph (and the gradients of its weights) on its own, with and without
    // the tape of decisions that the SGR finite differences record.
    let net = trainer.network();
    let (records, sets) = match &spec.trainer.method.sgr {
        Some(s) if s.grad == SgrGrad::Exact => (false, EXACT_GRAD_SETS),
        Some(_) => (true, SGR_GRAD_SETS),
        None => (false, 1),
    };
    let mut measured = Vec::with_capacity(units);
    let mut h = b.input.clone();
    for k in 0..units {
        let x = h.detach();
        let grads: u64 = net
            .module_params(k)
            .iter()
            .filter(|p| p.kind == ParamKind::Trainable && !p.name.starts_with("aux."))
            .map(|p| (p.var.elem_count() * p.var.dtype().size_in_bytes()) as u64)
            .sum();
        let graph = |mut ctx: Ctx| -> Result<(u64, Tensor)> {
            let before = meter.live();
            let out = net.module_body(k, &x, &mut ctx)?;
            let bytes = meter.live().saturating_sub(before);
            drop(ctx);
            Ok((bytes, out.detach()))
        };
        let (plain, out) = graph(Ctx::train_frozen_stats())?;
        let taped = if records {
            graph(Ctx::train_recording())?.0.max(plain)
        } else {
            plain
        };
        measured.push((plain + grads, taped + sets * grads));
        h = out;
    }
    let recording = sgr_modules_of(spec);
    Ok(step
        .modules
        .iter()
        .zip(measured)
        .enumerate()
        .map(|(k, (m, (held, held_sgr)))| {
            let own = if recording.records(k, units) {
                held_sgr
            } else {
                held
            };
            UnitCost {
                held,
                held_sgr,
                tail: m.peak.saturating_sub(m.start).saturating_sub(own),
            }
        })
        .collect())
}

/// Which modules of `spec`'s method carry an SGR term.
pub fn sgr_modules_of(spec: &RunSpec) -> SgrModules {
    match &spec.trainer.method.sgr {
        Some(s) => match s.direction {
            Direction::Forward => SgrModules::AllButFirst,
            Direction::Backward => SgrModules::AllButLast,
        },
        None => SgrModules::None,
    }
}

/// Parameter-sized gradient buffers alive at the peak of a module with an SGR term computed by
/// finite differences: the base pass's gradients, the two passes' gradients and their
/// difference (`sgr_core::sgr::sgr_term_grad`). A plain module holds one.
pub const SGR_GRAD_SETS: u64 = 4;
/// The same for the exact double backward: the base gradients, the term's, their sum.
pub const EXACT_GRAD_SETS: u64 = 3;

/// `spec` with its split measured and balanced: [`unit_costs`], then the exact minimax
/// partition ([`balanced_ends`]) into `spec`'s K modules, written to `split_ends`; with the
/// measured costs.
pub fn balanced_spec(
    spec: &RunSpec,
    input: Input,
    batch: usize,
    meter: Arc<dyn MemoryMeter>,
    device: &Device,
) -> Result<(RunSpec, Vec<UnitCost>)> {
    let k = spec.num_modules();
    let costs = unit_costs(spec, input, batch, meter, device)?;
    let ends = balanced_ends(&costs, k, sgr_modules_of(spec))?;
    let spec = RunSpec {
        modules: Some(k),
        split: SplitStrategy::Balanced,
        split_ends: Some(ends),
        ..spec.clone()
    };
    Ok((spec, costs))
}
