//! One module's part of a training step, the unit both schedules run: the sequential
//! [`Trainer::train_step`](super::Trainer::train_step) calls it for k = 0, 1, …, K−1 in turn,
//! and the pipeline (`super::pipeline`) calls it on the worker that owns module k. Being the
//! same code on the same inputs is what makes the two schedules bit-identical
//! (docs/parallel.md).
//!
//! A module needs nothing from later modules (the SGR term's forward direction): what it
//! needs from earlier ones is a [`Carry`]. The step's metrics are not summed where they are
//! computed; they are collected in a [`StepRecord`] that travels with the step and is added to
//! the epoch sums once the step is complete, in the same order whichever worker produced them.

use candle_core::Tensor;

use super::{add_scaled, clip_grad_norm, pass_seed, TrainerConfig};
use crate::ctx::Ctx;
use crate::method::Estimator;
use crate::network::LocalNetwork;
use crate::objective::Batch;
use crate::optim::Optimizer;
use crate::sgr::{base_pass_in, boundary_stats_on_device, sgr_term_grad, BasePoint, LocalModule};
use crate::sgr::{SgrGrad, Site};
use crate::{Error, Result};

/// What module k hands to module k+1 within one step: its detached output and, for every
/// module but the last, a_k, the gradient of its local loss at that output (the SGR target of
/// module k+1 and the reference of the boundary diagnostics).
#[derive(Debug, Clone)]
pub struct Carry {
    /// The detached output of the module before (the batch's input for module 0).
    pub h: Tensor,
    /// a_{k−1}, absent before module 0.
    pub a: Option<Tensor>,
}

impl Carry {
    /// What module 0 starts from.
    pub fn start(batch: &Batch) -> Self {
        Self {
            h: batch.input.detach(),
            a: None,
        }
    }
}

/// The per-step inputs every module of a step shares.
#[derive(Debug, Clone)]
pub struct StepInput {
    /// The batch, after mixup/cutmix and label smoothing.
    pub batch: Batch,
    /// Global step (seeds every random draw with the run seed and the module).
    pub step: usize,
    /// Learning rate of this step.
    pub lr: f64,
    /// SGR weight of this step.
    pub lambda: f64,
    /// Which copy of the modules runs this part of the batch (data-parallel replicas; 0
    /// otherwise). Replica 0 draws what the unreplicated run draws; the others draw their own.
    pub replica: usize,
}

impl StepInput {
    /// The seed of module `k`'s random draws in this step (SGR directions, forward-gradient
    /// noise, dropout): the run seed, the step, the module and, past replica 0, the replica,
    /// so that replicas do not share noise across their different examples.
    pub(crate) fn seed(&self, run_seed: u64, k: usize) -> u64 {
        let seed = pass_seed(run_seed, self.step, k);
        if self.replica == 0 {
            seed
        } else {
            pass_seed(seed, self.replica, usize::MAX)
        }
    }
}

/// A boundary's diagnostics from one step: `stats` is `[cos, rel_dist]`, `distance` the SGR
/// term's value when it was formed.
#[derive(Debug, Clone)]
pub struct BoundaryRecord {
    /// Boundary index k−1 (between modules k−1 and k).
    pub slot: usize,
    /// `[cos, rel_dist]` of (a_{k−1}, b_k), `f64` on the device.
    pub stats: Option<Tensor>,
    /// The SGR distance, `f64` on the device.
    pub distance: Option<Tensor>,
}

/// A step's metrics as its modules produce them (device tensors; nothing read on the host).
#[derive(Debug, Clone, Default)]
pub struct StepRecord {
    /// Module losses in module order, `f64` scalars.
    pub losses: Vec<Tensor>,
    /// Boundary diagnostics in module order.
    pub boundaries: Vec<BoundaryRecord>,
    /// Correct predictions of the last module's classifier, when it classifies.
    pub correct: Option<Tensor>,
}

/// Module `k`'s optimizer step, after gradient clipping when configured.
pub(crate) fn update(
    cfg: &TrainerConfig,
    opt: &mut dyn Optimizer,
    mut grads: Vec<Tensor>,
    lr: f64,
) -> Result<()> {
    if let Some(max) = cfg.clip_grad_norm {
        clip_grad_norm(&mut grads, max)?;
    }
    opt.step(&grads, lr)
}

/// The modules `first..first + optimizers.len()` of a step, in order, each with its own
/// optimizer: what the sequential schedule does for all K, and a pipeline worker or a rank for
/// its stage.
pub(crate) fn stage_step(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    optimizers: &mut [Box<dyn Optimizer>],
    first: usize,
    input: &StepInput,
    mut carry: Carry,
    record: &mut StepRecord,
) -> Result<Carry> {
    for (i, opt) in optimizers.iter_mut().enumerate() {
        carry = module_step(net, cfg, opt.as_mut(), first + i, input, carry, record)?;
    }
    Ok(carry)
}

/// Module `k`'s whole part of a step under the forward SGR direction (or none):
/// [`module_grads`], then its optimizer's update. Returns what module k+1 needs.
pub(crate) fn module_step(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    opt: &mut dyn Optimizer,
    k: usize,
    input: &StepInput,
    carry: Carry,
    record: &mut StepRecord,
) -> Result<Carry> {
    let (carry, grads) = module_grads(net, cfg, k, input, carry, record)?;
    update(cfg, opt, grads, input.lr)?;
    Ok(carry)
}

/// Module `k`'s part of a step short of its update: its local gradients by the configured
/// estimator, the boundary diagnostics against `carry.a` and the SGR term, added to the
/// gradients. Returns what module k+1 needs and the gradients to step with.
pub(crate) fn module_grads(
    net: &LocalNetwork,
    cfg: &TrainerConfig,
    k: usize,
    input: &StepInput,
    carry: Carry,
    record: &mut StepRecord,
) -> Result<(Carry, Vec<Tensor>)> {
    let _span = tracing::trace_span!("module", k).entered();
    let k_total = net.num_modules();
    let batch = &input.batch;
    let seed = input.seed(cfg.seed, k);
    let sgr = cfg.method.sgr.as_ref();
    let estimator = cfg.method.estimator;
    let mut boundary = BoundaryRecord {
        slot: k.wrapping_sub(1),
        stats: None,
        distance: None,
    };
    let (loss, logits, grads, output, output_grad);
    if estimator != Estimator::Backprop && crate::forward::has_perturbable(net, k) {
        use crate::forward::{boundary_probe, module_pass, sgr_term};
        let passes = cfg.fg_passes;
        let pass = module_pass(
            net,
            k,
            batch,
            &carry.h,
            estimator,
            passes,
            seed,
            sgr.is_some() && k > 0,
        )?;
        let mut g = pass.grads.clone();
        if let Some(a) = &carry.a {
            let probe = boundary_probe(net, k, &carry.h, a, &pass, seed)?;
            boundary.stats = Some(probe.stats()?);
            if let Some(s) = sgr {
                let term = sgr_term(
                    net,
                    k,
                    batch,
                    &carry.h,
                    &probe,
                    &pass,
                    estimator,
                    passes,
                    s.epsilon(),
                    seed,
                )?;
                add_scaled(&mut g, &term, input.lambda)?;
                boundary.distance = Some(probe.distance()?);
            }
        }
        (loss, logits, grads, output, output_grad) = (
            pass.loss,
            pass.logits,
            g,
            pass.output,
            Some(pass.output_grad),
        );
    } else {
        // Local back-propagation; under a forward estimator, a read-out module (exact local
        // gradients, the boundary exact as well).
        let prob = LocalModule { net, k, batch };
        // The finite differences replay the decisions of the module whose term they compute.
        let records = match estimator {
            Estimator::Backprop => {
                sgr.is_some_and(|s| s.grad != SgrGrad::Exact && s.direction.reruns(k, k_total))
            }
            _ => sgr.is_some(),
        };
        let ctx = if records {
            Ctx::train_recording()
        } else {
            Ctx::train()
        };
        let bp = base_pass_in(&prob, &carry.h, k > 0, ctx.with_seed(seed))?;
        let mut g = bp.grads.clone();
        if let (Some(a), Some(b)) = (&carry.a, &bp.input_grad) {
            boundary.stats = Some(boundary_stats_on_device(a, b)?);
            if let Some(s) = sgr {
                let term =
                    sgr_term_grad(&prob, &carry.h, Site::Input, b, a, BasePoint::of(&bp), s)?;
                add_scaled(&mut g, &term.grads, input.lambda)?;
                boundary.distance = Some(term.distance);
            }
        } else if k > 0 && sgr.is_some() {
            return Err(Error::Internal(format!(
                "module {k}: boundary gradients are missing"
            )));
        }
        (loss, logits, grads, output, output_grad) =
            (bp.loss, bp.logits, g, bp.output, bp.output_grad);
    }
    record.losses.push(loss);
    if k + 1 == k_total {
        if let Some(l) = &logits {
            record.correct = Some(batch.targets.correct(l)?);
        }
    }
    if k > 0 && (boundary.stats.is_some() || boundary.distance.is_some()) {
        record.boundaries.push(boundary);
    }
    let carry = Carry {
        h: output,
        a: if k + 1 < k_total { output_grad } else { None },
    };
    Ok((carry, grads))
}
