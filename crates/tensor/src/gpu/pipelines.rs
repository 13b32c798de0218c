//! Compiled kernels: one `ComputePipeline` per WGSL entry point, built once per context with an
//! explicit pipeline layout (see [`layout`](super::layout)), and the bind group layouts they
//! share.
//!
//! A WebGPU *pipeline layout* lists the bind group layouts a pipeline reads; a *bind group
//! layout* lists the type of each binding. Kernels whose bindings have the same types share
//! one bind group layout (elementwise kernels of the same arity, for instance), so a bind
//! group cached for one of them serves the others on the same buffers.

use std::collections::HashMap;
use std::sync::Arc;

use super::errors::capture;
use super::layout::KernelLayout;
use super::{GpuContext, Kernel};
use crate::Result;

/// A kernel ready to dispatch.
pub(crate) struct Compiled {
    pub pipeline: wgpu::ComputePipeline,
    /// Its bindings, to check each dispatch against.
    pub layout: KernelLayout,
    /// The index of its bind group layout among the context's (the bind group cache's key).
    pub group_layout_id: u32,
    pub group_layout: wgpu::BindGroupLayout,
}

/// The pipelines of a context and what they are built from.
#[derive(Default)]
pub(crate) struct Pipelines {
    modules: HashMap<&'static str, wgpu::ShaderModule>,
    /// By (shader, entry point, address of the override constants' table).
    by_kernel: HashMap<(&'static str, &'static str, usize), Arc<Compiled>>,
    /// Bind group layouts (with their one-group pipeline layout) by their entries.
    group_layouts: HashMap<
        Vec<wgpu::BindGroupLayoutEntry>,
        (u32, wgpu::BindGroupLayout, wgpu::PipelineLayout),
    >,
}

impl Pipelines {
    /// The compiled kernel with `constants`, if it was built before.
    pub fn get(
        &self,
        kernel: Kernel,
        constants: &'static [(&'static str, f64)],
    ) -> Option<Arc<Compiled>> {
        self.by_kernel
            .get(&(kernel.shader, kernel.entry, constants.as_ptr() as usize))
            .cloned()
    }
}

impl GpuContext {
    /// The compiled `kernel` with its pipeline-overridable constants set to `constants` (WGSL
    /// `override` declarations: values fixed when the pipeline is made, so branches on them fold
    /// away; each distinct table is its own pipeline), built on its first use. A shader wgpu
    /// rejects is an error naming the kernel and saying what is wrong, as is one whose bindings
    /// do not fit the scheme of [`KernelLayout`].
    pub(crate) fn pipeline(
        &self,
        kernel: Kernel,
        constants: &'static [(&'static str, f64)],
    ) -> Result<Arc<Compiled>> {
        let mut pipelines = self.pipelines.lock().unwrap();
        if let Some(p) = pipelines.get(kernel, constants) {
            return Ok(p);
        }
        let name = || format!("compiling {}::{}", kernel.shader, kernel.entry);
        // wgpu first, so that its diagnostics name what is wrong with a broken shader.
        let module = pipelines.modules.get(kernel.shader).cloned();
        let module = match module {
            Some(m) => m,
            None => {
                let (module, error) = capture(&self.device, || {
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
                    // SAFETY: the shaders listed in `UNCHECKED` index their bindings only inside
                    // the ranges their launcher binds (each says why in its header, and its
                    // launcher checks it before dispatching); only the bounds clamps are left
                    // out, every other runtime check stays.
                    unsafe { self.device.create_shader_module_trusted(desc, checks) }
                });
                if let Some(e) = error {
                    return Err(self.gpu_error(name(), e));
                }
                pipelines.modules.insert(kernel.shader, module.clone());
                module
            }
        };
        let layout = KernelLayout::of(kernel.source, kernel.entry)
            .map_err(|e| crate::Error::Gpu(format!("{}: {e}", name())))?;
        let entries = layout.entries();
        let known = pipelines.group_layouts.get(&entries).cloned();
        let (group_layout_id, group_layout, pipeline_layout) = match known {
            Some(known) => known,
            None => {
                let (made, error) = capture(&self.device, || {
                    let group =
                        self.device
                            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                                label: Some(kernel.entry),
                                entries: &entries,
                            });
                    let pipeline =
                        self.device
                            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                                label: Some(kernel.entry),
                                bind_group_layouts: &[Some(&group)],
                                immediate_size: 0,
                            });
                    (pipelines.group_layouts.len() as u32, group, pipeline)
                });
                if let Some(e) = error {
                    return Err(self.gpu_error(name(), e));
                }
                pipelines.group_layouts.insert(entries, made.clone());
                made
            }
        };
        let (pipeline, error) = capture(&self.device, || {
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(kernel.entry),
                    layout: Some(&pipeline_layout),
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
            return Err(self.gpu_error(name(), e));
        }
        let compiled = Arc::new(Compiled {
            pipeline,
            layout,
            group_layout_id,
            group_layout,
        });
        let key = (kernel.shader, kernel.entry, constants.as_ptr() as usize);
        pipelines.by_kernel.insert(key, compiled.clone());
        Ok(compiled)
    }
}
