//! Memory by purpose: parameters, gradients, optimizer state and saved activations, each as
//! live and peak bytes. Each owner (the tape, the gradient store, the optimizer) keeps a
//! [`Counter`] of the bytes it holds; [`MemoryReport`] gathers them.

use std::fmt;

/// Live and peak bytes of one purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub live: u64,
    pub peak: u64,
}

impl Counter {
    pub(crate) fn add(&mut self, bytes: u64) {
        self.live += bytes;
        self.peak = self.peak.max(self.live);
    }

    pub(crate) fn sub(&mut self, bytes: u64) {
        self.live = self.live.saturating_sub(bytes);
    }

    /// Start a new peak from the live value.
    pub fn reset_peak(&mut self) {
        self.peak = self.live;
    }
}

/// Bytes by purpose at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Frozen and trainable parameter values.
    pub parameters: Counter,
    /// Gradient buffers (trainable parameters only).
    pub gradients: Counter,
    /// Optimizer state (AdamW: m and v per trainable parameter).
    pub optimizer: Counter,
    /// Tensors saved by the tape for backward.
    pub activations: Counter,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("saved activations", self.activations),
        ];
        writeln!(
            f,
            "{:<18} {:>14} {:>14}",
            "purpose", "live bytes", "peak bytes"
        )?;
        for (name, c) in rows {
            writeln!(
                f,
                "{name:<18} {:>14} {:>14}   ({:.2} / {:.2} MiB)",
                c.live,
                c.peak,
                mib(c.live),
                mib(c.peak)
            )?;
        }
        Ok(())
    }
}

/// Bytes of the parameters' values, as a counter whose peak is the live value.
pub fn parameter_bytes<'a>(params: impl IntoIterator<Item = &'a crate::Param>) -> Counter {
    let live = params.into_iter().map(|p| p.value().bytes()).sum();
    Counter { live, peak: live }
}
