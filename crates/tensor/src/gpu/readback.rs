//! Reading GPU memory back to the host: copy into a MAP_READ staging buffer, submit, and wait
//! (with a deadline, never a blocking receive) until wgpu has mapped it. A dry-run context
//! ([`GpuOptions::dry_run`](super::GpuOptions::dry_run)) waits for nothing and reads 1.0 for
//! every element: finite, and non-zero, so that data-dependent branches (gradient clipping)
//! take the path that does more work.

use super::GpuContext;
use super::errors::{self, capture};
use crate::{Error, Result};

/// How long a readback waits for its buffer to be mapped after the GPU finished, before it
/// gives up (normally the first poll maps it; under several threads polling one device the
/// callback can arrive a moment later, in another thread's poll).
const MAP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl GpuContext {
    /// Map the first `bytes` of `buffer` (MAP_READ, written by work already submitted) for
    /// reading; `what` names the read in errors. The map callback runs inside a poll once the
    /// GPU is done, in whichever thread polls (another thread's poll may be delivering it right
    /// now). Never block on the channel, so a device that stops answering is an error after
    /// MAP_WAIT rather than a hang.
    pub(super) fn map_for_reading(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
        what: &str,
    ) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        buffer.map_async(wgpu::MapMode::Read, ..bytes, move |r| {
            let _ = tx.send(r);
        });
        let mut mapped = None;
        let deadline = std::time::Instant::now() + MAP_WAIT;
        loop {
            self.wait()?;
            match rx.try_recv() {
                Ok(r) => {
                    mapped = Some(r);
                    break;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            }
        }
        let Some(mapped) = mapped else {
            self.health.check()?;
            return Err(Error::Gpu(format!(
                "{what}: the GPU finished but did not map the result within {MAP_WAIT:?}"
            )));
        };
        mapped.map_err(|e| {
            self.health
                .check()
                .err()
                .unwrap_or_else(|| Error::Gpu(format!("{what}: {e}")))
        })
    }

    /// Copy `bytes` bytes of `buffer` from `offset` back to the host.
    pub(crate) fn read(&self, buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>> {
        self.health.check()?;
        let size = bytes.max(4).div_ceil(4) * 4;
        let (staging, error) = capture(&self.device, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        if let Some(e) = error {
            let live = self.memory().live;
            return Err(errors::alloc_error(
                e,
                "the readback buffer",
                size,
                live,
                &self.health,
            ));
        }
        self.copy(buffer, offset, &staging, 0, size);
        self.flush()?;
        crate::counts::wait("readback", bytes);
        if self.dry_run {
            let one = 1.0f32.to_le_bytes();
            return Ok((0..bytes as usize).map(|i| one[i % 4]).collect());
        }
        self.map_for_reading(&staging, size, "readback")?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("readback: {e}")))?[..bytes as usize]
            .to_vec();
        staging.unmap();
        self.health.check()?;
        Ok(data)
    }
}
