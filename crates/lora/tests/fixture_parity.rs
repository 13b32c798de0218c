//! LoRA against PyTorch + PEFT, number for number (in the manner of llm.c's test_gpt2.c).
//!
//! The fixture's adapter (`tests/fixtures/gpt2-tiny/adapter`) was saved by PEFT itself: r 4,
//! α 8, target `c_attn`, random non-zero A and B. We load it into the fixture's frozen base
//! model and check, on the CPU and on the GPU, against PEFT's float64 run:
//! - logits within 1e-4 absolute, loss within 1e-5 relative;
//! - the gradient of every lora_A and lora_B within 1e-4 absolute or 1e-3 relative;
//! - the losses of 10 AdamW steps on A and B only (lr 1e-3, β 0.9/0.999, eps 1e-8, weight
//!   decay 0.01, torch's AdamW) within 1e-4 relative.

mod common;

use tensor::on_devices;

use autograd::{Grads, Tape};
use common::{batch, check_tensor, expected, fixture, get, model};
use integration_tests::gpt2_tiny::{adamw_step_losses, expected_steps};
use lora::{KEY_PREFIX, LoraModel};
use tensor::Device;

fn peft_adapter_matches_pytorch(device: &Device) {
    let mut model = model(device);
    let loaded = LoraModel::load_peft(fixture().join("adapter"), &model).unwrap();
    for w in &loaded.warnings {
        println!("warning: {w}");
    }
    let mut lora = loaded.lora;
    lora.attach(&mut model).unwrap();
    let (ids, targets, weights) = batch();
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

    let want = expected("expected_lora/expected.safetensors");
    println!("== {device:?}");
    let got_logits = logits.value.to_vec().unwrap();
    let mut ok = check_tensor("logits", &got_logits, get(&want, "logits_f64"), 1e-4, 0.0);
    let got_loss = loss.value.to_vec().unwrap();
    ok &= check_tensor("loss", &got_loss, get(&want, "loss_f64"), 0.0, 1e-5);
    let params = lora.trainable_params();
    assert_eq!(params.len(), 4, "A and B of c_attn in 2 layers");
    assert_eq!(grads.len(), 4, "gradients exist for A and B only");
    for p in &params {
        let key = format!("grad_f64.{KEY_PREFIX}{}.weight", p.name);
        let g = grads.get(p.id).unwrap().to_vec().unwrap();
        ok &= check_tensor(&key, &g, get(&want, &key), 1e-4, 1e-3);
    }
    assert!(
        ok,
        "some tensors differ from PyTorch + PEFT (see NOT OK above)"
    );
}

fn lora_adamw_steps_match_pytorch(device: &Device) {
    let mut model = model(device);
    let mut lora = LoraModel::load_peft(fixture().join("adapter"), &model)
        .unwrap()
        .lora;
    lora.attach(&mut model).unwrap();
    let (want, trainable) = expected_steps("lora");
    let count = lora.param_count(&model);
    println!("{count}");
    assert_eq!(count.trainable as u64, trainable);
    let got = adamw_step_losses(&model, lora.trainable_params(), want.len());
    println!("== {device:?}");
    assert!(check_tensor(
        "losses of 10 LoRA AdamW steps",
        &got,
        &want,
        0.0,
        1e-4
    ));
}

on_devices!(
    peft_adapter_matches_pytorch,
    peft_adapter_matches_pytorch_cpu,
    peft_adapter_matches_pytorch_gpu
);
on_devices!(
    lora_adamw_steps_match_pytorch,
    lora_adamw_steps_match_pytorch_cpu,
    lora_adamw_steps_match_pytorch_gpu
);
