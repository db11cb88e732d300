//! What training reports: per-step and per-epoch metrics, delivered to an [`Observer`].
//! The library never prints; binaries render these events.

use serde::{Deserialize, Serialize};

/// Per-boundary reconciliation between module k-1 and module k (k ≥ 1, 0-based modules).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoundaryMetrics {
    /// Index k of the later module of the boundary.
    pub boundary: usize,
    /// Mean over steps of cos(a_{k-1}, b_k).
    pub cos: f64,
    /// Mean over steps of ||a_{k-1} − b_k|| / ||a_{k-1}||.
    pub rel_dist: f64,
    /// Mean SGR distance D at the boundary (only when the SGR term is computed).
    pub sgr_distance: Option<f64>,
}

/// One optimisation step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Global step (0-based).
    pub step: usize,
    /// Local loss of every module (the last is the network's loss).
    pub module_losses: Vec<f64>,
    /// Learning rate used.
    pub lr: f64,
    /// SGR weight used (0 for methods without SGR).
    pub lambda: f64,
    /// Samples in the batch.
    pub batch: usize,
    /// Correct predictions of the network's classifier on the batch.
    pub correct: usize,
    /// Wall time of the step in seconds.
    pub seconds: f64,
}

/// A whole training epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Steps taken in the epoch.
    pub steps: usize,
    /// Mean loss of the network's classifier (last module) over the epoch.
    pub train_loss: f64,
    /// Mean local loss of each module.
    pub module_losses: Vec<f64>,
    /// Training accuracy of the network's classifier (in training mode).
    pub train_accuracy: f64,
    /// Reconciliation at each boundary.
    pub boundaries: Vec<BoundaryMetrics>,
    /// Learning rate at the last step.
    pub lr: f64,
    /// Wall time of the epoch's training steps.
    pub seconds: f64,
}

/// Evaluation of a model on a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// Top-5 accuracy (when there are more than 5 classes).
    pub top5: Option<f64>,
    /// Samples evaluated.
    pub samples: usize,
}

/// Something that happened during training.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A step finished.
    Step(&'a StepMetrics),
    /// An epoch of training finished.
    Epoch(&'a EpochMetrics),
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
