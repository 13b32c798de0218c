//! Memory accounting per device: live bytes (held by tensors now) and the peak since the last reset.
//!
//! Both backends count the bytes of tensor storage they hand out. The GPU backend also counts what
//! its buffer pool keeps cached for reuse, which is memory the driver still holds but no tensor does.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by all tensors of one device.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    live: AtomicU64,
    peak: AtomicU64,
    pooled: AtomicU64,
    allocations: AtomicU64,
}

/// A snapshot of a device's memory counters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Bytes held by live tensors.
    pub live: u64,
    /// Largest `live` seen since the device was made or `reset_peak` was called.
    pub peak: u64,
    /// Bytes of freed buffers the GPU pool keeps for reuse (0 on the CPU).
    pub pooled: u64,
    /// Number of fresh allocations from the driver or the system allocator (pool hits excluded).
    pub allocations: u64,
}

impl MemoryCounters {
    pub(crate) fn alloc(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
        crate::counts::allocated(live - bytes, live, self.pooled.load(Ordering::Relaxed));
    }

    pub(crate) fn free(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn count_fresh_allocation(&self) {
        self.allocations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_pooled(&self, bytes: u64) {
        self.pooled.store(bytes, Ordering::Relaxed);
        crate::counts::held(self.live.load(Ordering::Relaxed) + bytes);
    }

    /// Read all counters.
    pub fn snapshot(&self) -> MemoryStats {
        MemoryStats {
            live: self.live.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            pooled: self.pooled.load(Ordering::Relaxed),
            allocations: self.allocations.load(Ordering::Relaxed),
        }
    }

    /// Start a new peak measurement from the current live bytes.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}
