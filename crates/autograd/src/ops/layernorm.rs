//! Layer norm over the last axis C: y = (x − μ)·rstd·γ + β, rstd = 1/√(var + eps).
//!
//! Saved for backward: x, γ, and the per-row μ and rstd ((rows), small); x̂ is recomputed
//! rather than saved, trading a few flops for (rows, C) floats of memory.
//! Backward (g = dy·γ): dx = rstd·(g − mean(g) − x̂·mean(g·x̂)); dγ = Σ_rows dy·x̂; dβ = Σ_rows dy.

use tensor::Result;
use tensor::ops::layernorm::{layernorm, layernorm_backward};

use crate::tape::{Tape, Var};

impl Tape {
    /// Layer norm of x: (…, C) with γ, β: (C).
    pub fn layernorm(&self, x: &Var, gamma: &Var, beta: &Var, eps: f32) -> Result<Var> {
        let out = layernorm(&x.value, &gamma.value, &beta.value, eps)?;
        let (xs, gs, mean, rstd) = (x.value.clone(), gamma.value.clone(), out.mean, out.rstd);
        let (nx, ng, nb) = (x.requires_grad, gamma.requires_grad, beta.requires_grad);
        let saved = [&xs, &gs, &mean, &rstd];
        let saved_bytes: Vec<&tensor::Tensor> = saved.to_vec();
        let (xs2, gs2, mean2, rstd2) = (xs.clone(), gs.clone(), mean.clone(), rstd.clone());
        self.record(
            "layernorm",
            out.y,
            &[x, gamma, beta],
            &saved_bytes,
            move |dy| {
                let g = layernorm_backward(&xs2, &gs2, &mean2, &rstd2, dy)?;
                Ok(vec![
                    nx.then_some(g.dx),
                    ng.then_some(g.dgamma),
                    nb.then_some(g.dbeta),
                ])
            },
        )
    }
}
