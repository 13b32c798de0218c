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
//! Each of those steps reports to the step accounting of [`counts`](crate::counts) when it is
//! on (dispatches, copies, uploads, submissions, blocking waits). A context made with
//! [`GpuOptions::dry_run`] does steps 1 to 5 and stops there: nothing is submitted.

mod adapters;
mod arena;
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
use crate::{Error, Result};
pub use adapters::{GpuInfo, GpuOptions, adapters, adapters_on, default_backends};
use adapters::{adapter_line, is_software, no_adapter_message};
use arena::ParamArena;
pub(crate) use bind::{Binding, grid_2d};
use bind_cache::BindCache;
use layout::BindLimits;
pub(crate) use params::kernel_params;
use pipelines::Pipelines;
use pool::BufferPool;
use timestamps::{MAX_TIMED_PASSES, Tag, Timestamps};

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

/// Commands recorded but not yet submitted.
struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    dispatches: u64,
    /// The `Params` of the batch's dispatches, uploaded when it is submitted.
    params: ParamArena,
    /// The profiler's tag of the open pass, and of each timed pass of this batch in order.
    pass_tag: Option<Tag>,
    tags: Vec<Tag>,
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
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tensor"),
            // Timestamp queries only serve the profiler; asked for when the adapter has them.
            required_features: options.features
                | (adapter.features() & wgpu::Features::TIMESTAMP_QUERY),
            required_limits: asked,
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
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

    /// Record one dispatch of `kernel` with `params` at binding 0 and each storage range at the
    /// binding number given with it. Limits and bindings are checked here, so a bad dispatch is
    /// an error of this call and never enters the batch.
    pub(crate) fn dispatch(
        &self,
        kernel: Kernel,
        params: &[u8],
        bindings: &[(u32, Binding<'_>)],
        groups: [u32; 3],
    ) -> Result<()> {
        self.dispatch_with(kernel, &[], params, bindings, groups)
    }

    /// [`dispatch`](Self::dispatch) of the pipeline of `kernel` made with the override
    /// `constants` (see [`pipeline`](Self::pipeline)).
    pub(crate) fn dispatch_with(
        &self,
        kernel: Kernel,
        constants: &'static [(&'static str, f64)],
        params: &[u8],
        bindings: &[(u32, Binding<'_>)],
        groups: [u32; 3],
    ) -> Result<()> {
        self.health.check()?;
        let max = self.limits.max_compute_workgroups_per_dimension;
        if let Some(&g) = groups.iter().find(|&&g| g > max) {
            return Err(Error::Limit {
                limit: "max_compute_workgroups_per_dimension",
                needed: g as u64,
                available: max as u64,
            });
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let counting = crate::counts::here().then(std::time::Instant::now);
        let compiled = self.pipeline(kernel, constants)?;
        let binding_error = |what: String| {
            Error::Gpu(format!(
                "binding the buffers of {}::{}: {what}",
                kernel.shader, kernel.entry
            ))
        };
        let params_len = params.len() as u64;
        if params_len < compiled.layout.params_size || params_len > PARAM_SLOT {
            return Err(binding_error(format!(
                "expected {} to {PARAM_SLOT} bytes of Params, found {params_len}",
                compiled.layout.params_size
            )));
        }
        let limits = BindLimits {
            offset_alignment: self.limits.min_storage_buffer_offset_alignment as u64,
            max_binding: self.limits.max_storage_buffer_binding_size,
        };
        compiled
            .layout
            .check(bindings, limits)
            .map_err(binding_error)?;
        let tag = match self.timestamps {
            Some(_) => crate::profile::gpu_tag(),
            None => None,
        };
        let mut batch = self.batch.lock().unwrap();
        if batch.dispatches >= MAX_BATCH
            || (tag.is_some() && batch.tags.len() as u32 >= MAX_TIMED_PASSES)
        {
            self.submit(&mut batch)?;
        }
        // Profiling with timestamps: a new pass whenever the family changes.
        if tag.is_some() && batch.pass_tag != tag {
            batch.pass = None;
        }
        let bind_group = self.bind_group(&compiled, bindings);
        let offset = batch.params.push(params);
        if batch.encoder.is_none() {
            batch.encoder = Some(self.device.create_command_encoder(&Default::default()));
        }
        if batch.pass.is_none() {
            let index = 2 * batch.tags.len() as u32;
            let timestamp_writes = match (tag, &self.timestamps) {
                (Some(_), Some(t)) => Some(t.pass_writes(index)),
                _ => None,
            };
            let pass = batch
                .encoder
                .as_mut()
                .expect("the encoder was made above")
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes,
                })
                .forget_lifetime();
            batch.pass = Some(pass);
            batch.pass_tag = tag;
            if let Some(tag) = tag {
                batch.tags.push(tag);
            }
        }
        let pass = batch.pass.as_mut().expect("the pass was begun above");
        pass.set_pipeline(&compiled.pipeline);
        pass.set_bind_group(0, &bind_group, &[offset]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        batch.dispatches += 1;
        drop(batch);
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        if let Some(start) = counting {
            let host_ns = start.elapsed().as_nanos() as u64;
            let bound: Vec<(u32, u64)> = bindings
                .iter()
                .map(|(i, b)| (*i, b.size.div_ceil(4) * 4))
                .collect();
            crate::counts::dispatch(
                kernel.shader,
                kernel.source,
                kernel.entry,
                groups,
                &bound,
                host_ns,
            );
        }
        Ok(())
    }

    /// The bind group of `compiled`'s layout over the params arena (at a dynamic offset) and
    /// the storage ranges `bindings` (already checked), from the cache or made now.
    fn bind_group(
        &self,
        compiled: &pipelines::Compiled,
        bindings: &[(u32, Binding<'_>)],
    ) -> wgpu::BindGroup {
        let parts = bindings
            .iter()
            .map(|(i, b)| (*i, b.buffer, b.offset, b.size.div_ceil(4) * 4));
        let make = || {
            let params = std::iter::once(wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.params,
                    offset: 0,
                    size: wgpu::BufferSize::new(PARAM_SLOT),
                }),
            });
            let storage =
                parts
                    .clone()
                    .map(|(binding, buffer, offset, size)| wgpu::BindGroupEntry {
                        binding,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer,
                            offset,
                            size: wgpu::BufferSize::new(size),
                        }),
                    });
            let entries: Vec<wgpu::BindGroupEntry<'_>> = params.chain(storage).collect();
            // Checked by `KernelLayout::check`; should wgpu still object, its uncaptured error
            // is reported by the next flush, and the batch is rejected whole.
            Ok::<_, std::convert::Infallible>(self.device.create_bind_group(
                &wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &compiled.group_layout,
                    entries: &entries,
                },
            ))
        };
        let mut cache = self.bind_groups.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get_or_insert(compiled.group_layout_id, parts.clone(), make) {
            Ok(group) => group,
            Err(never) => match never {},
        }
    }

    /// Record a buffer-to-buffer copy in the batch.
    pub(crate) fn copy(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        bytes: u64,
    ) {
        let mut batch = self.batch.lock().unwrap();
        batch.pass = None;
        let encoder = batch
            .encoder
            .get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, bytes);
        batch.dispatches += 1;
        drop(batch);
        crate::counts::transfer("copy", bytes);
    }

    /// Submit the batch. Errors wgpu found while recording it (reported when its pass ends and
    /// its encoder finishes) and any error no scope caught since the last submission come back
    /// here; the batch is then dropped whole, and the context stays usable for the next one.
    fn submit(&self, batch: &mut Batch) -> Result<()> {
        let commands = batch.dispatches;
        batch.dispatches = 0;
        batch.pass_tag = None;
        let tags = std::mem::take(&mut batch.tags);
        if let Err(e) = self.health.check() {
            batch.pass = None;
            batch.encoder = None;
            batch.params.clear();
            return Err(e);
        }
        let mut timed = None;
        let ((), error) = capture(&self.device, || {
            // Ending the pass and finishing the encoder report what was wrong inside them.
            batch.pass = None;
            if let Some(mut encoder) = batch.encoder.take() {
                crate::counts::submission();
                if self.dry_run {
                    return; // recorded, validated, never run
                }
                if let Some(t) = self.timestamps.as_ref().filter(|_| !tags.is_empty()) {
                    t.resolve(&mut encoder, tags.len());
                    timed = Some(t);
                }
                // One upload of every dispatch's Params, applied before the commands run.
                if !batch.params.bytes().is_empty() {
                    self.queue
                        .write_buffer(&self.params, 0, batch.params.bytes());
                }
                self.queue.submit([encoder.finish()]);
            }
        });
        // Uploaded, or dropped with a batch that did not run.
        batch.params.clear();
        if let Some(e) = error {
            return Err(self.gpu_error(
                format_args!(
                    "submitting a batch of {commands} GPU commands (none of them ran; \
                     the tensors they were to write are undefined)"
                ),
                e,
            ));
        }
        if let Some(t) = timed {
            t.read(self, &tags)?;
        }
        self.health.take_pending()?;
        self.health.check()
    }

    /// Submit what has been recorded, without waiting for it.
    pub fn flush(&self) -> Result<()> {
        let mut batch = self.batch.lock().unwrap();
        self.submit(&mut batch)
    }

    /// Wait until the GPU is idle. wgpu 30 panics inside `Device::poll` when the driver reports
    /// the device lost; that panic is caught here and becomes [`Error::DeviceLost`].
    fn wait(&self) -> Result<()> {
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.device.poll(wgpu::PollType::wait_indefinitely())
        }));
        match polled {
            Ok(Ok(_)) => self.health.check(),
            Ok(Err(e)) => {
                self.health.check()?;
                Err(Error::Gpu(format!("waiting for the GPU: {e}")))
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "wgpu panicked while waiting for the GPU".into());
                self.health.mark_lost(why);
                self.health.check()
            }
        }
    }

    /// Submit what has been recorded and wait until the GPU has finished it.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        crate::counts::wait("sync", 0);
        if self.dry_run {
            return self.health.check();
        }
        self.wait()
    }
}
