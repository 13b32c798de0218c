//! # serve: one frozen base model, many LoRA adapters, one OpenAI-compatible server
//!
//! LoRA's promise for deployment is one base shared by many small task adapters. Left unmerged,
//! each sequence of a batch can pick its adapter: the base product is shared by every row and
//! each row adds its own adapter's low-rank term (the [`lora::AdapterBank`], by SGMV). This
//! crate puts that behind HTTP:
//!
//! - [`api`] reads requests field by field; [`error`] answers in OpenAI's error shape;
//! - [`http`] routes, checks the API key and body sizes; [`completions`] answers completions,
//!   whole or streamed; [`paths`] confines adapter loading to the configured roots;
//! - [`engine`] owns the model on its own thread and decodes with continuous batching
//!   ([`engine::forward`]: a ragged step where each sequence has its own position and cache);
//! - [`metrics`] exports Prometheus' text format; [`server`] starts, drains and stops.
//!
//! ```no_run
//! use serve::{ServeConfig, Server};
//!
//! let mut cfg = ServeConfig::new("models/base");
//! cfg.port = 0; // any free port
//! let server = Server::start(cfg, tensor::Device::cpu())?;
//! println!("listening on http://{}/v1", server.addr());
//! server.shutdown();
//! server.wait()?;
//! # Ok::<(), serve::Error>(())
//! ```

pub mod api;
pub mod completions;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod paths;
pub mod server;

pub use engine::Mode;
pub use http::RequestLimits;
pub use server::{ServeConfig, Server, discover, run};

/// Errors of starting or running the server, printed as their message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;
