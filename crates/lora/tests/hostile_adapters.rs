//! Hostile adapter directories: `adapter_model.safetensors` and `adapter_config.json` damaged
//! or forged in every way the loaders' reliability issue lists, and adapters made for another
//! base model. Each is an error naming the file and what is wrong, never a panic or an
//! unbounded allocation. A mutation fuzzer (proptest, `PROPTEST_CASES` cases, default 256)
//! damages both files of a valid adapter at random.
//!
//! The adapters here are for tiny bases (L ≤ 2, C ≤ 4, rank 1), so their files are a few
//! hundred bytes and every-offset loops are quick. (`peft_io.rs` checks the PEFT fixture's
//! adapter on models of other layer counts, shapes, ranks and targets.)
//!
//! `cargo test -p lora --test hostile_adapters`

mod common;

use std::path::Path;

use common::{Scratch, scratch};
use integration_tests::hostile::{
    JsonEdit, Mutation, Watch, apply, edit_json, fuzz, join, json_edit, mutation, split, watched,
};
use lora::{CONFIG_FILE, LoraConfig, LoraModel, Target, WEIGHTS_FILE};
use proptest::prelude::*;
use serde_json::{Value, json};
use tensor::Device;
use transformer::tensor_file::{read_tensors, write_tensors};
use transformer::{Checkpoint, Gpt2, GptConfig, NamedTensor, SaveDtype};

#[global_allocator]
static WATCH: Watch = Watch;

/// The largest single allocation one load of these tiny adapters may make.
const ALLOCATION_BOUND: usize = 1 << 20;

/// A frozen GPT-2 of `n_layer` blocks and width `n_embd` (one head, V = 256, 4 positions).
fn base(n_layer: usize, n_embd: usize) -> Gpt2 {
    let text = format!(
        r#"{{"n_layer": {n_layer}, "n_head": 1, "n_embd": {n_embd}, "vocab_size": 256,
        "n_positions": 4}}"#
    );
    let config = GptConfig::from_json_str(&text).unwrap();
    let tensors = transformer::parameter_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            (name, shape, vec![0.25; n])
        })
        .collect();
    Gpt2::from_checkpoint(&Checkpoint::new(config, tensors), &Device::cpu(), false).unwrap()
}

/// A rank-1 c_attn adapter for `model`, saved in PEFT's layout in a fresh directory. B is set
/// to non-zero values so that a flip in it changes something.
fn adapter_dir(tag: &str, model: &Gpt2) -> Scratch {
    let dir = scratch(tag);
    let lora = LoraModel::new(model, &LoraConfig::new(1, 2.0, &[Target::CAttn]), 7).unwrap();
    lora.save_peft(&dir).unwrap();
    let path = dir.join(WEIGHTS_FILE);
    let mut tensors = read_tensors(&path).unwrap();
    for (_, _, data) in &mut tensors {
        data.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x += i as f32 * 0.125);
    }
    write(&path, &tensors);
    dir
}

fn write(path: &Path, tensors: &[NamedTensor]) {
    let views = tensors.iter().map(|(n, s, d)| (n.clone(), &s[..], &d[..]));
    write_tensors(path, views, SaveDtype::F32, None).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join(CONFIG_FILE);
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

/// The error of loading `dir` onto `model`; it must start with the path of one of its files.
fn load_error(dir: &Path, model: &Gpt2) -> String {
    match LoraModel::load_peft(dir, model) {
        Ok(_) => panic!("{} loaded, but should not", dir.display()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with(&dir.display().to_string()), "{e}");
            e
        }
    }
}

#[test]
fn adapter_weights_truncated_at_every_offset_name_the_file() {
    let model = base(2, 2);
    let dir = adapter_dir("cut", &model);
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    assert!(LoraModel::load_peft(&dir, &model).is_ok());
    for len in 0..bytes.len() {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let (e, largest) = watched(|| load_error(&dir, &model));
        assert!(e.starts_with(&format!("{}: not a", path.display())), "{e}");
        assert!(largest <= ALLOCATION_BOUND, "cut at {len}: {largest}");
    }
    println!("{} cuts", bytes.len());
}

#[test]
fn adapter_weights_with_a_flipped_byte_load_or_fail_naming_the_file() {
    let model = base(2, 2);
    let dir = adapter_dir("flip", &model);
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let (mut loaded, mut refused) = (0, 0);
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut damaged = bytes.clone();
            damaged[at] ^= mask;
            std::fs::write(&path, &damaged).unwrap();
            let (result, largest) = watched(|| LoraModel::load_peft(&dir, &model));
            assert!(largest <= ALLOCATION_BOUND, "flip at {at}: {largest}");
            match result {
                Ok(_) => {
                    assert!(at >= 8, "a flip of the header length loaded");
                    loaded += 1;
                }
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.starts_with(&path.display().to_string()), "{e}");
                    refused += 1;
                }
            }
        }
    }
    assert!(refused >= 24 && loaded > 0);
    println!(
        "{} flips: {loaded} loaded, {refused} refused",
        3 * bytes.len()
    );
}

#[test]
fn a_forged_header_length_is_refused_before_allocating() {
    let model = base(2, 2);
    let dir = adapter_dir("header-len", &model);
    let path = dir.join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let (e, largest) = watched(|| load_error(&dir, &model));
    assert!(
        e.contains("the header length says 18446744073709551615 bytes"),
        "{e}"
    );
    assert!(largest <= ALLOCATION_BOUND);
}

#[test]
fn nan_or_infinite_adapter_weights_are_refused_naming_the_tensor() {
    let model = base(2, 2);
    let dir = adapter_dir("nan", &model);
    let path = dir.join(WEIGHTS_FILE);
    let mut tensors = read_tensors(&path).unwrap();
    let b = tensors
        .iter_mut()
        .find(|(n, _, _)| n.ends_with("h.1.attn.c_attn.lora_B.weight"))
        .unwrap();
    b.2[2] = f32::INFINITY;
    b.2[4] = f32::NAN;
    write(&path, &tensors);
    let e = load_error(&dir, &model);
    assert!(
        e.contains(
            "h.1.attn.c_attn.lora_B.weight`: 2 of its 6 values are not finite (NaN or \
             infinite; the first, at index 2, is inf)"
        ),
        "{e}"
    );
}

#[test]
fn an_adapter_tensor_of_a_dtype_we_do_not_read_is_named() {
    let model = base(2, 2);
    let dir = adapter_dir("dtype", &model);
    let path = dir.join(WEIGHTS_FILE);
    let (mut header, data) = split(&std::fs::read(&path).unwrap());
    let key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight";
    header[key]["dtype"] = json!("I32");
    std::fs::write(&path, join(&header, &data)).unwrap();
    let e = load_error(&dir, &model);
    assert!(
        e.contains(&format!(
            "tensor `{key}`: expected dtype F32, F16 or BF16, found I32"
        )),
        "{e}"
    );
}

#[test]
fn adapter_config_that_is_not_an_object_or_lacks_a_field_is_named() {
    let model = base(2, 2);
    let dir = adapter_dir("config", &model);
    let path = dir.join(CONFIG_FILE);
    let cases: [(&[u8], &str); 8] = [
        (b"[]", "not a JSON object"),
        (b"4", "not a JSON object"),
        (b"{}", "`r` is missing or not an integer"),
        (br#"{"r": "one"}"#, "`r` is missing or not an integer"),
        (
            br#"{"r": 1, "lora_alpha": "big"}"#,
            "`lora_alpha` is not a number",
        ),
        (
            br#"{"r": 1, "target_modules": 3}"#,
            "target_modules is neither a list",
        ),
        (br#"{"r": 1, "#, "not JSON"),
        (&[b'{', 0xFE, b'}'], "not UTF-8 text"),
    ];
    for (text, want) in cases {
        std::fs::write(&path, text).unwrap();
        let e = load_error(&dir, &model);
        assert!(e.starts_with(&path.display().to_string()), "{e}");
        assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(text));
    }
    let mut huge = vec![b' '; lora::MAX_ADAPTER_CONFIG_BYTES as usize];
    huge.extend_from_slice(b"{}");
    std::fs::write(&path, huge).unwrap();
    let (e, largest) = watched(|| load_error(&dir, &model));
    assert!(e.contains("larger than 1048576 bytes"), "{e}");
    assert!(largest <= 4 << 20, "{largest}");
}

#[test]
fn an_adapter_for_another_base_model_says_what_differs() {
    let (two_by_two, wider, one_layer) = (base(2, 2), base(2, 4), base(1, 2));
    let dir = adapter_dir("other-base", &two_by_two);
    // Width: A is [1, 2] but the wider model's c_attn takes 4 inputs.
    let e = load_error(&dir, &wider);
    assert!(
        e.contains("lora_A is [1, 2] and lora_B [6, 1], but the model's W is [4, 12]"),
        "{e}"
    );
    // Layer count: weights for h.1 on a one-layer model.
    let e = load_error(&dir, &one_layer);
    assert!(
        e.contains("is for layer 1, but the model has 1 layer"),
        "{e}"
    );
    // Rank: the config says 2, the file holds rank 1.
    edit_config(&dir, |j| j["r"] = json!(2));
    let e = load_error(&dir, &two_by_two);
    assert!(
        e.contains("rank 1 in the file, but adapter_config.json says r = 2"),
        "{e}"
    );
    // Targets: the config names c_fc, the file has only c_attn.
    edit_config(&dir, |j| {
        j["r"] = json!(1);
        j["target_modules"] = json!(["c_attn", "c_fc"]);
    });
    let e = load_error(&dir, &two_by_two);
    assert!(
        e.contains("names h.0.mlp.c_fc but the file has no weights"),
        "{e}"
    );
    // layers_to_transform names a layer the model lacks.
    edit_config(&dir, |j| {
        j["target_modules"] = json!("c_attn"); // a regex: not checked against the file
        j["layers_to_transform"] = json!([0, 1, 5]);
    });
    let e = load_error(&dir, &two_by_two);
    assert!(
        e.contains("layers_to_transform names layer 5, but the model has 2 layers"),
        "{e}"
    );
}

#[test]
fn rank_zero_infinite_alpha_and_duplicate_weights_are_refused() {
    let model = base(2, 2);
    let dir = adapter_dir("rank0", &model);
    let path = dir.join(WEIGHTS_FILE);
    let good = read_tensors(&path).unwrap();
    // Rank 0 in the file and the config: A [0, 2], B [6, 0].
    let zero: Vec<NamedTensor> = good
        .iter()
        .map(|(n, s, _)| {
            let shape = if n.contains("lora_A") {
                vec![0, s[1]]
            } else {
                vec![s[0], 0]
            };
            (n.clone(), shape, vec![])
        })
        .collect();
    write(&path, &zero);
    edit_config(&dir, |j| j["r"] = json!(0));
    let e = load_error(&dir, &model);
    assert!(
        e.contains("rank 0 (lora_A is [0, 2]); a LoRA rank is at least 1"),
        "{e}"
    );
    // α beyond f32: 1e39 becomes infinity.
    write(&path, &good);
    edit_config(&dir, |j| {
        j["r"] = json!(1);
        j["lora_alpha"] = json!(1e39);
    });
    let e = load_error(&dir, &model);
    assert!(
        e.contains("lora_alpha is inf in adapter_config.json"),
        "{e}"
    );
    // The same LoRA weight with and without `transformer.`.
    edit_config(&dir, |j| j["lora_alpha"] = json!(2));
    let mut twice = good.clone();
    let (n, s, d) = good[0].clone();
    twice.push((n.replacen("transformer.", "", 1), s, d));
    write(&path, &twice);
    let e = load_error(&dir, &model);
    assert!(e.contains("holds this LoRA weight twice"), "{e}");
}

#[test]
fn fuzz_mutated_adapters_never_panic() {
    let model = base(2, 2);
    let dir = adapter_dir("fuzz", &model);
    let weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let (header, data) = split(&weights);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    let edits = || prop::collection::vec(json_edit(), 0..3);
    let bytes = || prop::collection::vec(mutation(), 0..3);
    let strategy = (edits(), bytes(), edits(), bytes());
    let damage = |json: &Value, edits: &[JsonEdit], bytes: &[Mutation], wrap: bool| {
        let mut json = json.clone();
        edits.iter().for_each(|e| edit_json(&mut json, e));
        let mut out = if wrap {
            join(&json, &data)
        } else {
            json.to_string().into_bytes()
        };
        bytes.iter().for_each(|m| apply(&mut out, m));
        out
    };
    fuzz(
        "adapter",
        strategy,
        ALLOCATION_BOUND,
        &dir.display().to_string(),
        |(h_edits, w_bytes, c_edits, c_bytes)| {
            let w = damage(&header, &h_edits, &w_bytes, true);
            let c = damage(&config, &c_edits, &c_bytes, false);
            std::fs::write(dir.join(WEIGHTS_FILE), w).unwrap();
            std::fs::write(dir.join(CONFIG_FILE), c).unwrap();
        },
        || LoraModel::load_peft(&dir, &model),
    );
}
