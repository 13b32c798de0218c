//! The ops, one file per kernel family: the math in the doc comment, the CPU reference, the
//! wgpu launcher and the GPU-versus-CPU tests side by side.

pub mod elementwise;
pub mod matmul;
pub mod gelu;
pub mod softmax;
pub mod layernorm;
pub mod embedding;
pub mod cross_entropy;
pub mod reduce;
pub mod permute;
pub mod adamw;
pub mod dropout;
