//! Trainers for end-to-end back-propagation and the local methods, side by side on the same
//! network, data and optimizer.
//!
//! A step's metrics stay on the training device: losses, accuracy and boundary diagnostics are
//! summed there, and the host reads them when an epoch closes or a checkpoint is taken
//! ([`Trainer::state`]). A non-finite loss is caught then, naming the first module and step
//! where it happened.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ctx::{Ctx, Decision};
use crate::events::{BoundaryMetrics, EpochMetrics, EvalMetrics, Event, Observer, StepMetrics};
use crate::loss::{correct_count, cross_entropy, topk_correct_count};
use crate::method::{Estimator, Method, Objective};
use crate::mix::{MixConfig, MixDraw};
use crate::network::{collect_grads_checked, Decisions, LocalNetwork};
use crate::objective::Batch;
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use crate::sgr::{
    base_pass_in, boundary_stats_on_device, sgr_term_grad, BasePoint, Direction, LocalModule,
    SgrConfig, SgrGrad, Site,
};
use crate::{Error, Result};

pub mod distributed;
mod eval_on_ranks;
mod module;
pub mod ownership;
pub mod pipeline;
mod replicas;
mod wire;

use module::{module_step, stage_step, update};
pub use module::{BoundaryRecord, Carry, StepInput, StepRecord};

/// Everything the trainer needs besides the network and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TrainerConfigRepr", into = "TrainerConfigRepr")]
pub struct TrainerConfig {
    /// Method: objective, SGR term, gradient estimator.
    pub method: Method,
    /// Optimizer (one instance per module).
    pub optimizer: OptimizerConfig,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Planned epochs (for the schedule).
    pub epochs: usize,
    /// Steps per epoch (for the schedule and the λ warm-up, which count in epochs). The
    /// default, 0, is refused by [`Trainer::new`] where they need it: set it to the number of
    /// batches per epoch.
    pub steps_per_epoch: usize,
    /// Seed of the random decisions of forward passes (dropout, drop-path); each module's pass
    /// at each step draws from its own generator derived from it.
    pub seed: u64,
    /// Label smoothing of hard labels (0: none; the DeiT recipe uses 0.1).
    pub label_smoothing: f64,
    /// Mixup and cutmix of training batches (soft targets), drawn per step from the seed.
    pub mix: Option<MixConfig>,
    /// Largest L2 norm of each optimizer's gradients (per module; the whole network for `bp`),
    /// as `torch.nn.utils.clip_grad_norm_`.
    pub clip_grad_norm: Option<f64>,
    /// Draws averaged by a forward-gradient estimator per module and step (`--fg-passes`).
    pub fg_passes: usize,
}

impl Default for TrainerConfig {
    /// SGR with its default settings; SGD with Nesterov momentum 0.9 and weight decay 5e-4;
    /// lr 0.05 with cosine decay over 6 epochs (the quickstart job).
    fn default() -> Self {
        Self {
            method: Method::sgr(SgrConfig::default()),
            optimizer: OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
                decay: crate::optim::DecayScope::All,
            },
            lr: 0.05,
            schedule: Schedule::Cosine { warmup_epochs: 0.0 },
            epochs: 6,
            steps_per_epoch: 0,
            seed: 0,
            label_smoothing: 0.0,
            mix: None,
            clip_grad_norm: None,
            fg_passes: 1,
        }
    }
}

/// The serialised form: the method as its name (`greedy+sgr`), the SGR settings beside it;
/// fields left out take [`TrainerConfig::default`]'s values.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TrainerConfigRepr {
    method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sgr: Option<SgrConfig>,
    estimator: Estimator,
    optimizer: OptimizerConfig,
    lr: f64,
    schedule: Schedule,
    epochs: usize,
    steps_per_epoch: usize,
    seed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    label_smoothing: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    mix: Option<MixConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clip_grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "is_one")]
    fg_passes: usize,
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Default for TrainerConfigRepr {
    fn default() -> Self {
        TrainerConfig::default().into()
    }
}

impl TryFrom<TrainerConfigRepr> for TrainerConfig {
    type Error = Error;

    fn try_from(r: TrainerConfigRepr) -> Result<Self> {
        let mut method: Method = r.method.parse()?;
        // Settings of a method without `+sgr` are ignored (runs written before the grammar
        // always carried them).
        if method.sgr.is_some() {
            method.sgr = Some(r.sgr.unwrap_or_default());
        }
        method.estimator = r.estimator;
        Ok(Self {
            method,
            optimizer: r.optimizer,
            lr: r.lr,
            schedule: r.schedule,
            epochs: r.epochs,
            steps_per_epoch: r.steps_per_epoch,
            seed: r.seed,
            label_smoothing: r.label_smoothing,
            mix: r.mix,
            clip_grad_norm: r.clip_grad_norm,
            fg_passes: r.fg_passes,
        })
    }
}

impl From<TrainerConfig> for TrainerConfigRepr {
    fn from(c: TrainerConfig) -> Self {
        Self {
            method: c.method.to_string(),
            sgr: c.method.sgr,
            estimator: c.method.estimator,
            optimizer: c.optimizer,
            lr: c.lr,
            schedule: c.schedule,
            epochs: c.epochs,
            steps_per_epoch: c.steps_per_epoch,
            seed: c.seed,
            label_smoothing: c.label_smoothing,
            mix: c.mix,
            clip_grad_norm: c.clip_grad_norm,
            fg_passes: c.fg_passes,
        }
    }
}

impl TrainerConfig {
    /// The learning rate at global step `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        let total = self.epochs * self.steps_per_epoch;
        self.schedule.lr(self.lr, step, self.steps_per_epoch, total)
    }

    /// The SGR weight at global step `step` (its warm-up counts in epochs).
    pub fn lambda_at(&self, step: usize) -> f64 {
        let progress = step as f64 / self.steps_per_epoch.max(1) as f64;
        self.method
            .sgr
            .as_ref()
            .map_or(0.0, |s| s.lambda_at(progress))
    }
}

/// What every module of global step `step` shares: the batch after mixup/cutmix and label
/// smoothing (drawn once, at the source, from the run seed and the step), the lr and λ.
fn step_input(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    batch: &Batch,
    step: usize,
) -> Result<StepInput> {
    let batch = if cfg.mix.is_some() || cfg.label_smoothing > 0.0 {
        let draw = match &cfg.mix {
            Some(m) => {
                let (_, _, h, w) = batch.input.dims4()?;
                m.draw(pass_seed(cfg.seed, step, usize::MAX), h, w)
            }
            None => MixDraw::None,
        };
        crate::mix::apply(batch, draw, net.num_classes(), cfg.label_smoothing)?
    } else {
        batch.clone()
    };
    Ok(StepInput {
        batch,
        step,
        lr: cfg.lr_at(step),
        lambda: cfg.lambda_at(step),
        replica: 0,
    })
}

/// The most draws a forward-gradient estimator averages per step (`fg_passes`).
pub const MAX_FG_PASSES: usize = 1024;

/// Trains a [`LocalNetwork`] with one optimizer per module.
#[derive(Debug)]
pub struct Trainer {
    net: LocalNetwork,
    cfg: TrainerConfig,
    optimizers: Vec<Box<dyn Optimizer>>,
    pipeline: Option<pipeline::Pipeline>,
    progress: Progress,
}

/// Where training stands and the current epoch's sums: what the thread that completes steps
/// owns while the modules run elsewhere.
#[derive(Debug)]
struct Progress {
    step: usize,
    epoch: usize,
    acc: EpochAccumulator,
    sums: DeviceSums,
}

/// One module's cost in a pipeline ([`Trainer::profile_modules`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleProfile {
    /// Seconds per step.
    pub seconds: f64,
    /// Bytes of the carry it sends to the next module (h and a; 0 for the last module). The
    /// batch travels with every step as well.
    pub message_bytes: u64,
}

/// Partial sums of the current epoch's metrics, on the host (what a checkpoint stores).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochAccumulator {
    steps: usize,
    loss_sums: Vec<f64>,
    correct: usize,
    seen: usize,
    boundary: Vec<(f64, f64, f64, usize, usize)>,
    seconds: f64,
    lr: f64,
}

impl EpochAccumulator {
    /// Training seconds accumulated in the current epoch.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    /// Steps taken in the current epoch.
    pub fn steps(&self) -> usize {
        self.steps
    }

    fn new(k: usize) -> Self {
        Self {
            loss_sums: vec![0.0; k],
            boundary: vec![(0.0, 0.0, 0.0, 0, 0); k.saturating_sub(1)],
            ..Default::default()
        }
    }
}

/// The running sums of an epoch on the training device (`f64`), continuing the host sums they
/// were made from, so that a resumed epoch adds in the same order as an uninterrupted one.
#[derive(Debug)]
struct DeviceSums {
    /// `(K,)` loss sums.
    losses: Tensor,
    /// Correct predictions.
    correct: Tensor,
    /// Per boundary: (cos, rel_dist, SGR distance) sums.
    boundary: Vec<[Tensor; 3]>,
    /// `step·K + module` of the first non-finite loss (+∞ while none), and its value.
    first_bad: (Tensor, Tensor),
}

impl DeviceSums {
    fn from_host(a: &EpochAccumulator, device: &Device) -> Result<Self> {
        let scalar = |v: f64| Tensor::new(v, device);
        Ok(Self {
            losses: Tensor::new(a.loss_sums.as_slice(), device)?,
            correct: scalar(a.correct as f64)?,
            boundary: a
                .boundary
                .iter()
                .map(|&(c, r, d, _, _)| Ok([scalar(c)?, scalar(r)?, scalar(d)?]))
                .collect::<Result<_>>()?,
            first_bad: (scalar(f64::INFINITY)?, scalar(f64::NAN)?),
        })
    }

    /// Adds a step's `(K,)` losses and remembers the first non-finite one, without a sync.
    fn add_losses(&mut self, losses: &Tensor, step: usize) -> Result<()> {
        let k = losses.dim(0)?;
        self.losses = (&self.losses + losses)?;
        // NaN compares false, and ±∞ exceeds the largest finite value.
        let finite = losses.abs()?.le(f64::MAX)?;
        let codes = (Tensor::arange(0u32, k as u32, losses.device())?.to_dtype(DType::F64)?
            + (step * k) as f64)?;
        let inf = Tensor::full(f64::INFINITY, k, losses.device())?;
        let bad = finite.where_cond(&inf, &codes)?;
        let at = bad.argmin_keepdim(0)?;
        let code = bad.gather(&at, 0)?.squeeze(0)?;
        let value = losses.gather(&at, 0)?.squeeze(0)?;
        let (old_code, old_value) = &self.first_bad;
        let earlier = code.lt(old_code)?;
        self.first_bad = (
            earlier.where_cond(&code, old_code)?,
            earlier.where_cond(&value, old_value)?,
        );
        Ok(())
    }

    /// Adds `value` to sum `which` (cos, rel_dist, SGR distance) of boundary `slot`.
    fn add_boundary(&mut self, slot: usize, which: usize, value: &Tensor) -> Result<()> {
        let s = &mut self.boundary[slot][which];
        *s = (&*s + value)?;
        Ok(())
    }

    /// The host sums (one sync), or the first non-finite loss as an error.
    fn download(&self, into: &EpochAccumulator) -> Result<EpochAccumulator> {
        let code = self.first_bad.0.to_scalar::<f64>()?;
        if code.is_finite() {
            let k = self.losses.dim(0)?.max(1);
            let code = code as usize;
            return Err(Error::NonFiniteLoss {
                module: code % k,
                step: code / k,
                value: self.first_bad.1.to_scalar::<f64>()? as f32,
            });
        }
        let mut a = into.clone();
        a.loss_sums = self.losses.to_vec1::<f64>()?;
        a.correct = self.correct.to_scalar::<f64>()? as usize;
        for (slot, sums) in a.boundary.iter_mut().zip(&self.boundary) {
            slot.0 = sums[0].to_scalar::<f64>()?;
            slot.1 = sums[1].to_scalar::<f64>()?;
            slot.2 = sums[2].to_scalar::<f64>()?;
        }
        Ok(a)
    }
}

/// Everything a [`Trainer`] needs besides weights and optimizer state to continue exactly where
/// it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Global step count (drives the learning-rate schedule and the λ warm-up).
    pub global_step: usize,
    /// Partial sums of the current epoch.
    pub epoch_progress: EpochAccumulator,
}

/// One module's plain pass, kept until its SGR term can be formed (backward direction).
struct Pending {
    k: usize,
    input: Tensor,
    masks: Vec<Decision>,
    grads: Vec<Tensor>,
    output_grad: Tensor,
    seed: u64,
}

/// Scales `grads` so that their joint L2 norm is at most `max`, on the device (no host sync):
/// `g · min(1, max / (‖g‖ + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.
pub fn clip_grad_norm(grads: &mut [Tensor], max: f64) -> Result<()> {
    if grads.is_empty() {
        return Ok(());
    }
    let sq: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<candle_core::Result<_>>()?;
    let norm = Tensor::stack(&sq, 0)?.sum_all()?.sqrt()?;
    let coef = ((norm + 1e-6)?.recip()? * max)?.clamp(0.0, 1.0)?;
    for g in grads.iter_mut() {
        *g = g.broadcast_mul(&coef.to_dtype(g.dtype())?)?;
    }
    Ok(())
}

/// The seed of module `k`'s forward pass at `step` (SplitMix64 of the three).
fn pass_seed(seed: u64, step: usize, k: usize) -> u64 {
    let mut z = seed
        ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (k as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Progress {
    /// Adds a complete step's record to the epoch sums (in module order, whichever worker
    /// produced it) and advances the step count.
    fn complete(
        &mut self,
        input: &StepInput,
        record: StepRecord,
        seconds: f64,
    ) -> Result<StepMetrics> {
        let device = input.batch.input.device();
        let losses = Tensor::stack(&record.losses, 0)?;
        self.sums.add_losses(&losses, self.step)?;
        let correct = match record.correct {
            Some(c) => c,
            None => Tensor::new(0f64, device)?,
        };
        self.sums.correct = (&self.sums.correct + &correct)?;
        for b in &record.boundaries {
            if let Some(stats) = &b.stats {
                self.sums.add_boundary(b.slot, 0, &stats.get(0)?)?;
                self.sums.add_boundary(b.slot, 1, &stats.get(1)?)?;
                self.acc.boundary[b.slot].3 += 1;
            }
            if let Some(d) = &b.distance {
                self.sums.add_boundary(b.slot, 2, d)?;
                self.acc.boundary[b.slot].4 += 1;
            }
        }
        let n = input.batch.len()?;
        let a = &mut self.acc;
        a.steps += 1;
        a.seen += n;
        a.seconds += seconds;
        a.lr = input.lr;
        let m = StepMetrics {
            epoch: self.epoch,
            step: self.step,
            module_losses: losses,
            lr: input.lr,
            lambda: input.lambda,
            batch: n,
            correct,
            seconds,
        };
        self.step += 1;
        Ok(m)
    }
}

impl Trainer {
    /// A trainer; an end-to-end objective (`bp`) requires a single-module network.
    pub fn new(net: LocalNetwork, cfg: TrainerConfig) -> Result<Self> {
        cfg.method.validate()?;
        cfg.optimizer.validate()?;
        cfg.schedule.validate()?;
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "lr must be > 0, got {}",
                cfg.lr
            )));
        }
        let k = net.num_modules();
        if cfg.method.objective.is_end_to_end() && k != 1 {
            return Err(Error::InvalidConfig(format!(
                "method {} trains end to end and needs K=1, the network has K={k}",
                cfg.method
            )));
        }
        check_steps_per_epoch(&cfg)?;
        check_objective(&net, &cfg.method)?;
        check_replayable(&net, &cfg.method)?;
        crate::forward::check_network(&net, cfg.method.estimator)?;
        if !(1..=MAX_FG_PASSES).contains(&cfg.fg_passes) {
            return Err(Error::InvalidConfig(format!(
                "fg_passes must be in 1..={MAX_FG_PASSES}, got {}",
                cfg.fg_passes
            )));
        }
        let optimizers = (0..k)
            .map(|m| cfg.optimizer.build(net.module_params(m)))
            .collect::<Result<Vec<_>>>()?;
        let acc = EpochAccumulator::new(k);
        let sums = DeviceSums::from_host(&acc, &net.device()?)?;
        Ok(Self {
            net,
            cfg,
            optimizers,
            pipeline: None,
            progress: Progress {
                step: 0,
                epoch: 0,
                acc,
                sums,
            },
        })
    }

    /// The network.
    pub fn network(&self) -> &LocalNetwork {
        &self.net
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// Global step count so far.
    pub fn global_step(&self) -> usize {
        self.progress.step
    }

    /// The per-module optimizers.
    pub fn optimizers(&self) -> &[Box<dyn Optimizer>] {
        &self.optimizers
    }

    /// Mutable per-module optimizers (to restore state).
    pub fn optimizers_mut(&mut self) -> &mut [Box<dyn Optimizer>] {
        &mut self.optimizers
    }

    /// Sets the position (epoch, global step) when resuming.
    pub fn set_position(&mut self, epoch: usize, step: usize) {
        self.progress.epoch = epoch;
        self.progress.step = step;
    }

    /// Plans `epochs` epochs in total from now on (extending or shortening a run); the
    /// learning-rate schedule is recomputed for the new total from the current step.
    pub fn set_planned_epochs(&mut self, epochs: usize) -> Result<()> {
        let done = self.progress.epoch + usize::from(self.progress.acc.steps > 0);
        if epochs < done.max(1) {
            return Err(Error::InvalidConfig(format!(
                "cannot plan {epochs} epochs: {done} are already (partly) done"
            )));
        }
        self.cfg.epochs = epochs;
        Ok(())
    }

    /// Current epoch (0-based).
    pub fn epoch(&self) -> usize {
        self.progress.epoch
    }

    /// Steps taken in the current epoch.
    pub fn steps_in_epoch(&self) -> usize {
        self.progress.acc.steps
    }

    /// The position and partial epoch metrics (for checkpoints). Reads the device sums, so a
    /// non-finite loss since the last read is reported here.
    pub fn state(&self) -> Result<TrainerState> {
        Ok(TrainerState {
            epoch: self.progress.epoch,
            global_step: self.progress.step,
            epoch_progress: self.progress.sums.download(&self.progress.acc)?,
        })
    }

    /// Checks that a state fits this trainer's network and that its numbers are consistent (a
    /// checkpoint without a checksum could claim anything).
    pub fn check_state(&self, state: &TrainerState) -> Result<()> {
        let p = &state.epoch_progress;
        let spe = self.cfg.steps_per_epoch;
        let finite = |v: f64| v.is_finite();
        let problem = if state.epoch > self.cfg.epochs {
            Some(format!(
                "it is at epoch {} of a run planned for {}",
                state.epoch, self.cfg.epochs
            ))
        } else if spe > 0 && p.steps > spe {
            Some(format!(
                "it has taken {} steps of an epoch of {spe}",
                p.steps
            ))
        } else if state.global_step < p.steps || state.epoch > state.global_step {
            Some(format!(
                "its global step {} is below its epoch ({}) or its steps in the epoch ({})",
                state.global_step, state.epoch, p.steps
            ))
        } else if p.correct > p.seen || p.boundary.iter().any(|b| b.3 > p.steps || b.4 > p.steps) {
            Some("its counts of correct predictions or boundary samples exceed the steps".into())
        } else if !(p.loss_sums.iter().all(|v| finite(*v))
            && p.boundary
                .iter()
                .all(|b| finite(b.0) && finite(b.1) && finite(b.2))
            && finite(p.seconds)
            && p.seconds >= 0.0
            && finite(p.lr)
            && p.lr >= 0.0)
        {
            Some("a metric sum, the time or the learning rate is not a finite number".into())
        } else {
            None
        };
        if let Some(what) = problem {
            return Err(Error::InvalidConfig(format!(
                "the trainer state is out of range: {what}; the checkpoint is damaged or from \
                 another run: resume from an earlier copy, or start the run anew"
            )));
        }
        let k = self.net.num_modules();
        if state.epoch_progress.loss_sums.len() != k
            || state.epoch_progress.boundary.len() != k.saturating_sub(1)
        {
            return Err(Error::InvalidConfig(format!(
                "trainer state does not fit the network: it has {} module loss sums and {} \
                 boundary sums, a network of K={k} has {k} and {}",
                state.epoch_progress.loss_sums.len(),
                state.epoch_progress.boundary.len(),
                k.saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// Restores a state produced by [`Trainer::state`].
    pub fn load_state(&mut self, state: TrainerState) -> Result<()> {
        self.check_state(&state)?;
        self.progress.epoch = state.epoch;
        self.progress.step = state.global_step;
        self.progress.sums = DeviceSums::from_host(&state.epoch_progress, &self.net.device()?)?;
        self.progress.acc = state.epoch_progress;
        Ok(())
    }

    /// One optimisation step on a batch.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepMetrics> {
        let _span = tracing::debug_span!("train_step", step = self.progress.step).entered();
        let t0 = Instant::now();
        let input = step_input(&self.net, &self.cfg, batch, self.progress.step)?;
        let backward_sgr = self
            .cfg
            .method
            .sgr
            .as_ref()
            .is_some_and(|s| s.direction == Direction::Backward);
        let record = match self.cfg.method.objective {
            o if o.is_end_to_end() => self.bp_step(&input)?,
            _ if backward_sgr => self.backward_sgr_step(&input)?,
            _ => {
                let mut record = StepRecord::default();
                let carry = Carry::start(&input.batch);
                let opts = &mut self.optimizers;
                stage_step(&self.net, &self.cfg, opts, 0, &input, carry, &mut record)?;
                record
            }
        };
        self.progress
            .complete(&input, record, t0.elapsed().as_secs_f64())
    }

    /// The whole network as one graph, on the last module's objective.
    fn bp_step(&mut self, input: &StepInput) -> Result<StepRecord> {
        let batch = &input.batch;
        let k = self.net.num_modules() - 1;
        let mut ctx = Ctx::train().with_seed(input.seed(self.cfg.seed, k));
        let logits = self.net.forward(&batch.input.detach(), &mut ctx)?;
        let out = self
            .net
            .module_objective(k)?
            .loss(&logits, batch, &mut ctx)?;
        let value = out.loss.detach().to_dtype(DType::F64)?;
        let correct = match &out.logits {
            Some(l) => Some(batch.targets.correct(l)?),
            None => None,
        };
        let store = out.loss.backward()?;
        drop(out);
        drop(logits);
        let grads = collect_grads_checked(&store, self.optimizers[0].params())?;
        drop(store);
        update(&self.cfg, self.optimizers[0].as_mut(), grads, input.lr)?;
        Ok(StepRecord {
            losses: vec![value],
            boundaries: Vec::new(),
            correct,
        })
    }

    /// A local step with the SGR term in the backward direction: module k's update waits for
    /// module k+1's input gradient b_{k+1}, so this schedule is sequential only.
    fn backward_sgr_step(&mut self, input: &StepInput) -> Result<StepRecord> {
        let batch = &input.batch;
        let k_total = self.net.num_modules();
        let sgr = self.cfg.method.sgr.clone();
        // The finite differences replay the decisions of the module whose term they compute;
        // no other module records.
        let record = |k: usize| {
            sgr.as_ref()
                .is_some_and(|s| s.grad != SgrGrad::Exact && s.direction.reruns(k, k_total))
        };
        let mut out = StepRecord::default();
        let mut h = batch.input.detach();
        let mut prev_a: Option<Tensor> = None;
        let mut pending: Option<Pending> = None;
        for k in 0..k_total {
            let _span = tracing::trace_span!("module", k).entered();
            let seed = input.seed(self.cfg.seed, k);
            let prob = LocalModule {
                net: &self.net,
                k,
                batch,
            };
            let ctx = if record(k) {
                Ctx::train_recording()
            } else {
                Ctx::train()
            };
            let bp = base_pass_in(&prob, &h, k > 0, ctx.with_seed(seed))?;
            out.losses.push(bp.loss.clone());
            if k + 1 == k_total {
                if let Some(l) = &bp.logits {
                    out.correct = Some(batch.targets.correct(l)?);
                }
            }
            let mut boundary = BoundaryRecord {
                slot: k.wrapping_sub(1),
                stats: None,
                distance: None,
            };
            if let (Some(a), Some(b)) = (&prev_a, &bp.input_grad) {
                boundary.stats = Some(boundary_stats_on_device(a, b)?);
            }
            if let Some(p) = pending.take() {
                let mut g = p.grads.clone();
                if let Some(cfg) = &sgr {
                    let b = bp.input_grad.as_ref().ok_or_else(|| {
                        Error::Internal(format!("module {k}: input gradient missing"))
                    })?;
                    let prev = LocalModule {
                        net: &self.net,
                        k: p.k,
                        batch,
                    };
                    let term = sgr_term_grad(
                        &prev,
                        &p.input,
                        Site::Output,
                        &p.output_grad,
                        b,
                        BasePoint {
                            masks: &p.masks,
                            grads: &p.grads,
                            seed: p.seed,
                        },
                        cfg,
                    )?;
                    add_scaled(&mut g, &term.grads, input.lambda)?;
                    boundary.distance = Some(term.distance);
                }
                update(&self.cfg, self.optimizers[p.k].as_mut(), g, input.lr)?;
            }
            if k + 1 < k_total {
                let output_grad = bp.output_grad.clone().ok_or_else(|| {
                    Error::Internal(format!("module {k}: output gradient missing"))
                })?;
                pending = Some(Pending {
                    k,
                    input: h.clone(),
                    masks: bp.masks,
                    grads: bp.grads,
                    output_grad,
                    seed,
                });
            } else {
                update(&self.cfg, self.optimizers[k].as_mut(), bp.grads, input.lr)?;
            }
            if k > 0 {
                out.boundaries.push(boundary);
            }
            prev_a = if k + 1 < k_total {
                bp.output_grad
            } else {
                None
            };
            h = bp.output;
        }
        Ok(out)
    }

    /// Closes the current epoch: reads the device sums, returns the epoch's metrics and emits
    /// [`Event::Epoch`]. A non-finite loss during the epoch is an error here.
    pub fn finish_epoch(&mut self, observer: &mut dyn Observer) -> Result<EpochMetrics> {
        let k = self.net.num_modules();
        let a = self.progress.sums.download(&self.progress.acc)?;
        self.progress.acc = EpochAccumulator::new(k);
        self.progress.sums = DeviceSums::from_host(&self.progress.acc, &self.net.device()?)?;
        let steps = a.steps.max(1) as f64;
        let module_losses: Vec<f64> = a.loss_sums.iter().map(|s| s / steps).collect();
        let boundaries = a
            .boundary
            .iter()
            .enumerate()
            .map(|(i, &(c, r, d, n, nd))| {
                let n = n.max(1) as f64;
                BoundaryMetrics {
                    boundary: i + 1,
                    cos: c / n,
                    rel_dist: r / n,
                    sgr_distance: (nd > 0).then(|| d / nd as f64),
                }
            })
            .collect();
        let m = EpochMetrics {
            epoch: self.progress.epoch,
            steps: a.steps,
            train_loss: module_losses.last().copied().unwrap_or(f64::NAN),
            module_losses,
            train_accuracy: a.correct as f64 / a.seen.max(1) as f64,
            boundaries,
            lr: a.lr,
            seconds: a.seconds,
        };
        observer.on_event(&Event::Epoch(&m));
        self.progress.epoch += 1;
        Ok(m)
    }

    /// Runs one epoch over `batches`, emitting a [`Event::Step`] per step.
    pub fn run_epoch<I, B, E>(
        &mut self,
        batches: I,
        observer: &mut dyn Observer,
    ) -> Result<EpochMetrics>
    where
        I: IntoIterator<Item = std::result::Result<B, E>>,
        B: Into<Batch>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _span = tracing::info_span!("epoch", epoch = self.progress.epoch).entered();
        let mut batches = batches
            .into_iter()
            .map(|b| b.map(Into::into).map_err(|e| Error::Data(e.into())));
        self.train_batches(&mut batches, &mut |m| {
            observer.on_event(&Event::Step(m));
            ControlFlow::Continue(())
        })?;
        self.finish_epoch(observer)
    }

    /// Trains on `batches` in order, calling `on_step` after each completed step. When
    /// `on_step` breaks, no further batch is taken; steps already in the pipeline complete (and
    /// are reported) first, so the trainer's state is always that of whole steps. With a
    /// [pipeline](Self::set_pipeline) the modules run on its workers, bit-identically to the
    /// sequential schedule (docs/parallel.md).
    pub fn train_batches(
        &mut self,
        batches: &mut dyn Iterator<Item = Result<Batch>>,
        on_step: &mut dyn FnMut(&StepMetrics) -> ControlFlow<()>,
    ) -> Result<pipeline::Drained> {
        if let Some(p) = &self.pipeline {
            return pipeline::run(
                &self.net,
                &self.cfg,
                &mut self.optimizers,
                &mut self.progress,
                p,
                batches,
                on_step,
            );
        }
        let mut drained = pipeline::Drained {
            steps: 0,
            stopped: false,
        };
        for b in batches {
            let m = self.train_step(&b?)?;
            drained.steps += 1;
            if on_step(&m).is_break() {
                drained.stopped = true;
                break;
            }
        }
        Ok(drained)
    }

    /// Runs the modules of later steps on the workers of `pipeline` (`None`: one after another
    /// on this thread). Refused for `bp` with more than one worker, and for the SGR term's
    /// backward direction, whose module k waits for module k+1's input gradient: a message
    /// backward, which the pipeline does not send.
    pub fn set_pipeline(&mut self, pipeline: Option<pipeline::Pipeline>) -> Result<()> {
        if let Some(p) = &pipeline {
            let k = self.net.num_modules();
            let last = p.stages().last().map_or(0, |r| r.end);
            if last != k {
                return Err(Error::InvalidConfig(format!(
                    "the pipeline covers {last} modules, the network has K={k}"
                )));
            }
            self.check_pipeline_direction(p.workers())?;
        }
        self.pipeline = pipeline;
        Ok(())
    }

    /// Refuses the SGR term's backward direction on more than one worker: module k would wait
    /// for module k+1's input gradient, a message backward that no pipeline sends.
    fn check_pipeline_direction(&self, workers: usize) -> Result<()> {
        if workers > 1 {
            if let Some(s) = &self.cfg.method.sgr {
                if s.direction == Direction::Backward {
                    return Err(Error::InvalidConfig(
                        "the SGR term's backward direction makes module k wait for module k+1's \
                         input gradient, a message backward between workers that a pipeline \
                         does not send: use the forward direction (the default) or train \
                         without a pipeline"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The pipeline the modules run on, if any.
    pub fn pipeline(&self) -> Option<&pipeline::Pipeline> {
        self.pipeline.as_ref()
    }

    /// Each module's step time on `batch` (the median of `repeats` timed steps after one
    /// untimed one) and the bytes it sends downstream, for placing modules on pipeline workers.
    /// Nothing changes: weights, buffers, optimizer states and the step count are as before,
    /// since the steps are taken with scratch optimizers from a copy of the weights that is then
    /// restored.
    pub fn profile_modules(&mut self, batch: &Batch, repeats: usize) -> Result<Vec<ModuleProfile>> {
        let params = self.net.params();
        let saved = params
            .iter()
            .map(|p| p.var.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let result = (|| {
            let k_total = self.net.num_modules();
            let input = step_input(&self.net, &self.cfg, batch, self.progress.step)?;
            let mut scratch = (0..k_total)
                .map(|k| self.cfg.optimizer.build(self.net.module_params(k)))
                .collect::<Result<Vec<_>>>()?;
            let mut times = vec![Vec::with_capacity(repeats); k_total];
            let mut sent = vec![0u64; k_total];
            let bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
            for rep in 0..=repeats.max(1) {
                let mut carry = Carry::start(&input.batch);
                let mut record = StepRecord::default();
                for (k, opt) in scratch.iter_mut().enumerate() {
                    let t0 = Instant::now();
                    carry = module_step(
                        &self.net,
                        &self.cfg,
                        opt.as_mut(),
                        k,
                        &input,
                        carry,
                        &mut record,
                    )?;
                    if rep > 0 {
                        times[k].push(t0.elapsed().as_secs_f64());
                    }
                    if k + 1 < k_total {
                        sent[k] = bytes(&carry.h) + carry.a.as_ref().map_or(0, bytes);
                    }
                }
            }
            Ok(times
                .into_iter()
                .zip(sent)
                .map(|(mut t, message_bytes)| {
                    t.sort_by(f64::total_cmp);
                    ModuleProfile {
                        seconds: t[t.len() / 2],
                        message_bytes,
                    }
                })
                .collect())
        })();
        for (p, t) in params.iter().zip(&saved) {
            p.var.set(t)?;
        }
        result
    }

    /// Evaluates the network's classifier (evaluation mode) over `batches`.
    pub fn evaluate<I, E>(&self, batches: I) -> Result<EvalMetrics>
    where
        I: IntoIterator<Item = std::result::Result<(Tensor, Tensor), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        evaluate(&self.net, batches)
    }
}

/// Evaluates a network's classifier (evaluation mode) over `batches` of images and labels.
pub fn evaluate<I, E>(net: &LocalNetwork, batches: I) -> Result<EvalMetrics>
where
    I: IntoIterator<Item = std::result::Result<(Tensor, Tensor), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _span = tracing::info_span!("evaluate").entered();
    let mut parts = Vec::new();
    for b in batches {
        let (x, y) = b.map_err(|e| Error::Data(e.into()))?;
        parts.push(evaluate_batch(net, &x, &y)?);
    }
    Ok(BatchEval::metrics(&parts, net.num_classes() > 5))
}

/// One evaluation batch's sums. [`BatchEval::metrics`] adds them in batch order, so batches
/// evaluated in different places (the ranks of a distributed run) give the one-place numbers
/// bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BatchEval {
    /// Mean cross-entropy of the batch times its size.
    pub loss_sum: f64,
    /// Top-1 correct predictions.
    pub correct: usize,
    /// Top-5 correct predictions (0 with 5 classes or fewer).
    pub top5: usize,
    /// Images in the batch.
    pub samples: usize,
}

impl BatchEval {
    /// The metrics of `parts`, summed in their order.
    pub fn metrics(parts: &[BatchEval], with_top5: bool) -> EvalMetrics {
        let (mut loss, mut correct, mut top5, mut n) = (0.0, 0usize, 0usize, 0usize);
        for p in parts {
            loss += p.loss_sum;
            correct += p.correct;
            top5 += p.top5;
            n += p.samples;
        }
        let d = n.max(1) as f64;
        EvalMetrics {
            loss: loss / d,
            accuracy: correct as f64 / d,
            top5: with_top5.then(|| top5 as f64 / d),
            samples: n,
        }
    }
}

/// One batch of [`evaluate`].
pub fn evaluate_batch(net: &LocalNetwork, x: &Tensor, y: &Tensor) -> Result<BatchEval> {
    let mut ctx = Ctx::eval();
    let logits = net.forward(&x.detach(), &mut ctx)?.detach();
    batch_eval(net, &logits, y)
}

/// The sums of one evaluation batch from its logits.
fn batch_eval(net: &LocalNetwork, logits: &Tensor, y: &Tensor) -> Result<BatchEval> {
    let logits = logits.detach();
    let bs = logits.dim(0)?;
    let loss_sum = cross_entropy(&logits, y)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        * bs as f64;
    Ok(BatchEval {
        loss_sum,
        correct: correct_count(&logits, y)?,
        top5: if net.num_classes() > 5 {
            topk_correct_count(&logits, y, 5)?
        } else {
            0
        },
        samples: bs,
    })
}

/// A schedule or λ warm-up measured in epochs needs to know how long an epoch is: with
/// `steps_per_epoch` left at 0, cosine decay would give lr 0 from the first step.
fn check_steps_per_epoch(cfg: &TrainerConfig) -> Result<()> {
    if cfg.steps_per_epoch > 0 {
        return Ok(());
    }
    let needs = match &cfg.schedule {
        Schedule::Constant => None,
        Schedule::Cosine { .. } => Some("the cosine schedule"),
        Schedule::Step { .. } => Some("the step schedule"),
    }
    .or_else(|| {
        cfg.method
            .sgr
            .as_ref()
            .filter(|s| s.warmup_epochs > 0.0)
            .map(|_| "the SGR λ warm-up")
    });
    match needs {
        Some(what) => Err(Error::InvalidConfig(format!(
            "steps_per_epoch is 0, but {what} counts in epochs: set TrainerConfig::steps_per_epoch \
             to the number of batches per epoch, or use Schedule::Constant"
        ))),
        None => Ok(()),
    }
}

/// The heads of a zoo network are built for one objective; training them under another
/// (`dgl` heads under `infopro`) would silently optimise the wrong losses. `bp` and `greedy`
/// build the same heads.
fn check_objective(net: &LocalNetwork, method: &Method) -> Result<()> {
    let Some(built) = net.built_for() else {
        return Ok(());
    };
    let same_heads = |o: Objective| {
        if o == Objective::Bp {
            Objective::Greedy
        } else {
            o
        }
    };
    if same_heads(built) != same_heads(method.objective) {
        return Err(Error::InvalidConfig(format!(
            "the network's heads were built for the `{built}` objective, the trainer's method is \
             `{}`: build the model with ModelOptions::objective = {} (or train it with {built})",
            method, method.objective
        )));
    }
    Ok(())
}

/// The SGR term's extra passes must see the base pass's decisions: a stage that decides out of
/// the context's sight is refused for the ways it would break, naming what works instead.
fn check_replayable(net: &LocalNetwork, method: &Method) -> Result<()> {
    let Some(sgr) = &method.sgr else {
        return Ok(());
    };
    let k_total = net.num_modules();
    for k in 0..k_total {
        if !sgr.direction.reruns(k, k_total) {
            continue;
        }
        for (label, stage) in net.module_stages(k) {
            let d = stage.decisions();
            let breaks = match d {
                Decisions::Replayable => false,
                Decisions::Hidden => sgr.grad != SgrGrad::Exact,
                Decisions::Random => true,
            };
            if !breaks {
                continue;
            }
            let mut works = Vec::new();
            if d == Decisions::Hidden {
                works.push(if crate::autograd::SECOND_ORDER {
                    "`exact`".to_string()
                } else {
                    "`exact` (needs sgr-core's `second-order` feature)".to_string()
                });
            }
            works.push(format!(
                "`{}` without +sgr, or a layer that takes its decisions through the Ctx",
                method.objective
            ));
            return Err(Error::UnreplayableLayer {
                layer: label.to_string(),
                decisions: d.describe(),
                way: sgr.grad.to_string(),
                works: works.join("; "),
            });
        }
    }
    Ok(())
}

fn add_scaled(grads: &mut [Tensor], extra: &[Tensor], scale: f64) -> Result<()> {
    if grads.len() != extra.len() {
        return Err(Error::Internal(format!(
            "{} SGR gradients for {} parameters",
            extra.len(),
            grads.len()
        )));
    }
    for (g, e) in grads.iter_mut().zip(extra) {
        *g = (&*g + (e * scale)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::Method;

    #[test]
    fn config_serialises_the_method_by_name() {
        let c = TrainerConfig {
            method: Method::sgr(SgrConfig::default()),
            optimizer: OptimizerConfig::default(),
            lr: 0.1,
            schedule: Schedule::Constant,
            epochs: 2,
            steps_per_epoch: 3,
            seed: 4,
            ..TrainerConfig::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        // Recipe fields left at their defaults are not written (older specs hash the same).
        assert!(v.get("mix").is_none() && v.get("label_smoothing").is_none());
        let recipe = TrainerConfig {
            label_smoothing: 0.1,
            mix: Some(MixConfig::default()),
            clip_grad_norm: Some(1.0),
            ..c.clone()
        };
        let r = serde_json::to_value(&recipe).unwrap();
        assert_eq!(serde_json::from_value::<TrainerConfig>(r).unwrap(), recipe);
        assert_eq!(v["method"], "sgr");
        assert_eq!(v["sgr"]["lambda"], crate::sgr::DEFAULT_LAMBDA);
        assert_eq!(serde_json::from_value::<TrainerConfig>(v).unwrap(), c);
        let g = TrainerConfig {
            method: Method::greedy(),
            ..c
        };
        let v = serde_json::to_value(&g).unwrap();
        assert!(v.get("sgr").is_none());
        assert_eq!(serde_json::from_value::<TrainerConfig>(v).unwrap(), g);
    }

    #[test]
    fn non_finite_losses_are_caught_with_module_and_step() {
        let d = Device::Cpu;
        let mut s = DeviceSums::from_host(&EpochAccumulator::new(3), &d).unwrap();
        s.add_losses(&Tensor::new(&[1.0f64, 2.0, 3.0], &d).unwrap(), 0)
            .unwrap();
        assert!(s.download(&EpochAccumulator::new(3)).is_ok());
        s.add_losses(
            &Tensor::new(&[1.0f64, f64::INFINITY, f64::NAN], &d).unwrap(),
            5,
        )
        .unwrap();
        s.add_losses(&Tensor::new(&[f64::NAN, 1.0, 1.0], &d).unwrap(), 6)
            .unwrap();
        match s.download(&EpochAccumulator::new(3)) {
            Err(Error::NonFiniteLoss {
                module: 1,
                step: 5,
                value,
            }) => assert!(value.is_infinite()),
            other => panic!("{other:?}"),
        }
    }
}
