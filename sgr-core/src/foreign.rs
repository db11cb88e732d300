//! Bring your own model: layers built with candle-nn on a `VarMap` as [`Stage`]s of a
//! [`crate::network::LocalNetwork`], so that any method, with or without SGR, trains them
//! (docs/library.md).
//!
//! Three things sgr's own layers guarantee have to be checked or handled for foreign ones:
//! * **Decisions.** The finite-difference SGR passes replay the base pass's ReLU masks and
//!   dropout draws, which only layers that take them through the [`Ctx`] record. A stage says how
//!   it decides ([`Decisions`]); [`crate::trainer::Trainer::new`] refuses the SGR ways a stage
//!   would break, naming it and what works instead.
//! * **Buffers.** candle-nn's `BatchNorm` updates its running statistics on every training-mode
//!   call. They are buffers here (by name, [`BUFFER_SUFFIXES`]), and the SGR term puts every
//!   module's buffers back after each of its extra passes.
//! * **Cut graphs.** A fused candle-nn op without backward leaves the tensors before it without
//!   a gradient; the trainer reports such a tensor by name ([`crate::Error::MissingGradient`]).

use std::fmt;

use candle_core::Tensor;
use candle_nn::{ModuleT, VarMap};

use crate::network::{Decisions, Stage};
use crate::nn::{Ctx, Param, ParamKind};
use crate::{Error, Result};

/// Name endings of the tensors that are buffers, not trained: candle-nn's `BatchNorm` keeps its
/// running statistics in the `VarMap` as variables like any weight, and PyTorch's state dicts
/// add `num_batches_tracked`.
pub const BUFFER_SUFFIXES: &[&str] = &["running_mean", "running_var", "num_batches_tracked"];

type ForwardFn = dyn Fn(&Tensor, &mut Ctx) -> Result<Tensor> + Send + Sync;

/// A piece of a user's candle-nn model as a [`Stage`]: its forward function and the tensors of
/// a `VarMap` under one prefix (the `vb.pp(prefix)` it was built with), named as in the
/// `VarMap`, so checkpoints and `VarMap::load` agree.
pub struct ForeignStage {
    name: String,
    forward: Box<ForwardFn>,
    params: Vec<Param>,
    decisions: Decisions,
}

impl ForeignStage {
    /// A candle-nn module (anything `ModuleT`, so every `Module` too), run with
    /// `train = ctx.is_train()`. Its decisions are out of sgr's sight, so it counts as
    /// [`Decisions::Hidden`] until [`ForeignStage::with_decisions`] says otherwise: the
    /// finite-difference SGR ways refuse it unless it is smooth (no ReLU, max-pool or dropout).
    pub fn module<M>(
        name: impl Into<String>,
        module: M,
        vars: &VarMap,
        prefix: &str,
    ) -> Result<Self>
    where
        M: ModuleT + Send + Sync + 'static,
    {
        let forward = move |x: &Tensor, ctx: &mut Ctx| Ok(module.forward_t(x, ctx.is_train())?);
        Ok(Self {
            decisions: Decisions::Hidden,
            ..Self::from_fn(name, vars, prefix, forward)?
        })
    }

    /// A forward function over candle-nn layers that takes every non-smooth or random decision
    /// through the context: `ctx.relu`, `ctx.dropout`, `ctx.drop_path`,
    /// [`crate::nn::pool::max_pool2d`]. It counts as [`Decisions::Replayable`], so every SGR way
    /// trains it; a candle-nn activation or dropout inside breaks that promise silently.
    pub fn from_fn<F>(
        name: impl Into<String>,
        vars: &VarMap,
        prefix: &str,
        forward: F,
    ) -> Result<Self>
    where
        F: Fn(&Tensor, &mut Ctx) -> Result<Tensor> + Send + Sync + 'static,
    {
        let name = name.into();
        let params = varmap_params(vars, prefix)?;
        if params.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "stage `{name}`: the VarMap holds no tensor under the prefix `{prefix}`; build its \
                 layers with `VarBuilder::from_varmap(..).pp(\"{prefix}\")`, or pass the prefix \
                 they were built with"
            )));
        }
        Ok(Self {
            name,
            forward: Box::new(forward),
            params,
            decisions: Decisions::Replayable,
        })
    }

    /// Declares how the stage decides: [`Decisions::Replayable`] for a smooth module (linear
    /// layers, convolutions, GELU, LayerNorm written from primitives), [`Decisions::Random`] for
    /// one with a candle-nn dropout active in training.
    pub fn with_decisions(mut self, decisions: Decisions) -> Self {
        self.decisions = decisions;
        self
    }

    /// The stage's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for ForeignStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForeignStage")
            .field("name", &self.name)
            .field(
                "params",
                &self.params.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .field("decisions", &self.decisions)
            .finish()
    }
}

impl Stage for ForeignStage {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        (self.forward)(x, ctx)
    }

    fn params(&self) -> Vec<Param> {
        self.params.clone()
    }

    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn decisions(&self) -> Decisions {
        self.decisions
    }
}

/// The tensors of `vars` named `prefix` or `prefix.*` (all of them for an empty prefix), sorted
/// by name; those ending in one of [`BUFFER_SUFFIXES`] are buffers.
pub fn varmap_params(vars: &VarMap, prefix: &str) -> Result<Vec<Param>> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| Error::InvalidConfig("the VarMap's lock is poisoned".into()))?;
    let mut params: Vec<Param> = data
        .iter()
        .filter(|(name, _)| {
            prefix.is_empty()
                || name.as_str() == prefix
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
        .map(|(name, var)| Param {
            name: name.clone(),
            var: var.clone(),
            kind: if BUFFER_SUFFIXES.iter().any(|s| name.ends_with(s)) {
                ParamKind::Buffer
            } else {
                ParamKind::Trainable
            },
        })
        .collect();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(params)
}
