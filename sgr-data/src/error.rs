use std::path::PathBuf;

/// Errors of `sgr-data`; each names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not what its format requires.
    #[error("{path}: {problem}")]
    Format { path: PathBuf, problem: String },
    /// Data files are not where they were looked for.
    #[error("{what} not found in {dir}: {hint}")]
    NotFound {
        what: String,
        dir: PathBuf,
        hint: String,
    },
    /// A parameter is invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Building a tensor failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of `sgr-data`.
pub type Result<T> = std::result::Result<T, DataError>;
