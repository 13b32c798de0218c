//! Devices: where a tensor lives and its ops run.
//!
//! [`Device::Cpu`] runs the ops in Rust, vectorised and threaded (the fallback for real work when
//! no GPU is present); [`Device::Gpu`] runs WGSL kernels through wgpu on Vulkan, Metal, DX12 or
//! GL. Both are tested against the f64 loops of [`reference`](crate::reference).

use std::sync::{Arc, OnceLock};

use crate::gpu::{GpuContext, GpuOptions};
use crate::memory::{MemoryCounters, MemoryStats};
use crate::{Error, Result};

/// The CPU backend's state: its memory counters.
#[derive(Debug, Default)]
pub struct CpuContext {
    pub(crate) memory: MemoryCounters,
}

/// A place where tensors live. Cloning is cheap (a reference count).
#[derive(Clone)]
pub enum Device {
    Cpu(Arc<CpuContext>),
    Gpu(Arc<GpuContext>),
}

/// Which device the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// A hardware GPU when there is one, else the CPU (the CPU beats a software GPU).
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// Any GPU adapter, software ones (lavapipe) included.
    Gpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "gpu" => Ok(Self::Gpu),
            other => Err(Error::Invalid(format!(
                "unknown device `{other}`: expected auto, cpu or gpu"
            ))),
        }
    }
}

static CPU: OnceLock<Arc<CpuContext>> = OnceLock::new();
static GPU: OnceLock<std::result::Result<Arc<GpuContext>, Error>> = OnceLock::new();
static HARDWARE_GPU: OnceLock<std::result::Result<Arc<GpuContext>, Error>> = OnceLock::new();

impl Device {
    /// The process-wide CPU device.
    pub fn cpu() -> Device {
        Device::Cpu(CPU.get_or_init(Default::default).clone())
    }

    /// The process-wide GPU device on the best adapter, software adapters accepted.
    pub fn gpu() -> Result<Device> {
        GPU.get_or_init(|| {
            GpuContext::new(&GpuOptions {
                allow_software: true,
                ..Default::default()
            })
        })
        .clone()
        .map(Device::Gpu)
    }

    /// A new GPU device with its own options (its own pipelines, pool and counters).
    pub fn gpu_with(options: &GpuOptions) -> Result<Device> {
        GpuContext::new(options).map(Device::Gpu)
    }

    /// Resolve a user's choice: `Auto` takes a hardware GPU if there is one, else the CPU.
    /// `Gpu` with no usable adapter is an error naming what was asked and what exists.
    pub fn select(choice: DeviceChoice) -> Result<Device> {
        Self::select_explained(choice).map(|(device, _)| device)
    }

    /// [`Device::select`], and when `Auto` fell back to the CPU, a sentence saying why (to
    /// print, so a user who expected a GPU learns what was missing).
    pub fn select_explained(choice: DeviceChoice) -> Result<(Device, Option<String>)> {
        match choice {
            DeviceChoice::Cpu => Ok((Device::cpu(), None)),
            DeviceChoice::Gpu => Device::gpu().map(|d| (d, None)),
            DeviceChoice::Auto => {
                let hw = HARDWARE_GPU.get_or_init(|| GpuContext::new(&GpuOptions::default()));
                Ok(match hw {
                    Ok(ctx) => (Device::Gpu(ctx.clone()), None),
                    Err(e) => (
                        Device::cpu(),
                        Some(format!(
                            "--device auto found no hardware GPU, so it uses the CPU backend ({e})"
                        )),
                    ),
                })
            }
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Gpu(_))
    }

    /// A one-line description: the adapter and its limits, or the CPU and its threads.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu(_) => format!(
                "CPU reference backend ({} threads; matmul by the {} crate)",
                crate::cpu::threads(),
                crate::sgemm::cpu_gemm().name()
            ),
            Device::Gpu(ctx) => format!("GPU: {}", ctx.info()),
        }
    }

    /// Live and peak bytes of this device's tensors.
    pub fn memory(&self) -> MemoryStats {
        self.counters().snapshot()
    }

    /// Start a new peak measurement.
    pub fn reset_peak_memory(&self) {
        self.counters().reset_peak()
    }

    pub(crate) fn counters(&self) -> &MemoryCounters {
        match self {
            Device::Cpu(c) => &c.memory,
            Device::Gpu(g) => &g.memory,
        }
    }

    /// Wait until every recorded op has finished (a no-op on the CPU).
    pub fn sync(&self) -> Result<()> {
        match self {
            Device::Cpu(_) => Ok(()),
            Device::Gpu(g) => g.sync(),
        }
    }

    /// Two handles to the same device?
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu(a), Device::Cpu(b)) => Arc::ptr_eq(a, b),
            (Device::Gpu(a), Device::Gpu(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu(_) => write!(f, "Cpu"),
            Device::Gpu(g) => write!(f, "Gpu({})", g.info().name),
        }
    }
}
