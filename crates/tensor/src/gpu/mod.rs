//! The wgpu backend: one [`GpuContext`] per adapter, holding the device and queue, the compiled
//! pipelines, the open command batch, the buffer pool and the memory counters.
//!
//! How an op runs on the GPU (each step is one WebGPU concept):
//! 1. the op's launcher checks shapes, asks the pool for an output buffer and calls
//!    `GpuContext::dispatch` with its `Params` bytes and storage ranges;
//! 2. the cached `ComputePipeline` of its WGSL entry point is looked up (`pipelines.rs`: compiled
//!    once per context, with an explicit pipeline layout whose binding 0, the `Params`
//!    uniform, takes a *dynamic offset*);
//! 3. the storage ranges are checked against the kernel's bindings (`layout.rs`: each binding
//!    given once, aligned, inside its buffer, within the binding limit), so a bad dispatch is an
//!    error of its own call without an error scope;
//! 4. the `Params` bytes are appended to the batch's host arena (`arena.rs`); their slot's byte
//!    offset is the dispatch's dynamic offset;
//! 5. the `BindGroup` of the kernel's layout and storage ranges comes from the bind group cache
//!    (`bind_cache.rs`; the pool hands each step the buffers of the step before, so after the
//!    first step it is nearly always there), and `dispatch_workgroups` is recorded into the open
//!    compute pass of the batch. Nothing runs yet;
//! 6. the batch is submitted when it is full, when data is read back (`Tensor::to_vec`) or when
//!    `sync` is called: one `write_buffer` uploads the arena, then the commands go to the queue,
//!    inside one set of error scopes that turns anything wgpu rejects into an error of the
//!    flush. wgpu inserts the barriers between dependent dispatches.
//!
//! Steps 2 to 6 are `batch.rs`.
//!
//! Each of those steps reports to the step accounting of [`counts`](crate::counts) when it is
//! on (dispatches, copies, uploads, submissions, blocking waits). A context made with
//! [`GpuOptions::dry_run`] does steps 1 to 5 and stops there: nothing is submitted.

mod adapters;
mod arena;
mod batch;
use batch::Batch;
pub(crate) mod bind;
mod bind_cache;
mod errors;
mod layout;
pub(crate) mod params;
mod pipelines;
mod pool;
mod readback;
#[cfg(test)]
mod record_tests;
mod timestamps;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use errors::{Health, capture};
/// The wgpu this crate is built on, for the wgpu types in [`GpuOptions`].
pub use wgpu;

use crate::memory::{MemoryCounters, MemoryStats};
use crate::ops::matmul_coop::CoopOffer;
use crate::{Error, Result};
pub use adapters::{GpuInfo, GpuOptions, adapters, adapters_on, default_backends};
use adapters::{adapter_line, is_software, no_adapter_message};
use arena::ParamArena;
pub(crate) use bind::{Binding, grid_2d};
use bind_cache::BindCache;

pub(crate) use params::kernel_params;
use pipelines::Pipelines;
use pool::BufferPool;
use timestamps::Timestamps;

/// Bytes reserved per dispatch in the uniform arena: the largest minimum uniform offset
/// alignment WebGPU allows, so every slot's offset is a valid dynamic offset.
const PARAM_SLOT: u64 = 256;
/// Dispatches recorded before the batch is submitted on its own.
const MAX_BATCH: u64 = 1024;
/// Bind groups the cache holds at most (a GPT-2 step binds about a thousand distinct sets).
const BIND_CACHE_CAPACITY: usize = 8192;

/// A WGSL entry point: the shader file (by its registry name and source) and the function.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernel {
    pub shader: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
}

/// A wgpu device with everything the tensor ops need to run on it.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) limits: wgpu::Limits,
    info: GpuInfo,
    /// Name, backend and driver in one line: the matmul tuner's key for this adapter.
    tune_key: String,
    is_software: bool,
    max_binding: u64,
    pipelines: Mutex<Pipelines>,
    batch: Mutex<Batch>,
    params: wgpu::Buffer,
    bind_groups: Mutex<BindCache<wgpu::Buffer, wgpu::BindGroup>>,
    pool: Mutex<BufferPool>,
    pub(crate) memory: MemoryCounters,
    poison: AtomicBool,
    dry_run: bool,
    dispatches: AtomicU64,
    health: Arc<Health>,
    timestamps: Option<Timestamps>,
    /// The cooperative-matrix configurations the adapter lists and those the device was made
    /// able to run (`ops/matmul_coop.rs`).
    coop: crate::ops::matmul_coop::CoopSupport,
}

impl GpuContext {
    /// Open the best adapter that `options` accepts. When the best cannot give what `options`
    /// asks, the next is tried; the error is the best adapter's.
    pub fn new(options: &GpuOptions) -> Result<Arc<Self>> {
        let backends = options.backends.unwrap_or_else(default_backends);
        let all = adapters_on(backends);
        if all.is_empty() {
            return Err(Error::NoAdapter(no_adapter_message(backends)));
        }
        let names: Vec<String> = all.iter().map(|a| adapter_line(&a.get_info())).collect();
        let mut first_error = None;
        for adapter in all {
            if !options.allow_software && is_software(&adapter.get_info()) {
                continue;
            }
            match Self::from_adapter(adapter, options) {
                Ok(ctx) => return Ok(ctx),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| {
            Error::NoAdapter(format!(
                "asked for a hardware adapter, found only software ones ({}); \
                 `--device gpu` accepts them",
                names.join(", ")
            ))
        }))
    }

    /// Open a device on `adapter` with the limits and features `options` asks (by default every
    /// limit the adapter offers). What the adapter lacks is an error listing asked and offered.
    pub fn from_adapter(adapter: wgpu::Adapter, options: &GpuOptions) -> Result<Arc<Self>> {
        let adapter_info = adapter.get_info();
        let offered = adapter.limits();
        let mut asked = options.limits.clone().unwrap_or_else(|| offered.clone());
        if let Some(bytes) = options.max_buffer_bytes {
            asked.max_buffer_size = bytes;
        }
        if !PARAM_SLOT.is_multiple_of(offered.min_uniform_buffer_offset_alignment as u64) {
            return Err(Error::Limit {
                limit: "min_uniform_buffer_offset_alignment (a divisor of the params slot)",
                needed: PARAM_SLOT,
                available: offered.min_uniform_buffer_offset_alignment as u64,
            });
        }
        if asked.max_buffer_size < PARAM_SLOT * MAX_BATCH {
            return Err(Error::TooLarge {
                what: "the uniform arena of the op parameters".into(),
                needed: PARAM_SLOT * MAX_BATCH,
                limit: "max_buffer_size (as asked)",
                available: asked.max_buffer_size,
            });
        }
        errors::check_request(
            &adapter_line(&adapter_info),
            &asked,
            &offered,
            options.features,
            adapter.features(),
        )?;
        // The cooperative-matrix kernel's features, asked for only where the adapter offers a
        // configuration it can run (`ops/matmul_coop.rs`).
        let mut coop = crate::ops::matmul_coop::detect(&CoopOffer::of(&adapter));
        if options.no_cooperative_matrix && !coop.usable.is_empty() {
            coop.usable.clear();
            coop.missing = Some("left off by GpuOptions::no_cooperative_matrix".into());
        }
        let experimental = if coop.features().is_empty() {
            wgpu::ExperimentalFeatures::disabled()
        } else {
            // SAFETY: the only experimental feature asked for is the cooperative-matrix one,
            // used by `matmul_coop.wgsl` alone, within what naga validates for it (whole
            // subgroups, fragments inside workgroup memory).
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tensor"),
            // Timestamp queries only serve the profiler; asked for when the adapter has them.
            required_features: options.features
                | coop.features()
                | (adapter.features() & wgpu::Features::TIMESTAMP_QUERY),
            required_limits: asked,
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| {
            Error::Gpu(format!(
                "request_device on {}: {e}",
                adapter_line(&adapter_info)
            ))
        })?;
        let health = Health::install(&device);
        let limits = device.limits();
        let max_binding = options
            .max_binding_bytes
            .unwrap_or(u64::MAX)
            .min(limits.max_storage_buffer_binding_size)
            .min(limits.max_buffer_size);
        let (params, error) = capture(&device, || {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params arena"),
                size: PARAM_SLOT * MAX_BATCH,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        if let Some(e) = error {
            return Err(errors::alloc_error(
                e,
                "the uniform arena of the op parameters",
                PARAM_SLOT * MAX_BATCH,
                0,
                &health,
            ));
        }
        let info = GpuInfo {
            name: adapter_info.name.clone(),
            backend: format!("{:?}", adapter_info.backend),
            device_type: format!("{:?}", adapter_info.device_type),
            driver: format!("{} {}", adapter_info.driver, adapter_info.driver_info)
                .trim()
                .to_string(),
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: max_binding,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        };
        let timestamps = (device.features().contains(wgpu::Features::TIMESTAMP_QUERY)
            && !options.dry_run)
            .then(|| Timestamps::new(&device, &queue));
        Ok(Arc::new(Self {
            device,
            queue,
            limits,
            tune_key: format!("{} ({}, {})", info.name, info.backend, info.driver)
                .replace(['\t', '\n'], " "),
            info,
            is_software: is_software(&adapter_info),
            max_binding,
            pipelines: Mutex::default(),
            batch: Mutex::new(Batch {
                encoder: None,
                pass: None,
                dispatches: 0,
                params: ParamArena::default(),
                pass_tag: None,
                tags: Vec::new(),
            }),
            params,
            bind_groups: Mutex::new(BindCache::new(BIND_CACHE_CAPACITY)),
            pool: Mutex::default(),
            memory: MemoryCounters::default(),
            poison: AtomicBool::new(false),
            dry_run: options.dry_run,
            dispatches: AtomicU64::new(0),
            health,
            timestamps,
            coop,
        }))
    }

    /// Name, backend, type and the limits that matter.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The adapter as the matmul tuner's cache names it (made once, not per dispatch).
    pub(crate) fn tune_key(&self) -> &str {
        &self.tune_key
    }

    /// What the adapter offers the cooperative-matrix matmul kernel, and which configurations
    /// this device can run (`ops/matmul_coop.rs`).
    pub fn coop(&self) -> &crate::ops::matmul_coop::CoopSupport {
        &self.coop
    }

    /// Does the device take timestamp queries (what the profiler's GPU method needs)?
    pub fn has_timestamps(&self) -> bool {
        self.timestamps.is_some()
    }

    /// True for a CPU-emulated adapter such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.is_software
    }

    /// Live and peak bytes of tensor storage, and what the pool caches.
    pub fn memory(&self) -> MemoryStats {
        self.memory.snapshot()
    }

    /// Does this context record without running ([`GpuOptions::dry_run`])?
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// Number of kernel dispatches recorded since the context was made.
    pub fn dispatch_count(&self) -> u64 {
        self.dispatches.load(Ordering::Relaxed)
    }

    /// Fill every freshly allocated output with NaN, so a kernel that forgets to write an
    /// element is caught by the tests (costs one dispatch per allocation).
    pub fn set_poison_outputs(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    pub(crate) fn poison_outputs(&self) -> bool {
        self.poison.load(Ordering::Relaxed)
    }

    /// Release the buffers the pool keeps cached (and the cached bind groups, which would
    /// keep them alive).
    pub fn trim_pool(&self) {
        let mut pool = self.pool.lock().unwrap();
        self.bind_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        pool.clear();
        self.memory.set_pooled(0);
    }

    /// Bind groups cached now, and the lookups answered from the cache and those that made a
    /// bind group since the context was made.
    pub fn bind_group_cache(&self) -> (usize, u64, u64) {
        let cache = self.bind_groups.lock().unwrap_or_else(|p| p.into_inner());
        let (hits, misses) = cache.hits_and_misses();
        (cache.len(), hits, misses)
    }

    /// Why the device was lost (`"Destroyed"`, `"Unknown: <driver message>"`), if it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.health.lost_reason()
    }

    /// Destroy the device now, as a driver reset would: recorded work is dropped, the driver
    /// frees the memory, and every later operation on this context fails at once with
    /// [`Error::DeviceLost`]. Tests of that path use it; so can a program that wants the GPU
    /// memory back before its last tensor is dropped.
    pub fn destroy(&self) {
        {
            let mut batch = self.batch.lock().unwrap_or_else(|p| p.into_inner());
            batch.pass = None;
            batch.encoder = None;
            batch.dispatches = 0;
            batch.params.clear();
        }
        self.bind_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.device.destroy();
        // wgpu calls the device-lost callback from a poll once its queue is empty.
        let _ = self.wait();
        if self.health.lost_reason().is_none() {
            self.health
                .mark_lost("destroyed by GpuContext::destroy (wgpu has not reported it)".into());
        }
    }

    /// Our error for a wgpu error caught while `doing` something: the loss of the device when
    /// that is what happened, else wgpu's description.
    fn gpu_error(&self, doing: impl std::fmt::Display, e: wgpu::Error) -> Error {
        match self.health.lost_reason() {
            Some(why) => Error::DeviceLost(why),
            None => Error::Gpu(format!("{doing}: {}", errors::describe(&e))),
        }
    }

    /// A storage buffer of at least `bytes` bytes, from the pool when one is free. A size above
    /// `max_buffer_size` is refused before wgpu is asked (wgpu would only report a validation
    /// error, and hand back an unusable buffer).
    pub(crate) fn alloc(&self, bytes: u64) -> Result<wgpu::Buffer> {
        self.health.check()?;
        // Bindings need 4-byte sizes; rounding to 256 makes pool buckets coarser and more reusable.
        let size = bytes.max(4).div_ceil(256).saturating_mul(256);
        if size > self.limits.max_buffer_size {
            return Err(Error::TooLarge {
                what: "a GPU buffer".into(),
                needed: size,
                limit: "max_buffer_size",
                available: self.limits.max_buffer_size,
            });
        }
        let cached = {
            let mut pool = self.pool.lock().unwrap();
            let buffer = pool.take(size);
            self.memory.set_pooled(pool.bytes());
            buffer
        };
        if let Some(buffer) = cached {
            self.memory.alloc(size);
            return Ok(buffer);
        }
        let create = || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (mut buffer, mut error) = capture(&self.device, create);
        if matches!(error, Some(wgpu::Error::OutOfMemory { .. })) && self.memory().pooled > 0 {
            // Give the cached buffers back to the driver and try once more before failing.
            self.trim_pool();
            (buffer, error) = capture(&self.device, create);
        }
        if let Some(e) = error {
            let live = self.memory().live;
            return Err(errors::alloc_error(
                e,
                "a GPU buffer",
                size,
                live,
                &self.health,
            ));
        }
        self.memory.count_fresh_allocation();
        self.memory.alloc(size);
        Ok(buffer)
    }

    /// Return a tensor's buffer to the pool.
    pub(crate) fn release(&self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        self.memory.free(size);
        if self.health.lost_reason().is_some() {
            return; // nothing can reuse it
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.put(buffer);
        self.memory.set_pooled(pool.bytes());
    }

    /// Copy host data into `buffer` at byte `offset`. Pending commands are submitted first, so
    /// the write (applied at the next submission) cannot overtake a command recorded earlier.
    pub(crate) fn write(&self, buffer: &wgpu::Buffer, offset: u64, data: &[u8]) -> Result<()> {
        self.flush()?;
        crate::counts::transfer("upload", data.len() as u64);
        if self.dry_run {
            return Ok(());
        }
        let ((), error) = capture(&self.device, || {
            self.queue.write_buffer(buffer, offset, data)
        });
        match error {
            Some(e) => Err(self.gpu_error(
                format_args!(
                    "uploading {} at byte {offset}",
                    crate::error::bytes(data.len() as u64)
                ),
                e,
            )),
            None => Ok(()),
        }
    }
}
