//! What the LoRA tests share: the PyTorch/PEFT fixture `tests/fixtures/gpt2-tiny` (2 layers,
//! C = 64, V = 256, 24 ids; see its README) and llm.c-style tensor checks, from the
//! `integration-tests` crate, and helpers of their own.
#![allow(dead_code)]

use autograd::Tape;
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

#[allow(unused_imports)] // not every test file uses each
pub use integration_tests::gpt2_tiny::{batch, dir as fixture, expected};

/// The fixture's base model on `device`, every parameter frozen.
pub fn model(device: &Device) -> Gpt2 {
    let ckpt = Checkpoint::load(fixture()).unwrap();
    Gpt2::from_checkpoint(&ckpt, device, false).unwrap()
}

/// The fixture's model with `n_layer` layers (layers past the fixture's 2 copy layer 1).
pub fn model_with_layers(n_layer: usize, device: &Device) -> Gpt2 {
    let mut ckpt = Checkpoint::load(fixture()).unwrap();
    ckpt.config.n_layer = n_layer;
    let mut tensors: Vec<_> = ckpt
        .tensors
        .iter()
        .filter(|(n, _, _)| {
            !n.starts_with("h.") || n.split('.').nth(1).unwrap().parse::<usize>().unwrap() < n_layer
        })
        .cloned()
        .collect();
    for l in 2..n_layer {
        for (n, s, v) in ckpt
            .tensors
            .iter()
            .filter(|(n, _, _)| n.starts_with("h.1."))
        {
            tensors.push((
                n.replacen("h.1.", &format!("h.{l}."), 1),
                s.clone(),
                v.clone(),
            ));
        }
    }
    ckpt.tensors = tensors;
    Gpt2::from_checkpoint(&ckpt, device, false).unwrap()
}

/// Logits (T·V) of the fixture's ids, inference tape.
pub fn logits(model: &Gpt2) -> Vec<f32> {
    let (ids, _, _) = batch();
    let tape = Tape::inference();
    model
        .logits(&tape, &ids, 1, ids.len())
        .unwrap()
        .value
        .to_vec()
        .unwrap()
}

#[allow(unused_imports)] // not every test file compares against a fixture
pub use integration_tests::{check_tensor, get};

/// Largest |a − b| over the largest |b|: a difference measured against the tensor's scale.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max_diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    max_diff / scale.max(f32::MIN_POSITIVE)
}

#[allow(unused_imports)] // not every test file needs a scratch directory
pub use integration_tests::{Scratch, scratch};
