//! LoRA on a base stored in f16 (`--precision f16`) against the same LoRA on the f32 base, on
//! the CPU and on the GPU, with the PyTorch fixture `tests/fixtures/gpt2-tiny`.
//!
//! Stated tolerances. Each weight is rounded once to the nearest f16, a relative error of at
//! most 2⁻¹¹ ≈ 4.9·10⁻⁴; the products sum in f32, so the model is the f32 model with slightly
//! moved weights, and its outputs move by about that much: the logits stay within 2·10⁻³ of the
//! f32 model's (relative to their scale; measured 6.9·10⁻⁴). In training the activations saved
//! for backward are rounded to f16 as well (`Gpt2::training_tape`), so each backward rule
//! computes with inputs off by up to 2⁻¹¹ too: the LoRA gradients stay within 5·10⁻³ (measured
//! at most 1.9·10⁻³; 1.4·10⁻³ with the weights alone in f16), and five AdamW steps give losses
//! within 10⁻³ of the f32 run's (measured 1.9·10⁻⁴) and logits within 10⁻² (measured 5.6·10⁻³;
//! Adam normalises each update, so the adapters move apart a little more than the gradients).
//! The tape holds under 0.7× the bytes (measured 0.25×: the activations at half, and the f16
//! weights' products keep no weight of their own). The same f16 model on the GPU matches the
//! CPU to 10⁻⁴: both read the same halves and round the activations alike.

mod common;

use tensor::on_devices;

use autograd::{AdamW, Grads, ParamGroup};
use common::{batch, logits, model, rel_diff};
use lora::{LoraConfig, LoraModel, Target};
use tensor::Device;
use transformer::{Gpt2, Weight};

/// The fixture with LoRA r 4 on every Linear; the base in f16 when `f16`.
fn adapted(device: &Device, f16: bool) -> (Gpt2, LoraModel) {
    let mut m = model(device);
    let targets = [Target::CAttn, Target::O, Target::Fc, Target::Proj];
    let lora = LoraModel::inject(&mut m, &LoraConfig::new(4, 8.0, &targets), 3).unwrap();
    if f16 {
        let (before, after) = m.store_frozen_linears_in_f16().unwrap();
        // Two bytes a weight instead of four (the padding is at most 14 bytes a weight).
        assert!(
            after * 2 <= before + 8 * 14 && after * 2 >= before,
            "{before} → {after}"
        );
        assert!(m.linears().all(|l| matches!(l.weight, Weight::F16(_))));
    }
    (m, lora)
}

/// Loss before each of `steps` AdamW steps, the LoRA gradients of the first step, and the most
/// bytes a step's tape held for backward.
fn train(m: &Gpt2, lora: &LoraModel, steps: usize) -> (Vec<f32>, Vec<Vec<f32>>, u64) {
    let (ids, targets, weights) = batch();
    let params = lora.trainable_params();
    let mut opt = AdamW::new(vec![ParamGroup::new(params.clone(), 0.0)]);
    let mut losses = Vec::new();
    let mut first = Vec::new();
    let mut saved_peak = 0;
    for step in 0..steps {
        let tape = m.training_tape();
        let f16 = m.linears().all(|l| matches!(l.weight, Weight::F16(_)));
        assert_eq!(tape.saves_activations_in_f16(), f16);
        let loss = m
            .loss(&tape, &ids, &targets, &weights, 1, ids.len())
            .unwrap();
        saved_peak = saved_peak.max(tape.saved_memory().peak);
        losses.push(loss.value.to_vec().unwrap()[0]);
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap();
        assert_eq!(
            grads.len(),
            params.len(),
            "only the adapters have gradients"
        );
        if step == 0 {
            first = params
                .iter()
                .map(|p| grads.get(p.id).unwrap().to_vec().unwrap())
                .collect();
        }
        opt.step(&grads, 1e-2).unwrap();
    }
    (losses, first, saved_peak)
}

fn f16_base_tracks_the_f32_base(device: &Device) {
    let (m32, l32) = adapted(device, false);
    let (m16, l16) = adapted(device, true);
    // B = 0: the adapted logits are the base's; the f16 base moves them by its rounding.
    let d = rel_diff(&logits(&m16), &logits(&m32));
    eprintln!("logits at init: {d:e}");
    assert!(d < 2e-3 && d > 0.0, "logits: {d:e}");
    let (loss32, g32, saved32) = train(&m32, &l32, 5);
    let (loss16, g16, saved16) = train(&m16, &l16, 5);
    // The activations are most of what a step saves; the parameters it keeps (W, A, B, γ) and
    // the per-row statistics stay f32.
    eprintln!("saved for backward: f32 {saved32} B, f16 {saved16} B");
    assert!(
        saved16 * 10 < saved32 * 7,
        "saved for backward: f16 {saved16} B vs f32 {saved32} B"
    );
    eprintln!("losses f16 {loss16:?}\n       f32 {loss32:?}");
    for (i, (a, b)) in loss16.iter().zip(&loss32).enumerate() {
        assert!((a - b).abs() <= 1e-3 * b.abs(), "step {i}: loss {a} vs {b}");
    }
    assert!(
        loss16[4] < loss16[0],
        "training lowers the loss: {loss16:?}"
    );
    for (i, (a, b)) in g16.iter().zip(&g32).enumerate() {
        let d = rel_diff(a, b);
        eprintln!("gradient {i}: {d:e}");
        assert!(d < 5e-3, "gradient {i}: {d:e}");
    }
    // After training (B ≠ 0) the adapted logits still track: Adam normalises each update, so
    // the adapters themselves differ by a little more than the gradients did.
    let d = rel_diff(&logits(&m16), &logits(&m32));
    eprintln!("logits after 5 steps: {d:e}");
    assert!(d < 1e-2, "trained logits: {d:e}");
}
on_devices!(
    f16_base_tracks_the_f32_base,
    f16_base_tracks_the_f32_base_cpu,
    f16_base_tracks_the_f32_base_gpu
);

/// The same f16 model on the GPU and the CPU: the same halves, f32 sums in another order.
#[test]
fn f16_base_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = tensor::testing::gpu() else {
        return;
    };
    let (cpu_m, cpu_l) = adapted(&Device::cpu(), true);
    let (gpu_m, gpu_l) = adapted(&gpu, true);
    let (cpu_loss, cpu_g, cpu_saved) = train(&cpu_m, &cpu_l, 3);
    let (gpu_loss, gpu_g, gpu_saved) = train(&gpu_m, &gpu_l, 3);
    assert_eq!(gpu_saved, cpu_saved);
    for (a, b) in gpu_loss.iter().zip(&cpu_loss) {
        assert!((a - b).abs() <= 1e-4 * b.abs(), "loss {a} vs {b}");
    }
    for (a, b) in gpu_g.iter().zip(&cpu_g) {
        assert!(rel_diff(a, b) < 1e-4, "gradient: {:e}", rel_diff(a, b));
    }
    let d = rel_diff(&logits(&gpu_m), &logits(&cpu_m));
    assert!(d < 1e-4, "logits: {d:e}");
}

/// What needs the f32 base refuses an f16 one by the weight's name; a trainable weight cannot
/// be stored in f16.
#[test]
fn merging_and_saving_refuse_the_f16_base_by_name() {
    let device = Device::cpu();
    let (m, lora) = adapted(&device, true);
    let err = lora.merge(&m).err().unwrap().to_string();
    assert!(
        err.contains("f16") && err.contains("h.0.attn.c_attn.weight"),
        "{err}"
    );
    let err = m.to_checkpoint().err().unwrap().to_string();
    assert!(err.contains("stored in f16"), "{err}");
    let ckpt = transformer::Checkpoint::load(common::fixture()).unwrap();
    let mut full = Gpt2::from_checkpoint(&ckpt, &device, true).unwrap();
    let err = full.store_frozen_linears_in_f16().unwrap_err().to_string();
    assert!(
        err.contains("trainable") && err.contains("h.0.attn.c_attn.weight"),
        "{err}"
    );
}
