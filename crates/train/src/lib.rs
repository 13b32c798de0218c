//! # train: the program people run
//!
//! The top layer. Today it lists devices and benchmarks the matrix product; the fine-tuning
//! commands grow here as the layers below them land (see `docs/` and the README).
//!
//! All logic lives in this library so that integration tests run exactly what the binary runs;
//! `main.rs` only parses arguments.

pub mod bench;
pub mod devices;

/// Errors of the binary: any layer's error, printed as its message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;
