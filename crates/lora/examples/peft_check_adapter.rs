//! Writes the adapter that `tests/peft_roundtrip.rs` checks against PEFT itself:
//! `cargo run -p lora --example peft_check_adapter -- OUT_DIR`.
//!
//! q and v slices of c_attn at r 4, attn.c_proj at r 2, mlp.c_fc at r 3 (alpha 8, rsLoRA off),
//! on `tests/fixtures/gpt2-tiny`, with A and B both random (seed 7) so every part shows.

use lora::{Init, LoraConfig, LoraModel, Target};
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: peft_check_adapter OUT_DIR");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gpt2-tiny"
    );
    let ckpt = Checkpoint::load(fixture).unwrap();
    let mut model = Gpt2::from_checkpoint(&ckpt, &Device::cpu(), false).unwrap();
    let lora = LoraModel::inject(&mut model, &config(), 7).unwrap();
    lora.save_peft(&out).unwrap();
    println!("wrote {out}");
}

/// The adapter's configuration (the test builds the same one).
fn config() -> LoraConfig {
    let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V, Target::O, Target::Fc]);
    cfg.rank_pattern.insert(Target::O, 2);
    cfg.rank_pattern.insert(Target::Fc, 3);
    cfg.init = Init::BothRandom;
    cfg
}
