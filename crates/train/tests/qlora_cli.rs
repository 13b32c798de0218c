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

/// `train quantize` writes bitsandbytes' layout (for the plain format, the very codes
/// transformers + bitsandbytes wrote for this model), and every command reads the directory
/// as the NF4 base `--quantize nf4` builds in memory: the same losses, bit for bit.
#[test]
fn train_quantize_writes_a_base_every_command_reads() {
    let dir = scratch("quantize-cmd");
    let data = dir.join("data.txt");
    std::fs::write(&data, "a quantized base still reads text. ".repeat(30)).unwrap();
    let data_s = data.to_str().unwrap();
    let model = tiny();
    let fixture = format!(
        "{}/../../tests/fixtures/gpt2-tiny-nf4",
        env!("CARGO_MANIFEST_DIR")
    );
    for (flags, variant) in [(&[][..], "plain"), (&["--double-quant"][..], "dq")] {
        let q = dir.join(format!("q-{variant}"));
        let q_s = q.to_str().unwrap();
        let said = train_ok(&[&["quantize", "--model", &model, "--out", q_s][..], flags].concat());
        assert!(said.contains("NF4"), "{said}");
        let ours = transformer::Checkpoint::load(&q).unwrap();
        assert_eq!(ours.nf4.len(), 8);
        if variant == "plain" {
            let theirs = transformer::Checkpoint::load(format!("{fixture}/plain")).unwrap();
            assert_eq!(ours.nf4, theirs.nf4, "bitsandbytes' codes and scales");
        }
        // eval: the directory = --quantize on the f32 model, bit for bit.
        let on_the_fly = eval_loss(&[&["--quantize", "nf4"][..], flags].concat(), data_s);
        let v: Value = serde_json::from_str(&train_ok(&[
            "eval", "--model", q_s, "--data", data_s, "--json",
        ]))
        .unwrap();
        assert_eq!(v["loss"].as_f64().unwrap().to_bits(), on_the_fly.to_bits());
        // finetune: the same run either way.
        let steps = ["--steps", "3", "--batch", "2", "--lr", "1e-2"];
        let (a, b) = (
            dir.join(format!("a-{variant}")),
            dir.join(format!("b-{variant}")),
        );
        finetune(
            &data,
            &a,
            &[&steps[..], &["--quantize", "nf4"], flags].concat(),
        );
        let args = common::finetune_args(&data, &b, &steps);
        let args: Vec<String> = args
            .into_iter()
            .map(|s| if s == model { q_s.to_string() } else { s })
            .collect();
        train_ok(&args);
        let losses = |out: &std::path::Path| -> Vec<u64> {
            metrics(out)
                .iter()
                .map(|r| r["loss"].as_f64().unwrap().to_bits())
                .collect()
        };
        assert_eq!(losses(&a), losses(&b), "{variant}");
        // generate runs on it.
        let text = train_ok(&[
            "generate",
            "--model",
            q_s,
            "--prompt",
            "a ",
            "--max-new-tokens",
            "4",
        ]);
        assert!(!text.is_empty());
        // What needs f32 weights is refused, naming the weight.
        let err = train_fails(&[
            "finetune",
            "--model",
            q_s,
            "--data",
            data_s,
            "--out",
            dir.join("full").to_str().unwrap(),
            "--steps",
            "1",
            "--full",
        ]);
        assert!(
            err.contains("NF4") && err.contains("h.0.attn.c_attn.weight"),
            "{err}"
        );
        let err = train_fails(&[
            "quantize",
            "--model",
            q_s,
            "--out",
            dir.join("qq").to_str().unwrap(),
        ]);
        assert!(err.contains("already"), "{err}");
    }
}
