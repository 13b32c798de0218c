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
    /// The adapter cannot give the device what was asked: each missing limit or feature, with
    /// the value asked and the value the adapter offers.
    Unsupported {
        adapter: String,
        missing: Vec<String>,
    },
    /// One tensor is larger than a device limit allows (checked before the driver is asked).
    TooLarge {
        what: String,
        needed: u64,
        limit: &'static str,
        available: u64,
    },
    /// The driver or the system allocator has no memory left for an allocation of `needed` bytes.
    OutOfMemory {
        what: String,
        needed: u64,
        /// Bytes held by the device's live tensors when it happened.
        live: u64,
        detail: String,
    },
    /// The GPU device is gone (destroyed, driver reset, unplugged); it stays unusable.
    DeviceLost(String),
    /// wgpu reported an error (validation, mapping).
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
            Error::Unsupported { adapter, missing } => write!(
                f,
                "GPU adapter `{adapter}` cannot give what was asked: {}",
                missing.join("; ")
            ),
            Error::TooLarge {
                what,
                needed,
                limit,
                available,
            } => write!(
                f,
                "{what} needs {}, more than the device's `{limit}` of {}",
                bytes(*needed),
                bytes(*available)
            ),
            Error::OutOfMemory {
                what,
                needed,
                live,
                detail,
            } => write!(
                f,
                "out of memory: {what} needs {} while live tensors hold {} ({detail})",
                bytes(*needed),
                bytes(*live)
            ),
            Error::DeviceLost(why) => write!(
                f,
                "GPU device lost ({why}); every later operation on it fails, open a new device"
            ),
            Error::Gpu(msg) => write!(f, "GPU error: {msg}"),
            Error::Invalid(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// Say what an allocation error was allocating: replaces the generic `what` of
    /// [`Error::TooLarge`] and [`Error::OutOfMemory`] ("a GPU buffer") by the caller's
    /// ("a tensor of shape [50257, 768]"); other errors pass through.
    pub(crate) fn allocating(self, what: impl FnOnce() -> String) -> Error {
        match self {
            Error::TooLarge {
                needed,
                limit,
                available,
                ..
            } => Error::TooLarge {
                what: what(),
                needed,
                limit,
                available,
            },
            Error::OutOfMemory {
                needed,
                live,
                detail,
                ..
            } => Error::OutOfMemory {
                what: what(),
                needed,
                live,
                detail,
            },
            other => other,
        }
    }
}

/// `n` bytes, exact and in the nearest binary unit: "154389504 bytes (147.2 MiB)".
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = n as f64;
    let mut unit = None;
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = Some(u);
    }
    match unit {
        Some(u) => format!("{n} bytes ({value:.1} {u})"),
        None => format!("{n} bytes"),
    }
}

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
