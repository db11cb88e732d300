//! # sgr-core
//!
//! Local learning for deep networks: a network is cut into gradient-isolated modules, each
//! trained by its own local loss, optionally with the Successive Gradient Reconciliation (SGR)
//! term of Yang et al., ICML 2024.
//!
//! * [`network`]: stages, split plans and the [`network::LocalNetwork`].
//! * [`sgr`]: the local step of a module and the SGR term (finite-difference or exact
//!   parameter gradient), usable by any local loss through [`sgr::LocalProblem`].
//! * [`trainer`]: `bp`, `greedy` and `sgr` side by side, with per-boundary diagnostics.
//! * [`forward`]: the BP-free estimators (forward gradients: weight and activity perturbation)
//!   and the SGR term without back-propagation.
//! * [`optim`]: SGD (momentum, Nesterov, weight decay) and AdamW with savable state, schedules.
//! * [`nn`]: layers from candle primitives (differentiable twice), the forward context.
//! * [`kernels`]: the `sgr-kernels` crate, re-exported: fast CPU convolution, BatchNorm and ReLU
//!   as candle custom ops, each running candle's own ops on other devices; used by [`nn`].
//!
//! * [`foreign`] (feature `candle-nn`): a user's own candle-nn layers and `VarMap` as stages.
//!
//! Features: `second-order` (the exact SGR way; needs the patched candle-core, see
//! [`autograd`]), `candle-nn`, `cuda`, `cudnn`.
//!
//! candle-nn's fused layers (`BatchNorm`, `LayerNorm`, `softmax_last_dim`) are not used: they
//! update statistics on every call or cut the autodiff graph silently (docs/candle.md), and
//! the SGR term needs control of both. Libraries here never print: see [`events`] and `tracing`.

pub mod autograd;
pub mod checkpoint;
pub mod ctx;
mod error;
pub mod events;
#[cfg(feature = "candle-nn")]
pub mod foreign;
pub mod forward;
pub use sgr_kernels as kernels;
pub mod loss;
pub mod memory;
pub mod method;
pub mod mix;
pub mod names;
pub mod network;
pub mod nn;
pub mod objective;
pub mod optim;
pub mod sgr;
pub mod trainer;

pub use error::{Error, Result};

#[doc(hidden)]
pub use serde as __serde;
