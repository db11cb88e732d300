//! A network as an ordered list of stages, cut into K gradient-isolated modules by a
//! [`SplitPlan`]; every module has a [`LocalObjective`] (the last one's is usually the
//! network's classifier loss).

use candle_core::{Tensor, Var};

use crate::method::Objective;
use crate::nn::{Ctx, Param, ParamKind};
use crate::objective::LocalObjective;
use crate::{Error, Result};

/// One piece of a network: a residual block, a stem, a classifier, an auxiliary head.
pub trait Stage: Send + Sync + std::fmt::Debug {
    /// Forward pass.
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor>;
    /// Named tensors of the stage (full names).
    fn params(&self) -> Vec<Param>;
    /// The stage's own name, if it has one: the network's default label for its unit.
    fn name(&self) -> Option<&str> {
        None
    }
    /// How the stage makes its non-smooth and random decisions, which decides the SGR gradient
    /// ways it supports. sgr's own layers take every decision through the [`Ctx`], the default.
    fn decisions(&self) -> Decisions {
        Decisions::Replayable
    }
    /// What the BP-free estimators can do with the stage (docs/bpfree.md): by default nothing,
    /// and a forward estimator refuses a module holding it.
    fn forward_support(&self) -> crate::forward::ForwardSupport<'_> {
        crate::forward::ForwardSupport::None
    }
}

/// How a [`Stage`] makes its non-smooth (ReLU masks, max-pool selections) and random (dropout)
/// decisions. The finite-difference SGR passes evaluate a module near its base point and must
/// take the base pass's decisions there (docs/method.md); the exact way recomputes the pass at
/// the base point itself, with the same seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decisions {
    /// Every decision goes through the [`Ctx`] (recorded and replayed), or there are none: all
    /// SGR ways work.
    #[default]
    Replayable,
    /// Non-smooth decisions the [`Ctx`] does not see, made from the input alone (a foreign
    /// ReLU or max-pool): the exact way works; the finite differences would differentiate
    /// another function and are refused.
    Hidden,
    /// Random decisions the [`Ctx`] does not draw (a foreign dropout in training mode): no SGR
    /// way can reproduce them, so the module trains only without SGR.
    Random,
}

impl Decisions {
    /// What the stage decides out of the context's sight, for error messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Decisions::Replayable => "decisions through the context",
            Decisions::Hidden => "non-smooth decisions the context does not record",
            Decisions::Random => "random decisions the context does not draw",
        }
    }
}

/// Groups `units` body stages into K contiguous modules: module `j` ends after unit `ends[j]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitPlan {
    units: usize,
    ends: Vec<usize>,
}

impl SplitPlan {
    /// A plan from the last unit index of each module (strictly increasing, last = `units - 1`).
    pub fn new(units: usize, ends: Vec<usize>) -> Result<Self> {
        let ok = !ends.is_empty()
            && ends.windows(2).all(|w| w[0] < w[1])
            && ends.last() == Some(&(units.saturating_sub(1)));
        if !ok || units == 0 {
            return Err(Error::InvalidConfig(format!(
                "split ends {ends:?} do not cut {units} units into contiguous non-empty modules"
            )));
        }
        Ok(Self { units, ends })
    }

    /// End-to-end: one module.
    pub fn single(units: usize) -> Result<Self> {
        Self::new(units, vec![units.saturating_sub(1)])
    }

    /// `k` modules as equal in unit count as possible (the first modules get the extra unit).
    pub fn uniform(units: usize, k: usize) -> Result<Self> {
        if k == 0 || k > units {
            return Err(Error::UnsupportedSplit {
                model: format!("a network of {units} blocks"),
                requested: format!("K={k}"),
                supported: format!("uniform splits with 1 <= K <= {units}"),
            });
        }
        let base = units / k;
        let extra = units % k;
        let mut ends = Vec::with_capacity(k);
        let mut end = 0usize;
        for j in 0..k {
            end += base + usize::from(j < extra);
            ends.push(end - 1);
        }
        Self::new(units, ends)
    }

    /// Number of modules K.
    pub fn num_modules(&self) -> usize {
        self.ends.len()
    }

    /// Number of body units.
    pub fn units(&self) -> usize {
        self.units
    }

    /// Last unit (inclusive) of each module.
    pub fn ends(&self) -> &[usize] {
        &self.ends
    }

    /// Unit range of module `k`.
    pub fn range(&self, k: usize) -> std::ops::Range<usize> {
        let start = if k == 0 { 0 } else { self.ends[k - 1] + 1 };
        start..self.ends[k] + 1
    }
}

/// A network cut into modules: body units, the final classifier, and one local objective per
/// module.
#[derive(Debug)]
pub struct LocalNetwork {
    name: String,
    units: Vec<Box<dyn Stage>>,
    classifier: Box<dyn Stage>,
    objectives: Vec<Box<dyn LocalObjective>>,
    plan: SplitPlan,
    num_classes: usize,
    unit_labels: Vec<String>,
    built_for: Option<Objective>,
    /// Per module: whether [`LocalNetwork::release_module`] freed its tensors.
    released: Vec<bool>,
    /// The device, kept once a module is released (the classifier may be gone).
    device: Option<candle_core::Device>,
}

/// What takes the place of a released module's stages and objective: no tensors, and an error
/// naming the module if a pass reaches it.
#[derive(Debug)]
struct Released {
    module: usize,
}

impl Stage for Released {
    fn forward(&self, _x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        Err(Error::Released {
            module: self.module,
        })
    }

    fn params(&self) -> Vec<Param> {
        Vec::new()
    }
}

impl LocalObjective for Released {
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }

    fn loss(
        &self,
        _h: &Tensor,
        _batch: &crate::objective::Batch,
        _ctx: &mut Ctx,
    ) -> Result<crate::objective::ObjectiveOutput> {
        Err(Error::Released {
            module: self.module,
        })
    }
}

impl LocalNetwork {
    /// Assembles a network. `objectives` has one entry per module of `plan`; the last module's
    /// body ends with `classifier`, so its objective sees logits.
    pub fn new(
        name: impl Into<String>,
        units: Vec<Box<dyn Stage>>,
        classifier: Box<dyn Stage>,
        objectives: Vec<Box<dyn LocalObjective>>,
        plan: SplitPlan,
        num_classes: usize,
    ) -> Result<Self> {
        if plan.units() != units.len() || objectives.len() != plan.num_modules() {
            return Err(Error::InvalidConfig(format!(
                "network with {} units and {} objectives does not match a plan of {} units and \
                 K={}",
                units.len(),
                objectives.len(),
                plan.units(),
                plan.num_modules()
            )));
        }
        let unit_labels = units
            .iter()
            .enumerate()
            .map(|(i, u)| u.name().map_or_else(|| format!("unit{i}"), str::to_string))
            .collect();
        let released = vec![false; plan.num_modules()];
        Ok(Self {
            name: name.into(),
            units,
            classifier,
            objectives,
            plan,
            num_classes,
            unit_labels,
            built_for: None,
            released,
            device: None,
        })
    }

    /// Records which objective the network's heads were built for, so that a trainer given
    /// another method's objective refuses it ([`crate::trainer::Trainer::new`]) instead of
    /// training the wrong heads. Builders of the model zoo set it; a network assembled by hand
    /// may leave it unset.
    pub fn with_objective(mut self, objective: Objective) -> Self {
        self.built_for = Some(objective);
        self
    }

    /// The objective the heads were built for, when the builder recorded it.
    pub fn built_for(&self) -> Option<Objective> {
        self.built_for
    }

    /// The stages of module `k` with their labels: its body units, then the classifier for the
    /// last module (labelled by its [`Stage::name`], else `classifier`).
    pub fn module_stages(&self, k: usize) -> Vec<(&str, &dyn Stage)> {
        let mut v: Vec<(&str, &dyn Stage)> = self
            .plan
            .range(k)
            .map(|i| (self.unit_label(i), self.units[i].as_ref()))
            .collect();
        if k + 1 == self.num_modules() {
            let c = self.classifier.as_ref();
            v.push((c.name().unwrap_or("classifier"), c));
        }
        v
    }

    /// Names the units for reports (`stem`, `layer1.0`, `blocks.3`, ...); one label per unit.
    pub fn with_unit_labels(mut self, labels: Vec<String>) -> Result<Self> {
        if labels.len() != self.units.len() {
            return Err(Error::InvalidConfig(format!(
                "{} unit labels for {} units",
                labels.len(),
                self.units.len()
            )));
        }
        self.unit_labels = labels;
        Ok(self)
    }

    /// The label of unit `i` (its [`Stage::name`], else `unit<i>`, unless the builder named it).
    pub fn unit_label(&self, i: usize) -> &str {
        self.unit_labels.get(i).map(String::as_str).unwrap_or("?")
    }

    /// Model name, e.g. `resnet32`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The split plan.
    pub fn plan(&self) -> &SplitPlan {
        &self.plan
    }

    /// Number of modules K.
    pub fn num_modules(&self) -> usize {
        self.plan.num_modules()
    }

    /// The device of the network's tensors.
    pub fn device(&self) -> Result<candle_core::Device> {
        if let Some(d) = &self.device {
            return Ok(d.clone());
        }
        let p = self.classifier.params();
        let first = p.first().ok_or_else(|| {
            Error::InvalidConfig("the classifier has no tensors to tell the device".into())
        })?;
        Ok(first.var.device().clone())
    }

    /// Number of classes of the classifier.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Whole-network forward pass to logits (end-to-end BP and evaluation). In evaluation mode
    /// each unit's output is detached: the weights are variables, so candle would otherwise
    /// keep every intermediate of the whole network alive until the logits are dropped (at
    /// batch 256, 1.8 GB of ResNet-32 activations instead of one block's).
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.forward_modules(0..self.num_modules(), x, ctx)
    }

    /// The bodies of `modules` in turn, as [`LocalNetwork::forward`] runs them (detached after
    /// each unit in evaluation mode): from `x`, the input of the first, to the output of the
    /// last (logits when it is the last module). Running the stages of a pipeline one after
    /// the other on their own ranks gives [`LocalNetwork::forward`]'s bits.
    pub fn forward_modules(
        &self,
        modules: std::ops::Range<usize>,
        x: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let k = self.num_modules();
        if modules.is_empty() || modules.end > k {
            return Err(Error::InvalidConfig(format!(
                "modules {modules:?} are not a range of the network's K={k} modules"
            )));
        }
        let units = self.plan.range(modules.start).start..self.plan.range(modules.end - 1).end;
        let mut h = x.clone();
        for u in &self.units[units] {
            h = u.forward(&h, ctx)?;
            if !ctx.is_train() {
                h = h.detach();
            }
        }
        if modules.end == k {
            h = self.classifier.forward(&h, ctx)?;
        }
        Ok(h)
    }

    /// The body of module `k`: its units, plus the classifier for the last module (so the last
    /// module's body returns logits).
    pub fn module_body(&self, k: usize, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut h = x.clone();
        for u in &self.units[self.plan.range(k)] {
            h = u.forward(&h, ctx)?;
        }
        if k + 1 == self.num_modules() {
            h = self.classifier.forward(&h, ctx)?;
        }
        Ok(h)
    }

    /// The local objective of module `k`.
    pub fn module_objective(&self, k: usize) -> Result<&dyn LocalObjective> {
        self.objectives
            .get(k)
            .map(|o| o.as_ref())
            .ok_or_else(|| self.no_module(k))
    }

    /// Replaces the objective of module `k`, returning the old one. Build the new objective's
    /// layers with the network's device and dtype; optimizers built before see the old
    /// parameters, so replace objectives before building a trainer.
    pub fn set_objective(
        &mut self,
        k: usize,
        objective: Box<dyn LocalObjective>,
    ) -> Result<Box<dyn LocalObjective>> {
        let err = self.no_module(k);
        let slot = self.objectives.get_mut(k).ok_or(err)?;
        Ok(std::mem::replace(slot, objective))
    }

    fn no_module(&self, k: usize) -> Error {
        Error::InvalidConfig(format!(
            "module {k} does not exist: the network has K={} modules",
            self.num_modules()
        ))
    }

    /// Named tensors of module `k`: its body units, the classifier for the last module, then
    /// its objective's.
    pub fn module_params(&self, k: usize) -> Vec<Param> {
        let mut p = self.module_body_params(k);
        p.extend(self.objectives[k].params());
        p
    }

    /// Named tensors of module `k`'s body: its units, and the classifier for the last module.
    /// [`LocalNetwork::params`] lists every module's body in turn, then every objective's.
    pub fn module_body_params(&self, k: usize) -> Vec<Param> {
        let mut p: Vec<Param> = self.units[self.plan.range(k)]
            .iter()
            .flat_map(|u| u.params())
            .collect();
        if k + 1 == self.num_modules() {
            p.extend(self.classifier.params());
        }
        p
    }

    /// Frees module `k`'s tensors (weights and buffers of its units, of the classifier for the
    /// last module, and of its objective): a rank of a distributed run keeps only the modules
    /// it owns (docs/parallel.md, "Across processes"). The module then lists no tensors, and a
    /// pass that reaches it is [`Error::Released`]; it cannot be restored. Tensors still shared
    /// elsewhere (an optimizer's copy of the parameters) live on until those are dropped.
    pub fn release_module(&mut self, k: usize) -> Result<()> {
        if k >= self.num_modules() {
            return Err(self.no_module(k));
        }
        if self.released[k] {
            return Ok(());
        }
        if self.device.is_none() {
            self.device = Some(self.device()?);
        }
        for i in self.plan.range(k) {
            self.units[i] = Box::new(Released { module: k });
        }
        if k + 1 == self.num_modules() {
            self.classifier = Box::new(Released { module: k });
        }
        self.objectives[k] = Box::new(Released { module: k });
        self.released[k] = true;
        Ok(())
    }

    /// Whether this network holds module `k`'s tensors (not [`LocalNetwork::release_module`]d).
    pub fn holds_module(&self, k: usize) -> bool {
        self.released.get(k).is_some_and(|r| !r)
    }

    /// Trainable variables of module `k`.
    pub fn module_trainable(&self, k: usize) -> Vec<Param> {
        self.module_params(k)
            .into_iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .collect()
    }

    /// Every named tensor: backbone first (torchvision order), then the objectives' in module
    /// order. Released modules ([`LocalNetwork::release_module`]) list none.
    pub fn params(&self) -> Vec<Param> {
        let mut p: Vec<Param> = self.units.iter().flat_map(|u| u.params()).collect();
        p.extend(self.classifier.params());
        for o in &self.objectives {
            p.extend(o.params());
        }
        p
    }

    /// Every trainable variable.
    pub fn trainable(&self) -> Vec<Param> {
        self.params()
            .into_iter()
            .filter(|p| p.kind == ParamKind::Trainable)
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(|p| p.var.elem_count()).sum()
    }
}

/// Collects the gradients of the trainable `params` from a gradient store, in order. A
/// trainable tensor the graph did not reach is [`Error::MissingGradient`]: its optimizer would
/// otherwise step on zeros without a word.
pub fn collect_grads_checked(
    store: &candle_core::backprop::GradStore,
    params: &[Param],
) -> Result<Vec<Tensor>> {
    params
        .iter()
        .filter(|p| p.kind == ParamKind::Trainable)
        .map(|p| match store.get(p.var.as_tensor()) {
            Some(g) => Ok(g.detach()),
            None => Err(Error::MissingGradient {
                tensor: p.name.clone(),
            }),
        })
        .collect()
}

/// Collects the gradients of `vars` from a gradient store; a variable the graph did not reach
/// gets zeros. For the SGR term's passes, whose second-order graph may legitimately miss a
/// tensor the base pass reached ([`collect_grads_checked`] checks the base pass).
pub fn collect_grads(
    store: &candle_core::backprop::GradStore,
    vars: &[Var],
) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.detach()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}
