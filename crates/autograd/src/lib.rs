//! # autograd: reverse-mode differentiation where frozen weights cost nothing
//!
//! The second layer. Ops on [`Var`]s run the tensor kernels forward and append a node to a
//! [`Tape`]; [`Tape::backward`] walks the nodes in reverse and accumulates the gradients of
//! trainable parameters into [`Grads`]. This is where LoRA's promise is kept:
//!
//! - a [`Param`] is `Frozen` or `Trainable`, in the types; only trainables have an id, and only
//!   ids get gradient buffers ([`Grads`]) and optimizer state ([`AdamW`]);
//! - an op records a node only if an input needs a gradient, and saves only the tensors the
//!   needed gradients use: `x·W0` with W0 frozen saves W0 (for dx) but not x (which only dW0
//!   needs), and its backward launches one matmul, not two;
//! - where a value feeds several ops (the residual stream, LoRA's input), the later rules add
//!   their gradient into the sum already pending ([`Pending`]) with the product's or the layer
//!   norm's own accumulating mode, so summing gradients costs no kernel of its own;
//! - what a rule keeps of a forward activation is a [`Saved`]: on a tape told to
//!   ([`Tape::save_activations_in_f16`], `--precision f16`) it is rounded to f16 and held at half
//!   its bytes until backward widens it ([`saved`]).
//!
//! Reading order: [`param`], [`tape`] (the backward loop fits on one screen), [`saved`], then `ops/*`
//! (each op's forward and backward side by side, the math in the doc comment), [`optim`].
//!
//! ```
//! use autograd::{Grads, Param, Tape};
//! use tensor::{Device, Tensor};
//! let cpu = Device::cpu();
//! let w = Param::trainable("w", Tensor::from_vec(vec![3.0], &[1], &cpu).unwrap());
//! let tape = Tape::new();
//! let x = tape.param(&w);
//! let y = tape.mul(&x, &x).unwrap(); // y = w², dy/dw = 2w = 6
//! let mut grads = Grads::new();
//! tape.backward(&y, &mut grads).unwrap();
//! let id = w.as_trainable().unwrap().id;
//! assert_eq!(grads.get(id).unwrap().to_vec().unwrap(), vec![6.0]);
//! ```

pub mod arena;
pub mod clip;
pub mod grads;
pub mod memory;
pub mod ops;
pub mod optim;
pub mod param;
pub mod saved;
pub mod tape;

pub use clip::{ClipReport, GradClip, grad_norm_clip};
pub use grads::Grads;
pub use memory::{Counter, MemoryReport};
pub use ops::gelu_linear::GeluOut;
pub use optim::{AdamW, ParamGroup, Schedule, Sgd, clip_grad_norm};
pub use param::{Param, ParamId, Trainable};
pub use saved::Saved;
pub use tape::{BackwardStats, Pending, Tape, Var};
