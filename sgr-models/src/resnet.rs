//! CIFAR ResNets (He et al. 2016, §4.2): depth 6n+2, three stages of n basic blocks with 16, 32
//! and 64 channels, option-A (parameter-free) shortcuts, torchvision-style parameter names
//! (`conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`). Auxiliary heads live under `aux.<k>`.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sgr_core::network::{LocalNetwork, Stage};
use sgr_core::nn::{option_a_shortcut, BatchNorm, Conv2d, Ctx, Init, Layer, Param};
use sgr_core::{Error, Result};

pub use crate::family::split_plan;
use crate::family::{Backbone, ModelFamily};
use crate::heads::{DglHead, Head1c2f, HeadKind};
use crate::layers::GapLinear;
use crate::split::{Published, Table};
use crate::zoo::{Input, ModelOptions};

/// Architecture of a CIFAR ResNet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// 6n+2 (20, 32, 44, 56, 110, ...).
    pub depth: usize,
    /// Input channels (3 for RGB, 1 for grey).
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
}

impl ResNetConfig {
    /// The named presets (`resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110`, plus the
    /// small `resnet8` and `resnet14`).
    pub const PRESETS: [(&'static str, usize); 7] = [
        ("resnet8", 8),
        ("resnet14", 14),
        ("resnet20", 20),
        ("resnet32", 32),
        ("resnet44", 44),
        ("resnet56", 56),
        ("resnet110", 110),
    ];

    /// A preset by name.
    pub fn preset(name: &str, in_channels: usize, num_classes: usize) -> Result<Self> {
        let depth = Self::PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "unknown model `{name}`; available: {}",
                    Self::PRESETS.map(|(n, _)| n).join(", ")
                ))
            })?;
        let cfg = Self {
            depth,
            in_channels,
            num_classes,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Blocks per stage, n = (depth − 2) / 6.
    pub fn blocks_per_stage(&self) -> usize {
        (self.depth - 2) / 6
    }

    /// Splittable units: the stem plus 3n residual blocks.
    pub fn units(&self) -> usize {
        1 + 3 * self.blocks_per_stage()
    }

    /// Model name, `resnet<depth>`.
    pub fn name(&self) -> String {
        format!("resnet{}", self.depth)
    }

    fn validate(&self) -> Result<()> {
        if self.depth < 8 || !(self.depth - 2).is_multiple_of(6) {
            return Err(Error::InvalidConfig(format!(
                "CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {}",
                self.depth
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

    /// Unit index of InfoPro's `[stage, block]` (stage 0 block 0 = the stem).
    pub fn unit_of(&self, stage: usize, block: usize) -> Option<usize> {
        let n = self.blocks_per_stage();
        match stage {
            0 if block == 0 => Some(0),
            1..=3 if block < n => Some(1 + (stage - 1) * n + block),
            _ => None,
        }
    }

    /// Channels of the output of a unit.
    pub fn unit_channels(&self, unit: usize) -> usize {
        if unit == 0 {
            16
        } else {
            16 << ((unit - 1) / self.blocks_per_stage())
        }
    }
}

/// InfoPro (Wang et al., ICLR 2021), `networks/resnet.py` split configuration, as transcribed
/// in docs/method.md ("Split plans"): `[stage, block]` pairs after which a module ends (the final module's end is
/// implicit). K=16 for ResNet-32 is one module per block.
const INFOPRO_RESNET32: Table = &[
    (2, &[(2, 1)]),
    (3, &[(1, 4), (2, 4)]),
    (4, &[(1, 2), (2, 1), (3, 0)]),
    (8, &[(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)]),
    (
        16,
        &[
            (0, 0),
            (1, 0),
            (1, 1),
            (1, 2),
            (1, 3),
            (1, 4),
            (2, 0),
            (2, 1),
            (2, 2),
            (2, 3),
            (2, 4),
            (3, 0),
            (3, 1),
            (3, 2),
            (3, 3),
        ],
    ),
];

/// InfoPro's ResNet-110 splits (docs/method.md, "Split plans").
const INFOPRO_RESNET110: Table = &[
    (2, &[(2, 8)]),
    (3, &[(1, 17), (2, 17)]),
    (4, &[(1, 11), (2, 7), (3, 3)]),
    (
        8,
        &[(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
    ),
    (
        16,
        &[
            (1, 1),
            (1, 4),
            (1, 7),
            (1, 10),
            (1, 13),
            (1, 16),
            (2, 1),
            (2, 4),
            (2, 7),
            (2, 11),
            (2, 15),
            (3, 1),
            (3, 5),
            (3, 9),
            (3, 13),
        ],
    ),
];

/// InfoPro*'s memory-balanced ResNet-110 splits for CIFAR-10 (docs/method.md, "Split plans").
const INFOPRO_BALANCED_RESNET110: Table = &[
    (2, &[(1, 14)]),
    (3, &[(1, 9), (2, 2)]),
    (4, &[(1, 6), (1, 14), (2, 8)]),
];

fn published(cfg: &ResNetConfig) -> Result<Published> {
    let (infopro, balanced) = match cfg.depth {
        32 => (Some(INFOPRO_RESNET32), None),
        110 => (Some(INFOPRO_RESNET110), Some(INFOPRO_BALANCED_RESNET110)),
        _ => (None, None),
    };
    Published::from_tables(&cfg.name(), infopro, balanced, |s, b| cfg.unit_of(s, b))
}

/// Stem: conv3×3(in → 16) + BN + ReLU.
#[derive(Debug)]
struct Stem {
    conv: Conv2d,
    bn: BatchNorm,
}

impl Stage for Stem {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        self.bn.forward_act(&self.conv.forward(x)?, None, true, ctx)
    }

    fn params(&self) -> Vec<Param> {
        let mut p = self.conv.params();
        p.extend(self.bn.params());
        p
    }
}

/// Basic block with an option-A shortcut.
#[derive(Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    cout: usize,
    downsample: bool,
}

impl Stage for BasicBlock {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self
            .bn1
            .forward_act(&self.conv1.forward(x)?, None, true, ctx)?;
        let sc = if self.downsample {
            option_a_shortcut(x, self.cout)?
        } else {
            x.clone()
        };
        self.bn2
            .forward_act(&self.conv2.forward(&h)?, Some(&sc), true, ctx)
    }

    fn params(&self) -> Vec<Param> {
        let mut p = self.conv1.params();
        p.extend(self.bn1.params());
        p.extend(self.conv2.params());
        p.extend(self.bn2.params());
        p
    }
}

/// Builder of CIFAR ResNets as [`LocalNetwork`]s.
#[derive(Debug, Clone)]
pub struct CifarResNet {
    /// Architecture.
    pub config: ResNetConfig,
    /// K, split, aux head and seed.
    pub options: ModelOptions,
}

impl CifarResNet {
    /// Builds the network on `device` in `dtype`.
    pub fn build(&self, device: &Device, dtype: DType) -> Result<LocalNetwork> {
        crate::family::build(&self.config, &self.options, device, dtype)
    }
}

impl ModelFamily for ResNetConfig {
    fn presets() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Self::PRESETS.iter().map(|(n, _)| *n).collect();
        names.sort_by_key(|n| (n.len(), *n));
        names
    }

    fn preset(name: &str, input: &Input) -> Result<Self> {
        ResNetConfig::preset(name, input.channels, input.classes)
    }

    fn name(&self) -> String {
        ResNetConfig::name(self)
    }

    fn validate(&self) -> Result<()> {
        ResNetConfig::validate(self)
    }

    fn io(&self) -> (usize, usize) {
        (self.in_channels, self.num_classes)
    }

    fn units(&self) -> usize {
        ResNetConfig::units(self)
    }

    fn unit_channels(&self, unit: usize) -> Option<usize> {
        Some(ResNetConfig::unit_channels(self, unit))
    }

    fn published(&self) -> Result<Published> {
        published(self)
    }

    fn supports(&self, options: &ModelOptions) -> Result<()> {
        resolve_head(options.head_kind()).map(drop)
    }

    fn backbone(&self, _options: &ModelOptions, init: &mut Init) -> Result<Backbone> {
        let cfg = self;
        let n = cfg.blocks_per_stage();
        let mut units: Vec<Box<dyn Stage>> = Vec::with_capacity(cfg.units());
        units.push(Box::new(Stem {
            conv: Conv2d::new("conv1", init, cfg.in_channels, 16, 3, 1, 1)?,
            bn: BatchNorm::new("bn1", init, 16)?,
        }));
        let mut cin = 16;
        for stage in 1..=3 {
            let cout = 16 << (stage - 1);
            for b in 0..n {
                let stride = if stage > 1 && b == 0 { 2 } else { 1 };
                let name = format!("layer{stage}.{b}");
                units.push(Box::new(BasicBlock {
                    conv1: Conv2d::new(format!("{name}.conv1"), init, cin, cout, 3, stride, 1)?,
                    bn1: BatchNorm::new(format!("{name}.bn1"), init, cout)?,
                    conv2: Conv2d::new(format!("{name}.conv2"), init, cout, cout, 3, 1, 1)?,
                    bn2: BatchNorm::new(format!("{name}.bn2"), init, cout)?,
                    cout,
                    downsample: stride != 1 || cin != cout,
                }));
                cin = cout;
            }
        }
        let classifier = Box::new(GapLinear::new("fc", init, 64, cfg.num_classes)?);
        let labels = (0..cfg.units())
            .map(|u| match u {
                0 => "stem".to_string(),
                u => format!("layer{}.{}", (u - 1) / n + 1, (u - 1) % n),
            })
            .collect();
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
        let channels = ResNetConfig::unit_channels(self, units.end - 1);
        Ok(match resolve_head(options.head_kind())? {
            HeadKind::ZeroConvOneFc => Box::new(GapLinear::new(
                format!("{prefix}.fc"),
                init,
                channels,
                outputs,
            )?),
            HeadKind::Dgl => Box::new(DglHead::new(prefix, init, channels, outputs, false)?),
            _ => Box::new(Head1c2f::new(prefix, init, channels, outputs)?),
        })
    }
}

/// The head kind a CIFAR ResNet uses for `kind` (`auto` → `1c2f`); other kinds are an error
/// naming the accepted ones.
fn resolve_head(kind: HeadKind) -> Result<HeadKind> {
    match kind {
        HeadKind::Auto => Ok(HeadKind::OneConvTwoFc),
        h @ (HeadKind::ZeroConvOneFc | HeadKind::OneConvTwoFc | HeadKind::Dgl) => Ok(h),
        other => Err(Error::InvalidConfig(format!(
            "the aux head `{other}` is not one of CIFAR ResNets'; use 0c1f, 1c2f or dgl"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::SplitStrategy;

    fn cfg(depth: usize) -> ResNetConfig {
        ResNetConfig {
            depth,
            in_channels: 3,
            num_classes: 10,
        }
    }

    #[test]
    fn infopro_tables_map_to_units() {
        let p = split_plan(&cfg(32), 4, SplitStrategy::Infopro, None).unwrap();
        // [1,2] -> 3, [2,1] -> 7, [3,0] -> 11, end 15.
        assert_eq!(p.ends(), &[3, 7, 11, 15]);
        let p = split_plan(&cfg(32), 16, SplitStrategy::Infopro, None).unwrap();
        assert_eq!(p.ends(), (0..16).collect::<Vec<_>>().as_slice());
        let p = split_plan(&cfg(110), 55, SplitStrategy::Infopro, None).unwrap();
        assert_eq!(p.num_modules(), 55);
        let p = split_plan(&cfg(110), 2, SplitStrategy::InfoproBalanced, None).unwrap();
        assert_eq!(p.ends(), &[15, 54]);
        for (k, _) in INFOPRO_RESNET110 {
            assert_eq!(
                split_plan(&cfg(110), *k, SplitStrategy::Infopro, None)
                    .unwrap()
                    .num_modules(),
                *k
            );
        }
    }

    #[test]
    fn unsupported_k_names_supported_values() {
        let e = split_plan(&cfg(32), 5, SplitStrategy::Infopro, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("K in {1, 2, 3, 4, 8, 16, 16 (one module per block)}")
                || e.contains("K in {1, 2, 3, 4, 8, 16"),
            "{e}"
        );
        let e = split_plan(&cfg(20), 11, SplitStrategy::Uniform, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("K from 1 to 10"), "{e}");
        let e = split_plan(&cfg(20), 2, SplitStrategy::Infopro, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no InfoPro split points"), "{e}");
        assert!(ResNetConfig::preset("resnet33", 3, 10).is_err());
    }

    #[test]
    fn uniform_split_is_balanced() {
        let p = split_plan(&cfg(20), 4, SplitStrategy::Uniform, None).unwrap();
        assert_eq!(p.ends(), &[2, 5, 7, 9]);
        let p = split_plan(&cfg(20), 4, SplitStrategy::Auto, None).unwrap();
        assert_eq!(p.ends(), &[2, 5, 7, 9]);
    }

    #[test]
    fn torchvision_names_and_counts() {
        let net = CifarResNet {
            config: cfg(32),
            options: ModelOptions::default(),
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap();
        let names: Vec<String> = net.params().into_iter().map(|p| p.name).collect();
        assert_eq!(names[0], "conv1.weight");
        assert!(names.contains(&"layer3.4.bn2.running_var".to_string()));
        assert!(names.contains(&"fc.bias".to_string()));
        // ResNet-32 for CIFAR-10 has 464,154 trainable parameters (He et al.: 0.46M).
        assert_eq!(net.num_trainable(), 464_154);
    }
}
