//! What we save, PEFT loads and computes the same logits with (checked 2026-11-24 with PEFT
//! 0.21.2, transformers 5.23.0, torch 2.15.0; see `tests/fixtures/ours-in-peft/README.md`).
//!
//! The test rebuilds the adapter of `examples/peft_check_adapter.rs`, saves it, checks the files
//! equal the ones PEFT was given, and compares our logits with PEFT's.

mod common;

use common::{check_tensor, get, scratch};
use lora::{Init, LoraConfig, LoraModel, Target};
use tensor::Device;

fn ours_in_peft() -> std::path::PathBuf {
    integration_tests::fixture("ours-in-peft")
}

fn config() -> LoraConfig {
    let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V, Target::O, Target::Fc]);
    cfg.rank_pattern.insert(Target::O, 2);
    cfg.rank_pattern.insert(Target::Fc, 3);
    cfg.init = Init::BothRandom;
    cfg
}

fn check(device: &Device) {
    let mut model = common::model(device);
    let lora = LoraModel::inject(&mut model, &config(), 7).unwrap();
    // The files we write today are the files PEFT was given.
    let dir = scratch("peft-roundtrip");
    lora.save_peft(&dir).unwrap();
    for name in [lora::WEIGHTS_FILE, lora::CONFIG_FILE] {
        let ours = std::fs::read(dir.join(name)).unwrap();
        let given = std::fs::read(ours_in_peft().join("adapter").join(name)).unwrap();
        assert!(
            ours == given,
            "{name} differs from the file PEFT was checked with: regenerate the fixture"
        );
    }
    let want = integration_tests::read_f64(&ours_in_peft().join("peft_logits.safetensors"));
    let logits = common::logits(&model);
    println!("== {device:?}");
    assert!(check_tensor(
        "logits vs PEFT",
        &logits,
        get(&want, "logits_f64"),
        1e-4,
        0.0
    ));
}

tensor::on_devices!(
    check,
    what_we_save_gives_pefts_logits_cpu,
    what_we_save_gives_pefts_logits_gpu
);
