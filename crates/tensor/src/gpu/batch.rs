//! Recording and submitting: steps 2 to 6 of the module doc of [`gpu`](super). A dispatch is
//! checked, its `Params` appended to the batch's arena, its bind group taken from the cache and
//! `dispatch_workgroups` recorded into the batch's open compute pass; [`GpuContext::flush`]
//! uploads the arena and submits, [`GpuContext::sync`] also waits.

use std::sync::atomic::Ordering;

use super::arena::ParamArena;
use super::errors::capture;
use super::layout::BindLimits;
use super::timestamps::{MAX_TIMED_PASSES, Tag};
use super::{Binding, GpuContext, Kernel, MAX_BATCH, PARAM_SLOT, pipelines};
use crate::{Error, Result};

/// Commands recorded but not yet submitted.
pub(super) struct Batch {
    pub(super) encoder: Option<wgpu::CommandEncoder>,
    pub(super) pass: Option<wgpu::ComputePass<'static>>,
    pub(super) dispatches: u64,
    /// The `Params` of the batch's dispatches, uploaded when it is submitted.
    pub(super) params: ParamArena,
    /// The profiler's tag of the open pass, and of each timed pass of this batch in order.
    pub(super) pass_tag: Option<Tag>,
    pub(super) tags: Vec<Tag>,
}

impl GpuContext {
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
    pub(super) fn wait(&self) -> Result<()> {
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
