//! `train eval --adapter` and `train merge` on the adapters PEFT writes beyond plain LoRA
//! (`crates/lora/tests/fixtures/peft-variants`, made by PEFT; the losses against PEFT's are
//! checked in `crates/lora/tests/peft_variants.rs`): the merged model scores what the adapter
//! scores (or, for LoRA on the tied embedding or head, what PEFT's merge makes of it).

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{root, train_command};

fn variant(name: &str) -> PathBuf {
    root()
        .join("crates/lora/tests/fixtures/peft-variants")
        .join(name)
}

fn train(args: &[&str]) -> Output {
    train_command().args(args).output().unwrap()
}

fn loss(args: &[&str]) -> f64 {
    let out = train(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train {args:?} failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn merged_variants_score_what_their_adapters_score() {
    let dir = integration_tests::scratch("train-peft-variants");
    let text = dir.join("t.txt");
    std::fs::write(
        &text,
        "It was the best of times, it was the worst of times.",
    )
    .unwrap();
    let (t, model) = (
        text.to_str().unwrap(),
        root().join("tests/fixtures/gpt2-tiny"),
    );
    let model = model.to_str().unwrap();
    let base = loss(&["eval", "--model", model, "--data", t, "--json"]);
    for name in [
        "alpha_regex",
        "alpha_first_key",
        "bias_all",
        "lora_bias",
        "modules_to_save_ln",
        "dora",
        "adalora_pruned",
        "trainable_tokens",
    ] {
        let adapter = variant(name);
        let adapter = adapter.to_str().unwrap();
        let a = loss(&[
            "eval",
            "--model",
            model,
            "--adapter",
            adapter,
            "--data",
            t,
            "--json",
        ]);
        let merged = dir.join(name);
        let m = merged.to_str().unwrap();
        let out = train(&["merge", "--model", model, "--adapter", adapter, "--out", m]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let b = loss(&["eval", "--model", m, "--data", t, "--json"]);
        println!("{name}: adapter {a:.6}, merged {b:.6}, base {base:.6}");
        assert!((a - b).abs() < 1e-4, "{name}: adapter {a} vs merged {b}");
        assert!(
            (a - base).abs() > 1e-3,
            "{name}: the adapter changes the loss"
        );
    }
}

/// LoRA on `wte` or the tied `lm_head` changes one use of the shared matrix until merged, and
/// the merge changes the matrix (both uses), so, as in PEFT, the merged model scores otherwise
/// than the adapter (PEFT's two losses are matched in `crates/lora/tests/peft_variants.rs`). A
/// copy of `wte` scores the same merged: the merged model's head is untied.
#[test]
fn adapters_on_the_tied_embedding_merge_as_peft_merges_them() {
    let dir = integration_tests::scratch("train-peft-tied");
    let text = dir.join("t.txt");
    std::fs::write(
        &text,
        "It was the best of times, it was the worst of times.",
    )
    .unwrap();
    let t = text.to_str().unwrap();
    let model = root().join("tests/fixtures/gpt2-tiny");
    let model = model.to_str().unwrap();
    for (name, same) in [
        ("embedding", false),
        ("lm_head", false),
        ("modules_to_save_wte", true),
    ] {
        let adapter = variant(name);
        let adapter = adapter.to_str().unwrap();
        let eval = [
            "eval",
            "--model",
            model,
            "--adapter",
            adapter,
            "--data",
            t,
            "--json",
        ];
        let a = loss(&eval);
        let merged = dir.join(name);
        let m = merged.to_str().unwrap();
        let out = train(&["merge", "--model", model, "--adapter", adapter, "--out", m]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let b = loss(&["eval", "--model", m, "--data", t, "--json"]);
        println!("{name}: adapter {a:.6}, merged {b:.6}");
        assert_eq!(
            (a - b).abs() < 1e-4,
            same,
            "{name}: adapter {a}, merged {b}"
        );
        let config = std::fs::read_to_string(merged.join("config.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        assert_eq!(config["tie_word_embeddings"], !same, "{name}");
    }
}
