//! DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") as PEFT computes it,
//! for inference, merging and training: the adapted weight is split into a direction and a magnitude m
//! (one value per output column), and the LoRA update moves the direction only.
//!
//! In this crate's layout (W: (in, out), columns are outputs):
//! ```text
//! n_j = ‖(W0 + ΔW)[:, j]‖₂          ΔW = s·Aᵀ·Bᵀ   (the norm of each output column)
//! f_j = m_j / n_j                   (PEFT detaches n: a constant of the forward)
//! y   = f ⊙ (x·W0 + s·(x·Aᵀ)·Bᵀ) + b          (f scales every row's columns)
//! merged: W ← f ⊙ (W0 + ΔW) (columns), b unchanged; unmerged: W0 = W / f − ΔW
//! ```
//! PEFT's forward takes the base output y0 = x·W0 + b and computes
//! `(f − 1)·(y0 − b) + f·s·(x·Aᵀ)·Bᵀ` added to y0, which is the same y.
//!
//! f depends on W0, so it is computed (on the host, in f64) when the adapter is attached or
//! merged, from the weight it is attached to; the forward broadcasts it over the rows with an
//! embedding lookup of row 0 (no new kernel): F = f[[0, 0, …]] has y's shape.
//!
//! **Training** (a trainable m, `train finetune --use-dora`): ΔW changes every step, so each
//! forward computes n = ‖W0 + ΔW‖ per column again (on the device, the column sums read back),
//! as a constant, as PEFT detaches it; f = m ⊙ (1/n) is then a function of m on the tape, and
//! the gradients are dm_j = Σ_rows (dy' ⊙ (y − b + Δy))_j / n_j, and through Δy those of A and
//! B scaled by f. m starts at ‖W0‖ per column, so the model starts at W0.

use std::sync::Mutex;

use autograd::{Param, Tape, Var};
use tensor::Tensor;
use tensor::ops::elementwise::{add, mul, scale};
use tensor::ops::embedding::embedding;
use tensor::ops::reduce::sum;
use tensor::ops::slice::write_axis;

use crate::linear::LoraUpdate;

/// DoRA's magnitude of one adapted Linear, and what its forward needs from the base layer.
#[derive(Debug)]
pub struct Dora {
    /// m: (width), PEFT's `lora_magnitude_vector`.
    pub magnitude: Param,
    /// (f: (1, width), the Linear's bias b: (width), its weight W (in, width)) once prepared.
    state: Mutex<Option<(Tensor, Tensor, Tensor)>>,
}

/// ‖W + ΔW‖₂ of each column of W (in, width), on the host in f64.
pub(crate) fn column_norms(w: &Tensor, dw: Option<&Tensor>) -> tensor::Result<Vec<f64>> {
    let v = match dw {
        Some(dw) => add(w, dw)?,
        None => w.clone(),
    };
    let sq = sum(&mul(&v, &v)?, 0)?.to_vec()?;
    Ok(sq.iter().map(|s| f64::from(*s).sqrt()).collect())
}

/// `rows` copies of the (1, width) row `f`: (rows, width).
fn rows_of(f: &Tensor, rows: usize) -> tensor::Result<Tensor> {
    embedding(f, &vec![0; rows])
}

impl Dora {
    pub fn new(magnitude: Param) -> Dora {
        Dora {
            magnitude,
            state: Mutex::new(None),
        }
    }

    /// f = m / ‖W0 + ΔW‖ per output column, from the unmerged weight `w` (in, width) of the
    /// Linear, and its bias `b` (for the forward).
    pub(crate) fn prepare(&self, w: &Param, b: &Param, lora: &LoraUpdate) -> tensor::Result<()> {
        let (w, device) = (w.value(), w.value().device());
        let (n_in, width) = (w.shape()[0], w.shape()[1]);
        let (w0, dw) = (w.to_vec()?, lora.delta_weight()?.to_vec()?);
        let m = self.magnitude.value().to_vec()?;
        if dw.len() != w0.len() || m.len() != width {
            return Err(tensor::Error::Shape {
                op: "DoRA",
                expected: format!("ΔW of {} values and m of {width}", w0.len()),
                found: format!("W {:?}, ΔW of {}, m of {}", w.shape(), dw.len(), m.len()),
            });
        }
        let mut sq = vec![0.0f64; width];
        for i in 0..n_in {
            for (j, s) in sq.iter_mut().enumerate() {
                let v = w0[i * width + j] as f64 + dw[i * width + j] as f64;
                *s += v * v;
            }
        }
        let f: Vec<f32> = sq
            .iter()
            .zip(&m)
            .map(|(s, &m)| (m as f64 / s.sqrt()) as f32)
            .collect();
        let f = Tensor::from_vec(f, &[1, width], &device)?;
        *self.state.lock().expect("DoRA state") = Some((f, b.value().clone(), w.clone()));
        Ok(())
    }

    fn state(&self) -> tensor::Result<(Tensor, Tensor, Tensor)> {
        self.state
            .lock()
            .expect("DoRA state")
            .clone()
            .ok_or_else(|| {
                tensor::Error::Invalid("DoRA: the adapter was not attached or merged".into())
            })
    }

    /// y' = f ⊙ (y − b + Δy) + b for the base output y = x·W0 + b and the LoRA term Δy.
    pub(crate) fn apply(
        &self,
        tape: &Tape,
        y: &Var,
        delta: &Var,
        lora: &LoraUpdate,
    ) -> tensor::Result<Var> {
        let (f, b, w) = self.state()?;
        let width = f.shape()[1];
        let rows = y.value.numel() / width;
        let neg_b = tape.constant(scale(&b, -1.0)?);
        let direction = tape.add(&tape.add_bias(y, &neg_b)?, delta)?;
        let f_rows = if self.magnitude.is_trainable() {
            // f = m / n with n = ‖W0 + ΔW‖ now, a constant (PEFT detaches it).
            let inv: Vec<f32> = column_norms(&w, Some(&lora.delta_weight()?))?
                .iter()
                .map(|n| (1.0 / n) as f32)
                .collect();
            let inv = tape.constant(Tensor::from_vec(inv, &[1, width], &w.device())?);
            let m = tape.reshape(&tape.param(&self.magnitude), &[1, width])?;
            let f = tape.mul(&m, &inv)?;
            tape.reshape(&tape.embedding(&f, &vec![0; rows])?, y.shape())?
        } else {
            tape.constant(rows_of(&f, rows)?.reshape(y.shape())?)
        };
        let out = tape.mul(&direction, &f_rows)?;
        tape.add_bias(&out, &tape.constant(b))
    }

    /// W ← f ⊙ (W + ΔW), W (in, width) the unmerged weight `prepare` saw.
    pub(crate) fn merge(&self, w: &Tensor, lora: &LoraUpdate) -> tensor::Result<()> {
        let (f, _, _) = self.state()?;
        let merged = mul(&add(w, &lora.delta_weight()?)?, &rows_of(&f, w.shape()[0])?)?;
        write_axis(w, 1, 0, &merged, false)
    }

    /// W ← W / f − ΔW, undoing [`Dora::merge`] with the f it used.
    pub(crate) fn unmerge(&self, w: &Tensor, lora: &LoraUpdate) -> tensor::Result<()> {
        let (f, _, _) = self.state()?;
        let inv: Vec<f32> = f.to_vec()?.iter().map(|v| 1.0 / v).collect();
        let inv = Tensor::from_vec(inv, f.shape(), &w.device())?;
        let direction = mul(w, &rows_of(&inv, w.shape()[0])?)?;
        let w0 = add(&direction, &scale(&lora.delta_weight()?, -1.0)?)?;
        write_axis(w, 1, 0, &w0, false)
    }
}
