//! InfoPro's local objective (Wang et al., ICLR 2021): a weighted sum of a reconstruction term,
//! the binary cross-entropy of a small decoder's image against the un-normalised input, and a
//! task term on an auxiliary head, cross-entropy or a supervised contrastive loss
//! (docs/method.md, "Methods").

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{Batch, LocalObjective, ObjectiveOutput, Targets};
use crate::ctx::Ctx;
use crate::loss::{binary_cross_entropy_with_logits, l2_normalize_rows, supervised_contrastive};
use crate::network::Stage;
use crate::nn::upsample::upsample_bilinear;
use crate::nn::{BatchNorm, Conv2d, Init, Layer, Param};
use crate::{Error, Result};

/// The weights of InfoPro's two terms and the contrastive settings. The weights are set for the
/// first local module (`*_first`) and the last local one (`*_last`, module K−2 counting from 0)
/// and interpolated linearly in between, as InfoPro's code does; the last module (the network's
/// classifier) has neither term. Defaults: InfoPro's published setting for ResNet-32 at K = 16
/// in its contrastive mode (`--ixx_1 5 --ixy_1 0.05 --ixx_2 0.2 --ixy_2 0.5`; InfoPro publishes
/// other weights for other K), temperature 0.07, a 128-d projection and a 12-channel decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfoproConfig {
    /// Reconstruction weight λ1 of the first module (InfoPro's `ixx_1`).
    pub recon_first: f64,
    /// Reconstruction weight λ1 of the last local module (`ixx_2`).
    pub recon_last: f64,
    /// Task weight λ2 of the first module (`ixy_1`).
    pub task_first: f64,
    /// Task weight λ2 of the last local module (`ixy_2`).
    pub task_last: f64,
    /// Temperature of the supervised contrastive loss.
    pub temperature: f64,
    /// Width of the contrastive projection (the head's output; the hidden layer of `1c2f`
    /// stays 128 wide, InfoPro's default).
    pub feature_dim: usize,
    /// Hidden channels of the decoder.
    pub decoder_width: usize,
}

impl Default for InfoproConfig {
    fn default() -> Self {
        Self {
            recon_first: 5.0,
            recon_last: 0.2,
            task_first: 0.05,
            task_last: 0.5,
            temperature: 0.07,
            feature_dim: 128,
            decoder_width: 12,
        }
    }
}

impl InfoproConfig {
    /// Whether every field has its default (`config.json` leaves the section out then).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// `(λ1, λ2)` of local module `k` of `modules` (k < modules − 1): the weights move linearly
    /// from the first to the last local module, ratio k / (K − 2) (0 when K = 2).
    pub fn weights(&self, k: usize, modules: usize) -> (f64, f64) {
        let ratio = if modules > 2 {
            k as f64 / (modules - 2) as f64
        } else {
            0.0
        };
        let mix = |a: f64, b: f64| a * (1.0 - ratio) + b * ratio;
        (
            mix(self.recon_first, self.recon_last),
            mix(self.task_first, self.task_last),
        )
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("recon_first", self.recon_first),
            ("recon_last", self.recon_last),
            ("task_first", self.task_first),
            ("task_last", self.task_last),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::InvalidConfig(format!(
                    "infopro.{what} must be finite and ≥ 0, got {v}"
                )));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "infopro.temperature must be finite and > 0, got {}",
                self.temperature
            )));
        }
        for (end, recon, task) in [
            ("first", self.recon_first, self.task_first),
            ("last", self.recon_last, self.task_last),
        ] {
            if recon == 0.0 && task == 0.0 {
                return Err(Error::InvalidConfig(format!(
                    "infopro.recon_{end} and infopro.task_{end} are both 0: the {end} local \
                     module would have no loss; give one of them a weight > 0"
                )));
            }
        }
        if self.feature_dim == 0 || self.decoder_width == 0 {
            return Err(Error::InvalidConfig(
                "infopro.feature_dim and infopro.decoder_width must be ≥ 1".into(),
            ));
        }
        Ok(())
    }
}

/// Per-channel statistics the network's input was normalised with; the reconstruction target
/// is `input · std + mean`, the image in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PixelStats {
    /// Channel means.
    pub mean: Vec<f64>,
    /// Channel standard deviations.
    pub std: Vec<f64>,
}

impl PixelStats {
    /// Undoes the normalisation of NCHW `x`.
    pub fn restore(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        if self.mean.len() != c || self.std.len() != c {
            return Err(Error::InvalidConfig(format!(
                "pixel statistics for {} channels, input with {c}",
                self.mean.len()
            )));
        }
        let shape = (1, c, 1, 1);
        let dev = x.device();
        let mean = Tensor::from_vec(self.mean.clone(), shape, dev)?.to_dtype(x.dtype())?;
        let std = Tensor::from_vec(self.std.clone(), shape, dev)?.to_dtype(x.dtype())?;
        Ok(x.broadcast_mul(&std)?.broadcast_add(&mean)?)
    }
}

/// InfoPro's decoder: bilinear upsampling (aligned corners) to the image's size, conv3×3
/// (C → width, bias) + BN + ReLU + conv3×3 (width → image channels, bias). It returns the
/// logits of the reconstruction; the sigmoid is inside the loss. Names follow InfoPro's
/// `Decoder.decoder` sequence: `<prefix>.0` (conv), `.1` (BN), `.3` (conv).
#[derive(Debug)]
pub struct Decoder {
    conv1: Conv2d,
    bn: BatchNorm,
    conv2: Conv2d,
}

impl Decoder {
    /// A decoder from `channels` feature channels to an image of `image_channels` channels.
    pub fn new(
        prefix: &str,
        init: &mut Init,
        channels: usize,
        width: usize,
        image_channels: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(format!("{prefix}.0"), init, channels, width, 3, 1, 1)?
                .and_default_bias(init)?,
            bn: BatchNorm::new(format!("{prefix}.1"), init, width)?,
            conv2: Conv2d::new(format!("{prefix}.3"), init, width, image_channels, 3, 1, 1)?
                .and_default_bias(init)?,
        })
    }

    /// The reconstruction's logits `(batch, image channels, height, width)` from features `h`.
    pub fn forward(
        &self,
        h: &Tensor,
        (height, width): (usize, usize),
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let up = upsample_bilinear(h, height, width)?;
        let z = self
            .bn
            .forward_act(&self.conv1.forward(&up)?, None, true, ctx)?;
        self.conv2.forward(&z)
    }

    /// Named tensors, `<prefix>.0.*`, `.1.*`, `.3.*`.
    pub fn params(&self) -> Vec<Param> {
        let mut p = self.conv1.params();
        p.extend(self.bn.params());
        p.extend(self.conv2.params());
        p
    }
}

/// The task term of an InfoPro module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskLoss {
    /// Cross-entropy of the head's logits (`infopro`).
    CrossEntropy,
    /// Supervised contrastive loss of the head's normalised output at this temperature
    /// (`infopro-contrast`).
    Contrastive {
        /// Softmax temperature τ.
        temperature: f64,
    },
}

/// λ1·BCE(sigmoid(decoder(h)), image) + λ2·task(head(h)) for one module. A term whose weight
/// is exactly 0 is not computed (its layers then get no gradient at that step).
#[derive(Debug)]
pub struct InfoproObjective {
    decoder: Decoder,
    head: Box<dyn Stage>,
    task: TaskLoss,
    recon_weight: f64,
    task_weight: f64,
    pixels: Option<PixelStats>,
}

impl InfoproObjective {
    /// The objective with weights `(λ1, λ2)`; `pixels` are the statistics the input was
    /// normalised with (`None`: the input is the image itself, in [0, 1]).
    pub fn new(
        decoder: Decoder,
        head: Box<dyn Stage>,
        task: TaskLoss,
        (recon_weight, task_weight): (f64, f64),
        pixels: Option<PixelStats>,
    ) -> Self {
        Self {
            decoder,
            head,
            task,
            recon_weight,
            task_weight,
            pixels,
        }
    }

    /// `(λ1, λ2)`.
    pub fn weights(&self) -> (f64, f64) {
        (self.recon_weight, self.task_weight)
    }

    fn target_image(&self, input: &Tensor) -> Result<Tensor> {
        let x = match &self.pixels {
            Some(p) => p.restore(input)?,
            None => input.clone(),
        };
        Ok(x.detach().clamp(0.0, 1.0)?)
    }
}

impl LocalObjective for InfoproObjective {
    /// The head's and the decoder's tensors. A part whose loss has weight 0 takes no part in
    /// the loss, so its tensors are listed as buffers: saved with the model, never trained
    /// (they would get no gradient, which the trainer reports as an error for trainable ones).
    fn params(&self) -> Vec<Param> {
        let unused = |mut p: Vec<Param>, weight: f64| {
            if weight == 0.0 {
                for q in &mut p {
                    q.kind = crate::nn::ParamKind::Buffer;
                }
            }
            p
        };
        let mut p = unused(self.head.params(), self.task_weight);
        p.extend(unused(self.decoder.params(), self.recon_weight));
        p
    }

    fn loss(&self, h: &Tensor, batch: &Batch, ctx: &mut Ctx) -> Result<ObjectiveOutput> {
        let mut terms = Vec::with_capacity(2);
        let mut logits = None;
        if self.task_weight != 0.0 {
            let out = self.head.forward(h, ctx)?;
            let task = match self.task {
                TaskLoss::CrossEntropy => {
                    let l = batch.targets.cross_entropy(&out)?;
                    logits = Some(out);
                    l
                }
                TaskLoss::Contrastive { temperature } => {
                    let labels = match &batch.targets {
                        Targets::Labels(y) => y,
                        Targets::Soft(_) => {
                            return Err(Error::InvalidConfig(
                                "infopro-contrast compares samples by their hard labels: turn \
                                 off mixup, cutmix and label smoothing"
                                    .into(),
                            ))
                        }
                    };
                    supervised_contrastive(&l2_normalize_rows(&out)?, labels, temperature)?
                }
            };
            terms.push((task * self.task_weight)?);
        }
        if self.recon_weight != 0.0 {
            let target = self.target_image(&batch.input)?;
            let (_, _, height, width) = target.dims4()?;
            let z = self.decoder.forward(h, (height, width), ctx)?;
            if z.dims() != target.dims() {
                return Err(Error::InvalidConfig(format!(
                    "the decoder makes images of shape {:?}, the batch has {:?}",
                    z.dims(),
                    target.dims()
                )));
            }
            terms.push((binary_cross_entropy_with_logits(&z, &target)? * self.recon_weight)?);
        }
        let loss = match terms.len() {
            // Both weights 0 (only a library user can build this; configs refuse it): a zero
            // loss that still depends on `h`.
            0 => (h.sum_all()? * 0.0)?,
            1 => terms.pop().expect("one term"),
            _ => (&terms[0] + &terms[1])?,
        };
        Ok(ObjectiveOutput { loss, logits })
    }
}
