//! Matrix product with optional bias: the op LoRA's savings come from.
//!
//! Forward: `y = op(x)·op(W) + b`, with `op` a transpose when the flag says so; the common case is
//! `y = x·W + b`, x: (…, N, K), W: (K, M) (Conv1D layout), b: (M).
//!
//! Backward, for dy: (…, N, M):
//! - `dx = dy·Wᵀ`        — needs W (saved only if x requires a gradient)
//! - `dW = xᵀ·dy`        — needs x (saved only if W is trainable); summed over the batch
//! - `db = Σ_rows dy`
//!
//! A frozen W therefore costs one matmul in backward instead of two, and no saved x.
//! With transposes, the same rules hold with the flags moved around: `grad_x` and `grad_w`
//! pick them, following the table in [`tensor::ops::matmul`].

use std::cell::Cell;
use std::rc::Rc;

use tensor::ops::matmul::{MatmulOpts, matmul, matmul_accumulate};
use tensor::ops::reduce::sum;
use tensor::{Result, Tensor};

use crate::saved::saved_bytes;
use crate::tape::{Tape, Var, bytes_of};

/// Flatten leading axes: (…, R, C) → (∏…·R, C).
pub(crate) fn rows2d(t: &Tensor) -> Result<Tensor> {
    let c = t.last_dim();
    t.reshape(&[t.numel() / c.max(1), c])
}

/// dx for y = op(x)·op(W):  trans_a = false → dx = dy·op(W)ᵀ;  trans_a = true → dx = op(W)·dyᵀ.
fn grad_x(dy: &Tensor, w: &Tensor, opts: MatmulOpts, x_shape: &[usize]) -> Result<Tensor> {
    let dx = if !opts.trans_a {
        matmul(
            dy,
            w,
            None,
            MatmulOpts {
                trans_a: false,
                trans_b: !opts.trans_b,
            },
        )?
    } else {
        matmul(
            w,
            dy,
            None,
            MatmulOpts {
                trans_a: opts.trans_b,
                trans_b: true,
            },
        )?
    };
    dx.reshape(x_shape)
}

/// `acc += dx` in place, for the sum of x's gradients `acc` (x's shape) taken from the tape:
/// the product's accumulating mode instead of a fresh dx and an addition. Only without
/// `trans_a` (dx = dy·op(W)ᵀ has x's own row layout there).
fn grad_x_into(acc: &Tensor, dy: &Tensor, w: &Tensor, opts: MatmulOpts) -> Result<()> {
    let mut shape = dy.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = acc.last_dim();
    }
    let flags = MatmulOpts {
        trans_a: false,
        trans_b: !opts.trans_b,
    };
    matmul_accumulate(&acc.reshape(&shape)?, dy, w, flags)
}

/// dW for y = op(x)·op(W):  trans_b = false → dW = op(x)ᵀ·dy;  trans_b = true → dW = dyᵀ·op(x).
/// When W is 2-D and shared by a batch, x and dy are flattened so the sum over the batch is
/// part of the product.
pub(crate) fn grad_w(
    dy: &Tensor,
    x: &Tensor,
    opts: MatmulOpts,
    w_shape: &[usize],
) -> Result<Tensor> {
    let (x, dy) = if w_shape.len() == 2 && x.shape().len() > 2 && !opts.trans_a {
        (rows2d(x)?, rows2d(dy)?)
    } else {
        (x.clone(), dy.clone())
    };
    let dw = if !opts.trans_b {
        matmul(
            &x,
            &dy,
            None,
            MatmulOpts {
                trans_a: !opts.trans_a,
                trans_b: false,
            },
        )?
    } else {
        matmul(
            &dy,
            &x,
            None,
            MatmulOpts {
                trans_a: true,
                trans_b: opts.trans_a,
            },
        )?
    };
    dw.reshape(w_shape)
}

impl Tape {
    /// `y = op(x)·op(w) + b` (see the module doc for the backward rule).
    pub fn matmul(&self, x: &Var, w: &Var, bias: Option<&Var>, opts: MatmulOpts) -> Result<Var> {
        let y = matmul(&x.value, &w.value, bias.map(|b| &b.value), opts)?;
        self.record_matmul("matmul", y, x, w, bias, opts)
    }

    /// Record `y = op(x)·op(w) + b`, computed by the caller (the plain product, or one with an
    /// epilogue that also wrote another output: [`Tape::linear_gelu`]), as the op `name` with
    /// the backward rule of the module doc.
    pub(crate) fn record_matmul(
        &self,
        name: &'static str,
        y: Tensor,
        x: &Var,
        w: &Var,
        bias: Option<&Var>,
        opts: MatmulOpts,
    ) -> Result<Var> {
        // Save only what a needed gradient uses: W for dx, x for dW.
        let w_saved = x.requires_grad.then(|| w.value.clone());
        let x_saved = match w.requires_grad {
            true => Some(self.save_activation(&x.value, &[x, w])?),
            false => None,
        };
        let need_db = bias.is_some_and(|b| b.requires_grad);
        let (x_shape, w_shape) = (x.shape().to_vec(), w.shape().to_vec());
        let counter: Rc<Cell<u64>> = self.matmul_counter();
        let saved = bytes_of([w_saved.as_ref()]) + saved_bytes([x_saved.as_ref()]);
        let mut inputs = vec![x, w];
        inputs.extend(bias);
        self.record_accumulating(name, y, &inputs, saved, move |dy, pending| {
            let dx = match &w_saved {
                Some(w) => {
                    counter.set(counter.get() + 1);
                    // x's gradient summed so far (asked only when dx can go into it).
                    match (!opts.trans_a).then(|| pending.take(0)).flatten() {
                        Some(acc) => {
                            grad_x_into(&acc, dy, w, opts)?;
                            Some(acc)
                        }
                        None => Some(grad_x(dy, w, opts, &x_shape)?),
                    }
                }
                None => None,
            };
            let dw = match &x_saved {
                Some(x) => {
                    counter.set(counter.get() + 1);
                    Some(grad_w(dy, &x.get()?, opts, &w_shape)?)
                }
                None => None,
            };
            // The tape pairs grads with inputs in order; a missing bias grad is simply absent.
            let mut grads = vec![dx, dw];
            if need_db {
                grads.push(Some(sum(&rows2d(dy)?, 0)?));
            }
            Ok(grads)
        })
    }
}
