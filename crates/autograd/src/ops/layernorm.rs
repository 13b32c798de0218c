//! Layer norm over the last axis C: y = (x − μ)·rstd·γ + β, rstd = 1/√(var + eps).
//!
//! Saved for backward: x, γ, and the per-row μ and rstd ((rows), small); x̂ is recomputed
//! rather than saved, trading a few flops for (rows, C) floats of memory.
//! Backward (g = dy·γ): dx = rstd·(g − mean(g) − x̂·mean(g·x̂)); dγ = Σ_rows dy·x̂; dβ = Σ_rows dy.
//! dγ and dβ are computed only when γ or β requires a gradient (not for LoRA's frozen norms).
//! dx goes straight into x's gradient summed so far when the tape offers it (the residual
//! stream's: x also feeds the block's residual addition), in the same kernel.
//!
//! [`Tape::add_layernorm`] is a residual addition h = x + a followed by the layer norm of h, in
//! one forward kernel; on the tape it is the two ops it replaces (an addition passing dh on to
//! both x and a, and the layer norm of h), so the backward is theirs.

use tensor::ops::layernorm::{LayerNormOut, add_layernorm, layernorm, layernorm_backward_into};
use tensor::{Result, Tensor};

use crate::tape::{Tape, Var, bytes_of};

impl Tape {
    /// Layer norm of x: (…, C) with γ, β: (C).
    pub fn layernorm(&self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        let out = layernorm(&x.value, &gamma.value, &beta.value, eps)?;
        self.record_layernorm(x, gamma, beta, out)
    }

    /// `(h, y)` with h = x + a and y = layer norm of h (see the module doc): x, a: (…, C);
    /// γ, β: (C).
    pub fn add_layernorm(
        &self,
        x: &Var,
        a: &Var,
        gamma: &Var,
        beta: &Var,
        eps: f32,
    ) -> Result<(Var, Var)> {
        let (h, out) = add_layernorm(&x.value, &a.value, &gamma.value, &beta.value, eps)?;
        let (nx, na) = (x.requires_grad, a.requires_grad);
        let h = self.record("add", h, &[x, a], 0, move |dh| {
            Ok(vec![nx.then(|| dh.clone()), na.then(|| dh.clone())])
        })?;
        let y = self.record_layernorm(&h, gamma, beta, out)?;
        Ok((h, y))
    }

    /// Record the layer norm of x whose forward gave `out`.
    fn record_layernorm(&self, x: &Var, gamma: &Var, beta: &Var, out: LayerNormOut) -> Result<Var> {
        let xs = self.save_activation(&x.value, &[x, gamma, beta])?;
        let (gs, mean, rstd): (Tensor, _, _) = (gamma.value.clone(), out.mean, out.rstd);
        let (nx, ng, nb) = (x.requires_grad, gamma.requires_grad, beta.requires_grad);
        let saved = xs.bytes() + bytes_of([Some(&gs), Some(&mean), Some(&rstd)]);
        self.record_accumulating(
            "layernorm",
            out.y,
            &[x, gamma, beta],
            saved,
            move |dy, pending| {
                let acc = if nx { pending.take(0) } else { None };
                let g = layernorm_backward_into(&xs.get()?, &gs, &mean, &rstd, dy, ng || nb, acc)?;
                Ok(vec![
                    nx.then_some(g.dx),
                    g.dgamma.filter(|_| ng),
                    g.dbeta.filter(|_| nb),
                ])
            },
        )
    }
}
