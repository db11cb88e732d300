//! # sgr-run
//!
//! A training run as a library, which the `sgr train` command is a thin shell over:
//!
//! * [`spec`]: the [`RunSpec`] (model, data, method, optimizer, schedule, device, seed), the
//!   one schema of `--config` files and `config.json`, with its hash;
//! * [`rundir`]: the files of a run directory, written atomically, and the model card;
//! * [`run`]: create or resume a [`Run`], train it with an evaluation and a checkpoint per
//!   epoch, stop on a step budget or an interrupt, write the model and the typed [`Summary`];
//! * [`data`]: the data sets with their standard transforms;
//! * [`memory`]: training memory measured on real steps, and the memory-balanced split;
//! * [`budget`]: a step's memory estimated before it is spent, and refused when it cannot fit.
//!
//! Progress is reported through `sgr-core`'s [`Observer`](sgr_core::events::Observer) events;
//! the records it writes are `sgr-schema`'s types, so tools read them without a tensor library.

pub mod budget;
pub mod counting;
pub mod data;
mod error;
pub mod identity;
pub mod memory;
pub mod preprocess;
pub mod ranks;
pub mod run;
pub mod rundir;
pub mod spec;

pub use error::{Error, Result};
pub use run::{Outcome, Position, ResumeChanges, Resumed, Run, RunOptions, Stop};
pub use rundir::RunDir;
pub use sgr_schema::{EpochRecord, Summary};
pub use spec::{Dataset, DeviceKind, OptimizerKind, RunSpec, ScheduleKind};
