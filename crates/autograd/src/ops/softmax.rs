//! Softmax over the last axis, optionally causal.
//!
//! y_i = e^{x_i} / Σ_j e^{x_j};  dx = y ⊙ (dy − Σ_j y_j·dy_j)  (needs y, nothing else)

use tensor::Result;
use tensor::ops::softmax::{softmax, softmax_backward};

use crate::tape::{Tape, Var};

impl Tape {
    /// Softmax over the last axis; `causal` masks column c > row r (+ columns − rows).
    pub fn softmax(&self, x: &Var, causal: bool) -> Result<Var> {
        let y = softmax(&x.value, causal)?;
        let y_saved = y.clone();
        self.record("softmax", y.clone(), &[x], y.bytes(), move |dy| {
            Ok(vec![Some(softmax_backward(&y_saved, dy)?)])
        })
    }
}
