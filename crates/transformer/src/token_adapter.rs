//! A hook on the two uses of the token embedding `wte`: the input rows `x = wte[ids]` and the
//! (tied) output head logits = x·Wᵀ. PEFT adapts them separately (LoRA on `wte` changes the
//! input rows only, LoRA on `lm_head` the head only, a `modules_to_save` copy of `wte` replaces
//! the input rows only), so a tied model needs a hook on each use, not a change of `wte`.

use autograd::{Param, Tape, Var};

use crate::error::Result;

/// Something that adds to the token embedding's input rows or to the output head.
pub trait TokenAdapter {
    /// `tok = wte[ids]`, (N, C): return the input embedding with the adapter.
    fn embed(&self, tape: &Tape, ids: &[u32], tok: Var) -> Result<Var>;
    /// `logits` = x·Wᵀ, (N, V) for x (N, C): return the head's output with the adapter.
    fn head(&self, tape: &Tape, x: &Var, logits: Var) -> Result<Var>;
    /// Whether [`TokenAdapter::head`] changes the logits now (else the loss keeps its fused
    /// head + cross-entropy).
    fn adapts_head(&self) -> bool;
    /// The adapter's own parameters.
    fn params(&self) -> Vec<&Param>;
}
