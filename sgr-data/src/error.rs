//! Typed errors of `sgr-data`.

use std::path::PathBuf;

/// Errors of `sgr-data`; each names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// Reading a file failed (the message names the file; the cause is the `source()`).
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file's content is not what its format requires.
    #[error("{path}: {problem}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Data files are not where they were looked for.
    #[error("{what} not found in {dir}: {hint}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// Where.
        dir: PathBuf,
        /// What to do about it.
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

/// The bytes of a data file: a regular file of at most `max` bytes (`sgr_schema::file`), an
/// error naming it otherwise.
pub(crate) fn read_file(path: &std::path::Path, max: u64) -> Result<Vec<u8>> {
    sgr_schema::file::read_regular(path, max).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}
