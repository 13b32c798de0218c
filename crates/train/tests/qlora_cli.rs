//! `--quantize nf4`: LoRA on an NF4 base (QLoRA) trains, saves an ordinary PEFT adapter that
//! `eval` scores on the quantized base and on the f32 base, and what needs f32 weights is
//! refused with a message.

mod common;

use common::{finetune, metrics, run, scratch, tiny, train_fails, train_ok};
use serde_json::Value;

fn eval_loss(extra: &[&str], data: &str) -> f64 {
    let model = tiny();
    let mut args = vec!["eval", "--model", &model, "--data", data, "--json"];
    args.extend(extra);
    let v: Value = serde_json::from_str(&train_ok(&args)).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn lora_on_an_nf4_base_trains_and_its_adapter_loads_on_both_bases() {
    let dir = scratch("qlora");
    let data = dir.join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(30),
    )
    .unwrap();
    let out = dir.join("run");
    let args = [
        "--steps",
        "6",
        "--batch",
        "2",
        "--lr",
        "1e-2",
        "--quantize",
        "nf4",
        "--double-quant",
    ];
    finetune(&data, &out, &args);
    let losses: Vec<f64> = metrics(&out)
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[0], "the loss falls: {losses:?}");

    let data = data.to_str().unwrap();
    let adapter = out.join("adapter");
    let adapter = adapter.to_str().unwrap();
    let quantized = ["--quantize", "nf4", "--double-quant"];
    let base_q = eval_loss(&quantized, data);
    let tuned_q = eval_loss(&[&quantized[..], &["--adapter", adapter]].concat(), data);
    let base_f = eval_loss(&[], data);
    let tuned_f = eval_loss(&["--adapter", adapter], data);
    assert!(tuned_q < base_q, "quantized base: {tuned_q} < {base_q}");
    assert!(base_q != base_f, "NF4 changes the base's loss");
    // The adapter is an ordinary LoRA: on the f32 base it helps too, by about as much.
    assert!(tuned_f < base_f, "f32 base: {tuned_f} < {base_f}");
    assert!(
        (tuned_f - tuned_q).abs() < 0.1 * tuned_q,
        "{tuned_f} vs {tuned_q}"
    );
}

#[test]
fn what_needs_f32_weights_is_refused() {
    let dir = scratch("qlora-refusals");
    let data = dir.join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(30),
    )
    .unwrap();
    let data = data.to_str().unwrap();
    let out = dir.join("run");
    let out = out.to_str().unwrap();
    let model = tiny();
    let base = [
        "finetune", "--model", &model, "--data", data, "--out", out, "--steps", "1",
    ];
    let err = train_fails(&[&base[..], &["--full", "--quantize", "nf4"]].concat());
    assert!(
        err.contains("--quantize") && err.contains("--full"),
        "{err}"
    );
    let err = train_fails(&[&base[..], &["--init", "pissa", "--quantize", "nf4"]].concat());
    assert!(err.contains("NF4") && err.contains("PiSSA"), "{err}");
    // A usage error, from the argument parser.
    let out = run(&["eval", "--model", &model, "--data", data, "--double-quant"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--quantize"), "{err}");
}
