//! What the LoRA tests share: the PyTorch/PEFT fixture `tests/fixtures/gpt2-tiny` (2 layers,
//! C = 64, V = 256, 24 ids; see its README), llm.c-style tensor checks, and small helpers.
#![allow(dead_code)]

use std::path::PathBuf;

use autograd::Tape;
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

pub fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gpt2-tiny"
    ))
}

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

/// The 24 ids; targets are the next ids, the last position not counted (weight 0).
pub fn batch() -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let text = std::fs::read_to_string(fixture().join("ids.json")).unwrap();
    let ids: Vec<u32> = serde_json::from_str(&text).unwrap();
    let mut targets: Vec<u32> = ids[1..].to_vec();
    targets.push(0);
    let mut weights = vec![1.0; ids.len()];
    *weights.last_mut().unwrap() = 0.0;
    (ids, targets, weights)
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

/// The f64 tensors of a fixture `expected.safetensors`.
pub fn expected(file: &str) -> Vec<(String, Vec<f64>)> {
    integration_tests::read_f64(&fixture().join(file))
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

/// A fresh empty directory under the system's temp dir (unique per call: tests run in threads).
pub fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lora-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
