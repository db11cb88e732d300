//! Optimizers with savable state (SGD with momentum/Nesterov/weight decay, AdamW) and
//! learning-rate schedules (cosine with linear warm-up, step).

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::nn::Param;
use crate::{Error, Result};

/// Optimizer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// SGD, PyTorch semantics (L2 weight decay added to the gradient).
    Sgd {
        /// Momentum coefficient (0: plain SGD).
        momentum: f64,
        /// Nesterov momentum.
        nesterov: bool,
        /// L2 weight decay.
        weight_decay: f64,
        /// Which parameters the weight decay applies to.
        #[serde(default, skip_serializing_if = "DecayScope::is_all")]
        decay: DecayScope,
    },
    /// AdamW (decoupled weight decay). Written `adamw`, as the command line spells it;
    /// `adam-w`, which files written before 0.2 carry, still reads.
    #[serde(rename = "adamw", alias = "adam-w")]
    AdamW {
        /// β1.
        beta1: f64,
        /// β2.
        beta2: f64,
        /// ε.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
        /// Which parameters the weight decay applies to (files without the field: all, as
        /// before the field existed; new AdamW settings exempt norms, biases and tokens).
        #[serde(default, skip_serializing_if = "DecayScope::is_all")]
        decay: DecayScope,
    },
}

/// Which parameters weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecayScope {
    /// Every trainable parameter (InfoPro's CIFAR SGD setting).
    #[default]
    All,
    /// Weight matrices and kernels only: not biases, normalisation parameters (any tensor of
    /// rank ≤ 1), position embeddings or class tokens (timm's and DeiT's parameter groups).
    Weights,
}

crate::named_enum!(DecayScope, "weight-decay scope", { "all" => All, "weights" => Weights });

impl DecayScope {
    fn is_all(&self) -> bool {
        *self == DecayScope::All
    }

    /// Whether weight decay applies to `p` under this scope.
    pub fn decays(&self, p: &Param) -> bool {
        match self {
            DecayScope::All => true,
            DecayScope::Weights => {
                let n = &p.name;
                p.var.rank() > 1
                    && !n.ends_with("pos_embed")
                    && !n.ends_with("cls_token")
                    && !n.ends_with(".bias")
            }
        }
    }
}

impl Default for OptimizerConfig {
    /// InfoPro's CIFAR setting: SGD, Nesterov momentum 0.9, weight decay 1e-4.
    fn default() -> Self {
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
            decay: DecayScope::All,
        }
    }
}

impl OptimizerConfig {
    /// The weight decay.
    pub fn weight_decay(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::AdamW { weight_decay, .. } => weight_decay,
        }
    }

    /// Sets the weight decay.
    pub fn set_weight_decay(&mut self, wd: f64) {
        match self {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::AdamW { weight_decay, .. } => *weight_decay = wd,
        }
    }

    /// Sets which parameters the weight decay applies to.
    pub fn set_decay_scope(&mut self, scope: DecayScope) {
        match self {
            OptimizerConfig::Sgd { decay, .. } | OptimizerConfig::AdamW { decay, .. } => {
                *decay = scope
            }
        }
    }

    /// Checks every setting's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64, range: &str| {
            Err(Error::InvalidConfig(format!(
                "optimizer {what} must be {range}, got {v}"
            )))
        };
        let wd = self.weight_decay();
        if !(wd.is_finite() && wd >= 0.0) {
            return bad("weight decay (--weight-decay)", wd, "finite and >= 0");
        }
        match *self {
            OptimizerConfig::Sgd { momentum, .. } => {
                if !(0.0..1.0).contains(&momentum) {
                    return bad("momentum", momentum, "in [0, 1)");
                }
            }
            OptimizerConfig::AdamW {
                beta1, beta2, eps, ..
            } => {
                for (what, b) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return bad(what, b, "in [0, 1)");
                    }
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return bad("eps", eps, "finite and > 0");
                }
            }
        }
        Ok(())
    }

    /// An optimizer over `params` (buffers are skipped).
    pub fn build(&self, params: Vec<Param>) -> Result<Box<dyn Optimizer>> {
        self.validate()?;
        let params: Vec<Param> = params
            .into_iter()
            .filter(|p| p.kind == crate::nn::ParamKind::Trainable)
            .collect();
        Ok(match *self {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
                decay,
            } => {
                if nesterov && momentum <= 0.0 {
                    return Err(Error::InvalidConfig(
                        "Nesterov momentum requires momentum > 0".into(),
                    ));
                }
                Box::new(Sgd {
                    decays: params.iter().map(|p| decay.decays(p)).collect(),
                    params,
                    momentum,
                    nesterov,
                    weight_decay,
                    buffers: HashMap::new(),
                })
            }
            OptimizerConfig::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                decay,
            } => Box::new(AdamW {
                decays: params.iter().map(|p| decay.decays(p)).collect(),
                params,
                beta1,
                beta2,
                eps,
                weight_decay,
                step: 0,
                m: HashMap::new(),
                v: HashMap::new(),
            }),
        })
    }
}

/// An optimizer over a fixed list of parameters.
pub trait Optimizer: Send + std::fmt::Debug {
    /// Applies one update; `grads[i]` belongs to the i-th trainable parameter.
    fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()>;
    /// The parameters, in gradient order.
    fn params(&self) -> &[Param];
    /// The state as named tensors (`<param>.<slot>`), for checkpoints.
    fn state(&self) -> Result<HashMap<String, Tensor>>;
    /// Restores a state produced by [`Optimizer::state`].
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

fn check_len(params: &[Param], grads: &[Tensor]) -> Result<()> {
    if params.len() != grads.len() {
        return Err(Error::Internal(format!(
            "optimizer got {} gradients for {} parameters",
            grads.len(),
            params.len()
        )));
    }
    Ok(())
}

fn set(var: &Var, value: &Tensor) -> Result<()> {
    var.set(value)?;
    Ok(())
}

/// SGD with momentum, Nesterov and L2 weight decay (PyTorch's `torch.optim.SGD`).
#[derive(Debug)]
pub struct Sgd {
    params: Vec<Param>,
    decays: Vec<bool>,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    buffers: HashMap<String, Tensor>,
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        check_len(&self.params, grads)?;
        for ((p, g), &decays) in self.params.iter().zip(grads).zip(&self.decays) {
            // One fused pass (sgr-kernels), rounded as candle's ops would; the results are
            // detached, so no step's state chains to the previous one through an op graph.
            let s = crate::kernels::SgdStep {
                lr,
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: if decays { self.weight_decay } else { 0.0 },
            };
            let (w, buf) =
                crate::kernels::sgd_step(p.var.as_tensor(), g, self.buffers.get(&p.name), &s)?;
            if let Some(b) = buf {
                self.buffers.insert(p.name.clone(), b);
            }
            set(&p.var, &w)?;
        }
        Ok(())
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self
            .buffers
            .iter()
            .map(|(k, v)| (format!("{k}.momentum_buffer"), v.clone()))
            .collect())
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.buffers.clear();
        for p in &self.params {
            if let Some(t) = state.get(&format!("{}.momentum_buffer", p.name)) {
                check_shape(&p.name, p.var.as_tensor(), t)?;
                self.buffers.insert(p.name.clone(), t.clone());
            }
        }
        Ok(())
    }
}

fn check_shape(name: &str, want: &Tensor, got: &Tensor) -> Result<()> {
    if want.dims() != got.dims() {
        return Err(Error::InvalidConfig(format!(
            "optimizer state for {name} has shape {:?}, the parameter has {:?}",
            got.dims(),
            want.dims()
        )));
    }
    Ok(())
}

/// AdamW (Loshchilov & Hutter), PyTorch's `torch.optim.AdamW` semantics.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    decays: Vec<bool>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        check_len(&self.params, grads)?;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for ((p, g), &decays) in self.params.iter().zip(grads).zip(&self.decays) {
            // Detached: a result that tracks the variable would chain every step's state to the
            // previous one through its op graph and never be freed.
            let w = &p.var.as_tensor().detach();
            let m_prev = match self.m.get(&p.name) {
                Some(m) => m.clone(),
                None => g.zeros_like()?,
            };
            let v_prev = match self.v.get(&p.name) {
                Some(v) => v.clone(),
                None => g.zeros_like()?,
            };
            let m = ((m_prev * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((v_prev * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let upd = ((&m / bc1)?.div(&denom)? * lr)?;
            let wd = if decays { self.weight_decay } else { 0.0 };
            let decayed = (w * (1.0 - lr * wd))?;
            set(&p.var, &(decayed - upd)?)?;
            self.m.insert(p.name.clone(), m);
            self.v.insert(p.name.clone(), v);
        }
        Ok(())
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut s = HashMap::new();
        for (k, t) in &self.m {
            s.insert(format!("{k}.exp_avg"), t.clone());
        }
        for (k, t) in &self.v {
            s.insert(format!("{k}.exp_avg_sq"), t.clone());
        }
        let dev = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        s.insert("step".into(), Tensor::new(&[self.step as f64], &dev)?);
        Ok(s)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.m.clear();
        self.v.clear();
        for p in &self.params {
            if let Some(t) = state.get(&format!("{}.exp_avg", p.name)) {
                check_shape(&p.name, p.var.as_tensor(), t)?;
                self.m.insert(p.name.clone(), t.clone());
            }
            if let Some(t) = state.get(&format!("{}.exp_avg_sq", p.name)) {
                check_shape(&p.name, p.var.as_tensor(), t)?;
                self.v.insert(p.name.clone(), t.clone());
            }
        }
        self.step = match state.get("step") {
            Some(t) => t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?[0] as u64,
            None => 0,
        };
        Ok(())
    }
}

/// Learning-rate schedule over optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// Constant learning rate.
    Constant,
    /// Linear warm-up from 0 over `warmup_epochs`, then cosine decay to 0 at the last step.
    Cosine {
        /// Warm-up length in epochs (may be fractional).
        warmup_epochs: f64,
    },
    /// Multiply by `gamma` at each epoch in `milestones`.
    Step {
        /// Epochs at which the rate drops.
        milestones: Vec<usize>,
        /// Factor per milestone.
        gamma: f64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Cosine { warmup_epochs: 0.0 }
    }
}

impl Schedule {
    /// Checks the schedule's settings.
    pub fn validate(&self) -> Result<()> {
        match self {
            Schedule::Constant => Ok(()),
            Schedule::Cosine { warmup_epochs: w } if !(w.is_finite() && *w >= 0.0) => Err(
                Error::InvalidConfig(format!("--warmup-epochs must be finite and >= 0, got {w}")),
            ),
            Schedule::Cosine { .. } => Ok(()),
            Schedule::Step { gamma, .. } if !(gamma.is_finite() && *gamma > 0.0) => Err(
                Error::InvalidConfig(format!("step schedule gamma must be > 0, got {gamma}")),
            ),
            Schedule::Step { .. } => Ok(()),
        }
    }

    /// Learning rate at `step` (0-based) of `total_steps`, with `steps_per_epoch`.
    pub fn lr(&self, base: f64, step: usize, steps_per_epoch: usize, total_steps: usize) -> f64 {
        let spe = steps_per_epoch.max(1) as f64;
        match self {
            Schedule::Constant => base,
            Schedule::Cosine { warmup_epochs } => {
                let warm = (warmup_epochs * spe).round() as usize;
                if step < warm {
                    return base * (step + 1) as f64 / warm as f64;
                }
                let span = total_steps.saturating_sub(warm).max(1) as f64;
                let t = ((step - warm) as f64 / span).min(1.0);
                0.5 * base * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Schedule::Step { milestones, gamma } => {
                let epoch = (step as f64 / spe).floor() as usize;
                let drops = milestones.iter().filter(|&&m| epoch >= m).count();
                base * gamma.powi(drops as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_scope_exempts_norms_biases_and_tokens() {
        let dev = candle_core::Device::Cpu;
        let p = |name: &str, shape: &[usize]| Param {
            name: name.into(),
            var: Var::ones(shape, candle_core::DType::F32, &dev).unwrap(),
            kind: crate::nn::ParamKind::Trainable,
        };
        let ps = [
            p("blocks.0.attn.qkv.weight", &[6, 2]),
            p("blocks.0.attn.qkv.bias", &[6]),
            p("blocks.0.norm1.weight", &[2]),
            p("pos_embed", &[1, 5, 2]),
            p("cls_token", &[1, 1, 2]),
            p("layer1.0.conv1.weight", &[2, 2, 3, 3]),
        ];
        let decayed: Vec<bool> = ps.iter().map(|q| DecayScope::Weights.decays(q)).collect();
        assert_eq!(decayed, [true, false, false, false, false, true]);
        assert!(ps.iter().all(|q| DecayScope::All.decays(q)));
        // An exempt parameter with zero gradient stays put under AdamW's decay.
        let cfg = OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
            decay: DecayScope::Weights,
        };
        let mut opt = cfg.build(ps.to_vec()).unwrap();
        let zeros: Vec<Tensor> = ps
            .iter()
            .map(|q| q.var.as_tensor().zeros_like().unwrap())
            .collect();
        opt.step(&zeros, 0.1).unwrap();
        let first = |q: &Param| {
            q.var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0]
        };
        assert!((first(&ps[0]) - 0.95).abs() < 1e-6, "decayed by lr·wd");
        assert_eq!(first(&ps[1]), 1.0);
        assert_eq!(first(&ps[3]), 1.0);
    }

    #[test]
    fn cosine_with_warmup() {
        let s = Schedule::Cosine { warmup_epochs: 1.0 };
        // 10 steps per epoch, 5 epochs: steps 0..9 warm up linearly to the base rate.
        assert!((s.lr(0.1, 0, 10, 50) - 0.01).abs() < 1e-12);
        assert!((s.lr(0.1, 9, 10, 50) - 0.1).abs() < 1e-12);
        assert!((s.lr(0.1, 10, 10, 50) - 0.1).abs() < 1e-12);
        // Half-way through the decay: base / 2.
        assert!((s.lr(0.1, 30, 10, 50) - 0.05).abs() < 1e-12);
        assert!(s.lr(0.1, 49, 10, 50) < 0.001);
        let s = Schedule::Cosine { warmup_epochs: 0.0 };
        assert!((s.lr(0.1, 0, 10, 50) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn step_schedule_drops_at_milestones() {
        let s = Schedule::Step {
            milestones: vec![2, 4],
            gamma: 0.1,
        };
        assert!((s.lr(1.0, 19, 10, 100) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 20, 10, 100) - 0.1).abs() < 1e-12);
        assert!((s.lr(1.0, 45, 10, 100) - 0.01).abs() < 1e-12);
    }

    #[test]
    fn configs_reject_unknown_fields() {
        let e = serde_json::from_str::<OptimizerConfig>(
            r#"{"kind":"sgd","momentum":0.9,"nesterov":true,"weight_decay":0,"lr":1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `lr`"), "{e}");
    }
}
