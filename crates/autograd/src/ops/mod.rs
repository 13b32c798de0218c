//! The differentiable ops, as methods of [`crate::Tape`]: each file holds an op's forward
//! (which records) and its backward rule, with the math in the doc comment.
//!
//! | op | file |
//! |---|---|
//! | matmul (+ bias) | [`matmul`] |
//! | matmul with a frozen NF4 or f16 weight | [`matmul_stored`] |
//! | add, mul, scale, add_bias, reshape | [`elementwise`] |
//! | gelu, dropout | [`activation`] |
//! | gelu between two products, fused into them | [`gelu_linear`] |
//! | softmax | [`softmax`] |
//! | fused causal attention | [`attention`] |
//! | layer norm | [`layernorm`] |
//! | LoRA update into a column block | [`lora`] |
//! | embedding, row gather | [`embedding`] |
//! | cross-entropy | [`cross_entropy`] |
//! | head split / merge | [`heads`] |
//! | sum, mean | [`reduce`] |
//! | axis slices | [`slice`](mod@slice) |

pub mod activation;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gelu_linear;
pub mod heads;
pub mod layernorm;
pub mod lora;
pub mod matmul;
pub mod matmul_stored;
pub mod reduce;
pub mod slice;
pub mod softmax;
