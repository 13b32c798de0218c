//! Product with a frozen NF4-quantized weight (QLoRA's base): `y = x·op(W0) [+ b]`.
//!
//! W0 is not a [`Var`]: it is frozen by construction, so it has no gradient, no optimizer state
//! and nothing saved for it. Backward, for dy: (…, M):
//! - `dx = dy·op(W0)ᵀ` — the same quantized weight read the other way round
//!   ([`matmul_nf4`] with the flag flipped), never a dequantized f32 copy;
//! - `db = Σ_rows dy` when the bias is trainable (QLoRA with `bias="all"`).
//!
//! x: (…, K); `trans_w` false: W0 stored (K, M) (GPT-2's Conv1D), true: stored (M, K).

use tensor::ops::elementwise::add_bias;
use tensor::ops::matmul_nf4::{Nf4Tensor, matmul_nf4};
use tensor::ops::reduce::sum;
use tensor::{Result, Tensor};

use crate::tape::{Tape, Var};

/// (…, R, C) → (∏…·R, C).
fn rows2d(t: &Tensor) -> Result<Tensor> {
    let c = t.last_dim();
    t.reshape(&[t.numel() / c.max(1), c])
}

impl Tape {
    /// `y = x·op(W0) + b` with W0 quantized and frozen; see the module doc.
    pub fn matmul_nf4(
        &self,
        x: &Var,
        w: &Nf4Tensor,
        bias: Option<&Var>,
        trans_w: bool,
    ) -> Result<Var> {
        let rows = rows2d(&x.value)?;
        let y2 = matmul_nf4(&rows, w, trans_w)?;
        let y2 = match bias {
            Some(b) => add_bias(&y2, &b.value)?,
            None => y2,
        };
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("x has at least one axis") = y2.last_dim();
        let y = y2.reshape(&shape)?;
        let w_saved = x.requires_grad.then(|| w.clone());
        let need_db = bias.is_some_and(|b| b.requires_grad);
        let x_shape = x.shape().to_vec();
        let mut inputs = vec![x];
        inputs.extend(bias);
        // Nothing of the activations is saved; W0's codes are held by the model anyway.
        self.record("matmul_nf4", y, &inputs, 0, move |dy| {
            let dy2 = rows2d(dy)?;
            let dx = match &w_saved {
                Some(w) => Some(matmul_nf4(&dy2, w, !trans_w)?.reshape(&x_shape)?),
                None => None,
            };
            let mut grads = vec![dx];
            if need_db {
                grads.push(Some(sum(&dy2, 0)?));
            }
            Ok(grads)
        })
    }
}

#[cfg(test)]
mod tests {
    use tensor::ops::matmul::MatmulOpts;
    use tensor::ops::matmul_nf4::Nf4Tensor;
    use tensor::quant::Nf4Weight;
    use tensor::testing::{assert_close, random_vec};
    use tensor::{Device, Tensor};

    use crate::{Grads, Param, Tape};

    /// The quantized op against `Tape::matmul` with the dequantized weight as a frozen Param:
    /// the same y, dx and db, and no gradient for the weight in either.
    fn same_as_dense(device: &Device) {
        for trans_w in [false, true] {
            let (k, m) = (48, 40);
            let stored = if trans_w { [m, k] } else { [k, m] };
            let values: Vec<f32> = random_vec(k * m, 3).iter().map(|v| v * 0.1).collect();
            let q = Nf4Weight::quantize(&values, &stored, 64, true).unwrap();
            let w = Nf4Tensor::upload(&q, device).unwrap();
            let dense = Param::frozen(
                "w",
                Tensor::from_vec(q.dequantize(), &stored, device).unwrap(),
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

            let run = |quantized: bool| {
                let tape = Tape::new();
                let (xv, bv) = (tape.param(&x), tape.param(&b));
                let y = if quantized {
                    tape.matmul_nf4(&xv, &w, Some(&bv), trans_w).unwrap()
                } else {
                    let opts = MatmulOpts {
                        trans_b: trans_w,
                        ..Default::default()
                    };
                    tape.matmul(&xv, &tape.param(&dense), Some(&bv), opts)
                        .unwrap()
                };
                let loss = tape
                    .sum_all(&tape.mul(&y, &tape.constant(r.clone())).unwrap())
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
            assert_close("y", &yq, &yd, 1e-5, 1e-4);
            assert_close("dx", &dxq, &dxd, 1e-5, 1e-4);
            assert_close("db", &dbq, &dbd, 1e-5, 1e-4);
        }
    }

    #[test]
    fn same_as_the_dense_product_on_the_cpu() {
        same_as_dense(&Device::cpu());
    }

    #[test]
    fn same_as_the_dense_product_on_the_gpu() {
        if let Some(gpu) = tensor::testing::gpu() {
            same_as_dense(&gpu);
        }
    }
}
