//! LocalMixer (Ren, Kornblith, Liao and Hinton, ICLR 2023): an MLP-Mixer built for local
//! learning and forward gradients (docs/models.md, "LocalMixer"; docs/bpfree.md).
//!
//! The image is cut into `patches × patches` non-overlapping patches, each flattened (pixel
//! rows, then columns, then channels). Block 0 is channel Linear → LayerNorm → ReLU → group
//! Linear → LayerNorm → ReLU; every later block is token-mixing Linear → LN → ReLU → channel
//! Linear → LN → ReLU → group Linear → LN → + residual → ReLU. The LayerNorms have no affine
//! parameters and normalise each patch's channels (each group's, after a group Linear). A
//! group Linear maps the channels of each of `groups` groups on their own.
//!
//! Units: one per block, then `pool` (the mean over patches, no parameters); the classifier
//! `head` is a Linear on the pooled features. Built with one module per block plus the read-out
//! (K = blocks + 1, as Ren et al. train it: the last block has its own head and the read-out
//! learns on detached features), the parameter count is the paper's. Tensor names:
//! `blocks.<i>.{token_mix,channel_mix,group_mix}.{weight,bias}`, `head.*`, aux heads `aux.<k>.*`.

use std::ops::Range;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use sgr_core::forward::{
    layer_norm, layer_norm_jacobian, ForwardMode, ForwardSupport, Perturbation, TangentPass,
    TangentRecord,
};
use sgr_core::method::Objective;
use sgr_core::network::Stage;
use sgr_core::nn::{Ctx, Init, Layer, Linear, Param, ParamKind};
use sgr_core::{Error, Result};

pub use crate::family::split_plan;
use crate::family::{Backbone, ModelFamily};
use crate::heads::HeadKind;
use crate::zoo::{Input, ModelOptions};

/// Architecture of a LocalMixer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalMixerConfig {
    /// Model name (the preset's).
    pub name: String,
    /// Side of the (square) input image in pixels; a multiple of `patches`.
    pub image_size: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub num_classes: usize,
    /// Mixer blocks.
    pub blocks: usize,
    /// Patches per image side (the image has `patches²` tokens).
    pub patches: usize,
    /// Channels of every block.
    pub channels: usize,
    /// Channel groups of the group Linear and of the local losses.
    pub groups: usize,
}

/// (name, blocks, patches per side, channels, groups). The first four are the paper's Table 2
/// (S/1/1, M/1/16 for MNIST; M/8/16, L/8/64 for CIFAR-10); `localmixer-mnist` is a multi-block
/// model sized for 28×28 MNIST on a CPU, one module per block: 16 patches of 7×7 pixels.
const PRESET_SHAPES: [(&str, usize, usize, usize, usize); 5] = [
    ("localmixer-s-1-1", 1, 1, 256, 1),
    ("localmixer-m-1-16", 1, 1, 512, 16),
    ("localmixer-m-8-16", 4, 8, 512, 16),
    ("localmixer-l-8-64", 4, 8, 2048, 64),
    ("localmixer-mnist", 3, 4, 128, 8),
];

impl LocalMixerConfig {
    /// The preset names.
    pub const PRESETS: [&'static str; 5] = [
        "localmixer-s-1-1",
        "localmixer-m-1-16",
        "localmixer-m-8-16",
        "localmixer-l-8-64",
        "localmixer-mnist",
    ];

    /// A preset for `input` (channels, classes and image side come from the data).
    pub fn preset(name: &str, input: &Input) -> Result<Self> {
        let &(_, blocks, patches, channels, groups) =
            PRESET_SHAPES.iter().find(|p| p.0 == name).ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "unknown model `{name}`; available: {}",
                    Self::PRESETS.join(", ")
                ))
            })?;
        let cfg = Self {
            name: name.to_string(),
            image_size: input.size,
            in_channels: input.channels,
            num_classes: input.classes,
            blocks,
            patches,
            channels,
            groups,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that the image cuts into whole patches and the channels into whole groups.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(format!("{}: {m}", self.name)));
        if self.patches == 0
            || self.image_size == 0
            || !self.image_size.is_multiple_of(self.patches)
        {
            return bad(format!(
                "the image side {} is not a multiple of {} patches per side (LocalMixer cuts \
                 the image into whole patches)",
                self.image_size, self.patches
            ));
        }
        if self.groups == 0 || !self.channels.is_multiple_of(self.groups) {
            return bad(format!(
                "{} channels do not split into {} groups",
                self.channels, self.groups
            ));
        }
        if self.blocks == 0 || self.in_channels == 0 || self.num_classes == 0 {
            return bad("blocks, channels and classes must be positive".into());
        }
        Ok(())
    }

    /// Tokens per image.
    pub fn tokens(&self) -> usize {
        self.patches * self.patches
    }

    /// Values in one flattened patch.
    pub fn patch_dim(&self) -> usize {
        let side = self.image_size / self.patches;
        side * side * self.in_channels
    }
}

/// Which linear map a layer of a block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Across the patches of each channel: weight `(P, P)`.
    Token,
    /// Across the channels of each patch: weight `(C_out, C_in)`.
    Channel,
    /// Within each channel group of each patch: weight `(G, C/G, C/G)`.
    Group,
}

/// One linear layer of a block with its LayerNorm.
#[derive(Debug)]
struct MixLayer {
    mix: Mix,
    name: String,
    weight: Var,
    bias: Var,
    /// Groups of the map and of the LayerNorm after it (1 but for [`Mix::Group`]).
    groups: usize,
}

impl MixLayer {
    fn new(
        mix: Mix,
        name: String,
        init: &mut Init,
        cin: usize,
        cout: usize,
        groups: usize,
    ) -> Result<Self> {
        // PyTorch's default: U(±1/√fan_in) for weight and bias.
        let (w_shape, b_shape, fan_in) = match mix {
            Mix::Group => (
                vec![groups, cout / groups, cin / groups],
                vec![groups, cout / groups],
                cin / groups,
            ),
            Mix::Token | Mix::Channel => (vec![cout, cin], vec![cout], cin),
        };
        let bound = 1.0 / (fan_in as f64).sqrt();
        Ok(Self {
            mix,
            name,
            weight: init.uniform(&w_shape, bound)?,
            bias: init.uniform(&b_shape, bound)?,
            groups: if mix == Mix::Group { groups } else { 1 },
        })
    }

    /// The affine map on `x` `(B, P, C_in)` with weight `w` and optional bias `b`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let (n, p, c) = x.dims3()?;
        let y = match self.mix {
            Mix::Token => {
                let xt = x.transpose(1, 2)?.contiguous()?.reshape((n * c, p))?;
                let mut y = xt.matmul(&w.t()?)?;
                if let Some(b) = b {
                    y = y.broadcast_add(b)?;
                }
                y.reshape((n, c, p))?.transpose(1, 2)?.contiguous()?
            }
            Mix::Channel => {
                let mut y = x.reshape((n * p, c))?.matmul(&w.t()?)?;
                if let Some(b) = b {
                    y = y.broadcast_add(b)?;
                }
                let cout = y.dim(1)?;
                y.reshape((n, p, cout))?
            }
            Mix::Group => {
                let xg = self.by_group(x)?;
                let mut y = xg.matmul(&w.transpose(1, 2)?)?.transpose(0, 1)?;
                if let Some(b) = b {
                    y = y.broadcast_add(b)?;
                }
                let cout = y.dim(1)? * y.dim(2)?;
                y.contiguous()?.reshape((n, p, cout))?
            }
        };
        Ok(y)
    }

    /// `(B, P, C)` → `(groups, B·P, C/groups)`: one matrix per group for a batched product.
    fn by_group(&self, t: &Tensor) -> Result<Tensor> {
        let (n, p, c) = t.dims3()?;
        let g = self.groups;
        Ok(t.reshape((n * p, g, c / g))?
            .transpose(0, 1)?
            .contiguous()?)
    }

    /// LayerNorm of `s` `(B, P, C)` per patch (per group): `(y, r)`, `r` `(B, P, groups, 1)`.
    fn norm(&self, s: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, p, c) = s.dims3()?;
        let (y, r) = layer_norm(&s.reshape((n, p, self.groups, c / self.groups))?)?;
        Ok((y.reshape((n, p, c))?, r))
    }

    /// The LayerNorm's Jacobian at (`y`, `r`) applied to `v` `(B, P, C)`.
    fn norm_jacobian(&self, y: &Tensor, r: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (n, p, c) = y.dims3()?;
        let shape = (n, p, self.groups, c / self.groups);
        Ok(layer_norm_jacobian(&y.reshape(shape)?, r, &v.reshape(shape)?)?.reshape((n, p, c))?)
    }

    /// Weight and bias gradients from the layer input `x` and the gradient `gs` at the
    /// pre-normalisation output.
    fn weight_grads(&self, x: &Tensor, gs: &Tensor) -> Result<[Tensor; 2]> {
        let (n, p, c) = x.dims3()?;
        let cout = gs.dim(2)?;
        Ok(match self.mix {
            Mix::Token => [
                gs.matmul(&x.transpose(1, 2)?.contiguous()?)?.sum(0)?,
                gs.sum(2)?.sum(0)?,
            ],
            Mix::Channel => {
                let g2 = gs.reshape((n * p, cout))?;
                [g2.t()?.matmul(&x.reshape((n * p, c))?)?, g2.sum(0)?]
            }
            Mix::Group => {
                let (gg, xg) = (self.by_group(gs)?, self.by_group(x)?);
                [gg.transpose(1, 2)?.matmul(&xg)?, gg.sum(1)?]
            }
        })
    }
}

/// One LocalMixer block (a unit): block 0 also cuts the image into patches.
#[derive(Debug)]
pub struct MixerBlock {
    name: String,
    layers: Vec<MixLayer>,
    /// Block 0: the patches per side, to cut the image.
    patchify: Option<usize>,
    groups: usize,
    channels: usize,
}

impl MixerBlock {
    fn new(cfg: &LocalMixerConfig, index: usize, init: &mut Init) -> Result<Self> {
        let name = format!("blocks.{index}");
        let (c, g, t) = (cfg.channels, cfg.groups, cfg.tokens());
        let mut layers = Vec::new();
        let cin = if index == 0 {
            cfg.patch_dim()
        } else {
            layers.push(MixLayer::new(
                Mix::Token,
                format!("{name}.token_mix"),
                init,
                t,
                t,
                1,
            )?);
            c
        };
        layers.push(MixLayer::new(
            Mix::Channel,
            format!("{name}.channel_mix"),
            init,
            cin,
            c,
            1,
        )?);
        layers.push(MixLayer::new(
            Mix::Group,
            format!("{name}.group_mix"),
            init,
            c,
            c,
            g,
        )?);
        Ok(Self {
            name,
            layers,
            patchify: (index == 0).then_some(cfg.patches),
            groups: g,
            channels: c,
        })
    }

    /// `(B, C, H, W)` images → `(B, patches², patch pixels)`, each patch flattened (rows,
    /// columns, channels); other inputs pass unchanged.
    fn tokens(&self, x: &Tensor) -> Result<Tensor> {
        let Some(n) = self.patchify else {
            return Ok(x.clone());
        };
        let (b, c, h, w) = x.dims4().map_err(|_| {
            Error::InvalidConfig(format!(
                "{}: expects images (batch, channels, height, width), got {:?}",
                self.name,
                x.dims()
            ))
        })?;
        let (ph, pw) = (h / n, w / n);
        if ph * n != h || pw * n != w {
            return Err(Error::InvalidConfig(format!(
                "{}: a {h}×{w} image does not cut into {n}×{n} whole patches",
                self.name
            )));
        }
        Ok(x.reshape((b, c, n, ph, n, pw))?
            .permute((0, 2, 4, 3, 5, 1))?
            .contiguous()?
            .reshape((b, n * n, ph * pw * c))?)
    }

    fn residual(&self) -> bool {
        self.patchify.is_none()
    }
}

impl Stage for MixerBlock {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let input = self.tokens(x)?;
        let mut h = input.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            let s = l.linear(&h, l.weight.as_tensor(), Some(l.bias.as_tensor()))?;
            let (mut z, _) = l.norm(&s)?;
            if i == last && self.residual() {
                z = (z + &input)?;
            }
            h = ctx.relu(&z)?;
        }
        Ok(h)
    }

    fn params(&self) -> Vec<Param> {
        self.layers
            .iter()
            .flat_map(|l| {
                [("weight", &l.weight), ("bias", &l.bias)].map(|(what, v)| Param {
                    name: format!("{}.{what}", l.name),
                    var: v.clone(),
                    kind: ParamKind::Trainable,
                })
            })
            .collect()
    }

    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }

    fn forward_support(&self) -> ForwardSupport<'_> {
        ForwardSupport::Perturbable(self)
    }
}

impl ForwardMode for MixerBlock {
    fn groups(&self) -> usize {
        self.groups
    }

    fn activity_shapes(&self, input: &[usize]) -> Result<Vec<Vec<usize>>> {
        let (b, p) = match (self.patchify, input) {
            (Some(n), [b, ..]) => (*b, n * n),
            (None, [b, p, _]) => (*b, *p),
            _ => {
                return Err(Error::InvalidConfig(format!(
                    "{}: no noise shapes for an input of shape {input:?}",
                    self.name
                )))
            }
        };
        Ok(vec![vec![b, p, self.channels]; self.layers.len()])
    }

    fn forward_tangent(
        &self,
        x: &Tensor,
        tangent: Option<&Tensor>,
        perturbation: Perturbation<'_>,
        ctx: &mut Ctx,
    ) -> Result<TangentPass> {
        let n_layers = self.layers.len();
        match perturbation {
            Perturbation::Activity(u) if u.len() != n_layers => {
                return Err(Error::Internal(format!(
                    "{}: {} noise tensors for {n_layers} layers",
                    self.name,
                    u.len()
                )))
            }
            Perturbation::Weight(v) if v.len() != 2 * n_layers => {
                return Err(Error::Internal(format!(
                    "{}: {} weight tangents for {} tensors",
                    self.name,
                    v.len(),
                    2 * n_layers
                )))
            }
            _ => {}
        }
        let input = self.tokens(&x.detach())?;
        let t_input = tangent.map(|t| self.tokens(&t.detach())).transpose()?;
        let (mut h, mut t) = (input.clone(), t_input.clone());
        let mut record = TangentRecord::default();
        for (i, l) in self.layers.iter().enumerate() {
            let (w, b) = (l.weight.as_tensor().detach(), l.bias.as_tensor().detach());
            let s = l.linear(&h, &w, Some(&b))?;
            // ṡ = ẋWᵀ (+ xẆᵀ + ḃ)
            let mut ts = t.as_ref().map(|t| l.linear(t, &w, None)).transpose()?;
            if let Perturbation::Weight(v) = perturbation {
                let dw = l.linear(&h, &v[2 * i], Some(&v[2 * i + 1]))?;
                ts = Some(match ts {
                    Some(ts) => (ts + dw)?,
                    None => dw,
                });
            }
            let (y, r) = l.norm(&s)?;
            let mut tz = ts.map(|ts| l.norm_jacobian(&y, &r, &ts)).transpose()?;
            if let Perturbation::Activity(u) = perturbation {
                tz = Some(match tz {
                    Some(tz) => (tz + &u[i])?,
                    None => u[i].clone(),
                });
            }
            let mut z = y.clone();
            if i + 1 == n_layers && self.residual() {
                z = (z + &input)?;
                if let Some(ti) = &t_input {
                    tz = Some(match tz {
                        Some(tz) => (tz + ti)?,
                        None => ti.clone(),
                    });
                }
            }
            let m = ctx.relu_mask(&z)?;
            record.tensors.extend([h, y, r, m.clone()]);
            h = (z * &m)?;
            t = tz.map(|tz| tz * &m).transpose()?;
        }
        Ok(TangentPass {
            output: h,
            tangent: t,
            record,
        })
    }

    fn estimate(
        &self,
        record: &TangentRecord,
        jvp: &Tensor,
        perturbation: Perturbation<'_>,
    ) -> Result<Vec<Tensor>> {
        let (b, p, g) = jvp.dims3()?;
        if g != self.groups {
            return Err(Error::InvalidConfig(format!(
                "{}: local losses in {g} groups for a block of {} groups (a module's blocks \
                 must share their groups)",
                self.name, self.groups
            )));
        }
        let c = self.channels;
        let mut out = Vec::with_capacity(2 * self.layers.len());
        match perturbation {
            // g(W) = Σ_{b,p} xᵀ·LN'ᵀ(J·u·mask): each output takes its own copy's derivative
            // (the token layer's patch sums its groups).
            Perturbation::Activity(u) => {
                let per_channel = jvp
                    .unsqueeze(3)?
                    .broadcast_as((b, p, g, c / g))?
                    .reshape((b, p, c))?;
                let per_patch = jvp.sum_keepdim(2)?;
                for (i, l) in self.layers.iter().enumerate() {
                    let [x, y, r, m] = &record.tensors[4 * i..4 * i + 4] else {
                        return Err(Error::Internal(format!(
                            "{}: the tangent record is incomplete",
                            self.name
                        )));
                    };
                    let j = match l.mix {
                        Mix::Token => u[i].broadcast_mul(&per_patch)?,
                        Mix::Channel | Mix::Group => (&u[i] * &per_channel)?,
                    };
                    let gz = (j * m)?;
                    let gs = l.norm_jacobian(y, r, &gz)?;
                    out.extend(l.weight_grads(x, &gs)?);
                }
            }
            // g(W) = (Σ copies' derivatives)·v, each output group's slice by its own copies.
            Perturbation::Weight(v) => {
                let per_group = jvp.sum(1)?.sum(0)?; // (G,)
                let total = per_group.sum_all()?;
                for (i, l) in self.layers.iter().enumerate() {
                    let (vw, vb) = (&v[2 * i], &v[2 * i + 1]);
                    match l.mix {
                        Mix::Token => {
                            out.push(vw.broadcast_mul(&total)?);
                            out.push(vb.broadcast_mul(&total)?);
                        }
                        Mix::Channel => {
                            let rows = per_group
                                .unsqueeze(1)?
                                .broadcast_as((g, c / g))?
                                .reshape(c)?;
                            out.push(vw.broadcast_mul(&rows.unsqueeze(1)?)?);
                            out.push((vb * &rows)?);
                        }
                        Mix::Group => {
                            out.push(vw.broadcast_mul(&per_group.reshape((g, 1, 1))?)?);
                            out.push(vb.broadcast_mul(&per_group.reshape((g, 1))?)?);
                        }
                    }
                }
            }
            Perturbation::None => {
                return Err(Error::Internal(format!(
                    "{}: no perturbation to estimate from",
                    self.name
                )))
            }
        }
        Ok(out)
    }
}

/// The mean over patches (a parameter-free unit before the classifier).
#[derive(Debug)]
pub struct MixerPool;

impl Stage for MixerPool {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        Ok(x.mean(1)?)
    }

    fn params(&self) -> Vec<Param> {
        Vec::new()
    }

    fn name(&self) -> Option<&str> {
        Some("pool")
    }

    fn forward_support(&self) -> ForwardSupport<'_> {
        ForwardSupport::Readout
    }
}

/// A linear read-out: the mean over patches when given tokens, then Linear(C → outputs). The
/// classifier (`head`) and the aux heads.
#[derive(Debug)]
pub struct MixerHead {
    fc: Linear,
}

impl MixerHead {
    /// `Linear(channels → outputs)` named `name`.
    pub fn new(name: &str, init: &mut Init, channels: usize, outputs: usize) -> Result<Self> {
        Ok(Self {
            fc: Linear::new(name, init, channels, outputs)?,
        })
    }
}

impl Stage for MixerHead {
    fn forward(&self, x: &Tensor, _ctx: &mut Ctx) -> Result<Tensor> {
        let pooled = if x.rank() == 3 { x.mean(1)? } else { x.clone() };
        self.fc.forward(&pooled)
    }

    fn params(&self) -> Vec<Param> {
        self.fc.params()
    }

    fn forward_support(&self) -> ForwardSupport<'_> {
        ForwardSupport::Readout
    }
}

impl ModelFamily for LocalMixerConfig {
    fn presets() -> Vec<&'static str> {
        Self::PRESETS.to_vec()
    }

    fn preset(name: &str, input: &Input) -> Result<Self> {
        LocalMixerConfig::preset(name, input)
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn validate(&self) -> Result<()> {
        LocalMixerConfig::validate(self)
    }

    fn io(&self) -> (usize, usize) {
        (self.in_channels, self.num_classes)
    }

    /// The blocks, then the pooling before the classifier.
    fn units(&self) -> usize {
        self.blocks + 1
    }

    /// Tokens, not feature maps: no InfoPro decoder.
    fn unit_channels(&self, _unit: usize) -> Option<usize> {
        None
    }

    fn supports(&self, o: &ModelOptions) -> Result<()> {
        if !matches!(o.objective, Objective::Bp | Objective::Greedy) {
            return Err(Error::InvalidConfig(format!(
                "{} trains with bp or greedy (with or without +sgr), the local losses of Ren et \
                 al.; `{}` needs heads the LocalMixer does not have",
                self.name, o.objective
            )));
        }
        match o.head_kind() {
            HeadKind::Auto | HeadKind::Mean => {}
            h => {
                return Err(Error::InvalidConfig(format!(
                    "{}: aux head `{h}` is not a LocalMixer head; its heads are the mean over \
                     patches + Linear (--aux-head auto or mean)",
                    self.name
                )))
            }
        }
        if o.dropout > 0.0 || o.drop_path > 0.0 {
            return Err(Error::InvalidConfig(format!(
                "{} has no dropout or drop-path: leave --dropout and --drop-path at 0",
                self.name
            )));
        }
        Ok(())
    }

    fn backbone(&self, _o: &ModelOptions, init: &mut Init) -> Result<Backbone> {
        let mut units: Vec<Box<dyn Stage>> = Vec::with_capacity(self.units());
        let mut labels = Vec::with_capacity(self.units());
        for i in 0..self.blocks {
            units.push(Box::new(MixerBlock::new(self, i, init)?));
            labels.push(format!("blocks.{i}"));
        }
        units.push(Box::new(MixerPool));
        labels.push("pool".into());
        Ok(Backbone {
            units,
            labels,
            classifier: Box::new(MixerHead::new(
                "head",
                init,
                self.channels,
                self.num_classes,
            )?),
        })
    }

    fn head(
        &self,
        _o: &ModelOptions,
        units: Range<usize>,
        prefix: &str,
        init: &mut Init,
        outputs: usize,
    ) -> Result<Box<dyn Stage>> {
        if units.end > self.blocks {
            return Err(Error::InvalidConfig(format!(
                "{}: a module ending at the pooling is the read-out and has no aux head",
                self.name
            )));
        }
        Ok(Box::new(MixerHead::new(
            prefix,
            init,
            self.channels,
            outputs,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn build(name: &str, input: Input, k: usize) -> sgr_core::network::LocalNetwork {
        crate::family::build(
            &LocalMixerConfig::preset(name, &input).unwrap(),
            &ModelOptions {
                modules: k,
                ..ModelOptions::default()
            },
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
    }

    #[test]
    fn presets_have_the_papers_parameter_counts() {
        let mnist = Input {
            channels: 1,
            classes: 10,
            size: 28,
        };
        let cifar = Input {
            channels: 3,
            classes: 10,
            size: 32,
        };
        // Table 2 of Ren et al. (272K, 429K, 919K, 13.1M), built as the paper trains them:
        // one module per block and the read-out (K = blocks + 1).
        for (name, input, k, count) in [
            ("localmixer-s-1-1", mnist, 2, 271_892),
            ("localmixer-m-1-16", mnist, 2, 429_076),
            ("localmixer-m-8-16", cifar, 5, 918_770),
            ("localmixer-l-8-64", cifar, 5, 13_074_674),
        ] {
            let net = build(name, input, k);
            assert_eq!(net.num_trainable(), count, "{name}");
        }
    }

    #[test]
    fn patches_are_rows_columns_channels() {
        let cfg = LocalMixerConfig::preset(
            "localmixer-mnist",
            &Input {
                channels: 2,
                classes: 10,
                size: 8,
            },
        )
        .unwrap();
        let block = MixerBlock::new(&cfg, 0, &mut Init::new(0, &Device::Cpu, DType::F32)).unwrap();
        let x = Tensor::arange(0f32, 128., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 8, 8))
            .unwrap();
        let t = block.tokens(&x).unwrap();
        assert_eq!(t.dims(), &[1, 16, 8]);
        // patch (0, 1): rows 0..2, columns 2..4; channel 0 then 1 for each pixel
        let v = t.get(0).unwrap().get(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![2., 66., 3., 67., 10., 74., 11., 75.]);
    }
}
