//! The PyTorch fixture `tests/fixtures/gpt2-tiny` (2 layers, C = 64, V = 256, 24 token ids, a
//! PEFT adapter; see its README): its directory, its token sequence as a batch, its expected
//! outputs, and the AdamW steps its `expected_steps.json` records.

use std::path::PathBuf;

use autograd::{AdamW, Grads, ParamGroup, Tape, Trainable};
use transformer::Gpt2;

/// `tests/fixtures/gpt2-tiny`.
pub fn dir() -> PathBuf {
    crate::fixture("gpt2-tiny")
}

/// The 24 ids as one sequence: inputs all 24, targets the next token, the last position not
/// counted (weight 0). Returns (ids, targets, weights).
pub fn batch() -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let path = dir().join("ids.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ids: Vec<u32> = serde_json::from_str(&text).unwrap();
    let mut targets: Vec<u32> = ids[1..].to_vec();
    targets.push(0);
    let mut weights = vec![1.0; ids.len()];
    *weights.last_mut().unwrap() = 0.0;
    (ids, targets, weights)
}

/// The f64 tensors of one of the fixture's `expected.safetensors` (`file` relative to it).
pub fn expected(file: &str) -> Vec<(String, Vec<f64>)> {
    crate::read_f64(&dir().join(file))
}

/// The losses PyTorch measured before each AdamW step of `run` (`full` or `lora`) in float64,
/// and how many values it trained.
pub fn expected_steps(run: &str) -> (Vec<f64>, u64) {
    let path = dir().join("expected_steps.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let steps: serde_json::Value = serde_json::from_str(&text).unwrap();
    let losses = steps[run]["losses_f64"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `{run}.losses_f64`", path.display()))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (losses, steps[run]["trainable_params"].as_u64().unwrap())
}

/// The loss before each of `steps` AdamW steps of `params` on [`batch`], as the fixture's
/// `expected_steps.json` was made: torch's AdamW with lr 1e-3, betas 0.9/0.999, eps 1e-8,
/// weight decay 0.01, no clipping, the same sequence every step.
pub fn adamw_step_losses(model: &Gpt2, params: Vec<Trainable>, steps: usize) -> Vec<f32> {
    let (ids, targets, weights) = batch();
    let mut opt = AdamW::new(vec![ParamGroup::new(params, 0.01)]);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let tape = Tape::new();
        let loss = model
            .loss(&tape, &ids, &targets, &weights, 1, ids.len())
            .unwrap();
        losses.push(loss.value.to_vec().unwrap()[0]);
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap();
        opt.step(&grads, 1e-3).unwrap();
    }
    losses
}
