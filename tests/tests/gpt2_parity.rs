//! GPT-2 against PyTorch, number for number (in the manner of llm.c's test_gpt2.c).
//!
//! The fixture `tests/fixtures/gpt2-tiny` (2 layers, 4 heads, C = 64, V = 256, 24 token ids) was
//! made by `transformers` in float64 (`tests/fixtures/gpt2-tiny/make_fixture.py` remakes it;
//! see the fixture's README). We check, on the CPU backend and on
//! the GPU: the logits, the loss, the gradient of every parameter, and the losses of 10 AdamW
//! steps. Tolerances are the fixture's: logits 1e-4 absolute, loss 1e-5 relative, gradients 1e-4
//! absolute or 1e-3 relative, step losses 1e-4 relative.

use autograd::{Grads, Tape};
use integration_tests::gpt2_tiny::{self, adamw_step_losses, batch, expected, expected_steps};
use integration_tests::{check_tensor, get};
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

fn forward_backward_matches_pytorch(device: &Device) {
    let ckpt = Checkpoint::load(gpt2_tiny::dir()).unwrap();
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
    let ckpt = Checkpoint::load(gpt2_tiny::dir()).unwrap();
    let model = Gpt2::from_checkpoint(&ckpt, device, true).unwrap();
    let (want, trainable) = expected_steps("full");
    let params: Vec<_> = model
        .named_params()
        .into_iter()
        .map(|p| p.as_trainable().unwrap().clone())
        .collect();
    assert_eq!(
        params.iter().map(|p| p.value.numel()).sum::<usize>() as u64,
        trainable
    );
    let got = adamw_step_losses(&model, params, want.len());
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
