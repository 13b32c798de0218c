//! The bank's slots, on the fixture `tests/fixtures/gpt2-tiny` (CPU and GPU):
//! 1. capacity doubles when no slot is free, a removed adapter's slot is reused, and the stacks
//!    hold each adapter once (their bytes are the adapters' own at a full power-of-two capacity);
//! 2. whatever happened to the layout before (growth, re-layout for a larger rank, removals,
//!    slot reuse), a batch gets the logits a fresh bank of the same adapters gives, bit for bit;
//! 3. a q/v adapter saved in PEFT's layout (one `c_attn` LoRA of twice the rank, B
//!    block-diagonal) is split back: the bank holds its own q and v weights, and serves the
//!    numbers of the adapter it was saved from, bit for bit; a real `c_attn` adapter stays whole;
//! 4. an adapter checked for another model's shape is refused.

use autograd::Tape;
use tensor::{Device, on_devices};
use transformer::{Checkpoint, Gpt2};

use crate::{AdapterBank, HostAdapter, Init, LoraConfig, LoraModel, Target};

fn model(device: &Device) -> Gpt2 {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gpt2-tiny"
    );
    Gpt2::from_checkpoint(&Checkpoint::load(dir).unwrap(), device, false).unwrap()
}

/// A random adapter (B too, so it changes the logits) of rank `r` on `targets`.
fn adapter(model: &Gpt2, r: usize, targets: &[Target], seed: u64) -> LoraModel {
    let mut cfg = LoraConfig::new(r, 2.0 * r as f32, targets);
    cfg.init = Init::BothRandom;
    LoraModel::new(model, &cfg, seed).unwrap()
}

/// Logits of 4 sequences of 3 tokens.
fn logits(model: &Gpt2) -> Vec<f32> {
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
    let tape = Tape::inference();
    let out = model.logits(&tape, &ids, 4, 3).unwrap();
    out.value.to_vec().unwrap()
}

fn slots_grow_and_are_reused(device: &Device) {
    let model = model(device);
    let qv = [Target::Q, Target::V];
    let one = HostAdapter::new("x", &adapter(&model, 4, &qv, 0), &model.config).unwrap();
    let per_adapter = one.bytes();
    assert_eq!(
        per_adapter,
        2 * 2 * 4 * (64 + 64) * 4,
        "2 layers × q, v × r·(in + out) f32"
    );
    let mut bank = AdapterBank::new(&model);
    assert_eq!((bank.capacity(), bank.stack_bytes()), (0, 0));
    let mut capacities = Vec::new();
    for i in 0..5 {
        let name = format!("a{i}");
        bank.insert(&name, &adapter(&model, 4, &qv, i)).unwrap();
        capacities.push(bank.capacity());
    }
    assert_eq!(capacities, [1, 2, 4, 4, 8]);
    bank.remove("a4").unwrap();
    bank.remove("a1").unwrap();
    // Four free slots of eight, and a1's is taken first.
    bank.insert("b", &adapter(&model, 4, &qv, 10)).unwrap();
    assert_eq!(bank.shared().slots[1].as_deref(), Some("b"));
    assert_eq!(bank.names(), ["a0", "a2", "a3", "b"]);
    // Scales are one f32 per slot and site.
    let scales = |cap: u64| 2 * 2 * cap * 4;
    assert_eq!(bank.stack_bytes(), 8 * per_adapter + scales(8));
    bank.insert("c", &adapter(&model, 4, &qv, 11)).unwrap();
    bank.insert("d", &adapter(&model, 4, &qv, 12)).unwrap();
    bank.insert("e", &adapter(&model, 4, &qv, 13)).unwrap();
    bank.insert("f", &adapter(&model, 4, &qv, 14)).unwrap();
    assert_eq!(bank.capacity(), 8, "eight adapters in eight slots");
    assert_eq!(bank.stack_bytes(), 8 * per_adapter + scales(8));
    for n in bank
        .names()
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
    {
        bank.remove(&n).unwrap();
    }
    assert_eq!(
        (bank.capacity(), bank.stack_bytes()),
        (0, 0),
        "the last one frees all"
    );
}
on_devices!(slots_grow_and_are_reused, slots_cpu, slots_gpu);

fn any_history_gives_a_fresh_banks_numbers(device: &Device) {
    let mut model = model(device);
    let a = adapter(&model, 2, &[Target::Q, Target::V], 1);
    let big = adapter(&model, 8, &[Target::Q, Target::Fc], 2); // larger rank: a re-layout
    let c = adapter(&model, 4, &[Target::CAttn, Target::Proj], 3);
    let d = adapter(&model, 3, &[Target::O, Target::V], 4);
    // History: grow, re-lay out for rank 8, remove it (its rank stays), reuse its slot.
    let mut used = AdapterBank::new(&model);
    used.insert("a", &a).unwrap();
    used.insert("big", &big).unwrap();
    used.insert("c", &c).unwrap();
    used.remove("big").unwrap();
    used.insert("d", &d).unwrap();
    used.attach(&mut model).unwrap();
    let route = [Some("d"), None, Some("a"), Some("c")];
    used.route(&route).unwrap();
    let got = logits(&model);
    used.detach(&mut model).unwrap();
    let mut fresh = AdapterBank::new(&model);
    for (name, lora) in [("a", &a), ("c", &c), ("d", &d)] {
        fresh.insert(name, lora).unwrap();
    }
    fresh.attach(&mut model).unwrap();
    fresh.route(&route).unwrap();
    let want = logits(&model);
    assert_eq!(
        got, want,
        "the same adapters, another layout: the same numbers"
    );
    fresh.route(&[None; 4]).unwrap();
    let base = logits(&model);
    let v = model.config.vocab_size;
    for s in [0, 2, 3] {
        let rows = s * 3 * v..(s + 1) * 3 * v;
        assert_ne!(
            got[rows.clone()],
            base[rows],
            "sequence {s}: its adapter changes nothing"
        );
    }
}
on_devices!(
    any_history_gives_a_fresh_banks_numbers,
    history_cpu,
    history_gpu
);

#[test]
fn an_adapter_checked_for_another_shape_is_refused() {
    let model = model(&Device::cpu());
    let lora = adapter(&model, 2, &[Target::Q], 0);
    let mut other = model.config.clone();
    other.n_layer = 3;
    let host = HostAdapter::new("x", &lora, &other).unwrap();
    let mut bank = AdapterBank::new(&model);
    let e = bank.insert_host(host).unwrap_err().to_string();
    assert!(
        e.contains("checked for a model of 3 layers and width 64"),
        "{e}"
    );
    let mut narrow = model.config.clone();
    narrow.n_embd = 32;
    let e = HostAdapter::new("x", &lora, &narrow)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("do not fit a model of 2 layers and width 32"),
        "{e}"
    );
}

fn peft_q_v_adapters_are_split_back(device: &Device) {
    let mut model = model(device);
    // r 4, α 8 for both: the saved c_attn LoRA has rank 8 and the same scale 2, B unscaled.
    let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V]);
    cfg.init = Init::BothRandom;
    let qv = LoraModel::new(&model, &cfg, 5).unwrap();
    let dir = std::env::temp_dir().join(format!(
        "bank-split-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    qv.save_peft(&dir).unwrap();
    let loaded = LoraModel::load_peft(&dir, &model).unwrap().lora;
    let _ = std::fs::remove_dir_all(&dir);
    let c_attn = LoraModel::new(&model, &LoraConfig::new(8, 8.0, &[Target::CAttn]), 6).unwrap();
    assert_eq!(
        loaded.lora_bytes(),
        2 * qv.lora_bytes(),
        "saved as c_attn of rank 8"
    );
    let host = |l: &LoraModel| HostAdapter::new("x", l, &model.config).unwrap();
    assert_eq!(
        host(&loaded).bytes(),
        qv.lora_bytes(),
        "split back into q and v"
    );
    assert_eq!(
        host(&c_attn).bytes(),
        c_attn.lora_bytes(),
        "a c_attn adapter is one site"
    );
    let route = [Some("x"), None, Some("x"), None];
    let mut served = Vec::new();
    for lora in [&qv, &loaded] {
        let mut bank = AdapterBank::new(&model);
        bank.insert("x", lora).unwrap();
        bank.attach(&mut model).unwrap();
        bank.route(&route).unwrap();
        served.push(logits(&model));
        bank.detach(&mut model).unwrap();
    }
    assert_eq!(
        served[0], served[1],
        "the file's adapter serves the saved adapter's numbers"
    );
}
on_devices!(peft_q_v_adapters_are_split_back, split_cpu, split_gpu);
