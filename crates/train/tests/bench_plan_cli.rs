//! `train bench plan` on the tiny fixture model's shape (tests/fixtures/gpt2-tiny/config.json):
//! the JSON has its fields, and the counts that follow from the shape alone are exact: the
//! trainable parameters, the forward's matmul FLOPs outside attention, the bytes of the
//! parameters, of AdamW's state and of the gradients, and on a GPU the blocking waits (the
//! step's one readback of loss and gradient norm, the final sync). A dry run on the GPU counts
//! what an executed step counts.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const CONFIG: &str = "tests/fixtures/gpt2-tiny/config.json";
const B: u64 = 2;
const T: u64 = 16;
const R: u64 = 8;

/// Run `train --device DEVICE bench plan` on the fixture's shape with `extra` and `--json`.
fn plan(device: &str, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .args(["--device", device, "bench", "plan", "--shape", CONFIG])
        .args(["--batch", &B.to_string(), "--seq", &T.to_string()])
        .args(["--r", &R.to_string(), "--targets", "q,v", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench plan {extra:?} failed:\n{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn u(v: &Value, path: &[&str]) -> u64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("no integer at {path:?} in {v}"))
}

/// (L, C, V, positions) of the fixture.
fn shape() -> (u64, u64, u64, u64) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(CONFIG)).unwrap()).unwrap();
    let g = |k: &str| cfg[k].as_u64().unwrap();
    (g("n_layer"), g("n_embd"), g("vocab_size"), g("n_positions"))
}

/// The forward's matmul FLOPs outside the `attention` scope, from the shape: per layer the
/// four weight products (c_attn 3C², c_proj C², c_fc 4C², mlp c_proj 4C² per token), per LoRA
/// target x·A and (x·A)·B (rC each), and the head twice: the logits, and dlogits·W, which the
/// fused linear cross-entropy computes during the forward. Each product: 2 FLOPs per
/// multiply-add.
fn forward_flops_outside_attention(l: u64, c: u64, v: u64, targets: u64) -> u64 {
    let n = B * T;
    2 * n * (l * (12 * c * c + targets * 2 * R * c) + 2 * v * c)
}

fn sum_flops(v: &Value, phase: &str, keep: impl Fn(&str) -> bool) -> u64 {
    v["matmuls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["at"]["phase"] == phase && keep(m["at"]["scope"].as_str().unwrap()))
        .map(|m| m["flops"].as_u64().unwrap())
        .sum()
}

#[test]
fn plan_on_the_cpu_counts_the_tiny_shape_exactly() {
    let (l, c, v, p) = shape();
    let j = plan("cpu", &[]);
    assert_eq!(j["bench"], "plan");
    assert_eq!(j["dry_run"], false);
    assert_eq!((u(&j, &["b"]), u(&j, &["t"])), (B, T));
    for key in [
        "ops",
        "dispatches",
        "copies",
        "uploads",
        "submissions",
        "blocking_waits",
        "bytes_bound",
        "bytes_writable",
        "matmul_flops",
    ] {
        u(&j, &["totals", key]);
    }
    for key in [
        "kernels",
        "dispatches",
        "ops",
        "transfers",
        "waits",
        "matmuls",
    ] {
        assert!(j[key].is_array(), "no list `{key}` in {j}");
    }
    // LoRA on q and v: per layer and target, A (r, C) and B (C, r).
    let trainable = l * 2 * 2 * R * c;
    assert_eq!(u(&j, &["trainable_params"]), trainable);
    // The CPU has no dispatches, submissions or waits: its ops are the work.
    let totals = &j["totals"];
    assert_eq!(totals["dispatches"], 0);
    assert_eq!(totals["submissions"], 0);
    assert_eq!(totals["blocking_waits"], 0);
    assert!(u(&j, &["totals", "ops"]) > 0);
    assert_eq!(
        sum_flops(&j, "forward", |s| s != "attention"),
        forward_flops_outside_attention(l, c, v, 2)
    );
    // Attention's products: the scores (B·NH, T, T) and their use, forward and backward.
    assert!(sum_flops(&j, "forward", |s| s == "attention") > 0);
    assert!(sum_flops(&j, "backward", |_| true) > 0);
    // Memory: GPT-2's parameters (lm_head tied to wte), AdamW's m and v, one gradient each.
    let per_layer =
        2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c);
    let base = v * c + p * c + l * per_layer + 2 * c;
    let mem = |k| u(&j, &["memory", k]);
    assert_eq!(mem("frozen_parameters"), base * 4);
    assert_eq!(mem("trainable_parameters"), trainable * 4);
    assert_eq!(mem("optimizer_state"), 2 * trainable * 4);
    assert_eq!(mem("gradients"), trainable * 4);
    assert!(mem("saved_activations") > 0);
    assert!(mem("device_peak") >= mem("live_at_step_start") + mem("saved_activations"));
    let phases: Vec<&str> = j["memory_by_phase"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["forward", "backward", "optimizer"]);
}

/// Dispatch rows as `(phase, scope, kernel) → (calls, workgroups, bytes bound)`.
fn rows(j: &Value) -> std::collections::BTreeMap<String, (u64, u64, u64)> {
    j["dispatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let key = format!("{} {} {}", d["at"]["phase"], d["at"]["scope"], d["kernel"]);
            (
                key,
                (
                    u(d, &["calls"]),
                    u(d, &["workgroups"]),
                    u(d, &["bytes_bound"]),
                ),
            )
        })
        .collect()
}

#[test]
fn a_dry_run_on_the_gpu_counts_what_an_executed_step_counts() {
    if tensor::testing::gpu().is_none() {
        return;
    }
    let (l, c, v, _) = shape();
    let dry = plan("gpu", &[]);
    let run = plan("gpu", &["--execute"]);
    assert_eq!(
        (dry["dry_run"].clone(), run["dry_run"].clone()),
        (true.into(), false.into())
    );
    // Waits: the step's one readback (loss, gradient norm, skip flag, after the update is
    // recorded), which is also where the step ends.
    for j in [&dry, &run] {
        assert_eq!(u(j, &["totals", "blocking_waits"]), 1, "{}", j["waits"]);
        assert_eq!(
            sum_flops(j, "forward", |s| s != "attention"),
            forward_flops_outside_attention(l, c, v, 2)
        );
        assert!(u(j, &["totals", "dispatches"]) > 0);
        assert!(u(j, &["totals", "bytes_bound"]) > 0);
    }
    assert_eq!(dry["matmuls"], run["matmuls"]);
    assert_eq!(dry["waits"], run["waits"]);
    assert_eq!(dry["memory"], run["memory"]);
    assert_eq!(dry["totals"]["submissions"], run["totals"]["submissions"]);
    // Every dispatch is the same: clipping is applied on the device by the AdamW kernels,
    // whatever the norm, so the dry run (whose readbacks read 1.0) records what a step runs.
    let (d, r) = (rows(&dry), rows(&run));
    assert!(d.keys().any(|k| k.contains("adamw_step_clipped")), "{d:?}");
    assert!(d.keys().any(|k| k.contains("grad_norm_clip")), "{d:?}");
    assert_eq!(d, r);
}
