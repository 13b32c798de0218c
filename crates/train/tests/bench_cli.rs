//! Every `train bench` subcommand run with the tiniest settings and `--json`: each line must
//! parse, carry the fields the docs name, and hold sane values (positive times, LoRA's gradient
//! and optimizer memory below full fine-tuning's). Nothing here asserts on a speed.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Run `train --device cpu bench ARGS --json`; every stdout line as JSON.
fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .args(["--device", "cpu", "bench"])
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench {args:?} failed:\n{stderr}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: `{l}`")))
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{key}` in {v}"))
}

fn mem(v: &Value, key: &str) -> u64 {
    v["memory"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no memory.{key} in {v}"))
}

#[test]
fn matmul_reports_gflops_and_fraction_of_peak() {
    let rows = bench(&[
        "matmul",
        "--sizes",
        "16,48",
        "--rows",
        "8",
        "--devices",
        "cpu",
    ]);
    // Two squares, the five GPT-2 shapes and LoRA's dA.
    assert_eq!(rows.len(), 8, "{rows:?}");
    for r in &rows {
        assert!(num(r, "ms") > 0.0 && num(r, "gflops") > 0.0, "{r}");
        let frac = num(r, "fraction_of_peak");
        assert!(frac > 0.0 && frac <= 1.0, "{r}");
    }
    // The peak is the best case of the run, so exactly one case sits at 1.
    let at_peak = rows
        .iter()
        .filter(|r| num(r, "fraction_of_peak") == 1.0)
        .count();
    assert!(at_peak >= 1, "{rows:?}");
}

#[test]
fn step_compares_lora_and_full_memory_and_skips_what_does_not_fit() {
    let rows = bench(&[
        "step",
        "--models",
        "tiny",
        "--bt",
        "2x16,1x300",
        "--warmup",
        "0",
        "--steps",
        "1",
    ]);
    let measured: Vec<&Value> = rows.iter().filter(|r| r["skipped"].is_null()).collect();
    let skipped: Vec<&Value> = rows.iter().filter(|r| !r["skipped"].is_null()).collect();
    assert_eq!(measured.len(), 2, "{rows:?}");
    // T = 300 exceeds the tiny model's context of 256, for each mode.
    assert_eq!(skipped.len(), 2, "{rows:?}");
    assert!(skipped.iter().all(|r| r["t"] == 300));
    let (lora, full) = (measured[0], measured[1]);
    assert_eq!(
        (lora["mode"].as_str(), full["mode"].as_str()),
        (Some("lora"), Some("full"))
    );
    for r in [lora, full] {
        assert_eq!((r["b"].as_u64(), r["t"].as_u64()), (Some(2), Some(16)));
        assert!(
            num(r, "ms_per_step") > 0.0 && num(r, "tokens_per_s") > 0.0,
            "{r}"
        );
        assert!(mem(r, "parameters") > 0 && mem(r, "activations") > 0, "{r}");
        assert!(mem(r, "device_peak") > 0, "{r}");
    }
    // LoRA r=8 on q, v of 4 layers of width 256: 4·2·8·(256+256) = 32768 values.
    assert_eq!(lora["trainable_params"].as_u64(), Some(32768));
    assert!(
        mem(lora, "gradients") < mem(full, "gradients") / 10,
        "{lora} {full}"
    );
    assert!(
        mem(lora, "optimizer") < mem(full, "optimizer") / 10,
        "{lora} {full}"
    );
    // Full fine-tuning: m and v per parameter, gradients for each.
    assert_eq!(mem(full, "optimizer"), 2 * mem(full, "parameters"));
    assert_eq!(mem(full, "gradients"), mem(full, "parameters"));
    assert_eq!(mem(lora, "optimizer"), 2 * 4 * 32768);
}

#[test]
fn ops_splits_a_step_by_phase_and_family() {
    let rows = bench(&[
        "ops", "--model", "tiny", "--bt", "2x16", "--modes", "lora", "--warmup", "0", "--steps",
        "1",
    ]);
    let (summary, entries): (Vec<&Value>, Vec<&Value>) =
        rows.iter().partition(|r| r["summary"] == true);
    assert_eq!(summary.len(), 1, "{rows:?}");
    assert_eq!(summary[0]["method"], "cpu wall time per scope");
    assert!(num(summary[0], "profiled_ms_per_step") > 0.0);
    let has = |phase: &str, family: &str| {
        entries
            .iter()
            .any(|e| e["phase"] == phase && e["family"] == family && num(e, "ms_per_step") > 0.0)
    };
    for (phase, family) in [
        ("forward", "matmul"),
        ("forward", "attention"),
        ("forward", "layernorm"),
        ("forward", "loss"),
        ("backward", "matmul"),
        ("backward", "attention"),
        ("optimizer", "optimizer"),
    ] {
        assert!(has(phase, family), "no {phase}/{family} in {entries:?}");
    }
    // Outermost scopes only: softmax runs inside attention, so it never appears on its own.
    assert!(
        entries.iter().all(|e| e["family"] != "softmax"),
        "{entries:?}"
    );
    let share: f64 = entries.iter().map(|e| num(e, "share")).sum();
    assert!((share - 1.0).abs() < 1e-6, "shares sum to {share}");
}

#[test]
fn infer_times_every_variant() {
    let rows = bench(&[
        "infer",
        "--model",
        "tiny",
        "--batch",
        "1,3",
        "--prompt",
        "8",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
    ]);
    assert_eq!(rows.len(), 8, "{rows:?}");
    let variants: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(
        variants,
        [
            "base", "unmerged", "merged", "mixed", "base", "unmerged", "merged", "mixed"
        ]
    );
    for r in &rows {
        for key in [
            "prefill_ms",
            "prompt_tokens_per_s",
            "ms_per_token",
            "generated_tokens_per_s",
        ] {
            assert!(num(r, key) > 0.0, "{key} in {r}");
        }
    }
}

#[test]
fn scaling_sweeps_b_t_and_model() {
    let rows = bench(&[
        "scaling",
        "--models",
        "tiny,e2e",
        "--base",
        "1x16",
        "--b",
        "1,2",
        "--t",
        "8,16",
        "--modes",
        "lora,full",
        "--warmup",
        "0",
        "--steps",
        "1",
    ]);
    // Per mode: 2 B points, 2 T points, 2 models.
    assert_eq!(rows.len(), 12, "{rows:?}");
    let find = |mode: &str, sweep: &str, model: &str, b: u64, t: u64| -> &Value {
        rows.iter()
            .find(|r| {
                r["mode"] == mode
                    && r["sweep"] == sweep
                    && r["model"] == model
                    && r["b"] == b
                    && r["t"] == t
            })
            .unwrap_or_else(|| panic!("no {mode} {sweep} {model} {b}x{t} in {rows:?}"))
    };
    for mode in ["lora", "full"] {
        let (b1, b2) = (
            find(mode, "B", "tiny", 1, 16),
            find(mode, "B", "tiny", 2, 16),
        );
        // Activations grow with B; weights do not.
        assert!(mem(b2, "activations") > mem(b1, "activations"), "{b1} {b2}");
        assert_eq!(mem(b2, "parameters"), mem(b1, "parameters"));
        let (t8, t16) = (
            find(mode, "T", "tiny", 1, 8),
            find(mode, "T", "tiny", 1, 16),
        );
        assert!(
            mem(t16, "activations") > mem(t8, "activations"),
            "{t8} {t16}"
        );
        let (small, e2e) = (
            find(mode, "model", "tiny", 1, 16),
            find(mode, "model", "e2e", 1, 16),
        );
        // e2e (128 wide, the shipped base's 4,096-token vocabulary: 1.33 M parameters) is
        // smaller than tiny (256 wide, 3.29 M), and the sweep measures each at its own size.
        assert!(
            mem(e2e, "parameters") < mem(small, "parameters"),
            "{small} {e2e}"
        );
        assert!(num(e2e, "ms_per_step") > 0.0);
    }
}
