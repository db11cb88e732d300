//! Auxiliary heads of local modules (docs/method.md, "Auxiliary heads").

use candle_core::Tensor;
use sgr_core::network::Stage;
use sgr_core::nn::{global_avg_pool, BatchNorm, Conv2d, Ctx, Init, Layer, Linear, Param};
use sgr_core::Result;

/// Which auxiliary head a module carries. Each family accepts its own kinds and says which when
/// given another (docs/models.md, "Auxiliary heads").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeadKind {
    /// The family's usual head: `1c2f` for CIFAR ResNets, `infopro` for ImageNet ResNets,
    /// `token` for Transformers.
    #[default]
    Auto,
    /// Greedy SL's head: global average pool + Linear(C → classes).
    ZeroConvOneFc,
    /// InfoPro's CIFAR head: conv3×3 (no bias) + BN + ReLU + GAP + Linear(→128) + ReLU +
    /// Linear(128 → classes); the conv maps 16→32 and 32→64 with stride 2, 64→64 with stride 1.
    OneConvTwoFc,
    /// The auxiliary classifier InfoPro uses on ImageNet ResNets.
    Infopro,
    /// The auxiliary classifier DGL uses on ImageNet ResNets.
    Dgl,
    /// Transformers: LayerNorm, the class token, Linear.
    Token,
    /// Transformers: LayerNorm, the mean of the patch tokens, Linear.
    Mean,
    /// Transformers: one extra Transformer block, then [`HeadKind::Token`].
    BlockToken,
    /// Transformers: one extra Transformer block, then [`HeadKind::Mean`].
    BlockMean,
}

sgr_core::named_enum!(HeadKind, "aux head", {
    "auto" => Auto,
    "0c1f" => ZeroConvOneFc,
    "1c2f" => OneConvTwoFc,
    "infopro" => Infopro,
    "dgl" => Dgl,
    "token" => Token,
    "mean" => Mean,
    "block-token" => BlockToken,
    "block-mean" => BlockMean,
});

impl HeadKind {
    /// Builds a CIFAR ResNet head (`0c1f`, `1c2f`) for a feature map of `channels` channels,
    /// named `prefix.*`; other kinds are an error.
    pub fn build(
        &self,
        prefix: &str,
        init: &mut Init,
        channels: usize,
        classes: usize,
    ) -> Result<Box<dyn Stage>> {
        Ok(match self {
            HeadKind::ZeroConvOneFc => Box::new(Head0c1f {
                fc: Linear::new(format!("{prefix}.fc"), init, channels, classes)?,
            }),
            HeadKind::OneConvTwoFc => {
                let (cout, stride) = if channels < 64 {
                    (channels * 2, 2)
                } else {
                    (channels, 1)
                };
                Box::new(Head1c2f {
                    conv: Conv2d::new(
                        format!("{prefix}.conv"),
                        init,
                        channels,
                        cout,
                        3,
                        stride,
                        1,
                    )?,
                    bn: BatchNorm::new(format!("{prefix}.bn"), init, cout)?,
                    fc1: Linear::new(format!("{prefix}.fc1"), init, cout, 128)?,
                    fc2: Linear::new(format!("{prefix}.fc2"), init, 128, classes)?,
                })
            }
            other => {
                return Err(sgr_core::Error::InvalidConfig(format!(
                    "the aux head `{other}` is not a CIFAR ResNet head; use 0c1f or 1c2f"
                )))
            }
        })
    }
}

/// GAP + Linear.
#[derive(Debug)]
pub struct Head0c1f {
    fc: Linear,
}

impl Stage for Head0c1f {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        self.fc.forward(&global_avg_pool(x)?)
    }

    fn params(&self) -> Vec<Param> {
        self.fc.params()
    }
}

/// conv-BN-ReLU, GAP, Linear-ReLU-Linear.
#[derive(Debug)]
pub struct Head1c2f {
    conv: Conv2d,
    bn: BatchNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Stage for Head1c2f {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = self
            .bn
            .forward_act(&self.conv.forward(x)?, None, true, ctx)?;
        let h = ctx.relu(&self.fc1.forward(&global_avg_pool(&h)?)?)?;
        self.fc2.forward(&h)
    }

    fn params(&self) -> Vec<Param> {
        let mut p = self.conv.params();
        p.extend(self.bn.params());
        p.extend(self.fc1.params());
        p.extend(self.fc2.params());
        p
    }
}

/// The objectives of a split: cross-entropy on an auxiliary head `aux.<k>` for modules
/// 1..K-1, the classifier's own cross-entropy for the last. `build(k, prefix, init)` makes
/// module k's head; heads draw from a generator seeded apart from the backbone's, so the
/// backbone's weights do not depend on K or the head.
pub fn head_objectives(
    plan: &sgr_core::network::SplitPlan,
    seed: u64,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    mut build: impl FnMut(usize, &str, &mut Init) -> Result<Box<dyn Stage>>,
) -> Result<Vec<Box<dyn sgr_core::objective::LocalObjective>>> {
    use sgr_core::objective::{CrossEntropy, LocalObjective};
    let mut init = Init::new(seed.wrapping_add(0x9E37_79B9_7F4A_7C15), device, dtype);
    let mut objectives = (0..plan.num_modules() - 1)
        .map(|k| {
            let head = build(k, &format!("aux.{k}"), &mut init)?;
            Ok(Box::new(CrossEntropy::on_head(head)) as Box<dyn LocalObjective>)
        })
        .collect::<Result<Vec<_>>>()?;
    objectives.push(Box::new(CrossEntropy::on_logits()));
    Ok(objectives)
}
