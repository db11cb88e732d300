//! The forward context threaded through every layer.
//!
//! It carries the forward mode (training or evaluation, whether BatchNorm updates its running
//! statistics) and a tape of the pass's non-smooth decisions: ReLU masks and dropout masks. The
//! finite-difference SGR gradient evaluates a module at points near its base point and must
//! differentiate the same piecewise function there, so the base pass records every decision and
//! the perturbed passes replay them (docs/method.md, "Finite differences"). Random draws come from
//! a seeded generator the context owns, so a pass is reproducible from its seed.

use candle_core::{Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// One recorded non-smooth decision of a forward pass.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Decision {
    /// The mask `x >= 0` of a ReLU (1 where the input passes).
    Relu(Tensor),
    /// The scaled keep mask of a dropout or drop-path (0 or `1 / (1 - p)`).
    Dropout(Tensor),
    /// The selections of a max-pool: for every output element `(n, c, i, j)`, the flat index
    /// (`u32`, row-major over the whole NCHW input) of the input element its window picked
    /// ([`crate::nn::pool::max_pool2d`]).
    MaxPool(Tensor),
}

impl Decision {
    /// The mask tensor.
    pub fn mask(&self) -> &Tensor {
        match self {
            Decision::Relu(m) | Decision::Dropout(m) | Decision::MaxPool(m) => m,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Decision::Relu(_) => "ReLU",
            Decision::Dropout(_) => "dropout",
            Decision::MaxPool(_) => "max-pool",
        }
    }
}

/// What the context does with decisions.
#[derive(Debug, Default)]
enum Tape {
    /// Decide afresh, keep nothing.
    #[default]
    Off,
    /// Decide afresh and record every decision in call order.
    Record(Vec<Decision>),
    /// Take every decision from a recording, in call order.
    Replay {
        decisions: Vec<Decision>,
        pos: usize,
    },
}

/// How a layer should apply a ReLU in the current pass (see [`Ctx::relu_mode`]).
#[derive(Debug)]
pub enum ReluMode {
    /// Threshold the input.
    Plain,
    /// Threshold the input and hand the mask to [`Ctx::record`].
    Record,
    /// Multiply by this recorded mask instead of thresholding.
    Replay(Tensor),
}

/// Forward context threaded through every layer.
#[derive(Debug)]
pub struct Ctx {
    train: bool,
    update_bn_stats: bool,
    tape: Tape,
    seed: u64,
    rng: ChaCha8Rng,
}

impl Ctx {
    /// Training mode: BatchNorm uses batch statistics and updates its running statistics.
    pub fn train() -> Self {
        Self {
            train: true,
            update_bn_stats: true,
            tape: Tape::Off,
            seed: 0,
            rng: ChaCha8Rng::seed_from_u64(0),
        }
    }

    /// Evaluation mode: BatchNorm uses its running statistics, dropout is the identity.
    pub fn eval() -> Self {
        Self {
            train: false,
            update_bn_stats: false,
            ..Self::train()
        }
    }

    /// Training mode that records every decision (the base point of a finite difference).
    pub fn train_recording() -> Self {
        Self {
            tape: Tape::Record(Vec::new()),
            ..Self::train()
        }
    }

    /// Training-mode batch statistics, running statistics left untouched, every decision
    /// replayed from `decisions`.
    pub fn train_replaying(decisions: Vec<Decision>) -> Self {
        Self {
            update_bn_stats: false,
            tape: Tape::Replay { decisions, pos: 0 },
            ..Self::train()
        }
    }

    /// Training-mode forward that leaves BatchNorm running statistics untouched.
    pub fn train_frozen_stats() -> Self {
        Self {
            update_bn_stats: false,
            ..Self::train()
        }
    }

    /// The same context with its random generator seeded by `seed` (default 0).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        self
    }

    /// The seed the context's generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether layers run in training mode.
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// Whether BatchNorm layers update their running statistics in this pass.
    pub fn updates_bn_stats(&self) -> bool {
        self.update_bn_stats
    }

    /// Takes the decisions recorded so far (empty unless recording or replaying).
    pub fn take_masks(&mut self) -> Vec<Decision> {
        match &mut self.tape {
            Tape::Record(d) => std::mem::take(d),
            Tape::Replay { decisions, .. } => std::mem::take(decisions),
            Tape::Off => Vec::new(),
        }
    }

    /// Number of decisions consumed by a replaying context.
    pub fn replay_position(&self) -> Option<usize> {
        match &self.tape {
            Tape::Replay { pos, .. } => Some(*pos),
            _ => None,
        }
    }

    /// How the next ReLU applies. With [`ReluMode::Replay`] the recorded mask is consumed, so
    /// call this exactly once per ReLU.
    pub fn relu_mode(&mut self) -> Result<ReluMode> {
        match &self.tape {
            Tape::Off => Ok(ReluMode::Plain),
            Tape::Record(_) => Ok(ReluMode::Record),
            Tape::Replay { .. } => match self.next_replay("ReLU")? {
                Decision::Relu(m) => Ok(ReluMode::Replay(m)),
                _ => unreachable!("next_replay checks the kind"),
            },
        }
    }

    /// How the next max-pool selects its window elements, in [`ReluMode`]'s three cases:
    /// select afresh ([`ReluMode::Plain`]), select afresh and hand the selection to
    /// [`Ctx::record`] as a [`Decision::MaxPool`] ([`ReluMode::Record`]), or use the recorded
    /// selection ([`ReluMode::Replay`], consumed: call this exactly once per max-pool).
    pub fn max_pool_mode(&mut self) -> Result<ReluMode> {
        match &self.tape {
            Tape::Off => Ok(ReluMode::Plain),
            Tape::Record(_) => Ok(ReluMode::Record),
            Tape::Replay { .. } => match self.next_replay("max-pool")? {
                Decision::MaxPool(m) => Ok(ReluMode::Replay(m)),
                _ => unreachable!("next_replay checks the kind"),
            },
        }
    }

    /// Records a decision when recording; does nothing otherwise.
    pub fn record(&mut self, decision: Decision) {
        if let Tape::Record(d) = &mut self.tape {
            d.push(decision);
        }
    }

    /// ReLU following the context's mode. The derivative at 0 is 1, as in candle's `relu`.
    pub fn relu(&mut self, x: &Tensor) -> Result<Tensor> {
        match self.relu_mode()? {
            ReluMode::Plain => crate::nn::relu(x),
            ReluMode::Record => {
                self.record(Decision::Relu(x.ge(0.0)?.to_dtype(x.dtype())?.detach()));
                crate::nn::relu(x)
            }
            ReluMode::Replay(mask) => {
                check_shape(&mask, x.shape(), "ReLU")?;
                Ok(x.mul(&mask)?)
            }
        }
    }

    /// The mask of the next ReLU of input `z` (1 where `z >= 0`), following the context's mode
    /// like [`Ctx::relu`]: for layers that apply the mask themselves, such as the forward-mode
    /// passes of [`crate::forward`], whose tangents take the same mask as the values.
    pub fn relu_mask(&mut self, z: &Tensor) -> Result<Tensor> {
        match self.relu_mode()? {
            ReluMode::Plain => Ok(z.ge(0.0)?.to_dtype(z.dtype())?.detach()),
            ReluMode::Record => {
                let m = z.ge(0.0)?.to_dtype(z.dtype())?.detach();
                self.record(Decision::Relu(m.clone()));
                Ok(m)
            }
            ReluMode::Replay(mask) => {
                check_shape(&mask, z.shape(), "ReLU")?;
                Ok(mask)
            }
        }
    }

    /// Dropout with drop probability `p`: in training mode each element is kept with
    /// probability `1 - p` and scaled by `1 / (1 - p)`; the identity in evaluation mode or for
    /// `p = 0`. The mask is drawn from the context's generator, recorded, or replayed.
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        self.masked_dropout(x, p, x.shape().clone())
    }

    /// Drop-path (stochastic depth) with probability `p`: each sample of the batch (axis 0) is
    /// kept whole or zeroed, scaled by `1 / (1 - p)`.
    pub fn drop_path(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let mut dims = vec![1usize; x.rank()];
        dims[0] = x.dim(0)?;
        self.masked_dropout(x, p, Shape::from(dims))
    }

    fn masked_dropout(&mut self, x: &Tensor, p: f64, mask_shape: Shape) -> Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidConfig(format!(
                "dropout probability must be in [0, 1), got {p}"
            )));
        }
        if !self.train || p == 0.0 {
            return Ok(x.clone());
        }
        let mask = if let Tape::Replay { .. } = self.tape {
            match self.next_replay("dropout")? {
                Decision::Dropout(m) => m,
                _ => unreachable!("next_replay checks the kind"),
            }
        } else {
            let scale = 1.0 / (1.0 - p);
            let n = mask_shape.elem_count();
            let keep: Vec<f32> = (0..n)
                .map(|_| {
                    if self.rng.gen::<f64>() >= p {
                        scale as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let m = Tensor::from_vec(keep, mask_shape.clone(), x.device())?.to_dtype(x.dtype())?;
            self.record(Decision::Dropout(m.clone()));
            m
        };
        check_shape(&mask, &mask_shape, "dropout")?;
        Ok(x.broadcast_mul(&mask)?)
    }

    /// The next recorded decision, which must be of `kind`.
    fn next_replay(&mut self, kind: &'static str) -> Result<Decision> {
        let Tape::Replay { decisions, pos } = &mut self.tape else {
            return Err(Error::Internal(
                "no decisions to replay: the context does not replay".into(),
            ));
        };
        let d = decisions.get(*pos).cloned().ok_or_else(|| {
            Error::InvalidConfig(format!(
                "replay ran out of recorded decisions after {pos}: the pass made more \
                 non-smooth decisions than the recorded one"
            ))
        })?;
        if d.kind() != kind {
            return Err(Error::InvalidConfig(format!(
                "replay mismatch at decision {pos}: the pass asks for a {kind} mask, the \
                 recording has a {} mask there",
                d.kind()
            )));
        }
        *pos += 1;
        Ok(d)
    }
}

fn check_shape(mask: &Tensor, want: &Shape, kind: &str) -> Result<()> {
    if mask.shape() != want {
        return Err(Error::InvalidConfig(format!(
            "replay mismatch: a recorded {kind} mask of shape {:?} does not fit shape {:?}",
            mask.dims(),
            want.dims()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn dropout_is_seeded_recorded_and_replayed() {
        let x = Tensor::ones((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let draw = |seed| {
            let mut c = Ctx::train_recording().with_seed(seed);
            let y = c.dropout(&x, 0.5).unwrap();
            (y.to_vec2::<f32>().unwrap(), c.take_masks())
        };
        let (a, rec) = draw(7);
        let (b, _) = draw(7);
        let (c, _) = draw(8);
        assert_eq!(a, b, "same seed, same mask");
        assert_ne!(a, c, "another seed, another mask");
        assert!(a.iter().flatten().all(|&v| v == 0.0 || v == 2.0));
        let mut replay = Ctx::train_replaying(rec.clone()).with_seed(99);
        let r = replay.dropout(&x, 0.5).unwrap();
        assert_eq!(
            r.to_vec2::<f32>().unwrap(),
            a,
            "replay ignores the generator"
        );
        assert_eq!(replay.replay_position(), Some(1));
        // A replay that asks for another kind of decision, or another shape, is an error.
        let mut wrong = Ctx::train_replaying(rec.clone());
        let e = wrong.relu(&x).unwrap_err().to_string();
        assert!(e.contains("replay mismatch"), "{e}");
        let mut wrong = Ctx::train_replaying(rec);
        let e = wrong.drop_path(&x, 0.5).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        assert!(
            Ctx::eval()
                .dropout(&x, 0.5)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()[0][0]
                == 1.0
        );
        assert!(Ctx::train().dropout(&x, 1.0).is_err());
    }
}
