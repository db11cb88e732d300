//! What `sgr bench --json` prints: one measurement of training steps on random inputs.

use serde::{Deserialize, Serialize};

/// One `sgr bench` measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// Model name.
    pub model: String,
    /// Method, `OBJECTIVE[+sgr]`.
    pub method: String,
    /// Number of modules K.
    pub modules: usize,
    /// How the SGR gradient is computed, for methods with `+sgr`.
    pub sgr_grad: Option<String>,
    /// Images per step.
    pub batch_size: usize,
    /// Input shape `[channels, height, width]`.
    pub input: [usize; 3],
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// Median seconds of the timed steps.
    pub median_step_seconds: f64,
    /// `batch_size / median_step_seconds`.
    pub images_per_s: f64,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Peak resident memory of the process, when the platform reports it.
    pub peak_memory_bytes: Option<u64>,
    /// Highest live heap bytes during the steps, warm-up included: weights, optimizer state,
    /// the batch, and the step's activations and gradients (the training memory on the CPU).
    #[serde(default)]
    pub peak_heap_bytes: u64,
    /// Highest device memory allocated during the steps, on a GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_memory_bytes: Option<u64>,
    /// Hash of the benchmark's specification (`sgr bench --print-spec`).
    #[serde(default)]
    pub spec_hash: String,
    /// The pipeline the modules ran on (`sgr bench --pipeline N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineReport>,
}

/// How a pipelined benchmark placed its modules, and what each worker holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineReport {
    /// The modules of each worker, `[first, end)`.
    pub stages: Vec<[usize; 2]>,
    /// Compute threads per worker.
    pub threads: usize,
    /// Measured seconds per step of each module (what the placement balanced).
    pub module_seconds: Vec<f64>,
    /// Bytes each module sends downstream per step (its output h and gradient a; the batch
    /// travels as well; 0 for the last module).
    pub message_bytes: Vec<u64>,
    /// Heap bytes each worker holds at its peak, estimated from a measured sequential step:
    /// its modules' weights, buffers and optimizer state, plus the largest transient peak of
    /// one of its modules' step (activations, gradients, SGR passes).
    pub worker_heap_bytes: Vec<u64>,
}
