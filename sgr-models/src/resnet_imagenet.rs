//! ImageNet ResNets exactly as torchvision builds them (He et al. 2016, Table 1; torchvision's
//! `models/resnet.py`, "v1.5": the stride of a Bottleneck sits on its 3×3 conv): a stem
//! conv7×7/2 (no bias) + BN + ReLU + max-pool 3/2/1, four stages of BasicBlocks (expansion 1)
//! or Bottlenecks (expansion 4), projection shortcuts (conv1×1 with the stride, no bias, + BN)
//! where the shape changes, adaptive average pool to 1×1 and `fc`. Parameter names are
//! torchvision's (`conv1.weight`, `bn1.*`, `layer2.0.downsample.0.weight`, `fc.bias`, ...), so
//! a torchvision state dict holds the same tensors under the same names. Auxiliary heads live
//! under `aux.<k>`.
//!
//! Units: the stem (conv1, bn1, ReLU, max-pool) is unit 0, then one unit per residual block.
//!
//! Auxiliary heads ([`HeadKind`]): `infopro` (the default), `dgl` and `0c1f`; see
//! [`InfoproHead`], [`DglHead`] and [`GapLinear`] for their layer lists and sources.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sgr_core::network::{LocalNetwork, Stage};
use sgr_core::nn::pool::MaxPool2d;
use sgr_core::nn::{global_avg_pool, BatchNorm, Conv2d, Ctx, Init, Layer, Linear, Param};
use sgr_core::{Error, Result};

pub use crate::family::split_plan;
use crate::family::{Backbone, ModelFamily};
use crate::heads::{DglHead, HeadKind};
use crate::layers::ConvBnRelu;
pub use crate::layers::GapLinear;
use crate::split::{Published, Table};
use crate::zoo::{Input, ModelOptions};

/// The residual block of an ImageNet ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34), expansion 1.
    Basic,
    /// conv1×1, conv3×3 (with the stride), conv1×1 to 4× the width (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block per unit of stage width: 1 (basic) or 4 (bottleneck).
    pub fn expansion(&self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// torchvision's stage widths (`planes` of `_make_layer`).
pub const DEFAULT_WIDTHS: [usize; 4] = [64, 128, 256, 512];

fn default_widths() -> [usize; 4] {
    DEFAULT_WIDTHS
}

fn default_stem_width() -> usize {
    64
}

/// Architecture of an ImageNet ResNet. torchvision's models are the [`Self::PRESETS`] with
/// the default widths; smaller widths give the same architecture at reduced size (tests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageNetResNetConfig {
    /// Residual block.
    pub block: BlockKind,
    /// Blocks per stage (`layers` of torchvision's `ResNet`).
    pub layers: [usize; 4],
    /// Stage widths (`planes`); block outputs have `width · expansion` channels.
    #[serde(default = "default_widths")]
    pub widths: [usize; 4],
    /// Output channels of the stem conv (torchvision: 64).
    #[serde(default = "default_stem_width")]
    pub stem_width: usize,
    /// Input channels (3 for RGB).
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
}

impl ImageNetResNetConfig {
    /// The named presets: torchvision's `resnet18`, `resnet34`, `resnet50`, `resnet101`,
    /// `resnet152` (block and blocks per stage).
    pub const PRESETS: [(&'static str, BlockKind, [usize; 4]); 5] = [
        ("resnet18", BlockKind::Basic, [2, 2, 2, 2]),
        ("resnet34", BlockKind::Basic, [3, 4, 6, 3]),
        ("resnet50", BlockKind::Bottleneck, [3, 4, 6, 3]),
        ("resnet101", BlockKind::Bottleneck, [3, 4, 23, 3]),
        ("resnet152", BlockKind::Bottleneck, [3, 8, 36, 3]),
    ];

    /// Widest `-w<N>` a width-scaled name may ask for: torchvision's own stem width.
    pub const MAX_SCALED_WIDTH: usize = 64;

    /// Splits a model name into its preset and, for a width-scaled name such as
    /// `resnet101-w8`, its stem width `N` (stages `N, 2N, 4N, 8N`); `None` for a name that is
    /// not an ImageNet ResNet.
    fn parse_name(name: &str) -> Option<(BlockKind, [usize; 4], Option<usize>)> {
        let (base, width) = match name.split_once("-w") {
            Some((base, w)) => (base, Some(w.parse::<usize>().ok()?)),
            None => (name, None),
        };
        let (_, block, layers) = Self::PRESETS.iter().find(|(n, _, _)| *n == base)?;
        Some((*block, *layers, width))
    }

    /// Whether `name` is a preset or a width-scaled preset (`resnet50-w16`).
    pub fn is_name(name: &str) -> bool {
        Self::parse_name(name).is_some()
    }

    /// A preset by name, for the data's channels and classes. `<preset>-w<N>` is the same
    /// architecture at stem width `N` and stage widths `N, 2N, 4N, 8N` (torchvision: 64):
    /// the real depth and split points at a fraction of the cost, for smoke runs.
    pub fn preset(name: &str, input: &Input) -> Result<Self> {
        let (block, layers, width) = Self::parse_name(name).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "unknown model `{name}`; available: {}, each also width-scaled as \
                 `<name>-w<N>` (N in 1..={})",
                Self::PRESETS.map(|(n, _, _)| n).join(", "),
                Self::MAX_SCALED_WIDTH
            ))
        })?;
        let (widths, stem_width) = match width {
            None => (DEFAULT_WIDTHS, default_stem_width()),
            Some(w) if (1..=Self::MAX_SCALED_WIDTH).contains(&w) => ([w, 2 * w, 4 * w, 8 * w], w),
            Some(w) => {
                return Err(Error::InvalidConfig(format!(
                    "model `{name}`: the width after `-w` must be in 1..={}, got {w}",
                    Self::MAX_SCALED_WIDTH
                )))
            }
        };
        let cfg = Self {
            block,
            layers,
            widths,
            stem_width,
            in_channels: input.channels,
            num_classes: input.classes,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Depth as torchvision counts it: 2 (basic) or 3 (bottleneck) convs per block, plus the
    /// stem conv and `fc`.
    pub fn depth(&self) -> usize {
        let per_block = match self.block {
            BlockKind::Basic => 2,
            BlockKind::Bottleneck => 3,
        };
        per_block * self.layers.iter().sum::<usize>() + 2
    }

    /// Splittable units: the stem plus every residual block.
    pub fn units(&self) -> usize {
        1 + self.layers.iter().sum::<usize>()
    }

    /// Model name: `resnet<depth>` at torchvision's widths (`resnet50`), with the widths
    /// appended otherwise (`resnet10-w16` for stem and stages 16, 32, 64, 128;
    /// `resnet10-w8-16-32-64-128` for any other widths).
    pub fn name(&self) -> String {
        let base = format!("resnet{}", self.depth());
        let w = self.stem_width;
        if self.widths == DEFAULT_WIDTHS && w == 64 {
            base
        } else if self.widths == [w, 2 * w, 4 * w, 8 * w] {
            format!("{base}-w{w}")
        } else {
            let [a, b, c, d] = self.widths;
            format!("{base}-w{w}-{a}-{b}-{c}-{d}")
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        if self.layers.contains(&0) || self.widths.contains(&0) || self.stem_width == 0 {
            return Err(Error::InvalidConfig(format!(
                "an ImageNet ResNet needs at least one block per stage and non-zero widths, got \
                 layers {:?}, widths {:?}, stem width {}",
                self.layers, self.widths, self.stem_width
            )));
        }
        if self.in_channels == 0 || self.num_classes < 2 {
            return Err(Error::InvalidConfig(format!(
                "in_channels must be >= 1 and num_classes >= 2, got {} and {}",
                self.in_channels, self.num_classes
            )));
        }
        Ok(())
    }

    /// Unit index of InfoPro's `[stage, block]` (stage 0 block 0 = the stem; stages 1..4 are
    /// `layer1`..`layer4`).
    pub fn unit_of(&self, stage: usize, block: usize) -> Option<usize> {
        match stage {
            0 if block == 0 => Some(0),
            1..=4 if block < self.layers[stage - 1] => {
                Some(1 + self.layers[..stage - 1].iter().sum::<usize>() + block)
            }
            _ => None,
        }
    }

    /// `(stage, block)` of a unit: `(0, 0)` for the stem, `(s, b)` for `layer<s>.<b>`.
    pub fn stage_of(&self, unit: usize) -> (usize, usize) {
        if unit == 0 {
            return (0, 0);
        }
        let mut u = unit - 1;
        for (s, &n) in self.layers.iter().enumerate() {
            if u < n {
                return (s + 1, u);
            }
            u -= n;
        }
        (4, self.layers[3] - 1)
    }

    /// Channels of the output of a unit.
    pub fn unit_channels(&self, unit: usize) -> usize {
        match self.stage_of(unit) {
            (0, _) => self.stem_width,
            (s, _) => self.widths[s - 1] * self.block.expansion(),
        }
    }

    /// The label of a unit: `stem`, `layer1.0`, ...
    pub fn unit_label(&self, unit: usize) -> String {
        match self.stage_of(unit) {
            (0, _) => "stem".to_string(),
            (s, b) => format!("layer{s}.{b}"),
        }
    }
}

/// InfoPro's ImageNet split for K=2 (Wang et al., ICLR 2021), from
/// blackfeather-wang/InfoPro-Pytorch, `Experiments on ImageNet/networks/resnet.py`:
/// `k2_infopro = {'resnet101': 0, 'resnet152': 5, ...}`, and `ResNet.forward` with
/// `layer_wise == 0` runs the stem, `layer1` and `layer2[0..=k2_infopro]`, so the first module
/// ends after `layer2[0]` (ResNet-101) or `layer2[5]` (ResNet-152); docs/method.md, "Split
/// tables". In `[stage, block]` notation (stage 2 = `layer2`):
const INFOPRO_RESNET101: Table = &[(2, &[(2, 0)])];
/// See [`INFOPRO_RESNET101`].
const INFOPRO_RESNET152: Table = &[(2, &[(2, 5)])];

fn published(cfg: &ImageNetResNetConfig) -> Result<Published> {
    let infopro = match (cfg.block, cfg.layers) {
        (BlockKind::Bottleneck, [3, 4, 23, 3]) => Some(INFOPRO_RESNET101),
        (BlockKind::Bottleneck, [3, 8, 36, 3]) => Some(INFOPRO_RESNET152),
        _ => None,
    };
    Published::from_tables(&cfg.name(), infopro, None, |s, b| cfg.unit_of(s, b))
}

fn cat_params(layers: &[&dyn Layer]) -> Vec<Param> {
    layers.iter().flat_map(|l| l.params()).collect()
}

/// Stem: conv7×7/2 pad 3 (no bias) + BN + ReLU + max-pool 3/2/1.
#[derive(Debug)]
struct Stem {
    conv: Conv2d,
    bn: BatchNorm,
    pool: MaxPool2d,
}

impl Stage for Stem {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self
            .bn
            .forward_act(&self.conv.forward(x)?, None, true, ctx)?;
        self.pool.forward(&h, ctx)
    }

    fn params(&self) -> Vec<Param> {
        cat_params(&[&self.conv, &self.bn])
    }
}

/// Projection shortcut `downsample.0` (conv1×1 with the stride, no bias) + `downsample.1` (BN).
#[derive(Debug)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

impl Downsample {
    fn new(name: &str, init: &mut Init, cin: usize, cout: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                format!("{name}.downsample.0"),
                init,
                cin,
                cout,
                1,
                stride,
                0,
            )?,
            bn: BatchNorm::new(format!("{name}.downsample.1"), init, cout)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, ctx)
    }

    fn params(&self) -> Vec<Param> {
        cat_params(&[&self.conv, &self.bn])
    }
}

/// The shortcut of a block: the input, or its projection.
fn shortcut(ds: &Option<Downsample>, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
    match ds {
        Some(d) => d.forward(x, ctx),
        None => Ok(x.clone()),
    }
}

/// torchvision's `BasicBlock`: conv3×3 (stride) + BN + ReLU, conv3×3 + BN, + shortcut, ReLU.
#[derive(Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Downsample>,
}

impl Stage for BasicBlock {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self
            .bn1
            .forward_act(&self.conv1.forward(x)?, None, true, ctx)?;
        let sc = shortcut(&self.downsample, x, ctx)?;
        self.bn2
            .forward_act(&self.conv2.forward(&h)?, Some(&sc), true, ctx)
    }

    fn params(&self) -> Vec<Param> {
        let mut p = cat_params(&[&self.conv1, &self.bn1, &self.conv2, &self.bn2]);
        if let Some(d) = &self.downsample {
            p.extend(d.params());
        }
        p
    }
}

/// torchvision's `Bottleneck` (v1.5): conv1×1 + BN + ReLU, conv3×3 (stride) + BN + ReLU,
/// conv1×1 (→ 4× width) + BN, + shortcut, ReLU.
#[derive(Debug)]
struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    downsample: Option<Downsample>,
}

impl Stage for Bottleneck {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self
            .bn1
            .forward_act(&self.conv1.forward(x)?, None, true, ctx)?;
        let h = self
            .bn2
            .forward_act(&self.conv2.forward(&h)?, None, true, ctx)?;
        let sc = shortcut(&self.downsample, x, ctx)?;
        self.bn3
            .forward_act(&self.conv3.forward(&h)?, Some(&sc), true, ctx)
    }

    fn params(&self) -> Vec<Param> {
        let mut p = cat_params(&[
            &self.conv1,
            &self.bn1,
            &self.conv2,
            &self.bn2,
            &self.conv3,
            &self.bn3,
        ]);
        if let Some(d) = &self.downsample {
            p.extend(d.params());
        }
        p
    }
}

/// InfoPro's ImageNet auxiliary classifier, `self.head` of `ResNet.__init__` in
/// blackfeather-wang/InfoPro-Pytorch, `Experiments on ImageNet/networks/resnet.py`:
///
/// conv1×1(C → 128) + BN + ReLU, conv3×3/2 pad 1 (128 → 256) + BN + ReLU,
/// conv3×3/2 pad 1 (256 → 512) + BN + ReLU, conv1×1(512 → 2048) + BN + ReLU (convs without
/// bias), adaptive average pool to 1×1, flatten, Linear(2048 → classes).
///
/// InfoPro defines it for its one split point, after `layer2[k]` of ResNet-101/152 (C = 512);
/// here C is the channels of whatever unit the module ends at, and the widths 128, 256, 512,
/// 2048 are the network's `widths[1]`, `widths[2]`, `widths[3]` and `4 · widths[3]` (the same
/// numbers at torchvision's widths; smaller in reduced models). InfoPro hard-codes 1000
/// classes; here it is the network's class count. Names follow InfoPro's `nn.Sequential`
/// indices: `aux.<k>.0` (conv), `.1` (BN), `.3`, `.4`, `.6`, `.7`, `.9`, `.10`, `.14` (Linear).
/// InfoPro's reconstruction decoder is part of its loss, not of this classifier.
#[derive(Debug)]
pub struct InfoproHead {
    layers: Vec<ConvBnRelu>,
    fc: Linear,
}

impl InfoproHead {
    /// The head for a `channels`-channel feature map of `cfg` with `outputs` outputs (the
    /// classes, or a contrastive projection's width), named `prefix.*`.
    pub fn new(
        prefix: &str,
        init: &mut Init,
        cfg: &ImageNetResNetConfig,
        channels: usize,
        outputs: usize,
    ) -> Result<Self> {
        let [_, w1, w2, w3] = cfg.widths;
        let wide = 4 * w3;
        let layers = vec![
            ConvBnRelu::new(prefix, 0, init, channels, w1, 1, 1, 0)?,
            ConvBnRelu::new(prefix, 3, init, w1, w2, 3, 2, 1)?,
            ConvBnRelu::new(prefix, 6, init, w2, w3, 3, 2, 1)?,
            ConvBnRelu::new(prefix, 9, init, w3, wide, 1, 1, 0)?,
        ];
        let fc = Linear::new(format!("{prefix}.14"), init, wide, outputs)?;
        Ok(Self { layers, fc })
    }
}

impl Stage for InfoproHead {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h, ctx)?;
        }
        self.fc.forward(&global_avg_pool(&h)?)
    }

    fn params(&self) -> Vec<Param> {
        let mut p: Vec<Param> = self.layers.iter().flat_map(|l| l.params()).collect();
        p.extend(self.fc.params());
        p
    }
}

/// The head kind an ImageNet ResNet uses for `kind` (`auto` → `infopro`); other kinds are an
/// error naming the accepted ones.
pub fn resolve_head(kind: HeadKind) -> Result<HeadKind> {
    match kind {
        HeadKind::Auto => Ok(HeadKind::Infopro),
        h @ (HeadKind::Infopro | HeadKind::Dgl | HeadKind::ZeroConvOneFc) => Ok(h),
        other => Err(Error::InvalidConfig(format!(
            "the aux head `{other}` is not one of ImageNet ResNets'; use infopro, dgl or 0c1f"
        ))),
    }
}

/// The auxiliary head of kind `kind` (resolved) for a module ending at unit `end`.
fn build_head(
    kind: HeadKind,
    prefix: &str,
    init: &mut Init,
    cfg: &ImageNetResNetConfig,
    end: usize,
    outputs: usize,
) -> Result<Box<dyn Stage>> {
    let channels = cfg.unit_channels(end);
    Ok(match resolve_head(kind)? {
        HeadKind::Infopro => Box::new(InfoproHead::new(prefix, init, cfg, channels, outputs)?),
        HeadKind::Dgl => Box::new(DglHead::new(
            prefix,
            init,
            channels,
            outputs,
            end > 0 && cfg.block == BlockKind::Bottleneck,
        )?),
        _ => Box::new(GapLinear::new(
            format!("{prefix}.fc"),
            init,
            channels,
            outputs,
        )?),
    })
}

/// Builder of ImageNet ResNets as [`LocalNetwork`]s.
#[derive(Debug, Clone)]
pub struct ImageNetResNet {
    /// Architecture.
    pub config: ImageNetResNetConfig,
    /// K, split, aux head and seed (no dropout or drop-path: ResNets have none).
    pub options: ModelOptions,
}

impl ImageNetResNet {
    /// Builds the network on `device` in `dtype`, with torchvision's initialisation
    /// (Kaiming-normal fan-out convolutions, BN γ = 1, β = 0, PyTorch's default Linear).
    pub fn build(&self, device: &Device, dtype: DType) -> Result<LocalNetwork> {
        crate::family::build(&self.config, &self.options, device, dtype)
    }
}

impl ModelFamily for ImageNetResNetConfig {
    fn presets() -> Vec<&'static str> {
        Self::PRESETS.iter().map(|p| p.0).collect()
    }

    fn preset(name: &str, input: &Input) -> Result<Self> {
        ImageNetResNetConfig::preset(name, input)
    }

    fn name(&self) -> String {
        ImageNetResNetConfig::name(self)
    }

    fn validate(&self) -> Result<()> {
        ImageNetResNetConfig::validate(self)
    }

    fn io(&self) -> (usize, usize) {
        (self.in_channels, self.num_classes)
    }

    fn units(&self) -> usize {
        ImageNetResNetConfig::units(self)
    }

    fn unit_channels(&self, unit: usize) -> Option<usize> {
        Some(ImageNetResNetConfig::unit_channels(self, unit))
    }

    fn published(&self) -> Result<Published> {
        published(self)
    }

    fn supports(&self, o: &ModelOptions) -> Result<()> {
        if o.dropout != 0.0 || o.drop_path != 0.0 {
            return Err(Error::InvalidConfig(format!(
                "{} has no dropout or drop-path; got dropout {} and drop_path {}",
                self.name(),
                o.dropout,
                o.drop_path
            )));
        }
        if o.objective.is_infopro() {
            // InfoPro's ImageNet decoder (conv1×1 to 128 channels, then stepwise upsampling) is
            // not the CIFAR one; the CIFAR decoder at 224×224 would not fit in memory.
            return Err(Error::InvalidConfig(format!(
                "method {}: InfoPro's ImageNet decoder is not built yet, only its CIFAR one; \
                 train ImageNet ResNets with greedy or dgl (with or without +sgr)",
                o.objective
            )));
        }
        resolve_head(o.head_kind()).map(drop)
    }

    fn backbone(&self, _options: &ModelOptions, init: &mut Init) -> Result<Backbone> {
        let cfg = self;
        let mut units: Vec<Box<dyn Stage>> = Vec::with_capacity(cfg.units());
        units.push(Box::new(Stem {
            conv: Conv2d::new("conv1", init, cfg.in_channels, cfg.stem_width, 7, 2, 3)?,
            bn: BatchNorm::new("bn1", init, cfg.stem_width)?,
            pool: MaxPool2d::new(3, 2, 1),
        }));
        let expansion = cfg.block.expansion();
        let mut cin = cfg.stem_width;
        for (s, (&blocks, &width)) in cfg.layers.iter().zip(&cfg.widths).enumerate() {
            let cout = width * expansion;
            for b in 0..blocks {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let name = format!("layer{}.{b}", s + 1);
                let i = &mut *init;
                let conv = |i: &mut Init, n: usize, ci, co, k, st, p| {
                    Conv2d::new(format!("{name}.conv{n}"), i, ci, co, k, st, p)
                };
                let bn = |i: &mut Init, n: usize, c| BatchNorm::new(format!("{name}.bn{n}"), i, c);
                let unit: Box<dyn Stage> = match cfg.block {
                    BlockKind::Basic => {
                        let (conv1, bn1) =
                            (conv(i, 1, cin, width, 3, stride, 1)?, bn(i, 1, width)?);
                        let (conv2, bn2) = (conv(i, 2, width, width, 3, 1, 1)?, bn(i, 2, width)?);
                        let downsample = if stride != 1 || cin != cout {
                            Some(Downsample::new(&name, i, cin, cout, stride)?)
                        } else {
                            None
                        };
                        Box::new(BasicBlock {
                            conv1,
                            bn1,
                            conv2,
                            bn2,
                            downsample,
                        })
                    }
                    BlockKind::Bottleneck => {
                        let (conv1, bn1) = (conv(i, 1, cin, width, 1, 1, 0)?, bn(i, 1, width)?);
                        let (conv2, bn2) =
                            (conv(i, 2, width, width, 3, stride, 1)?, bn(i, 2, width)?);
                        let (conv3, bn3) = (conv(i, 3, width, cout, 1, 1, 0)?, bn(i, 3, cout)?);
                        let downsample = if stride != 1 || cin != cout {
                            Some(Downsample::new(&name, i, cin, cout, stride)?)
                        } else {
                            None
                        };
                        Box::new(Bottleneck {
                            conv1,
                            bn1,
                            conv2,
                            bn2,
                            conv3,
                            bn3,
                            downsample,
                        })
                    }
                };
                units.push(unit);
                cin = cout;
            }
        }
        let classifier = Box::new(GapLinear::new("fc", init, cin, cfg.num_classes)?);
        let labels = (0..cfg.units()).map(|u| cfg.unit_label(u)).collect();
        Ok(Backbone {
            units,
            labels,
            classifier,
        })
    }

    fn head(
        &self,
        options: &ModelOptions,
        units: Range<usize>,
        prefix: &str,
        init: &mut Init,
        outputs: usize,
    ) -> Result<Box<dyn Stage>> {
        build_head(
            options.head_kind(),
            prefix,
            init,
            self,
            units.end - 1,
            outputs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::SplitStrategy;

    fn imagenet() -> Input {
        Input {
            channels: 3,
            classes: 1000,
            size: 224,
        }
    }

    fn preset(name: &str) -> ImageNetResNetConfig {
        ImageNetResNetConfig::preset(name, &imagenet()).unwrap()
    }

    fn build(cfg: ImageNetResNetConfig, options: ModelOptions) -> LocalNetwork {
        ImageNetResNet {
            config: cfg,
            options,
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap()
    }

    #[test]
    fn presets_have_torchvisions_parameter_counts_and_names() {
        // torchvision 0.28: sum(p.numel() for p in m.parameters()), len(m.state_dict()).
        for (name, params, tensors) in [
            ("resnet18", 11_689_512, 122),
            ("resnet34", 21_797_672, 218),
            ("resnet50", 25_557_032, 320),
            ("resnet101", 44_549_160, 626),
            ("resnet152", 60_192_808, 932),
        ] {
            let cfg = preset(name);
            assert_eq!(cfg.name(), name);
            let net = build(cfg, ModelOptions::default());
            assert_eq!(net.num_trainable(), params, "{name}");
            let names: Vec<String> = net.params().into_iter().map(|p| p.name).collect();
            assert_eq!(names.len(), tensors, "{name}");
            assert_eq!(
                names[..3],
                ["conv1.weight", "bn1.weight", "bn1.bias"],
                "{name}"
            );
            assert_eq!(names[names.len() - 2..], ["fc.weight", "fc.bias"], "{name}");
            let last_bn = if name == "resnet18" || name == "resnet34" {
                "bn2"
            } else {
                "bn3"
            };
            let want = [
                "bn1.running_mean".to_string(),
                "bn1.running_var".to_string(),
                "bn1.num_batches_tracked".to_string(),
                "layer1.0.conv1.weight".to_string(),
                "layer2.0.downsample.0.weight".to_string(),
                "layer2.0.downsample.1.running_var".to_string(),
                "layer4.0.downsample.1.num_batches_tracked".to_string(),
                format!("layer4.1.{last_bn}.weight"),
            ];
            for w in want {
                assert!(names.contains(&w), "{name}: {w}");
            }
            let unique: std::collections::HashSet<&String> = names.iter().collect();
            assert_eq!(unique.len(), names.len(), "{name}: duplicate names");
            // torchvision's ResNet-18/34 layer1 has no projection; ResNet-50's has one.
            assert_eq!(
                names.contains(&"layer1.0.downsample.0.weight".to_string()),
                last_bn == "bn3"
            );
            assert_eq!(net.unit_label(0), "stem");
            assert_eq!(net.unit_label(1), "layer1.0");
        }
    }

    #[test]
    fn infopro_k2_splits_after_layer2() {
        let cfg = preset("resnet101");
        let p = split_plan(&cfg, 2, SplitStrategy::Infopro, None).unwrap();
        // stem + layer1 (3 blocks) + layer2.0: unit 4 = layer2.0.
        assert_eq!(p.ends(), &[4, 33]);
        assert_eq!(cfg.unit_label(4), "layer2.0");
        let p = split_plan(&cfg, 2, SplitStrategy::Auto, None).unwrap();
        assert_eq!(p.ends(), &[4, 33]);
        let cfg152 = preset("resnet152");
        let p = split_plan(&cfg152, 2, SplitStrategy::Infopro, None).unwrap();
        assert_eq!(cfg152.unit_label(p.ends()[0]), "layer2.5");
        assert_eq!(p.ends(), &[9, 50]);
        // The head of InfoPro's split sees layer2's 512 channels, as in InfoPro's code.
        assert_eq!(cfg.unit_channels(4), 512);
    }

    #[test]
    fn uniform_block_and_unsupported_splits() {
        let cfg = preset("resnet18");
        assert_eq!(cfg.units(), 9);
        let p = split_plan(&cfg, 3, SplitStrategy::Uniform, None).unwrap();
        assert_eq!(p.ends(), &[2, 5, 8]);
        // No published split for ResNet-18: auto is uniform.
        let p = split_plan(&cfg, 3, SplitStrategy::Auto, None).unwrap();
        assert_eq!(p.ends(), &[2, 5, 8]);
        let p = split_plan(&cfg, 9, SplitStrategy::Block, None).unwrap();
        assert_eq!(p.num_modules(), 9);
        let e = split_plan(&cfg, 3, SplitStrategy::Block, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("K=9"), "{e}");
        let e = split_plan(&cfg, 10, SplitStrategy::Uniform, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("K from 1 to 9"), "{e}");
        let e = split_plan(&cfg, 2, SplitStrategy::Infopro, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no InfoPro split points"), "{e}");
        let e = split_plan(&preset("resnet101"), 3, SplitStrategy::Infopro, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("K in {1, 2, 34 (one module per block)}"), "{e}");
        let e = split_plan(&cfg, 2, SplitStrategy::InfoproBalanced, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no InfoPro*'s balanced split points"), "{e}");
        let ends = [0usize, 8];
        let p = split_plan(&cfg, 2, SplitStrategy::Balanced, Some(&ends)).unwrap();
        assert_eq!(p.ends(), &[0, 8]);
        assert!(ImageNetResNetConfig::preset("resnet20", &imagenet()).is_err());
    }

    #[test]
    fn width_scaled_names_round_trip_and_bad_widths_are_refused() {
        let cfg = ImageNetResNetConfig::preset("resnet101-w8", &imagenet()).unwrap();
        assert_eq!(
            (cfg.layers, cfg.widths, cfg.stem_width),
            ([3, 4, 23, 3], [8, 16, 32, 64], 8)
        );
        assert_eq!(cfg.name(), "resnet101-w8");
        assert_eq!(cfg.units(), preset("resnet101").units());
        assert!(crate::zoo::family("resnet18-w4").is_ok());
        for (name, why) in [
            ("resnet101-w0", "must be in 1..=64, got 0"),
            ("resnet101-w65", "must be in 1..=64, got 65"),
            ("resnet101-wx", "unknown model `resnet101-wx`"),
            ("resnet20-w8", "unknown model `resnet20-w8`"),
        ] {
            let e = ImageNetResNetConfig::preset(name, &imagenet())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{name}: {e}");
        }
    }

    #[test]
    fn units_channels_and_names_of_reduced_models() {
        let cfg = ImageNetResNetConfig {
            block: BlockKind::Bottleneck,
            layers: [2, 1, 1, 1],
            widths: [8, 16, 32, 64],
            stem_width: 8,
            in_channels: 3,
            num_classes: 10,
        };
        assert_eq!(cfg.units(), 6);
        assert_eq!(cfg.name(), "resnet17-w8");
        assert_eq!(cfg.unit_of(1, 1), Some(2));
        assert_eq!(cfg.unit_of(4, 0), Some(5));
        assert_eq!(cfg.unit_of(4, 1), None);
        assert_eq!(
            (1..6).map(|u| cfg.unit_channels(u)).collect::<Vec<_>>(),
            [32, 32, 64, 128, 256]
        );
        let odd = ImageNetResNetConfig {
            widths: [8, 16, 32, 48],
            ..cfg.clone()
        };
        assert_eq!(odd.name(), "resnet17-w8-8-16-32-48");
    }

    #[test]
    fn heads_are_named_and_checked() {
        let cfg = ImageNetResNetConfig {
            block: BlockKind::Bottleneck,
            layers: [1, 1, 1, 1],
            widths: [4, 8, 16, 32],
            stem_width: 4,
            in_channels: 3,
            num_classes: 10,
        };
        let opts = |head| ModelOptions {
            modules: 3,
            split: SplitStrategy::Uniform,
            head,
            ..ModelOptions::default()
        };
        let names = |head| -> Vec<String> {
            build(cfg.clone(), opts(head))
                .params()
                .into_iter()
                .map(|p| p.name)
                .filter(|n| n.starts_with("aux."))
                .collect()
        };
        let infopro = names(HeadKind::Auto);
        assert_eq!(infopro, names(HeadKind::Infopro));
        for n in ["aux.0.0.weight", "aux.0.10.running_var", "aux.1.14.bias"] {
            assert!(infopro.contains(&n.to_string()), "{n}: {infopro:?}");
        }
        let dgl = names(HeadKind::Dgl);
        for n in [
            "aux.0.blocks.2.0.weight",
            "aux.0.blocks.2.1.bias",
            "aux.1.classifier.7.running_mean",
            "aux.1.classifier.9.weight",
        ] {
            assert!(dgl.contains(&n.to_string()), "{n}: {dgl:?}");
        }
        assert_eq!(
            names(HeadKind::ZeroConvOneFc),
            [
                "aux.0.fc.weight",
                "aux.0.fc.bias",
                "aux.1.fc.weight",
                "aux.1.fc.bias"
            ]
        );
        let e = ImageNetResNet {
            config: cfg.clone(),
            options: opts(HeadKind::OneConvTwoFc),
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
        assert!(e.contains("use infopro, dgl or 0c1f"), "{e}");
        // The backbone's weights do not depend on K or the head.
        let a = build(cfg.clone(), ModelOptions::default());
        let b = build(cfg.clone(), opts(HeadKind::Dgl));
        for (p, q) in a.params().iter().zip(b.params().iter()) {
            assert_eq!(p.name, q.name);
            let d = (p.var.as_tensor() - q.var.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{}", p.name);
        }
        // The InfoPro head at torchvision's widths: 512 → 128 → 256 → 512 → 2048 → classes.
        let mut init = Init::new(0, &Device::Cpu, DType::F32);
        let full = preset("resnet101");
        let head = InfoproHead::new("aux.0", &mut init, &full, 512, 1000).unwrap();
        let shapes: Vec<Vec<usize>> = head
            .params()
            .iter()
            .filter(|p| p.name.ends_with(".weight") && p.var.rank() > 1)
            .map(|p| p.var.dims().to_vec())
            .collect();
        assert_eq!(
            shapes,
            [
                vec![128, 512, 1, 1],
                vec![256, 128, 3, 3],
                vec![512, 256, 3, 3],
                vec![2048, 512, 1, 1],
                vec![1000, 2048]
            ]
        );
        // Its forward at InfoPro's split point (28×28, 512 channels) gives logits.
        let x = Tensor::ones((2, 512, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let y = head.forward(&x, &mut Ctx::eval()).unwrap();
        assert_eq!(y.dims(), &[2, 1000]);
        // DGL's head: pooled to ⌈(28/2)/4⌉ = 4 for a bottleneck layer2 output at 224.
        let dgl = DglHead::new("aux.0", &mut init, 16, 10, true).unwrap();
        let x = Tensor::ones((2, 16, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(dgl.forward(&x, &mut Ctx::train()).unwrap().dims(), &[2, 10]);
        let mlp: Vec<Vec<usize>> = dgl
            .params()
            .iter()
            .filter(|p| p.var.rank() == 2)
            .map(|p| p.var.dims().to_vec())
            .collect();
        assert_eq!(
            mlp,
            [vec![64, 64], vec![64, 64], vec![64, 64], vec![10, 64]]
        );
    }

    /// `dgl` on an ImageNet ResNet picks DGL's head and gives a finite loss; InfoPro's methods
    /// are refused with an error that says what to use.
    #[test]
    fn baseline_objectives_build_or_are_refused() {
        use sgr_core::method::Objective;
        use sgr_core::objective::Batch;
        let cfg = ImageNetResNetConfig {
            block: BlockKind::Basic,
            layers: [1, 1, 1, 1],
            widths: [4, 8, 16, 32],
            stem_width: 4,
            in_channels: 3,
            num_classes: 10,
        };
        let opts = |objective| ModelOptions {
            modules: 2,
            split: SplitStrategy::Uniform,
            objective,
            ..ModelOptions::default()
        };
        let net = build(cfg.clone(), opts(Objective::Dgl));
        assert!(net
            .params()
            .iter()
            .any(|p| p.name == "aux.0.classifier.9.weight"));
        let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1, 0, 1], &Device::Cpu).unwrap();
        let mut ctx = Ctx::train();
        let h = net.module_body(0, &x, &mut ctx).unwrap();
        let out = net
            .module_objective(0)
            .unwrap()
            .loss(&h, &Batch::labelled(x.clone(), y), &mut ctx)
            .unwrap();
        assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
        for objective in [Objective::Infopro, Objective::InfoproContrast] {
            let e = ImageNetResNet {
                config: cfg.clone(),
                options: opts(objective),
            }
            .build(&Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
            assert!(e.contains("ImageNet decoder") && e.contains("dgl"), "{e}");
        }
    }

    #[test]
    fn dropout_is_rejected() {
        let e = ImageNetResNet {
            config: preset("resnet18"),
            options: ModelOptions {
                dropout: 0.1,
                ..ModelOptions::default()
            },
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
        assert!(e.contains("no dropout"), "{e}");
    }
}
