//! Binding ranges of buffers, and how ops larger than one binding are cut into pieces.
//!
//! A storage binding may cover at most `max_storage_buffer_binding_size` bytes (128 MiB on
//! lavapipe and by wgpu's default), and must start at a multiple of
//! `min_storage_buffer_offset_alignment` (usually 256 bytes). A tensor may be larger than that
//! (GPT-2's token embedding is 154 MB), so ops bind a *range* of a tensor's buffer and are told,
//! in their params, the element offset at which their data starts inside that range.

use super::GpuContext;
use crate::{Error, Result, Tensor};

/// A byte range of a buffer bound to one `@binding` of a kernel.
#[derive(Clone, Copy)]
pub(crate) struct Binding<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

/// A range of a tensor's elements made bindable: the binding and the element offset of the
/// first requested element inside it.
pub(crate) struct View<'a> {
    pub binding: Binding<'a>,
    /// Element index, inside the bound range, of the first requested element.
    pub offset: u32,
}

impl GpuContext {
    /// Largest byte size one storage binding may have on this device.
    pub(crate) fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// Bind `len` elements of `t` starting at element `start` (counted from `t`'s first
    /// element, which is not the buffer's first when `t` lives in an arena).
    pub(crate) fn view<'a>(&self, t: &'a Tensor, start: usize, len: usize) -> Result<View<'a>> {
        let (buffer, base) = t.gpu_location()?;
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        let byte_start = (base + start) as u64 * 4;
        let aligned = byte_start - byte_start % align;
        let lead = byte_start - aligned;
        let size = (lead + len.max(1) as u64 * 4).min(buffer.size() - aligned);
        if size > self.max_binding {
            return Err(Error::Limit {
                limit: "max_storage_buffer_binding_size",
                needed: size,
                available: self.max_binding,
            });
        }
        Ok(View {
            binding: Binding {
                buffer,
                offset: aligned,
                size,
            },
            offset: (lead / 4) as u32,
        })
    }

    /// Bind the whole of `t`.
    pub(crate) fn view_all<'a>(&self, t: &'a Tensor) -> Result<View<'a>> {
        self.view(t, 0, t.numel())
    }

    /// Split `rows` rows into chunks so that, for every operand, `row_elems[i]` elements per
    /// row times the rows of a chunk (plus the alignment lead) fit in one binding.
    /// Returns `(first_row, row_count)` pairs.
    pub(crate) fn row_chunks(
        &self,
        rows: usize,
        row_elems: &[usize],
    ) -> Result<Vec<(usize, usize)>> {
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        let room = self.max_binding.saturating_sub(align);
        let widest = row_elems.iter().copied().max().unwrap_or(1).max(1) as u64 * 4;
        let per_chunk = (room / widest) as usize;
        if per_chunk == 0 {
            return Err(Error::Limit {
                limit: "max_storage_buffer_binding_size",
                needed: widest + align,
                available: self.max_binding,
            });
        }
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = per_chunk.min(rows - start);
            chunks.push((start, n));
            start += n;
        }
        if chunks.is_empty() {
            chunks.push((0, 0));
        }
        Ok(chunks)
    }
}

/// Workgroup counts for `n` invocations of `workgroup_size` threads, laid out on a 2-D grid
/// because one dimension holds at most `max_per_dim` (65,535) workgroups. Kernels rebuild the
/// flat index as `(wg.y * num_workgroups.x + wg.x) * workgroup_size + local`.
pub(crate) fn grid_2d(n: usize, workgroup_size: u32, max_per_dim: u32) -> [u32; 3] {
    let groups = n.div_ceil(workgroup_size as usize).max(1) as u64;
    let max = max_per_dim as u64;
    if groups <= max {
        [groups as u32, 1, 1]
    } else {
        let y = groups.div_ceil(max);
        let x = groups.div_ceil(y);
        [x as u32, y as u32, 1]
    }
}

#[cfg(test)]
mod tests {
    use super::grid_2d;

    #[test]
    fn grid_covers_every_invocation_within_limits() {
        for n in [
            1usize,
            255,
            256,
            257,
            65_535 * 256,
            65_535 * 256 + 1,
            50_257 * 768,
        ] {
            let [x, y, _] = grid_2d(n, 256, 65_535);
            assert!(x <= 65_535 && y <= 65_535);
            assert!(x as usize * y as usize * 256 >= n, "n={n}: {x}x{y}");
        }
    }
}
