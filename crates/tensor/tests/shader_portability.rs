//! Portability of every kernel without the hardware: each shader the engine compiles (the
//! registry [`tensor::shaders::ALL`], so a shader added later is checked without touching this
//! file) is validated by naga and translated, entry point by entry point, to the three native
//! languages wgpu hands drivers: SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12). A kernel that
//! only Vulkan accepts then fails here, on any CI machine, instead of on a user's Mac or
//! Windows machine.
//!
//! Variants: a shader is translated once with its `override` defaults (an `override` without one
//! fails here by name), and once more for each table of pipeline-overridable constants the
//! engine makes a pipeline with ([`tensor::shaders::OVERRIDES`]: the matrix products' B in f32 or
//! f16, and `matmul_tiled.wgsl`'s four transpose cases, for each entry point: the plain product
//! and its GELU epilogues),
//! since each of them is a different program for the driver. `enable`
//! directives turn on the naga capabilities (and the MSL and HLSL language levels) those
//! extensions need; a shader without any is checked at the baseline: no capabilities, MSL 2.0
//! (the oldest Metal wgpu runs on) and HLSL shader model 5.1 (FXC, what DX12 falls back to
//! without DXC). Nothing is compiled by a driver: what naga writes is what wgpu would hand the
//! driver, and naga refusing to write it is what this test catches.
//!
//! Cooperative matrices (`enable wgpu_cooperative_matrix`, `matmul_coop.wgsl` in each of its
//! configurations, [`tensor::shaders::CONFIGURED`]) exist in naga's SPIR-V and MSL (2.3)
//! writers only: those are translated, and for HLSL the test checks the other way round, that
//! naga cannot write them, which is why the engine never offers that kernel on DX12
//! (`ops/matmul_coop.rs`'s `detect`, tested there).

use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{Module, ResourceBinding, ShaderStage};

/// What a shader's `enable` directives ask for: naga's capabilities and the language levels.
struct Target {
    capabilities: Capabilities,
    msl: (u8, u8),
    hlsl: hlsl::ShaderModel,
    /// SPIR-V version (1.0 unless an extension needs more).
    spirv: (u8, u8),
    /// Cooperative matrices: no HLSL exists for them.
    coop: bool,
}

/// Read `enable a, b;` lines. An extension this test does not know is a failure naming it,
/// so a new one gets a deliberate mapping here rather than a silent pass.
fn target(name: &str, source: &str) -> Target {
    let mut t = Target {
        capabilities: Capabilities::empty(),
        msl: (2, 0),
        hlsl: hlsl::ShaderModel::V5_1,
        spirv: (1, 0),
        coop: false,
    };
    for line in source.lines() {
        let Some(rest) = line.trim().strip_prefix("enable ") else {
            continue;
        };
        for ext in rest.trim_end_matches(';').split(',').map(str::trim) {
            match ext {
                "f16" => {
                    t.capabilities |= Capabilities::SHADER_FLOAT16;
                    t.msl = t.msl.max((2, 1));
                    t.hlsl = higher(t.hlsl, hlsl::ShaderModel::V6_2);
                }
                "subgroups" => {
                    t.capabilities |= Capabilities::SUBGROUP | Capabilities::SUBGROUP_BARRIER;
                    t.msl = t.msl.max((2, 1));
                    t.hlsl = higher(t.hlsl, hlsl::ShaderModel::V6_0);
                }
                "wgpu_cooperative_matrix" => {
                    // The kernel also reads subgroup_id / num_subgroups (no `enable` for those).
                    t.capabilities |= Capabilities::COOPERATIVE_MATRIX | Capabilities::SUBGROUP;
                    // simdgroup matrices: MSL 2.3, as wgpu's Metal backend requires for them.
                    t.msl = t.msl.max((2, 3));
                    // SubgroupId and the Vulkan memory model: SPIR-V 1.3 at least (wgpu asks
                    // for the memory model on a device with the feature).
                    t.spirv = (1, 3);
                    t.coop = true;
                }
                other => panic!(
                    "{name}.wgsl enables `{other}`, which this test has no mapping for: add the \
                     naga capabilities and language levels it needs to `target`"
                ),
            }
        }
    }
    t
}

/// The higher of two shader models (naga orders them but does not derive `Ord`).
fn higher(a: hlsl::ShaderModel, b: hlsl::ShaderModel) -> hlsl::ShaderModel {
    if b > a { b } else { a }
}

/// Parse, validate and resolve overrides to `constants` (the defaults where a constant is not
/// in the table).
fn prepare(
    name: &str,
    source: &str,
    caps: Capabilities,
    constants: &[(&str, f64)],
) -> (Module, ModuleInfo) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}.wgsl does not parse:\n{}", e.emit_to_string(source)));
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}.wgsl is invalid:\n{}", e.emit_to_string(source)));
    for (_, o) in module.overrides.iter() {
        assert!(
            o.init.is_some(),
            "{name}.wgsl: override `{}` has no default (a pipeline made without a table of \
             constants would not compile)",
            o.name.as_deref().unwrap_or("?")
        );
    }
    let mut table = naga::back::PipelineConstants::default();
    for &(key, value) in constants {
        table.insert(key.to_string(), value);
    }
    let (module, info) =
        naga::back::pipeline_constants::process_overrides(&module, &info, None, &table)
            .unwrap_or_else(|e| panic!("{name}.wgsl: resolving overrides {constants:?}: {e}"));
    (module.into_owned(), info.into_owned())
}

/// The bound resources of `module`, in declaration order.
fn bindings(module: &Module) -> Vec<(ResourceBinding, bool)> {
    module
        .global_variables
        .iter()
        .filter_map(|(_, g)| {
            let writable = matches!(
                g.space,
                naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE)
            );
            g.binding.map(|b| (b, writable))
        })
        .collect()
}

/// Run a naga writer; a panic inside it (naga asserts some unsupported cases rather than
/// returning an error) becomes a failure naming `what`: the shader, entry point and backend.
fn named<T>(what: &str, write: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(write)).unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{what}: naga panicked: {why}")
    })
}

fn spirv(name: &str, entry: &str, module: &Module, info: &ModuleInfo, version: (u8, u8)) {
    let options = spv::Options {
        lang_version: version,
        fake_missing_bindings: false,
        binding_map: bindings(module)
            .into_iter()
            .map(|(b, _)| {
                let target = spv::BindingInfo {
                    descriptor_set: b.group,
                    binding: b.binding,
                    binding_array_size: None,
                };
                (b, target)
            })
            .collect(),
        ..Default::default()
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: ShaderStage::Compute,
        entry_point: entry.to_string(),
    };
    let what = format!("{name}.wgsl, entry point `{entry}`: SPIR-V");
    let words = named(&what, || {
        spv::write_vec(module, info, &options, Some(&pipeline))
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        words.first(),
        Some(&0x0723_0203),
        "{name}::{entry}: no SPIR-V magic"
    );
}

/// MSL with the resource map wgpu's Metal backend builds: one buffer slot per binding, then
/// the slot of the buffer of runtime-array sizes.
fn metal(name: &str, entry: &str, module: &Module, info: &ModuleInfo, version: (u8, u8)) {
    let resources: msl::BindingMap = bindings(module)
        .into_iter()
        .enumerate()
        .map(|(slot, (b, writable))| {
            let target = msl::BindTarget {
                buffer: Some(slot as u8),
                mutable: writable,
                ..Default::default()
            };
            (b, target)
        })
        .collect();
    let sizes = resources.len() as u8;
    let options = msl::Options {
        lang_version: version,
        fake_missing_bindings: false,
        per_entry_point_map: [(
            entry.to_string(),
            msl::EntryPointResources {
                resources,
                immediates_buffer: None,
                sizes_buffer: Some(sizes),
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let pipeline = msl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, entry.to_string())),
        ..Default::default()
    };
    let what = format!("{name}.wgsl, entry point `{entry}`: MSL {version:?}");
    let (text, _) = named(&what, || {
        msl::write_string(module, info, &options, &pipeline)
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        text.contains("kernel"),
        "{name}::{entry}: MSL without a kernel"
    );
}

/// HLSL with registers from the bindings (`u` for writable storage, `t` read-only, `b` uniform),
/// as wgpu's DX12 backend lays them out in space = group.
fn dx12(name: &str, entry: &str, module: &Module, info: &ModuleInfo, model: hlsl::ShaderModel) {
    let binding_map: hlsl::BindingMap = bindings(module)
        .into_iter()
        .map(|(b, _)| {
            let target = hlsl::BindTarget {
                space: b.group as u8,
                register: b.binding,
                ..Default::default()
            };
            (b, target)
        })
        .collect();
    let options = hlsl::Options {
        shader_model: model,
        binding_map,
        fake_missing_bindings: false,
        ..Default::default()
    };
    let pipeline = hlsl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, entry.to_string())),
    };
    let what = format!("{name}.wgsl, entry point `{entry}`: HLSL {model:?}");
    let mut text = String::new();
    named(&what, || {
        hlsl::Writer::new(&mut text, &options, &pipeline).write(module, info, None)
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        text.contains("numthreads"),
        "{name}::{entry}: HLSL without a kernel"
    );
}

#[test]
fn every_shader_translates_to_spirv_msl_and_hlsl() {
    let mut checked = Vec::new();
    let mut variants = 0;
    let mut hlsl_refused = 0;
    let all = tensor::shaders::ALL.iter();
    for (name, source) in all.chain(tensor::shaders::CONFIGURED) {
        let t = target(name, source);
        let mut tables: Vec<&[(&str, f64)]> = vec![&[]];
        for (shader, sets) in tensor::shaders::OVERRIDES {
            if shader == name {
                tables.extend(sets.iter().copied());
            }
        }
        for constants in tables {
            let (module, info) = prepare(name, source, t.capabilities, constants);
            assert!(
                !module.entry_points.is_empty(),
                "{name}.wgsl has no entry point"
            );
            for ep in &module.entry_points {
                assert_eq!(
                    ep.stage,
                    ShaderStage::Compute,
                    "{name}::{}: the engine only makes compute pipelines",
                    ep.name
                );
                let label = format!("{name} {constants:?}");
                spirv(&label, &ep.name, &module, &info, t.spirv);
                metal(&label, &ep.name, &module, &info, t.msl);
                if t.coop {
                    let refused = std::panic::catch_unwind(|| {
                        dx12(&label, &ep.name, &module, &info, hlsl::ShaderModel::V6_7)
                    });
                    assert!(
                        refused.is_err(),
                        "{label}::{}: naga now writes cooperative matrices to HLSL; the \
                         kernel could be offered on DX12 (ops/matmul_coop.rs `detect`)",
                        ep.name
                    );
                    hlsl_refused += 1;
                } else {
                    dx12(&label, &ep.name, &module, &info, t.hlsl);
                }
                checked.push(format!("{name}::{}", ep.name));
            }
            variants += usize::from(!constants.is_empty());
        }
    }
    // The matrix products' epilogue variants are among them: GELU forward and backward in the
    // first kernel (its defaults and two B storages) and in the tiled one (its defaults and four
    // transpose tables for each B storage).
    for (entry, pipelines) in [
        ("matmul::matmul_gelu", 3),
        ("matmul::matmul_gelu_backward", 3),
        ("matmul_tiled::matmul_tiled_gelu", 9),
        ("matmul_tiled::matmul_tiled_gelu_backward", 9),
        ("matmul_coop::matmul_coop", 3),
        ("matmul_coop_f16::matmul_coop_gelu_backward", 3),
        ("matmul_coop_f16_8::matmul_coop_gelu", 3),
    ] {
        let found = checked.iter().filter(|c| *c == entry).count();
        assert_eq!(
            found, pipelines,
            "{entry}: expected {pipelines} translated pipelines, found {found}"
        );
    }
    // Every table of constants was translated.
    let tables: usize = tensor::shaders::OVERRIDES
        .iter()
        .map(|(_, t)| t.len())
        .sum();
    assert_eq!(variants, tables);
    // The three cooperative-matrix configurations, three entry points each, with their
    // defaults and two B storages: every one refused for HLSL.
    assert_eq!(hlsl_refused, 3 * 3 * 3);
    // Every registered shader was looked at (the registry is not empty or cut short).
    assert_eq!(
        checked
            .iter()
            .map(|c| c.split("::").next().unwrap())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        tensor::shaders::ALL.len() + tensor::shaders::CONFIGURED.len()
    );
}

/// The checks above can fail: a kernel in f64, which Vulkan and DX12 take (`shaderFloat64`,
/// `double`) but Metal has no type for, passes SPIR-V and HLSL and is refused for MSL, by
/// shader and entry point name.
#[test]
fn a_kernel_only_vulkan_and_dx12_accept_fails_for_metal() {
    let source = "@group(0) @binding(1) var<storage, read_write> out: array<f32>;\n\
                  @compute @workgroup_size(1) fn main() { let x: f64 = 1.0lf; out[0] = f32(x * x); }";
    let module = naga::front::wgsl::parse_str(source).unwrap();
    let info = Validator::new(ValidationFlags::all(), Capabilities::FLOAT64)
        .validate(&module)
        .unwrap();
    spirv("f64", "main", &module, &info, (1, 0));
    dx12("f64", "main", &module, &info, hlsl::ShaderModel::V5_1);
    let refused = std::panic::catch_unwind(|| {
        metal("f64", "main", &module, &info, (2, 0));
    });
    let why = refused.expect_err("Metal has no f64: the MSL translation must fail");
    let why = why.downcast_ref::<String>().expect("a formatted message");
    assert!(
        why.starts_with("f64.wgsl, entry point `main`: MSL"),
        "{why}"
    );
}
