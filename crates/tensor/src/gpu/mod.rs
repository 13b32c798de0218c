//! The wgpu backend: one [`GpuContext`] per adapter, holding the device and queue, the compiled
//! pipelines, the open command batch, the buffer pool and the memory counters.
//!
//! How an op runs on the GPU (each step is one WebGPU concept):
//! 1. the op's launcher checks shapes and asks the pool for an output buffer;
//! 2. it writes its `Params` struct into the uniform arena (a `queue.write_buffer`, applied at the
//!    next submission, before any command of it);
//! 3. it gets the cached `ComputePipeline` for its WGSL entry point (compiled once per context);
//! 4. it makes a `BindGroup` of params + storage ranges and records `dispatch_workgroups` into the
//!    open compute pass of the batch. Nothing runs yet;
//! 5. the batch is submitted when it is full, when data is read back (`Tensor::to_vec`) or when
//!    `sync` is called. wgpu inserts the barriers between dependent dispatches.
//!
//! Each of those steps reports to the step accounting of [`counts`](crate::counts) when it is
//! on (dispatches, copies, uploads, submissions, blocking waits). A context made with
//! [`GpuOptions::dry_run`] does steps 1 to 4 and stops there: nothing is submitted.

mod adapters;
pub(crate) mod bind;
mod errors;
pub(crate) mod params;
mod pool;
mod readback;
mod timestamps;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use errors::{Health, capture};
/// The wgpu this crate is built on, for the wgpu types in [`GpuOptions`].
pub use wgpu;

use crate::memory::{MemoryCounters, MemoryStats};
use crate::{Error, Result};
pub use adapters::{GpuInfo, GpuOptions, adapters, adapters_on, default_backends};
use adapters::{adapter_line, is_software, no_adapter_message};
pub(crate) use bind::{Binding, grid_2d};
pub(crate) use params::kernel_params;
use pool::BufferPool;
use timestamps::{MAX_TIMED_PASSES, Tag, Timestamps};

/// Bytes reserved per dispatch in the uniform arena (the common minimum uniform offset alignment).
const PARAM_SLOT: u64 = 256;
/// Dispatches recorded before the batch is submitted on its own.
const MAX_BATCH: u64 = 1024;

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
    is_software: bool,
    max_binding: u64,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    /// Compiled pipelines by (shader, entry point, address of the override constants' table).
    pipelines: Mutex<HashMap<(&'static str, &'static str, usize), wgpu::ComputePipeline>>,
    batch: Mutex<Batch>,
    params: wgpu::Buffer,
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
            info,
            is_software: is_software(&adapter_info),
            max_binding,
            modules: Mutex::default(),
            pipelines: Mutex::default(),
            batch: Mutex::new(Batch {
                encoder: None,
                pass: None,
                dispatches: 0,
                pass_tag: None,
                tags: Vec::new(),
            }),
            params,
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

    /// Release the buffers the pool keeps cached.
    pub fn trim_pool(&self) {
        let mut pool = self.pool.lock().unwrap();
        pool.clear();
        self.memory.set_pooled(0);
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
        }
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

    /// The pipeline of `kernel` with its pipeline-overridable constants set to `constants`
    /// (WGSL `override` declarations: a value fixed when the pipeline is made, so branches on it
    /// fold away; each distinct table is its own pipeline).
    fn pipeline(
        &self,
        kernel: Kernel,
        constants: &'static [(&'static str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        let key = (kernel.shader, kernel.entry, constants.as_ptr() as usize);
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let (pipeline, error) = capture(&self.device, || {
            let module = {
                let mut modules = self.modules.lock().unwrap();
                modules
                    .entry(kernel.shader)
                    .or_insert_with(|| {
                        let desc = wgpu::ShaderModuleDescriptor {
                            label: Some(kernel.shader),
                            source: wgpu::ShaderSource::Wgsl(kernel.source.into()),
                        };
                        if !crate::shaders::UNCHECKED.contains(&kernel.shader) {
                            return self.device.create_shader_module(desc);
                        }
                        let checks = wgpu::ShaderRuntimeChecks {
                            bounds_checks: false,
                            ..wgpu::ShaderRuntimeChecks::checked()
                        };
                        // SAFETY: the shaders listed in `UNCHECKED` index their bindings only
                        // inside the ranges their launcher binds (each says why in its header
                        // and its launcher checks it before dispatching); only the bounds
                        // clamps are left out, every other runtime check stays.
                        unsafe { self.device.create_shader_module_trusted(desc, checks) }
                    })
                    .clone()
            };
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.entry),
                    layout: None,
                    module: &module,
                    entry_point: Some(kernel.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        ..Default::default()
                    },
                    cache: None,
                })
        });
        if let Some(e) = error {
            // A module that failed to compile must not be reused by the next entry point.
            self.modules.lock().unwrap().remove(kernel.shader);
            return Err(self.gpu_error(
                format_args!("compiling {}::{}", kernel.shader, kernel.entry),
                e,
            ));
        }
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        Ok(pipeline)
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
        debug_assert!(params.len() as u64 <= PARAM_SLOT);
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
        let pipeline = self.pipeline(kernel, constants)?;
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
        let slot = batch.dispatches * PARAM_SLOT;
        if !self.dry_run {
            self.queue.write_buffer(&self.params, slot, params);
        }
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.params,
                offset: slot,
                size: wgpu::BufferSize::new(params.len().max(16).div_ceil(16) as u64 * 16),
            }),
        }];
        for (i, b) in bindings {
            entries.push(wgpu::BindGroupEntry {
                binding: *i,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: wgpu::BufferSize::new(b.size.div_ceil(4) * 4),
                }),
            });
        }
        let (bind_group, error) = capture(&self.device, || {
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.entry),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        });
        if let Some(e) = error {
            return Err(self.gpu_error(
                format_args!("binding the buffers of {}::{}", kernel.shader, kernel.entry),
                e,
            ));
        }
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
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        batch.dispatches += 1;
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        drop(batch);
        if let Some(start) = counting {
            let bound: Vec<(u32, u64)> = bindings
                .iter()
                .map(|(i, b)| (*i, b.size.div_ceil(4) * 4))
                .collect();
            let host_ns = start.elapsed().as_nanos() as u64;
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
                self.queue.submit([encoder.finish()]);
            }
        });
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
