//! Mean cross-entropy with per-token weights:
//! loss = Σ_n w_n·(logsumexp(x_n) − x_n[t_n]) / Σ_n w_n, x: (N, V) logits.
//!
//! Tokens with w = 0 do not count (the prompt of a fine-tuning example). Saved: the logits and
//! the per-row logsumexp; backward: dx[n, v] = dloss·w_n/Σw·(softmax(x_n)[v] − [v = t_n]).

use tensor::ops::cross_entropy::{cross_entropy, cross_entropy_backward};
use tensor::ops::elementwise::{scale, scale_by};
use tensor::ops::reduce::sum_all;
use tensor::{Device, Error, Result};

use crate::tape::{Tape, Var};

impl Tape {
    /// Weighted mean cross-entropy of `logits` (N, V) against `targets` (N); a (1) loss.
    pub fn cross_entropy(&self, logits: &Var, targets: &[u32], weights: &[f32]) -> Result<Var> {
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        if total <= 0.0 {
            return Err(Error::Invalid(format!(
                "cross_entropy: the weights of {} tokens sum to {total}; at least one token must count",
                weights.len()
            )));
        }
        let inv = (1.0 / total) as f32;
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
