//! DoRA trained here (`LoraConfig::use_dora`): it starts at the base model (m = ‖W0‖ per
//! column, B = 0), m is among the trainable parameters, and m's gradient (the column norm held
//! constant, as PEFT detaches it) matches central finite differences of the loss. PEFT's logits
//! with a DoRA adapter we trained are checked in `crates/train/tests/finetune_peft.rs`.

mod common;

use autograd::{Grads, Tape};
use common::{batch, logits, model, rel_diff};
use lora::{Init, LoraConfig, LoraModel, Target};
use tensor::ops::slice::write_axis;
use tensor::{Device, Tensor};
use transformer::Gpt2;

fn loss(model: &Gpt2, tape: &Tape) -> autograd::Var {
    let (ids, targets, weights) = batch();
    let t = ids.len();
    model.loss(tape, &ids, &targets, &weights, 1, t).unwrap()
}

fn value(model: &Gpt2) -> f64 {
    f64::from(loss(model, &Tape::inference()).value.to_vec().unwrap()[0])
}

fn starts_at_base_and_trains_magnitude(device: &Device) {
    let device = device.clone();
    let base = logits(&model(&device));
    let mut m = model(&device);
    let mut cfg = LoraConfig::new(4, 8.0, &[Target::CAttn, Target::Fc]);
    cfg.use_dora = true;
    let lora = LoraModel::inject(&mut m, &cfg, 1).unwrap();
    assert!(rel_diff(&logits(&m), &base) < 1e-5);
    // A, B and m of each of the 4 sites.
    assert_eq!(lora.trainable_params().len(), 12);

    // With B ≠ 0, m's gradient against finite differences.
    let mut m = model(&device);
    cfg.init = Init::BothRandom;
    let lora = LoraModel::inject(&mut m, &cfg, 2).unwrap();
    let tape = Tape::new();
    let l = loss(&m, &tape);
    let mut grads = Grads::new();
    tape.backward(&l, &mut grads).unwrap();
    let (_, update) = lora.sites().nth(1).unwrap();
    let magnitude = &update.dora.as_ref().unwrap().magnitude;
    let id = magnitude.as_trainable().unwrap().id;
    let g = grads.get(id).unwrap().to_vec().unwrap();
    let m0 = magnitude.value().to_vec().unwrap();
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let h = 1e-2f32;
    let set = |v: Vec<f32>| {
        let t = Tensor::from_vec(v, &[m0.len()], &device).unwrap();
        write_axis(magnitude.value(), 0, 0, &t, false).unwrap();
    };
    for &j in &order[..4] {
        let mut plus = m0.clone();
        plus[j] += h;
        set(plus);
        let up = value(&m);
        let mut minus = m0.clone();
        minus[j] -= h;
        set(minus);
        let down = value(&m);
        set(m0.clone());
        let fd = (up - down) / (2.0 * f64::from(h));
        let got = f64::from(g[j]);
        assert!(
            (fd - got).abs() <= 0.02 * got.abs() + 1e-4,
            "dL/dm[{j}]: backward {got}, finite differences {fd}"
        );
    }
}

tensor::on_devices!(
    starts_at_base_and_trains_magnitude,
    dora_starts_at_the_base_model_and_trains_its_magnitude_cpu,
    dora_starts_at_the_base_model_and_trains_its_magnitude_gpu
);

#[test]
fn dora_refuses_what_it_cannot_save_or_compute_as_peft_does() {
    let m = model(&Device::cpu());
    let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V]);
    cfg.use_dora = true;
    let e = LoraModel::new(&m, &cfg, 0).err().unwrap().to_string();
    assert!(e.contains("target c_attn instead"), "{e}");
    cfg.targets = vec![Target::CAttn];
    cfg.init = Init::Pissa;
    let e = LoraModel::new(&m, &cfg, 0).err().unwrap().to_string();
    assert!(e.contains("not additive"), "{e}");
    cfg.init = Init::KaimingUniform;
    cfg.dropout = 0.1;
    let e = LoraModel::new(&m, &cfg, 0).err().unwrap().to_string();
    assert!(e.contains("use dropout 0"), "{e}");
}
