//! PEFT's adapter layout, both ways (on the CPU and on the GPU where a device is involved):
//! - save → load is bit-exact, with PEFT's key names, shapes and config keys;
//! - re-saving the fixture's PEFT adapter writes the same tensors PEFT wrote;
//! - q/v slice adapters are saved as the equivalent whole-c_attn adapter, which gives the same
//!   logits after reloading;
//! - an adapter that does not fit the model (layer count, shape, rank, targets) is an error
//!   that names what differs; unknown config keys come back as warnings.

mod common;

use tensor::on_devices;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Scratch, fixture, logits, model, model_with_layers, rel_diff, scratch};
use lora::{BiasMode, CONFIG_FILE, Init, KEY_PREFIX, LoraConfig, LoraModel, Target, WEIGHTS_FILE};
use tensor::Device;
use transformer::tensor_file::{read_tensors, write_tensors};
use transformer::{NamedTensor, SaveDtype};

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap()
}

/// Name → (shape, bits) of an adapter's weights file.
fn file_tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
    let read = read_tensors(&dir.join(WEIGHTS_FILE)).unwrap();
    read.into_iter()
        .map(|(n, s, v)| (n, (s, v.iter().map(|x| x.to_bits()).collect())))
        .collect()
}

fn save_load_is_bit_exact(device: &Device) {
    let mut model = model(device);
    let mut cfg = LoraConfig::new(
        4,
        8.0,
        &[Target::CAttn, Target::O, Target::Fc, Target::Proj],
    );
    cfg.init = Init::BothRandom;
    cfg.rank_pattern.insert(Target::Fc, 2);
    cfg.alpha_pattern.insert(Target::Proj, 5.0);
    cfg.bias = BiasMode::LoraOnly;
    cfg.dropout = 0.05;
    cfg.layers = Some(vec![1, 0]);
    let mut lora = LoraModel::inject(&mut model, &cfg, 11).unwrap();
    lora.base_model = Some("gpt2-tiny".into());
    let want = logits(&model);
    let dir = scratch("save-load");
    lora.save_peft(&dir).unwrap();

    // PEFT's key names and shapes: A (r, in), B (out, r); c_fc at rank 2.
    let tensors = file_tensors(&dir);
    let shape = |k: &str| tensors[&format!("{KEY_PREFIX}{k}")].0.clone();
    for l in 0..2 {
        assert_eq!(shape(&format!("h.{l}.attn.c_attn.lora_A.weight")), [4, 64]);
        assert_eq!(shape(&format!("h.{l}.attn.c_attn.lora_B.weight")), [192, 4]);
        assert_eq!(shape(&format!("h.{l}.attn.c_proj.lora_B.weight")), [64, 4]);
        assert_eq!(shape(&format!("h.{l}.mlp.c_fc.lora_A.weight")), [2, 64]);
        assert_eq!(shape(&format!("h.{l}.mlp.c_fc.lora_B.weight")), [256, 2]);
        assert_eq!(shape(&format!("h.{l}.mlp.c_proj.lora_A.weight")), [4, 256]);
        // lora_only bias, under the `base_layer` PEFT's LoRA layer wraps it in.
        assert_eq!(shape(&format!("h.{l}.mlp.c_fc.base_layer.bias")), [256]);
    }
    assert_eq!(
        tensors.len(),
        2 * (4 * 2 + 4),
        "8 A/B and 4 biases per layer"
    );
    let json = config_json(&dir);
    println!("{}", serde_json::to_string(&json).unwrap());
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["fan_in_fan_out"], true);
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"])
    );
    assert_eq!(json["rank_pattern"], serde_json::json!({"c_fc": 2}));
    assert_eq!(json["alpha_pattern"], serde_json::json!({"mlp.c_proj": 5}));
    assert_eq!(json["layers_to_transform"], serde_json::json!([0, 1]));
    assert_eq!(json["bias"], "lora_only");
    assert_eq!(json["lora_dropout"], 0.05);
    assert_eq!(json["init_lora_weights"], false);
    assert_eq!(json["base_model_name_or_path"], "gpt2-tiny");

    // Load into a fresh model: every A and B bit for bit, the same config, the same logits.
    let mut fresh = common::model(device);
    let loaded = LoraModel::load_peft(&dir, &fresh).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let mut back = loaded.lora;
    assert_eq!(back.config.rank_pattern, cfg.rank_pattern);
    assert_eq!(back.config.alpha_pattern, cfg.alpha_pattern);
    assert_eq!(
        (back.config.bias, back.config.dropout, back.config.init),
        (cfg.bias, cfg.dropout, cfg.init)
    );
    for ((s1, l1), (s2, l2)) in lora.sites().zip(back.sites()) {
        assert_eq!(s1, s2);
        for (p1, p2) in [(&l1.a, &l2.a), (&l1.b, &l2.b)] {
            let (v1, v2) = (p1.value().to_vec().unwrap(), p2.value().to_vec().unwrap());
            assert!(
                v1.iter().zip(&v2).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}",
                p1.name()
            );
        }
    }
    back.attach(&mut fresh).unwrap();
    assert_eq!(logits(&fresh), want, "same adapter, same logits");
    // Saving what was loaded writes the same file.
    let dir2 = scratch("save-again");
    back.save_peft(&dir2).unwrap();
    assert_eq!(file_tensors(&dir2), tensors);
}

fn peft_file_resaves_identically(device: &Device) {
    let model = model(device);
    let lora = LoraModel::load_peft(fixture().join("adapter"), &model)
        .unwrap()
        .lora;
    let dir = scratch("resave");
    lora.save_peft(&dir).unwrap();
    assert_eq!(file_tensors(&dir), file_tensors(&fixture().join("adapter")));
    let (ours, peft) = (config_json(&dir), config_json(&fixture().join("adapter")));
    for key in [
        "r",
        "lora_alpha",
        "target_modules",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "init_lora_weights",
    ] {
        assert_eq!(ours[key], peft[key], "`{key}`");
    }
}

fn qv_slices_save_as_c_attn(device: &Device) {
    let mut model = model(device);
    let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V]);
    cfg.init = Init::BothRandom;
    cfg.rank_pattern.insert(Target::V, 2); // s_v = 8/2 ≠ s_q = 8/4: B_v is rescaled by s_v/s_q
    let lora = LoraModel::inject(&mut model, &cfg, 5).unwrap();
    let want = logits(&model);
    let dir = scratch("qv");
    lora.save_peft(&dir).unwrap();
    let tensors = file_tensors(&dir);
    let a = &tensors[&format!("{KEY_PREFIX}h.0.attn.c_attn.lora_A.weight")];
    let b = &tensors[&format!("{KEY_PREFIX}h.0.attn.c_attn.lora_B.weight")];
    assert_eq!(
        (a.0.as_slice(), b.0.as_slice()),
        (&[6, 64][..], &[192, 6][..]),
        "r_q + r_v = 6"
    );
    let b_at = |row: usize, col: usize| f32::from_bits(b.1[row * 6 + col]);
    assert!(
        (0..192).all(|row| (0..6).all(|col| {
            let in_q = row < 64 && col < 4;
            let in_v = row >= 128 && col >= 4;
            in_q || in_v || b_at(row, col) == 0.0
        })),
        "B is zero outside the q and v blocks (k untouched)"
    );
    let json = config_json(&dir);
    assert_eq!(json["target_modules"], serde_json::json!(["c_attn"]));
    assert_eq!(json["rank_pattern"], serde_json::json!({"c_attn": 6}));
    assert_eq!(json["alpha_pattern"], serde_json::json!({"c_attn": 12})); // s_c = 12/6 = s_q

    let mut fresh = common::model(device);
    let mut back = LoraModel::load_peft(&dir, &fresh).unwrap().lora;
    assert_eq!(back.config.targets, [Target::CAttn]);
    back.attach(&mut fresh).unwrap();
    let d = rel_diff(&logits(&fresh), &want);
    println!("{device:?}: q/v saved as c_attn, reloaded: logits differ by {d:.2e} of their scale");
    assert!(d <= 1e-5);
}

/// Copies the fixture adapter to a new dir, with `edit` applied to its tensors and config.
fn edited_adapter(
    tag: &str,
    edit: impl FnOnce(&mut Vec<NamedTensor>, &mut serde_json::Value),
) -> Scratch {
    let src = fixture().join("adapter");
    let mut tensors = read_tensors(&src.join(WEIGHTS_FILE)).unwrap();
    let mut json = config_json(&src);
    edit(&mut tensors, &mut json);
    let dir = scratch(tag);
    let list = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.as_slice(), v.as_slice()));
    write_tensors(&dir.join(WEIGHTS_FILE), list, SaveDtype::F32, None).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), json.to_string()).unwrap();
    dir
}

fn load_error(dir: &Path, model: &transformer::Gpt2) -> String {
    match LoraModel::load_peft(dir, model) {
        Ok(_) => panic!("{} loaded, but should not fit", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mismatched_adapters_say_what_differs() {
    let cpu = Device::cpu();
    let adapter = fixture().join("adapter");
    // Layer count: the fixture adapter (2 layers) on models of 1 and 3 layers.
    let e = load_error(&adapter, &model_with_layers(1, &cpu));
    println!("{e}");
    assert!(
        e.contains(
            "h.1.attn.c_attn.lora_A.weight` is for layer 1, but the model has 1 layer (h.0)"
        ),
        "{e}"
    );
    let e = load_error(&adapter, &model_with_layers(3, &cpu));
    println!("{e}");
    assert!(
        e.contains(
            "names h.2.attn.c_attn but the file has no weights for it (the model has 3 layers (h.0..h.2)"
        ),
        "{e}"
    );
    let model = model(&cpu);
    // Shape: A with 32 columns where W has 64 rows.
    let dir = edited_adapter("shape", |t, _| {
        let a = t
            .iter_mut()
            .find(|(n, _, _)| n.ends_with("h.0.attn.c_attn.lora_A.weight"))
            .unwrap();
        a.1 = vec![4, 32];
        a.2.truncate(128);
    });
    let e = load_error(&dir, &model);
    println!("{e}");
    assert!(
        e.contains("lora_A is [4, 32] and lora_B [192, 4], but the model's W is [64, 192]"),
        "{e}"
    );
    // Rank: the config says 8, the file holds rank 4.
    let dir = edited_adapter("rank", |_, j| j["r"] = 8.into());
    let e = load_error(&dir, &model);
    println!("{e}");
    assert!(
        e.contains("rank 4 in the file, but adapter_config.json says r = 8"),
        "{e}"
    );
    // Targets: the config names c_fc too, the file has no c_fc weights.
    let dir = edited_adapter("targets", |_, j| {
        j["target_modules"] = serde_json::json!(["c_attn", "c_fc"])
    });
    let e = load_error(&dir, &model);
    println!("{e}");
    assert!(
        e.contains("names h.0.mlp.c_fc but the file has no weights for it"),
        "{e}"
    );
    // Targets the other way: the file has c_attn weights, the config names only c_proj.
    let dir = edited_adapter("targets2", |_, j| {
        j["target_modules"] = serde_json::json!(["c_proj"])
    });
    let e = load_error(&dir, &model);
    assert!(
        e.contains("the file has weights for h.0.attn.c_attn, which target_modules [\"c_proj\"] does not name"),
        "{e}"
    );
    // A feature the config sets without its tensors is an error; so is a feature this loader
    // does not compute; unknown keys are warnings.
    let dir = edited_adapter("dora", |_, j| j["use_dora"] = true.into());
    let e = load_error(&dir, &model);
    assert!(
        e.contains("sets use_dora but the file has no lora_magnitude_vector"),
        "{e}"
    );
    let dir = edited_adapter("replication", |_, j| {
        j["layer_replication"] = serde_json::json!([[0, 2], [1, 2]])
    });
    let e = load_error(&dir, &model);
    assert!(e.contains("`layer_replication` is [[0,2],[1,2]]"), "{e}");
    let dir = edited_adapter("unknown", |_, j| j["shiny_new_option"] = 3.into());
    let warnings = LoraModel::load_peft(&dir, &model).unwrap().warnings;
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("key `shiny_new_option` = 3 is not interpreted")),
        "{warnings:?}"
    );
    assert!(
        !warnings.iter().any(|w| w.contains("qalora_group_size")),
        "qalora_group_size only matters with use_qalora, which is refused: {warnings:?}"
    );
}

#[test]
fn attach_refuses_a_second_adapter_on_the_same_linear() {
    let cpu = Device::cpu();
    let mut model = model(&cpu);
    let mut a = LoraModel::inject(&mut model, &LoraConfig::new(2, 4.0, &[Target::Q]), 0).unwrap();
    let e = LoraModel::inject(&mut model, &LoraConfig::new(2, 4.0, &[Target::V]), 0)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("h.0.attn.c_attn already has an adapter"),
        "{e}"
    );
    a.detach(&mut model).unwrap();
    LoraModel::inject(&mut model, &LoraConfig::new(2, 4.0, &[Target::V]), 0).unwrap();
}

on_devices!(
    save_load_is_bit_exact,
    save_load_bit_exact_cpu,
    save_load_bit_exact_gpu
);
on_devices!(
    peft_file_resaves_identically,
    peft_resave_cpu,
    peft_resave_gpu
);
on_devices!(
    qv_slices_save_as_c_attn,
    qv_slices_as_c_attn_cpu,
    qv_slices_as_c_attn_gpu
);
