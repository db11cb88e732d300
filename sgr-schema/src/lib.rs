//! # sgr-schema
//!
//! The records an sgr run writes, as plain serde types: what `metrics.jsonl` holds one line per
//! epoch of ([`EpochRecord`]), what `summary.json` holds ([`Summary`]), what `sgr bench --json`
//! prints ([`BenchReport`]) and the charts `sgr plot --lines` draws ([`LineChart`]). Tools that
//! read runs, such as `cargo xtask`, depend on this crate alone and compile no tensor library.
//!
//! [`file`] is how every sgr crate reads a file: regular files only, bounded by the size their
//! format allows.

mod bench;
mod chart;
pub mod file;

pub use bench::{BenchReport, PipelineReport};
pub use chart::{LineChart, Series};

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

/// One line of `metrics.jsonl`: an epoch's training metrics and the evaluation after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Training metrics of the epoch.
    #[serde(flatten)]
    pub train: EpochMetrics,
    /// Test loss after the epoch.
    pub test_loss: f64,
    /// Test top-1 accuracy after the epoch.
    pub test_accuracy: f64,
    /// Test top-5 accuracy after the epoch, when there are more than 5 classes.
    pub test_top5: Option<f64>,
    /// Seconds since this invocation of the run started.
    pub elapsed_seconds: f64,
}

/// `summary.json`: the outcome of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Method, `OBJECTIVE[+sgr]`.
    pub method: String,
    /// Model name.
    pub model: String,
    /// Data set name.
    pub dataset: String,
    /// Number of modules K.
    pub modules: usize,
    /// Epochs completed.
    pub epochs: usize,
    /// Optimisation steps taken.
    pub steps: usize,
    /// Training samples per epoch.
    pub train_samples: usize,
    /// Test samples.
    pub test_samples: usize,
    /// Final test top-1 accuracy.
    pub test_accuracy: f64,
    /// 1 − test accuracy.
    pub test_error: f64,
    /// Final test top-5 accuracy, when there are more than 5 classes.
    pub test_top5: Option<f64>,
    /// Seconds spent in training steps, over every invocation of the run.
    pub train_seconds: f64,
    /// Peak resident memory of the process, when the platform reports it.
    pub peak_memory_bytes: Option<u64>,
    /// In a distributed run, each rank's peak resident memory, in rank order (0 where the
    /// platform does not report it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_peak_memory_bytes: Vec<u64>,
    /// Mean cos(a, b) per boundary over the last epoch.
    pub final_boundary_cos: Vec<f64>,
    /// Test accuracy of the initial weights, for runs started from trained weights
    /// (`--init-from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_test_accuracy: Option<f64>,
    /// Hash of the run specification (`config.json`): runs with equal hashes trained the same.
    #[serde(default)]
    pub spec_hash: String,
    /// Whether the `test_*` fields measure validation images held out of the training set
    /// (`validation` in `config.json`) rather than the test split.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub validation: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_flatten() {
        let r = EpochRecord {
            train: EpochMetrics {
                epoch: 1,
                steps: 3,
                train_loss: 0.5,
                module_losses: vec![0.7, 0.5],
                train_accuracy: 0.8,
                boundaries: vec![BoundaryMetrics {
                    boundary: 1,
                    cos: 0.4,
                    rel_dist: 1.1,
                    sgr_distance: None,
                }],
                lr: 0.01,
                seconds: 2.0,
            },
            test_loss: 0.6,
            test_accuracy: 0.75,
            test_top5: Some(0.99),
            elapsed_seconds: 3.5,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"train_loss\":0.5") && !line.contains("\"train\""));
        assert_eq!(serde_json::from_str::<EpochRecord>(&line).unwrap(), r);
    }
}
