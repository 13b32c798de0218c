//! `--device` when the device says no: `gpu` without an adapter is one clear error line and
//! exit status 1 (no panic, no backtrace); `auto` without a GPU runs on the CPU and says why.
//!
//! `WGPU_BACKEND=webgpu` asks wgpu for the browser's WebGPU, which no native build has, so
//! these run the same on every machine, with or without a GPU.

use std::process::{Command, Output};

use integration_tests::{gpt2_tiny, root, scratch};

/// `train --device DEVICE eval` of the tiny model on one sentence, seeing no adapter.
fn eval_without_adapter(device: &str, name: &str) -> Output {
    let dir = scratch(&format!("train-device-{name}"));
    let text = dir.join("t.txt");
    std::fs::write(&text, "To be, or not to be, that is the question.").unwrap();
    Command::new(env!("CARGO_BIN_EXE_train"))
        .current_dir(root())
        .env("WGPU_BACKEND", "webgpu")
        .env("RUST_BACKTRACE", "1")
        .args(["--device", device, "eval", "--json", "--model"])
        .arg(gpt2_tiny::dir())
        .arg("--data")
        .arg(&text)
        .output()
        .unwrap()
}

#[test]
fn device_gpu_without_an_adapter_is_a_clear_error_and_exit_status_1() {
    let out = eval_without_adapter("gpu", "gpu");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "error: no GPU adapter: asked for an adapter on Backends(BROWSER_WEBGPU) \
             (WGPU_BACKEND=webgpu), found none; adapters on any backend: "
        ),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn device_auto_without_a_gpu_runs_on_the_cpu_and_says_why() {
    let out = eval_without_adapter("auto", "auto");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "note: --device auto found no hardware GPU, so it uses the CPU backend \
             (no GPU adapter: asked for an adapter on Backends(BROWSER_WEBGPU)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("device: CPU reference backend"), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["loss"].as_f64().unwrap().is_finite());
}

/// Started without `XDG_RUNTIME_DIR` (a machine without a desktop session), `train` sets a
/// private one before wgpu opens Vulkan, so Mesa's layer prints nothing.
#[test]
fn without_xdg_runtime_dir_mesa_prints_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .current_dir(root())
        .env_remove("XDG_RUNTIME_DIR")
        .env("WGPU_BACKEND", "vulkan")
        .arg("devices")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}
