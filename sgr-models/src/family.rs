//! One build path for every family of the zoo (docs/models.md, "Families").
//!
//! A family writes what is its own: the architecture's presets and checks, the layers of its
//! backbone, the channels at each cut and its auxiliary heads ([`ModelFamily`]). [`build`] does
//! the rest the same way for all of them: the split plan, the local objectives on the heads
//! (with InfoPro's decoders where the objective asks), the assembly into a
//! [`LocalNetwork`] and the record of the objective the heads were built for.

use std::ops::Range;

use candle_core::{DType, Device};
use sgr_core::network::{LocalNetwork, SplitPlan, Stage};
use sgr_core::nn::Init;
use sgr_core::Result;

use crate::heads::head_objectives;
use crate::split::{resolve, Published, SplitRequest, SplitStrategy};
use crate::zoo::{Input, ModelOptions};

/// A backbone as a family builds it: the body units with their report labels (`stem`,
/// `layer1.0`, `blocks.3`), and the classifier after the last unit.
#[derive(Debug)]
pub struct Backbone {
    /// The splittable units, in order.
    pub units: Vec<Box<dyn Stage>>,
    /// One label per unit.
    pub labels: Vec<String>,
    /// The network's classifier (part of the last module).
    pub classifier: Box<dyn Stage>,
}

/// A family of models: its architecture config is the implementing type.
pub trait ModelFamily {
    /// The preset names, in the order `--help` lists them.
    fn presets() -> Vec<&'static str>
    where
        Self: Sized;

    /// The architecture of preset `name` for `input` (its channels, classes and image side).
    fn preset(name: &str, input: &Input) -> Result<Self>
    where
        Self: Sized;

    /// The model's name, e.g. `resnet32`.
    fn name(&self) -> String;

    /// Checks the architecture.
    fn validate(&self) -> Result<()>;

    /// Image channels and classes.
    fn io(&self) -> (usize, usize);

    /// Number of splittable units (stem or embedding, then one per block).
    fn units(&self) -> usize;

    /// Channels of the feature map after unit `unit`; `None` for a family without feature
    /// maps (tokens), which then has no InfoPro decoder.
    fn unit_channels(&self, unit: usize) -> Option<usize>;

    /// Split points published for this architecture (none by default).
    fn published(&self) -> Result<Published> {
        Ok(Published::default())
    }

    /// Refuses the options this family cannot honour (an objective, an aux head kind,
    /// dropout), before anything is built.
    fn supports(&self, options: &ModelOptions) -> Result<()>;

    /// The backbone, drawing its weights from `init` (seeded by the options' seed alone, so
    /// that the weights do not depend on K, the head or the method).
    fn backbone(&self, options: &ModelOptions, init: &mut Init) -> Result<Backbone>;

    /// The aux head of a module whose body is `units`, named `prefix.*`, with `outputs`
    /// outputs (the classes, or a contrastive projection's width).
    fn head(
        &self,
        options: &ModelOptions,
        units: Range<usize>,
        prefix: &str,
        init: &mut Init,
        outputs: usize,
    ) -> Result<Box<dyn Stage>>;
}

/// The split plan of `family` into `k` modules with `strategy` (`ends`: the measured end points
/// of the balanced split); unsupported values are an error naming the supported ones.
pub fn split_plan<F: ModelFamily + ?Sized>(
    family: &F,
    k: usize,
    strategy: SplitStrategy,
    ends: Option<&[usize]>,
) -> Result<SplitPlan> {
    family.validate()?;
    resolve(&SplitRequest {
        model: &family.name(),
        units: family.units(),
        modules: k,
        strategy,
        published: &family.published()?,
        ends,
    })
}

/// Builds `family` cut and headed as `options` says, on `device` in `dtype`.
pub fn build<F: ModelFamily + ?Sized>(
    family: &F,
    options: &ModelOptions,
    device: &Device,
    dtype: DType,
) -> Result<LocalNetwork> {
    family.validate()?;
    options.validate()?;
    family.supports(options)?;
    let o = options;
    let plan = split_plan(family, o.modules, o.split, o.split_ends.as_deref())?;
    let mut init = Init::new(o.seed, device, dtype);
    let backbone = family.backbone(o, &mut init)?;
    let (image_channels, classes) = family.io();
    let channels = |k: usize| family.unit_channels(plan.ends()[k]).unwrap_or(0);
    let has_maps = family.unit_channels(0).is_some();
    let objectives = head_objectives(
        &plan,
        o,
        (image_channels, classes),
        device,
        dtype,
        has_maps.then_some(&channels as &dyn Fn(usize) -> usize),
        |k, prefix, init, outputs| family.head(o, plan.range(k), prefix, init, outputs),
    )?;
    LocalNetwork::new(
        family.name(),
        backbone.units,
        backbone.classifier,
        objectives,
        plan,
        classes,
    )?
    .with_unit_labels(backbone.labels)
    .map(|net| net.with_objective(o.objective))
}
