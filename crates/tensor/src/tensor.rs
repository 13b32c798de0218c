//! [`Tensor`]: an f32 array of a given shape, contiguous and row-major, on one device.
//!
//! A tensor is a shape plus a reference-counted storage. Cloning a tensor is cheap and shares
//! the storage; ops return new tensors, except the few documented in-place ones (the AdamW
//! update, accumulation into a gradient), which write into the storage all clones share.
//!
//! **Views (GPU).** A GPU tensor either owns its buffer or lives in a range of another tensor's
//! buffer, an *arena*, from an element offset on: [`Tensor::view`] makes such a tensor, and
//! [`Tensor::move_into`] moves an existing one there (its data copied, its own buffer given
//! back, every clone of its handle then seeing the arena). The optimizer keeps the trainable
//! parameters, their gradients and Adam's moments each in one arena, so a single dispatch can
//! update them all. Everything that touches a GPU tensor's data goes through its location
//! (buffer, element offset): the binding ranges of every kernel (`gpu::bind`), readback,
//! copies, uploads. Views are at any element offset; bindings start at the aligned byte below
//! and kernels are told the lead in their params, as for any range of a large tensor. CPU
//! tensors always own their data.

use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::device::{CpuContext, Device};
use crate::gpu::GpuContext;
use crate::{Error, Result, shape_err};

/// Where the numbers are.
pub(crate) enum Storage {
    Cpu {
        data: RwLock<Vec<f32>>,
        ctx: Arc<CpuContext>,
    },
    Gpu {
        /// The tensor's own buffer; `None` for a view made by [`Tensor::view`]. Once `home` is
        /// set, this handle is stale (the buffer went back to the pool) and never used.
        buffer: Option<wgpu::Buffer>,
        ctx: Arc<GpuContext>,
        /// Where the data lives when it is in an arena: set once, by [`Tensor::view`] or
        /// [`Tensor::move_into`].
        home: OnceLock<Home>,
    },
}

/// A GPU tensor's place inside an arena: the arena (a tensor that owns its buffer, kept alive
/// by every tensor that lives in it) and the element offset of the tensor's first element.
pub(crate) struct Home {
    arena: Tensor,
    offset: usize,
}

impl Drop for Storage {
    fn drop(&mut self) {
        match self {
            Storage::Cpu { data, ctx } => {
                let len = data.get_mut().map(|d| d.capacity()).unwrap_or(0);
                ctx.memory.free(len as u64 * 4);
            }
            Storage::Gpu { buffer, ctx, home } => {
                // A tensor moved into an arena gave its buffer back when it moved.
                let own = buffer.take().filter(|_| home.get().is_none());
                if let Some(b) = own {
                    ctx.release(b);
                }
            }
        }
    }
}

/// An f32 tensor: shape, contiguous row-major data, device.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl Tensor {
    /// Upload `data` as a tensor of `shape` on `device`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        let numel = checked_numel(shape)?;
        if data.len() != numel {
            return shape_err(
                "Tensor::from_vec",
                format!("{numel} values for shape {shape:?}"),
                format!("{} values", data.len()),
            );
        }
        match device {
            Device::Cpu(ctx) => Ok(Self::cpu_from(ctx, data, shape)),
            Device::Gpu(ctx) => {
                let t = Self::gpu_uninit(ctx, shape)?;
                if !data.is_empty() {
                    let (buffer, offset) = t.gpu_location()?;
                    ctx.write(buffer, offset as u64 * 4, bytemuck::cast_slice(&data))?;
                }
                Ok(t)
            }
        }
    }

    /// Upload integer ids (token ids, targets) as a tensor of shape `[ids.len()]` whose storage
    /// holds the u32 bit patterns. Kernels declare it `array<u32>`; on the CPU, read it back with
    /// [`Tensor::to_u32`]. No arithmetic ever touches these values as floats.
    pub fn from_u32(ids: &[u32], device: &Device) -> Result<Tensor> {
        Self::from_vec(
            ids.iter().map(|&i| f32::from_bits(i)).collect(),
            &[ids.len()],
            device,
        )
    }

    /// The u32 bit patterns of a tensor made by [`Tensor::from_u32`].
    pub fn to_u32(&self) -> Result<Vec<u32>> {
        Ok(self.to_vec()?.into_iter().map(f32::to_bits).collect())
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::full(shape, 0.0, device)
    }

    /// A tensor with every element `value`.
    pub fn full(shape: &[usize], value: f32, device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu(ctx) => Ok(Self::cpu_from(ctx, filled(ctx, shape, value)?, shape)),
            Device::Gpu(ctx) => {
                let t = Self::gpu_uninit(ctx, shape)?;
                crate::ops::elementwise::fill_gpu(ctx, &t, value)?;
                Ok(t)
            }
        }
    }

    /// A scalar (shape `[]`... stored as `[1]`).
    pub fn scalar(value: f32, device: &Device) -> Result<Tensor> {
        Self::from_vec(vec![value], &[1], device)
    }

    pub(crate) fn cpu_from(ctx: &Arc<CpuContext>, data: Vec<f32>, shape: &[usize]) -> Tensor {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        ctx.memory.alloc(data.capacity() as u64 * 4);
        ctx.memory.count_fresh_allocation();
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Cpu {
                data: RwLock::new(data),
                ctx: ctx.clone(),
            }),
        }
    }

    /// A GPU tensor whose contents are undefined (NaN when the context poisons outputs).
    pub(crate) fn gpu_uninit(ctx: &Arc<GpuContext>, shape: &[usize]) -> Result<Tensor> {
        let numel = checked_numel(shape)?;
        let buffer = ctx
            .alloc(numel as u64 * 4)
            .map_err(|e| e.allocating(|| format!("a tensor of shape {shape:?}")))?;
        let t = Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Gpu {
                buffer: Some(buffer),
                ctx: ctx.clone(),
                home: OnceLock::new(),
            }),
        };
        if ctx.poison_outputs() && numel > 0 {
            crate::ops::elementwise::fill_gpu(ctx, &t, f32::NAN)?;
        }
        Ok(t)
    }

    /// A new tensor on `device` whose contents will all be written by the caller (zeros on the
    /// CPU; undefined on a GPU, NaN when the context poisons outputs).
    pub fn uninit(shape: &[usize], device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu(ctx) => Ok(Self::cpu_from(ctx, filled(ctx, shape, 0.0)?, shape)),
            Device::Gpu(ctx) => Self::gpu_uninit(ctx, shape),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the last axis (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Bytes of the data (numel · 4).
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu { ctx, .. } => Device::Cpu(ctx.clone()),
            Storage::Gpu { ctx, .. } => Device::Gpu(ctx.clone()),
        }
    }

    /// The same storage seen with another shape of as many elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if checked_numel(shape).ok() != Some(self.numel()) {
            return shape_err(
                "reshape",
                format!("a shape of {} elements", self.numel()),
                shape,
            );
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// True when no other tensor handle shares this one's storage, so writing into it in place
    /// cannot change a value someone else holds.
    pub fn is_exclusive(&self) -> bool {
        Arc::strong_count(&self.storage) == 1
    }

    /// True when both tensors share one storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// Copy the data to the host (waits for the GPU).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::Cpu { data, .. } => Ok(data.read().unwrap().clone()),
            Storage::Gpu { ctx, .. } => {
                if self.numel() == 0 {
                    return Ok(Vec::new());
                }
                let (buffer, offset) = self.gpu_location()?;
                let bytes = ctx.read(buffer, offset as u64 * 4, self.bytes())?;
                Ok(bytemuck::cast_slice(&bytes).to_vec())
            }
        }
    }

    /// A copy of this tensor on `device` (a clone of the handle when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device().same(device) {
            return Ok(self.clone());
        }
        Tensor::from_vec(self.to_vec()?, &self.shape, device)
    }

    /// A deep copy on the same device.
    pub fn copy(&self) -> Result<Tensor> {
        match &*self.storage {
            Storage::Cpu { data, ctx } => Ok(Self::cpu_from(
                ctx,
                data.read().unwrap().clone(),
                &self.shape,
            )),
            Storage::Gpu { ctx, .. } => {
                let out = Self::gpu_uninit(ctx, &self.shape)?;
                out.copy_from(self)?;
                Ok(out)
            }
        }
    }

    /// In place: `self ← src`, element for element (the shapes may differ, the element counts
    /// not). On the GPU a buffer-to-buffer copy recorded in the batch (no dispatch); it refuses
    /// two tensors in one buffer (views of one arena), which WebGPU cannot copy between.
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        if src.numel() != self.numel() {
            return shape_err(
                "copy_from",
                format!("a source of {} elements", self.numel()),
                src.shape(),
            );
        }
        match same_device("copy_from", &[self, src])? {
            Device::Cpu(_) => {
                if !self.same_storage(src) {
                    let data = src.cpu_data()?;
                    self.cpu_data_mut()?.copy_from_slice(&data);
                }
                Ok(())
            }
            Device::Gpu(ctx) => {
                let (to, to_offset) = self.gpu_location()?;
                let (from, from_offset) = src.gpu_location()?;
                if self.numel() == 0 || (to == from && to_offset == from_offset) {
                    return Ok(());
                }
                if to == from {
                    return Err(Error::Invalid(format!(
                        "copy_from: expected tensors in two buffers, found elements \
                         {from_offset}.. and {to_offset}.. of one buffer"
                    )));
                }
                let (dst, src_at) = (to_offset as u64 * 4, from_offset as u64 * 4);
                ctx.copy(from, src_at, to, dst, self.bytes());
                Ok(())
            }
        }
    }

    /// A GPU tensor of `shape` whose elements are this tensor's elements `offset ..
    /// offset + numel(shape)`, sharing its buffer: writes through either are seen by both.
    /// Errors on the CPU (CPU tensors own their data) and for a range past this tensor's end.
    pub fn view(&self, offset: usize, shape: &[usize]) -> Result<Tensor> {
        let numel = checked_numel(shape)?;
        let Storage::Gpu { ctx, .. } = &*self.storage else {
            return Err(Error::Invalid(
                "Tensor::view: expected a GPU tensor, found a CPU one (CPU tensors own their data)"
                    .into(),
            ));
        };
        if offset
            .checked_add(numel)
            .is_none_or(|end| end > self.numel())
        {
            return shape_err(
                "Tensor::view",
                format!("a range inside {} elements", self.numel()),
                format!("{numel} elements from element {offset}"),
            );
        }
        let (arena, base) = self.arena_root();
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Gpu {
                buffer: None,
                ctx: ctx.clone(),
                home: OnceLock::from(Home {
                    arena,
                    offset: base + offset,
                }),
            }),
        })
    }

    /// Move this GPU tensor's data into `arena`, from element `offset` on: the data is copied
    /// there (a buffer copy), the tensor's own buffer goes back to the pool, and from then on
    /// this tensor and every clone of it read and write the arena's range: the same tensor,
    /// stored elsewhere, with no second copy kept. A tensor moves once; it must own its buffer
    /// (not be a view), be on the arena's device, and fit inside the arena.
    pub fn move_into(&self, arena: &Tensor, offset: usize) -> Result<()> {
        let Storage::Gpu { buffer, ctx, home } = &*self.storage else {
            return Err(Error::Invalid(
                "Tensor::move_into: expected a GPU tensor, found a CPU one".into(),
            ));
        };
        same_device("Tensor::move_into", &[self, arena])?;
        if home.get().is_some() {
            return Err(Error::Invalid(
                "Tensor::move_into: expected a tensor that owns its buffer, found one that \
                 already lives in an arena"
                    .into(),
            ));
        }
        let target = arena.view(offset, &self.shape)?;
        target.copy_from(self)?;
        let (root, base) = arena.arena_root();
        let moved = home.set(Home {
            arena: root,
            offset: base + offset,
        });
        debug_assert!(moved.is_ok(), "checked above: the home was not set");
        if let Some(own) = buffer {
            // The handle stays in the storage, stale; the pool may hand the buffer out again.
            ctx.release(own.clone());
        }
        Ok(())
    }

    /// The element offset of this tensor inside `arena`'s buffer, relative to `arena`'s first
    /// element, when it lives there (a view of it, or moved into it); `None` otherwise.
    pub fn offset_in(&self, arena: &Tensor) -> Option<usize> {
        let Storage::Gpu { home, .. } = &*self.storage else {
            return None;
        };
        let home = home.get()?;
        let (root, base) = arena.arena_root();
        (home.arena.same_storage(&root) && home.offset >= base).then(|| home.offset - base)
    }

    /// Elements at which a view can start so that its binding needs no lead: the device's
    /// `min_storage_buffer_offset_alignment` in f32s (64 for the usual 256 bytes); 1 on the CPU.
    pub fn view_alignment(device: &Device) -> usize {
        match device {
            Device::Gpu(ctx) => {
                (ctx.limits.min_storage_buffer_offset_alignment as usize / 4).max(1)
            }
            Device::Cpu(_) => 1,
        }
    }

    /// The arena this GPU tensor lives in and the element offset of its first element there;
    /// `None` for a tensor that owns its buffer (or a CPU one).
    pub fn arena(&self) -> Option<(Tensor, usize)> {
        match &*self.storage {
            Storage::Gpu { home, .. } => home.get().map(|h| (h.arena.clone(), h.offset)),
            Storage::Cpu { .. } => None,
        }
    }

    /// The tensor that owns the buffer this one's data is in, and the element offset of this
    /// tensor's first element there (itself and 0 when it owns its buffer).
    pub(crate) fn arena_root(&self) -> (Tensor, usize) {
        match &*self.storage {
            Storage::Gpu { home, .. } => match home.get() {
                Some(h) => (h.arena.clone(), h.offset),
                None => (self.clone(), 0),
            },
            Storage::Cpu { .. } => (self.clone(), 0),
        }
    }

    /// Read access to a CPU tensor's data.
    pub(crate) fn cpu_data(&self) -> Result<RwLockReadGuard<'_, Vec<f32>>> {
        match &*self.storage {
            Storage::Cpu { data, .. } => Ok(data.read().unwrap()),
            Storage::Gpu { .. } => Err(Error::DeviceMismatch { op: "cpu_data" }),
        }
    }

    /// Write access to a CPU tensor's data (for in-place ops).
    pub(crate) fn cpu_data_mut(&self) -> Result<RwLockWriteGuard<'_, Vec<f32>>> {
        match &*self.storage {
            Storage::Cpu { data, .. } => Ok(data.write().unwrap()),
            Storage::Gpu { .. } => Err(Error::DeviceMismatch { op: "cpu_data_mut" }),
        }
    }

    /// Where a GPU tensor's data is: the buffer and the element offset of its first element
    /// there (0 unless it lives in an arena). Every use of a tensor's buffer goes through this.
    pub(crate) fn gpu_location(&self) -> Result<(&wgpu::Buffer, usize)> {
        match &*self.storage {
            Storage::Gpu { buffer, home, .. } => match home.get() {
                Some(h) => Ok((h.arena.gpu_buffer()?, h.offset)),
                None => Ok((buffer.as_ref().unwrap(), 0)),
            },
            Storage::Cpu { .. } => Err(Error::DeviceMismatch { op: "gpu_location" }),
        }
    }

    /// The wgpu buffer of a GPU tensor that owns it. A tensor that lives in an arena is refused
    /// (its data is a range of another buffer: use [`Tensor::gpu_location`]).
    pub(crate) fn gpu_buffer(&self) -> Result<&wgpu::Buffer> {
        match &*self.storage {
            Storage::Gpu { buffer, home, .. } => match home.get() {
                None => Ok(buffer.as_ref().unwrap()),
                Some(h) => Err(Error::Invalid(format!(
                    "gpu_buffer: expected a tensor that owns its buffer, found one at element \
                     {} of an arena",
                    h.offset
                ))),
            },
            Storage::Cpu { .. } => Err(Error::DeviceMismatch { op: "gpu_buffer" }),
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?} on {:?}", self.shape, self.device())
    }
}

/// The number of elements of `shape`, or an error when it cannot be held at all: the product
/// overflows `usize`, or its bytes exceed `isize::MAX` (the largest allocation Rust allows).
pub(crate) fn checked_numel(shape: &[usize]) -> Result<usize> {
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "shape {shape:?} has more elements than a usize can count"
            ))
        })?;
    let bytes = numel as u128 * 4;
    if bytes > isize::MAX as u128 {
        return Err(Error::TooLarge {
            what: format!("a tensor of shape {shape:?}"),
            needed: u64::try_from(bytes).unwrap_or(u64::MAX),
            limit: "largest allocation (isize::MAX bytes)",
            available: isize::MAX as u64,
        });
    }
    Ok(numel)
}

/// A host vector of `shape`'s elements, all `value`. The memory is reserved with `try_reserve`,
/// so a request the system allocator refuses is an [`Error::OutOfMemory`], not an abort of the
/// process. (Under Linux's overcommit a request within the address space may still succeed
/// and be killed later when touched; only the refused ones can be reported.)
fn filled(ctx: &CpuContext, shape: &[usize], value: f32) -> Result<Vec<f32>> {
    let mut data = reserved(ctx, shape)?;
    data.resize(checked_numel(shape)?, value);
    Ok(data)
}

/// An empty host vector with room for exactly `shape`'s elements, reserved with `try_reserve`
/// (see [`filled`]): a request the allocator refuses is an [`Error::OutOfMemory`].
pub(crate) fn reserved<T>(ctx: &CpuContext, shape: &[usize]) -> Result<Vec<T>> {
    let numel = checked_numel(shape)?;
    let mut data = Vec::new();
    data.try_reserve_exact(numel)
        .map_err(|e| Error::OutOfMemory {
            what: format!("a tensor of shape {shape:?}"),
            needed: (numel * std::mem::size_of::<T>()) as u64,
            live: ctx.memory.snapshot().live,
            detail: format!("the system allocator refused: {e}"),
        })?;
    Ok(data)
}

/// Check that every tensor is on `first`'s device; returns that device.
pub(crate) fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let device = tensors[0].device();
    if tensors[1..].iter().all(|t| t.device().same(&device)) {
        Ok(device)
    } else {
        Err(Error::DeviceMismatch { op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::axpy;
    use crate::testing::{gpu, gpu_with_binding_limit, random};

    fn iota(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32).collect()
    }

    /// A view reads, and an op writes, exactly its range of the arena, at an offset that is not
    /// a multiple of the binding alignment (the binding then starts with a lead).
    #[test]
    fn a_view_is_its_range_of_the_arena() {
        let Some(d) = gpu() else { return };
        let arena = Tensor::from_vec(iota(100), &[100], &d).unwrap();
        let v = arena.view(10, &[3, 5]).unwrap();
        assert_eq!(v.shape(), &[3, 5]);
        assert_eq!(v.to_vec().unwrap(), iota(25)[10..].to_vec());
        axpy(&v, 1.0, &Tensor::full(&[3, 5], 1000.0, &d).unwrap()).unwrap();
        let mut want = iota(100);
        want[10..25].iter_mut().for_each(|x| *x += 1000.0);
        assert_eq!(arena.to_vec().unwrap(), want);
        // A copy owns its buffer; a view of a view is a range of the same arena.
        let c = v.copy().unwrap();
        assert!(c.arena().is_none() && c.to_vec().unwrap() == want[10..25]);
        let vv = v.view(2, &[4]).unwrap();
        assert_eq!(vv.offset_in(&arena), Some(12));
        assert_eq!(vv.to_vec().unwrap(), want[12..16]);
        assert_eq!(vv.offset_in(&v), Some(2));
    }

    #[test]
    fn views_outside_the_arena_and_copies_inside_one_buffer_are_errors() {
        let cpu = Device::cpu();
        let t = Tensor::zeros(&[4], &cpu).unwrap();
        let e = t.view(0, &[2]).unwrap_err().to_string();
        assert!(e.contains("expected a GPU tensor"), "{e}");
        let Some(d) = gpu() else { return };
        let arena = Tensor::zeros(&[10], &d).unwrap();
        let e = arena.view(8, &[3]).unwrap_err().to_string();
        assert!(e.contains("inside 10 elements") && e.contains("3 elements from element 8"));
        let (a, b) = (arena.view(0, &[3]).unwrap(), arena.view(5, &[3]).unwrap());
        let e = a.copy_from(&b).unwrap_err().to_string();
        assert!(e.contains("two buffers") && e.contains("one buffer"), "{e}");
        let e = a.copy_from(&arena).unwrap_err().to_string();
        assert!(e.contains("3 elements") && e.contains("[10]"), "{e}");
    }

    /// After `move_into`, the tensor and its clones read and write the arena's range; its own
    /// buffer is no longer counted live, and dropping it frees nothing twice.
    #[test]
    fn a_moved_tensor_lives_in_the_arena_and_is_stored_once() {
        let Some(_) = gpu() else { return };
        // A device of its own, so that its live bytes are this test's alone.
        let d = gpu_with_binding_limit(1 << 27);
        let live = || d.memory().live;
        let start = live();
        let arena = Tensor::zeros(&[256], &d).unwrap();
        let t = random(&[7, 5], 3, &d);
        let (values, clone) = (t.to_vec().unwrap(), t.clone());
        assert_eq!(live(), start + 1024 + 256);
        t.move_into(&arena, 64).unwrap();
        assert_eq!(live(), start + 1024, "the tensor's own buffer went back");
        assert_eq!(clone.to_vec().unwrap(), values);
        assert_eq!(arena.to_vec().unwrap()[64..99], values[..]);
        assert_eq!(clone.offset_in(&arena), Some(64));
        axpy(&clone, 1.0, &Tensor::full(&[7, 5], 1.0, &d).unwrap()).unwrap();
        let plus: Vec<f32> = values.iter().map(|x| x + 1.0).collect();
        assert_eq!(arena.to_vec().unwrap()[64..99], plus[..]);
        assert_eq!(arena.to_vec().unwrap()[..64], [0.0; 64]);
        let e = t.move_into(&arena, 128).unwrap_err().to_string();
        assert!(e.contains("already lives in an arena"), "{e}");
        drop((t, clone));
        assert_eq!(live(), start + 1024);
        drop(arena);
        assert_eq!(live(), start);
    }
}
