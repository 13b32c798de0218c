//! Adapters PEFT 0.21 writes beyond plain LoRA, each made by PEFT itself
//! (`tests/fixtures/peft-variants/make.py`, which also records PEFT's float64 losses), loaded
//! here and checked against PEFT, on the CPU and on the GPU:
//! - the loss of the fixture's ids with the adapter (unmerged) within 1e-4 of PEFT's;
//! - after merging (and detaching, PEFT's merge_and_unload), and again after the merged model
//!   went through a checkpoint (what `train merge` writes), within 1e-4 of PEFT's merged loss;
//! - for LoRA on `wte` and on the tied `lm_head`, and a `modules_to_save` copy of `wte`, PEFT's
//!   merged loss differs from its unmerged one (PEFT adapts one use of the tied matrix, and its
//!   merge changes the matrix, or, for the copy, unties the head): both are matched.
//!
//! Also an adapter saved as `adapter_model.bin` (PyTorch's pickle, `safe_serialization=False`)
//! and one on a model whose MLP is not 4·n_embd wide (`n_inner`).
//!
//! Among them the cases that once loaded with a wrong scale and exit 0: `alpha_pattern` keys
//! that are regular expressions, and several keys matching one module (PEFT takes the first in
//! the file's order).

mod common;

use std::path::PathBuf;

use autograd::Tape;
use common::{batch, model};
use lora::LoraModel;
use tensor::Device;
use transformer::Gpt2;

fn case_dir(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/peft-variants"
    ))
    .join(name)
}

fn expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(case_dir(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn loss(model: &Gpt2) -> f64 {
    let (ids, targets, weights) = batch();
    let tape = Tape::inference();
    let l = model
        .loss(&tape, &ids, &targets, &weights, 1, ids.len())
        .unwrap();
    l.value.to_vec().unwrap()[0] as f64
}

/// The base model of case `name`: the fixture's, or for `n_inner` the hf-models fixture whose
/// MLP is n_inner = 20 wide, not 4·n_embd = 32.
fn base(name: &str, device: &Device) -> Gpt2 {
    if name != "n_inner" {
        return model(device);
    }
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/hf-models/n-inner"
    );
    let ckpt = transformer::Checkpoint::load(dir).unwrap();
    assert_eq!((ckpt.config.n_embd, ckpt.config.inner_size()), (8, 20));
    Gpt2::from_checkpoint(&ckpt, device, false).unwrap()
}

/// Loads case `name`, checks its loss unmerged, merged, and merged through a checkpoint.
fn check_case(name: &str, device: &Device) {
    let want = expected(name);
    let mut model = base(name, device);
    let loaded =
        LoraModel::load_peft(case_dir(name), &model).unwrap_or_else(|e| panic!("{name}: {e}"));
    for w in &loaded.warnings {
        println!("{name}: warning: {w}");
    }
    let mut lora = loaded.lora;
    lora.attach(&mut model).unwrap();
    let (got, peft) = (loss(&model), want["loss"].as_f64().unwrap());
    println!("{name} {device:?}: loss {got:.7}, PEFT {peft:.7}");
    assert!(
        (got - peft).abs() < 1e-4,
        "{name}: loss {got} vs PEFT {peft}"
    );
    let base = want["base_loss"].as_f64().unwrap();
    assert!(
        (peft - base).abs() > 1e-2,
        "{name}: the adapter must change the loss"
    );

    assert!(lora.merge(&model).unwrap());
    let peft_merged = want["merged_loss"].as_f64().unwrap();
    let merged = loss(&model);
    println!("{name} {device:?}: merged {merged:.7}, PEFT {peft_merged:.7}");
    assert!(
        (merged - peft_merged).abs() < 1e-4,
        "{name}: merged loss {merged} vs PEFT {peft_merged}"
    );
    lora.detach(&mut model).unwrap();
    let detached = loss(&model);
    assert!(
        (detached - peft_merged).abs() < 1e-4,
        "{name}: detached {detached}"
    );
    let ckpt = model.to_checkpoint().unwrap();
    let reloaded = Gpt2::from_checkpoint(&ckpt, device, false).unwrap();
    let again = loss(&reloaded);
    assert!(
        (again - peft_merged).abs() < 1e-4,
        "{name}: saved merged model {again}"
    );
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                fn body(device: &Device) {
                    check_case(stringify!($name), device);
                }
                tensor::on_devices!(body, cpu, gpu);
            }
        )*
    };
}

cases!(
    alpha_regex,
    alpha_first_key,
    pattern_first_key,
    rank_regex,
    exclude_list,
    exclude_regex,
    bias_all,
    bias_lora_only,
    lora_bias,
    modules_to_save_ln,
    dora,
    adalora,
    adalora_pruned,
    trainable_tokens,
    torch_bin,
    n_inner,
    embedding,
    lm_head,
    modules_to_save_wte,
);

#[test]
fn a_torch_bin_adapter_is_read_from_its_pickle() {
    let dir = case_dir("torch_bin");
    assert!(!dir.join(lora::WEIGHTS_FILE).exists());
    assert!(dir.join(lora::BIN_WEIGHTS_FILE).exists());
    let lora = LoraModel::load_peft(&dir, &model(&Device::cpu()))
        .unwrap()
        .lora;
    // c_attn and attn.c_proj of both layers (PEFT's `c_proj` also names mlp.c_proj: 2 × 3).
    assert_eq!(lora.sites().count(), 6);
}

#[test]
fn adapters_on_the_embedding_and_head_are_not_saved() {
    let model = model(&Device::cpu());
    for (name, says) in [
        ("embedding", "LoRA on the token embedding"),
        ("lm_head", "LoRA on the tied output head"),
        ("modules_to_save_wte", "modules_to_save copies"),
    ] {
        let lora = LoraModel::load_peft(case_dir(name), &model).unwrap().lora;
        let dir = integration_tests::scratch(&format!("{name}-save"));
        let e = lora.save_peft(&dir).unwrap_err().to_string();
        assert!(e.contains(says), "{name}: {e}");
    }
}

#[test]
fn a_merged_copy_of_wte_unties_the_head() {
    let cpu = Device::cpu();
    let mut model = model(&cpu);
    let wte0 = model.wte.value().to_vec().unwrap();
    let mut lora = LoraModel::load_peft(case_dir("modules_to_save_wte"), &model)
        .unwrap()
        .lora;
    lora.attach(&mut model).unwrap();
    lora.merge(&model).unwrap();
    lora.detach(&mut model).unwrap();
    assert!(!model.config.variant.tie_word_embeddings);
    let head = model.lm_head.as_ref().unwrap().value().to_vec().unwrap();
    assert_eq!(head, wte0, "the head keeps the original matrix");
    assert_ne!(model.wte.value().to_vec().unwrap(), wte0);
}

#[test]
fn a_lora_on_wte_unmerges_back_to_the_base() {
    let cpu = Device::cpu();
    let mut model = model(&cpu);
    let wte0 = model.wte.value().to_vec().unwrap();
    let mut lora = LoraModel::load_peft(case_dir("embedding"), &model)
        .unwrap()
        .lora;
    lora.attach(&mut model).unwrap();
    lora.merge(&model).unwrap();
    assert!(lora.unmerge(&model).unwrap());
    let back = model.wte.value().to_vec().unwrap();
    let drift = wte0
        .iter()
        .zip(&back)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(drift < 1e-5, "unmerge drift {drift}");
    let want = expected("embedding")["loss"].as_f64().unwrap();
    assert!((loss(&model) - want).abs() < 1e-4);
}

#[test]
fn eval_only_adapters_are_not_saved_or_banked() {
    let model = model(&Device::cpu());
    let lora = LoraModel::load_peft(case_dir("dora"), &model).unwrap().lora;
    assert_eq!(lora.eval_only(), ["DoRA magnitudes (use_dora)"]);
    let dir = integration_tests::scratch("dora-save");
    let e = lora.save_peft(&dir).unwrap_err().to_string();
    assert!(e.contains("DoRA magnitudes"), "{e}");
    let mut bank = lora::AdapterBank::new(&model);
    let e = bank.insert("d", &lora).unwrap_err().to_string();
    assert!(e.contains("DoRA magnitudes"), "{e}");
}

#[test]
fn unmerging_dora_restores_the_base() {
    let cpu = Device::cpu();
    let mut model = model(&cpu);
    let w0 = model.h[0]
        .c_attn
        .weight
        .dense("the test")
        .unwrap()
        .value()
        .to_vec()
        .unwrap();
    let mut lora = LoraModel::load_peft(case_dir("dora"), &model).unwrap().lora;
    lora.attach(&mut model).unwrap();
    lora.merge(&model).unwrap();
    assert!(lora.unmerge(&model).unwrap());
    let back = model.h[0]
        .c_attn
        .weight
        .dense("the test")
        .unwrap()
        .value()
        .to_vec()
        .unwrap();
    let drift = w0
        .iter()
        .zip(&back)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(drift < 1e-5, "unmerge drift {drift}");
    let want = expected("dora")["loss"].as_f64().unwrap();
    assert!((loss(&model) - want).abs() < 1e-4);
}

#[test]
fn an_n_inner_adapter_saves_and_loads_back_the_same() {
    let cpu = Device::cpu();
    let mut model = base("n_inner", &cpu);
    let lora = LoraModel::load_peft(case_dir("n_inner"), &model)
        .unwrap()
        .lora;
    let dir = integration_tests::scratch("n-inner-save");
    lora.save_peft(&dir).unwrap();
    let mut again = LoraModel::load_peft(&dir, &model).unwrap().lora;
    again.attach(&mut model).unwrap();
    let want = expected("n_inner")["loss"].as_f64().unwrap();
    let got = loss(&model);
    assert!(
        (got - want).abs() < 1e-4,
        "saved and reloaded: {got} vs PEFT {want}"
    );
}
