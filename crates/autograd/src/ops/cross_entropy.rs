//! Mean cross-entropy with per-token weights:
//! `loss = Σ_n w_n·(logsumexp(x_n) − x_n[t_n]) / Σ_n w_n`, x: (N, V) logits.
//!
//! Tokens with w = 0 do not count (the prompt of a fine-tuning example). Saved: the logits and
//! the per-row logsumexp; backward: `dx[n, v] = dloss·w_n/Σw·(softmax(x_n)[v] − [v = t_n])`.
//!
//! [`Tape::linear_cross_entropy`] is the same loss of the logits h·Wᵀ of an output layer, fused so that
//! the (N, V) logits never outlive the forward: with G = ∂(Σ_n w_n·l_n)/∂logits (one pass of
//! [`cross_entropy_fused`], written over the logits), the gradients are dh = G·W and
//! dW = Gᵀ·h, both linear in the upstream dloss, so the forward computes them at once and the
//! backward only scales them by dloss/Σw. What stays saved until the backward is dh (N, C) and,
//! when W is trainable, dW (V, C): for GPT-2's tied 50,257-token head that is a few hundred KB
//! instead of the logits' N·V floats (100 MB for 500 rows).

use tensor::ops::cross_entropy::{cross_entropy, cross_entropy_backward};
use tensor::ops::cross_entropy_fused::cross_entropy_fused;
use tensor::ops::elementwise::{scale, scale_by};
use tensor::ops::matmul::{MatmulOpts, matmul};
use tensor::ops::reduce::sum_all;
use tensor::{Device, Error, Result, Tensor};

use crate::tape::{Tape, Var};

/// 1/Σw, or an error when no token counts.
fn inverse_total(op: &str, weights: &[f32]) -> Result<f32> {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    if total <= 0.0 {
        return Err(Error::Invalid(format!(
            "{op}: the weights of {} tokens sum to {total}; at least one token must count",
            weights.len()
        )));
    }
    Ok((1.0 / total) as f32)
}

/// `g · (k · dloss)` for a (1) upstream gradient `dloss`: folded into one scale on the CPU
/// (where reading dloss is free), applied on the device on the GPU (no host round trip).
fn scale_by_upstream(g: &Tensor, k: f32, dloss: &Tensor) -> Result<Tensor> {
    match dloss.device() {
        Device::Cpu(_) => scale(g, k * dloss.to_vec()?[0]),
        Device::Gpu(_) => scale_by(&scale(g, k)?, dloss),
    }
}

impl Tape {
    /// Weighted mean cross-entropy of the logits `h·Wᵀ` of an output layer, h: (N, C),
    /// W: (V, C); a (1) loss. The logits are never kept (module doc).
    pub fn linear_cross_entropy(
        &self,
        h: &Var,
        w: &Var,
        targets: &[u32],
        weights: &[f32],
    ) -> Result<Var> {
        let inv = inverse_total("linear_cross_entropy", weights)?;
        let trans_b = MatmulOpts {
            trans_a: false,
            trans_b: true,
        };
        let logits = matmul(&h.value, &w.value, None, trans_b)?;
        if !(self.is_recording() && (h.requires_grad || w.requires_grad)) {
            let out = cross_entropy(&logits, targets, weights)?;
            return self.record(
                "linear_cross_entropy",
                scale(&sum_all(&out.losses)?, inv)?,
                &[],
                0,
                |_| Ok(vec![]),
            );
        }
        let (losses, g) = cross_entropy_fused(logits, targets, weights)?;
        let loss = scale(&sum_all(&losses)?, inv)?;
        let dh = match h.requires_grad {
            true => Some(matmul(&g, &w.value, None, MatmulOpts::default())?),
            false => None,
        };
        let trans_a = MatmulOpts {
            trans_a: true,
            trans_b: false,
        };
        let dw = match w.requires_grad {
            true => Some(matmul(&g, &h.value, None, trans_a)?),
            false => None,
        };
        drop(g);
        let saved = dh.iter().chain(&dw).map(Tensor::bytes).sum();
        self.record("linear_cross_entropy", loss, &[h, w], saved, move |dloss| {
            let dh = dh.map(|g| scale_by_upstream(&g, inv, dloss)).transpose()?;
            let dw = dw.map(|g| scale_by_upstream(&g, inv, dloss)).transpose()?;
            Ok(vec![dh, dw])
        })
    }

    /// Weighted mean cross-entropy of `logits` (N, V) against `targets` (N); a (1) loss.
    pub fn cross_entropy(&self, logits: &Var, targets: &[u32], weights: &[f32]) -> Result<Var> {
        let inv = inverse_total("cross_entropy", weights)?;
        let out = cross_entropy(&logits.value, targets, weights)?;
        let loss = scale(&sum_all(&out.losses)?, inv)?;
        let (x, lse) = (logits.value.clone(), out.lse);
        let (t, w) = (targets.to_vec(), weights.to_vec());
        let saved = x.bytes() + lse.bytes();
        self.record("cross_entropy", loss, &[logits], saved, move |dloss| {
            // On the GPU, dloss is a (1) tensor that stays there (no host round trip), applied
            // by one more pass; on the CPU it is read directly and folded into the scale.
            let dx = match dloss.device() {
                Device::Cpu(_) => {
                    let d = dloss.to_vec()?[0];
                    cross_entropy_backward(&x, &t, &w, &lse, inv * d)?
                }
                Device::Gpu(_) => scale_by(&cross_entropy_backward(&x, &t, &w, &lse, inv)?, dloss)?,
            };
            Ok(vec![Some(dx)])
        })
    }
}
