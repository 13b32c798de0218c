//! GELU (tanh form) between two linear layers, fused into the products around it: GPT-2's MLP
//! `y = gelu(x·W1 + b1)·W2 + b2` with no GELU kernel of its own, forward or backward
//! ([`tensor::ops::matmul::matmul_gelu`] has the kernels).
//!
//! With `v = K·(u + A·u³)`, `K = √(2/π) ≈ 0.7978845608`, `A = 0.044715`:
//! ```text
//! gelu(u)  = 0.5·u·(1 + tanh v)
//! gelu'(u) = 0.5·(1 + tanh v) + 0.5·u·(1 − tanh² v)·K·(1 + 3A·u²)
//! ```
//!
//! Forward, [`Tape::linear_gelu`]: one product writes both
//! `u = x·op(W1) + b1` (the pre-activation, saved for the backward) and `g = gelu(u)`. The node
//! it records is u's, a plain product's: `dx = dU·op(W1)ᵀ`, `dW1 = xᵀ·dU`, `db1 = Σ_rows dU`.
//!
//! Backward, [`Tape::gelu_linear`]: `y = g·op(W2) + b2` is recorded with u (not g) as its
//! input, and its rule goes through GELU in the same product:
//! ```text
//! dU  = (dY·op(W2)ᵀ) ⊙ gelu'(u)     one product, gelu'(u) in its epilogue (needs u, W2)
//! dW2 = gᵀ·dY                       (needs g; only when W2 is trainable)
//! db2 = Σ_rows dY
//! ```
//! This is sound because g is not a value of the graph: a [`GeluOut`] is consumed by the one
//! op that reads g, so `dY·op(W2)ᵀ` is all of dG. Where g must feed more than that product (an
//! adapter on the second layer reads g too), [`Tape::gelu_value`] makes g a value whose backward
//! is GELU's own kernel, `dU = dG ⊙ gelu'(u)` over the summed dG; [`Tape::gelu_out`] runs GELU's
//! forward kernel on a u that no product wrote (the first layer had an adapter). Both fallbacks
//! compute what the fused ops compute.

use tensor::ops::gelu::{gelu, gelu_backward};
use tensor::ops::matmul::{MatmulOpts, matmul, matmul_gelu, matmul_gelu_backward};
use tensor::ops::reduce::sum;
use tensor::{Error, Result, Tensor};

use super::matmul::{grad_w, rows2d};
use crate::saved::saved_bytes;
use crate::tape::{Tape, Var, bytes_of};

/// A pre-activation u (a value of the graph) and its GELU g (not one): what
/// [`Tape::linear_gelu`] and [`Tape::gelu_out`] return, consumed by the op that reads g
/// ([`Tape::gelu_linear`], or [`Tape::gelu_value`] to make g a value).
pub struct GeluOut {
    u: Var,
    g: Tensor,
}

impl GeluOut {
    /// The pre-activation u.
    pub fn u(&self) -> &Var {
        &self.u
    }

    /// gelu(u), for reading (the graph knows it only through the op that consumes `self`).
    pub fn g(&self) -> &Tensor {
        &self.g
    }
}

impl Tape {
    /// `u = x·op(w) + b` and `g = gelu(u)` in one product (module doc); `x` not transposed, `w`
    /// 2-D. The backward of u is the product's.
    pub fn linear_gelu(
        &self,
        x: &Var,
        w: &Var,
        bias: Option<&Var>,
        opts: MatmulOpts,
    ) -> Result<GeluOut> {
        let (u, g) = matmul_gelu(&x.value, &w.value, bias.map(|b| &b.value), opts)?;
        let u = self.record_matmul("linear_gelu", u, x, w, bias, opts)?;
        Ok(GeluOut { u, g })
    }

    /// `g = gelu(u)` by GELU's own kernel, for a u that [`Tape::linear_gelu`] did not write.
    pub fn gelu_out(&self, u: Var) -> Result<GeluOut> {
        let g = gelu(&u.value)?;
        Ok(GeluOut { u, g })
    }

    /// g as a value of the graph; its backward is GELU's own, `dU = dG ⊙ gelu'(u)` (needs u),
    /// over whatever dG its readers sum. [`Tape::gelu`] is `gelu_value(gelu_out(x))`.
    pub fn gelu_value(&self, a: GeluOut) -> Result<Var> {
        let GeluOut { u, g } = a;
        let u_saved = self.save_activation(&u.value, &[&u])?;
        self.record("gelu", g, &[&u], u_saved.bytes(), move |dg| {
            Ok(vec![Some(gelu_backward(&u_saved.get()?, dg)?)])
        })
    }

    /// `y = g·op(w) + b` for the GELU `a` (g not transposed: `opts.trans_a` is refused), with
    /// u's gradient through GELU in the same product (module doc).
    pub fn gelu_linear(
        &self,
        a: GeluOut,
        w: &Var,
        bias: Option<&Var>,
        opts: MatmulOpts,
    ) -> Result<Var> {
        if opts.trans_a {
            return Err(Error::Invalid(
                "gelu_linear: expected the activation g (…, M, F) as the left operand without \
                 trans_a, found trans_a set"
                    .into(),
            ));
        }
        let GeluOut { u, g } = a;
        let y = matmul(&g, &w.value, bias.map(|b| &b.value), opts)?;
        // dU needs u and W; dW needs g.
        let du_needs = match u.requires_grad {
            true => Some((self.save_activation(&u.value, &[&u])?, w.value.clone())),
            false => None,
        };
        let g_saved = match w.requires_grad {
            true => Some(self.save_activation(&g, &[w])?),
            false => None,
        };
        let need_db = bias.is_some_and(|b| b.requires_grad);
        let w_shape = w.shape().to_vec();
        let counter = self.matmul_counter();
        let saved = saved_bytes([du_needs.as_ref().map(|(u, _)| u), g_saved.as_ref()])
            + bytes_of([du_needs.as_ref().map(|(_, w)| w)]);
        let mut inputs = vec![&u, w];
        inputs.extend(bias);
        self.record("gelu_linear", y, &inputs, saved, move |dy| {
            let du = match &du_needs {
                Some((u, w)) => {
                    counter.set(counter.get() + 1);
                    // dG = dY·op(W)ᵀ is the product `grad_x` of the plain rule takes.
                    let flags = MatmulOpts {
                        trans_a: false,
                        trans_b: !opts.trans_b,
                    };
                    Some(matmul_gelu_backward(dy, w, &u.get()?, flags)?)
                }
                None => None,
            };
            let dw = match &g_saved {
                Some(g) => {
                    counter.set(counter.get() + 1);
                    Some(grad_w(dy, &g.get()?, opts, &w_shape)?)
                }
                None => None,
            };
            let mut grads = vec![du, dw];
            if need_db {
                grads.push(Some(sum(&rows2d(dy)?, 0)?));
            }
            Ok(grads)
        })
    }
}

#[cfg(test)]
mod tests {
    use tensor::Device;
    use tensor::testing::random;

    use crate::{Grads, Param, Tape};

    use super::*;

    /// x trainable, both weights and biases frozen (LoRA's MLP): the backward is one product
    /// per layer (dU with GELU in its epilogue, then dx), and the tape keeps u and W2 for the
    /// first, W1 for the second, never g.
    #[test]
    fn frozen_weights_cost_one_product_each_and_keep_no_g() {
        let cpu = Device::cpu();
        let (b, t, c, f) = (2, 3, 4, 8);
        let x = Param::trainable("x", random(&[b, t, c], 1, &cpu));
        let frozen =
            |name: &str, shape: &[usize], seed| Param::frozen(name, random(shape, seed, &cpu));
        let (w1, b1) = (frozen("w1", &[c, f], 2), frozen("b1", &[f], 3));
        let (w2, b2) = (frozen("w2", &[f, c], 4), frozen("b2", &[c], 5));
        let tape = Tape::new();
        let xv = tape.param(&x);
        let opts = MatmulOpts::default();
        let pre = tape
            .linear_gelu(&xv, &tape.param(&w1), Some(&tape.param(&b1)), opts)
            .unwrap();
        let y = tape
            .gelu_linear(pre, &tape.param(&w2), Some(&tape.param(&b2)), opts)
            .unwrap();
        assert_eq!(tape.ops(), ["linear_gelu", "gelu_linear"]);
        let (u_bytes, w_bytes) = ((b * t * f * 4) as u64, (c * f * 4) as u64);
        // linear_gelu keeps W1 (for dx); gelu_linear keeps u and W2.
        assert_eq!(tape.saved_memory().live, w_bytes + u_bytes + w_bytes);
        let loss = tape.sum_all(&y).unwrap();
        let mut grads = Grads::new();
        let stats = tape.backward(&loss, &mut grads).unwrap();
        assert_eq!(stats.matmuls, 2, "dU (GELU in its epilogue) and dx only");
        assert_eq!(tape.saved_memory().live, 0);
        assert!(grads.get(x.as_trainable().unwrap().id).is_some());
    }

    #[test]
    fn a_transposed_activation_is_refused() {
        let cpu = Device::cpu();
        let tape = Tape::new();
        let u = tape.constant(random(&[3, 4], 1, &cpu));
        let w = tape.constant(random(&[3, 2], 2, &cpu));
        let flags = MatmulOpts {
            trans_a: true,
            trans_b: false,
        };
        let e = tape
            .gelu_linear(tape.gelu_out(u).unwrap(), &w, None, flags)
            .expect_err("trans_a must be refused")
            .to_string();
        assert!(e.contains("gelu_linear") && e.contains("trans_a"), "{e}");
    }
}
