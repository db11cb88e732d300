//! Auxiliary heads of local modules (docs/method.md, "Auxiliary heads").

use candle_core::{DType, Device, Tensor};
use sgr_core::method::Objective;
use sgr_core::network::{SplitPlan, Stage};
use sgr_core::nn::pool::adaptive_avg_pool2d;
use sgr_core::nn::{global_avg_pool, BatchNorm, Conv2d, Ctx, Init, Layer, Linear, Param};
use sgr_core::objective::{CrossEntropy, Decoder, InfoproObjective, LocalObjective, TaskLoss};
use sgr_core::{Error, Result};

use crate::layers::ConvBnRelu;
use crate::zoo::ModelOptions;

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

/// InfoPro's CIFAR head (`1c2f`): conv-BN-ReLU, GAP, Linear-ReLU-Linear.
#[derive(Debug)]
pub struct Head1c2f {
    conv: Conv2d,
    bn: BatchNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Head1c2f {
    /// The head for a `channels`-channel feature map with `outputs` outputs, named `prefix.*`:
    /// the conv maps 16→32 and 32→64 with stride 2, 64→64 with stride 1.
    pub fn new(prefix: &str, init: &mut Init, channels: usize, outputs: usize) -> Result<Self> {
        let (cout, stride) = if channels < 64 {
            (channels * 2, 2)
        } else {
            (channels, 1)
        };
        Ok(Self {
            conv: Conv2d::new(format!("{prefix}.conv"), init, channels, cout, 3, stride, 1)?,
            bn: BatchNorm::new(format!("{prefix}.bn"), init, cout)?,
            fc1: Linear::new(format!("{prefix}.fc1"), init, cout, 128)?,
            fc2: Linear::new(format!("{prefix}.fc2"), init, 128, outputs)?,
        })
    }
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

/// Convolutions of DGL's auxiliary net (`nlin`, default 3: `--nlin` of `imagenet_dgl.py`).
pub const DGL_NLIN: usize = 3;
/// Hidden layers of DGL's auxiliary MLP (`mlp`, default 3: `--mlp` of `imagenet_dgl.py`).
pub const DGL_MLP: usize = 3;

/// DGL's MLP-SR auxiliary classifier (Belilovsky et al., ICML 2020), `auxillary_classifier2`
/// of eugenium/DGL with `n_lin = 3`, `mlp_layers = 3`: the layer list of `aux_type='mlp-sr'` in
/// `auxiliary_nets_study/models.py` (CIFAR) and, identically, of
/// `imagenet_dgl/models/auxillary_classifier.py` with `imagenet_dgl.py`'s defaults
/// `--nlin 3 --mlp 3` (ImageNet; `feature_size = input_features = C`):
///
/// adaptive average pool to ⌈s/4⌉×⌈s/4⌉, 3 × [conv1×1(C → C, no bias) + BN + ReLU],
/// adaptive average pool to 2×2, flatten (4C), 3 × [Linear(4C → 4C) + BatchNorm1d + ReLU],
/// Linear(4C → classes).
///
/// `s` is DGL's `in_size` bookkeeping of the feature map's side. On CIFAR ResNets and basic
/// ImageNet blocks it is the actual side. With `halve_side` (ImageNet bottleneck blocks) it is
/// half the actual side, rounded down, since DGL's `_make_layer` halves it whenever a block has
/// a projection shortcut, also in `layer1` whose stride is 1 (at 224×224: 28, 14, 7, 3 for the
/// four stages instead of 56, 28, 14, 7). DGL's sizes are fixed for its input size; here `s`
/// follows the actual feature map (the same numbers there). DGL also builds a BatchNorm
/// (`self.bn`) that its forward skips when `mlp > 0`; it is left out. Names follow DGL's
/// modules: `aux.<k>.blocks.<n>.0` (conv), `.blocks.<n>.1` (BN), `.classifier.<i>` (Linear at
/// 0, 3, 6, 9; BatchNorm1d at 1, 4, 7). DGL's last module has its own MLP classifier; here the
/// last module is the network's own classifier, as for every method, so that every method trains
/// the same network.
#[derive(Debug)]
pub struct DglHead {
    blocks: Vec<ConvBnRelu>,
    mlp: Vec<(Linear, BatchNorm)>,
    fc: Linear,
    halve_side: bool,
}

impl DglHead {
    /// The head for a `channels`-channel feature map, named `prefix.*`; `halve_side` applies
    /// DGL's bottleneck bookkeeping of the side (see the type's documentation).
    pub fn new(
        prefix: &str,
        init: &mut Init,
        channels: usize,
        classes: usize,
        halve_side: bool,
    ) -> Result<Self> {
        let c = channels;
        let blocks = (0..DGL_NLIN)
            .map(|n| ConvBnRelu::new(&format!("{prefix}.blocks.{n}"), 0, init, c, c, 1, 1, 0))
            .collect::<Result<Vec<_>>>()?;
        let f = 4 * c;
        let mlp = (0..DGL_MLP)
            .map(|l| {
                Ok((
                    Linear::new(format!("{prefix}.classifier.{}", 3 * l), init, f, f)?,
                    BatchNorm::new(format!("{prefix}.classifier.{}", 3 * l + 1), init, f)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let fc = Linear::new(
            format!("{prefix}.classifier.{}", 3 * DGL_MLP),
            init,
            f,
            classes,
        )?;
        Ok(Self {
            blocks,
            mlp,
            fc,
            halve_side,
        })
    }
}

impl Stage for DglHead {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let side = |n: usize| {
            let s = if self.halve_side { n / 2 } else { n };
            s.div_ceil(4).max(1)
        };
        let mut out = adaptive_avg_pool2d(x, side(h), side(w))?;
        for blk in &self.blocks {
            out = blk.forward(&out, ctx)?;
        }
        let out = adaptive_avg_pool2d(&out, 2, 2)?;
        let mut out = out.reshape((b, out.elem_count() / b))?;
        for (lin, bn) in &self.mlp {
            out = bn.forward_act(&lin.forward(&out)?, None, true, ctx)?;
        }
        self.fc.forward(&out)
    }

    fn params(&self) -> Vec<Param> {
        let mut p: Vec<Param> = self.blocks.iter().flat_map(|l| l.params()).collect();
        for (lin, bn) in &self.mlp {
            p.extend(lin.params());
            p.extend(bn.params());
        }
        p.extend(self.fc.params());
        p
    }
}

/// The objectives of a split, as `opts.objective` asks: for modules 1..K-1 cross-entropy on
/// an auxiliary head `aux.<k>` (`greedy`, `dgl`), or InfoPro's reconstruction by a decoder
/// `aux.<k>.decoder` plus cross-entropy or the contrastive loss on the head (`infopro`,
/// `infopro-contrast`); for the last module the classifier's own cross-entropy.
///
/// The image has `image_channels` channels and there are `classes` classes.
/// `build(k, prefix, init, outputs)` makes module k's head with `outputs` outputs (the classes,
/// or the contrastive projection's width). `channels(k)` is the channel count of module k's
/// output feature map, `None` for a family without feature maps (no decoder then). Heads and
/// decoders draw from a generator seeded apart from the backbone's, so the backbone's weights
/// do not depend on K, the head or the method.
pub fn head_objectives(
    plan: &SplitPlan,
    opts: &ModelOptions,
    (image_channels, classes): (usize, usize),
    device: &Device,
    dtype: DType,
    channels: Option<&dyn Fn(usize) -> usize>,
    mut build: impl FnMut(usize, &str, &mut Init, usize) -> Result<Box<dyn Stage>>,
) -> Result<Vec<Box<dyn LocalObjective>>> {
    let mut init = Init::new(opts.seed.wrapping_add(0x9E37_79B9_7F4A_7C15), device, dtype);
    let k_total = plan.num_modules();
    let ip = &opts.infopro;
    let task = match opts.objective {
        Objective::InfoproContrast => Some(TaskLoss::Contrastive {
            temperature: ip.temperature,
        }),
        Objective::Infopro => Some(TaskLoss::CrossEntropy),
        _ => None,
    };
    let channels = match (task, channels) {
        (Some(_), None) => {
            return Err(Error::InvalidConfig(format!(
                "method {}: InfoPro's decoder reconstructs the image from a feature map, and \
                 this model has none; use greedy or greedy+sgr",
                opts.objective
            )))
        }
        (_, c) => c,
    };
    if task.is_some() {
        ip.validate()?;
    }
    let mut objectives = Vec::with_capacity(k_total);
    for k in 0..k_total - 1 {
        let prefix = format!("aux.{k}");
        let outputs = match task {
            Some(TaskLoss::Contrastive { .. }) => ip.feature_dim,
            _ => classes,
        };
        let head = build(k, &prefix, &mut init, outputs)?;
        objectives.push(match (task, channels) {
            (Some(task), Some(channels)) => {
                let decoder = Decoder::new(
                    &format!("{prefix}.decoder"),
                    &mut init,
                    channels(k),
                    ip.decoder_width,
                    image_channels,
                )?;
                Box::new(InfoproObjective::new(
                    decoder,
                    head,
                    task,
                    ip.weights(k, k_total),
                    opts.pixels.clone(),
                )) as Box<dyn LocalObjective>
            }
            _ => Box::new(CrossEntropy::on_head(head)),
        });
    }
    objectives.push(Box::new(CrossEntropy::on_logits()));
    Ok(objectives)
}
