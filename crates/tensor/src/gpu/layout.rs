//! A kernel's bindings, read from its WGSL by naga, and the checks a dispatch's bindings must
//! pass before they are recorded.
//!
//! wgpu can derive a pipeline's bind group layout from the shader (`layout: None`), but a
//! derived layout cannot have a dynamic offset, and every bind group made against it must be
//! checked by wgpu inside an error scope. Instead each kernel gets an explicit layout built
//! from the same facts wgpu would derive, for the bindings its entry point uses:
//! - binding 0 is the uniform `Params` struct, bound once for all kernels to the parameter
//!   arena with a **dynamic offset** (the dispatch's slot), so one bind group serves every
//!   dispatch with the same storage buffers whatever its parameters;
//! - every other binding is a storage buffer, read-only or read-write as the WGSL declares it,
//!   with the minimum size wgpu would demand (the struct, or one element of a runtime array).
//!
//! [`KernelLayout::check`] then does what the error scope around `create_bind_group` did:
//! each binding of the kernel is given exactly once, starts at an aligned offset, lies inside
//! its buffer, is no larger than one binding may be and no smaller than the shader reads. A
//! bad dispatch is an error of its own call, and no error scope is pushed per dispatch.

use crate::gpu::Binding;

/// One `@binding` of group 0 that an entry point uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    pub binding: u32,
    pub kind: Kind,
    /// The fewest bytes the shader reads: the type's size (one element of a runtime array).
    pub min_size: u64,
}

/// What a binding holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `var<uniform>`: the kernel's `Params` (binding 0 only).
    Params,
    /// `var<storage, read>` (`read_only`) or `var<storage, read_write>`.
    Storage { read_only: bool },
}

/// The bindings of one entry point: `Params` at binding 0, then the storage bindings it uses
/// in binding order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KernelLayout {
    pub params_size: u64,
    pub storage: Vec<Slot>,
}

/// What a dispatch's storage bindings must respect on this device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BindLimits {
    pub offset_alignment: u64,
    pub max_binding: u64,
}

impl KernelLayout {
    /// The layout of `entry` in the WGSL `source`. `Err` names what does not fit this scheme:
    /// no such compute entry point, a binding outside group 0, binding 0 not a uniform, a
    /// uniform elsewhere, a resource that is not a buffer, or a shader naga rejects.
    pub fn of(source: &str, entry: &str) -> Result<Self, String> {
        let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
        let index = module
            .entry_points
            .iter()
            .position(|e| e.name == entry && e.stage == naga::ShaderStage::Compute)
            .ok_or_else(|| format!("expected a compute entry point `{entry}`, found none"))?;
        let uses = info.get_entry_point(index);
        let mut params_size = None;
        let mut storage = Vec::new();
        for (handle, var) in module.global_variables.iter() {
            let Some(at) = var.binding else { continue };
            let name = var.name.as_deref().unwrap_or("?");
            if at.group != 0 {
                return Err(format!(
                    "expected every binding in group 0, found `{name}` in group {}",
                    at.group
                ));
            }
            let size = module.types[var.ty].inner.size(module.to_ctx()) as u64;
            match (var.space, at.binding) {
                (naga::AddressSpace::Uniform, 0) => params_size = Some(size),
                (naga::AddressSpace::Uniform, b) => {
                    return Err(format!(
                        "expected the uniform Params at binding 0 only, found `{name}` at {b}"
                    ));
                }
                (naga::AddressSpace::Storage { access }, b) if b != 0 => {
                    if !uses[handle].is_empty() {
                        storage.push(Slot {
                            binding: b,
                            kind: Kind::Storage {
                                read_only: !access.contains(naga::StorageAccess::STORE),
                            },
                            min_size: size,
                        });
                    }
                }
                (space, b) => {
                    return Err(format!(
                        "expected binding 0 to be the uniform Params and the others storage \
                         buffers, found `{name}` at binding {b} in {space:?}"
                    ));
                }
            }
        }
        let params_size = params_size.ok_or_else(|| {
            "expected the uniform Params at @group(0) @binding(0), found none".to_string()
        })?;
        storage.sort_by_key(|s| s.binding);
        Ok(Self {
            params_size,
            storage,
        })
    }

    /// Every slot, `Params` first.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        let params = Slot {
            binding: 0,
            kind: Kind::Params,
            min_size: self.params_size,
        };
        std::iter::once(params).chain(self.storage.iter().copied())
    }

    /// The entries of the explicit bind group layout: `Params` with a dynamic offset, the
    /// storage buffers as declared, each with its minimum size.
    pub fn entries(&self) -> Vec<wgpu::BindGroupLayoutEntry> {
        self.slots()
            .map(|s| wgpu::BindGroupLayoutEntry {
                binding: s.binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match s.kind {
                        Kind::Params => wgpu::BufferBindingType::Uniform,
                        Kind::Storage { read_only } => {
                            wgpu::BufferBindingType::Storage { read_only }
                        }
                    },
                    has_dynamic_offset: s.kind == Kind::Params,
                    min_binding_size: wgpu::BufferSize::new(s.min_size),
                },
                count: None,
            })
            .collect()
    }

    /// Check a dispatch's storage bindings, each `(binding number, range)`, against this layout:
    /// every storage slot given exactly once and nothing else; each range at an offset that is a
    /// multiple of `limits.offset_alignment`, of at most `limits.max_binding` bytes and at least
    /// the slot's minimum, inside its buffer (a range's size is rounded up to 4 bytes, as it is
    /// bound). `Err` says which binding and what was expected.
    pub fn check(&self, bindings: &[(u32, Binding<'_>)], limits: BindLimits) -> Result<(), String> {
        self.check_ranges(
            bindings.iter().map(|(binding, b)| Range {
                binding: *binding,
                offset: b.offset,
                size: b.size,
                buffer_size: b.buffer.size(),
                storage_usage: b.buffer.usage().contains(wgpu::BufferUsages::STORAGE),
            }),
            limits,
        )
    }

    /// [`check`](Self::check) on the plain facts of each range.
    fn check_ranges(
        &self,
        ranges: impl ExactSizeIterator<Item = Range> + Clone,
        limits: BindLimits,
    ) -> Result<(), String> {
        if ranges.len() != self.storage.len() {
            return Err(format!(
                "expected {} storage bindings ({}), found {} ({})",
                self.storage.len(),
                numbers(self.storage.iter().map(|s| s.binding)),
                ranges.len(),
                numbers(ranges.map(|r| r.binding)),
            ));
        }
        for (i, range) in ranges.clone().enumerate() {
            let number = range.binding;
            let Some(slot) = self.storage.iter().find(|s| s.binding == number) else {
                return Err(format!(
                    "the kernel has no storage binding {number} (it has {})",
                    numbers(self.storage.iter().map(|s| s.binding))
                ));
            };
            if ranges.clone().take(i).any(|r| r.binding == number) {
                return Err(format!("binding {number} is given twice"));
            }
            check_range(slot, &range, limits)?;
        }
        Ok(())
    }
}

/// What the checks need to know of one bound range.
#[derive(Clone, Copy, Debug)]
struct Range {
    binding: u32,
    offset: u64,
    size: u64,
    buffer_size: u64,
    storage_usage: bool,
}

/// The checks of one range: see [`KernelLayout::check`].
fn check_range(slot: &Slot, range: &Range, limits: BindLimits) -> Result<(), String> {
    let Range {
        binding: b,
        offset,
        size,
        buffer_size,
        storage_usage,
    } = *range;
    let bound = size.div_ceil(4) * 4;
    if !storage_usage {
        return Err(format!(
            "binding {b}: expected a buffer with STORAGE usage, found one without"
        ));
    }
    if !offset.is_multiple_of(limits.offset_alignment) {
        return Err(format!(
            "binding {b}: expected an offset that is a multiple of {} bytes, found {offset}",
            limits.offset_alignment
        ));
    }
    if bound < slot.min_size {
        return Err(format!(
            "binding {b}: expected at least {} bytes (what the shader reads), found {bound}",
            slot.min_size
        ));
    }
    if bound > limits.max_binding {
        return Err(format!(
            "binding {b}: expected at most {} bytes (max_storage_buffer_binding_size), found {bound}",
            limits.max_binding
        ));
    }
    if offset
        .checked_add(bound)
        .is_none_or(|end| end > buffer_size)
    {
        return Err(format!(
            "binding {b}: expected a range inside its buffer of {buffer_size} bytes, found bytes \
             {offset}..{}",
            offset.saturating_add(bound)
        ));
    }
    Ok(())
}

/// `1, 2, 3`, or `none`.
fn numbers(n: impl Iterator<Item = u32>) -> String {
    let list: Vec<String> = n.map(|b| b.to_string()).collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two entry points sharing a module: `a` uses bindings 1 and 3, `b` uses 2 only.
    const TWO: &str = "
        struct Params { n: u32, pad0: u32, pad1: u32, pad2: u32 }
        struct Pair { x: f32, y: f32 }
        @group(0) @binding(0) var<uniform> p: Params;
        @group(0) @binding(1) var<storage, read> src: array<f32>;
        @group(0) @binding(2) var<storage, read_write> pair: Pair;
        @group(0) @binding(3) var<storage, read_write> dst: array<f32>;
        @compute @workgroup_size(64)
        fn a(@builtin(global_invocation_id) id: vec3<u32>) {
            if (id.x < p.n) { dst[id.x] = src[id.x]; }
        }
        @compute @workgroup_size(1)
        fn b() { pair.x = pair.y; }";

    const LIMITS: BindLimits = BindLimits {
        offset_alignment: 256,
        max_binding: 1 << 20,
    };

    #[test]
    fn an_entry_point_gets_params_and_only_the_storage_it_uses() {
        let a = KernelLayout::of(TWO, "a").unwrap();
        assert_eq!(a.params_size, 16);
        assert_eq!(
            a.storage,
            vec![
                Slot {
                    binding: 1,
                    kind: Kind::Storage { read_only: true },
                    min_size: 4,
                },
                Slot {
                    binding: 3,
                    kind: Kind::Storage { read_only: false },
                    min_size: 4,
                },
            ]
        );
        let b = KernelLayout::of(TWO, "b").unwrap();
        assert_eq!(b.params_size, 16, "Params is bound even where unused");
        assert_eq!(
            b.storage,
            vec![Slot {
                binding: 2,
                kind: Kind::Storage { read_only: false },
                min_size: 8,
            }]
        );
        let entries = a.entries();
        assert_eq!(entries.len(), 3);
        assert!(matches!(
            entries[0].ty,
            wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: true,
                ..
            }
        ));
        assert!(matches!(
            entries[2].ty,
            wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: false },
                has_dynamic_offset: false,
                ..
            }
        ));
    }

    #[test]
    fn every_registered_kernel_fits_the_scheme() {
        for (name, source) in crate::shaders::ALL {
            let module = naga::front::wgsl::parse_str(source).unwrap();
            for ep in &module.entry_points {
                let layout = KernelLayout::of(source, &ep.name)
                    .unwrap_or_else(|e| panic!("{name}::{}: {e}", ep.name));
                assert!(
                    layout.params_size <= super::super::PARAM_SLOT,
                    "{name}::{}: Params of {} bytes exceeds one arena slot",
                    ep.name,
                    layout.params_size
                );
            }
        }
    }

    #[test]
    fn what_does_not_fit_the_scheme_is_named() {
        let err = |src: &str, entry: &str| KernelLayout::of(src, entry).unwrap_err();
        assert!(err(TWO, "c").contains("compute entry point `c`"));
        let group1 = "@group(1) @binding(0) var<storage, read> s: array<f32>;
            @compute @workgroup_size(1) fn main() { _ = s[0]; }";
        assert!(err(group1, "main").contains("found `s` in group 1"));
        let no_params = "@group(0) @binding(1) var<storage, read> s: array<f32>;
            @compute @workgroup_size(1) fn main() { _ = s[0]; }";
        assert!(err(no_params, "main").contains("Params at @group(0) @binding(0)"));
        let storage_at_0 = "@group(0) @binding(0) var<storage, read> s: array<f32>;
            @compute @workgroup_size(1) fn main() { _ = s[0]; }";
        assert!(err(storage_at_0, "main").contains("found `s` at binding 0"));
        assert!(!err("fn broken(", "main").is_empty());
    }

    fn slot(min_size: u64) -> Slot {
        Slot {
            binding: 1,
            kind: Kind::Storage { read_only: true },
            min_size,
        }
    }

    fn range(binding: u32, offset: u64, size: u64, buffer_size: u64) -> Range {
        Range {
            binding,
            offset,
            size,
            buffer_size,
            storage_usage: true,
        }
    }

    #[test]
    fn a_range_is_checked_like_wgpu_would() {
        let ok =
            |offset, size, buffer| check_range(&slot(4), &range(1, offset, size, buffer), LIMITS);
        assert!(ok(0, 1024, 1024).is_ok());
        assert!(ok(256, 768, 1024).is_ok());
        assert!(ok(0, 1022, 1024).is_ok(), "sizes round up to 4 bytes");
        assert!(ok(512, 1022, 1536).is_ok());
        let msg = ok(0, 1280, 1024).unwrap_err();
        assert!(
            msg.contains("inside its buffer of 1024 bytes, found bytes 0..1280"),
            "{msg}"
        );
        assert!(ok(768, 512, 1024).unwrap_err().contains("768..1280"));
        assert!(
            ok(u64::MAX - 255, 256, 1024)
                .unwrap_err()
                .contains("inside its buffer")
        );
        assert!(
            ok(100, 4, 1024)
                .unwrap_err()
                .contains("multiple of 256 bytes, found 100")
        );
        assert!(
            ok(0, 2 << 20, 4 << 20)
                .unwrap_err()
                .contains("at most 1048576 bytes")
        );
        let small = check_range(&slot(8), &range(1, 0, 4, 1024), LIMITS).unwrap_err();
        assert!(small.contains("at least 8 bytes"), "{small}");
        let no_storage = Range {
            storage_usage: false,
            ..range(1, 0, 4, 1024)
        };
        let usage = check_range(&slot(4), &no_storage, LIMITS).unwrap_err();
        assert!(usage.contains("STORAGE usage"), "{usage}");
    }

    #[test]
    fn each_storage_binding_is_given_exactly_once() {
        let a = KernelLayout::of(TWO, "a").unwrap();
        let check = |ranges: &[Range]| a.check_ranges(ranges.iter().copied(), LIMITS);
        assert!(check(&[range(1, 0, 64, 256), range(3, 0, 64, 256)]).is_ok());
        assert!(
            check(&[range(3, 0, 64, 256), range(1, 0, 64, 256)]).is_ok(),
            "any order"
        );
        let missing = check(&[range(1, 0, 64, 256)]).unwrap_err();
        assert_eq!(missing, "expected 2 storage bindings (1, 3), found 1 (1)");
        let unknown = check(&[range(1, 0, 64, 256), range(2, 0, 64, 256)]).unwrap_err();
        assert_eq!(unknown, "the kernel has no storage binding 2 (it has 1, 3)");
        let twice = check(&[range(1, 0, 64, 256), range(1, 0, 64, 256)]).unwrap_err();
        assert_eq!(twice, "binding 1 is given twice");
        let outside = check(&[range(1, 0, 64, 256), range(3, 256, 64, 256)]).unwrap_err();
        assert!(
            outside.starts_with("binding 3: expected a range inside"),
            "{outside}"
        );
    }
}
