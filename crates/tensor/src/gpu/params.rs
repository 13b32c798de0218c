//! The uniform `Params` struct each launcher hands its kernel, declared once through
//! [`kernel_params!`](crate::gpu::kernel_params) so that a unit test can set its Rust layout
//! beside the one naga reports for the WGSL struct of the same name.
//!
//! The two are mirrored by hand (WGSL has no way to import a Rust type); the test makes a
//! mismatch (a field missing, reordered, of the wrong type, or padding that does not reach the
//! struct's size) a test failure instead of kernels reading the wrong numbers.

/// Declares a launcher's `Params` (`#[repr(C)]`, `Pod`) and, in tests, `params_layout()`,
/// its layout as [`Layout`].
macro_rules! kernel_params {
    (
        $(#[$attr:meta])*
        struct $name:ident {
            $($(#[$fattr:meta])* $field:ident : $ty:ty),* $(,)?
        }
    ) => {
        $(#[$attr])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        struct $name {
            $($(#[$fattr])* $field: $ty),*
        }

        /// The layout of `Params`, for the test against the WGSL struct.
        #[cfg(test)]
        pub(crate) fn params_layout() -> $crate::gpu::params::Layout {
            $crate::gpu::params::Layout {
                size: std::mem::size_of::<$name>(),
                fields: vec![$((
                    stringify!($field).to_string(),
                    std::mem::offset_of!($name, $field),
                    std::any::type_name::<$ty>().to_string(),
                )),*],
            }
        }
    };
}
pub(crate) use kernel_params;

/// A struct's size in bytes and its fields: (name, byte offset, scalar type `u32` / `f32`).
#[cfg(test)]
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub size: usize,
    pub fields: Vec<(String, usize, String)>,
}

#[cfg(test)]
mod tests {
    use super::Layout;
    use crate::ops;

    /// Every launcher's layout, by the shader it feeds.
    fn rust_layouts() -> Vec<(&'static str, Layout)> {
        vec![
            ("activation", ops::activation::params_layout()),
            ("adamw", ops::adamw::params_layout()),
            ("attention", ops::attention::params_layout()),
            ("cross_entropy", ops::cross_entropy::params_layout()),
            (
                "cross_entropy_fused",
                ops::cross_entropy_fused::params_layout(),
            ),
            ("dropout", ops::dropout::params_layout()),
            ("elementwise", ops::elementwise::params_layout()),
            ("embedding", ops::embedding::params_layout()),
            ("gelu", ops::gelu::params_layout()),
            ("grad_norm", ops::grad_norm::params_layout()),
            ("half_tensor", ops::half_tensor::params_layout()),
            ("layernorm", ops::layernorm::params_layout()),
            ("matmul", ops::matmul::params_layout()),
            ("matmul_nf4", ops::matmul_nf4::params_layout()),
            // The cooperative-matrix kernel shares matmul.wgsl's launcher and Params.
            ("matmul_coop", ops::matmul::params_layout()),
            ("matmul_splitk", ops::matmul::splitk::params_layout()),
            // The tiled kernel shares matmul.wgsl's launcher and Params.
            ("matmul_tiled", ops::matmul::params_layout()),
            ("permute", ops::permute::params_layout()),
            ("reduce", ops::reduce::params_layout()),
            ("sgmv", ops::sgmv::params_layout()),
            ("slice", ops::slice::params_layout()),
            ("softmax", ops::softmax::params_layout()),
        ]
    }

    /// The layout naga computes for the struct `Params` of `source`.
    fn wgsl_layout(name: &str, source: &str) -> Layout {
        let module = naga::front::wgsl::parse_str(source)
            .unwrap_or_else(|e| panic!("{name}.wgsl: {}", e.emit_to_string(source)));
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .unwrap_or_else(|| panic!("{name}.wgsl has no struct Params"));
        let naga::TypeInner::Struct { members, span } = &ty.inner else {
            panic!("{name}.wgsl: Params is not a struct");
        };
        let scalar = |m: &naga::StructMember| match module.types[m.ty].inner {
            naga::TypeInner::Scalar(naga::Scalar {
                kind: naga::ScalarKind::Uint,
                width: 4,
            }) => "u32",
            naga::TypeInner::Scalar(naga::Scalar {
                kind: naga::ScalarKind::Float,
                width: 4,
            }) => "f32",
            ref other => panic!("{name}.wgsl: Params member {:?} is {other:?}", m.name),
        };
        Layout {
            size: *span as usize,
            fields: members
                .iter()
                .map(|m| {
                    let field = m.name.clone().unwrap_or_default();
                    (field, m.offset as usize, scalar(m).to_string())
                })
                .collect(),
        }
    }

    #[test]
    fn every_params_struct_has_the_layout_naga_reports_for_its_wgsl_struct() {
        let rust = rust_layouts();
        let mut listed: Vec<&str> = rust.iter().map(|(n, _)| *n).collect();
        let mut shaders: Vec<&str> = crate::shaders::ALL.iter().map(|(n, _)| *n).collect();
        listed.sort();
        shaders.sort();
        assert_eq!(
            listed, shaders,
            "every registered shader has its Rust Params here"
        );
        for (name, layout) in rust {
            let source = crate::shaders::ALL
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1;
            assert_eq!(
                layout,
                wgsl_layout(name, source),
                "{name}: the Rust Params (left) and the WGSL one (right) differ"
            );
        }
    }

    #[test]
    fn a_mismatched_params_struct_is_caught() {
        // The WGSL struct with two members swapped: the comparison must fail.
        let swapped = "struct Params { cols: u32, rows: u32, off_x: u32, off_targets: u32, \
                       off_weights: u32, off_losses: u32, _pad0: u32, _pad1: u32 }\n\
                       @group(0) @binding(0) var<uniform> p: Params;\n\
                       @compute @workgroup_size(1) fn main() { _ = p.rows; }";
        assert_ne!(
            ops::cross_entropy_fused::params_layout(),
            wgsl_layout("swapped", swapped)
        );
        // and an f32 where Rust has u32
        let retyped = "struct Params { rows: f32, cols: u32, off_x: u32, off_targets: u32, \
                       off_weights: u32, off_losses: u32, _pad0: u32, _pad1: u32 }\n\
                       @group(0) @binding(0) var<uniform> p: Params;\n\
                       @compute @workgroup_size(1) fn main() { _ = p.rows; }";
        assert_ne!(
            ops::cross_entropy_fused::params_layout(),
            wgsl_layout("retyped", retyped)
        );
    }
}
