//! The registry of WGSL kernels: one constant per file of `shaders/`, compiled into the crate,
//! each preceded by the prelude [`COMMON`] (`shaders/common.wgsl`: the 2-D grid index, the
//! identity of max and the 256-wide workgroup reductions), so those are written once.
//!
//! Grepping this file gives the kernel index. Tests check that every file in `shaders/` is
//! listed here, is used by a launcher, and validates with naga (so syntax errors show without a
//! GPU), and that each launcher's `Params` struct has the layout naga reports for the WGSL one.
//! `tests/shader_portability.rs` translates every entry point of [`ALL`] to SPIR-V, MSL and HLSL
//! with naga, so a kernel that only Vulkan accepts fails on any machine, not on a Mac or Windows.

macro_rules! wgsl_file {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shaders/",
            $name,
            ".wgsl"
        ))
    };
}

/// A kernel file with the prelude before it.
macro_rules! shader {
    ($name:literal) => {
        concat!(wgsl_file!("common"), wgsl_file!($name))
    };
}

/// `shaders/common.wgsl`, the prelude of every kernel below (and not a kernel itself).
pub const COMMON: &str = wgsl_file!("common");

/// `shaders/elementwise.wgsl`, launched from `ops/elementwise.rs`.
pub const ELEMENTWISE: &str = shader!("elementwise");
/// `shaders/matmul.wgsl`, launched from `ops/matmul.rs`.
pub const MATMUL: &str = shader!("matmul");
/// `shaders/matmul_tiled.wgsl`, launched from `ops/matmul.rs` (chosen in `ops/matmul_tiled.rs`).
pub const MATMUL_TILED: &str = shader!("matmul_tiled");
/// `shaders/matmul_splitk.wgsl`, launched from `ops/matmul_splitk.rs` (chosen in
/// `ops/matmul_launch.rs`).
pub const MATMUL_SPLITK: &str = shader!("matmul_splitk");
/// `shaders/matmul_nf4.wgsl`, launched from `ops/matmul_nf4.rs`.
pub const MATMUL_NF4: &str = shader!("matmul_nf4");
/// `shaders/gelu.wgsl`, launched from `ops/gelu.rs`.
pub const GELU: &str = shader!("gelu");
/// `shaders/half_tensor.wgsl`, launched from `ops/half_tensor.rs`.
pub const HALF_TENSOR: &str = shader!("half_tensor");
/// `shaders/activation.wgsl`, launched from `ops/activation.rs`.
pub const ACTIVATION: &str = shader!("activation");
/// `shaders/attention.wgsl`, launched from `ops/attention.rs`.
pub const ATTENTION: &str = shader!("attention");
/// `shaders/softmax.wgsl`, launched from `ops/softmax.rs`.
pub const SOFTMAX: &str = shader!("softmax");
/// `shaders/layernorm.wgsl`, launched from `ops/layernorm.rs`.
pub const LAYERNORM: &str = shader!("layernorm");
/// `shaders/embedding.wgsl`, launched from `ops/embedding.rs`.
pub const EMBEDDING: &str = shader!("embedding");
/// `shaders/cross_entropy.wgsl`, launched from `ops/cross_entropy.rs`.
pub const CROSS_ENTROPY: &str = shader!("cross_entropy");
/// `shaders/cross_entropy_fused.wgsl`, launched from `ops/cross_entropy_fused.rs`.
pub const CROSS_ENTROPY_FUSED: &str = shader!("cross_entropy_fused");
/// `shaders/reduce.wgsl`, launched from `ops/reduce.rs`.
pub const REDUCE: &str = shader!("reduce");
/// `shaders/permute.wgsl`, launched from `ops/permute.rs`.
pub const PERMUTE: &str = shader!("permute");
/// `shaders/adamw.wgsl`, launched from `ops/adamw.rs`.
pub const ADAMW: &str = shader!("adamw");
/// `shaders/grad_norm.wgsl`, launched from `ops/grad_norm.rs`.
pub const GRAD_NORM: &str = shader!("grad_norm");
/// `shaders/dropout.wgsl`, launched from `ops/dropout.rs`.
pub const DROPOUT: &str = shader!("dropout");

/// `shaders/matmul_coop.wgsl` in its f32 8×8 configuration (the `enable` directive, the
/// prelude, then the configuration's header: `ops/matmul_coop.rs` explains both), launched
/// from `ops/matmul_coop.rs`. Not a module every adapter takes: only one whose device has the
/// cooperative-matrix feature and that configuration.
pub const MATMUL_COOP: &str = concat!(
    "enable wgpu_cooperative_matrix;\n",
    wgsl_file!("common"),
    "// Configuration: f32 operands, 8×8 fragments, f32 sums.\n",
    "alias Stage = f32;\n",
    "alias FragA = coop_mat8x8<f32, A>;\n",
    "alias FragB = coop_mat8x8<f32, B>;\n",
    "alias FragC = coop_mat8x8<f32, C>;\n",
    "const FRAG: u32 = 8u;\n",
    wgsl_file!("matmul_coop")
);
/// `shaders/matmul_coop.wgsl` in its f16 16×16 configuration (f16 operands, f32 sums; needs
/// `shader-f16` too): the same file as [`MATMUL_COOP`] behind another header.
pub const MATMUL_COOP_F16: &str = concat!(
    "enable f16;\nenable wgpu_cooperative_matrix;\n",
    wgsl_file!("common"),
    "// Configuration: f16 operands, 16×16 fragments, f32 sums.\n",
    "alias Stage = f16;\n",
    "alias FragA = coop_mat16x16<f16, A>;\n",
    "alias FragB = coop_mat16x16<f16, B>;\n",
    "alias FragC = coop_mat16x16<f32, C>;\n",
    "const FRAG: u32 = 16u;\n",
    wgsl_file!("matmul_coop")
);

/// `shaders/matmul_coop.wgsl` in its f16 8×8 configuration (f16 operands, f32 sums; needs
/// `shader-f16` too), for adapters whose matrix units take 8×8 f16 fragments only.
pub const MATMUL_COOP_F16_8: &str = concat!(
    "enable f16;\nenable wgpu_cooperative_matrix;\n",
    wgsl_file!("common"),
    "// Configuration: f16 operands, 8×8 fragments, f32 sums.\n",
    "alias Stage = f16;\n",
    "alias FragA = coop_mat8x8<f16, A>;\n",
    "alias FragB = coop_mat8x8<f16, B>;\n",
    "alias FragC = coop_mat8x8<f32, C>;\n",
    "const FRAG: u32 = 8u;\n",
    wgsl_file!("matmul_coop")
);

/// `shaders/slice.wgsl`, launched from `ops/slice.rs`.
pub const SLICE: &str = shader!("slice");
/// `shaders/sgmv.wgsl`, launched from `ops/sgmv.rs`.
pub const SGMV: &str = shader!("sgmv");

/// Pipeline-overridable constants of `matmul.wgsl`, one table per pipeline the engine makes:
/// B stored as f32, or as f16 pairs in u32 words (`B_F16`, a frozen weight at half the bytes).
pub const MATMUL_VARIANTS: [Constants; 2] = [&[("B_F16", 0.0)], &[("B_F16", 1.0)]];

/// Pipeline-overridable constants of `matmul_tiled.wgsl`, one table per pipeline the engine
/// makes: its transpose cases NN, NT, TN, TT with B in f32, then the same four with B in f16
/// (1.0 = true).
pub const MATMUL_TILED_VARIANTS: [Constants; 8] = [
    &[("TRANS_A", 0.0), ("TRANS_B", 0.0), ("B_F16", 0.0)],
    &[("TRANS_A", 0.0), ("TRANS_B", 1.0), ("B_F16", 0.0)],
    &[("TRANS_A", 1.0), ("TRANS_B", 0.0), ("B_F16", 0.0)],
    &[("TRANS_A", 1.0), ("TRANS_B", 1.0), ("B_F16", 0.0)],
    &[("TRANS_A", 0.0), ("TRANS_B", 0.0), ("B_F16", 1.0)],
    &[("TRANS_A", 0.0), ("TRANS_B", 1.0), ("B_F16", 1.0)],
    &[("TRANS_A", 1.0), ("TRANS_B", 0.0), ("B_F16", 1.0)],
    &[("TRANS_A", 1.0), ("TRANS_B", 1.0), ("B_F16", 1.0)],
];

/// Pipeline-overridable constants of `matmul_coop.wgsl` (either configuration): B in f32, or
/// in f16.
pub const MATMUL_COOP_VARIANTS: [Constants; 2] = [&[("B_F16", 0.0)], &[("B_F16", 1.0)]];

/// Pipeline-overridable constants of `matmul_splitk.wgsl`'s partial pass: B in f32, or in f16.
pub const MATMUL_SPLITK_VARIANTS: [Constants; 2] = [&[("B_F16", 0.0)], &[("B_F16", 1.0)]];

/// Every set of override constants a pipeline is made with, by shader file stem (a shader not
/// listed is made with its defaults only): what `tests/shader_portability.rs` translates.
pub const OVERRIDES: &[(&str, &[Constants])] = &[
    ("matmul", &MATMUL_VARIANTS),
    ("matmul_tiled", &MATMUL_TILED_VARIANTS),
    ("matmul_splitk", &MATMUL_SPLITK_VARIANTS),
    ("matmul_coop", &MATMUL_COOP_VARIANTS),
    ("matmul_coop_f16", &MATMUL_COOP_VARIANTS),
    ("matmul_coop_f16_8", &MATMUL_COOP_VARIANTS),
];

/// Sources made from a file of [`ALL`] behind another header (a second configuration of the
/// same kernel), by the name its pipelines are cached under: translated and validated as the
/// files are, but not files of their own.
pub const CONFIGURED: &[(&str, &str)] = &[
    ("matmul_coop_f16", MATMUL_COOP_F16),
    ("matmul_coop_f16_8", MATMUL_COOP_F16_8),
];

/// One table of pipeline-overridable constants: (WGSL `override` name, value).
pub type Constants = &'static [(&'static str, f64)];

/// Shaders whose modules are made without wgpu's runtime bounds clamps on storage indices
/// (`ShaderRuntimeChecks::bounds_checks` off; every other check stays). Each reads and writes
/// only inside the ranges its launcher binds, which the launcher guarantees before dispatching:
/// `matmul_tiled.wgsl` tests every row and vec4 against M, N, K, and `ops/matmul_tiled.rs`
/// takes it only when each bound range ends on a whole vec4 of its operand.
pub const UNCHECKED: &[&str] = &["matmul_tiled"];

/// Every shader: (file stem, source).
pub const ALL: &[(&str, &str)] = &[
    ("elementwise", ELEMENTWISE),
    ("matmul", MATMUL),
    ("matmul_tiled", MATMUL_TILED),
    ("matmul_splitk", MATMUL_SPLITK),
    ("matmul_nf4", MATMUL_NF4),
    ("matmul_coop", MATMUL_COOP),
    ("gelu", GELU),
    ("half_tensor", HALF_TENSOR),
    ("activation", ACTIVATION),
    ("softmax", SOFTMAX),
    ("attention", ATTENTION),
    ("layernorm", LAYERNORM),
    ("embedding", EMBEDDING),
    ("cross_entropy", CROSS_ENTROPY),
    ("cross_entropy_fused", CROSS_ENTROPY_FUSED),
    ("reduce", REDUCE),
    ("permute", PERMUTE),
    ("adamw", ADAMW),
    ("grad_norm", GRAD_NORM),
    ("dropout", DROPOUT),
    ("slice", SLICE),
    ("sgmv", SGMV),
];
