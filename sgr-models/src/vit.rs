//! Vision Transformers as timm's `VisionTransformer` (timm 1.0, `global_pool='token'`): a patch
//! embedding convolution (kernel = stride = patch, with bias), a class token, learned position
//! embeddings for the 1 + N tokens, pre-norm Transformer blocks, a final `norm` and a linear
//! `head` on the class token. Parameter names are timm's (`cls_token`, `pos_embed`,
//! `patch_embed.proj`, `blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`,
//! `head`), so timm checkpoints load unchanged; auxiliary heads live under `aux.<k>`.
//!
//! Units: unit 0 is the embedding (patch embedding, class token, position embedding and its
//! dropout), then one unit per block; the classifier stage is the final norm, class-token
//! pooling and the head.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sgr_core::network::{LocalNetwork, Stage};
use sgr_core::nn::transformer::{timm_linear, Block, BlockDrop, LayerNorm, TIMM_INIT_STD};
use sgr_core::nn::{Conv2d, Ctx, Init, Layer, Linear, Param, ParamKind};
use sgr_core::{Error, Result};

pub use crate::family::split_plan;
use crate::family::{Backbone, ModelFamily};
use crate::heads::HeadKind;
use crate::zoo::{Input, ModelOptions};

/// Architecture of a Vision Transformer. The query/key/value projection always has a bias
/// (timm's `qkv_bias=True`, as in every preset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Model name (the preset's).
    pub name: String,
    /// Side of the (square) input image in pixels; a multiple of `patch_size`.
    pub image_size: usize,
    /// Side of a square patch.
    pub patch_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of Transformer blocks.
    pub depth: usize,
    /// Attention heads per block (a divisor of `embed_dim`).
    pub num_heads: usize,
    /// MLP width over token width (hidden = ⌊D · ratio⌋, as timm).
    pub mlp_ratio: f64,
}

/// (name, patch, embed_dim, depth, heads, mlp_ratio) of the presets.
const PRESET_SHAPES: [(&str, usize, usize, usize, usize, f64); 5] = [
    ("deit-ti", 16, 192, 12, 3, 4.0),
    ("deit-s", 16, 384, 12, 6, 4.0),
    ("deit-b", 16, 768, 12, 12, 4.0),
    ("vit-b16", 16, 768, 12, 12, 4.0),
    // A ViT for 32×32 images that trains on a 2-core CPU: 8×8 patches of 4 pixels (65 tokens),
    // width 128, 6 blocks of 4 heads (head width 32), MLP ratio 2: 0.81 M parameters for
    // CIFAR-10, about ResNet-32's compute per image.
    ("vit-cifar", 4, 128, 6, 4, 2.0),
];

impl VitConfig {
    /// The named presets: DeiT-Ti/S/B and ViT-B/16 (patch 16, for 224×224), and `vit-cifar`
    /// (patch 4, for 32×32).
    pub const PRESETS: [&'static str; 5] = ["deit-ti", "deit-s", "deit-b", "vit-b16", "vit-cifar"];

    /// A preset by name for `input`: channels, classes and image size come from the input (the
    /// position embeddings follow the image size, which must be a multiple of the patch).
    pub fn preset(name: &str, input: &Input) -> Result<Self> {
        let &(_, patch, dim, depth, heads, ratio) =
            PRESET_SHAPES.iter().find(|p| p.0 == name).ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "unknown model `{name}`; available: {}",
                    Self::PRESETS.join(", ")
                ))
            })?;
        let cfg = Self {
            name: name.to_string(),
            image_size: input.size,
            patch_size: patch,
            in_channels: input.channels,
            num_classes: input.classes,
            embed_dim: dim,
            depth,
            num_heads: heads,
            mlp_ratio: ratio,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("{}: {m}", self.name)));
        if self.patch_size == 0
            || self.image_size == 0
            || !self.image_size.is_multiple_of(self.patch_size)
        {
            return bad(format!(
                "the image side {} is not a multiple of the patch size {} (the ViT cuts the \
                 image into whole patches)",
                self.image_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "the width {} is not a multiple of the {} attention heads",
                self.embed_dim, self.num_heads
            ));
        }
        if self.depth == 0 || self.in_channels == 0 || self.num_classes < 2 {
            return bad(format!(
                "depth and in_channels must be >= 1 and num_classes >= 2, got {}, {} and {}",
                self.depth, self.in_channels, self.num_classes
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_hidden() >= 1) {
            return bad(format!(
                "the MLP ratio {} leaves no hidden unit",
                self.mlp_ratio
            ));
        }
        Ok(())
    }

    /// Patches per image, N = (image / patch)².
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Tokens per image: the class token and N patches.
    pub fn tokens(&self) -> usize {
        1 + self.num_patches()
    }

    /// MLP hidden width, ⌊D · mlp_ratio⌋ (timm's `int(dim * mlp_ratio)`).
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Splittable units: the embedding plus one per block.
    pub fn units(&self) -> usize {
        1 + self.depth
    }

    /// timm's stochastic-depth rate of each block: linear from 0 at the first block to
    /// `max` at the last (`torch.linspace(0, max, depth)`).
    pub fn drop_path_rates(&self, max: f64) -> Vec<f64> {
        if self.depth == 1 {
            return vec![0.0];
        }
        (0..self.depth)
            .map(|i| max * i as f64 / (self.depth - 1) as f64)
            .collect()
    }
}

/// Unit 0: patch embedding, class token, position embedding, dropout.
#[derive(Debug)]
struct Embed {
    proj: Conv2d,
    cls_token: candle_core::Var,
    pos_embed: candle_core::Var,
    tokens: usize,
    drop: f64,
}

impl Stage for Embed {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let y = self.proj.forward(x)?;
        let (b, d, gh, gw) = y.dims4()?;
        if 1 + gh * gw != self.tokens {
            return Err(Error::InvalidConfig(format!(
                "a {}x{} input gives {} patch tokens, the position embeddings hold {}: the \
                 ViT was built for another image size",
                x.dim(2)?,
                x.dim(3)?,
                gh * gw,
                self.tokens - 1
            )));
        }
        let patches = y.reshape((b, d, gh * gw))?.transpose(1, 2)?;
        let cls = self.cls_token.as_tensor().broadcast_as((b, 1, d))?;
        let h = sgr_core::kernels::add_bias(
            &Tensor::cat(&[&cls, &patches], 1)?,
            self.pos_embed.as_tensor(),
        )?;
        ctx.dropout(&h, self.drop)
    }

    fn params(&self) -> Vec<Param> {
        let p = |name: &str, v: &candle_core::Var| Param {
            name: name.to_string(),
            var: v.clone(),
            kind: ParamKind::Trainable,
        };
        let mut out = vec![
            p("cls_token", &self.cls_token),
            p("pos_embed", &self.pos_embed),
        ];
        out.extend(self.proj.params());
        out
    }
}

/// The class token `(batch, dim)` of tokens `(batch, 1 + N, dim)`.
fn class_token(x: &Tensor) -> Result<Tensor> {
    Ok(x.narrow(1, 0, 1)?.squeeze(1)?)
}

/// The mean of the patch tokens (all but the class token).
fn patch_mean(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(1)?;
    Ok(x.narrow(1, 1, n - 1)?.mean(1)?)
}

/// Final `norm`, class token, `head`. The class token is taken first and normalised alone:
/// LayerNorm works per token, so this equals timm's norm-then-pool.
#[derive(Debug)]
struct Classifier {
    norm: LayerNorm,
    head: Linear,
}

impl Stage for Classifier {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        self.head.forward(&self.norm.forward(&class_token(x)?)?)
    }

    fn params(&self) -> Vec<Param> {
        let mut p = self.norm.params();
        p.extend(self.head.params());
        p
    }
}

/// An auxiliary head on tokens: optionally one Transformer block, then LayerNorm, the class
/// token (`token`) or the mean of the patch tokens (`mean`), and a linear classifier.
#[derive(Debug)]
struct TokenHead {
    block: Option<Block>,
    norm: LayerNorm,
    head: Linear,
    mean: bool,
}

impl Stage for TokenHead {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = match &self.block {
            Some(b) => b.forward(x, ctx)?,
            None => x.clone(),
        };
        let pooled = if self.mean {
            patch_mean(&self.norm.forward(&h)?)?
        } else {
            self.norm.forward(&class_token(&h)?)?
        };
        self.head.forward(&pooled)
    }

    fn params(&self) -> Vec<Param> {
        let mut p = self.block.as_ref().map(Layer::params).unwrap_or_default();
        p.extend(self.norm.params());
        p.extend(self.head.params());
        p
    }
}

/// The aux head of a module, `auto` resolved: `token`, except on a module that is the embedding
/// alone (a block split), which gets `block-token`. There the class token has not yet attended
/// to the patches, so a `token` head would leave the patch embedding without a gradient and a
/// `mean` head the class token; both are refused.
fn head_kind(h: HeadKind, embedding_only: bool) -> Result<HeadKind> {
    match h {
        HeadKind::Auto if embedding_only => Ok(HeadKind::BlockToken),
        HeadKind::Auto => Ok(HeadKind::Token),
        HeadKind::Token | HeadKind::Mean if embedding_only => Err(Error::InvalidConfig(format!(
            "the first module is the patch embedding alone: a `{h}` aux head there would leave \
             the {} untrained; use block-token or block-mean (or auto), or a split whose first \
             module includes blocks.0",
            if h == HeadKind::Token {
                "patch embedding"
            } else {
                "class token"
            }
        ))),
        h @ (HeadKind::Token | HeadKind::Mean | HeadKind::BlockToken | HeadKind::BlockMean) => {
            Ok(h)
        }
        other => Err(Error::InvalidConfig(format!(
            "the aux head `{other}` is not one of the Vision Transformers'; use token, mean, \
             block-token or block-mean"
        ))),
    }
}

/// Builds the aux head `kind` (resolved) of a ViT module, named `prefix.{block,norm,head}`.
fn build_head(
    kind: HeadKind,
    prefix: &str,
    init: &mut Init,
    cfg: &VitConfig,
    outputs: usize,
    drop: f64,
) -> Result<TokenHead> {
    let d = cfg.embed_dim;
    let block = match kind {
        HeadKind::BlockToken | HeadKind::BlockMean => {
            let drop = BlockDrop {
                proj: drop,
                attn: drop,
                path: 0.0,
            };
            let name = format!("{prefix}.block");
            Some(Block::new(
                &name,
                init,
                d,
                cfg.num_heads,
                cfg.mlp_hidden(),
                drop,
            )?)
        }
        _ => None,
    };
    Ok(TokenHead {
        block,
        norm: LayerNorm::new(format!("{prefix}.norm"), init, d)?,
        head: timm_linear(format!("{prefix}.head"), init, d, outputs)?,
        mean: matches!(kind, HeadKind::Mean | HeadKind::BlockMean),
    })
}

/// Builder of Vision Transformers as [`LocalNetwork`]s.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    /// Architecture.
    pub config: VitConfig,
    /// K, split, aux head, seed, dropout (attention, projection, MLP and position-embedding
    /// dropout) and the largest drop-path rate (linear over the blocks).
    pub options: ModelOptions,
}

impl VisionTransformer {
    /// Builds the network on `device` in `dtype`, initialised as timm's ViT (`init_weights`
    /// mode ''): linear weights and `pos_embed` N(0, 0.02²) truncated at ±2, zero biases,
    /// `cls_token` N(0, 1e-12), LayerNorm γ = 1, β = 0, the patch convolution PyTorch's default.
    pub fn build(&self, device: &Device, dtype: DType) -> Result<LocalNetwork> {
        crate::family::build(&self.config, &self.options, device, dtype)
    }
}

/// There are no published split points for ViTs (InfoPro's tables are for ResNets): `auto` is
/// uniform, `infopro` accepts only K = 1 and one module per unit.
impl ModelFamily for VitConfig {
    fn presets() -> Vec<&'static str> {
        Self::PRESETS.to_vec()
    }

    fn preset(name: &str, input: &Input) -> Result<Self> {
        VitConfig::preset(name, input)
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn validate(&self) -> Result<()> {
        VitConfig::validate(self)
    }

    fn io(&self) -> (usize, usize) {
        (self.in_channels, self.num_classes)
    }

    fn units(&self) -> usize {
        VitConfig::units(self)
    }

    /// Tokens, not feature maps: no InfoPro decoder.
    fn unit_channels(&self, _unit: usize) -> Option<usize> {
        None
    }

    fn supports(&self, o: &ModelOptions) -> Result<()> {
        if o.objective == sgr_core::method::Objective::Dgl {
            return Err(Error::InvalidConfig(
                "method dgl trains DGL's convolutional aux head, which needs a feature map; \
                 Vision Transformers train with greedy (aux heads token, mean, block-token, \
                 block-mean), with or without +sgr"
                    .into(),
            ));
        }
        head_kind(o.head_kind(), false).map(drop)
    }

    fn backbone(&self, o: &ModelOptions, init: &mut Init) -> Result<Backbone> {
        let cfg = self;
        let d = cfg.embed_dim;
        let mut units: Vec<Box<dyn Stage>> = Vec::with_capacity(cfg.units());
        let (p, c) = (cfg.patch_size, cfg.in_channels);
        units.push(Box::new(Embed {
            proj: Conv2d::with_bias("patch_embed.proj", init, c, d, p, p, 0)?,
            cls_token: init.randn(&[1, 1, d], 1e-6)?,
            pos_embed: init.trunc_normal(&[1, cfg.tokens(), d], TIMM_INIT_STD, -2.0, 2.0)?,
            tokens: cfg.tokens(),
            drop: o.dropout,
        }));
        for (i, path) in cfg.drop_path_rates(o.drop_path).into_iter().enumerate() {
            let drop = BlockDrop {
                proj: o.dropout,
                attn: o.dropout,
                path,
            };
            let name = format!("blocks.{i}");
            units.push(Box::new(Block::new(
                &name,
                init,
                d,
                cfg.num_heads,
                cfg.mlp_hidden(),
                drop,
            )?));
        }
        let classifier = Box::new(Classifier {
            norm: LayerNorm::new("norm", init, d)?,
            head: timm_linear("head", init, d, cfg.num_classes)?,
        });
        let labels = std::iter::once("embed".to_string())
            .chain((0..cfg.depth).map(|i| format!("blocks.{i}")))
            .collect();
        Ok(Backbone {
            units,
            labels,
            classifier,
        })
    }

    fn head(
        &self,
        o: &ModelOptions,
        units: Range<usize>,
        prefix: &str,
        init: &mut Init,
        outputs: usize,
    ) -> Result<Box<dyn Stage>> {
        let kind = head_kind(o.head_kind(), units == (0..1))?;
        Ok(Box::new(build_head(
            kind, prefix, init, self, outputs, o.dropout,
        )?))
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

    fn cifar() -> Input {
        Input {
            channels: 3,
            classes: 10,
            size: 32,
        }
    }

    /// Trainable scalars of a config, counted from shapes (no tensors allocated).
    fn count(cfg: &VitConfig) -> usize {
        let (d, h, c, p) = (
            cfg.embed_dim,
            cfg.mlp_hidden(),
            cfg.in_channels,
            cfg.patch_size,
        );
        let embed = d + cfg.tokens() * d + d * c * p * p + d;
        let block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (h * d + h) + (d * h + d);
        embed + cfg.depth * block + 2 * d + d * cfg.num_classes + cfg.num_classes
    }

    #[test]
    fn imagenet_presets_have_timms_parameter_counts() {
        for (name, want) in [
            ("deit-ti", 5_717_416),
            ("deit-s", 22_050_664),
            ("deit-b", 86_567_656),
            ("vit-b16", 86_567_656),
        ] {
            let cfg = VitConfig::preset(name, &imagenet()).unwrap();
            assert_eq!(count(&cfg), want, "{name}");
        }
        // ... and the shape count is the built network's (DeiT-Ti is small enough to build).
        let net = VisionTransformer {
            config: VitConfig::preset("deit-ti", &imagenet()).unwrap(),
            options: ModelOptions::default(),
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap();
        assert_eq!(net.num_trainable(), 5_717_416);
        let cifar = VitConfig::preset("vit-cifar", &cifar()).unwrap();
        assert_eq!(count(&cifar), 811_146);
    }

    #[test]
    fn names_are_timms() {
        let opts = ModelOptions {
            modules: 3,
            ..ModelOptions::default()
        };
        let net = VisionTransformer {
            config: VitConfig::preset("vit-cifar", &cifar()).unwrap(),
            options: opts,
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap();
        assert_eq!(net.num_trainable(), 811_146 + 2 * (2 * 128 + 128 * 10 + 10));
        let names: Vec<String> = net.params().into_iter().map(|p| p.name).collect();
        let mut want: Vec<String> = [
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "patch_embed.proj.bias",
        ]
        .map(String::from)
        .to_vec();
        for i in 0..6 {
            for n in [
                "norm1.weight",
                "norm1.bias",
                "attn.qkv.weight",
                "attn.qkv.bias",
                "attn.proj.weight",
                "attn.proj.bias",
                "norm2.weight",
                "norm2.bias",
                "mlp.fc1.weight",
                "mlp.fc1.bias",
                "mlp.fc2.weight",
                "mlp.fc2.bias",
            ] {
                want.push(format!("blocks.{i}.{n}"));
            }
        }
        want.extend(["norm.weight", "norm.bias", "head.weight", "head.bias"].map(String::from));
        for k in 0..2 {
            for n in ["norm.weight", "norm.bias", "head.weight", "head.bias"] {
                want.push(format!("aux.{k}.{n}"));
            }
        }
        assert_eq!(names, want);
        let shape = |n: &str| {
            net.params()
                .into_iter()
                .find(|p| p.name == n)
                .unwrap()
                .var
                .dims()
                .to_vec()
        };
        assert_eq!(shape("cls_token"), [1, 1, 128]);
        assert_eq!(shape("pos_embed"), [1, 65, 128]);
        assert_eq!(shape("patch_embed.proj.weight"), [128, 3, 4, 4]);
        assert_eq!(shape("blocks.5.attn.qkv.weight"), [384, 128]);
        assert_eq!(shape("blocks.5.mlp.fc1.weight"), [256, 128]);
        assert_eq!(net.unit_label(0), "embed");
        assert_eq!(net.unit_label(6), "blocks.5");
        assert_eq!(net.name(), "vit-cifar");
    }

    #[test]
    fn backbone_does_not_depend_on_k_or_head() {
        let build = |modules, head| {
            VisionTransformer {
                config: VitConfig::preset("vit-cifar", &cifar()).unwrap(),
                options: ModelOptions {
                    modules,
                    head,
                    ..ModelOptions::default()
                },
            }
            .build(&Device::Cpu, DType::F32)
            .unwrap()
        };
        let a = build(1, HeadKind::Auto);
        let b = build(4, HeadKind::BlockMean);
        let pb = b.params();
        assert!(pb.iter().any(|p| p.name == "aux.2.block.mlp.fc2.bias"));
        for p in a.params() {
            let q = pb.iter().find(|q| q.name == p.name).unwrap();
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
    }

    #[test]
    fn split_plans() {
        let cfg = VitConfig::preset("vit-cifar", &cifar()).unwrap();
        assert_eq!(cfg.units(), 7);
        let p = split_plan(&cfg, 1, SplitStrategy::Auto, None).unwrap();
        assert_eq!(p.ends(), &[6]);
        let p = split_plan(&cfg, 3, SplitStrategy::Auto, None).unwrap();
        assert_eq!(p.ends(), &[2, 4, 6]);
        let p = split_plan(&cfg, 2, SplitStrategy::Uniform, None).unwrap();
        assert_eq!(p.ends(), &[3, 6]);
        let p = split_plan(&cfg, 7, SplitStrategy::Block, None).unwrap();
        assert_eq!(p.ends(), &[0, 1, 2, 3, 4, 5, 6]);
        let p = split_plan(&cfg, 2, SplitStrategy::Balanced, Some(&[1, 6])).unwrap();
        assert_eq!(p.ends(), &[1, 6]);
        let e = split_plan(&cfg, 2, SplitStrategy::Infopro, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no InfoPro split points"), "{e}");
        let e = split_plan(&cfg, 8, SplitStrategy::Uniform, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("K from 1 to 7"), "{e}");
        let e = split_plan(&cfg, 3, SplitStrategy::Block, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("K=7"), "{e}");
        let deit = VitConfig::preset("deit-s", &imagenet()).unwrap();
        let p = split_plan(&deit, 4, SplitStrategy::Auto, None).unwrap();
        assert_eq!(p.ends(), &[3, 6, 9, 12]);
    }

    #[test]
    fn presets_follow_the_input_and_check_it() {
        let cfg = VitConfig::preset("deit-ti", &cifar()).unwrap();
        assert_eq!(
            (cfg.image_size, cfg.num_patches(), cfg.tokens()),
            (32, 4, 5)
        );
        let grey = Input {
            channels: 1,
            classes: 7,
            size: 28,
        };
        let cfg = VitConfig::preset("vit-cifar", &grey).unwrap();
        assert_eq!((cfg.in_channels, cfg.num_classes, cfg.tokens()), (1, 7, 50));
        let e = VitConfig::preset("deit-s", &grey).unwrap_err().to_string();
        assert!(e.contains("not a multiple of the patch size 16"), "{e}");
        let e = VitConfig::preset("vit-l16", &cifar())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("deit-ti, deit-s, deit-b, vit-b16, vit-cifar"),
            "{e}"
        );
        let net = VisionTransformer {
            config: VitConfig::preset("vit-cifar", &cifar()).unwrap(),
            options: ModelOptions::default(),
        }
        .build(&Device::Cpu, DType::F32)
        .unwrap();
        let x = Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let e = net.forward(&x, &mut Ctx::eval()).unwrap_err().to_string();
        assert!(e.contains("built for another image size"), "{e}");
        let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(net.forward(&x, &mut Ctx::eval()).unwrap().dims(), &[2, 10]);
    }

    #[test]
    fn heads_of_other_families_are_refused() {
        let cfg = VitConfig::preset("vit-cifar", &cifar()).unwrap();
        for head in [
            HeadKind::OneConvTwoFc,
            HeadKind::ZeroConvOneFc,
            HeadKind::Dgl,
        ] {
            let e = VisionTransformer {
                config: cfg.clone(),
                options: ModelOptions {
                    modules: 2,
                    head,
                    ..ModelOptions::default()
                },
            }
            .build(&Device::Cpu, DType::F32)
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("use token, mean, block-token or block-mean"),
                "{e}"
            );
        }
        // The embedding alone (block split): auto gives it a block-token head, token and mean
        // are refused there.
        let build = |head| {
            VisionTransformer {
                config: cfg.clone(),
                options: ModelOptions {
                    modules: 7,
                    split: SplitStrategy::Block,
                    head,
                    ..ModelOptions::default()
                },
            }
            .build(&Device::Cpu, DType::F32)
        };
        let names: Vec<String> = build(HeadKind::Auto)
            .unwrap()
            .params()
            .into_iter()
            .map(|p| p.name)
            .filter(|n| n.starts_with("aux."))
            .collect();
        assert!(names.contains(&"aux.0.block.attn.qkv.weight".to_string()));
        assert!(names.contains(&"aux.1.norm.weight".to_string()));
        assert!(!names.iter().any(|n| n.starts_with("aux.1.block")));
        for head in [HeadKind::Token, HeadKind::Mean] {
            let e = build(head).unwrap_err().to_string();
            assert!(e.contains("patch embedding alone"), "{e}");
        }
        assert!(build(HeadKind::BlockMean).is_ok());
        assert_eq!(cfg.drop_path_rates(0.1).len(), 6);
        assert!((cfg.drop_path_rates(0.1)[5] - 0.1).abs() < 1e-15);
        assert_eq!(cfg.drop_path_rates(0.1)[0], 0.0);
    }
}
