//! Product with a frozen weight kept in a compact storage: `y = x·op(W0) [+ b]`, with W0 in NF4
//! (QLoRA's 4-bit base, [`Nf4Tensor`]) or in f16 (`--precision f16`, [`F16Tensor`]).
//!
//! W0 is not a [`Var`]: it is frozen by construction, so it has no gradient, no optimizer state
//! and nothing saved for it. Backward, for dy: (…, M):
//! - `dx = dy·op(W0)ᵀ` — the same stored weight read the other way round (the product with the
//!   flag flipped), never an f32 copy; summed in place into x's pending gradient where the
//!   storage's product can accumulate (f16) and the tape offers it;
//! - `db = Σ_rows dy` when the bias is trainable (QLoRA with `bias="all"`).
//!
//! x: (…, K); `trans_w` false: W0 stored (K, M) (GPT-2's Conv1D), true: stored (M, K).

use tensor::ops::elementwise::{add_bias, axpy};
use tensor::ops::matmul_f16::{F16Tensor, matmul_f16, matmul_f16_accumulate};
use tensor::ops::matmul_nf4::{Nf4Tensor, matmul_nf4};
use tensor::ops::reduce::sum;
use tensor::{Result, Tensor};

use crate::tape::{Tape, Var};

/// A frozen weight in a compact storage, and its products with a 2-D x.
pub trait StoredWeight: Clone + 'static {
    /// The op's name on the tape.
    const OP: &'static str;
    /// `x·op(W) [+ bias]`, x: (rows, K).
    fn product(&self, x: &Tensor, bias: Option<&Tensor>, trans_w: bool) -> Result<Tensor>;
    /// `acc += x·op(W)` in place, acc: (rows, N).
    fn accumulate(&self, acc: &Tensor, x: &Tensor, trans_w: bool) -> Result<()>;
}

impl StoredWeight for Nf4Tensor {
    const OP: &'static str = "matmul_nf4";
    fn product(&self, x: &Tensor, bias: Option<&Tensor>, trans_w: bool) -> Result<Tensor> {
        let y = matmul_nf4(x, self, trans_w)?;
        match bias {
            Some(b) => add_bias(&y, b),
            None => Ok(y),
        }
    }
    /// The NF4 kernel has no accumulating mode: a fresh product added in place.
    fn accumulate(&self, acc: &Tensor, x: &Tensor, trans_w: bool) -> Result<()> {
        axpy(acc, 1.0, &matmul_nf4(x, self, trans_w)?)
    }
}

impl StoredWeight for F16Tensor {
    const OP: &'static str = "matmul_f16";
    fn product(&self, x: &Tensor, bias: Option<&Tensor>, trans_w: bool) -> Result<Tensor> {
        matmul_f16(x, self, bias, trans_w)
    }
    /// The product's accumulating mode: one pass over acc.
    fn accumulate(&self, acc: &Tensor, x: &Tensor, trans_w: bool) -> Result<()> {
        matmul_f16_accumulate(acc, x, self, trans_w)
    }
}

/// (…, R, C) → (∏…·R, C).
fn rows2d(t: &Tensor) -> Result<Tensor> {
    let c = t.last_dim();
    t.reshape(&[t.numel() / c.max(1), c])
}

impl Tape {
    /// `y = x·op(W0) + b` with W0 frozen in a compact storage; see the module doc.
    pub fn matmul_stored<W: StoredWeight>(
        &self,
        x: &Var,
        w: &W,
        bias: Option<&Var>,
        trans_w: bool,
    ) -> Result<Var> {
        let rows = rows2d(&x.value)?;
        let y2 = w.product(&rows, bias.map(|b| &b.value), trans_w)?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("x has at least one axis") = y2.last_dim();
        let y = y2.reshape(&shape)?;
        let w_saved = x.requires_grad.then(|| w.clone());
        let need_db = bias.is_some_and(|b| b.requires_grad);
        let x_shape = x.shape().to_vec();
        let mut inputs = vec![x];
        inputs.extend(bias);
        // Nothing of the activations is saved; W0 is held by the model anyway.
        self.record_accumulating(W::OP, y, &inputs, 0, move |dy, pending| {
            let dy2 = rows2d(dy)?;
            let dx = match &w_saved {
                Some(w) => match pending.take(0) {
                    Some(acc) => {
                        w.accumulate(&rows2d(&acc)?, &dy2, !trans_w)?;
                        Some(acc)
                    }
                    None => Some(w.product(&dy2, None, !trans_w)?.reshape(&x_shape)?),
                },
                None => None,
            };
            let mut grads = vec![dx];
            if need_db {
                grads.push(Some(sum(&dy2, 0)?));
            }
            Ok(grads)
        })
    }

    /// [`Tape::matmul_stored`] with QLoRA's NF4 base.
    pub fn matmul_nf4(
        &self,
        x: &Var,
        w: &Nf4Tensor,
        bias: Option<&Var>,
        trans_w: bool,
    ) -> Result<Var> {
        self.matmul_stored(x, w, bias, trans_w)
    }
}

#[cfg(test)]
mod tests {
    use tensor::ops::matmul::MatmulOpts;
    use tensor::ops::matmul_f16::F16Tensor;
    use tensor::ops::matmul_nf4::Nf4Tensor;
    use tensor::quant::Nf4Weight;
    use tensor::testing::{assert_close, random_vec};
    use tensor::{Device, Tensor};

    use super::StoredWeight;
    use crate::{Grads, Param, Tape};

    /// The stored op against `Tape::matmul` with the stored weight's f32 values (`dense`) as a
    /// frozen Param: the same y, dx and db, and no gradient for the weight in either. x is used
    /// once more after the product (`2·x` summed into the loss), so its gradient is already
    /// pending when the product's backward runs: dx goes through the accumulating path.
    fn same_as_dense<W: StoredWeight>(
        device: &Device,
        w: &W,
        dense: &[f32],
        stored: [usize; 2],
        trans_w: bool,
    ) {
        let (k, m) = if trans_w {
            (stored[1], stored[0])
        } else {
            (stored[0], stored[1])
        };
        let dense = Param::frozen(
            "w",
            Tensor::from_vec(dense.to_vec(), &stored, device).unwrap(),
        );
        let x = Param::trainable(
            "x",
            Tensor::from_vec(random_vec(2 * 3 * k, 4), &[2, 3, k], device).unwrap(),
        );
        let b = Param::trainable(
            "b",
            Tensor::from_vec(random_vec(m, 5), &[m], device).unwrap(),
        );
        let r = Tensor::from_vec(random_vec(2 * 3 * m, 6), &[2, 3, m], device).unwrap();

        let run = |stored_op: bool| {
            let tape = Tape::new();
            let (xv, bv) = (tape.param(&x), tape.param(&b));
            let y = if stored_op {
                tape.matmul_stored(&xv, w, Some(&bv), trans_w).unwrap()
            } else {
                let opts = MatmulOpts {
                    trans_b: trans_w,
                    ..Default::default()
                };
                tape.matmul(&xv, &tape.param(&dense), Some(&bv), opts)
                    .unwrap()
            };
            let twice = tape.scale(&xv, 2.0).unwrap();
            let loss = tape
                .add(
                    &tape
                        .sum_all(&tape.mul(&y, &tape.constant(r.clone())).unwrap())
                        .unwrap(),
                    &tape.sum_all(&twice).unwrap(),
                )
                .unwrap();
            let mut grads = Grads::new();
            tape.backward(&loss, &mut grads).unwrap();
            assert_eq!(
                grads.len(),
                2,
                "x and b only: the frozen weight has no gradient"
            );
            let get = |p: &Param| grads.get(p.as_trainable().unwrap().id).unwrap().clone();
            (y.value.clone(), get(&x), get(&b))
        };
        let (yq, dxq, dbq) = run(true);
        let (yd, dxd, dbd) = run(false);
        assert_eq!(yq.shape(), &[2, 3, m]);
        let what = format!("{} trans_w {trans_w}", W::OP);
        assert_close(&format!("{what}: y"), &yq, &yd, 1e-5, 1e-4);
        assert_close(&format!("{what}: dx"), &dxq, &dxd, 1e-5, 1e-4);
        assert_close(&format!("{what}: db"), &dbq, &dbd, 1e-5, 1e-4);
    }

    fn both_storages(device: &Device) {
        for trans_w in [false, true] {
            let (k, m) = (48, 40);
            let stored = if trans_w { [m, k] } else { [k, m] };
            let values: Vec<f32> = random_vec(k * m, 3).iter().map(|v| v * 0.1).collect();
            let q = Nf4Weight::quantize(&values, &stored, 64, true).unwrap();
            let nf4 = Nf4Tensor::upload(&q, device).unwrap();
            same_as_dense(device, &nf4, &q.dequantize(), stored, trans_w);
            let half = F16Tensor::from_f32("w", &values, &stored, device).unwrap();
            same_as_dense(device, &half, &half.to_f32().unwrap(), stored, trans_w);
        }
    }

    #[test]
    fn same_as_the_dense_product_on_the_cpu() {
        both_storages(&Device::cpu());
    }

    #[test]
    fn same_as_the_dense_product_on_the_gpu() {
        if let Some(gpu) = tensor::testing::gpu() {
            both_storages(&gpu);
        }
    }
}
