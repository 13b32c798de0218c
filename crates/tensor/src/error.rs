//! The one error type of the tensor layer.
//!
//! Every message says what was expected and what was found, so a caller several layers up can
//! print it as it is.

use std::fmt;

/// What can go wrong in the tensor layer.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// An op was given tensors whose shapes do not fit together.
    Shape {
        op: &'static str,
        expected: String,
        found: String,
    },
    /// Tensors of one op live on different devices.
    DeviceMismatch { op: &'static str },
    /// The device cannot serve a request: names the limit, the needed and the available value.
    Limit {
        limit: &'static str,
        needed: u64,
        available: u64,
    },
    /// No GPU adapter was found (or none that the request accepts).
    NoAdapter(String),
    /// wgpu reported an error (validation, out of memory, lost device, mapping).
    Gpu(String),
    /// An argument outside its domain (a negative probability, an id past the vocabulary, ...).
    Invalid(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape {
                op,
                expected,
                found,
            } => write!(f, "{op}: expected {expected}, found {found}"),
            Error::DeviceMismatch { op } => {
                write!(f, "{op}: all tensors must be on the same device")
            }
            Error::Limit {
                limit,
                needed,
                available,
            } => write!(
                f,
                "the device cannot serve this request: limit `{limit}` is {available}, {needed} is needed"
            ),
            Error::NoAdapter(why) => write!(f, "no GPU adapter: {why}"),
            Error::Gpu(msg) => write!(f, "GPU error: {msg}"),
            Error::Invalid(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// The result type of the tensor layer.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a shape error.
pub(crate) fn shape_err<T>(
    op: &'static str,
    expected: impl Into<String>,
    found: impl fmt::Debug,
) -> Result<T> {
    Err(Error::Shape {
        op,
        expected: expected.into(),
        found: format!("{found:?}"),
    })
}
