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

    /// An I/O operation on a file failed.
    #[error("{path}: {source}")]
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
