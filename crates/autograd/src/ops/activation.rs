//! GELU (tanh form, as GPT-2), the other activations GPT-2 configs name, and dropout; softmax
//! has its own file ([`super::softmax`]).
//!
//! - `activation`: exact GELU (erf), ReLU, SiLU, QuickGELU ([`tensor::ops::activation`]); dx = dy·f′(x) (needs x)
//! - `gelu`:    y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)));  dx = dy·gelu'(x)  (needs x)
//! - `dropout`: y = x·mask/(1−p); dx = dy·mask/(1−p), the mask recomputed from the seed (nothing saved)

use tensor::Result;
use tensor::ops::activation::{Activation, activation, activation_backward};
use tensor::ops::dropout::{dropout, dropout_backward};

use crate::tape::{Tape, Var};

impl Tape {
    /// GELU, tanh form, by its own kernels forward and backward (between two products,
    /// [`Tape::linear_gelu`] and [`Tape::gelu_linear`] fuse it into them instead).
    pub fn gelu(&self, x: &Var) -> Result<Var> {
        self.gelu_value(self.gelu_out(x.clone())?)
    }

    /// Exact GELU, ReLU, SiLU or QuickGELU (`tensor::ops::activation`); dx = dy·f'(x) (needs x).
    pub fn activation(&self, kind: Activation, x: &Var) -> Result<Var> {
        let y = activation(kind, &x.value)?;
        let x_saved = self.save_activation(&x.value, &[x])?;
        self.record("activation", y, &[x], x_saved.bytes(), move |dy| {
            Ok(vec![Some(activation_backward(kind, &x_saved.get()?, dy)?)])
        })
    }

    /// Dropout with probability `p` from `seed` (identity when p = 0 or the tape does not record).
    pub fn dropout(&self, x: &Var, p: f32, seed: u64) -> Result<Var> {
        if p == 0.0 || !self.is_recording() {
            return Ok(x.clone());
        }
        let y = dropout(&x.value, p, seed)?;
        self.record("dropout", y, &[x], 0, move |dy| {
            Ok(vec![Some(dropout_backward(dy, p, seed)?)])
        })
    }
}
