//! Building blocks written from candle primitives, so that every one of them is differentiable
//! twice (docs/candle.md: several fused candle-nn ops cut the graph silently).
//!
//! * [`Ctx`] (re-exported from [`crate::ctx`]) carries the forward mode and the tape of
//!   non-smooth decisions that the finite-difference SGR gradient replays.
//! * Layers own their parameters as [`candle_core::Var`]s and list them with
//!   [`Layer::params`] under torchvision-style names.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use crate::ctx::{Ctx, Decision, ReluMode};
use crate::Result;

pub mod pool;
pub mod transformer;
pub mod upsample;

/// Whether a named tensor is trained or is a buffer (BatchNorm running statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Updated by the optimizer.
    Trainable,
    /// Saved with the model, never receives a gradient.
    Buffer,
}

/// A named tensor of a model.
#[derive(Debug, Clone)]
pub struct Param {
    /// torchvision/timm-style name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// The storage, shared with the layer that owns it.
    pub var: Var,
    /// Trainable parameter or buffer.
    pub kind: ParamKind,
}

/// Anything with named parameters.
pub trait Layer {
    /// The layer's tensors, prefixed with the layer's name.
    fn params(&self) -> Vec<Param>;
}

/// ReLU (derivative 1 at 0, as candle's): the fused kernel on the CPU, candle's op elsewhere
/// ([`crate::kernels::relu`] dispatches).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::relu(x)?)
}

/// Deterministic parameter initialisation (ChaCha8 seeded; identical on every platform).
#[derive(Debug)]
pub struct Init {
    rng: ChaCha8Rng,
    device: Device,
    dtype: DType,
}

impl Init {
    /// A new initialiser.
    pub fn new(seed: u64, device: &Device, dtype: DType) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
            dtype,
        }
    }

    /// Device of the created tensors.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Dtype of the created tensors.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller; u1 in (0, 1].
        let u1: f64 = 1.0 - self.rng.gen::<f64>();
        let u2: f64 = self.rng.gen::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// N(0, std²) entries.
    pub fn randn(&mut self, shape: &[usize], std: f64) -> Result<Var> {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| self.normal() * std).collect();
        self.var(data, shape)
    }

    /// N(0, std²) entries truncated to `[a, b]` (absolute bounds, by rejection), as timm's
    /// `trunc_normal_(t, std=std, a=a, b=b)`; timm's ViT uses std 0.02 within ±2.
    pub fn trunc_normal(&mut self, shape: &[usize], std: f64, a: f64, b: f64) -> Result<Var> {
        // Rejection needs an interval of non-negligible mass.
        let (lo, hi) = (a / std, b / std);
        if !(std > 0.0 && a < b && hi > -6.0 && lo < 6.0 && hi - lo > 1e-3) {
            return Err(crate::Error::InvalidConfig(format!(
                "truncated normal with std {std} on [{a}, {b}]: the interval must be non-empty \
                 and hold a non-negligible part of the distribution"
            )));
        }
        let n: usize = shape.iter().product();
        let mut data = Vec::with_capacity(n);
        while data.len() < n {
            let z = self.normal();
            if (lo..=hi).contains(&z) {
                data.push(z * std);
            }
        }
        self.var(data, shape)
    }

    /// U(-bound, bound) entries.
    pub fn uniform(&mut self, shape: &[usize], bound: f64) -> Result<Var> {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n)
            .map(|_| (self.rng.gen::<f64>() * 2.0 - 1.0) * bound)
            .collect();
        self.var(data, shape)
    }

    /// A constant.
    pub fn constant(&mut self, shape: &[usize], value: f64) -> Result<Var> {
        let n: usize = shape.iter().product();
        self.var(vec![value; n], shape)
    }

    fn var(&self, data: Vec<f64>, shape: &[usize]) -> Result<Var> {
        let t = Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok(Var::from_tensor(&t)?)
    }
}

fn param(name: String, var: &Var, kind: ParamKind) -> Param {
    Param {
        name,
        var: var.clone(),
        kind,
    }
}

/// 2-D convolution, without bias (ResNet style, [`Conv2d::new`]) or with one
/// ([`Conv2d::with_bias`], e.g. a ViT patch embedding).
#[derive(Debug, Clone)]
pub struct Conv2d {
    name: String,
    weight: Var,
    bias: Option<Var>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `k`×`k` convolution `cin → cout` without bias, Kaiming-normal (fan-out) initialisation.
    pub fn new(
        name: impl Into<String>,
        init: &mut Init,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        Ok(Self {
            name: name.into(),
            weight: init.randn(&[cout, cin, k, k], std)?,
            bias: None,
            stride,
            padding,
        })
    }

    /// `k`×`k` convolution `cin → cout` with a bias, PyTorch's default initialisation (weight
    /// and bias U(±1/√fan_in), fan_in = cin·k²), as timm's `patch_embed.proj`.
    pub fn with_bias(
        name: impl Into<String>,
        init: &mut Init,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        Ok(Self {
            name: name.into(),
            weight: init.uniform(&[cout, cin, k, k], bound)?,
            bias: Some(init.uniform(&[cout], bound)?),
            stride,
            padding,
        })
    }

    /// Forward pass on NCHW input: the fast kernels on the CPU, candle's convolution elsewhere
    /// ([`crate::kernels::conv2d`] dispatches). Both are differentiable twice.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let y = crate::kernels::conv2d(x, w, self.stride, self.padding)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => Ok(crate::kernels::add_bias(
                &y,
                &b.as_tensor().reshape((1, b.dim(0)?, 1, 1))?,
            )?),
        }
    }

    /// Adds a bias with PyTorch's default initialisation, U(±1/√fan_in) with fan_in = cin·k²
    /// (InfoPro's decoder: Kaiming fan-out weights, default biases).
    pub fn and_default_bias(mut self, init: &mut Init) -> Result<Self> {
        let (cout, cin, kh, kw) = self.weight.as_tensor().dims4()?;
        let bound = 1.0 / ((cin * kh * kw) as f64).sqrt();
        self.bias = Some(init.uniform(&[cout], bound)?);
        Ok(self)
    }

    /// The weight, shape `(cout, cin, k, k)`.
    pub fn weight(&self) -> &Var {
        &self.weight
    }

    /// The bias, shape `(cout,)`, if the convolution has one.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }
}

impl Layer for Conv2d {
    fn params(&self) -> Vec<Param> {
        let mut p = vec![param(
            format!("{}.weight", self.name),
            &self.weight,
            ParamKind::Trainable,
        )];
        if let Some(b) = &self.bias {
            p.push(param(
                format!("{}.bias", self.name),
                b,
                ParamKind::Trainable,
            ));
        }
        p
    }
}

/// BatchNorm over the channel axis of NCHW (or NC) input, from primitives.
///
/// Training mode normalises with the batch mean and the biased batch variance and, when the
/// context allows, updates the running statistics as PyTorch does (momentum 0.1, unbiased
/// variance). Evaluation mode uses the running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    name: String,
    weight: Var,
    bias: Var,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// BatchNorm with `c` channels, γ = 1, β = 0.
    pub fn new(name: impl Into<String>, init: &mut Init, c: usize) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            weight: init.constant(&[c], 1.0)?,
            bias: init.constant(&[c], 0.0)?,
            running_mean: init.constant(&[c], 0.0)?,
            running_var: init.constant(&[c], 1.0)?,
            num_batches_tracked: init.constant(&[1], 0.0)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// Forward pass.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if Self::fused(ctx) {
            let stats = self.fused_stats(x, ctx)?;
            let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
            return Ok(crate::kernels::batch_norm_train(x, w, b, &stats, self.eps)?);
        }
        let rank = x.rank();
        let c = x.dim(1)?;
        let mut shape = vec![1usize; rank];
        shape[1] = c;
        let reduce: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
        let xhat = if ctx.is_train() {
            let mean = x.mean_keepdim(reduce.as_slice())?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(reduce.as_slice())?;
            if ctx.updates_bn_stats() {
                self.update_running_stats(&mean, &var, x.elem_count() / c)?;
            }
            centred.broadcast_div(&(var + self.eps)?.sqrt()?)?
        } else {
            let mean = self.running_mean.as_tensor().reshape(shape.as_slice())?;
            let var = self.running_var.as_tensor().reshape(shape.as_slice())?;
            x.broadcast_sub(&mean)?
                .broadcast_div(&(var + self.eps)?.sqrt()?)?
        };
        self.affine(&xhat, &shape)
    }

    /// `act(BN(x) [+ residual])`, the ReLU following the context's mode (plain, recording its
    /// mask, or replaying a recorded one). Where the fused ops apply (training mode, a
    /// first-order thread) this is, on the CPU, one pass forward (two when recording) and at
    /// most three backward, with one output tensor (candle's ops with the same semantics on
    /// other devices); otherwise the primitive composition, with the same values and masks.
    pub fn forward_act(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        if Self::fused(ctx) {
            let stats = self.fused_stats(x, ctx)?;
            let (w, b, eps) = (self.weight.as_tensor(), self.bias.as_tensor(), self.eps);
            if relu {
                match ctx.relu_mode()? {
                    ReluMode::Plain => {}
                    ReluMode::Record => ctx.record(Decision::Relu(
                        crate::kernels::batch_norm_relu_mask(x, w, b, residual, &stats, eps)?,
                    )),
                    ReluMode::Replay(mask) => {
                        return Ok(crate::kernels::batch_norm_train_masked(
                            x, w, b, residual, &mask, &stats, eps,
                        )?);
                    }
                }
            }
            return Ok(crate::kernels::batch_norm_train_act(
                x, w, b, residual, relu, &stats, eps,
            )?);
        }
        let mut h = self.forward(x, ctx)?;
        if let Some(r) = residual {
            h = (h + r)?;
        }
        if relu {
            ctx.relu(&h)
        } else {
            Ok(h)
        }
    }

    /// Whether the fused ops serve this call (on any device: they dispatch inside): training
    /// mode, and not on a thread whose backward keeps gradient graphs
    /// (`autograd::gradients_keep_graph`; their backward is first order only).
    fn fused(ctx: &Ctx) -> bool {
        ctx.is_train() && !crate::autograd::gradients_keep_graph()
    }

    /// Batch statistics `[2, C]` by the fused kernel, running statistics updated if allowed.
    fn fused_stats(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let stats = crate::kernels::batch_stats(x)?;
        if ctx.updates_bn_stats() {
            let n = x.elem_count() / x.dim(1)?;
            self.update_running_stats(&stats.get(0)?, &stats.get(1)?, n)?;
        }
        Ok(stats)
    }

    /// PyTorch's update: momentum 0.1, unbiased variance over `n` values per channel.
    fn update_running_stats(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let unbiased = if n > 1 {
            n as f64 / (n - 1) as f64
        } else {
            1.0
        };
        let m = self.momentum;
        let bm = mean.detach().flatten_all()?;
        let bv = var.detach().flatten_all()?.affine(unbiased, 0.0)?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (bm * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (bv * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        let nb = (self.num_batches_tracked.as_tensor() + 1.0)?;
        self.num_batches_tracked.set(&nb)?;
        Ok(())
    }

    fn affine(&self, xhat: &Tensor, shape: &[usize]) -> Result<Tensor> {
        let g = self.weight.as_tensor().reshape(shape)?;
        let b = self.bias.as_tensor().reshape(shape)?;
        Ok(xhat.broadcast_mul(&g)?.broadcast_add(&b)?)
    }
}

impl Layer for BatchNorm {
    fn params(&self) -> Vec<Param> {
        let n = &self.name;
        vec![
            param(format!("{n}.weight"), &self.weight, ParamKind::Trainable),
            param(format!("{n}.bias"), &self.bias, ParamKind::Trainable),
            param(
                format!("{n}.running_mean"),
                &self.running_mean,
                ParamKind::Buffer,
            ),
            param(
                format!("{n}.running_var"),
                &self.running_var,
                ParamKind::Buffer,
            ),
            param(
                format!("{n}.num_batches_tracked"),
                &self.num_batches_tracked,
                ParamKind::Buffer,
            ),
        ]
    }
}

/// Fully connected layer, PyTorch's default initialisation (U(±1/√fan_in)).
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: Var,
    bias: Var,
}

impl Linear {
    /// `cin → cout` with bias.
    pub fn new(name: impl Into<String>, init: &mut Init, cin: usize, cout: usize) -> Result<Self> {
        let bound = 1.0 / (cin as f64).sqrt();
        Ok(Self {
            name: name.into(),
            weight: init.uniform(&[cout, cin], bound)?,
            bias: init.uniform(&[cout], bound)?,
        })
    }

    /// A layer from its tensors: `weight` `(cout, cin)`, `bias` `(cout,)` (another
    /// initialisation, e.g. timm's truncated normal with a zero bias).
    pub fn from_vars(name: impl Into<String>, weight: Var, bias: Var) -> Result<Self> {
        let (cout, _) = weight.dims2()?;
        if bias.dims() != [cout] {
            return Err(crate::Error::InvalidConfig(format!(
                "linear layer with weight {:?} needs a bias of shape [{cout}], got {:?}",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(Self {
            name: name.into(),
            weight,
            bias,
        })
    }

    /// Forward pass on `(batch, cin)`, or on `(..., cin)` of any rank ≥ 2 (the leading axes
    /// flattened into one for the matrix product, e.g. the tokens of a Transformer). One fused
    /// op that does not keep the product before the bias; twice differentiable.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::kernels::linear(
            x,
            self.weight.as_tensor(),
            self.bias.as_tensor(),
        )?)
    }
}

impl Layer for Linear {
    fn params(&self) -> Vec<Param> {
        vec![
            param(
                format!("{}.weight", self.name),
                &self.weight,
                ParamKind::Trainable,
            ),
            param(
                format!("{}.bias", self.name),
                &self.bias,
                ParamKind::Trainable,
            ),
        ]
    }
}

/// Global average pooling NCHW → NC.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
}

/// Option-A ResNet shortcut: subsample by 2 in H and W, zero-pad channels to `cout`.
pub fn option_a_shortcut(x: &Tensor, cout: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(crate::Error::InvalidConfig(format!(
            "option-A shortcut needs even spatial size, got {h}x{w}"
        )));
    }
    let sub = x
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, h / 2, w / 2))?;
    let extra = cout.saturating_sub(c);
    Ok(sub.pad_with_zeros(1, extra / 2, extra - extra / 2)?)
}
