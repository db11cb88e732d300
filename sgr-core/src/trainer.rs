//! Trainers for end-to-end back-propagation and the local methods, side by side on the same
//! network, data and optimizer.

use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::events::{BoundaryMetrics, EpochMetrics, EvalMetrics, Event, Observer, StepMetrics};
use crate::loss::{correct_count, cross_entropy, topk_correct_count};
use crate::network::{collect_grads, LocalNetwork};
use crate::nn::Ctx;
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use crate::sgr::{
    base_pass, boundary_stats, sgr_term_grad, BasePoint, CrossEntropyModule, Direction, SgrConfig,
    SgrGrad, Site,
};
use crate::{Error, Result};

/// Training method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// End-to-end back-propagation (K = 1).
    Bp,
    /// Greedy SL: every module on its own cross-entropy head, all updated each step.
    Greedy,
    /// Greedy SL plus the SGR term.
    Sgr,
}

impl Method {
    /// Configuration names.
    pub const NAMES: [(&'static str, Method); 3] = [
        ("bp", Method::Bp),
        ("greedy", Method::Greedy),
        ("sgr", Method::Sgr),
    ];

    /// The configuration name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Bp => "bp",
            Method::Greedy => "greedy",
            Method::Sgr => "sgr",
        }
    }
}

/// Everything the trainer needs besides the network and the data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    /// Method.
    pub method: Method,
    /// SGR term (used by `sgr`).
    pub sgr: SgrConfig,
    /// Optimizer (one instance per module).
    pub optimizer: OptimizerConfig,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Planned epochs (for the schedule).
    pub epochs: usize,
    /// Steps per epoch (for the schedule).
    pub steps_per_epoch: usize,
}

/// Trains a [`LocalNetwork`] with one optimizer per module.
#[derive(Debug)]
pub struct Trainer {
    net: LocalNetwork,
    cfg: TrainerConfig,
    optimizers: Vec<Box<dyn Optimizer>>,
    step: usize,
    epoch: usize,
    acc: EpochAccumulator,
}

/// Partial sums of the current epoch's metrics.
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
    masks: Vec<crate::ctx::Decision>,
    grads: Vec<Tensor>,
    output_grad: Tensor,
}

impl Trainer {
    /// A trainer; `bp` requires a single-module network.
    pub fn new(net: LocalNetwork, cfg: TrainerConfig) -> Result<Self> {
        cfg.sgr.validate()?;
        if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "lr must be > 0, got {}",
                cfg.lr
            )));
        }
        let k = net.num_modules();
        if cfg.method == Method::Bp && k != 1 {
            return Err(Error::InvalidConfig(format!(
                "method bp trains end to end and needs K=1, the network has K={k}"
            )));
        }
        let optimizers = (0..k)
            .map(|m| cfg.optimizer.build(net.module_params(m)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            acc: EpochAccumulator::new(k),
            net,
            cfg,
            optimizers,
            step: 0,
            epoch: 0,
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
        self.step
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
        self.epoch = epoch;
        self.step = step;
    }

    /// Current epoch (0-based).
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// Steps taken in the current epoch.
    pub fn steps_in_epoch(&self) -> usize {
        self.acc.steps
    }

    /// The position and partial epoch metrics (for checkpoints).
    pub fn state(&self) -> TrainerState {
        TrainerState {
            epoch: self.epoch,
            global_step: self.step,
            epoch_progress: self.acc.clone(),
        }
    }

    /// Checks that a state fits this trainer's network.
    pub fn check_state(&self, state: &TrainerState) -> Result<()> {
        let k = self.net.num_modules();
        if state.epoch_progress.loss_sums.len() != k
            || state.epoch_progress.boundary.len() != k.saturating_sub(1)
        {
            return Err(Error::InvalidConfig(format!(
                "trainer state is for K={}, the network has K={k}",
                state.epoch_progress.loss_sums.len()
            )));
        }
        Ok(())
    }

    /// Restores a state produced by [`Trainer::state`].
    pub fn load_state(&mut self, state: TrainerState) -> Result<()> {
        self.check_state(&state)?;
        self.epoch = state.epoch;
        self.step = state.global_step;
        self.acc = state.epoch_progress;
        Ok(())
    }

    fn lr_now(&self) -> f64 {
        let total = self.cfg.epochs * self.cfg.steps_per_epoch;
        self.cfg
            .schedule
            .lr(self.cfg.lr, self.step, self.cfg.steps_per_epoch, total)
    }

    fn lambda_now(&self) -> f64 {
        if self.cfg.method != Method::Sgr {
            return 0.0;
        }
        let progress = self.step as f64 / self.cfg.steps_per_epoch.max(1) as f64;
        self.cfg.sgr.lambda_at(progress)
    }

    /// One optimisation step on a batch; `labels` are integer class indices.
    pub fn train_step(&mut self, x: &Tensor, labels: &Tensor) -> Result<StepMetrics> {
        let _span = tracing::debug_span!("train_step", step = self.step).entered();
        let t0 = Instant::now();
        let lr = self.lr_now();
        let lambda = self.lambda_now();
        let (module_losses, correct) = match self.cfg.method {
            Method::Bp => self.bp_step(x, labels, lr)?,
            Method::Greedy | Method::Sgr => self.local_step(x, labels, lr, lambda)?,
        };
        for (m, l) in module_losses.iter().enumerate() {
            if !l.is_finite() {
                return Err(Error::NonFiniteLoss {
                    module: m,
                    step: self.step,
                    value: *l as f32,
                });
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let batch = x.dim(0)?;
        let a = &mut self.acc;
        a.steps += 1;
        for (s, l) in a.loss_sums.iter_mut().zip(&module_losses) {
            *s += l;
        }
        a.correct += correct;
        a.seen += batch;
        a.seconds += seconds;
        a.lr = lr;
        let m = StepMetrics {
            epoch: self.epoch,
            step: self.step,
            module_losses,
            lr,
            lambda,
            batch,
            correct,
            seconds,
        };
        self.step += 1;
        Ok(m)
    }

    fn bp_step(&mut self, x: &Tensor, labels: &Tensor, lr: f64) -> Result<(Vec<f64>, usize)> {
        let mut ctx = Ctx::train();
        let logits = self.net.forward(&x.detach(), &mut ctx)?;
        let loss = cross_entropy(&logits, labels)?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let correct = correct_count(&logits, labels)?;
        let store = loss.backward()?;
        drop(logits);
        let vars: Vec<_> = self.optimizers[0]
            .params()
            .iter()
            .map(|p| p.var.clone())
            .collect();
        let grads = collect_grads(&store, &vars)?;
        drop(store);
        self.optimizers[0].step(&grads, lr)?;
        Ok((vec![value], correct))
    }

    fn local_step(
        &mut self,
        x: &Tensor,
        labels: &Tensor,
        lr: f64,
        lambda: f64,
    ) -> Result<(Vec<f64>, usize)> {
        let k_total = self.net.num_modules();
        let sgr_on = self.cfg.method == Method::Sgr;
        let sgr = self.cfg.sgr.clone();
        // The finite differences replay the ReLU masks of the module whose term they compute:
        // module k > 0 (forward direction) or k < K − 1 (backward); no other module records.
        let record = |k: usize| {
            sgr_on
                && sgr.grad != SgrGrad::Exact
                && match sgr.direction {
                    Direction::Forward => k > 0,
                    Direction::Backward => k + 1 < k_total,
                }
        };
        let mut losses = Vec::with_capacity(k_total);
        let mut correct = 0;
        let mut h = x.detach();
        let mut prev_a: Option<Tensor> = None;
        let mut pending: Option<Pending> = None;
        for k in 0..k_total {
            let _span = tracing::trace_span!("module", k).entered();
            let prob = CrossEntropyModule {
                net: &self.net,
                k,
                labels,
            };
            let bp = base_pass(&prob, &h, k > 0, record(k))?;
            losses.push(bp.loss);
            if k + 1 == k_total {
                correct = correct_count(&bp.logits, labels)?;
            }
            let mut grads = bp.grads.clone();
            let mut sgr_d = None;
            if let (Some(a), Some(b)) = (&prev_a, &bp.input_grad) {
                let (cos, rel) = boundary_stats(a, b)?;
                let slot = &mut self.acc.boundary[k - 1];
                slot.0 += cos;
                slot.1 += rel;
                slot.3 += 1;
            }
            match sgr.direction {
                Direction::Forward => {
                    if sgr_on && k > 0 {
                        let (a, b) = match (&prev_a, &bp.input_grad) {
                            (Some(a), Some(b)) => (a, b),
                            _ => {
                                return Err(Error::InvalidConfig(format!(
                                    "module {k}: boundary gradients are missing"
                                )))
                            }
                        };
                        let term =
                            sgr_term_grad(&prob, &h, Site::Input, b, a, BasePoint::of(&bp), &sgr)?;
                        add_scaled(&mut grads, &term.grads, lambda)?;
                        sgr_d = Some((k - 1, term.distance));
                    }
                    self.optimizers[k].step(&grads, lr)?;
                }
                Direction::Backward => {
                    if let Some(p) = pending.take() {
                        let mut g = p.grads.clone();
                        if sgr_on {
                            let b = bp.input_grad.as_ref().ok_or_else(|| {
                                Error::InvalidConfig(format!("module {k}: input gradient missing"))
                            })?;
                            let prev = CrossEntropyModule {
                                net: &self.net,
                                k: p.k,
                                labels,
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
                                },
                                &sgr,
                            )?;
                            add_scaled(&mut g, &term.grads, lambda)?;
                            sgr_d = Some((k - 1, term.distance));
                        }
                        self.optimizers[p.k].step(&g, lr)?;
                    }
                    if k + 1 < k_total {
                        let output_grad = bp.output_grad.clone().ok_or_else(|| {
                            Error::InvalidConfig(format!("module {k}: output gradient missing"))
                        })?;
                        pending = Some(Pending {
                            k,
                            input: h.clone(),
                            masks: bp.masks,
                            grads,
                            output_grad,
                        });
                    } else {
                        self.optimizers[k].step(&grads, lr)?;
                    }
                }
            }
            if let Some((slot, d)) = sgr_d {
                let s = &mut self.acc.boundary[slot];
                s.2 += d;
                s.4 += 1;
            }
            prev_a = if k + 1 < k_total {
                bp.output_grad
            } else {
                None
            };
            h = bp.output;
        }
        Ok((losses, correct))
    }

    /// Closes the current epoch: returns its metrics and emits [`Event::Epoch`].
    pub fn finish_epoch(&mut self, observer: &mut dyn Observer) -> EpochMetrics {
        let k = self.net.num_modules();
        let a = std::mem::replace(&mut self.acc, EpochAccumulator::new(k));
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
            epoch: self.epoch,
            steps: a.steps,
            train_loss: module_losses.last().copied().unwrap_or(f64::NAN),
            module_losses,
            train_accuracy: a.correct as f64 / a.seen.max(1) as f64,
            boundaries,
            lr: a.lr,
            seconds: a.seconds,
        };
        observer.on_event(&Event::Epoch(&m));
        self.epoch += 1;
        m
    }

    /// Runs one epoch over `batches`, emitting a [`Event::Step`] per step.
    pub fn run_epoch<I, E>(
        &mut self,
        batches: I,
        observer: &mut dyn Observer,
    ) -> Result<EpochMetrics>
    where
        I: IntoIterator<Item = std::result::Result<(Tensor, Tensor), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _span = tracing::info_span!("epoch", epoch = self.epoch).entered();
        for b in batches {
            let (x, y) = b.map_err(|e| Error::Data(e.into()))?;
            let m = self.train_step(&x, &y)?;
            observer.on_event(&Event::Step(&m));
        }
        Ok(self.finish_epoch(observer))
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

/// Evaluates a network's classifier (evaluation mode) over `batches`.
pub fn evaluate<I, E>(net: &LocalNetwork, batches: I) -> Result<EvalMetrics>
where
    I: IntoIterator<Item = std::result::Result<(Tensor, Tensor), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _span = tracing::info_span!("evaluate").entered();
    let (mut loss, mut correct, mut top5, mut n) = (0.0, 0usize, 0usize, 0usize);
    let with_top5 = net.num_classes() > 5;
    for b in batches {
        let (x, y) = b.map_err(|e| Error::Data(e.into()))?;
        let mut ctx = Ctx::eval();
        let logits = net.forward(&x.detach(), &mut ctx)?.detach();
        let bs = x.dim(0)?;
        loss += cross_entropy(&logits, &y)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?
            * bs as f64;
        correct += correct_count(&logits, &y)?;
        if with_top5 {
            top5 += topk_correct_count(&logits, &y, 5)?;
        }
        n += bs;
    }
    let d = n.max(1) as f64;
    Ok(EvalMetrics {
        loss: loss / d,
        accuracy: correct as f64 / d,
        top5: with_top5.then(|| top5 as f64 / d),
        samples: n,
    })
}

fn add_scaled(grads: &mut [Tensor], extra: &[Tensor], scale: f64) -> Result<()> {
    if grads.len() != extra.len() {
        return Err(Error::InvalidConfig(format!(
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
