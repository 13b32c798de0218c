//! A LoRA update added straight into a column block of a base output, on the tape.
//!
//! Shapes: x (…, in) with N = ∏… rows; A (r, in); B (w, r); y (…, W) the base output (for
//! c_attn, W = 3C and the block is q's `[0, C)` or v's `[2C, 3C)`; for a whole Linear,
//! col0 = 0 and w = W). Forward, in two matrix products and no copy:
//! ```text
//! h = s·(x·Aᵀ)                                   (N, r)   one matmul, α = s
//! out = y;  out[:, col0..col0+w] += h·Bᵀ        (N, W)   one matmul accumulating into the block
//! ```
//! `out` is y's own storage when y is not shared (the usual case: the base matmul's fresh
//! output, moved in); otherwise y is copied first. The scale goes on h, (N, r), rather than on
//! the (N, w) product: the same numbers (s·(x·Aᵀ)·Bᵀ = (s·x·Aᵀ)·Bᵀ), fewer multiplications.
//!
//! Backward, for d = dout (N, W) and its block d_w = d[:, col0..col0+w] (read in place through
//! a strided view, never sliced out):
//! ```text
//! dy = d                         (the base's gradient, passed on unchanged)
//! dB = d_wᵀ·h                    (w, r)   h saved
//! dh = d_w·B,  dp = s·dh         (N, r)   the gradient reaching p = x·Aᵀ; one matmul, α = s
//! dA = dpᵀ·x                     (r, in)  x saved when A is trainable
//! dx = dp·A                      (N, in)  A saved when x needs a gradient
//! ```
//! dx is added straight into x's gradient summed so far when the tape offers it (the other
//! adapter's, or the base product's, see [`Pending`](crate::Pending)): no separate addition.
//! Saved: h (N·r floats), x (already alive as the base's input) and the small A, B: the same
//! as the unfused path (matmul, scale, matmul, add-into) saved.

use tensor::ops::matmul::{
    MatView, MatmulOpts, matmul, matmul_accumulate, matmul_into, matmul_scaled, matmul_view,
};
use tensor::{Error, Result, Tensor};

use crate::tape::{Tape, Var, bytes_of};

/// `x·Mᵀ` for a weight M stored (rows, cols), as PEFT stores A and B.
const TRANS_B: MatmulOpts = MatmulOpts {
    trans_a: false,
    trans_b: true,
};

/// (…, C) viewed as (∏…, C), sharing storage.
fn rows2d(t: &Tensor) -> Result<Tensor> {
    let c = t.last_dim();
    t.reshape(&[t.numel().checked_div(c).unwrap_or(0), c])
}

impl Tape {
    /// `y` with `s·(x·Aᵀ)·Bᵀ` added into its columns `col0..col0 + w` (see the module doc).
    /// x: (…, in), A: (r, in), B: (w, r), y: (…, W) with the leading dims of x. y is taken by
    /// value: its storage becomes the output's when nothing else holds it.
    pub fn lora_into(
        &self,
        y: Var,
        x: &Var,
        a: &Var,
        b: &Var,
        scale: f32,
        col0: usize,
    ) -> Result<Var> {
        let op = "lora_into";
        let (&[r, n_in], &[w, _]) = (a.shape(), b.shape()) else {
            return Err(Error::Shape {
                op,
                expected: "A (r, in) and B (w, r), 2-D".into(),
                found: format!("A {:?}, B {:?}", a.shape(), b.shape()),
            });
        };
        let lead = &x.shape()[..x.shape().len().saturating_sub(1)];
        let y_lead = &y.shape()[..y.shape().len().saturating_sub(1)];
        if x.value.last_dim() != n_in || b.shape() != [w, r] || lead != y_lead {
            return Err(Error::Shape {
                op,
                expected: format!(
                    "x (…, {n_in}) and y with x's leading dims, A (r, in) = {:?}, B (w, r)",
                    a.shape()
                ),
                found: format!("x {:?}, B {:?}, y {:?}", x.shape(), b.shape(), y.shape()),
            });
        }
        if col0 + w > y.value.last_dim() {
            return Err(Error::Shape {
                op,
                expected: format!("y with at least col0 + w = {col0} + {w} columns"),
                found: format!("{:?}", y.shape()),
            });
        }
        let h = rows2d(&matmul_scaled(&x.value, &a.value, None, TRANS_B, scale)?)?;
        let out = if y.value.is_exclusive() {
            y.value.clone()
        } else {
            y.value.copy()?
        };
        let out2d = rows2d(&out)?;
        matmul_into(
            MatView::cols(&out2d, col0, w),
            MatView::all(&h),
            MatView::all(&b.value),
            TRANS_B,
            1.0,
            true,
        )?;
        drop(out2d);
        let (ny, nx, na, nb) = (
            y.requires_grad,
            x.requires_grad,
            a.requires_grad,
            b.requires_grad,
        );
        let need_dp = nx || na;
        let x_saved = na.then(|| x.value.clone());
        let a_saved = nx.then(|| a.value.clone());
        let b_saved = need_dp.then(|| b.value.clone());
        let h_saved = nb.then_some(h);
        let saved = bytes_of([
            x_saved.as_ref(),
            a_saved.as_ref(),
            b_saved.as_ref(),
            h_saved.as_ref(),
        ]);
        let x_shape = x.shape().to_vec();
        let counter = self.matmul_counter();
        self.record_accumulating(op, out, &[&y, x, a, b], saved, move |d, pending| {
            let d2 = rows2d(d)?;
            let dw = MatView::cols(&d2, col0, w);
            let trans_a = MatmulOpts {
                trans_a: true,
                trans_b: false,
            };
            let bump = || counter.set(counter.get() + 1);
            let db = match &h_saved {
                Some(h) => {
                    bump();
                    Some(matmul_view(dw, MatView::all(h), trans_a, 1.0)?)
                }
                None => None,
            };
            let dp = match &b_saved {
                Some(bv) => {
                    bump();
                    Some(matmul_view(
                        dw,
                        MatView::all(bv),
                        MatmulOpts::default(),
                        scale,
                    )?)
                }
                None => None,
            };
            let da = match (&dp, &x_saved) {
                (Some(dp), Some(xv)) => {
                    bump();
                    Some(matmul(dp, &rows2d(xv)?, None, trans_a)?)
                }
                _ => None,
            };
            let dx = match (&dp, &a_saved) {
                (Some(dp), Some(av)) => {
                    bump();
                    // Into x's gradient summed so far (the other adapter's, the base's) when
                    // the tape offers it; a fresh one otherwise.
                    match pending.take(1) {
                        Some(acc) => {
                            let plain = MatmulOpts::default();
                            matmul_accumulate(&rows2d(&acc)?, dp, av, plain)?;
                            Some(acc)
                        }
                        None => {
                            Some(matmul(dp, av, None, MatmulOpts::default())?.reshape(&x_shape)?)
                        }
                    }
                }
                _ => None,
            };
            Ok(vec![ny.then(|| d.clone()), dx, da, db])
        })
    }
}

#[cfg(test)]
mod tests {
    use tensor::{Device, Tensor};

    use crate::Tape;

    #[test]
    fn a_shared_y_is_copied_not_written() {
        let cpu = Device::cpu();
        let tape = Tape::new();
        let t = |v: Vec<f32>, s: &[usize]| tape.constant(Tensor::from_vec(v, s, &cpu).unwrap());
        let y0 = t(vec![1.0; 6], &[2, 3]);
        let (x, a, b) = (
            t(vec![1.0, 2.0], &[2, 1]),
            t(vec![3.0], &[1, 1]),
            t(vec![0.5], &[1, 1]),
        );
        // y0 is still held here, so the op must work on a copy: out[i, 1] = 1 + 2·(3·x_i)·0.5.
        let out = tape.lora_into(y0.clone(), &x, &a, &b, 2.0, 1).unwrap();
        assert_eq!(y0.value.to_vec().unwrap(), vec![1.0; 6]);
        assert_eq!(out.value.to_vec().unwrap(), [1.0, 4.0, 1.0, 1.0, 7.0, 1.0]);
        // A y nothing else holds is written in place: the same numbers.
        let fresh = t(vec![1.0; 6], &[2, 3]);
        let out = tape.lora_into(fresh, &x, &a, &b, 2.0, 1).unwrap();
        assert_eq!(out.value.to_vec().unwrap(), [1.0, 4.0, 1.0, 1.0, 7.0, 1.0]);
        // Columns past y's width are an error naming them.
        let e = tape
            .lora_into(y0, &x, &a, &b, 2.0, 3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("col0 + w = 3 + 1") && e.contains("[2, 3]"),
            "{e}"
        );
    }
}
