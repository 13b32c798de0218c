//! [`Tensor`]: an f32 array of a given shape, contiguous and row-major, on one device.
//!
//! A tensor is a shape plus a reference-counted storage. Cloning a tensor is cheap and shares
//! the storage; ops return new tensors, except the few documented in-place ones (the AdamW
//! update, accumulation into a gradient), which write into the storage all clones share.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

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
        buffer: Option<wgpu::Buffer>,
        ctx: Arc<GpuContext>,
    },
}

impl Drop for Storage {
    fn drop(&mut self) {
        match self {
            Storage::Cpu { data, ctx } => {
                let len = data.get_mut().map(|d| d.capacity()).unwrap_or(0);
                ctx.memory.free(len as u64 * 4);
            }
            Storage::Gpu { buffer, ctx } => {
                if let Some(b) = buffer.take() {
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
                    ctx.write(t.gpu_buffer()?, 0, bytemuck::cast_slice(&data))?;
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
            }),
        };
        if ctx.poison_outputs() && numel > 0 {
            crate::ops::elementwise::fill_gpu(ctx, &t, f32::NAN)?;
        }
        Ok(t)
    }

    /// A new tensor on `device` whose contents will all be written by the caller's op.
    pub(crate) fn uninit(shape: &[usize], device: &Device) -> Result<Tensor> {
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
            Storage::Gpu { buffer, ctx } => {
                if self.numel() == 0 {
                    return Ok(Vec::new());
                }
                let bytes = ctx.read(buffer.as_ref().unwrap(), 0, self.bytes())?;
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
            Storage::Gpu { buffer, ctx } => {
                let out = Self::gpu_uninit(ctx, &self.shape)?;
                if self.numel() > 0 {
                    ctx.copy(
                        buffer.as_ref().unwrap(),
                        0,
                        out.gpu_buffer()?,
                        0,
                        self.bytes(),
                    );
                }
                Ok(out)
            }
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

    /// The wgpu buffer of a GPU tensor.
    pub(crate) fn gpu_buffer(&self) -> Result<&wgpu::Buffer> {
        match &*self.storage {
            Storage::Gpu { buffer, .. } => Ok(buffer.as_ref().unwrap()),
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
