//! The ops, one file per kernel family: the math in the doc comment, the CPU path, the
//! wgpu launcher and the tests side by side (the CPU path against the f64 loops of
//! [`reference`](crate::reference), the GPU against the CPU).

pub mod activation;
pub mod adamw;
pub mod attention;
mod attention_cpu;
pub mod cross_entropy;
pub mod cross_entropy_fused;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod grad_norm;
pub mod half_tensor;
pub mod layernorm;
pub mod matmul;
pub mod matmul_coop;
pub mod matmul_f16;
pub mod matmul_nf4;
pub mod matmul_tiled;
pub mod matmul_tune;
pub mod permute;
pub mod reduce;
pub mod sgmv;
pub mod slice;
pub mod softmax;
mod weight_panels;
