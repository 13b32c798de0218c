//! Elementwise ops and the bias broadcast.
//!
//! - `add`:      y = a + b         da = dy,       db = dy
//! - `mul`:      y = a ⊙ b         da = dy ⊙ b,   db = dy ⊙ a
//! - `scale`:    y = s·a           da = s·dy
//! - `add_bias`: y = x + b (b: (C) broadcast over rows)   dx = dy,  db = Σ_rows dy

use tensor::Result;
use tensor::ops::elementwise::{add, add_bias, mul, scale};
use tensor::ops::reduce::sum;

use crate::tape::{Tape, Var, bytes_of};

impl Tape {
    /// `a + b`.
    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = add(&a.value, &b.value)?;
        let (na, nb) = (a.requires_grad, b.requires_grad);
        self.record("add", y, &[a, b], 0, move |dy| {
            Ok(vec![na.then(|| dy.clone()), nb.then(|| dy.clone())])
        })
    }

    /// `a ⊙ b`.
    pub fn mul(&self, a: &Var, b: &Var) -> Result<Var> {
        let y = mul(&a.value, &b.value)?;
        let a_saved = b.requires_grad.then(|| a.value.clone());
        let b_saved = a.requires_grad.then(|| b.value.clone());
        let saved = bytes_of([a_saved.as_ref(), b_saved.as_ref()]);
        self.record("mul", y, &[a, b], saved, move |dy| {
            let da = b_saved.as_ref().map(|b| mul(dy, b)).transpose()?;
            let db = a_saved.as_ref().map(|a| mul(dy, a)).transpose()?;
            Ok(vec![da, db])
        })
    }

    /// `s · a`.
    pub fn scale(&self, a: &Var, s: f32) -> Result<Var> {
        let y = scale(&a.value, s)?;
        self.record("scale", y, &[a], 0, move |dy| Ok(vec![Some(scale(dy, s)?)]))
    }

    /// `x + b`, b: (C) broadcast over the rows of x: (…, C).
    pub fn add_bias(&self, x: &Var, b: &Var) -> Result<Var> {
        let y = add_bias(&x.value, &b.value)?;
        let (nx, nb) = (x.requires_grad, b.requires_grad);
        self.record("add_bias", y, &[x, b], 0, move |dy| {
            let c = dy.last_dim();
            let db = if nb {
                Some(sum(&dy.reshape(&[dy.numel() / c, c])?, 0)?)
            } else {
                None
            };
            Ok(vec![nx.then(|| dy.clone()), db])
        })
    }

    /// The same value seen with another shape.
    pub fn reshape(&self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = x.value.reshape(shape)?;
        let back = x.shape().to_vec();
        self.record("reshape", y, &[x], 0, move |dy| {
            Ok(vec![Some(dy.reshape(&back)?)])
        })
    }
}
