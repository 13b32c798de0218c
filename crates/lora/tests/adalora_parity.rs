//! AdaLoRA against PEFT's own: `tests/fixtures/adalora-steps` (see its `make_fixture.py`) holds
//! PEFT's AdaLoRA trained 12 AdamW steps on gpt2-tiny from recorded A, E, B, on recorded
//! batches. Replayed here from the same start: every step's loss (cross-entropy plus the
//! orthogonal regularizer) within 1e-4 relative, the budget of every step, the same singular
//! values kept at every allocation (steps 4, 6, 8 and the final one at 10), and the final
//! Λ (`lora_E`) within 1e-4.

mod common;

use std::collections::HashMap;

use autograd::{AdamW, Grads, ParamGroup, Tape};
use lora::target::Module;
use lora::{AdaLora, AdaLoraConfig, AdaLoraSchedule, RankAllocator, SvdUpdate};
use serde_json::Value;
use tensor::{Device, Tensor};

fn fixture_file(name: &str) -> std::path::PathBuf {
    integration_tests::fixture("adalora-steps").join(name)
}

/// The f32 tensors of a fixture's safetensors file, by PEFT's name without
/// `base_model.model.` and `.default`.
fn read_f32(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    read_f32_at(&fixture_file(name))
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .trim_start_matches("base_model.model.")
                .trim_end_matches(".default");
            (k.to_string(), v)
        })
        .collect()
}

/// The f32 tensors of a safetensors file, by their names in the file.
fn read_f32_at(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let data = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), data))
        })
        .collect()
}

fn replay(device: &Device) {
    let text = std::fs::read_to_string(fixture_file("expected.json")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    let text = std::fs::read_to_string(fixture_file("batches.json")).unwrap();
    let batches: Vec<Vec<Vec<u32>>> = serde_json::from_str(&text).unwrap();
    let cfg = &expected["adalora"];
    let int = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let float = |k: &str| cfg[k].as_f64().unwrap() as f32;
    let config = AdaLoraConfig {
        init_r: int("init_r"),
        target_r: int("target_r"),
        lora_alpha: float("lora_alpha"),
        modules: vec![Module::CAttn, Module::Fc],
        orth_reg_weight: float("orth_reg_weight"),
        schedule: AdaLoraSchedule {
            tinit: int("tinit"),
            tfinal: int("tfinal"),
            delta_t: int("deltaT"),
            beta1: float("beta1"),
            beta2: float("beta2"),
            total_step: int("total_step"),
        },
    };
    assert_eq!(cfg["target_modules"], serde_json::json!(["c_attn", "c_fc"]));
    let opt = &expected["optimizer"];
    assert_eq!(opt["weight_decay"].as_f64(), Some(0.0));
    assert_eq!(opt["betas"], serde_json::json!([0.9, 0.999]));
    assert_eq!(opt["eps"].as_f64(), Some(1e-8));
    let lr = opt["lr"].as_f64().unwrap() as f32;

    let init = read_f32("init.safetensors");
    let mut model = common::model(device);
    let ada = AdaLora::inject_with(&mut model, &config, |name, shape, device| {
        let (s, v) = init
            .get(name)
            .unwrap_or_else(|| panic!("init has no {name}"));
        assert_eq!(s, shape, "{name}");
        Ok(Tensor::from_vec(v.clone(), shape, device)?)
    })
    .unwrap();
    let names: Vec<&str> = ada.updates.iter().map(|(n, _)| n.as_str()).collect();
    let updates: Vec<&SvdUpdate> = ada.updates.iter().map(|(_, u)| u).collect();
    let trainables = ada
        .trainable_params()
        .into_iter()
        .map(|p| p.as_trainable().unwrap().clone())
        .collect();
    let mut optimizer = AdamW::new(vec![ParamGroup::new(trainables, 0.0)]);
    let mut allocator = RankAllocator::new(
        config.schedule.clone(),
        config.init_r,
        config.target_r,
        updates.len(),
    );

    let want_losses: Vec<f64> = serde_json::from_value(expected["losses"].clone()).unwrap();
    let want_budgets: Vec<usize> = serde_json::from_value(expected["budgets"].clone()).unwrap();
    let allocations = expected["allocations"].as_array().unwrap();
    let mut checked = 0;
    for (step, batch) in batches.iter().enumerate() {
        let (b, t) = (batch.len(), batch[0].len());
        let ids: Vec<u32> = batch.iter().flatten().copied().collect();
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        for row in batch {
            targets.extend(row[1..].iter().copied().chain([0]));
            weights.extend((0..t).map(|i| if i + 1 < t { 1.0 } else { 0.0 }));
        }
        let tape = Tape::new();
        let ce = model.loss(&tape, &ids, &targets, &weights, b, t).unwrap();
        let loss = ada.regularized(&tape, &ce).unwrap();
        let got = f64::from(loss.value.to_vec().unwrap()[0]);
        let want = want_losses[step];
        assert!(
            (got - want).abs() <= 1e-4 * want.abs(),
            "step {step}: loss {got}, PEFT {want}"
        );
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap();
        optimizer.step(&grads, lr).unwrap();
        assert_eq!(
            allocator.budget(step).0,
            want_budgets[step],
            "budget of step {step}"
        );
        let masked = allocator
            .update_and_allocate(step, &updates, &grads)
            .unwrap();
        if let Some(a) = allocations.iter().find(|a| a["step"] == step) {
            assert!(masked, "PEFT allocated at step {step}, we did not");
            let pattern = allocator.rank_pattern.as_ref().unwrap();
            for (name, keep) in names.iter().zip(pattern) {
                let key = format!("{name}.lora_E.default");
                let want: Vec<bool> = serde_json::from_value(a["rank_pattern"][&key].clone())
                    .unwrap_or_else(|e| panic!("step {step}: {key}: {e}"));
                assert_eq!(keep, &want, "step {step}: kept singular values of {name}");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, allocations.len());
    assert!(checked >= 2, "the fixture must allocate at least twice");

    let fin = read_f32("final.safetensors");
    for (name, u) in names.iter().zip(&updates) {
        let got = u.e.value().to_vec().unwrap();
        let (_, want) = &fin[&format!("{name}.lora_E")];
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4, "{name}.lora_E[{i}]: {g}, PEFT {w}");
        }
    }
    saved_as_peft_saves(&ada, &allocator, &model, device);
}

/// Saved with the final rank pattern: the same tensors (names, pruned shapes, values within
/// 1e-4) and rank pattern as PEFT's `save_pretrained` wrote, and loaded back by our PEFT loader
/// it computes what the trained model computes.
fn saved_as_peft_saves(
    ada: &AdaLora,
    allocator: &RankAllocator,
    model: &transformer::Gpt2,
    device: &Device,
) {
    let dir = common::scratch("adalora-save");
    ada.save_peft(&dir, allocator.rank_pattern.as_deref())
        .unwrap();
    let ours = read_f32_at(&dir.join("adapter_model.safetensors"));
    let peft = read_f32_at(&fixture_file("adapter/adapter_model.safetensors"));
    let mut names: Vec<&String> = ours.keys().collect();
    names.sort();
    let mut peft_names: Vec<&String> = peft.keys().collect();
    peft_names.sort();
    assert_eq!(names, peft_names);
    for n in names {
        let ((s1, v1), (s2, v2)) = (&ours[n], &peft[n]);
        assert_eq!(s1, s2, "{n}");
        let worst = v1
            .iter()
            .zip(v2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "{n}: differs from PEFT's by {worst}");
    }
    let config = |path: std::path::PathBuf| -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let (ours, peft) = (
        config(dir.join("adapter_config.json")),
        config(fixture_file("adapter/adapter_config.json")),
    );
    for key in [
        "peft_type",
        "rank_pattern",
        "init_r",
        "target_r",
        "lora_alpha",
        "tinit",
        "tfinal",
        "deltaT",
        "total_step",
    ] {
        assert_eq!(ours[key], peft[key], "adapter_config.json `{key}`");
    }

    let (ids, _, _) = common::batch();
    let trained = common::logits(model);
    let mut base = common::model(device);
    let mut loaded = lora::LoraModel::load_peft(&dir, &base).unwrap().lora;
    loaded.attach(&mut base).unwrap();
    let got = common::logits(&base);
    assert_eq!(got.len(), ids.len() * 256);
    let diff = common::rel_diff(&got, &trained);
    assert!(
        diff < 1e-5,
        "loaded adapter's logits differ from the trained model's by {diff}"
    );
}

tensor::on_devices!(
    replay,
    adalora_replays_peft_losses_masks_and_singular_values_cpu,
    adalora_replays_peft_losses_masks_and_singular_values_gpu
);
