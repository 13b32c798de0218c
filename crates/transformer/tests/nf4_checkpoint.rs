//! Checkpoints transformers + bitsandbytes saved in NF4 (tests/fixtures/gpt2-tiny-nf4, made by
//! its make.py): we read every quantized weight and dequantize it to bitsandbytes' own values
//! bit for bit; we quantize the original f32 weights to the same codes; and what we write reads
//! back the same.

use safetensors::SafeTensors;
use tensor::quant::{Nf4Weight, Scales};
use transformer::Checkpoint;
use transformer::nf4_file::{QUANT_STATE, is_quant_part, nf4_tensors, read_nf4_weights};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn read(path: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{path}")).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn bitsandbytes_checkpoints_dequantize_to_bitsandbytes_values_bit_for_bit() {
    for variant in ["dq", "plain"] {
        let model = read(&format!("gpt2-tiny-nf4/{variant}/model.safetensors"));
        let expected = read(&format!("gpt2-tiny-nf4/{variant}/expected.safetensors"));
        let (model, expected) = (
            SafeTensors::deserialize(&model).unwrap(),
            SafeTensors::deserialize(&expected).unwrap(),
        );
        let weights = read_nf4_weights(&model).unwrap();
        assert_eq!(weights.len(), 8, "{variant}: 4 linears × 2 layers");
        for (name, w) in &weights {
            assert_eq!(
                matches!(w.scales(), Scales::Double { .. }),
                variant == "dq",
                "{name}"
            );
            let want: Vec<f32> =
                bytemuck::pod_collect_to_vec(expected.tensor(name).unwrap().data());
            assert_eq!(bits(&w.dequantize()), bits(&want), "{variant}: {name}");
        }
    }
}

#[test]
fn quantizing_the_f32_model_gives_bitsandbytes_codes() {
    let base = Checkpoint::load(format!("{FIXTURES}/gpt2-tiny")).unwrap();
    let model = read("gpt2-tiny-nf4/plain/model.safetensors");
    let theirs = read_nf4_weights(&SafeTensors::deserialize(&model).unwrap()).unwrap();
    for (name, w) in &theirs {
        // Conv1D stores W as (in, out); transformers quantizes Wᵀ, (out, in).
        let ours_name = name.strip_prefix("transformer.").unwrap();
        let (shape, values) = base.get(ours_name).unwrap();
        let (rows, cols) = (shape[0], shape[1]);
        let transposed: Vec<f32> = (0..rows * cols)
            .map(|e| values[(e % rows) * cols + e / rows])
            .collect();
        let ours = Nf4Weight::quantize(&transposed, &[cols, rows], 64, false).unwrap();
        assert_eq!(ours.shape(), w.shape(), "{name}");
        assert_eq!(ours.bytes(), w.bytes(), "{name}: codes");
        assert_eq!(ours.scales(), w.scales(), "{name}: scales");
    }
}

#[test]
fn what_we_write_reads_back_the_same() {
    let model = read("gpt2-tiny-nf4/dq/model.safetensors");
    let theirs = read_nf4_weights(&SafeTensors::deserialize(&model).unwrap()).unwrap();
    let mut tensors = Vec::new();
    for (name, w) in &theirs {
        tensors.extend(nf4_tensors(name, w));
    }
    // Every key bitsandbytes wrote for the quantized weights, and no other.
    let file = SafeTensors::deserialize(&model).unwrap();
    let mut their_keys: Vec<String> = file
        .names()
        .into_iter()
        .filter(|k| is_quant_part(k) || theirs.contains_key(*k))
        .map(|k| k.to_string())
        .collect();
    let mut our_keys: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    their_keys.sort();
    our_keys.sort();
    assert_eq!(our_keys, their_keys);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let back = read_nf4_weights(&SafeTensors::deserialize(&bytes).unwrap()).unwrap();
    assert_eq!(back, theirs);
    // The JSON state carries what bitsandbytes' own reader needs.
    let state = String::from_utf8(
        tensors
            .iter()
            .find(|t| t.0.ends_with(QUANT_STATE))
            .unwrap()
            .3
            .clone(),
    )
    .unwrap();
    for field in [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ] {
        assert!(state.contains(field), "{state}");
    }
}

#[test]
fn other_formats_are_refused_by_name() {
    let model = read("gpt2-tiny-nf4/plain/model.safetensors");
    let file = SafeTensors::deserialize(&model).unwrap();
    let w = read_nf4_weights(&file)
        .unwrap()
        .into_values()
        .next()
        .unwrap();
    let mut tensors = nf4_tensors("x.weight", &w);
    let state = tensors
        .iter_mut()
        .find(|t| t.0.ends_with(QUANT_STATE))
        .unwrap();
    state.3 = String::from_utf8(state.3.clone())
        .unwrap()
        .replace("float32", "bfloat16")
        .into_bytes();
    state.2 = vec![state.3.len()];
    let views: Vec<_> = tensors
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    let err = read_nf4_weights(&SafeTensors::deserialize(&bytes).unwrap()).unwrap_err();
    assert!(
        err.contains("x.weight") && err.contains("bfloat16"),
        "{err}"
    );
}

/// Our model with NF4 Linears computes what transformers' bitsandbytes model computes (f32
/// products in another order): quantized by us (plain: the same codes bit for bit), and loaded
/// from the directories transformers + bitsandbytes saved (double quantization: bitsandbytes'
/// nested codes).
fn quantized_logits_match(device: &tensor::Device) {
    use autograd::Tape;
    use transformer::{Gpt2, Weight};
    for (variant, ours) in [("plain", true), ("plain", false), ("dq", false)] {
        let ckpt = if ours {
            let mut ckpt = Checkpoint::load(format!("{FIXTURES}/gpt2-tiny")).unwrap();
            ckpt.quantize_nf4(false).unwrap();
            ckpt
        } else {
            Checkpoint::load(format!("{FIXTURES}/gpt2-tiny-nf4/{variant}")).unwrap()
        };
        let model = Gpt2::from_checkpoint(&ckpt, device, false).unwrap();
        assert!(model.linears().all(|l| matches!(l.weight, Weight::Nf4(_))));
        let expected = read(&format!("gpt2-tiny-nf4/{variant}/expected.safetensors"));
        let expected = SafeTensors::deserialize(&expected).unwrap();
        let ids: Vec<i64> = bytemuck::pod_collect_to_vec(expected.tensor("ids").unwrap().data());
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let want: Vec<f32> =
            bytemuck::pod_collect_to_vec(expected.tensor("logits").unwrap().data());
        let logits = model
            .logits(&Tape::inference(), &ids, 1, ids.len())
            .unwrap();
        let got = logits.value.to_vec().unwrap();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{variant} (ours {ours}): logits differ from bitsandbytes' by {worst}"
        );
    }
}

#[test]
fn quantized_model_logits_match_bitsandbytes_on_the_cpu() {
    quantized_logits_match(&tensor::Device::cpu());
}

#[test]
fn quantized_model_logits_match_bitsandbytes_on_the_gpu() {
    if let Some(gpu) = tensor::testing::gpu() {
        quantized_logits_match(&gpu);
    }
}

#[test]
fn a_quantized_model_refuses_what_needs_f32_weights_by_name() {
    let device = tensor::Device::cpu();
    let mut ckpt = Checkpoint::load(format!("{FIXTURES}/gpt2-tiny")).unwrap();
    let params = transformer::Gpt2::from_checkpoint(&ckpt, &device, false)
        .unwrap()
        .num_params();
    ckpt.quantize_nf4(false).unwrap();
    let model = transformer::Gpt2::from_checkpoint(&ckpt, &device, false).unwrap();
    assert_eq!(model.num_params(), params, "quantized weights still count");
    let err = model.to_checkpoint().err().unwrap().to_string();
    assert!(
        err.contains("h.0.attn.c_attn.weight") && err.contains("NF4"),
        "{err}"
    );
    let err = transformer::Gpt2::from_checkpoint(&ckpt, &device, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("h.0.attn.c_attn.weight") && err.contains("cannot be trained"),
        "{err}"
    );
}

/// Loading a directory transformers saved in NF4 keeps bitsandbytes' codes as they are (no
/// dequantize-requantize), and what we save reads back the same: the same tensors, keys and
/// `quantization_config` transformers needs.
#[test]
fn quantized_directories_load_and_save_exactly() {
    for variant in ["plain", "dq"] {
        let dir = format!("{FIXTURES}/gpt2-tiny-nf4/{variant}");
        let ckpt = Checkpoint::load(&dir).unwrap();
        let file = read(&format!("gpt2-tiny-nf4/{variant}/model.safetensors"));
        let theirs = read_nf4_weights(&SafeTensors::deserialize(&file).unwrap()).unwrap();
        assert_eq!(ckpt.nf4.len(), 8, "{variant}");
        for (name, w) in &theirs {
            assert_eq!(&ckpt.nf4[name.strip_prefix("transformer.").unwrap()], w);
        }
        let out = std::env::temp_dir().join(format!("nf4-save-{variant}-{}", std::process::id()));
        ckpt.save(&out).unwrap();
        assert_eq!(Checkpoint::load(&out).unwrap(), ckpt, "{variant}");
        // Every tensor key transformers wrote, and no other (the attention buffers aside).
        let ours = std::fs::read(out.join("model.safetensors")).unwrap();
        let key_set = |bytes: &[u8]| -> Vec<String> {
            let mut keys: Vec<String> = SafeTensors::deserialize(bytes)
                .unwrap()
                .names()
                .into_iter()
                .filter(|k| !k.ends_with(".attn.bias") && !k.ends_with(".attn.masked_bias"))
                .map(|k| k.to_string())
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(key_set(&ours), key_set(&file), "{variant}");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        let theirs: serde_json::Value =
            serde_json::from_slice(&read(&format!("gpt2-tiny-nf4/{variant}/config.json"))).unwrap();
        assert_eq!(
            config["quantization_config"], theirs["quantization_config"],
            "{variant}"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn inconsistent_quantized_directories_are_refused_by_name() {
    let tmp = std::env::temp_dir().join(format!("nf4-refuse-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = format!("{FIXTURES}/gpt2-tiny-nf4/plain");
    std::fs::copy(
        format!("{src}/model.safetensors"),
        tmp.join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(format!("{src}/config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&config).unwrap();
    // NF4 tensors without the config that says so.
    value.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(tmp.join("config.json"), value.to_string()).unwrap();
    let err = Checkpoint::load(&tmp).unwrap_err().to_string();
    assert!(err.contains("quantization_config"), "{err}");
    // 8-bit and FP4 are other formats.
    for (key, val, says) in [
        ("load_in_8bit", serde_json::json!(true), "load_in_8bit"),
        ("bnb_4bit_quant_type", serde_json::json!("fp4"), "fp4"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&config).unwrap();
        v["quantization_config"][key] = val;
        std::fs::write(tmp.join("config.json"), v.to_string()).unwrap();
        let err = Checkpoint::load(&tmp).unwrap_err().to_string();
        assert!(err.contains(says) && err.contains("config.json"), "{err}");
    }
    // A float model's file under a config that asks for NF4.
    std::fs::copy(
        format!("{FIXTURES}/gpt2-tiny/model.safetensors"),
        tmp.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(tmp.join("config.json"), &config).unwrap();
    let err = Checkpoint::load(&tmp).unwrap_err().to_string();
    assert!(err.contains("holds none"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
