//! Every subcommand of the `train` binary, run once on a tiny model, and the default pipeline in
//! a reduced size, checking each artefact it writes.

mod common;

use common::{root, scratch, train_ok as train};
use integration_tests::gpt2_tiny::dir as tiny;

#[test]
fn devices_lists_the_cpu() {
    assert!(train(&["devices"]).contains("CPU reference backend"));
}

#[test]
fn help_explains_every_subcommand() {
    let help = train(&["--help"]);
    for sub in [
        "devices", "pretrain", "eval", "generate", "merge", "analyze", "bench",
    ] {
        assert!(help.contains(sub), "--help lacks {sub}:\n{help}");
    }
}

#[test]
fn eval_prints_json_with_and_without_adapter() {
    let dir = scratch("eval");
    let text = dir.join("t.txt");
    std::fs::write(&text, "To be, or not to be, that is the question.").unwrap();
    let t = text.to_str().unwrap();
    let base: serde_json::Value = serde_json::from_str(&train(&[
        "eval",
        "--model",
        tiny().to_str().unwrap(),
        "--data",
        t,
        "--json",
    ]))
    .unwrap();
    assert_eq!(base["tokens"], 42 - 1);
    assert!(
        (base["perplexity"].as_f64().unwrap() - base["loss"].as_f64().unwrap().exp()).abs() < 1e-6
    );
    let adapter = tiny().join("adapter");
    let with: serde_json::Value = serde_json::from_str(&train(&[
        "eval",
        "--model",
        tiny().to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        t,
        "--json",
    ]))
    .unwrap();
    assert_ne!(with["loss"], base["loss"], "the adapter changes the model");
}

#[test]
fn merge_writes_a_model_that_scores_like_the_adapter() {
    let dir = scratch("merge");
    let text = dir.join("t.txt");
    std::fs::write(&text, "Hello there, general Kenobi. You are a bold one.").unwrap();
    let (t, model, adapter) = (text.to_str().unwrap(), tiny(), tiny().join("adapter"));
    let merged = dir.join("merged");
    train(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let loss = |args: &[&str]| -> f64 {
        let v: serde_json::Value = serde_json::from_str(&train(args)).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let a = loss(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        t,
        "--json",
    ]);
    let m = loss(&[
        "eval",
        "--model",
        merged.to_str().unwrap(),
        "--data",
        t,
        "--json",
    ]);
    assert!((a - m).abs() < 1e-5 * a.abs(), "adapter {a} vs merged {m}");
}

#[test]
fn generate_continues_a_prompt() {
    let out = train(&[
        "generate",
        "--model",
        tiny().to_str().unwrap(),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "5",
    ]);
    assert!(out.starts_with("Hi"));
    let beam = train(&[
        "generate",
        "--model",
        tiny().to_str().unwrap(),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "4",
        "--beams",
        "2",
    ]);
    assert!(beam.starts_with("Hi"));
}

#[test]
fn pretrain_writes_a_loadable_model() {
    let dir = scratch("pretrain");
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let out = dir.join("model");
    train(&[
        "pretrain",
        "--out",
        out.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--e2e",
        "",
        "--layers",
        "1",
        "--heads",
        "2",
        "--width",
        "16",
        "--ctx",
        "16",
        "--steps",
        "3",
        "--batch",
        "2",
    ]);
    assert!(out.join("config.json").exists() && out.join("model.safetensors").exists());
    // The vocabulary learned on the text ships beside the model; this text has too few
    // distinct pairs to reach the default 4,096 tokens, and the config says so.
    assert!(out.join("vocab.json").exists() && out.join("merges.txt").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vocab.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], vocab.as_object().unwrap().len());
    assert!(config["vocab_size"].as_u64().unwrap() < 4096, "{config}");
    assert_eq!(config["eos_token_id"], vocab["<|endoftext|>"], "{config}");
    assert_eq!(
        config["resid_pdrop"], 0.0,
        "trained without dropout: {config}"
    );
    std::fs::write(dir.join("t.txt"), "the lazy dog jumps").unwrap();
    train(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        dir.join("t.txt").to_str().unwrap(),
    ]);
}

#[test]
fn bench_matmul_reports_gflops() {
    let out = train(&[
        "bench",
        "matmul",
        "--devices",
        "cpu",
        "--sizes",
        "32",
        "--rows",
        "0",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(v["gflops"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_default_run_writes_every_artefact() {
    let runs = scratch("default");
    train(&[
        "--steps",
        "3",
        "--batch",
        "4",
        "--eval-limit",
        "3",
        "--runs",
        runs.to_str().unwrap(),
        "--name",
        "quick",
    ]);
    let dir = runs.join("quick");
    // metrics.jsonl parses line by line
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 6);
    for line in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("predictions.txt"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    assert!(
        std::fs::read_to_string(dir.join("loss.svg"))
            .unwrap()
            .contains("<svg")
    );
    assert!(
        std::fs::read_to_string(dir.join("summary.md"))
            .unwrap()
            .contains("| run |")
    );
    serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(dir.join("config.json")).unwrap(),
    )
    .unwrap();
    // the adapter loads back (eval applies it)
    let text = dir.join("t.txt");
    std::fs::write(
        &text,
        "name : The Eagle | food : French || The Eagle serves French food .",
    )
    .unwrap();
    train(&[
        "eval",
        "--model",
        "models/base",
        "--adapter",
        dir.join("adapter").to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
    ]);
    // LoRA's memory advantage: gradients + optimizer state under full fine-tuning exceed LoRA's
    // by at least the size of the weights LoRA keeps frozen.
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let runs = results.as_array().unwrap();
    let find = |prefix: &str| {
        runs.iter()
            .find(|r| r["run"].as_str().unwrap().starts_with(prefix))
            .unwrap()
    };
    let (lora, full) = (find("LoRA"), find("full"));
    let state = |r: &serde_json::Value| {
        r["memory_peak_bytes"]["gradients"].as_u64().unwrap()
            + r["memory_peak_bytes"]["optimizer"].as_u64().unwrap()
    };
    let frozen_bytes = 4 * full["trainable_params"].as_u64().unwrap();
    assert!(
        state(full) >= state(lora) + frozen_bytes,
        "full {} vs LoRA {} + frozen {frozen_bytes}",
        state(full),
        state(lora)
    );
}

#[test]
fn analyze_prints_the_spectra_of_an_adapter() {
    let out = train(&[
        "analyze",
        "--model",
        tiny().to_str().unwrap(),
        "--adapter",
        tiny().join("adapter").to_str().unwrap(),
    ]);
    assert!(out.contains("singular values"), "{out}");
}

#[test]
fn generate_runs_a_prompt_file_under_each_of_two_adapters() {
    let dir = scratch("gen2");
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "Hi\n\nYo\n").unwrap();
    let a = tiny().join("adapter");
    let b = root().join("tests/fixtures/ours-in-peft/adapter");
    let out = train(&[
        "generate",
        "--model",
        tiny().to_str().unwrap(),
        "--adapter",
        a.to_str().unwrap(),
        "--adapter",
        b.to_str().unwrap(),
        "--prompt-file",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "3",
    ]);
    assert_eq!(out.matches("== adapter").count(), 2, "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("Hi") || l.starts_with("Yo"))
            .count(),
        4,
        "{out}"
    );
}

#[test]
fn eval_scores_bleu_against_references() {
    let dir = scratch("bleu");
    let refs = dir.join("refs.txt");
    std::fs::write(&refs, "name : Aromi||Aromi is a pub .\nname : Aromi||Aromi serves food .\nname : Eagle||The Eagle .\n").unwrap();
    let text = dir.join("t.txt");
    std::fs::write(&text, "Aromi is a pub .").unwrap();
    let v: serde_json::Value = serde_json::from_str(&train(&[
        "eval",
        "--model",
        "models/base",
        "--data",
        text.to_str().unwrap(),
        "--references",
        refs.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let bleu = v["bleu"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&bleu), "{v}");
}
