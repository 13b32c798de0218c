//! Timestamp queries for the profiler (`crate::profile`), on adapters with
//! `Features::TIMESTAMP_QUERY`: each timed compute pass writes a query at its beginning and its
//! end; at submission the queries are resolved into a buffer, copied to a mappable one and read
//! back, and each pass's time goes to the profiler under the pass's (phase, family) tag.

use crate::{Error, Result};

/// Timestamped compute passes per submission when profiling (two queries each).
pub(super) const MAX_TIMED_PASSES: u32 = 512;

/// The profiler's (phase, family) of a timestamped compute pass.
pub(super) type Tag = (&'static str, &'static str);

/// Timestamp queries for the profiler (`crate::profile`), on adapters that offer them: each
/// timed pass writes queries 2k and 2k+1; they are resolved and read back at submission.
pub(super) struct Timestamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Nanoseconds per timestamp tick.
    period_ns: f32,
}

impl Timestamps {
    pub(super) fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Timestamps {
        let bytes = 2 * MAX_TIMED_PASSES as u64 * 8;
        Timestamps {
            set: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * MAX_TIMED_PASSES,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("timestamp readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            period_ns: queue.get_timestamp_period(),
        }
    }

    /// The writes of the pass whose first query is `index` (2k for the k-th timed pass).
    pub(super) fn pass_writes(&self, index: u32) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: &self.set,
            beginning_of_pass_write_index: Some(index),
            end_of_pass_write_index: Some(index + 1),
        }
    }

    /// Record the resolve of the first `passes` passes' queries and their copy to the
    /// mappable buffer, at the end of a batch's encoder.
    pub(super) fn resolve(&self, encoder: &mut wgpu::CommandEncoder, passes: usize) {
        let n = 2 * passes as u32;
        encoder.resolve_query_set(&self.set, 0..n, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, n as u64 * 8);
    }

    /// Wait for the submission just made, read its pass timestamps and give each pass's time
    /// to the profiler under the pass's tag.
    pub(super) fn read(&self, ctx: &super::GpuContext, tags: &[Tag]) -> Result<()> {
        let bytes = tags.len() as u64 * 16;
        ctx.map_for_reading(&self.readback, bytes, "timestamp readback")?;
        let ticks: Vec<u64> = self
            .readback
            .get_mapped_range(..bytes)
            .map_err(|e| Error::Gpu(format!("timestamp readback: {e}")))?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunks")))
            .collect();
        self.readback.unmap();
        for (tag, pair) in tags.iter().zip(ticks.chunks_exact(2)) {
            let ns = pair[1].saturating_sub(pair[0]) as f64 * f64::from(self.period_ns);
            crate::profile::add_gpu_time(*tag, ns * 1e-9);
        }
        Ok(())
    }
}
