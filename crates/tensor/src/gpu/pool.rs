//! The buffer pool: freed GPU buffers wait here, bucketed by size, until an op asks for a buffer of
//! the same size. A training step allocates the same sizes every time, so after the first step
//! almost every request is served from the pool and the driver sees no allocation at all.

use std::collections::HashMap;

/// Freed buffers by their exact (rounded) byte size.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
}

impl BufferPool {
    /// Take a cached buffer of exactly `size` bytes, if one is free.
    pub fn take(&mut self, size: u64) -> Option<wgpu::Buffer> {
        let buffer = self.free.get_mut(&size)?.pop()?;
        self.bytes -= size;
        Some(buffer)
    }

    /// Give a buffer back for reuse.
    pub fn put(&mut self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        self.bytes += size;
        self.free.entry(size).or_default().push(buffer);
    }

    /// Bytes held by cached buffers.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Drop every cached buffer (returns the bytes released).
    pub fn clear(&mut self) -> u64 {
        let released = self.bytes;
        self.free.clear();
        self.bytes = 0;
        released
    }
}
