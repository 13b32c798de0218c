//! LoRA's invariants, each as a test (on the CPU and on the GPU):
//! 1. B = 0 at init: the adapted model's logits equal the base model's, bit for bit;
//! 2. merged logits equal unmerged ones (to 1e-5 of the logits' scale); unmerge gives W0 back
//!    to f32 rounding (the drift is printed); merge 1, unmerge, merge 2 gives adapter 2;
//! 3. after one training step only A and B (and the biases the bias mode names) have gradients
//!    and optimizer state (2 × their bytes), every B has moved off zero, W0 is bitwise unchanged;
//! 4. GPT-2 small with r = 8 on q, v has PEFT's 294,912 trainable parameters;
//! 5. dropout on the adapter's input draws a fresh mask per call, replayable from the seed.

mod common;

use tensor::on_devices;

use autograd::{AdamW, Grads, ParamGroup, Tape};
use common::{batch, fixture, logits, model, rel_diff};
use lora::{BiasMode, Init, LoraConfig, LoraModel, Target};
use tensor::Device;
use transformer::GptConfig;

const ALL_TARGETS: [Target; 5] = [Target::Q, Target::V, Target::O, Target::Fc, Target::Proj];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every base parameter's bits, by name.
fn snapshot(model: &transformer::Gpt2) -> Vec<(String, Vec<u32>)> {
    let params = model.named_params();
    params
        .iter()
        .map(|p| (p.name().to_string(), bits(&p.value().to_vec().unwrap())))
        .collect()
}

fn zero_b_gives_base_logits_bitwise(device: &Device) {
    let base = logits(&model(device));
    for targets in [&ALL_TARGETS[..], &[Target::CAttn, Target::O]] {
        let mut model = model(device);
        let mut cfg = LoraConfig::new(4, 8.0, targets);
        cfg.dropout = 0.1; // dropout acts on x before A: with B = 0 it changes nothing either
        let lora = LoraModel::inject(&mut model, &cfg, 7).unwrap();
        for (_, l) in lora.sites() {
            assert!(l.b.value().to_vec().unwrap().iter().all(|&b| b == 0.0));
        }
        let (ids, _, _) = batch();
        let tape = Tape::new(); // a training tape, so dropout is live
        let adapted = model
            .logits(&tape, &ids, 1, ids.len())
            .unwrap()
            .value
            .to_vec()
            .unwrap();
        assert_eq!(
            bits(&adapted),
            bits(&base),
            "B = 0 must give the base logits exactly ({targets:?})"
        );
    }
}

fn merge_unmerge_and_switch(device: &Device) {
    let mut model = model(device);
    let base = logits(&model);
    let w0 = snapshot(&model);
    // Adapter 1: PEFT's (whole c_attn). Adapter 2: q and v slices plus the MLP, random B.
    let a1 = LoraModel::load_peft(fixture().join("adapter"), &model)
        .unwrap()
        .lora;
    let mut cfg = LoraConfig::new(4, 8.0, &ALL_TARGETS);
    cfg.init = Init::BothRandom;
    cfg.rank_pattern.insert(Target::V, 2);
    cfg.alpha_pattern.insert(Target::Fc, 3.0);
    let a2 = LoraModel::new(&model, &cfg, 1).unwrap();

    println!("== {device:?}");
    let mut unmerged = Vec::new();
    for (name, lora) in [
        ("adapter 1 (c_attn)", a1),
        ("adapter 2 (q,v,o,fc,proj)", a2),
    ] {
        let mut lora = lora;
        lora.attach(&mut model).unwrap();
        let want = logits(&model);
        assert!(rel_diff(&want, &base) > 1e-3, "{name} changes the function");
        assert!(lora.merge(&model).unwrap());
        assert!(
            !lora.merge(&model).unwrap(),
            "a second merge changes nothing"
        );
        let merged = logits(&model);
        let d = rel_diff(&merged, &want);
        println!("{name}: merged vs unmerged logits: max |diff| / max |logit| = {d:.2e}");
        assert!(d <= 1e-5);
        assert!(lora.unmerge(&model).unwrap());
        assert!(
            !lora.unmerge(&model).unwrap(),
            "a second unmerge changes nothing"
        );
        let mut drift = 0.0f32;
        for ((name, before), p) in w0.iter().zip(model.named_params()) {
            let now = p.value().to_vec().unwrap();
            for (&b, &n) in before.iter().zip(&now) {
                let (b, n) = (f32::from_bits(b), n);
                let d = (b - n).abs();
                // (W0 + ΔW) − ΔW in f32: within half an ulp of W0 + ΔW, so a few ulps of W0.
                assert!(
                    d <= 4.0 * f32::EPSILON * (b.abs() + 1.0),
                    "{name}: {b} became {n}"
                );
                drift = drift.max(d);
            }
        }
        println!("{name}: unmerge(merge(W0)) − W0: max |drift| = {drift:.2e}");
        lora.detach(&mut model).unwrap();
        unmerged.push((want, lora));
    }

    // Switching task, both detached: merge 1, unmerge 1, merge 2.
    let (want1, a1) = &unmerged[0];
    let (want2, a2) = &unmerged[1];
    a1.merge(&model).unwrap();
    let d1 = rel_diff(&logits(&model), want1);
    a1.unmerge(&model).unwrap();
    a2.merge(&model).unwrap();
    let d2 = rel_diff(&logits(&model), want2);
    println!(
        "switch: adapter 1 merged {d1:.2e}, then adapter 2 merged {d2:.2e} (vs their unmerged logits)"
    );
    assert!(d1 <= 1e-5 && d2 <= 1e-5);
    a2.unmerge(&model).unwrap();
    let d0 = rel_diff(&logits(&model), &base);
    println!("after unmerging both: vs base logits {d0:.2e}");
    assert!(d0 <= 1e-5);
}

fn one_step_trains_only_the_adapters(device: &Device) {
    for bias in [BiasMode::None, BiasMode::LoraOnly, BiasMode::All] {
        let mut model = model(device);
        let w0 = snapshot(&model);
        let mut cfg = LoraConfig::new(4, 8.0, &ALL_TARGETS);
        cfg.bias = bias;
        let lora = LoraModel::inject(&mut model, &cfg, 3).unwrap();
        let trainable = lora.trainable_params();
        let n_sites = lora.sites().count();
        let n_bias = match bias {
            BiasMode::None => 0,
            // c_attn (q and v share it), attn.c_proj, mlp.c_fc, mlp.c_proj in 2 layers
            BiasMode::LoraOnly => 8,
            // 6 a block (ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj) × 2, and ln_f
            BiasMode::All => 13,
        };
        assert_eq!(trainable.len(), 2 * n_sites + n_bias, "{bias:?}");
        let counted = cfg.count(&model.config).unwrap();
        assert_eq!(
            counted,
            lora.param_count(&model),
            "the size table and the model agree"
        );

        let (ids, targets, weights) = batch();
        let tape = Tape::new();
        let loss = model
            .loss(&tape, &ids, &targets, &weights, 1, ids.len())
            .unwrap();
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap();
        let mut ids_with_grads: Vec<_> = grads.ids().collect();
        let mut expected: Vec<_> = trainable.iter().map(|t| t.id).collect();
        ids_with_grads.sort();
        expected.sort();
        assert_eq!(
            ids_with_grads, expected,
            "{bias:?}: gradients exist exactly for A, B (+ biases)"
        );
        let mut opt = AdamW::new(vec![ParamGroup::new(trainable.clone(), 0.01)]);
        opt.step(&grads, 1e-3).unwrap();
        let trained_bytes: u64 = trainable.iter().map(|t| t.value.bytes()).sum();
        assert_eq!(
            opt.memory().live,
            2 * trained_bytes,
            "{bias:?}: AdamW keeps m and v only for them"
        );
        if bias == BiasMode::None {
            assert_eq!(trained_bytes, lora.lora_bytes());
        }
        for (site, l) in lora.sites() {
            let b = l.b.value().to_vec().unwrap();
            assert!(
                b.iter().any(|&x| x != 0.0),
                "{}: B moved off zero",
                lora::site_name(site)
            );
        }
        let trained_names: Vec<&str> = trainable.iter().map(|t| t.name.as_str()).collect();
        for ((name, before), p) in w0.iter().zip(model.named_params()) {
            let now = bits(&p.value().to_vec().unwrap());
            if trained_names.contains(&name.as_str()) {
                assert_ne!(&now, before, "{bias:?}: trainable bias {name} moved");
            } else {
                assert_eq!(&now, before, "{bias:?}: {name} is bitwise unchanged");
            }
        }
        println!(
            "{device:?} bias {bias:?}: {} gradients, AdamW state {} bytes = 2 × {trained_bytes}; {}",
            grads.len(),
            opt.memory().live,
            lora.param_count(&model)
        );
    }
}

fn dropout_draws_a_fresh_mask_per_call(device: &Device) {
    let mut model = model(device);
    let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V]);
    cfg.init = Init::BothRandom;
    cfg.dropout = 0.5;
    let lora = LoraModel::inject(&mut model, &cfg, 9).unwrap();
    let (ids, targets, weights) = batch();
    // The loss and every gradient, as bits: a different mask changes them all.
    let train_bits = || {
        let tape = Tape::new();
        let loss = model
            .loss(&tape, &ids, &targets, &weights, 1, ids.len())
            .unwrap();
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap(); // the mask is recomputed from the seed
        assert_eq!(grads.len(), 8);
        let mut out = bits(&loss.value.to_vec().unwrap());
        for p in lora.trainable_params() {
            out.extend(bits(&grads.get(p.id).unwrap().to_vec().unwrap()));
        }
        out
    };
    let inference_loss = || {
        let loss = model
            .loss(&Tape::inference(), &ids, &targets, &weights, 1, ids.len())
            .unwrap();
        bits(&loss.value.to_vec().unwrap())
    };
    let (first, second) = (train_bits(), train_bits());
    assert_ne!(first, second, "each forward draws its own mask");
    assert_ne!(
        first[..1],
        inference_loss()[..],
        "inference runs without dropout"
    );
    assert_eq!(bits(&logits(&model)), bits(&logits(&model)));
    lora.set_dropout_seed(9);
    assert_eq!(train_bits(), first, "the same seed replays the same masks");
}

#[test]
fn gpt2_small_r8_on_q_v_counts_as_peft() {
    let cfg = LoraConfig::new(8, 16.0, &[Target::Q, Target::V]);
    let count = cfg.count(&GptConfig::gpt2_small()).unwrap();
    println!("{count}");
    assert_eq!(count.trainable, 12 * 2 * (8 * 768 + 768 * 8));
    assert_eq!(count.trainable, 294_912);
    assert_eq!(count.all, 124_734_720);
    assert_eq!(
        count.to_string(),
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    );
    // PEFT's GPT-2 default, c_attn whole: B is (3C, r).
    let cfg = LoraConfig::new(8, 16.0, &[Target::CAttn]);
    let count = cfg.count(&GptConfig::gpt2_small()).unwrap();
    assert_eq!(count.trainable, 12 * (8 * 768 + 3 * 768 * 8));
}

on_devices!(
    zero_b_gives_base_logits_bitwise,
    zero_b_bitwise_cpu,
    zero_b_bitwise_gpu
);
on_devices!(
    merge_unmerge_and_switch,
    merge_unmerge_switch_cpu,
    merge_unmerge_switch_gpu
);
on_devices!(
    one_step_trains_only_the_adapters,
    one_step_footprint_cpu,
    one_step_footprint_gpu
);
on_devices!(
    dropout_draws_a_fresh_mask_per_call,
    dropout_masks_cpu,
    dropout_masks_gpu
);
