//! What training reports: per-step and per-epoch metrics, delivered to an [`Observer`].
//! The library never prints; binaries render these events.
//!
//! The per-epoch records are plain serde types from `sgr-schema`, so that tools read them
//! without a tensor library. A step's losses and accuracy stay tensors on the training device:
//! reading them is a host synchronisation, which a GPU pays for, so only observers that need
//! them per step do.

use candle_core::Tensor;
pub use sgr_schema::{BoundaryMetrics, EpochMetrics, EvalMetrics};

use crate::Result;

/// One optimisation step.
#[derive(Debug, Clone)]
pub struct StepMetrics {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Global step (0-based).
    pub step: usize,
    /// Local loss of every module (the last is the network's loss): `f64`, shape `(K,)`, on the
    /// training device. [`StepMetrics::losses`] reads it.
    pub module_losses: Tensor,
    /// Learning rate used.
    pub lr: f64,
    /// SGR weight used (0 for methods without SGR).
    pub lambda: f64,
    /// Samples in the batch.
    pub batch: usize,
    /// Correct predictions of the network's classifier on the batch: an `f64` scalar on the
    /// training device. [`StepMetrics::correct_count`] reads it.
    pub correct: Tensor,
    /// Wall time of the step in seconds (on an asynchronous device, the time to queue it).
    pub seconds: f64,
}

impl StepMetrics {
    /// The module losses on the host.
    pub fn losses(&self) -> Result<Vec<f64>> {
        Ok(self.module_losses.to_vec1::<f64>()?)
    }

    /// The number of correct predictions on the host.
    pub fn correct_count(&self) -> Result<usize> {
        Ok(self.correct.to_scalar::<f64>()? as usize)
    }
}

/// Something that happened during training.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A step finished.
    Step(&'a StepMetrics),
    /// An epoch of training finished.
    Epoch(&'a EpochMetrics),
    /// The modules were placed on pipeline workers by their measured step times.
    Placed {
        /// The layout: which modules each worker owns.
        pipeline: &'a crate::trainer::pipeline::Pipeline,
        /// Seconds per step of each module, as measured.
        module_seconds: &'a [f64],
        /// Data-parallel copies of the pipeline (1: none).
        replicas: usize,
    },
    /// The network was evaluated after `epoch` epochs of training (0: the initial weights).
    Evaluated {
        /// Completed epochs at the time of the evaluation.
        epoch: usize,
        /// The evaluation.
        metrics: &'a EvalMetrics,
    },
}

/// Receives training events.
pub trait Observer {
    /// Called for every event.
    fn on_event(&mut self, event: &Event<'_>);
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn on_event(&mut self, _event: &Event<'_>) {}
}

impl<F: FnMut(&Event<'_>)> Observer for F {
    fn on_event(&mut self, event: &Event<'_>) {
        self(event)
    }
}
