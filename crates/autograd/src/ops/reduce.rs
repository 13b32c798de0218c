//! Sums and means.
//!
//! - `sum_all`: y = Σ_i x_i, a (1) tensor; dx = dy broadcast to every element.
//! - `mean_all`: y = Σ_i x_i / n; dx = dy/n broadcast.

use tensor::ops::elementwise::{scale, scale_by};
use tensor::ops::reduce::sum_all;
use tensor::{Result, Tensor};

use crate::tape::{Tape, Var};

impl Tape {
    /// Sum of every element, shape (1).
    pub fn sum_all(&self, x: &Var) -> Result<Var> {
        let y = sum_all(&x.value)?;
        let (shape, device) = (x.shape().to_vec(), x.value.device());
        self.record("sum_all", y, &[x], 0, move |dy| {
            let ones = Tensor::full(&shape, 1.0, &device)?;
            Ok(vec![Some(scale_by(&ones, 1.0, dy)?)])
        })
    }

    /// Mean of every element, shape (1).
    pub fn mean_all(&self, x: &Var) -> Result<Var> {
        let n = x.value.numel() as f32;
        let s = self.sum_all(x)?;
        let y = scale(&s.value, 1.0 / n)?;
        self.record("mean_all", y, &[&s], 0, move |dy| {
            Ok(vec![Some(scale(dy, 1.0 / n)?)])
        })
    }
}
