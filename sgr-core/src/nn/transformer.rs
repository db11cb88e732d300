//! Transformer layers (LayerNorm, GELU, softmax, attention). They run sgr-kernels' fused ops,
//! which keep only their operands and outputs for backward (see docs/performance.md), except on
//! a thread whose backward keeps gradient graphs (the exact SGR gradient), where they run the
//! compositions of candle's ops in `kernels::generic`, which differentiate twice (candle-nn's
//! fused `layer_norm` and `softmax_last_dim` have no backward; candle's `gelu_erf` backward uses
//! a truncated constant, ≈1e-6 relative off).
//!
//! The layers follow timm's `VisionTransformer` (timm 1.0): pre-norm [`Block`]s of multi-head
//! self-attention ([`Attention`]: `qkv`, `proj`) and an [`Mlp`] (`fc1`, GELU, `fc2`), with
//! timm's parameter names. Every dropout and drop-path goes through [`Ctx::dropout`] /
//! [`Ctx::drop_path`], so they are the identity in evaluation mode and their masks are recorded
//! and replayed by the finite-difference SGR passes.

use candle_core::Tensor;

use super::{param, Ctx, Init, Layer, Linear, Param, ParamKind};
use crate::kernels;
use crate::network::Stage;
use crate::{Error, Result};
use candle_core::Var;

/// The standard deviation of timm's ViT initialisation of linear weights and position
/// embeddings (`trunc_normal_(std=.02)`, truncated at ±2).
pub const TIMM_INIT_STD: f64 = 0.02;

/// A linear layer initialised as timm's ViT (`init_weights_vit_timm`): weight N(0, 0.02²)
/// truncated at ±2, bias 0.
pub fn timm_linear(
    name: impl Into<String>,
    init: &mut Init,
    cin: usize,
    cout: usize,
) -> Result<Linear> {
    let w = init.trunc_normal(&[cout, cin], TIMM_INIT_STD, -2.0, 2.0)?;
    let b = init.constant(&[cout], 0.0)?;
    Linear::from_vars(name, w, b)
}

/// Layer normalisation over the last axis with a learned scale and shift (PyTorch's
/// `nn.LayerNorm`, biased variance), from primitives.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    name: String,
    weight: Var,
    bias: Var,
    eps: f64,
}

impl LayerNorm {
    /// timm's ViT default ε.
    pub const VIT_EPS: f64 = 1e-6;

    /// LayerNorm over `dim` features, γ = 1, β = 0, ε = 1e-6 (timm's ViT).
    pub fn new(name: impl Into<String>, init: &mut Init, dim: usize) -> Result<Self> {
        Self::with_eps(name, init, dim, Self::VIT_EPS)
    }

    /// LayerNorm with another ε (PyTorch's default is 1e-5).
    pub fn with_eps(
        name: impl Into<String>,
        init: &mut Init,
        dim: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            weight: init.constant(&[dim], 1.0)?,
            bias: init.constant(&[dim], 0.0)?,
            eps,
        })
    }

    /// `(x − mean) / √(var + ε) · γ + β` over the last axis: the fused kernel, or on a thread
    /// whose backward keeps gradient graphs the composition of candle's ops (the kernel is
    /// first order only).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
        Ok(if fused() {
            kernels::layer_norm(x, w, b, self.eps)?
        } else {
            kernels::generic::layer_norm(x, w, b, self.eps)?
        })
    }
}

impl Layer for LayerNorm {
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

/// Whether the fused first-order kernels serve this call: not on a thread whose backward keeps
/// gradient graphs (`autograd::gradients_keep_graph`, the exact SGR gradient).
fn fused() -> bool {
    !crate::autograd::gradients_keep_graph()
}

/// Exact GELU, `x · Φ(x) = x/2 · (1 + erf(x/√2))` (PyTorch's `nn.GELU()`): the fused kernel, or
/// on a thread whose backward keeps gradient graphs the composition from `erf`, whose candle
/// backward `2/√π · exp(−x²)` is exact and differentiable again.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(if fused() {
        kernels::gelu(x)?
    } else {
        kernels::generic::gelu(x)?
    })
}

/// Softmax over the last axis, `exp(x − max) / Σ exp(x − max)`, the maximum detached (the
/// shift does not change the value, so its gradient is exactly zero).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(kernels::generic::softmax_last_dim(x)?)
}

/// Multi-head self-attention as timm's `Attention`: `qkv` (with bias), heads of width
/// `dim / heads`, scale `head_dim^-½`, dropout on the attention probabilities (`attn_drop`),
/// `proj`, dropout on its output (`proj_drop`).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    attn_drop: f64,
    proj_drop: f64,
}

impl Attention {
    /// Attention over `dim` features with `heads` heads (`dim` must be a multiple), named
    /// `name.qkv`, `name.proj`, timm's initialisation.
    pub fn new(
        name: &str,
        init: &mut Init,
        dim: usize,
        heads: usize,
        attn_drop: f64,
        proj_drop: f64,
    ) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(Error::InvalidConfig(format!(
                "attention width {dim} is not a multiple of its {heads} heads"
            )));
        }
        Ok(Self {
            qkv: timm_linear(format!("{name}.qkv"), init, dim, 3 * dim)?,
            proj: timm_linear(format!("{name}.proj"), init, dim, dim)?,
            heads,
            attn_drop,
            proj_drop,
        })
    }

    /// Forward pass on tokens `(batch, tokens, dim)`. The fused attention kernel serves it
    /// unless the probabilities get dropout or the thread's backward keeps gradient graphs.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let c = x.dim(2)?;
        let scale = ((c / self.heads) as f64).powf(-0.5);
        let qkv = self.qkv.forward(x)?;
        let no_dropout =
            self.attn_drop == 0.0 || (!ctx.is_train() && (0.0..1.0).contains(&self.attn_drop));
        let o = if no_dropout && fused() {
            kernels::attention(&qkv, self.heads, scale)?
        } else {
            let (p, v) = kernels::generic::attention_probs(&qkv, self.heads, scale)?;
            let p = ctx.dropout(&p, self.attn_drop)?;
            kernels::generic::attention_merge(&p, &v)?
        };
        ctx.dropout(&self.proj.forward(&o)?, self.proj_drop)
    }
}

impl Layer for Attention {
    fn params(&self) -> Vec<Param> {
        let mut p = self.qkv.params();
        p.extend(self.proj.params());
        p
    }
}

/// timm's `Mlp`: `fc1`, GELU, dropout, `fc2`, dropout.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    drop: f64,
}

impl Mlp {
    /// `dim → hidden → dim`, named `name.fc1`, `name.fc2`, timm's initialisation.
    pub fn new(name: &str, init: &mut Init, dim: usize, hidden: usize, drop: f64) -> Result<Self> {
        Ok(Self {
            fc1: timm_linear(format!("{name}.fc1"), init, dim, hidden)?,
            fc2: timm_linear(format!("{name}.fc2"), init, hidden, dim)?,
            drop,
        })
    }

    /// Forward pass on `(..., dim)`.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let h = ctx.dropout(&gelu(&self.fc1.forward(x)?)?, self.drop)?;
        ctx.dropout(&self.fc2.forward(&h)?, self.drop)
    }
}

impl Layer for Mlp {
    fn params(&self) -> Vec<Param> {
        let mut p = self.fc1.params();
        p.extend(self.fc2.params());
        p
    }
}

/// The stochastic regularisers of a [`Block`] (timm's `proj_drop`, `attn_drop`, `drop_path`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BlockDrop {
    /// Dropout of the attention projection and of both MLP layers' outputs.
    pub proj: f64,
    /// Dropout of the attention probabilities.
    pub attn: f64,
    /// Drop-path (stochastic depth) of both residual branches.
    pub path: f64,
}

/// timm's pre-norm ViT `Block`: `x + drop_path(attn(norm1(x)))`, then
/// `x + drop_path(mlp(norm2(x)))`.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    drop_path: f64,
}

impl Block {
    /// A block of width `dim`, `heads` heads and MLP width `mlp_hidden`, named `name.norm1`,
    /// `name.attn.*`, `name.norm2`, `name.mlp.*`, timm's initialisation.
    pub fn new(
        name: &str,
        init: &mut Init,
        dim: usize,
        heads: usize,
        mlp_hidden: usize,
        drop: BlockDrop,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(format!("{name}.norm1"), init, dim)?,
            attn: Attention::new(
                &format!("{name}.attn"),
                init,
                dim,
                heads,
                drop.attn,
                drop.proj,
            )?,
            norm2: LayerNorm::new(format!("{name}.norm2"), init, dim)?,
            mlp: Mlp::new(&format!("{name}.mlp"), init, dim, mlp_hidden, drop.proj)?,
            drop_path: drop.path,
        })
    }

    /// Forward pass on tokens `(batch, tokens, dim)`.
    pub fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?, ctx)?;
        let x = (x + ctx.drop_path(&a, self.drop_path)?)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?, ctx)?;
        Ok((&x + ctx.drop_path(&m, self.drop_path)?)?)
    }
}

impl Layer for Block {
    fn params(&self) -> Vec<Param> {
        let mut p = self.norm1.params();
        p.extend(self.attn.params());
        p.extend(self.norm2.params());
        p.extend(self.mlp.params());
        p
    }
}

impl Stage for Block {
    fn forward(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        Block::forward(self, x, ctx)
    }

    fn params(&self) -> Vec<Param> {
        Layer::params(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::with_second_order;
    use candle_core::{DType, Device};

    const F64: DType = DType::F64;

    fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
        let mut init = Init::new(seed, &Device::Cpu, F64);
        init.randn(shape, std).unwrap().as_tensor().clone()
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    fn rel_err(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        let num: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        num / den.max(1e-300)
    }

    /// Moves a few entries of every variable by ±h, reading `read` there.
    fn central<R: Fn() -> Vec<f64>>(vars: &[Var], h: f64, read: R) -> Vec<Vec<f64>> {
        let mut out = Vec::new();
        for v in vars {
            let base = flat(v.as_tensor());
            let n = base.len();
            for j in 0..n.min(6) {
                let i = (j * 7919 + 3) % n;
                let at = |d: f64| {
                    let mut p = base.clone();
                    p[i] += d;
                    v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    read()
                };
                let (plus, minus) = (at(h), at(-h));
                v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                out.push(
                    plus.iter()
                        .zip(&minus)
                        .map(|(p, m)| (p - m) / (2.0 * h))
                        .collect(),
                );
            }
        }
        out
    }

    /// The entries `central` moves, picked from a flat gradient per variable.
    fn picked(vars: &[Var], grads: &[Vec<f64>]) -> Vec<f64> {
        let mut out = Vec::new();
        for (v, g) in vars.iter().zip(grads) {
            let n = v.elem_count();
            for j in 0..n.min(6) {
                out.push(g[(j * 7919 + 3) % n]);
            }
        }
        out
    }

    fn grads_of(f: &Tensor, vars: &[Var]) -> Vec<Tensor> {
        let store = f.backward().unwrap();
        vars.iter()
            .map(|v| store.get(v.as_tensor()).expect("gradient").clone())
            .collect()
    }

    /// ∇f against central differences of f, and the Hessian-vector product ∇(∇f · u) by double
    /// backward against central differences of ∇f · u, in f64.
    fn check_twice(vars: &[Var], f: &(dyn Fn() -> Tensor + Sync)) {
        let scalar = || vec![f().to_scalar::<f64>().unwrap()];
        let g: Vec<Vec<f64>> = grads_of(&f(), vars).iter().map(flat).collect();
        let fd: Vec<f64> = central(vars, 1e-5, scalar).into_iter().flatten().collect();
        let e1 = rel_err(&picked(vars, &g), &fd);
        assert!(e1 < 1e-7, "gradient vs finite differences: {e1:e}");
        if !crate::autograd::SECOND_ORDER {
            // Built without the `second-order` feature (crates.io's candle): first order only.
            return;
        }
        let u: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| randn(v.dims(), 1.0, 500 + i as u64))
            .collect();
        let gu = || {
            grads_of(&f(), vars)
                .iter()
                .zip(&u)
                .map(|(g, u)| {
                    (g * u)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap()
                })
                .sum::<f64>()
        };
        let hu: Vec<Vec<f64>> = with_second_order(|| {
            let g = grads_of(&f(), vars);
            let mut s = Tensor::zeros((), F64, &Device::Cpu)?;
            for (g, u) in g.iter().zip(&u) {
                assert!(g.track_op(), "the gradient keeps its graph");
                s = (s + (g * u)?.sum_all()?)?;
            }
            Ok(grads_of(&s, vars)
                .iter()
                .map(|t| flat(&t.detach()))
                .collect())
        })
        .unwrap();
        let fd2: Vec<f64> = central(vars, 1e-5, || vec![gu()])
            .into_iter()
            .flatten()
            .collect();
        let e2 = rel_err(&picked(vars, &hu), &fd2);
        eprintln!("gradient {e1:.1e}, Hessian-vector product {e2:.1e} relative error");
        assert!(
            e2 < 1e-6,
            "Hessian-vector product vs finite differences: {e2:e}"
        );
    }

    fn var(shape: &[usize], std: f64, seed: u64) -> Var {
        Var::from_tensor(&randn(shape, std, seed)).unwrap()
    }

    /// A fixed nonlinear read-out, so that second derivatives do not vanish.
    fn readout(y: &Tensor, seed: u64) -> Tensor {
        let r = randn(y.dims(), 1.0, seed);
        ((y * &r).unwrap().sum_all().unwrap() + y.sqr().unwrap().sum_all().unwrap() * 0.3).unwrap()
    }

    #[test]
    fn layer_norm_matches_closed_form_and_differentiates_twice() {
        let mut init = Init::new(1, &Device::Cpu, F64);
        let ln = LayerNorm::new("ln", &mut init, 5).unwrap();
        let p = ln.params();
        p[0].var.set(&(randn(&[5], 0.3, 2) + 1.0).unwrap()).unwrap();
        p[1].var.set(&randn(&[5], 0.3, 3)).unwrap();
        let x = var(&[2, 3, 5], 1.0, 4);
        // value: per row, zero mean and unit (biased) variance before the affine map
        let y = LayerNorm::new("plain", &mut init, 5)
            .unwrap()
            .forward(x.as_tensor())
            .unwrap();
        for row in y.flatten_to(1).unwrap().to_vec2::<f64>().unwrap() {
            let m = row.iter().sum::<f64>() / 5.0;
            let v = row.iter().map(|a| (a - m).powi(2)).sum::<f64>() / 5.0;
            assert!(m.abs() < 1e-12 && (v - 1.0).abs() < 1e-4, "{m} {v}");
        }
        let vars = [x.clone(), p[0].var.clone(), p[1].var.clone()];
        check_twice(&vars, &|| readout(&ln.forward(x.as_tensor()).unwrap(), 9));
    }

    #[test]
    fn gelu_is_exact_and_differentiates_twice() {
        let x = var(&[3, 7], 1.5, 5);
        let y = flat(&gelu(x.as_tensor()).unwrap());
        let want = flat(&x.as_tensor().gelu_erf().unwrap());
        assert!(rel_err(&y, &want) < 1e-14);
        check_twice(std::slice::from_ref(&x), &|| {
            readout(&gelu(x.as_tensor()).unwrap(), 6)
        });
        // The exact derivative Φ(x) + x·φ(x), against candle's own `gelu_erf` backward, whose
        // truncated constant 0.398942 (1/√(2π) = 0.3989422804) is visibly off in f64.
        let g = grads_of(
            &gelu(x.as_tensor()).unwrap().sum_all().unwrap(),
            std::slice::from_ref(&x),
        );
        let xs = flat(x.as_tensor());
        let exact: Vec<f64> = xs
            .iter()
            .map(|&v| {
                let pdf = (-v * v / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let cdf = 0.5
                    * (1.0
                        + flat(
                            &Tensor::new(&[v / 2f64.sqrt()], &Device::Cpu)
                                .unwrap()
                                .erf()
                                .unwrap(),
                        )[0]);
                cdf + v * pdf
            })
            .collect();
        assert!(rel_err(&flat(&g[0]), &exact) < 1e-14);
        let candle = grads_of(
            &x.as_tensor().gelu_erf().unwrap().sum_all().unwrap(),
            std::slice::from_ref(&x),
        );
        assert!(rel_err(&flat(&candle[0]), &exact) > 1e-8);
    }

    #[test]
    fn softmax_is_a_distribution_and_differentiates_twice() {
        let x = var(&[2, 3, 6], 2.0, 7);
        let y = softmax_last_dim(&(x.as_tensor() + 500.0).unwrap()).unwrap();
        for row in y.flatten_to(1).unwrap().to_vec2::<f64>().unwrap() {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let same = softmax_last_dim(x.as_tensor()).unwrap();
        assert!(rel_err(&flat(&y), &flat(&same)) < 1e-12, "shift invariance");
        check_twice(std::slice::from_ref(&x), &|| {
            readout(&softmax_last_dim(x.as_tensor()).unwrap(), 8)
        });
    }

    #[test]
    fn linear_accepts_any_rank() {
        let mut init = Init::new(3, &Device::Cpu, F64);
        let l = Linear::new("l", &mut init, 4, 3).unwrap();
        let x = randn(&[2, 5, 4], 1.0, 1);
        let y = l.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 5, 3]);
        let rows = l.forward(&x.reshape((10, 4)).unwrap()).unwrap();
        assert_eq!(flat(&y), flat(&rows));
        // non-contiguous input
        let xt = randn(&[2, 4, 5], 1.0, 2).transpose(1, 2).unwrap();
        let yt = l.forward(&xt).unwrap();
        let yc = l.forward(&xt.contiguous().unwrap()).unwrap();
        assert_eq!(flat(&yt), flat(&yc));
    }

    #[test]
    fn block_differentiates_twice_in_all_its_parameters() {
        let mut init = Init::new(11, &Device::Cpu, F64);
        let block = Block::new("blocks.0", &mut init, 8, 2, 12, BlockDrop::default()).unwrap();
        // non-trivial weights: timm's 0.02 init leaves attention nearly uniform
        for (i, p) in Layer::params(&block).iter().enumerate() {
            let t = randn(p.var.dims(), 0.4, 100 + i as u64);
            let t = if p.name.ends_with("norm1.weight") || p.name.ends_with("norm2.weight") {
                (t + 1.0).unwrap()
            } else {
                t
            };
            p.var.set(&t).unwrap();
        }
        let names: Vec<String> = Layer::params(&block).into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
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
            ]
            .map(|n| format!("blocks.0.{n}"))
        );
        let x = var(&[2, 5, 8], 1.0, 12);
        let mut vars = vec![x.clone()];
        vars.extend(Layer::params(&block).into_iter().map(|p| p.var));
        check_twice(&vars, &|| {
            readout(
                &block.forward(x.as_tensor(), &mut Ctx::train()).unwrap(),
                13,
            )
        });
    }

    #[test]
    fn block_dropout_is_identity_in_eval_and_replayed_in_train() {
        let mut init = Init::new(5, &Device::Cpu, DType::F32);
        let drop = BlockDrop {
            proj: 0.2,
            attn: 0.2,
            path: 0.3,
        };
        let block = Block::new("b", &mut init, 8, 2, 16, drop).unwrap();
        let mut init = Init::new(5, &Device::Cpu, DType::F32);
        let plain = Block::new("b", &mut init, 8, 2, 16, BlockDrop::default()).unwrap();
        let x = Init::new(6, &Device::Cpu, DType::F32)
            .randn(&[6, 5, 8], 1.0)
            .unwrap()
            .as_tensor()
            .clone();
        let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eval = v(block.forward(&x, &mut Ctx::eval()).unwrap());
        assert_eq!(eval, v(plain.forward(&x, &mut Ctx::train()).unwrap()));
        let mut rec = Ctx::train_recording().with_seed(3);
        let a = v(block.forward(&x, &mut rec).unwrap());
        let masks = rec.take_masks();
        // attn_drop, proj_drop, drop_path, mlp drop ×2, drop_path
        assert_eq!(masks.len(), 6);
        assert_ne!(a, eval);
        assert_ne!(
            a,
            v(block.forward(&x, &mut Ctx::train().with_seed(4)).unwrap())
        );
        let mut rep = Ctx::train_replaying(masks).with_seed(99);
        assert_eq!(a, v(block.forward(&x, &mut rep).unwrap()));
        assert_eq!(rep.replay_position(), Some(6));
    }
}
