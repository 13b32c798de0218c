//! The ops, one file per kernel family: the math in the doc comment, the CPU reference, the
//! wgpu launcher and the GPU-versus-CPU tests side by side.

pub mod activation;
pub mod adamw;
pub mod cross_entropy;
pub mod cross_entropy_grad;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod matmul;
pub mod permute;
pub mod reduce;
pub mod sgmv;
pub mod slice;
pub mod softmax;
