//! Local objectives: what each module of a network is trained to minimise.
//!
//! A module's objective owns its head's parameters (an auxiliary classifier, a decoder, ...) and
//! turns the module's output and the [`Batch`] into a scalar loss. Cross-entropy on an auxiliary
//! head ([`CrossEntropy`]) is Greedy SL's; other methods (DGL, InfoPro) implement the same trait,
//! and the SGR term composes with any of them (docs/method.md, "Methods").

use candle_core::{DType, Tensor, D};

use crate::ctx::Ctx;
use crate::loss::{cross_entropy, log_softmax};
use crate::network::Stage;
use crate::nn::Param;
use crate::{Error, Result};

/// What a batch asks the network to predict.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Integer class indices `(batch,)`.
    Labels(Tensor),
    /// Class probabilities `(batch, classes)` (mixup, cutmix, label smoothing).
    Soft(Tensor),
}

/// One training batch: the input images and their targets.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Input images `(batch, channels, height, width)`, as the network sees them (normalised).
    pub input: Tensor,
    /// What to predict.
    pub targets: Targets,
}

impl Batch {
    /// A batch with hard labels.
    pub fn labelled(input: Tensor, labels: Tensor) -> Self {
        Self {
            input,
            targets: Targets::Labels(labels),
        }
    }

    /// A batch with soft targets.
    pub fn soft(input: Tensor, probabilities: Tensor) -> Self {
        Self {
            input,
            targets: Targets::Soft(probabilities),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> Result<usize> {
        Ok(self.input.dim(0)?)
    }

    /// Whether the batch has no samples.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The batch cut into `n` consecutive shards whose sizes differ by at most one (the first
    /// ones larger), as data-parallel replicas share a step; with fewer samples than shards
    /// the last shards are empty.
    pub fn shards(&self, n: usize) -> Result<Vec<Batch>> {
        if n == 0 {
            return Err(Error::InvalidConfig(
                "a batch needs at least one shard".into(),
            ));
        }
        let len = self.len()?;
        let (base, extra) = (len / n, len % n);
        let mut start = 0;
        (0..n)
            .map(|i| {
                let size = base + usize::from(i < extra);
                let part = |t: &Tensor| t.narrow(0, start, size);
                let shard = Batch {
                    input: part(&self.input)?,
                    targets: match &self.targets {
                        Targets::Labels(t) => Targets::Labels(part(t)?),
                        Targets::Soft(t) => Targets::Soft(part(t)?),
                    },
                };
                start += size;
                Ok(shard)
            })
            .collect()
    }
}

impl From<(Tensor, Tensor)> for Batch {
    /// `(images, labels)`, as the loaders yield them.
    fn from((input, labels): (Tensor, Tensor)) -> Self {
        Self::labelled(input, labels)
    }
}

impl Targets {
    /// Mean cross-entropy of `logits` `(batch, classes)` against the targets.
    pub fn cross_entropy(&self, logits: &Tensor) -> Result<Tensor> {
        match self {
            Targets::Labels(y) => cross_entropy(logits, y),
            Targets::Soft(p) => {
                let n = logits.dim(0)?;
                if p.dims() != logits.dims() {
                    return Err(Error::InvalidConfig(format!(
                        "soft targets of shape {:?} for logits of shape {:?}",
                        p.dims(),
                        logits.dims()
                    )));
                }
                let p = p.to_dtype(logits.dtype())?.detach();
                Ok((log_softmax(logits)?.mul(&p)?.sum_all()? * (-1.0 / n as f64))?)
            }
        }
    }

    /// The number of rows whose arg-max logit is the target class (the arg-max class of soft
    /// targets), as an `f64` scalar on the logits' device: reading it needs no host sync.
    pub fn correct(&self, logits: &Tensor) -> Result<Tensor> {
        let pred = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
        let want = match self {
            Targets::Labels(y) => y.to_dtype(DType::U32)?,
            Targets::Soft(p) => p.argmax(D::Minus1)?.to_dtype(DType::U32)?,
        };
        Ok(pred.eq(&want)?.to_dtype(DType::F64)?.sum_all()?)
    }

    /// The hard labels, if the targets are labels.
    pub fn labels(&self) -> Option<&Tensor> {
        match self {
            Targets::Labels(y) => Some(y),
            Targets::Soft(_) => None,
        }
    }
}

/// What an objective computed on a module's output.
#[derive(Debug)]
pub struct ObjectiveOutput {
    /// The scalar local loss.
    pub loss: Tensor,
    /// Class logits, when the objective classifies (for accuracy metrics).
    pub logits: Option<Tensor>,
}

/// The local objective of one module.
///
/// It must be a function of `h` and the batch that candle can differentiate twice (the exact SGR
/// gradient differentiates its input gradient), and it must take every non-smooth decision
/// (ReLU, dropout) through `ctx`, so that the finite-difference SGR passes replay them.
pub trait LocalObjective: Send + Sync + std::fmt::Debug {
    /// Named tensors of the objective's own layers (`aux.<k>.*` by convention); empty when it
    /// has none.
    fn params(&self) -> Vec<Param>;

    /// The loss of module output `h` on `batch`.
    fn loss(&self, h: &Tensor, batch: &Batch, ctx: &mut Ctx) -> Result<ObjectiveOutput>;
}

/// Cross-entropy of an auxiliary head's logits (Greedy SL), or of the module's output itself
/// when that output is the network's logits (the last module, and `bp`).
#[derive(Debug)]
pub struct CrossEntropy {
    head: Option<Box<dyn Stage>>,
}

impl CrossEntropy {
    /// Cross-entropy on `head(h)`.
    pub fn on_head(head: Box<dyn Stage>) -> Self {
        Self { head: Some(head) }
    }

    /// Cross-entropy on `h`, which are logits.
    pub fn on_logits() -> Self {
        Self { head: None }
    }
}

impl LocalObjective for CrossEntropy {
    fn params(&self) -> Vec<Param> {
        self.head.as_ref().map(|h| h.params()).unwrap_or_default()
    }

    fn loss(&self, h: &Tensor, batch: &Batch, ctx: &mut Ctx) -> Result<ObjectiveOutput> {
        let logits = match &self.head {
            Some(head) => head.forward(h, ctx)?,
            None => h.clone(),
        };
        Ok(ObjectiveOutput {
            loss: batch.targets.cross_entropy(&logits)?,
            logits: Some(logits),
        })
    }
}

mod infopro;
pub use infopro::{Decoder, InfoproConfig, InfoproObjective, PixelStats, TaskLoss};
