//! The buffer pool: freed GPU buffers wait here, bucketed by size, until an op asks for a buffer of
//! the same size. A training step allocates the same sizes every time, so after the first step
//! almost every request is served from the pool and the driver sees no allocation at all.
//!
//! Which free buffer a request gets depends only on *which* buffers are free, not on the order
//! they were freed in (the first in wgpu's identity order): tensors are often dropped in an
//! order that changes from step to step (the entries of a hash map), and a step that gets the
//! same buffers for the same ops as the step before finds every bind group of those ops in the
//! context's bind group cache.

use std::collections::{BTreeSet, HashMap};

/// Freed buffers by their exact (rounded) byte size.
pub(crate) struct BufferPool<B = wgpu::Buffer> {
    free: HashMap<u64, BTreeSet<B>>,
    bytes: u64,
}

impl<B> Default for BufferPool<B> {
    fn default() -> Self {
        Self {
            free: HashMap::new(),
            bytes: 0,
        }
    }
}

/// What the pool needs of a buffer: its size and a total order (wgpu's is by identity).
pub(crate) trait PoolBuffer: Ord {
    fn bytes(&self) -> u64;
}

impl PoolBuffer for wgpu::Buffer {
    fn bytes(&self) -> u64 {
        self.size()
    }
}

impl<B: PoolBuffer> BufferPool<B> {
    /// Take a cached buffer of exactly `size` bytes, if one is free: the first of them in the
    /// buffers' order.
    pub fn take(&mut self, size: u64) -> Option<B> {
        let buffer = self.free.get_mut(&size)?.pop_first()?;
        self.bytes -= size;
        Some(buffer)
    }

    /// Give a buffer back for reuse.
    pub fn put(&mut self, buffer: B) {
        let size = buffer.bytes();
        self.bytes += size;
        self.free.entry(size).or_default().insert(buffer);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in buffer: (size, identity).
    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    struct Fake(u64, u32);

    impl PoolBuffer for Fake {
        fn bytes(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn the_buffer_taken_depends_on_the_free_set_not_the_order_freed() {
        for order in [[1, 2, 3], [3, 1, 2], [2, 3, 1]] {
            let mut pool = BufferPool::default();
            for id in order {
                pool.put(Fake(256, id));
            }
            pool.put(Fake(512, 9));
            assert_eq!(pool.bytes(), 3 * 256 + 512);
            assert_eq!(
                pool.take(256),
                Some(Fake(256, 1)),
                "freed in order {order:?}"
            );
            assert_eq!(pool.take(256), Some(Fake(256, 2)));
            assert_eq!(pool.take(1024), None, "sizes match exactly");
            assert_eq!(pool.take(512), Some(Fake(512, 9)));
            assert_eq!(pool.bytes(), 256);
            assert_eq!(pool.clear(), 256);
            assert_eq!(pool.take(256), None);
        }
    }
}
