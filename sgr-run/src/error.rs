//! Typed errors of `sgr-run`.

use std::path::PathBuf;

/// Every fallible operation of `sgr-run` returns this error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine failed (tensor ops, checkpoints, non-finite losses, ...).
    #[error(transparent)]
    Core(#[from] sgr_core::Error),

    /// A data set could not be read.
    #[error(transparent)]
    Data(#[from] sgr_data::DataError),

    /// A training batch could not be read mid-run; a checkpoint of the steps before it was
    /// saved.
    #[error(
        "{problem}\nthe run stopped at step {step} and saved a checkpoint: fix or remove the file, \
         then continue with `sgr train --resume {}`", dir.display()
    )]
    DataMidRun {
        /// What could not be read (printed, not chained, so that it appears once).
        problem: sgr_data::DataError,
        /// The run directory.
        dir: PathBuf,
        /// Steps taken (and saved) before it.
        step: usize,
    },

    /// The run specification is invalid; the message names the field by its flag.
    #[error("{0}")]
    Spec(String),

    /// A file of the run (a config file, `config.json`, `metrics.jsonl`, ...) is unreadable.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// Another process trains in the run directory.
    #[error(
        "{dir} is in use by another training ({holder}); wait for it to finish, or choose \
         another --out"
    )]
    Locked {
        /// The run directory.
        dir: PathBuf,
        /// Who holds it, as its lock file says.
        holder: String,
    },

    /// The output folder already holds a run.
    #[error(
        "{dir} already holds a run ({file}); continue it with --resume {dir}, replace it with \
         --overwrite, or choose another --out"
    )]
    HoldsRun {
        /// The run directory.
        dir: PathBuf,
        /// A file of the existing run.
        file: String,
    },

    /// A tensor of the network or an evaluation is not finite: the run diverged.
    #[error("{0}")]
    Diverged(String),

    /// An I/O operation on a file failed (the message names the file; the cause is the
    /// `source()`, which error reporters print after it).
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of `sgr-run`.
pub type Result<T> = std::result::Result<T, Error>;
