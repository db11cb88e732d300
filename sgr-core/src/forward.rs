//! BP-free local learning (docs/bpfree.md): forward-gradient estimators of a module's local
//! gradient (Ren et al., ICLR 2023), and the SGR term estimated without back-propagation.
//!
//! No gradient is back-propagated through a perturbable layer. A module is a run of
//! perturbable stages ([`ForwardMode`]) followed by a read-out tail (pooling, linear
//! classifiers: [`ForwardSupport::Readout`]) and the module's loss head; the tail and the head
//! get their exact local gradients, which also give the exact gradient ∂L/∂h at the output h of
//! the last perturbable stage. Forward-mode tangents (exact tangent rules, no autodiff) then
//! give the directional derivative of each local-loss copy: one scalar per (example, patch,
//! group) of h, `Σ_{c ∈ group} ∂L/∂h · ḣ`.
//!
//! The SGR term ‖b_k − a_{k−1}‖² (b_k = ∂L_k/∂h_{k−1}, a_{k−1} = ∂L_{k−1}/∂h_{k−1}) is estimated
//! along a Gaussian direction u on h_{k−1}, shared by both sides: ⟨a, u⟩ is exact (a is the
//! previous module's exact head gradient), ⟨b, u⟩ is one tangent pass, and the parameter
//! gradient 2B·⟨b − a, u⟩·∇_θ⟨b, u⟩ takes ∇_θ⟨b, u⟩ as the central difference of the module's
//! forward-gradient estimates at h ± εu with common noise ([`sgr_term`]).

use candle_core::{DType, Device, Tensor, Var, D};

use crate::ctx::{Ctx, Decision};
use crate::method::Estimator;
use crate::network::{collect_grads_checked, LocalNetwork, Stage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::nn::{Param, ParamKind};
use crate::objective::Batch;
use crate::{Error, Result};

/// What the BP-free estimators can do with a [`Stage`].
#[derive(Clone, Copy)]
pub enum ForwardSupport<'a> {
    /// Nothing: a module holding the stage cannot train without back-propagation.
    None,
    /// Its layers can be perturbed and their gradients estimated.
    Perturbable(&'a dyn ForwardMode),
    /// A read-out (pooling, a linear classifier) after the module's perturbable stages, trained
    /// by its exact local gradient, like the loss heads.
    Readout,
}

impl std::fmt::Debug for ForwardSupport<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForwardSupport::None => "None",
            ForwardSupport::Perturbable(_) => "Perturbable",
            ForwardSupport::Readout => "Readout",
        })
    }
}

/// What a forward-mode pass perturbs.
#[derive(Debug, Clone, Copy)]
pub enum Perturbation<'a> {
    /// Nothing (the tangent comes from the input alone).
    None,
    /// Noise added to each layer's normalised pre-activation, in the order and shapes of
    /// [`ForwardMode::activity_shapes`] (forward-activity).
    Activity(&'a [Tensor]),
    /// A tangent of each trainable tensor, in [`Stage::params`] order (forward-weight).
    Weight(&'a [Tensor]),
}

/// What a forward-mode pass keeps for [`ForwardMode::estimate`]: the stage's own choice of
/// tensors (layer inputs, normalised outputs, ReLU masks).
#[derive(Debug, Default)]
pub struct TangentRecord {
    /// The kept tensors, in an order only the stage interprets.
    pub tensors: Vec<Tensor>,
}

/// The result of [`ForwardMode::forward_tangent`].
#[derive(Debug)]
pub struct TangentPass {
    /// The output (no autodiff graph).
    pub output: Tensor,
    /// Its tangent, `None` when nothing was perturbed.
    pub tangent: Option<Tensor>,
    /// What the gradient estimate needs.
    pub record: TangentRecord,
}

/// A stage the forward estimators can train: exact tangent rules for its forward pass, and the
/// weight-gradient estimates from the directional derivatives of the local-loss copies.
///
/// The output is `(batch, patches, channels)` with [`ForwardMode::groups`] channel groups: the
/// module's local loss has one copy per (example, patch, group).
pub trait ForwardMode: Send + Sync {
    /// Channel groups of the output.
    fn groups(&self) -> usize;

    /// Shapes of the activity noise of each perturbed layer, for an input of shape `input`.
    fn activity_shapes(&self, input: &[usize]) -> Result<Vec<Vec<usize>>>;

    /// The forward pass without autodiff, with the tangent of the output given the input's
    /// `tangent` and the `perturbation`. The ReLU masks follow `ctx` (recorded or replayed as
    /// [`Ctx::relu_mask`] says), in the order of the stage's [`Stage::forward`].
    fn forward_tangent(
        &self,
        x: &Tensor,
        tangent: Option<&Tensor>,
        perturbation: Perturbation<'_>,
        ctx: &mut Ctx,
    ) -> Result<TangentPass>;

    /// Gradient estimates of the stage's trainable tensors ([`Stage::params`] order), given the
    /// directional derivatives `jvp` `(batch, patches, groups)` of the module's local-loss copies
    /// along the `perturbation` of the pass that made `record`.
    fn estimate(
        &self,
        record: &TangentRecord,
        jvp: &Tensor,
        perturbation: Perturbation<'_>,
    ) -> Result<Vec<Tensor>>;
}

/// ε of the parameter-free LayerNorm (as Ren et al.'s code).
pub const LN_EPS: f64 = 1e-5;

/// Parameter-free LayerNorm over the last axis: `(y, r)` with `y = (s − mean s)·r` and
/// `r = 1/√(var s + ε)` (kept as `(..., 1)`). Differentiable by candle (twice), so the same
/// function serves back-propagation and the tangent rules.
pub fn layer_norm(s: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = s.broadcast_sub(&s.mean_keepdim(D::Minus1)?)?;
    let r = ((c.sqr()?.mean_keepdim(D::Minus1)? + LN_EPS)?.sqrt()?).recip()?;
    Ok((c.broadcast_mul(&r)?, r))
}

/// The LayerNorm's Jacobian applied to `v`: `r·(v − mean v − y·mean(y·v))`. The Jacobian is
/// symmetric, so this is both the tangent rule (`v` = ṡ) and the vector-Jacobian product
/// (`v` = ∂L/∂y).
pub fn layer_norm_jacobian(y: &Tensor, r: &Tensor, v: &Tensor) -> Result<Tensor> {
    let centred = v.broadcast_sub(&v.mean_keepdim(D::Minus1)?)?;
    let proj = (y * v)?.mean_keepdim(D::Minus1)?;
    Ok((centred - y.broadcast_mul(&proj)?)?.broadcast_mul(r)?)
}

/// Standard normal entries from `seed` (ChaCha8 and Box-Muller, both outputs of each pair), in
/// chunks of [`NOISE_CHUNK`] drawn in parallel, each from its own seed: identical on every
/// platform, device and thread count. A plain tensor, not a variable: candle would otherwise
/// record every operation on the noise.
pub fn gaussian(seed: u64, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    let mut v = vec![0f32; n];
    v.par_chunks_mut(NOISE_CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(sub_seed(seed, i as u64));
            for pair in chunk.chunks_mut(2) {
                // u1 in (0, 1]
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
                pair[0] = (r * c) as f32;
                if let Some(second) = pair.get_mut(1) {
                    *second = (r * s) as f32;
                }
            }
        });
    Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
}

/// Normals per independently seeded chunk of [`gaussian`].
pub const NOISE_CHUNK: usize = 1 << 14;

/// A seed derived from `seed` for draw `tag` (SplitMix64).
pub fn sub_seed(seed: u64, tag: u64) -> u64 {
    let mut z = seed
        ^ tag
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draw tags: noise pass `m` uses `m`; the SGR draws use these.
const TAG_SGR_DIRECTION: u64 = 1 << 40;
const TAG_SGR_NOISE: u64 = (1 << 40) + 1;

/// The directional derivative of each local-loss copy: `Σ_{c ∈ g} grad·tangent` over the
/// channels of group `g`, `(batch, patches, groups)` from two `(batch, patches, channels)`.
pub fn copy_jvp(grad: &Tensor, tangent: &Tensor, groups: usize) -> Result<Tensor> {
    let (b, p, c) = grad.dims3()?;
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::InvalidConfig(format!(
            "{c} channels do not split into {groups} groups"
        )));
    }
    Ok((grad * tangent)?
        .reshape((b, p, groups, c / groups))?
        .sum(D::Minus1)?)
}

/// One perturbable stage of a module, with its trainable tensors.
struct Perturbable<'a> {
    mode: &'a dyn ForwardMode,
    params: Vec<Param>,
}

/// A module as the estimators see it: perturbable stages, then the read-out tail.
struct Layout<'a> {
    perturbable: Vec<Perturbable<'a>>,
    tail: Vec<&'a dyn Stage>,
}

fn trainable(stage: &dyn Stage) -> Vec<Param> {
    stage
        .params()
        .into_iter()
        .filter(|p| p.kind == ParamKind::Trainable)
        .collect()
}

fn layout<'a>(net: &'a LocalNetwork, k: usize, estimator: Estimator) -> Result<Layout<'a>> {
    let stages = net.module_stages(k);
    let last = k + 1 == net.num_modules();
    let mut l = Layout {
        perturbable: Vec::new(),
        tail: Vec::new(),
    };
    for (label, stage) in stages {
        match stage.forward_support() {
            ForwardSupport::Perturbable(mode) if l.tail.is_empty() => {
                l.perturbable.push(Perturbable {
                    mode,
                    params: trainable(stage),
                })
            }
            ForwardSupport::Readout if last => l.tail.push(stage),
            support => {
                let what = match support {
                    ForwardSupport::None => "a layer it cannot perturb".to_string(),
                    ForwardSupport::Readout => "a read-out before the last module".to_string(),
                    ForwardSupport::Perturbable(_) => "a perturbable layer after a read-out".into(),
                };
                return Err(Error::InvalidConfig(format!(
                    "estimator `{estimator}` cannot train `{label}` of {} (module {k}): it is \
                     {what}; the forward estimators train LocalMixer blocks (models \
                     localmixer-*), cut anywhere between blocks; use --estimator backprop for \
                     other models",
                    net.name()
                )));
            }
        }
    }
    Ok(l)
}

/// Checks that every module of `net` can be trained by `estimator` (perturbable stages, then a
/// read-out only in the last module), naming the first layer that cannot.
pub fn check_network(net: &LocalNetwork, estimator: Estimator) -> Result<()> {
    if !estimator.is_bp_free() {
        return Ok(());
    }
    for k in 0..net.num_modules() {
        layout(net, k, estimator)?;
    }
    Ok(())
}

/// Whether module `k` has perturbable stages (otherwise it is a read-out, trained exactly).
pub fn has_perturbable(net: &LocalNetwork, k: usize) -> bool {
    net.module_stages(k)
        .iter()
        .any(|(_, s)| matches!(s.forward_support(), ForwardSupport::Perturbable(_)))
}

/// The forward-gradient step of one module at its input.
#[derive(Debug)]
pub struct ForwardPass {
    /// Local loss, an `f64` scalar on the device.
    pub loss: Tensor,
    /// Class logits of the objective (detached), when it classifies.
    pub logits: Option<Tensor>,
    /// Gradient estimates of the module's trainable tensors (the perturbable stages'), exact
    /// gradients of the read-out and the head, in [`LocalNetwork::module_trainable`] order.
    pub grads: Vec<Tensor>,
    /// The module's output (the last perturbable stage's), detached.
    pub output: Tensor,
    /// ∂L/∂output, exact (the head's gradient): a_k for the next boundary.
    pub output_grad: Tensor,
    /// The ReLU decisions of the pass, when recorded.
    pub masks: Vec<Decision>,
}

/// What one evaluation of the estimator at a point produced.
struct Estimate {
    loss: Tensor,
    logits: Option<Tensor>,
    output: Tensor,
    output_grad: Tensor,
    /// Per perturbable stage, its estimates (summed over passes, not yet averaged).
    body: Vec<Vec<Tensor>>,
    /// Exact gradients of the tail stages' and the objective's trainable tensors, in order.
    tail: Vec<Tensor>,
    masks: Vec<Decision>,
}

/// How the passes of an [`Estimate`] take their ReLU decisions.
#[derive(Clone, Copy)]
enum Masks<'a> {
    Fresh { record: bool },
    Replay(&'a [Decision]),
}

impl<'a> Masks<'a> {
    /// Replay `recorded`; with nothing recorded (no ReLU), decide afresh.
    fn replay(recorded: &'a [Decision]) -> Self {
        if recorded.is_empty() {
            Masks::Fresh { record: false }
        } else {
            Masks::Replay(recorded)
        }
    }

    fn ctx(&self, seed: u64) -> Ctx {
        match self {
            Masks::Fresh { record: true } => Ctx::train_recording().with_seed(seed),
            Masks::Fresh { record: false } => Ctx::train().with_seed(seed),
            Masks::Replay(m) => Ctx::train_replaying(m.to_vec()).with_seed(seed),
        }
    }
}

fn draw_perturbation(
    estimator: Estimator,
    p: &Perturbable<'_>,
    input: &Tensor,
    seed: u64,
) -> Result<Vec<Tensor>> {
    let shapes: Vec<Vec<usize>> = match estimator {
        Estimator::ForwardActivity => p.mode.activity_shapes(input.dims())?,
        Estimator::ForwardWeight => p.params.iter().map(|q| q.var.dims().to_vec()).collect(),
        Estimator::Backprop => Vec::new(),
    };
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| gaussian(sub_seed(seed, i as u64), s, input.device(), input.dtype()))
        .collect()
}

fn perturbation<'a>(estimator: Estimator, noise: &'a [Tensor]) -> Perturbation<'a> {
    match estimator {
        Estimator::ForwardActivity => Perturbation::Activity(noise),
        Estimator::ForwardWeight => Perturbation::Weight(noise),
        Estimator::Backprop => Perturbation::None,
    }
}

/// Runs the perturbable stages on `x` with `tangent` and a perturbation drawn from `seed` for
/// each stage; returns the output, its tangent and each stage's (record, noise).
#[allow(clippy::type_complexity)]
fn tangent_chain(
    l: &Layout<'_>,
    x: &Tensor,
    tangent: Option<&Tensor>,
    estimator: Estimator,
    seed: Option<u64>,
    ctx: &mut Ctx,
) -> Result<(Tensor, Option<Tensor>, Vec<(TangentRecord, Vec<Tensor>)>)> {
    let mut h = x.detach();
    let mut t = tangent.map(|t| t.detach());
    let mut kept = Vec::with_capacity(l.perturbable.len());
    for (i, p) in l.perturbable.iter().enumerate() {
        let noise = match seed {
            Some(s) => draw_perturbation(estimator, p, &h, sub_seed(s, 1000 + i as u64))?,
            None => Vec::new(),
        };
        let pert = if seed.is_some() {
            perturbation(estimator, &noise)
        } else {
            Perturbation::None
        };
        let pass = p.mode.forward_tangent(&h, t.as_ref(), pert, ctx)?;
        h = pass.output;
        t = pass.tangent;
        kept.push((pass.record, noise));
    }
    Ok((h, t, kept))
}

/// The read-out tail and the head at `h`, by back-propagation through them alone:
/// (loss, logits, ∂L/∂h, exact gradients of the tail's and the objective's tensors).
#[allow(clippy::type_complexity)]
fn tail_pass(
    net: &LocalNetwork,
    k: usize,
    l: &Layout<'_>,
    batch: &Batch,
    h: &Tensor,
    seed: u64,
) -> Result<(Tensor, Option<Tensor>, Tensor, Vec<Tensor>)> {
    let hv = Var::from_tensor(&h.detach())?;
    let mut ctx = Ctx::train().with_seed(sub_seed(seed, 999));
    let mut y = hv.as_tensor().clone();
    for s in &l.tail {
        y = s.forward(&y, &mut ctx)?;
    }
    let objective = net.module_objective(k)?;
    let o = objective.loss(&y, batch, &mut ctx)?;
    let loss = o.loss.detach().to_dtype(DType::F64)?;
    let store = o.loss.backward()?;
    let grad_h = store
        .get(hv.as_tensor())
        .map(|g| g.detach())
        .ok_or_else(|| Error::Internal(format!("module {k}: the loss does not depend on h")))?;
    let mut tail = Vec::new();
    for s in &l.tail {
        tail.extend(collect_grads_checked(&store, &s.params())?);
    }
    tail.extend(collect_grads_checked(&store, &objective.params())?);
    Ok((loss, o.logits.map(|t| t.detach()), grad_h, tail))
}

/// The estimator at input `x`: `passes` draws from `seed`, each copy's directional derivative
/// scaled by `weights[example]` when given.
#[allow(clippy::too_many_arguments)]
fn estimate_at(
    net: &LocalNetwork,
    k: usize,
    l: &Layout<'_>,
    batch: &Batch,
    x: &Tensor,
    estimator: Estimator,
    passes: usize,
    seed: u64,
    masks: Masks<'_>,
    weights: Option<&Tensor>,
) -> Result<Estimate> {
    // Pass 0 gives the output (the noise touches only the tangents) and the decisions every
    // later pass replays.
    let mut ctx = masks.ctx(seed);
    let first = tangent_chain(l, x, None, estimator, Some(sub_seed(seed, 0)), &mut ctx)?;
    let recorded = ctx.take_masks();
    let replay: &[Decision] = match masks {
        Masks::Replay(m) => m,
        Masks::Fresh { .. } => &recorded,
    };
    let h = first.0.clone();
    let (loss, logits, grad_h, tail) = tail_pass(net, k, l, batch, &h, seed)?;
    let groups = l.perturbable.last().map_or(1, |p| p.mode.groups());
    let mut body: Vec<Vec<Tensor>> = vec![Vec::new(); l.perturbable.len()];
    let mut next = Some(first);
    for m in 0..passes {
        let (_, t, kept) = match next.take() {
            Some(p) => p,
            None => {
                let mut ctx = Masks::replay(replay).ctx(seed);
                tangent_chain(
                    l,
                    x,
                    None,
                    estimator,
                    Some(sub_seed(seed, m as u64)),
                    &mut ctx,
                )?
            }
        };
        let t = t.ok_or_else(|| Error::Internal("a perturbed pass has no tangent".into()))?;
        let mut jvp = copy_jvp(&grad_h, &t, groups)?;
        if let Some(w) = weights {
            let b = jvp.dim(0)?;
            jvp = jvp.broadcast_mul(&w.to_dtype(jvp.dtype())?.reshape((b, 1, 1))?)?;
        }
        for ((p, (record, noise)), acc) in l.perturbable.iter().zip(&kept).zip(&mut body) {
            let g = p
                .mode
                .estimate(record, &jvp, perturbation(estimator, noise))?;
            if g.len() != p.params.len() {
                return Err(Error::Internal(format!(
                    "{} estimates for {} tensors",
                    g.len(),
                    p.params.len()
                )));
            }
            *acc = if acc.is_empty() {
                g
            } else {
                acc.iter()
                    .zip(g)
                    .map(|(a, g)| Ok((a + g)?))
                    .collect::<Result<_>>()?
            };
        }
    }
    Ok(Estimate {
        loss,
        logits,
        output: h,
        output_grad: grad_h,
        body,
        tail,
        masks: recorded,
    })
}

/// Body estimates (scaled by `body_scale`) then tail gradients (scaled by `tail_scale`), in the
/// module's trainable order.
fn assemble(
    body: Vec<Vec<Tensor>>,
    tail: Vec<Tensor>,
    body_scale: f64,
    tail_scale: Option<&Tensor>,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::new();
    for g in body.into_iter().flatten() {
        out.push((g * body_scale)?);
    }
    for g in tail {
        out.push(match tail_scale {
            Some(s) => g.broadcast_mul(&s.to_dtype(g.dtype())?)?,
            None => g,
        });
    }
    Ok(out)
}

/// Module `k`'s forward-gradient step at input `x` (detached): the estimator's gradient for
/// every perturbable layer (averaged over `passes` draws from `seed`), exact gradients for the
/// read-out and the head. `record` keeps the ReLU decisions for the SGR term.
#[allow(clippy::too_many_arguments)]
pub fn module_pass(
    net: &LocalNetwork,
    k: usize,
    batch: &Batch,
    x: &Tensor,
    estimator: Estimator,
    passes: usize,
    seed: u64,
    record: bool,
) -> Result<ForwardPass> {
    let l = layout(net, k, estimator)?;
    if passes == 0 {
        return Err(Error::InvalidConfig("fg_passes must be at least 1".into()));
    }
    let e = estimate_at(
        net,
        k,
        &l,
        batch,
        x,
        estimator,
        passes,
        seed,
        Masks::Fresh { record },
        None,
    )?;
    let grads = assemble(e.body, e.tail, 1.0 / passes as f64, None)?;
    Ok(ForwardPass {
        loss: e.loss,
        logits: e.logits,
        grads,
        output: e.output,
        output_grad: e.output_grad,
        masks: e.masks,
    })
}

/// The directional derivatives of a boundary along a Gaussian direction u on module k's input.
#[derive(Debug)]
pub struct BoundaryProbe {
    /// The direction u, shaped like the input.
    pub direction: Tensor,
    /// Per example, ⟨a_{k−1}, u⟩ (exact).
    pub a_u: Tensor,
    /// Per example, ⟨b_k, u⟩ (one tangent pass).
    pub b_u: Tensor,
}

impl BoundaryProbe {
    /// `[cos, rel]` estimated from the probe, `f64` on the device:
    /// Σ⟨a,u⟩⟨b,u⟩ / √(Σ⟨a,u⟩² Σ⟨b,u⟩²) and √(Σ⟨a−b,u⟩² / Σ⟨a,u⟩²) over the batch (each sum
    /// estimates a·b, ‖a‖², ‖b‖², ‖a − b‖² without bias; the ratios are consistent estimates).
    pub fn stats(&self) -> Result<Tensor> {
        let a = self.a_u.to_dtype(DType::F64)?;
        let b = self.b_u.to_dtype(DType::F64)?;
        let ab = (&a * &b)?.sum_all()?;
        let aa = a.sqr()?.sum_all()?;
        let bb = b.sqr()?.sum_all()?;
        let dd = (&a - &b)?.sqr()?.sum_all()?;
        let cos = ab.div(&((&aa * &bb)? + 1e-300)?.sqrt()?)?;
        let rel = dd.div(&(aa + 1e-300)?)?.sqrt()?;
        Ok(Tensor::stack(&[cos, rel], 0)?)
    }

    /// The SGR distance D = B·Σ_b ‖b_b − a_b‖² estimated as B·Σ_b ⟨b_b − a_b, u_b⟩², without
    /// bias (`f64` scalar).
    pub fn distance(&self) -> Result<Tensor> {
        let b = self.b_u.dim(0)? as f64;
        let d = (&self.b_u - &self.a_u)?.to_dtype(DType::F64)?;
        Ok((d.sqr()?.sum_all()? * b)?)
    }

    /// ∂D/∂⟨b_b, u_b⟩ per example: 2B·⟨b_b − a_b, u_b⟩.
    fn weights(&self) -> Result<Tensor> {
        let b = self.b_u.dim(0)? as f64;
        Ok(((&self.b_u - &self.a_u)? * (2.0 * b))?)
    }
}

fn per_example_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a * b)?.flatten_from(1)?.sum(1)?)
}

/// Probes boundary k−1|k along u drawn from `seed`: ⟨a_{k−1}, u⟩ from the previous module's
/// exact output gradient `prev_grad`, ⟨b_k, u⟩ from one tangent pass of module k at `x` with
/// input tangent u (the decisions of `pass` replayed).
pub fn boundary_probe(
    net: &LocalNetwork,
    k: usize,
    x: &Tensor,
    prev_grad: &Tensor,
    pass: &ForwardPass,
    seed: u64,
) -> Result<BoundaryProbe> {
    let l = layout(net, k, Estimator::ForwardActivity)?;
    let u = gaussian(
        sub_seed(seed, TAG_SGR_DIRECTION),
        x.dims(),
        x.device(),
        x.dtype(),
    )?;
    let mut ctx = Masks::replay(&pass.masks).ctx(seed);
    let (_, t, _) = tangent_chain(&l, x, Some(&u), Estimator::Backprop, None, &mut ctx)?;
    let t = t.ok_or_else(|| Error::Internal("an input tangent was lost".into()))?;
    Ok(BoundaryProbe {
        a_u: per_example_dot(prev_grad, &u)?,
        b_u: per_example_dot(&pass.output_grad, &t)?,
        direction: u,
    })
}

/// The SGR term's gradient for module k without back-propagation, not yet multiplied by λ.
///
/// With c_b = 2B·⟨b_b − a_b, u_b⟩ ([`BoundaryProbe`]) and ĝ(h) the estimator at input h with
/// its noise drawn once and shared, each perturbable layer gets
/// `[ĝ_c(x + εu) − ĝ_c(x − εu)] / 2ε`, where ĝ_c weights example b's copies by c_b; the tail
/// and the head get `Σ_b c_b · [g(x + εu) − g(x − εu)] / 2ε` of their exact gradients. Both
/// are unbiased estimates of ∇_θ D for unbiased ĝ, up to the O(ε²) of the difference
/// (docs/bpfree.md, "SGR without back-propagation").
#[allow(clippy::too_many_arguments)]
pub fn sgr_term(
    net: &LocalNetwork,
    k: usize,
    batch: &Batch,
    x: &Tensor,
    probe: &BoundaryProbe,
    pass: &ForwardPass,
    estimator: Estimator,
    passes: usize,
    epsilon: f64,
    seed: u64,
) -> Result<Vec<Tensor>> {
    let l = layout(net, k, estimator)?;
    let c = probe.weights()?;
    let total = c.to_dtype(DType::F64)?.sum_all()?;
    let noise_seed = sub_seed(seed, TAG_SGR_NOISE);
    let mut sides = Vec::with_capacity(2);
    for sign in [1.0, -1.0] {
        let xs = (x + (&probe.direction * (sign * epsilon))?)?;
        let masks = Masks::replay(&pass.masks);
        let e = estimate_at(
            net,
            k,
            &l,
            batch,
            &xs,
            estimator,
            passes,
            noise_seed,
            masks,
            Some(&c),
        )?;
        sides.push(assemble(e.body, e.tail, 1.0, None)?);
    }
    let minus = sides.pop().unwrap_or_default();
    let plus = sides.pop().unwrap_or_default();
    let n_body: usize = l.perturbable.iter().map(|p| p.params.len()).sum();
    let scale = 1.0 / (2.0 * epsilon);
    plus.into_iter()
        .zip(minus)
        .enumerate()
        .map(|(i, (p, m))| {
            let d = ((p - m)? * scale)?;
            Ok(if i < n_body {
                (d / passes as f64)?
            } else {
                d.broadcast_mul(&total.to_dtype(d.dtype())?)?
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_jacobian_matches_finite_differences() {
        let d = Device::Cpu;
        let s = gaussian(1, &[3, 8], &d, DType::F64).unwrap();
        let v = gaussian(2, &[3, 8], &d, DType::F64).unwrap();
        let (y, r) = layer_norm(&s).unwrap();
        let jv = layer_norm_jacobian(&y, &r, &v).unwrap();
        let eps = 1e-6;
        let (yp, _) = layer_norm(&(&s + (&v * eps).unwrap()).unwrap()).unwrap();
        let (ym, _) = layer_norm(&(&s - (&v * eps).unwrap()).unwrap()).unwrap();
        let fd = ((yp - ym).unwrap() / (2.0 * eps)).unwrap();
        let err = (jv - fd).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f64>().unwrap() < 1e-7);
    }

    #[test]
    fn sub_seeds_differ_and_repeat() {
        assert_eq!(sub_seed(5, 1), sub_seed(5, 1));
        assert_ne!(sub_seed(5, 1), sub_seed(5, 2));
        assert_ne!(sub_seed(5, 1), sub_seed(6, 1));
    }
}
