//! Hostile fine-tuning checkpoints: `state.safetensors` truncated, flipped, forged or
//! inconsistent. `checkpoint::load` and `Saved::restore` must answer with an error naming the
//! file and what is wrong (never a panic, never an allocation the file's size does not justify),
//! or restore a state that a run can continue from. A mutation fuzzer (proptest,
//! `PROPTEST_CASES` cases, default 256) damages the tensors' header, the saved state JSON inside
//! it and the bytes of a valid checkpoint.
//!
//! `cargo test -p train --test hostile_state`

use std::path::Path;

use autograd::{AdamW, Grads, Param, ParamGroup, Trainable};
use integration_tests::hostile::{
    Watch, apply, edit_json, fuzz, join, json_edit, mutation, split, watched,
};
use integration_tests::{Scratch, scratch};
use proptest::prelude::*;
use serde_json::{Value, json};
use tensor::{Device, Tensor};
use train::checkpoint::{self, FILE, Progress};

#[global_allocator]
static WATCH: Watch = Watch;

/// The largest single allocation one load of these small (< 1 kB) checkpoints may make.
const ALLOCATION_BOUND: usize = 1 << 20;

/// Two trainable parameters, `w` [2, 3] and `u` [4], and AdamW over them.
fn run_state() -> (Vec<Trainable>, AdamW) {
    let cpu = Device::cpu();
    let param = |name: &str, shape: &[usize]| {
        let n = shape.iter().product();
        let values = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
        let p = Param::trainable(name, Tensor::from_vec(values, shape, &cpu).unwrap());
        p.as_trainable().unwrap().clone()
    };
    let params = vec![param("w", &[2, 3]), param("u", &[4])];
    let opt = AdamW::new(vec![ParamGroup::new(params.clone(), 0.01)]);
    (params, opt)
}

/// A checkpoint after one AdamW step, in a fresh directory; returns it and its file's bytes.
fn saved(tag: &str) -> (Scratch, Vec<u8>) {
    let dir = scratch(&format!("train-hostile-{tag}"));
    let (params, mut opt) = run_state();
    let mut grads = Grads::new();
    for p in &params {
        let n = p.value.shape().iter().product();
        let g = Tensor::from_vec(vec![0.25; n], p.value.shape(), &Device::cpu()).unwrap();
        grads.accumulate(p.id, g).unwrap();
    }
    opt.step(&grads, 0.1).unwrap();
    let progress = Progress {
        step: 1,
        batches_drawn: 2,
        seed: 7,
        run: json!({"lr": 0.1}),
        losses: vec![2.5],
    };
    checkpoint::save(&dir, &progress, &params, &opt).unwrap();
    let bytes = std::fs::read(dir.join(FILE)).unwrap();
    (dir, bytes)
}

/// Loads `dir` and restores it into fresh parameters; the error's message if either fails.
fn load_and_restore(dir: &Path) -> Result<Progress, String> {
    let saved = checkpoint::load(dir).map_err(|e| e.to_string())?;
    let (params, mut opt) = run_state();
    saved.restore(&params, &mut opt).map_err(|e| e.to_string())
}

fn error_naming_the_file(dir: &Path) -> String {
    let e = load_and_restore(dir).expect_err("a damaged checkpoint loaded");
    let file = dir.join(FILE).display().to_string();
    assert!(e.starts_with(&file), "the error does not name {file}: {e}");
    e
}

/// Rewrites the checkpoint's header with `edit` (given the header and the saved state JSON).
fn edited(tag: &str, edit: impl FnOnce(&mut Value, &mut Value)) -> Scratch {
    let (dir, bytes) = saved(tag);
    let (mut header, data) = split(&bytes);
    let mut state: Value =
        serde_json::from_str(header["__metadata__"]["state"].as_str().unwrap()).unwrap();
    edit(&mut header, &mut state);
    if header["__metadata__"]["state"].is_string() {
        header["__metadata__"]["state"] = json!(state.to_string());
    }
    std::fs::write(dir.join(FILE), join(&header, &data)).unwrap();
    dir
}

/// Writes `x` over the first value of tensor `name` in the checkpoint at `dir`.
fn overwrite_first_value(dir: &Path, name: &str, x: f32) {
    let bytes = std::fs::read(dir.join(FILE)).unwrap();
    let (header, mut data) = split(&bytes);
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    data[start..start + 4].copy_from_slice(&x.to_le_bytes());
    std::fs::write(dir.join(FILE), join(&header, &data)).unwrap();
}

#[test]
fn a_valid_checkpoint_restores() {
    let (dir, _) = saved("valid");
    let progress = load_and_restore(&dir).unwrap();
    assert_eq!((progress.step, progress.losses), (1, vec![2.5]));
}

#[test]
fn state_truncated_at_every_offset_is_an_error_naming_the_file() {
    let (dir, bytes) = saved("cut");
    for len in 0..bytes.len() {
        std::fs::write(dir.join(FILE), &bytes[..len]).unwrap();
        let (e, largest) = watched(|| error_naming_the_file(&dir));
        assert!(e.contains("not a"), "cut at {len}: {e}");
        assert!(largest <= ALLOCATION_BOUND, "cut at {len}: {largest}");
    }
    println!("{} cuts", bytes.len());
}

#[test]
fn state_with_a_flipped_byte_restores_or_fails_naming_the_file() {
    let (dir, bytes) = saved("flip");
    let (mut restored, mut refused) = (0, 0);
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut damaged = bytes.clone();
            damaged[at] ^= mask;
            std::fs::write(dir.join(FILE), &damaged).unwrap();
            let (result, largest) = watched(|| load_and_restore(&dir));
            assert!(largest <= ALLOCATION_BOUND, "flip at {at}: {largest}");
            match result {
                Ok(_) => {
                    assert!(at >= 8, "a flip of the header length restored");
                    restored += 1;
                }
                Err(_) => {
                    error_naming_the_file(&dir);
                    refused += 1;
                }
            }
        }
    }
    assert!(refused >= 24 && restored > 0);
    println!(
        "{} flips: {restored} restored, {refused} refused",
        3 * bytes.len()
    );
}

#[test]
fn a_header_length_beyond_the_file_is_refused_before_allocating() {
    let (dir, mut bytes) = saved("header-len");
    for forged in [bytes.len() as u64, 50 << 20, u64::MAX] {
        bytes[..8].copy_from_slice(&forged.to_le_bytes());
        std::fs::write(dir.join(FILE), &bytes).unwrap();
        let (e, largest) = watched(|| error_naming_the_file(&dir));
        assert!(
            e.contains(&format!("the header length says {forged} bytes")),
            "{e}"
        );
        assert!(largest <= ALLOCATION_BOUND, "{largest} bytes allocated");
    }
}

#[test]
fn nan_or_infinite_values_and_moments_are_refused_naming_the_tensor() {
    for (name, x) in [("param/w", f32::NAN), ("adam_m/u", f32::INFINITY)] {
        let (dir, _) = saved("nan");
        overwrite_first_value(&dir, name, x);
        let e = error_naming_the_file(&dir);
        assert!(
            e.contains(&format!("tensor `{name}`: 1 of its")) && e.contains("not finite"),
            "{e}"
        );
    }
}

#[test]
fn a_nan_loss_marks_a_skipped_step_but_an_infinite_one_is_refused() {
    let (dir, _) = saved("nan-loss");
    overwrite_first_value(&dir, "losses", f32::NAN);
    let progress = load_and_restore(&dir).expect("NaN is how --skip-nonfinite records a step");
    assert!(progress.losses[0].is_nan());
    overwrite_first_value(&dir, "losses", f32::INFINITY);
    let e = error_naming_the_file(&dir);
    assert!(e.contains("`losses` holds inf at step 1"), "{e}");
}

#[test]
fn a_negative_second_moment_is_refused() {
    let (dir, _) = saved("negative-v");
    overwrite_first_value(&dir, "adam_v/w", -1.0);
    let e = error_naming_the_file(&dir);
    assert!(
        e.contains("`adam_v/w` holds -1; a second moment is never negative"),
        "{e}"
    );
}

#[test]
fn moments_that_do_not_fit_their_parameter_are_refused() {
    // Same byte count, other shape.
    let dir = edited("moment-shape", |h, _| {
        h["adam_m/w"]["shape"] = json!([3, 2])
    });
    let e = error_naming_the_file(&dir);
    assert!(
        e.contains(
            "AdamW moments of `w` are [3, 2] (m) and [2, 3] (v), but the parameter is [2, 3]"
        ),
        "{e}"
    );
    // m without v: v filed under another name.
    let dir = edited("moment-missing", |h, _| {
        let v = h.as_object_mut().unwrap().remove("adam_v/u").unwrap();
        h["adam_v/x"] = v;
    });
    let e = error_naming_the_file(&dir);
    assert!(e.contains("`u` has the AdamW moment m but not v"), "{e}");
}

/// A change to a checkpoint's header and to the state JSON inside it.
type Edit = fn(&mut Value, &mut Value);

#[test]
fn a_saved_state_that_lacks_a_field_or_disagrees_is_refused() {
    let cases: [(&str, Edit, &str); 6] = [
        (
            "no-seed",
            |_, s| drop(s.as_object_mut().unwrap().remove("seed")),
            "no `seed`, or not a non-negative integer",
        ),
        (
            "step-string",
            |_, s| s["step"] = json!("one"),
            "no `step`, or not a non-negative integer",
        ),
        (
            "step-vs-losses",
            |_, s| s["step"] = json!(5),
            "`losses` is [1], but the state says 5 steps were taken",
        ),
        (
            "step-range",
            |_, s| s["adam_step"] = json!(1u64 << 40),
            "adam_step out of range",
        ),
        (
            "not-object",
            |_, s| *s = json!([1, 2]),
            "the saved state is [1,2], not a JSON object",
        ),
        (
            "no-state",
            |h, _| h["__metadata__"] = json!({"format": "pt"}),
            "no saved state",
        ),
    ];
    for (tag, edit, want) in cases {
        let dir = edited(tag, edit);
        let e = error_naming_the_file(&dir);
        assert!(e.contains(want), "{tag}: {e}");
    }
}

#[test]
fn fuzz_mutated_checkpoints_never_panic() {
    let (dir, bytes) = saved("fuzz");
    let (header, data) = split(&bytes);
    let state: Value =
        serde_json::from_str(header["__metadata__"]["state"].as_str().unwrap()).unwrap();
    let strategy = (
        prop::collection::vec(json_edit(), 0..3),
        prop::collection::vec(json_edit(), 0..3),
        prop::collection::vec(mutation(), 0..3),
    );
    let file = dir.join(FILE);
    fuzz(
        "checkpoint",
        strategy,
        ALLOCATION_BOUND,
        &file.display().to_string(),
        |(header_edits, state_edits, byte_edits)| {
            let mut h = header.clone();
            let mut s = state.clone();
            state_edits.iter().for_each(|e| edit_json(&mut s, e));
            h["__metadata__"]["state"] = json!(s.to_string());
            header_edits.iter().for_each(|e| edit_json(&mut h, e));
            let mut bytes = join(&h, &data);
            byte_edits.iter().for_each(|m| apply(&mut bytes, m));
            std::fs::write(&file, &bytes).unwrap();
        },
        || load_and_restore(&dir),
    );
}
