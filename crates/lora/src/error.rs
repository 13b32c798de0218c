//! The one error type of this crate. Messages say what was expected and what was found, and
//! name the file when there is one, so they can be printed as they are.

use std::fmt;
use std::path::{Path, PathBuf};

/// What can go wrong while configuring, attaching, merging, saving or loading LoRA adapters.
#[derive(Debug)]
pub enum Error {
    /// A [`crate::LoraConfig`] (or an `adapter_config.json`) that cannot describe an adapter:
    /// rank 0, an unknown target, a layer past the model's last, ...
    Config {
        path: Option<PathBuf>,
        message: String,
    },
    /// An adapter that does not fit the base model: shapes, layer count, targets or rank differ.
    Mismatch {
        path: Option<PathBuf>,
        message: String,
    },
    /// An operation in the wrong state (attaching onto a layer that already has an adapter).
    State(String),
    /// The operating system refused a read or write.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The model layer failed (safetensors I/O, a forward pass).
    Model(transformer::Error),
    /// A tensor op failed (shapes, device).
    Tensor(tensor::Error),
}

/// This crate's `Result`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            path: None,
            message: message.into(),
        }
    }

    pub(crate) fn config_in(path: &Path, message: impl Into<String>) -> Self {
        Error::Config {
            path: Some(path.to_path_buf()),
            message: message.into(),
        }
    }

    pub(crate) fn mismatch(path: Option<&Path>, message: impl Into<String>) -> Self {
        Error::Mismatch {
            path: path.map(Path::to_path_buf),
            message: message.into(),
        }
    }
}

impl From<transformer::Error> for Error {
    fn from(e: transformer::Error) -> Self {
        Error::Model(e)
    }
}

impl From<tensor::Error> for Error {
    fn from(e: tensor::Error) -> Self {
        Error::Tensor(e)
    }
}

fn with_path(
    f: &mut fmt::Formatter<'_>,
    path: &Option<PathBuf>,
    what: &str,
    msg: &str,
) -> fmt::Result {
    match path {
        Some(p) => write!(f, "{}: {what}{msg}", p.display()),
        None => write!(f, "{what}{msg}"),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { path, message } => with_path(f, path, "invalid LoRA config: ", message),
            Error::Mismatch { path, message } => {
                with_path(f, path, "adapter does not fit the model: ", message)
            }
            Error::State(message) => write!(f, "{message}"),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Model(e) => write!(f, "{e}"),
            Error::Tensor(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Model(e) => Some(e),
            Error::Tensor(e) => Some(e),
            _ => None,
        }
    }
}
