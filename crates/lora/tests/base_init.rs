//! PiSSA and OLoRA on the fixture model: the adapted model starts at the base model's logits,
//! and after A and B have moved, the saved adapter (converted to a plain LoRA of rank 2r, as
//! PEFT's `path_initial_model_for_weight_conversion` converts it) gives the trained model's
//! logits on the original base. PEFT's own logits with such adapters are checked in
//! `crates/train/tests/finetune_peft.rs`.

mod common;

use common::{logits, model, rel_diff, scratch};
use lora::{Init, LoraConfig, LoraModel, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tensor::ops::slice::write_axis;
use tensor::{Device, Tensor};

/// Adds noise of size `amount` to every A and B, as training would move them.
fn perturb(lora: &LoraModel, amount: f32, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, update) in lora.sites() {
        for p in [&update.a, &update.b] {
            let t = p.value();
            let v: Vec<f32> = t
                .to_vec()
                .unwrap()
                .iter()
                .map(|x| x + rng.random_range(-amount..amount))
                .collect();
            let new = Tensor::from_vec(v, t.shape(), &t.device()).unwrap();
            write_axis(t, 0, 0, &new, false).unwrap();
        }
    }
}

fn check(device: &Device) {
    let base = logits(&model(device));
    let cases: [(Init, &[Target], bool); 4] = [
        (Init::Pissa, &[Target::CAttn, Target::Fc], false),
        (Init::Olora, &[Target::O, Target::Proj], false),
        (Init::Pissa, &[Target::Q, Target::V], true),
        (Init::Olora, &[Target::CAttn], true),
    ];
    for (init, targets, rslora) in cases {
        let what = format!("{init:?} {targets:?} rslora {rslora}");
        let mut tuned_model = model(device);
        let mut cfg = LoraConfig::new(4, 8.0, targets);
        cfg.init = init;
        cfg.use_rslora = rslora;
        let lora = LoraModel::inject(&mut tuned_model, &cfg, 3).unwrap();
        let start = rel_diff(&logits(&tuned_model), &base);
        assert!(
            start < 1e-4,
            "{what}: W_res + s·B0·A0 starts {start} off W0"
        );
        perturb(&lora, 0.05, 9);
        let tuned = logits(&tuned_model);
        assert!(
            rel_diff(&tuned, &base) > 1e-3,
            "{what}: the perturbation shows"
        );
        let dir = scratch("base-init");
        lora.save_peft(&dir).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(lora::CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(json["r"], 8, "{what}: rank 2r");
        assert_eq!(json["init_lora_weights"], true, "{what}");
        let alpha = json["lora_alpha"].as_f64().unwrap();
        let want = if rslora { 8.0 * 2f64.sqrt() } else { 16.0 };
        assert!((alpha - want).abs() < 1e-5, "{what}: alpha {alpha}");
        let mut fresh = model(device);
        let mut loaded = LoraModel::load_peft(&dir, &fresh).unwrap().lora;
        loaded.attach(&mut fresh).unwrap();
        let again = rel_diff(&logits(&fresh), &tuned);
        assert!(
            again < 1e-4,
            "{what}: the converted adapter on the original base is {again} off the trained model"
        );
    }
}

tensor::on_devices!(
    check,
    converted_pissa_and_olora_adapters_give_the_trained_model_cpu,
    converted_pissa_and_olora_adapters_give_the_trained_model_gpu
);
