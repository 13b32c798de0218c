//! Finding adapters: which wgpu sees on which backends, in order of preference (discrete GPU
//! first, software last, GL after its equals), what a context may ask of one ([`GpuOptions`]),
//! how the chosen one is described ([`GpuInfo`]), and what to say when there is none.

/// Options for making a GPU context; the defaults take everything the adapter offers.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Accept a software adapter (lavapipe, WARP, SwiftShader).
    pub allow_software: bool,
    /// Use a smaller storage-binding limit than the adapter's, so the code that splits large
    /// tensors over several bindings can be exercised with small tensors.
    pub max_binding_bytes: Option<u64>,
    /// The wgpu backends to look on; `None`: those of `WGPU_BACKEND`, else all.
    pub backends: Option<wgpu::Backends>,
    /// The limits to ask the device for; `None`: every limit the adapter offers. Asking for more
    /// than the adapter has is an [`Error::Unsupported`](crate::Error::Unsupported) listing each shortfall.
    pub limits: Option<wgpu::Limits>,
    /// Ask for this `max_buffer_size` instead (the largest tensor the device will hold): smaller
    /// to keep a model within a budget, or to test what happens when it does not fit.
    pub max_buffer_bytes: Option<u64>,
    /// Features the device must have.
    pub features: wgpu::Features,
    /// Do not ask for the cooperative-matrix features even where the adapter offers them (the
    /// `matmul_coop.wgsl` kernel is then never used): wgpu calls them experimental.
    pub no_cooperative_matrix: bool,
    /// Record without running: dispatches and copies are validated and encoded but never
    /// submitted, uploads are dropped, a readback returns 1.0 for every element without waiting
    /// and `sync` returns at once. Buffers are still created (and counted) but never written,
    /// so the driver need not back them. For the step accounting of
    /// [`counts`](crate::counts): a GPT-2 step on a software adapter in seconds. Every number
    /// a dry-run context computes is meaningless; only what it was asked to do is real.
    pub dry_run: bool,
}

/// What a GPU context was made from, printable for the user.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {}); max buffer {} MiB, max storage binding {} MiB, \
             workgroup memory {} KiB, {} invocations per workgroup, {} workgroups per dimension",
            self.name,
            self.backend,
            self.device_type,
            if self.driver.is_empty() {
                "?"
            } else {
                &self.driver
            },
            self.max_buffer_size >> 20,
            self.max_storage_buffer_binding_size >> 20,
            self.max_compute_workgroup_storage_size >> 10,
            self.max_compute_invocations_per_workgroup,
            self.max_compute_workgroups_per_dimension
        )
    }
}

pub(super) fn is_software(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
}

fn rank(info: &wgpu::AdapterInfo) -> u32 {
    let by_type = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    // GL comes last among equals: its shader compiles are slow and its limits small.
    by_type * 2 + u32::from(info.backend == wgpu::Backend::Gl)
}

/// The backends wgpu looks on by default: those named by `WGPU_BACKEND`, else all.
pub fn default_backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all())
}

/// List the adapters wgpu can see (honours `WGPU_BACKEND`), best first.
pub fn adapters() -> Vec<wgpu::Adapter> {
    adapters_on(default_backends())
}

/// List the adapters on `backends`, best first.
pub fn adapters_on(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    descriptor.backends = backends;
    let instance = wgpu::Instance::new(descriptor);
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    adapters.sort_by_key(|a| rank(&a.get_info()));
    adapters
}

/// One adapter as the user would recognise it: "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)".
pub(super) fn adapter_line(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

/// Why `backends` gave no adapter: what was asked and which adapters exist on any backend.
pub(super) fn no_adapter_message(backends: wgpu::Backends) -> String {
    let present: Vec<String> = if backends.contains(wgpu::Backends::all()) {
        Vec::new()
    } else {
        adapters_on(wgpu::Backends::all())
            .iter()
            .map(|a| adapter_line(&a.get_info()))
            .collect()
    };
    format!(
        "asked for an adapter on {backends:?}{}, found none; adapters on any backend: {}",
        match std::env::var("WGPU_BACKEND") {
            Ok(v) => format!(" (WGPU_BACKEND={v})"),
            Err(_) => String::new(),
        },
        if present.is_empty() {
            "none (is a Vulkan, Metal or DX12 driver installed? On Debian, `apt-get install \
             mesa-vulkan-drivers` gives the lavapipe software GPU)"
                .to_string()
        } else {
            present.join(", ")
        }
    )
}
