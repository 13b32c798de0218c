//! A range of one axis, on the tape.
//!
//! - `slice_axis`: y = x[…, s..s+len, …];  dx = zeros with dy written at the same range.
//! - `add_into_axis`: y = base + delta placed at s..s+len of `axis` (zeros elsewhere);
//!   dbase = dy, ddelta = dy[…, s..s+len, …]. LoRA on the q or v slice of the fused c_attn adds
//!   its (N, C) output into columns [0, C) or [2C, 3C) of the (N, 3C) projection this way.

use tensor::ops::slice::{slice_axis, write_axis};
use tensor::{Result, Tensor};

use crate::tape::{Tape, Var};

impl Tape {
    /// Positions `start..start + len` of `axis` of x.
    pub fn slice_axis(&self, x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
        let y = slice_axis(&x.value, axis, start, len)?;
        let (shape, device) = (x.shape().to_vec(), x.value.device());
        self.record("slice_axis", y, &[x], 0, move |dy| {
            let dx = Tensor::zeros(&shape, &device)?;
            write_axis(&dx, axis, start, dy, false)?;
            Ok(vec![Some(dx)])
        })
    }

    /// `base` with `delta` added at positions `start..` of `axis`.
    pub fn add_into_axis(&self, base: &Var, axis: usize, start: usize, delta: &Var) -> Result<Var> {
        let y = base.value.copy()?;
        write_axis(&y, axis, start, &delta.value, true)?;
        let (nb, nd) = (base.requires_grad, delta.requires_grad);
        let len = delta.shape()[axis];
        self.record("add_into_axis", y, &[base, delta], 0, move |dy| {
            let dd = if nd {
                Some(slice_axis(dy, axis, start, len)?)
            } else {
                None
            };
            Ok(vec![nb.then(|| dy.clone()), dd])
        })
    }
}
