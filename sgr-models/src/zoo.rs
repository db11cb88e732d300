//! The zoo by name: which presets exist, and building any of them as a [`LocalNetwork`] cut
//! into modules (docs/models.md).

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sgr_core::method::Objective;
use sgr_core::network::LocalNetwork;
use sgr_core::objective::{InfoproConfig, PixelStats};
use sgr_core::{Error, Result};

use crate::family::ModelFamily;
use crate::heads::HeadKind;
use crate::localmixer::LocalMixerConfig;
use crate::resnet::ResNetConfig;
use crate::resnet_imagenet::ImageNetResNetConfig;
use crate::split::SplitStrategy;
use crate::vit::VitConfig;

/// What the data hands the model: image channels, classes and image side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// Image channels (3 for RGB).
    pub channels: usize,
    /// Number of classes.
    pub classes: usize,
    /// Image side in pixels (square images).
    pub size: usize,
}

/// How a model is cut and trained, the same for every family: K, the split, the local
/// objective and its auxiliary head, the initialisation seed and the stochastic regularisers.
/// Defaults: end to end, Greedy SL's objective on the family's own head, no dropout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelOptions {
    /// Number of modules K.
    pub modules: usize,
    /// How to cut.
    pub split: SplitStrategy,
    /// The measured end points of a [`SplitStrategy::Balanced`] split (one per module).
    pub split_ends: Option<Vec<usize>>,
    /// The auxiliary head of modules 1..K-1 ([`HeadKind::Auto`]: the family's usual one).
    pub head: HeadKind,
    /// Initialisation seed (the backbone's weights do not depend on K or the head).
    pub seed: u64,
    /// Dropout probability inside Transformer blocks (attention, projection and MLP outputs).
    pub dropout: f64,
    /// Largest stochastic-depth probability, reached at the last block (linear in depth).
    pub drop_path: f64,
    /// The local objective of modules 1..K-1 (`bp` and `greedy` build the same objectives).
    pub objective: Objective,
    /// InfoPro's weights and contrastive settings (`infopro`, `infopro-contrast`).
    pub infopro: InfoproConfig,
    /// The statistics the input is normalised with, for InfoPro's reconstruction target
    /// (`None`: the input is the image itself, in [0, 1]).
    pub pixels: Option<PixelStats>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            modules: 1,
            split: SplitStrategy::Auto,
            split_ends: None,
            head: HeadKind::Auto,
            seed: 0,
            dropout: 0.0,
            drop_path: 0.0,
            objective: Objective::Greedy,
            infopro: InfoproConfig::default(),
            pixels: None,
        }
    }
}

impl ModelOptions {
    /// The aux head asked for, with `auto` meaning DGL's head under the `dgl` objective (and
    /// the family's usual head otherwise, which the family resolves).
    pub fn head_kind(&self) -> HeadKind {
        match (self.head, self.objective) {
            (HeadKind::Auto, Objective::Dgl) => HeadKind::Dgl,
            (h, _) => h,
        }
    }

    /// Checks the probabilities and that `dgl` keeps DGL's head.
    pub fn validate(&self) -> Result<()> {
        if self.objective == Objective::Dgl && !matches!(self.head, HeadKind::Auto | HeadKind::Dgl)
        {
            return Err(Error::InvalidConfig(format!(
                "method dgl trains DGL's own aux head, not `{}`; for cross-entropy on another \
                 head use greedy --aux-head {}",
                self.head, self.head
            )));
        }
        for (what, p) in [("dropout", self.dropout), ("drop_path", self.drop_path)] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::InvalidConfig(format!(
                    "{what} must be a probability in [0, 1), got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// The families of the zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// CIFAR ResNets (depth 6n+2, option-A shortcuts).
    CifarResNet,
    /// torchvision's ImageNet ResNets (7×7 stem, max-pool, basic or bottleneck blocks).
    ImageNetResNet,
    /// timm's Vision Transformers (DeiT, ViT, and `vit-cifar`).
    Vit,
    /// Ren et al.'s LocalMixer (the BP-free estimators' model).
    LocalMixer,
}

/// Every model name the zoo builds, in the order `--help` lists them.
pub fn names() -> Vec<&'static str> {
    let mut v = ResNetConfig::presets();
    v.extend(ImageNetResNetConfig::presets());
    v.extend(VitConfig::presets());
    v.extend(LocalMixerConfig::presets());
    v
}

/// The family of a model name.
pub fn family(name: &str) -> Result<Family> {
    if ResNetConfig::PRESETS.iter().any(|(n, _)| *n == name) {
        return Ok(Family::CifarResNet);
    }
    if ImageNetResNetConfig::is_name(name) {
        return Ok(Family::ImageNetResNet);
    }
    if VitConfig::PRESETS.contains(&name) {
        return Ok(Family::Vit);
    }
    if LocalMixerConfig::PRESETS.contains(&name) {
        return Ok(Family::LocalMixer);
    }
    Err(Error::UnknownName {
        what: "model",
        given: name.to_string(),
        valid: names().join(", "),
    })
}

/// The architecture of model `name` for `input`, as its family.
pub fn preset(name: &str, input: &Input) -> Result<Box<dyn ModelFamily>> {
    Ok(match family(name)? {
        Family::CifarResNet => Box::new(<ResNetConfig as ModelFamily>::preset(name, input)?),
        Family::ImageNetResNet => Box::new(ImageNetResNetConfig::preset(name, input)?),
        Family::Vit => Box::new(VitConfig::preset(name, input)?),
        Family::LocalMixer => Box::new(LocalMixerConfig::preset(name, input)?),
    })
}

/// A shape every preset accepts, for questions that do not depend on the input.
const PROBE: Input = Input {
    channels: 3,
    classes: 10,
    size: 224,
};

/// Number of splittable units (stem plus blocks) of a model, for K = one module per block.
pub fn units(name: &str) -> Result<usize> {
    Ok(preset(name, &PROBE)?.units())
}

/// Builds model `name` for `input`, cut and headed as `opts` says.
pub fn build(
    name: &str,
    input: Input,
    opts: &ModelOptions,
    device: &Device,
    dtype: DType,
) -> Result<LocalNetwork> {
    crate::family::build(preset(name, &input)?.as_ref(), opts, device, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_builds_and_unknown_names_list_them() {
        for name in names() {
            assert!(family(name).is_ok(), "{name}");
            assert!(units(name).unwrap() >= 2, "{name}");
        }
        let e = family("resnet19").unwrap_err().to_string();
        assert!(
            e.contains("resnet18") && e.contains("deit-s") && e.contains("resnet110"),
            "{e}"
        );
        let net = build(
            "vit-cifar",
            Input {
                channels: 3,
                classes: 10,
                size: 32,
            },
            &ModelOptions {
                modules: 2,
                ..ModelOptions::default()
            },
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        assert_eq!(net.num_modules(), 2);
    }
}
