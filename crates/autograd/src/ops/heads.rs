//! Attention-head permutes: split the columns of a (B, T, W) activation into heads
//! (B, NH, T, hs), and merge them back.
//!
//! They are each other's backward: d(split)/dx writes dy back into the same columns
//! (`merge_heads_into` on a zero (B, T, W) tensor), and d(merge)/dx = split(dy).

use tensor::ops::permute::{merge_heads, merge_heads_into, split_heads};
use tensor::{Result, Tensor};

use crate::tape::{Tape, Var};

impl Tape {
    /// Columns [col0, col0 + c) of x: (B, T, W) as heads (B, NH, T, c/NH).
    pub fn split_heads(&self, x: &Var, nh: usize, col0: usize, c: usize) -> Result<Var> {
        let y = split_heads(&x.value, nh, col0, c)?;
        let shape = x.shape().to_vec();
        let device = x.value.device();
        self.record("split_heads", y, &[x], 0, move |dy| {
            let dx = Tensor::zeros(&shape, &device)?;
            merge_heads_into(&dx, col0, dy)?;
            Ok(vec![Some(dx)])
        })
    }

    /// Heads (B, NH, T, hs) back to (B, T, NH·hs).
    pub fn merge_heads(&self, x: &Var) -> Result<Var> {
        let y = merge_heads(&x.value)?;
        let nh = x.shape()[1];
        self.record("merge_heads", y, &[x], 0, move |dy| {
            let c = dy.last_dim();
            Ok(vec![Some(split_heads(dy, nh, 0, c)?)])
        })
    }
}
