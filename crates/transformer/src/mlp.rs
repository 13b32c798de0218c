//! The MLP of a [`Block`]: `act(x·c_fc.W + c_fc.b)·mlp.c_proj.W + mlp.c_proj.b`,
//! (B,T,C) → (B,T,F) → (B,T,C).
//!
//! With GPT-2's activation, GELU in its tanh form, the activation is fused into the products
//! around it wherever that is sound ([`autograd::ops::gelu_linear`] has the math):
//! - forward: c_fc's product writes u and g = gelu(u) in one pass ([`Tape::linear_gelu`]) when
//!   c_fc is a dense weight without an adapter. An adapter (LoRA on `mlp.c_fc`) adds its term
//!   to u after the product, so GELU's own kernel runs on the sum ([`Tape::gelu_out`]).
//! - backward: mlp.c_proj's dx product multiplies by gelu'(u) in its epilogue, giving dU
//!   directly ([`Tape::gelu_linear`]), when mlp.c_proj is a dense weight without an adapter, so
//!   that product is all of dG. An adapter (LoRA on `mlp.c_proj`) reads g too, dG then has two
//!   terms, and GELU's own backward runs on their sum ([`Tape::gelu_value`]).
//!
//! Other activations, and weights stored otherwise (NF4), take the plain ops.

use autograd::{GeluOut, Param, Tape, Var};
use tensor::ops::activation::Activation as Kind;
use tensor::ops::matmul::MatmulOpts;

use crate::error::Result;
use crate::linear::{Linear, Weight};
use crate::model::Block;
use crate::variant::Activation;

impl Block {
    /// The MLP on `x` (B,T,C), the output of ln_2; returns (B,T,C) (module doc).
    pub(crate) fn mlp(&self, tape: &Tape, x: &Var, activation: Activation) -> Result<Var> {
        let kind = match activation {
            Activation::GeluTanh => return self.mlp_gelu(tape, x),
            Activation::GeluErf => Kind::GeluErf,
            Activation::Relu => Kind::Relu,
            Activation::Silu => Kind::Silu,
            Activation::QuickGelu => Kind::QuickGelu,
        };
        let h = self.c_fc.forward(tape, x)?; // (B,T,F)
        let h = tape.activation(kind, &h)?;
        self.mlp_c_proj.forward(tape, &h)
    }

    /// The MLP with GELU (tanh form), fused where the module doc says.
    fn mlp_gelu(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let pre: GeluOut = match product_only(&self.c_fc) {
            Some(w) => {
                let b = tape.param(&self.c_fc.bias);
                tape.linear_gelu(x, &tape.param(w), Some(&b), MatmulOpts::default())?
            }
            None => tape.gelu_out(self.c_fc.forward(tape, x)?)?,
        }; // u, g: (B,T,F)
        match product_only(&self.mlp_c_proj) {
            Some(w) => {
                let b = tape.param(&self.mlp_c_proj.bias);
                Ok(tape.gelu_linear(pre, &tape.param(w), Some(&b), MatmulOpts::default())?)
            }
            None => {
                let g = tape.gelu_value(pre)?;
                self.mlp_c_proj.forward(tape, &g)
            }
        }
    }
}

/// The dense W of a linear layer whose output is `x·W + b` alone (no adapter adds to it), so
/// an epilogue may be fused with its product.
fn product_only(linear: &Linear) -> Option<&Param> {
    match (&linear.weight, &linear.adapter) {
        (Weight::Dense(w), None) => Some(w),
        _ => None,
    }
}
