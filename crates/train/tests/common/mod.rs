//! Helpers shared by the tests that run the `train` binary on the tiny fixture model (byte
//! tokenizer, 64 positions): paths, scratch directories, running or spawning `train finetune`,
//! and reading a run's metrics. Each test file uses some of them.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use integration_tests::{Scratch, root};

/// The fixture model `tests/fixtures/gpt2-tiny`, as an argument.
pub fn tiny() -> String {
    integration_tests::gpt2_tiny::dir().display().to_string()
}

/// A fresh, empty directory for one test, removed when dropped.
pub fn scratch(name: &str) -> Scratch {
    integration_tests::scratch(&format!("train-{name}"))
}

/// `train --device cpu`, run in the repository root.
pub fn train_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command.current_dir(root()).args(["--device", "cpu"]);
    command
}

/// The arguments of `train finetune --model tiny --data DATA --out OUT` plus `extra`.
pub fn finetune_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["finetune", "--model", &tiny(), "--data"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(data.display().to_string());
    args.push("--out".into());
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `train --device cpu finetune --model tiny --data DATA --out OUT` plus `extra`, checks
/// that it succeeded; its stdout.
pub fn finetune(data: &Path, out: &Path, extra: &[&str]) -> String {
    train_ok(&finetune_args(data, out, extra))
}

pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    train_command().args(args).output().unwrap()
}

/// Runs `train --device cpu ARGS`, checks that it succeeded; its stdout.
pub fn train_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `train --device cpu ARGS`, expecting it to fail with status 1; its stderr.
pub fn train_fails<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "train should have failed:\n{stderr}"
    );
    stderr
}

/// Starts `train --device cpu ARGS` with its output captured.
pub fn spawn<S: AsRef<OsStr>>(args: &[S]) -> Child {
    train_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Lines in `<out>/metrics.jsonl` (0 if it is not there yet).
pub fn metric_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.matches('\n').count())
        .unwrap_or(0)
}

/// Waits until `<out>/metrics.jsonl` has at least `lines` lines; false if `child` ended first.
pub fn wait_for_lines(child: &mut Child, out: &Path, lines: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric_lines(out) < lines {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "no progress in {}",
            out.display()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    true
}

/// The records of `<out>/metrics.jsonl`.
pub fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The bits of every finite loss (training and held-out) in a run's metrics, in order.
pub fn loss_bits(out: &Path) -> Vec<(String, u64, u64)> {
    metrics(out)
        .iter()
        .flat_map(|r| {
            let step = r["step"].as_u64().unwrap();
            ["loss", "eval_loss"]
                .into_iter()
                .filter_map(move |k| Some((k.to_string(), step, r[k].as_f64()?.to_bits())))
        })
        .collect()
}

/// `n` E2E lines `context||completion`.
pub fn e2e(n: usize) -> String {
    (0..n)
        .map(|i| format!("name : R{i} | food : Thai||R{i} serves Thai food .\n"))
        .collect()
}

/// Writes `content` to `dir/name`; its path.
pub fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}
