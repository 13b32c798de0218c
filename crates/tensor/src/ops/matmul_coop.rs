//! The matrix product on cooperative matrices (`shaders/matmul_coop.wgsl`): which adapters
//! can run it, in which configuration, and its dispatch. [`GpuMatmul::Coop`](crate::ops::matmul_tiled::GpuMatmul::Coop) names it; the
//! launcher of [`matmul`](super::matmul) binds it as it binds the other kernels (same `Params`,
//! bindings and epilogues), and the other kernels stay the fallback everywhere it is absent.
//!
//! # What a cooperative matrix is
//! A *fragment* is a small matrix (8×8 or 16×16 here) held jointly by the invocations of one
//! subgroup (a warp, a wavefront, a SIMD-group): no invocation owns an element, and the
//! subgroup loads, multiply-adds and stores it as a whole. `coopMultiplyAdd(a, b, c)` computes
//! `a·b + c` on the adapter's matrix units (NVIDIA's tensor cores, AMD's WMMA, Apple's
//! simdgroup matrices). The kernel stages a 32×32 tile of op(A) and op(B) in workgroup memory,
//! zero outside the matrices (so M, N, K are free), and each subgroup walks K over its own
//! fragments of the 32×32 output tile; the sums then go through the same epilogue as the other
//! kernels (α, bias, accumulation, GELU), element by element (the shader's header has the
//! layout). So the math is the other kernels':
//!
//! ```text
//! C[z, i, j] = (accumulate ? C[z, i, j] : 0) + bias[j] + α · Σ_{p<K} op(A)[z, i, p] · op(B)[z, p, j]
//! ```
//!
//! # Configurations
//! An adapter lists the fragment shapes and types its matrix units take
//! (`wgpu::Adapter::cooperative_matrix_properties`: M×N×K, the type of A and B, that of C).
//! The kernel has one pipeline per configuration it knows:
//! - [`CoopConfig::F32`]: f32 A and B, 8×8×8, f32 C. Every operand exact; the result is the f32
//!   product up to the order of the sums. Apple GPUs list it (simdgroup matrices).
//! - [`CoopConfig::F16`]: f16 A and B, 16×16×16, f32 C (needs `shader-f16` too): what NVIDIA's
//!   and AMD's Vulkan drivers list. A's f32 elements are rounded to f16 while staged (a relative
//!   error of at most 2⁻¹⁰ each: WGSL lets the conversion take either neighbour), B's halves are
//!   used as stored, and every sum is in f32. It is taken only for a product whose B is a
//!   frozen weight already stored in f16 ([`F16Tensor`](crate::ops::matmul_f16::F16Tensor),
//!   `--precision f16`), where the user accepted f16 rounding; an f32 product never takes it.
//! - [`CoopConfig::F16Small`]: the same with 8×8×8 fragments, for adapters whose matrix units
//!   list only those in f16 (Apple's simdgroup matrices; Mesa's lavapipe from 25.1 on).
//!
//! # Where it is offered
//! [`detect`] reads what the adapter offers and keeps a configuration when: the backend is
//! Vulkan or Metal (naga writes cooperative matrices to SPIR-V and MSL only, so on DX12 and GL
//! the kernel is never offered, whatever the adapter lists); the adapter has the
//! `wgpu-cooperative-matrix` feature (wgpu offers it on Vulkan with `VK_KHR_cooperative_matrix`
//! and the Vulkan memory model's device scope, and on Metal 2.3+) and the `subgroup` one (the
//! shader needs `subgroup_id`); its subgroups are at most 64 wide and divide the workgroup of
//! 64 (so every subgroup is full, which cooperative operations assume); and the configuration is
//! listed (`shader-f16` as well for [`CoopConfig::F16`]). The device is then made with those
//! features ([`GpuContext::coop`](crate::GpuContext::coop) says what it got); wgpu calls the
//! cooperative-matrix feature experimental, so the device is made with its experimental
//! features allowed, and only then. `GpuOptions::no_cooperative_matrix` leaves them off.
//!
//! # Choice
//! `--matmul-kernel coop` forces it for every product it has a configuration for (an f32
//! product needs [`CoopConfig::F32`]; a B in f16 takes [`CoopConfig::F16`], else `F32` with the
//! halves widened exactly); a product without one takes the default rule's kernel, so on an
//! adapter that lists only f16 configurations (NVIDIA's) `--precision f16 --matmul-kernel coop`
//! runs the f16 weights' products on the matrix units and the rest as before. `train` refuses
//! the flag, naming what the adapter lacks ([`unavailable`]), on an adapter with no usable
//! configuration at all. Before its first product a configuration runs a self-check (two
//! products whose every value and sum is exact, compared element for element,
//! `matmul_launch.rs`); one that fails is not used on that device, and `train devices` says
//! why: the kernel has run on few drivers, and a driver that miscomputes it must cost speed,
//! never a wrong number. The tuner (`matmul_tune.rs`) adds it to its candidates where the product has a
//! configuration; the rule used on software adapters and in dry runs never takes it.

use crate::gpu::{Binding, GpuContext, Kernel};
use crate::ops::matmul_tiled::{self, Dispatch};
use crate::{Error, Result, shaders};

/// A configuration the kernel has a pipeline for (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoopConfig {
    /// f32 × f32 → f32, 8×8×8 fragments.
    F32,
    /// f16 × f16 → f32, 16×16×16 fragments (B stored in f16 only).
    F16,
    /// f16 × f16 → f32, 8×8×8 fragments (B stored in f16 only).
    F16Small,
}

/// Output tile side of one workgroup (`TILE` in the shader).
const TILE: u32 = 32;

impl CoopConfig {
    /// Every configuration, in the order [`detect`] lists them.
    pub const ALL: [CoopConfig; 3] = [CoopConfig::F32, CoopConfig::F16, CoopConfig::F16Small];

    /// `f32 8×8×8 → f32` style text.
    pub fn name(self) -> &'static str {
        match self {
            CoopConfig::F32 => "f32 8×8×8 → f32",
            CoopConfig::F16 => "f16 16×16×16 → f32",
            CoopConfig::F16Small => "f16 8×8×8 → f32",
        }
    }

    /// Is `p` this configuration's fragment shape and types?
    fn is(self, p: &wgpu::CooperativeMatrixProperties) -> bool {
        use wgpu::CooperativeScalarType as T;
        let (side, ab) = match self {
            CoopConfig::F32 => (8, T::F32),
            CoopConfig::F16 => (16, T::F16),
            CoopConfig::F16Small => (8, T::F16),
        };
        (p.m_size, p.n_size, p.k_size) == (side, side, side)
            && p.ab_type == ab
            && p.cr_type == T::F32
    }

    /// The device features its pipeline needs beyond cooperative matrices and subgroups.
    fn extra_features(self) -> wgpu::Features {
        match self {
            CoopConfig::F32 => wgpu::Features::empty(),
            CoopConfig::F16 | CoopConfig::F16Small => wgpu::Features::SHADER_F16,
        }
    }

    /// Its kernel: one module per configuration, three entry points (the plain product and the
    /// GELU epilogues).
    pub(crate) fn kernel(self) -> Kernel {
        match self {
            CoopConfig::F32 => Kernel {
                shader: "matmul_coop",
                source: shaders::MATMUL_COOP,
                entry: "matmul_coop",
            },
            CoopConfig::F16 => Kernel {
                shader: "matmul_coop_f16",
                source: shaders::MATMUL_COOP_F16,
                entry: "matmul_coop",
            },
            CoopConfig::F16Small => Kernel {
                shader: "matmul_coop_f16_8",
                source: shaders::MATMUL_COOP_F16_8,
                entry: "matmul_coop",
            },
        }
    }
}

/// What an adapter offers the cooperative-matrix kernel, and what its device was given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoopSupport {
    /// Every configuration the adapter lists, usable here or not (for `train devices`).
    pub offered: Vec<wgpu::CooperativeMatrixProperties>,
    /// The configurations the kernel can run ([`detect`]'s conditions all met).
    pub usable: Vec<CoopConfig>,
    /// Why none is usable, when none is.
    pub missing: Option<String>,
    /// Each configuration's self-check, in [`CoopConfig::ALL`]'s order, run at the first
    /// product that would take it (`matmul_launch.rs`): `Some(what was wrong)` turns the
    /// configuration off on this device, so a driver that computes it wrongly costs speed, never
    /// a wrong number.
    pub checks: [std::sync::OnceLock<Option<String>>; 3],
}

impl CoopSupport {
    /// The configuration a product takes: for a B stored in f16, [`CoopConfig::F16`] or else
    /// [`CoopConfig::F16Small`] where usable; else [`CoopConfig::F32`] where that is; `None`
    /// without any.
    pub fn config_for(&self, b_f16: bool) -> Option<CoopConfig> {
        let has = |c| self.usable.contains(&c);
        for half in [CoopConfig::F16, CoopConfig::F16Small] {
            if b_f16 && has(half) {
                return Some(half);
            }
        }
        has(CoopConfig::F32).then_some(CoopConfig::F32)
    }

    /// The device features the usable configurations need (empty without one).
    pub fn features(&self) -> wgpu::Features {
        if self.usable.is_empty() {
            return wgpu::Features::empty();
        }
        self.usable.iter().fold(
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SUBGROUP,
            |f, c| f | c.extra_features(),
        )
    }

    /// The configurations the adapter lists, one per line fragment: `8×8×8 F32 → F32, …`, or
    /// `none`.
    pub fn offered_text(&self) -> String {
        if self.offered.is_empty() {
            return "none".into();
        }
        let list: Vec<String> = self
            .offered
            .iter()
            .map(|p| {
                format!(
                    "{}×{}×{} {:?} → {:?}",
                    p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
                )
            })
            .collect();
        list.join(", ")
    }

    /// The self-check result slot of `config`.
    pub(crate) fn check(&self, config: CoopConfig) -> &std::sync::OnceLock<Option<String>> {
        let i = CoopConfig::ALL.iter().position(|&c| c == config);
        &self.checks[i.expect("ALL lists every configuration")]
    }

    /// One line for `train devices`: what is listed, what the kernel uses, or why not.
    pub fn describe(&self) -> String {
        let failed: Vec<String> = CoopConfig::ALL
            .iter()
            .filter_map(|&c| {
                Some(format!(
                    "{} failed its self-check: {}",
                    c.name(),
                    self.check(c).get()?.as_ref()?
                ))
            })
            .collect();
        if !failed.is_empty() {
            return format!(
                "cooperative matrices: {} (not used: {})",
                self.offered_text(),
                failed.join("; ")
            );
        }
        let used = if self.usable.is_empty() {
            format!(
                "not used: {}",
                self.missing.as_deref().unwrap_or("no configuration")
            )
        } else {
            let names: Vec<&str> = self.usable.iter().map(|c| c.name()).collect();
            format!("`--matmul-kernel coop` uses {}", names.join(" and "))
        };
        format!("cooperative matrices: {} ({used})", self.offered_text())
    }
}

/// What an adapter offers, as [`detect`] reads it (a plain struct, so the rules are tested
/// for adapters this machine does not have).
#[derive(Clone, Debug)]
pub struct CoopOffer {
    pub backend: wgpu::Backend,
    pub features: wgpu::Features,
    pub properties: Vec<wgpu::CooperativeMatrixProperties>,
    /// The adapter's subgroup sizes (smallest, largest).
    pub subgroup_sizes: (u32, u32),
}

impl CoopOffer {
    pub fn of(adapter: &wgpu::Adapter) -> CoopOffer {
        let info = adapter.get_info();
        CoopOffer {
            backend: info.backend,
            features: adapter.features(),
            properties: adapter.cooperative_matrix_properties(),
            subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        }
    }
}

/// Invocations of the kernel's workgroup (`THREADS` in the shader).
const THREADS: u32 = 64;

/// The configurations the kernel can run on an adapter offering `o` (module doc, "Where it is
/// offered"), and why none when none.
pub fn detect(o: &CoopOffer) -> CoopSupport {
    let mut s = CoopSupport {
        offered: o.properties.clone(),
        ..CoopSupport::default()
    };
    let (min, max) = o.subgroup_sizes;
    let why = if !matches!(o.backend, wgpu::Backend::Vulkan | wgpu::Backend::Metal) {
        Some(format!(
            "the {:?} backend has no cooperative matrices in naga (SPIR-V and MSL only)",
            o.backend
        ))
    } else if !o
        .features
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    {
        Some(
            "the adapter does not offer the `wgpu-cooperative-matrix` feature (Vulkan: \
             VK_KHR_cooperative_matrix with vulkanMemoryModelDeviceScope; Metal: MSL 2.3 and an \
             Apple7+/Mac2 GPU)"
                .into(),
        )
    } else if !o.features.contains(wgpu::Features::SUBGROUP) {
        Some("the adapter does not offer the `subgroup` feature".into())
    } else if min == 0
        || max > THREADS
        || !THREADS.is_multiple_of(min)
        || !THREADS.is_multiple_of(max)
    {
        Some(format!(
            "its subgroups of {min} to {max} invocations do not divide the kernel's workgroup \
             of {THREADS}"
        ))
    } else {
        s.usable = CoopConfig::ALL
            .into_iter()
            .filter(|c| o.properties.iter().any(|p| c.is(p)))
            .filter(|c| o.features.contains(c.extra_features()))
            .collect();
        s.usable.is_empty().then(|| {
            format!(
                "none of the configurations it lists ({}) is one the kernel has ({}{})",
                s.offered_text(),
                CoopConfig::F32.name(),
                if o.features.contains(wgpu::Features::SHADER_F16) {
                    format!(
                        ", {}, {}",
                        CoopConfig::F16.name(),
                        CoopConfig::F16Small.name()
                    )
                } else {
                    format!(
                        ", or {} or {} with `shader-f16`",
                        CoopConfig::F16.name(),
                        CoopConfig::F16Small.name()
                    )
                }
            )
        })
    };
    s.missing = why;
    s
}

/// The error of a product forced onto the kernel on a device without a configuration for it.
pub fn unavailable(ctx: &GpuContext, b_f16: bool) -> Error {
    let s = ctx.coop();
    let why = match &s.missing {
        Some(why) => why.clone(),
        None if !b_f16 => format!(
            "an f32 product needs the {} configuration, and the adapter has only {}",
            CoopConfig::F32.name(),
            s.usable
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "no configuration".into(),
    };
    Error::Unsupported {
        adapter: ctx.info().name.clone(),
        missing: vec![format!(
            "the cooperative-matrix matmul kernel (`--matmul-kernel coop`): {why}; \
             cooperative-matrix configurations it lists: {}",
            s.offered_text()
        )],
    }
}

/// Record one dispatch of the product `p` (over `nz` batch entries) with `config` (the one
/// [`CoopSupport::config_for`] gives `shape`, checked by the launcher). A grid wider than the
/// device allows (N or M over 2 million) takes the first kernel instead.
pub(crate) fn record(
    ctx: &GpuContext,
    config: CoopConfig,
    p_bytes: &[u8],
    shape: &Dispatch,
    bindings: &[(u32, Binding<'_>)],
    nz: usize,
) -> Result<()> {
    let groups = [shape.n.div_ceil(TILE), shape.m.div_ceil(TILE), nz as u32];
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    if groups[0] > max || groups[1] > max {
        let (kernel, constants, tile) = matmul_tiled::pick(matmul_tiled::GpuMatmul::Tile64, shape);
        let groups = [shape.n.div_ceil(tile), shape.m.div_ceil(tile), nz as u32];
        return ctx.dispatch_with(kernel, constants, p_bytes, bindings, groups);
    }
    let kernel =
        crate::ops::matmul::Epilogue::kernel(shape.epilogue.map(|(e, _)| e), config.kernel());
    let constants = shaders::MATMUL_COOP_VARIANTS[usize::from(shape.b_f16)];
    ctx.dispatch_with(kernel, constants, p_bytes, bindings, groups)
}

#[cfg(test)]
#[path = "matmul_coop_tests.rs"]
mod tests;
