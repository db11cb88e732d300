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

    /// A checkpoint or state file is corrupt or does not match the model.
    #[error("{path}: {problem}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A file's tensor data does not match the checksum recorded in it when it was written:
    /// it was damaged on disk or in transit.
    #[error("{path} is corrupt: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What does not match, and what to do about it.
        detail: String,
    },

    /// A tensor holds NaN or infinity: training diverged. When `path` is set, that file was
    /// not written (the previous one on disk, if any, is left as it was).
    #[error("{}", non_finite_message(.tensor, .path.as_deref()))]
    NonFinite {
        /// The tensor's name, e.g. `layer1.0.bn1.running_var` (optimizer state in a training
        /// checkpoint: `optim/<module>/<key>`).
        tensor: String,
        /// The file that was not written because of it.
        path: Option<PathBuf>,
    },

    /// A file holds a tensor with NaN or infinity: a diverged or damaged model, refused on
    /// load (files without a checksum, such as PyTorch exports, are checked only this way).
    #[error(
        "{path}: tensor `{tensor}` holds a non-finite value (NaN or inf), so the file is not \
         loaded: it comes from a diverged run or is damaged; use an earlier copy"
    )]
    NonFiniteInFile {
        /// The tensor's name as the file stores it.
        tensor: String,
        /// The file.
        path: PathBuf,
    },

    /// The data source failed to produce a batch. (Its message is part of this one, not a
    /// `source()`, so that reporters that print the chain name the file once.)
    #[error("data: {0}")]
    Data(Box<dyn std::error::Error + Send + Sync>),

    /// Second-order autodiff was asked for in a build without it: sgr-core's `second-order`
    /// feature needs the patched candle-core (docs/library.md).
    #[error(
        "{what} needs sgr-core's `second-order` feature, which builds only against the \
         candle-core this workspace patches in (add its `[patch.crates-io]` line, README \
         \"Library\"); the SGR ways `finite-difference` (central) and `forward-difference` \
         need no second order"
    )]
    SecondOrderUnavailable {
        /// What needed it.
        what: &'static str,
    },

    /// A layer makes non-smooth or random decisions that the forward context does not see, so
    /// a finite-difference SGR pass cannot replay them and would compute a wrong gradient.
    #[error(
        "layer `{layer}` ({decisions}) cannot be replayed by the `{way}` SGR gradient; ways \
         that work with it: {works}"
    )]
    UnreplayableLayer {
        /// The layer (its unit label or name).
        layer: String,
        /// What the layer decides out of the context's sight.
        decisions: &'static str,
        /// The SGR gradient way asked for.
        way: String,
        /// What works instead.
        works: String,
    },

    /// A trainable tensor received no gradient from its module's loss: an operation cut the
    /// autodiff graph, or the tensor is not used. Its optimizer would silently get zeros.
    #[error(
        "trainable tensor `{tensor}` received no gradient from its module's loss: an \
         operation between it and the loss cuts candle's autodiff graph (a detach, or a fused op \
         without backward such as candle-nn's softmax_last_dim or LayerNorm), or the tensor is \
         unused; use a differentiable formulation, or list an unused tensor as a buffer"
    )]
    MissingGradient {
        /// The tensor's name.
        tensor: String,
    },

    /// An internal invariant broke: a bug in sgr, not in the input. Please report it.
    #[error("internal error (a bug in sgr; please report it): {0}")]
    Internal(String),

    /// A pass reached a module whose tensors this network released
    /// ([`crate::network::LocalNetwork::release_module`]): in a distributed run, another rank
    /// owns it.
    #[error(
        "module {module} is not held here: its tensors were released to the rank that owns it"
    )]
    Released {
        /// The module (0-based).
        module: usize,
    },

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

fn non_finite_message(tensor: &str, path: Option<&std::path::Path>) -> String {
    let what =
        format!("tensor `{tensor}` holds a non-finite value (NaN or inf): training diverged");
    match path {
        Some(p) => format!(
            "{} not written: {what}; the file already on disk, if any, is left as it was",
            p.display()
        ),
        None => what,
    }
}

/// Result alias of `sgr-core`.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// What `anyhow`'s `{:#}` and `main`'s reporter print: the message and every source.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            s.push_str(&format!(": {cause}"));
            next = cause.source();
        }
        s
    }

    #[test]
    fn a_data_error_names_its_file_once_when_its_chain_is_printed() {
        let io = std::io::Error::other("/data/val/b/04.png: truncated PNG");
        let e = Error::Data(Box::new(io));
        assert_eq!(chain(&e), "data: /data/val/b/04.png: truncated PNG");
    }
}
