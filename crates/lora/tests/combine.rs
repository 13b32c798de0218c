//! [`lora::combine`] against PEFT's `add_weighted_adapter` (`tests/fixtures/combine/make.py`):
//! two PEFT adapters combined with weights 0.7 and −0.4 as `linear`, `cat`, `svd` (rank 3) and
//! `ties` (density 0.5, and 0.7 with the `frequency` sign election).
//! For each type:
//! - our A and B equal PEFT's (`linear`, `cat`, `ties`: 1e-5), or our ΔW = B·A does (`svd`, whose
//!   factors are unique only up to the signs of the singular vectors);
//! - the adapter we save loads back, and its logits of the fixture's ids are PEFT's (1e-4), its
//!   loss PEFT's float64 one (1e-4);
//! - its config is PEFT's: r = lora_alpha = the new rank, the union of the targets.

mod common;

use std::path::{Path, PathBuf};

use autograd::Tape;
use common::{batch, model};
use lora::combine::MajoritySign;
use lora::{Combination, CombineInput, LoraModel, combine};
use nalgebra::DMatrix;
use serde_json::Value;
use tensor::Device;
use transformer::tensor_file::read_tensors;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/combine"
    ))
    .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The combined adapter of our `combine` for case `name` (PEFT's options from its expected.json).
fn ours(name: &str) -> lora::Combined {
    let model = model(&Device::cpu());
    let want = json(&dir(name).join("expected.json"));
    let how = match want["combination_type"].as_str().unwrap() {
        "linear" => Combination::Linear,
        "cat" => Combination::Cat,
        "svd" => Combination::Svd {
            rank: want["svd_rank"].as_u64().map(|r| r as usize),
            clamp: None,
        },
        "ties" => Combination::Ties {
            density: want["density"].as_f64().unwrap(),
            majority: match want["majority_sign_method"].as_str() {
                Some("frequency") => MajoritySign::Frequency,
                _ => MajoritySign::Total,
            },
        },
        other => panic!("{other}"),
    };
    let weights: Vec<f64> = want["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    let names = ["a1", "a2"];
    let loras: Vec<LoraModel> = names
        .iter()
        .map(|n| LoraModel::load_peft(dir(n), &model).unwrap().lora)
        .collect();
    let configs: Vec<Value> = names
        .iter()
        .map(|n| json(&dir(n).join("adapter_config.json")))
        .collect();
    let inputs: Vec<CombineInput> = (0..2)
        .map(|i| CombineInput {
            lora: &loras[i],
            config: &configs[i],
            weight: weights[i],
        })
        .collect();
    combine(&inputs, how).unwrap()
}

fn matrix(rows: usize, cols: usize, v: &[f32]) -> DMatrix<f64> {
    DMatrix::from_row_slice(rows, cols, v).map(|x| x as f64)
}

fn check(name: &str) {
    let combined = ours(name);
    let peft = read_tensors(&dir(name).join("adapter_model.safetensors")).unwrap();
    let get = |key: &str| {
        peft.iter()
            .find(|(n, _, _)| n == key)
            .unwrap_or_else(|| panic!("{name}: PEFT's file has no {key}"))
            .clone()
    };
    assert_eq!(
        combined.modules.len() * 2,
        peft.len(),
        "{name}: module count"
    );
    for m in &combined.modules {
        let stem = format!("{}h.{}.{}", lora::KEY_PREFIX, m.layer, m.module.path());
        let (sa, a) = (
            get(&format!("{stem}.lora_A.weight")).1,
            get(&format!("{stem}.lora_A.weight")).2,
        );
        let (sb, b) = (
            get(&format!("{stem}.lora_B.weight")).1,
            get(&format!("{stem}.lora_B.weight")).2,
        );
        assert_eq!(
            (sa.as_slice(), sb.as_slice()),
            (&[m.r, m.in_features][..], &[m.out_features, m.r][..])
        );
        if name == "svd" {
            let got = matrix(m.out_features, m.r, &m.b) * matrix(m.r, m.in_features, &m.a);
            let want = matrix(m.out_features, m.r, &b) * matrix(m.r, m.in_features, &a);
            let d = (got - want).abs().max();
            assert!(d < 1e-5, "{name} {stem}: ΔW differs by {d}");
        } else {
            let d =
                m.a.iter()
                    .chain(&m.b)
                    .zip(a.iter().chain(&b))
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
            assert!(d < 1e-5, "{name} {stem}: A, B differ by {d}");
        }
    }

    // Saved, loaded back, attached: PEFT's logits and loss.
    let out = common::scratch(&format!("combine-{name}"));
    combined.save(&out).unwrap();
    let config = json(&out.join("adapter_config.json"));
    let theirs = json(&dir(name).join("adapter_config.json"));
    for key in ["r", "lora_alpha", "use_rslora", "fan_in_fan_out"] {
        assert_eq!(config[key], theirs[key], "{name}: {key}");
    }
    let set = |v: &Value| {
        let mut t: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    assert_eq!(
        set(&config["target_modules"]),
        set(&theirs["target_modules"])
    );

    let device = Device::cpu();
    let mut model = model(&device);
    let mut lora = LoraModel::load_peft(&out, &model).unwrap().lora;
    lora.attach(&mut model).unwrap();
    let (ids, targets, weights) = batch();
    let tape = Tape::inference();
    let logits = model
        .logits(&tape, &ids, 1, ids.len())
        .unwrap()
        .value
        .to_vec()
        .unwrap();
    let want = read_tensors(&dir(name).join("expected.safetensors")).unwrap();
    let d = logits
        .iter()
        .zip(&want[0].2)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    println!("{name}: logits differ from PEFT's by {d}");
    assert!(d < 1e-4, "{name}: logits differ by {d}");
    let loss = model
        .loss(&tape, &ids, &targets, &weights, 1, ids.len())
        .unwrap()
        .value
        .to_vec()
        .unwrap()[0] as f64;
    let peft_loss = json(&dir(name).join("expected.json"))["loss"]
        .as_f64()
        .unwrap();
    assert!(
        (loss - peft_loss).abs() < 1e-4,
        "{name}: loss {loss} vs PEFT {peft_loss}"
    );
}

#[test]
fn linear_is_peft_s() {
    check("linear");
}

#[test]
fn cat_is_peft_s() {
    check("cat");
}

#[test]
fn svd_is_peft_s() {
    check("svd");
}

#[test]
fn ties_is_peft_s() {
    check("ties");
    check("ties_frequency");
}

#[test]
fn linear_refuses_unequal_ranks() {
    let model = model(&Device::cpu());
    let lora = LoraModel::load_peft(dir("a1"), &model).unwrap().lora;
    let c1 = json(&dir("a1").join("adapter_config.json"));
    let mut c2 = c1.clone();
    c2["r"] = 8.into();
    let inputs = [
        CombineInput {
            lora: &lora,
            config: &c1,
            weight: 1.0,
        },
        CombineInput {
            lora: &lora,
            config: &c2,
            weight: 1.0,
        },
    ];
    let e = combine(&inputs, Combination::Linear)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[4, 8]") && e.contains("`cat` or `svd`"), "{e}");
}
