//! The local step of one module and the Successive Gradient Reconciliation (SGR) term.
//!
//! For modules k ≥ 2 SGR adds λ·D(b_k, stopgrad(a_{k-1})) to the local loss L_k, where
//! a_{k-1} = ∂L_{k-1}/∂h_{k-1} is the previous module's gradient at its output and
//! b_k = ∂L_k/∂ĥ_{k-1} is module k's gradient at its (detached) input (`forward` direction, as
//! specified in docs/method.md). The `backward` direction instead adds λ·D(a_{k-1}, stopgrad(b_k)) to
//! module k-1's objective.
//!
//! With v = ∂D/∂s (s the regularised gradient), the parameter gradient of the term is the
//! Hessian-vector product ∇_θ(v·s) = d/dε ∇_θ L(site + ε v) at ε = 0, where `site` is the
//! module's input (forward) or output (backward). [`SgrGrad::Exact`] computes it by double
//! backward; [`SgrGrad::FiniteDifference`] by a central difference with the ReLU masks of the
//! base point replayed and BatchNorm running statistics untouched.
//!
//! Everything here works on a [`LocalProblem`], so other local losses (InfoPro, DGL) can add the
//! same term.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::autograd::with_second_order;
use crate::network::{collect_grads, collect_grads_checked, LocalNetwork};
use crate::nn::{Ctx, Param, ParamKind};
use crate::objective::Batch;
use crate::{Error, Result};

/// One module's local learning problem: its tensors and a scalar loss of its input.
pub trait LocalProblem: Sync {
    /// Named tensors of the module's body and loss head, in a fixed order: trainable ones and
    /// buffers (running statistics), which the SGR term's extra passes put back as they were.
    fn params(&self) -> Vec<Param>;
    /// Trainable variables, in [`LocalProblem::params`]'s order.
    fn vars(&self) -> Vec<Var> {
        self.params()
            .into_iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .map(|p| p.var)
            .collect()
    }
    /// Runs the module on `x`; `shift` says what to add to the module's output before the
    /// loss head.
    fn forward(&self, x: &Tensor, shift: OutputShift<'_>, ctx: &mut Ctx) -> Result<LocalForward>;
}

/// What a local forward pass adds to the module's output before the loss head.
#[derive(Debug, Clone, Copy)]
pub enum OutputShift<'a> {
    /// Nothing.
    None,
    /// A fixed tensor (the finite-difference perturbation of the backward direction).
    Add(&'a Tensor),
    /// A zero-valued variable, returned in [`LocalForward::probe`]: its gradient is the
    /// gradient at the output (candle drops the gradients of intermediate tensors), and it
    /// keeps the graph to the module's parameters for double backward.
    Probe,
}

/// What a local forward pass produced.
#[derive(Debug)]
pub struct LocalForward {
    /// Scalar local loss.
    pub loss: Tensor,
    /// The module's output h_k (for the last module: the logits).
    pub output: Tensor,
    /// Class logits of the objective, when it classifies.
    pub logits: Option<Tensor>,
    /// The zero variable added to the output for [`OutputShift::Probe`].
    pub probe: Option<Var>,
}

/// Module `k` of a [`LocalNetwork`] on a batch: its body, then its local objective
/// ([`crate::objective::LocalObjective`]) on the (possibly shifted) output.
#[derive(Debug, Clone, Copy)]
pub struct LocalModule<'a> {
    /// The network.
    pub net: &'a LocalNetwork,
    /// Module index (0-based).
    pub k: usize,
    /// The batch (images and targets).
    pub batch: &'a Batch,
}

impl LocalProblem for LocalModule<'_> {
    fn params(&self) -> Vec<Param> {
        self.net.module_params(self.k)
    }

    fn forward(&self, x: &Tensor, shift: OutputShift<'_>, ctx: &mut Ctx) -> Result<LocalForward> {
        let last = self.k + 1 == self.net.num_modules();
        let output = self.net.module_body(self.k, x, ctx)?;
        let mut probe = None;
        // The last module hands nothing on: its output gradient is never needed.
        let head_in = match shift {
            OutputShift::Add(_) if last => {
                return Err(Error::InvalidConfig(
                    "the last module has no successor to shift its output for".into(),
                ))
            }
            OutputShift::None => output.clone(),
            OutputShift::Probe if last => output.clone(),
            OutputShift::Add(s) => (&output + s)?,
            OutputShift::Probe => {
                let z = Var::from_tensor(&output.zeros_like()?)?;
                let h = (&output + z.as_tensor())?;
                probe = Some(z);
                h
            }
        };
        let o = self
            .net
            .module_objective(self.k)?
            .loss(&head_in, self.batch, ctx)?;
        Ok(LocalForward {
            loss: o.loss,
            output,
            logits: o.logits,
            probe,
        })
    }
}

/// Result of the plain local forward/backward of a module.
#[derive(Debug)]
pub struct BasePass {
    /// Local loss, an `f64` scalar on the device (reading it is a host sync).
    pub loss: Tensor,
    /// Class logits of the objective (detached), when it classifies.
    pub logits: Option<Tensor>,
    /// ∇ of the local loss for each of [`LocalProblem::vars`].
    pub grads: Vec<Tensor>,
    /// The module's output, detached (the next module's input).
    pub output: Tensor,
    /// a_k = ∂L_k/∂h_k, the gradient at the module's output.
    pub output_grad: Option<Tensor>,
    /// b_k = ∂L_k/∂ĥ, the gradient at the module's input (when requested).
    pub input_grad: Option<Tensor>,
    /// The decisions (ReLU and dropout masks) of this point, when recorded.
    pub masks: Vec<crate::ctx::Decision>,
    /// The seed of the pass's random decisions.
    pub seed: u64,
}

impl BasePass {
    /// The local loss on the host (a sync on devices other than the CPU).
    pub fn loss_value(&self) -> Result<f64> {
        Ok(self.loss.to_scalar::<f64>()?)
    }
}

/// Forward and backward of a module's local loss at `x` (treated as detached: nothing flows
/// back into whatever produced `x`), in a training context that records the pass's decisions
/// when `record_masks`. Updates BatchNorm running statistics.
pub fn base_pass(
    p: &dyn LocalProblem,
    x: &Tensor,
    want_input_grad: bool,
    record_masks: bool,
) -> Result<BasePass> {
    let ctx = if record_masks {
        Ctx::train_recording()
    } else {
        Ctx::train()
    };
    base_pass_in(p, x, want_input_grad, ctx)
}

/// [`base_pass`] in a given context (its mode, tape and seed).
pub fn base_pass_in(
    p: &dyn LocalProblem,
    x: &Tensor,
    want_input_grad: bool,
    mut ctx: Ctx,
) -> Result<BasePass> {
    let input_var = if want_input_grad {
        Some(Var::from_tensor(&x.detach())?)
    } else {
        None
    };
    let x_in = match &input_var {
        Some(v) => v.as_tensor().clone(),
        None => x.detach(),
    };
    let f = p.forward(&x_in, OutputShift::Probe, &mut ctx)?;
    let loss = f.loss.detach().to_dtype(candle_core::DType::F64)?;
    let store = f.loss.backward()?;
    let grads = collect_grads_checked(&store, &p.params())?;
    let output_grad = f
        .probe
        .as_ref()
        .and_then(|z| store.get(z.as_tensor()).map(|g| g.detach()));
    let input_grad = input_var
        .as_ref()
        .and_then(|v| store.get(v.as_tensor()).map(|g| g.detach()));
    Ok(BasePass {
        loss,
        grads,
        logits: f.logits.map(|l| l.detach()),
        output: f.output.detach(),
        output_grad,
        input_grad,
        seed: ctx.seed(),
        masks: ctx.take_masks(),
    })
}

/// The distance D between the regularised gradient and its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Distance {
    /// mean over samples of ||B·(s_i − t_i)||² = B·Σ_i ||s_i − t_i||² (B = batch size), so
    /// per-sample gradients of a mean-reduced loss are compared at a scale independent of B.
    #[default]
    SquaredL2,
    /// 1 − cos(vec s, vec t) over the whole batch.
    Cosine,
    /// mean over samples of 1 − cos(s_i, t_i).
    CosinePerSample,
}

crate::named_enum!(Distance, "distance", { "squared-l2" => SquaredL2, "cosine" => Cosine, "cosine-per-sample" => CosinePerSample });

impl Distance {
    /// D(s, t) as a scalar tensor, differentiable in `s` (and twice through `s`'s graph).
    pub fn eval(&self, s: &Tensor, t: &Tensor) -> Result<Tensor> {
        const TINY: f64 = 1e-30;
        let b = s.dim(0)?;
        match self {
            Distance::SquaredL2 => Ok(((s - t)?.sqr()?.sum_all()? * b as f64)?),
            Distance::Cosine => {
                let dot = (s * t)?.sum_all()?;
                let ns = (s.sqr()?.sum_all()? + TINY)?.sqrt()?;
                let nt = (t.sqr()?.sum_all()? + TINY)?.sqrt()?;
                Ok((1.0 - dot.div(&(ns * nt)?)?)?)
            }
            Distance::CosinePerSample => {
                let s2 = s.flatten_from(1)?;
                let t2 = t.flatten_from(1)?;
                let dot = (&s2 * &t2)?.sum(1)?;
                let ns = (s2.sqr()?.sum(1)? + TINY)?.sqrt()?;
                let nt = (t2.sqr()?.sum(1)? + TINY)?.sqrt()?;
                Ok((1.0 - dot.div(&(ns * nt)?)?.mean_all()?)?)
            }
        }
    }

    /// (D(s, t), ∂D/∂s), D as an `f64` scalar on the device: closed form for `squared-l2`
    /// (two passes), first-order autodiff otherwise.
    pub fn value_and_grad(&self, s: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor)> {
        if *self == Distance::SquaredL2 && s.dtype() == t.dtype() && s.shape() == t.shape() {
            // D = B Σ (s − t)², ∂D/∂s = 2B (s − t)
            let b = s.dim(0)? as f64;
            let dd = crate::kernels::pair_sums(s, t)?.get(3)?;
            let v = crate::kernels::scaled_sum(s, t, -1.0, 2.0 * b)?;
            return Ok(((dd * b)?, v));
        }
        let sv = Var::from_tensor(&s.detach())?;
        let d = self.eval(sv.as_tensor(), &t.detach())?;
        let value = d.detach().to_dtype(candle_core::DType::F64)?;
        let g = d.backward()?;
        let v = g
            .get(sv.as_tensor())
            .map(|t| t.detach())
            .ok_or_else(|| Error::Internal("distance does not depend on its input".into()))?;
        Ok((value, v))
    }
}

/// Which gradient SGR regularises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// As specified: module k's input gradient b_k is pulled toward stopgrad(a_{k-1}).
    #[default]
    Forward,
    /// Module k-1's output gradient a_{k-1} is pulled toward stopgrad(b_k), same step.
    Backward,
}

crate::named_enum!(Direction, "SGR direction", { "forward" => Forward, "backward" => Backward });

impl Direction {
    /// Whether the SGR term re-runs module `k` of `modules` (its finite differences replay
    /// that module's decisions): every module but the first (forward) or the last (backward).
    pub fn reruns(&self, k: usize, modules: usize) -> bool {
        match self {
            Direction::Forward => k > 0,
            Direction::Backward => k + 1 < modules,
        }
    }
}

/// How the parameter gradient of the SGR term is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SgrGrad {
    /// The **central** difference `[∇L(ĥ + εv) − ∇L(ĥ − εv)] / 2ε` with the base pass's
    /// decisions replayed (two extra forward + backward passes: an SGR step costs ≈3 plain
    /// local steps). Error O(ε²). Spelled `finite-difference` (its name since the first
    /// release) or `central-difference`.
    #[default]
    FiniteDifference,
    /// One-sided difference against the base pass, frozen ReLU masks (one extra forward +
    /// backward pass: ≈2 plain local steps). Error O(ε): about ten times the central one.
    ForwardDifference,
    /// Double backward (the oracle; slow and memory-hungry). Needs sgr-core's `second-order`
    /// feature ([`crate::autograd::SECOND_ORDER`]).
    Exact,
}

crate::named_enum!(SgrGrad, "SGR gradient way", {
    "finite-difference" => FiniteDifference,
    "forward-difference" => ForwardDifference,
    "exact" => Exact,
} aliases {
    "central-difference" => FiniteDifference,
});

/// Configuration of the SGR term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgrConfig {
    /// Weight λ of the term (after warm-up).
    pub lambda: f64,
    /// Distance D.
    pub distance: Distance,
    /// Which side of a boundary is regularised.
    pub direction: Direction,
    /// How the parameter gradient is computed.
    pub grad: SgrGrad,
    /// Finite-difference step ε (along the unit-RMS direction); `None`: the way's default,
    /// [`CENTRAL_EPSILON`] or [`ONE_SIDED_EPSILON`].
    pub fd_epsilon: Option<f64>,
    /// λ rises linearly from 0 over this many epochs (0: no warm-up).
    pub warmup_epochs: f64,
}

impl Default for SgrConfig {
    fn default() -> Self {
        Self {
            lambda: DEFAULT_LAMBDA,
            distance: Distance::SquaredL2,
            direction: Direction::Forward,
            grad: SgrGrad::FiniteDifference,
            fd_epsilon: None,
            warmup_epochs: 0.0,
        }
    }
}

/// Default ε of the central difference: its error is O(ε²) against f32 round-off O(1/ε);
/// 2e-3..5e-3 give 1e-4..2e-4 relative error on ResNet modules (tests/sgr_gradients.rs).
pub const CENTRAL_EPSILON: f64 = 5e-3;

/// Default ε of the one-sided difference: its error is O(ε); at 1e-3 it is 2e-3..5e-3 relative
/// on ResNet modules, at 5e-3 already 1e-2..2e-2.
pub const ONE_SIDED_EPSILON: f64 = 1e-3;

/// Default λ for `squared-l2` (see the README's "Choosing λ" for the sweep behind it).
pub const DEFAULT_LAMBDA: f64 = 1.0;

impl SgrConfig {
    /// λ at a fractional epoch, after warm-up.
    pub fn lambda_at(&self, epoch_progress: f64) -> f64 {
        if self.warmup_epochs > 0.0 && epoch_progress < self.warmup_epochs {
            self.lambda * (epoch_progress / self.warmup_epochs).max(0.0)
        } else {
            self.lambda
        }
    }

    /// The finite-difference step in effect for [`SgrConfig::grad`].
    pub fn epsilon(&self) -> f64 {
        self.fd_epsilon.unwrap_or(match self.grad {
            SgrGrad::ForwardDifference => ONE_SIDED_EPSILON,
            SgrGrad::FiniteDifference | SgrGrad::Exact => CENTRAL_EPSILON,
        })
    }

    /// Checks ranges, and that this build can run the gradient way.
    pub fn validate(&self) -> Result<()> {
        if self.grad == SgrGrad::Exact && !crate::autograd::SECOND_ORDER {
            return Err(Error::SecondOrderUnavailable {
                what: "the `exact` SGR gradient",
            });
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::InvalidConfig(format!(
                "sgr lambda must be finite and >= 0, got {}",
                self.lambda
            )));
        }
        if let Some(e) = self.fd_epsilon {
            if !(e.is_finite() && e > 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "sgr fd_epsilon must be > 0, got {e}"
                )));
            }
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            return Err(Error::InvalidConfig(format!(
                "sgr warmup_epochs must be >= 0, got {}",
                self.warmup_epochs
            )));
        }
        Ok(())
    }
}

/// Where the regularised gradient lives in a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The module's input (b_k; forward direction).
    Input,
    /// The module's output, before its head (a_{k-1}; backward direction).
    Output,
}

/// What the SGR gradient reuses from the [`base_pass`] at ĥ.
#[derive(Debug, Clone, Copy, Default)]
pub struct BasePoint<'a> {
    /// ReLU masks recorded there: the finite differences replay them; the exact way replays them
    /// when given (so that it differentiates the same piecewise-linear function).
    pub masks: &'a [crate::ctx::Decision],
    /// ∇_θ L_k there, for each of [`LocalProblem::vars`] (the one-sided difference's base value).
    pub grads: &'a [Tensor],
    /// The seed of the base pass's random decisions: the exact way, which replays no recorded
    /// decisions, draws the same ones from it.
    pub seed: u64,
}

impl<'a> BasePoint<'a> {
    /// Masks and gradients of a base pass.
    pub fn of(base: &'a BasePass) -> Self {
        Self {
            masks: &base.masks,
            grads: &base.grads,
            seed: base.seed,
        }
    }
}

/// The SGR term's parameter gradient ∇_θ D(s(θ), t) for one module, with its value D.
#[derive(Debug)]
pub struct SgrTermGrad {
    /// D at the base point, an `f64` scalar on the device.
    pub distance: Tensor,
    /// ∇_θ D for each of [`LocalProblem::vars`] (not yet multiplied by λ).
    pub grads: Vec<Tensor>,
}

/// Computes ∇_θ D(s(θ), t) where s is the local gradient at `site` of module `p` at input `x`.
///
/// `site_grad` is s at the base point, `base` what the [`base_pass`] there recorded. The exact
/// way recomputes s with its graph; given masks, it replays them, so that it differentiates
/// exactly the piecewise-linear function of the base pass (a pre-activation within rounding of 0
/// can otherwise flip between two forward implementations). Only the
/// distance, gradient way and ε of `cfg` are used; λ is applied by the caller.
pub fn sgr_term_grad(
    p: &dyn LocalProblem,
    x: &Tensor,
    site: Site,
    site_grad: &Tensor,
    target: &Tensor,
    base: BasePoint<'_>,
    cfg: &SgrConfig,
) -> Result<SgrTermGrad> {
    let fd = |one_sided: bool, buffers: &BufferSnapshot| {
        let base_grads = one_sided.then_some(base.grads);
        fd_term_grad(
            p,
            x,
            site,
            site_grad,
            target,
            base.masks,
            base_grads,
            cfg.distance,
            cfg.epsilon(),
            buffers,
        )
    };
    let buffers = BufferSnapshot::take(p)?;
    let out = match cfg.grad {
        SgrGrad::FiniteDifference => fd(false, &buffers),
        SgrGrad::ForwardDifference => fd(true, &buffers),
        SgrGrad::Exact => exact_term_grad(p, x, site, target, base, cfg.distance),
    };
    // Also after a failed pass: a buffer is never left at a value only an extra pass made.
    buffers.restore()?;
    out
}

/// The buffers (running statistics) of a module, copied before the SGR term's extra passes and
/// written back after each: sgr's own BatchNorm leaves them alone in those passes, but a
/// foreign layer (candle-nn's `BatchNorm` in training mode) updates them on every call.
struct BufferSnapshot(Vec<(Var, Tensor)>);

impl BufferSnapshot {
    fn take(p: &dyn LocalProblem) -> Result<Self> {
        p.params()
            .into_iter()
            .filter(|q| q.kind == ParamKind::Buffer)
            .map(|q| {
                let copy = q.var.as_tensor().copy()?;
                Ok((q.var, copy))
            })
            .collect::<Result<Vec<_>>>()
            .map(Self)
    }

    fn restore(&self) -> Result<()> {
        for (var, value) in &self.0 {
            var.set(value)?;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn fd_term_grad(
    p: &dyn LocalProblem,
    x: &Tensor,
    site: Site,
    site_grad: &Tensor,
    target: &Tensor,
    masks: &[crate::ctx::Decision],
    base_grads: Option<&[Tensor]>,
    distance: Distance,
    eps: f64,
    buffers: &BufferSnapshot,
) -> Result<SgrTermGrad> {
    let (value, v) = distance.value_and_grad(site_grad, target)?;
    let vars = p.vars();
    if let Some(g) = base_grads {
        if g.len() != vars.len() {
            return Err(Error::Internal(format!(
                "one-sided SGR difference needs the base pass gradients of all {} parameters, \
                 got {}",
                vars.len(),
                g.len()
            )));
        }
    }
    // ε is a step along the unit-RMS direction: one host read per module and step.
    let sum_sq = crate::kernels::pair_sums(&v, &v)?
        .get(1)?
        .to_scalar::<f64>()?;
    let rms = (sum_sq / v.elem_count().max(1) as f64).sqrt();
    if rms == 0.0 || !rms.is_finite() {
        let grads = vars
            .iter()
            .map(|v| Ok(v.as_tensor().zeros_like()?))
            .collect::<Result<Vec<_>>>()?;
        return Ok(SgrTermGrad {
            distance: value,
            grads,
        });
    }
    let x = x.detach();
    let signs: &[f64] = if base_grads.is_some() {
        &[1.0]
    } else {
        &[1.0, -1.0]
    };
    // One pass at a time: each pass's graph is freed before the next is built, so the
    // difference costs one module graph of memory, like the base pass.
    let mut sums: Option<Vec<Tensor>> = None;
    for &sign in signs {
        // the point site + sign·ε·v/rms
        let c = sign * eps / rms;
        let mut ctx = Ctx::train_replaying(masks.to_vec());
        let f = match site {
            Site::Input => {
                let shifted = crate::kernels::scaled_sum(&x, &v, c, 1.0)?;
                p.forward(&shifted, OutputShift::None, &mut ctx)?
            }
            Site::Output => {
                let shift = crate::kernels::scaled_sum(&v, &v, 0.0, c)?;
                p.forward(&x, OutputShift::Add(&shift), &mut ctx)?
            }
        };
        if ctx.replay_position() != Some(masks.len()) {
            return Err(Error::InvalidConfig(format!(
                "finite-difference pass used {:?} of {} recorded ReLU masks",
                ctx.replay_position(),
                masks.len()
            )));
        }
        let store = f.loss.backward()?;
        drop(f);
        buffers.restore()?;
        let g = collect_grads(&store, &vars)?;
        drop(store);
        sums = Some(match sums {
            None => g,
            // ∇L(ĥ + εu) − ∇L(ĥ − εu)
            Some(plus) => plus
                .into_iter()
                .zip(g)
                .map(|(a, b)| Ok((a - b)?))
                .collect::<Result<Vec<_>>>()?,
        });
    }
    let diff = sums.unwrap_or_default();
    let grads = match base_grads {
        // rms · [∇L(ĥ + εu) − ∇L(ĥ)] / ε
        Some(g0) => {
            let scale = rms / eps;
            diff.into_iter()
                .zip(g0)
                .map(|(g, g0)| Ok(((g - g0)? * scale)?))
                .collect::<Result<Vec<_>>>()?
        }
        // rms · [∇L(ĥ + εu) − ∇L(ĥ − εu)] / (2ε)
        None => {
            let scale = rms / (2.0 * eps);
            diff.into_iter()
                .map(|g| Ok((g * scale)?))
                .collect::<Result<Vec<_>>>()?
        }
    };
    Ok(SgrTermGrad {
        distance: value,
        grads,
    })
}

fn exact_term_grad(
    p: &dyn LocalProblem,
    x: &Tensor,
    site: Site,
    target: &Tensor,
    base: BasePoint<'_>,
    distance: Distance,
) -> Result<SgrTermGrad> {
    let target = target.detach();
    let (masks, seed) = (base.masks, base.seed);
    with_second_order(|| {
        let xv = Var::from_tensor(&x.detach())?;
        let mut ctx = if masks.is_empty() {
            Ctx::train_frozen_stats().with_seed(seed)
        } else {
            Ctx::train_replaying(masks.to_vec())
        };
        let shift = match site {
            Site::Input => OutputShift::None,
            Site::Output => OutputShift::Probe,
        };
        let f = p.forward(xv.as_tensor(), shift, &mut ctx)?;
        let first = f.loss.backward()?;
        let s = match (site, &f.probe) {
            (Site::Input, _) => first.get(xv.as_tensor()),
            (Site::Output, Some(z)) => first.get(z.as_tensor()),
            (Site::Output, None) => None,
        }
        .ok_or_else(|| Error::InvalidConfig("local loss does not depend on the site".into()))?;
        let d = distance.eval(s, &target)?;
        let value = d.detach().to_dtype(candle_core::DType::F64)?;
        let second = d.backward()?;
        let grads = collect_grads(&second, &p.vars())?;
        Ok(SgrTermGrad {
            distance: value,
            grads,
        })
    })
}

/// Cosine and relative distance of two gradients: (cos(a, b), ||a − b|| / ||a||).
pub fn boundary_stats(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let v = boundary_stats_on_device(a, b)?.to_vec1::<f64>()?;
    Ok((v[0], v[1]))
}

/// [`boundary_stats`] as an `f64` tensor `[cos, rel]` on the gradients' device, without a host
/// sync; cos is 0 when either gradient is zero, the relative distance NaN when `a` is.
pub fn boundary_stats_on_device(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let sums = crate::kernels::pair_sums(a, b)?;
    let get = |i| -> Result<Tensor> { Ok(sums.get(i)?) };
    let (dot, na, nb, nd) = (get(0)?, get(1)?.sqrt()?, get(2)?.sqrt()?, get(3)?.sqrt()?);
    let zero = dot.zeros_like()?;
    let den = (&na * &nb)?;
    let cos = den.gt(&zero)?.where_cond(&dot.div(&den)?, &zero)?;
    let nan = Tensor::new(f64::NAN, a.device())?;
    let rel = na.gt(&zero)?.where_cond(&nd.div(&na)?, &nan)?;
    Ok(Tensor::stack(&[cos, rel], 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_warms_up_linearly() {
        let c = SgrConfig {
            lambda: 2.0,
            warmup_epochs: 2.0,
            ..SgrConfig::default()
        };
        assert_eq!(c.lambda_at(0.0), 0.0);
        assert!((c.lambda_at(1.0) - 1.0).abs() < 1e-12);
        assert_eq!(c.lambda_at(2.0), 2.0);
        assert_eq!(c.lambda_at(7.5), 2.0);
    }

    #[test]
    fn config_validation_and_names() {
        assert!(SgrConfig {
            lambda: -1.0,
            ..SgrConfig::default()
        }
        .validate()
        .is_err());
        assert!(SgrConfig {
            fd_epsilon: Some(0.0),
            ..SgrConfig::default()
        }
        .validate()
        .is_err());
        let c: SgrConfig =
            serde_json::from_str(r#"{"distance":"cosine-per-sample","direction":"backward"}"#)
                .unwrap();
        assert_eq!(c.distance, Distance::CosinePerSample);
        assert_eq!(c.direction, Direction::Backward);
        assert!(serde_json::from_str::<SgrConfig>(r#"{"lambda_":1}"#).is_err());
    }
}
