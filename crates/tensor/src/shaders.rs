//! The registry of WGSL kernels: one constant per file of `shaders/`, compiled into the crate.
//!
//! Grepping this file gives the kernel index. A test checks that every file in `shaders/` is
//! listed here, is used by a launcher, and validates with naga (so syntax errors show without a GPU).

macro_rules! shader {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shaders/",
            $name,
            ".wgsl"
        ))
    };
}

/// `shaders/elementwise.wgsl`, launched from `ops/elementwise.rs`.
pub const ELEMENTWISE: &str = shader!("elementwise");
/// `shaders/matmul.wgsl`, launched from `ops/matmul.rs`.
pub const MATMUL: &str = shader!("matmul");
/// `shaders/gelu.wgsl`, launched from `ops/gelu.rs`.
pub const GELU: &str = shader!("gelu");
/// `shaders/activation.wgsl`, launched from `ops/activation.rs`.
pub const ACTIVATION: &str = shader!("activation");
/// `shaders/softmax.wgsl`, launched from `ops/softmax.rs`.
pub const SOFTMAX: &str = shader!("softmax");
/// `shaders/layernorm.wgsl`, launched from `ops/layernorm.rs`.
pub const LAYERNORM: &str = shader!("layernorm");
/// `shaders/embedding.wgsl`, launched from `ops/embedding.rs`.
pub const EMBEDDING: &str = shader!("embedding");
/// `shaders/cross_entropy.wgsl`, launched from `ops/cross_entropy.rs`.
pub const CROSS_ENTROPY: &str = shader!("cross_entropy");
/// `shaders/cross_entropy_grad.wgsl`, launched from `ops/cross_entropy_grad.rs`.
pub const CROSS_ENTROPY_GRAD: &str = shader!("cross_entropy_grad");
/// `shaders/reduce.wgsl`, launched from `ops/reduce.rs`.
pub const REDUCE: &str = shader!("reduce");
/// `shaders/permute.wgsl`, launched from `ops/permute.rs`.
pub const PERMUTE: &str = shader!("permute");
/// `shaders/adamw.wgsl`, launched from `ops/adamw.rs`.
pub const ADAMW: &str = shader!("adamw");
/// `shaders/dropout.wgsl`, launched from `ops/dropout.rs`.
pub const DROPOUT: &str = shader!("dropout");

/// `shaders/slice.wgsl`, launched from `ops/slice.rs`.
pub const SLICE: &str = shader!("slice");
/// `shaders/sgmv.wgsl`, launched from `ops/sgmv.rs`.
pub const SGMV: &str = shader!("sgmv");

/// Every shader: (file stem, source).
pub const ALL: &[(&str, &str)] = &[
    ("elementwise", ELEMENTWISE),
    ("matmul", MATMUL),
    ("gelu", GELU),
    ("activation", ACTIVATION),
    ("softmax", SOFTMAX),
    ("layernorm", LAYERNORM),
    ("embedding", EMBEDDING),
    ("cross_entropy", CROSS_ENTROPY),
    ("cross_entropy_grad", CROSS_ENTROPY_GRAD),
    ("reduce", REDUCE),
    ("permute", PERMUTE),
    ("adamw", ADAMW),
    ("dropout", DROPOUT),
    ("slice", SLICE),
    ("sgmv", SGMV),
];
