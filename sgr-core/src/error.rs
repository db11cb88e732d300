//! Typed errors of `sgr-core`.

use std::path::PathBuf;

/// Every fallible operation of `sgr-core` returns this error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A configuration value is outside what the library supports.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A name (method, distance, data set, ...) that is not one of the valid names.
    #[error("unknown {what} `{given}`; valid: {valid}")]
    UnknownName {
        /// What kind of name.
        what: &'static str,
        /// The name given.
        given: String,
        /// The valid names.
        valid: String,
    },

    /// The requested number of modules (or split) is not supported for a model.
    #[error("unsupported split for {model}: {requested}; supported: {supported}")]
    UnsupportedSplit {
        /// The model.
        model: String,
        /// The split asked for.
        requested: String,
        /// The splits the model supports.
        supported: String,
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

    /// A checkpoint or state file is corrupt or does not match the model.
    #[error("{path}: {problem}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// The data source failed to produce a batch.
    #[error("data: {0}")]
    Data(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// Training produced a non-finite loss.
    #[error("non-finite loss {value} in module {module} at step {step}")]
    NonFiniteLoss {
        /// The module (0-based).
        module: usize,
        /// The global step (0-based).
        step: usize,
        /// The loss.
        value: f32,
    },
}

/// Result alias of `sgr-core`.
pub type Result<T> = std::result::Result<T, Error>;
