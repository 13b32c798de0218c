//! The one error type of this crate.
//!
//! Every message says which file it is about (when there is one), what was expected and what was
//! found, so that a user who points the trainer at the wrong directory can fix it from the message
//! alone: `tests/fixtures/gpt2-tiny/model.safetensors: tensor `h.0.ln_1.weight`: expected shape
//! [64], found [32]`.

use std::fmt;
use std::path::{Path, PathBuf};

/// What went wrong while reading or writing a model directory or building a tokenizer.
#[derive(Debug)]
pub enum Error {
    /// The operating system refused a read, write, rename or sync.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `config.json` is not JSON, lacks a field, has an ill-typed field, or describes a model
    /// this crate does not compute (see [`crate::GptConfig`]). `path` is `None` for configs
    /// parsed from a string.
    Config {
        path: Option<PathBuf>,
        message: String,
    },
    /// `model.safetensors` is unreadable or does not match the size table of the config.
    Checkpoint { path: PathBuf, message: String },
    /// `vocab.json` / `merges.txt` are malformed, or a tokenizer does not fit the model.
    Tokenizer {
        path: Option<PathBuf>,
        message: String,
    },
    /// An op of the tensor layer failed (shapes, device limits, GPU errors).
    Tensor(tensor::Error),
    /// An argument the model cannot take (too many tokens for its context, ids for the wrong
    /// batch shape, ...).
    Invalid(String),
}

impl From<tensor::Error> for Error {
    fn from(e: tensor::Error) -> Self {
        Error::Tensor(e)
    }
}

/// This crate's `Result`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(crate) fn tokenizer(path: Option<&Path>, message: impl Into<String>) -> Self {
        Error::Tokenizer {
            path: path.map(Path::to_path_buf),
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Config {
                path: Some(path),
                message,
            } => {
                write!(f, "{}: invalid GPT-2 config: {message}", path.display())
            }
            Error::Config {
                path: None,
                message,
            } => write!(f, "invalid GPT-2 config: {message}"),
            Error::Checkpoint { path, message } => write!(f, "{}: {message}", path.display()),
            Error::Tensor(e) => write!(f, "{e}"),
            Error::Invalid(message) => write!(f, "{message}"),
            Error::Tokenizer {
                path: Some(path),
                message,
            } => {
                write!(f, "{}: {message}", path.display())
            }
            Error::Tokenizer {
                path: None,
                message,
            } => write!(f, "tokenizer: {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_start_with_the_file() {
        let e = Error::checkpoint(
            Path::new("m/model.safetensors"),
            "tensor `wte.weight` missing",
        );
        assert_eq!(
            e.to_string(),
            "m/model.safetensors: tensor `wte.weight` missing"
        );
        let e = Error::Config {
            path: None,
            message: "field `n_head` is missing".into(),
        };
        assert_eq!(
            e.to_string(),
            "invalid GPT-2 config: field `n_head` is missing"
        );
        let e = Error::io(Path::new("x"), std::io::Error::other("boom"));
        assert!(std::error::Error::source(&e).is_some());
    }
}
