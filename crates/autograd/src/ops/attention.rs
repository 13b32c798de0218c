//! Fused causal self-attention over the fused projection qkv (B, T, 3C) → y (B, T, C), heads
//! merged (the math: [`tensor::ops::attention`]).
//!
//!   y_i = Σ_{j≤i} softmax_j(s·q_i·k_j)·v_j  per head;  the backward recomputes the
//!   probabilities from q, k and the saved per-row log-sum-exp, and returns d(qkv) in one tensor.
//!
//! Saved for backward: qkv, y (activations: in f16 on a tape that saves them so) and lse
//! (B, NH, T); no (B, NH, T, T) tensor is ever formed.

use tensor::Result;
use tensor::ops::attention::{causal_attention, causal_attention_backward};

use crate::saved::saved_bytes;
use crate::tape::{Tape, Var};

impl Tape {
    /// Causal attention of `nh` heads over qkv (B, T, 3C), scores scaled by `scale`; the
    /// gradient flows to qkv.
    pub fn causal_attention(&self, qkv: &Var, nh: usize, scale: f32) -> Result<Var> {
        let (y, lse) = causal_attention(&qkv.value, nh, scale)?;
        let x_saved = self.save_activation(&qkv.value, &[qkv])?;
        let y_saved = self.save_activation(&y, &[qkv])?;
        let saved = saved_bytes([Some(&x_saved), Some(&y_saved)]) + lse.bytes();
        self.record("causal_attention", y, &[qkv], saved, move |dy| {
            let (x, y) = (x_saved.get()?, y_saved.get()?);
            let dx = causal_attention_backward(&x, &y, &lse, dy, nh, scale)?;
            Ok(vec![Some(dx)])
        })
    }
}
