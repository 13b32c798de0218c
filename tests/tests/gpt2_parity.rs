//! GPT-2 against PyTorch, number for number (in the manner of llm.c's test_gpt2.c).
//!
//! The fixture `tests/fixtures/gpt2-tiny` (2 layers, 4 heads, C = 64, V = 256, 24 token ids) was
//! made by `transformers` in float64 (regenerate with the peer script
//! `parity.py --make-fixture`; see the fixture's README). We check, on the CPU backend and on
//! the GPU: the logits, the loss, the gradient of every parameter, and the losses of 10 AdamW
//! steps. Tolerances are the fixture's: logits 1e-4 absolute, loss 1e-5 relative, gradients 1e-4
//! absolute or 1e-3 relative, step losses 1e-4 relative.

use autograd::{AdamW, Grads, ParamGroup, Tape};
use integration_tests::{check_tensor, fixture, get, read_f64};
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

fn expected(file: &str) -> Vec<(String, Vec<f64>)> {
    read_f64(&fixture("gpt2-tiny").join(file))
}

/// The 24 ids; inputs are all 24, targets the next token, the last position not counted.
fn batch() -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let text = std::fs::read_to_string(fixture("gpt2-tiny").join("ids.json")).unwrap();
    let ids: Vec<u32> = serde_json::from_str(&text).unwrap();
    let mut targets: Vec<u32> = ids[1..].to_vec();
    targets.push(0);
    let mut weights = vec![1.0; ids.len()];
    *weights.last_mut().unwrap() = 0.0;
    (ids, targets, weights)
}

fn forward_backward_matches_pytorch(device: &Device) {
    let ckpt = Checkpoint::load(fixture("gpt2-tiny")).unwrap();
    let model = Gpt2::from_checkpoint(&ckpt, device, true).unwrap();
    let (ids, targets, weights) = batch();
    let want = expected("expected_base/expected.safetensors");
    // All 24 positions' logits (the loss computes only the 23 counted rows).
    let logits = model
        .logits(&Tape::inference(), &ids, 1, ids.len())
        .unwrap();
    let tape = Tape::new();
    let loss = model
        .loss(&tape, &ids, &targets, &weights, 1, ids.len())
        .unwrap();
    let mut grads = Grads::new();
    tape.backward(&loss, &mut grads).unwrap();

    println!("== {device:?}");
    let mut ok = check_tensor(
        "logits",
        &logits.value.to_vec().unwrap(),
        get(&want, "logits_f64"),
        1e-4,
        0.0,
    );
    let l = loss.value.to_vec().unwrap();
    let wl = get(&want, "loss_f64");
    ok &= check_tensor("loss", &l, wl, 0.0, 1e-5);
    for p in model.named_params() {
        let g = grads.get(p.as_trainable().unwrap().id).unwrap();
        let name = format!("grad_f64.transformer.{}", p.name());
        ok &= check_tensor(
            p.name(),
            &g.to_vec().unwrap(),
            get(&want, &name),
            1e-4,
            1e-3,
        );
    }
    assert!(ok, "some tensors differ from PyTorch (see NOT OK above)");
}

fn adamw_steps_match_pytorch(device: &Device) {
    let ckpt = Checkpoint::load(fixture("gpt2-tiny")).unwrap();
    let model = Gpt2::from_checkpoint(&ckpt, device, true).unwrap();
    let (ids, targets, weights) = batch();
    let text = std::fs::read_to_string(fixture("gpt2-tiny").join("expected_steps.json")).unwrap();
    let steps: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want: Vec<f64> = steps["full"]["losses_f64"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let trainables: Vec<_> = model
        .named_params()
        .into_iter()
        .map(|p| p.as_trainable().unwrap().clone())
        .collect();
    assert_eq!(
        trainables.iter().map(|p| p.value.numel()).sum::<usize>() as u64,
        steps["full"]["trainable_params"].as_u64().unwrap()
    );
    let mut opt = AdamW::new(vec![ParamGroup::new(trainables, 0.01)]);
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let tape = Tape::new();
        let loss = model
            .loss(&tape, &ids, &targets, &weights, 1, ids.len())
            .unwrap();
        got.push(loss.value.to_vec().unwrap()[0]);
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap();
        opt.step(&grads, 1e-3).unwrap();
    }
    println!("== {device:?}");
    assert!(check_tensor(
        "losses of 10 AdamW steps",
        &got,
        &want,
        0.0,
        1e-4
    ));
}

#[test]
fn gpt2_forward_backward_matches_pytorch_cpu() {
    forward_backward_matches_pytorch(&Device::cpu());
}

#[test]
fn gpt2_forward_backward_matches_pytorch_gpu() {
    if let Some(g) = tensor::testing::gpu() {
        forward_backward_matches_pytorch(&g);
    }
}

#[test]
fn gpt2_adamw_steps_match_pytorch_cpu() {
    adamw_steps_match_pytorch(&Device::cpu());
}

#[test]
fn gpt2_adamw_steps_match_pytorch_gpu() {
    if let Some(g) = tensor::testing::gpu() {
        adamw_steps_match_pytorch(&g);
    }
}
