//! Training that goes wrong, on the tiny fixture model: a step whose loss is not finite stops
//! the run and leaves the last checkpoint as it was, or with `--skip-nonfinite` is skipped with
//! the learning rate lowered; Ctrl-C (SIGINT) and SIGTERM save a checkpoint, exit with status
//! 130, and `--resume` then ends exactly where an uninterrupted run does.
//!
//! Non-finite losses are made for real: a learning rate of 1e30 turns the weights into numbers
//! near 1e30 after the first step (still finite, so its checkpoint is written), and the second
//! step's forward pass overflows. (At 1e38 the first update itself overflows; the checkpoint
//! then refuses to be written, as `an_update_that_overflows_is_not_checkpointed` checks.)

mod common;

use std::path::Path;

use common::*;

/// Options of a run that blows up at step 2: LoRA or full, a checkpoint every step.
fn exploding(mode: &str) -> Vec<&str> {
    let mut args = vec![
        "--steps",
        "6",
        "--batch",
        "2",
        "--save-every",
        "1",
        "--lr",
        "1e30",
        "--schedule",
        "constant",
    ];
    if mode == "full" {
        args.push("--full");
    }
    args
}

fn with<'a>(args: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    args.iter().chain(more).copied().collect()
}

fn state_file(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("checkpoint/state.safetensors")).unwrap()
}

#[test]
fn an_update_that_overflows_is_not_checkpointed() {
    let dir = scratch("overflow");
    let data = write(&dir, "pairs.txt", e2e(20));
    let out = dir.join("lora");
    let mut args = exploding("lora");
    let lr = args.iter().position(|a| *a == "1e30").unwrap();
    args[lr] = "1e38";
    let e = train_fails(&finetune_args(&data, &out, &args));
    for want in [
        "step 1: after the update",
        "not finite",
        "previous checkpoint",
    ] {
        assert!(e.contains(want), "expected `{want}` in:\n{e}");
    }
    assert!(
        !out.join("checkpoint/state.safetensors").exists(),
        "no checkpoint of non-finite weights"
    );
}

#[test]
fn a_non_finite_step_stops_the_run_and_leaves_the_checkpoint_as_it_was() {
    let dir = scratch("nonfinite");
    let data = write(&dir, "pairs.txt", e2e(20));
    for mode in ["lora", "full"] {
        let out = dir.join(mode);
        let first = finetune_args(&data, &out, &with(&exploding(mode), &["--stop-after", "1"]));
        train_ok(&first);
        let before = state_file(&out);

        let resume = finetune_args(&data, &out, &with(&exploding(mode), &["--resume"]));
        let e = train_fails(&resume);
        for want in [
            "step 2: the loss is NaN",
            "no weight was changed",
            "the checkpoint of step 1 in",
            "--skip-nonfinite",
        ] {
            assert!(e.contains(want), "{mode}: expected `{want}` in:\n{e}");
        }
        assert!(before == state_file(&out), "{mode}: the checkpoint changed");
        let entries: Vec<_> = std::fs::read_dir(out.join("checkpoint"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["state.safetensors"], "{mode}");
        let saved = train::checkpoint::load(&out.join("checkpoint")).unwrap();
        assert_eq!(saved.progress.step, 1, "{mode}");
        let steps: Vec<u64> = metrics(&out)
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1], "{mode}: no record of the failed step");
        // Still loadable: a second attempt gets as far and says the same.
        assert!(
            train_fails(&resume).contains("step 2: the loss is NaN"),
            "{mode}"
        );
    }
}

#[test]
fn skip_nonfinite_skips_steps_lowers_the_rate_and_resumes_exactly() {
    let dir = scratch("skip");
    let data = write(&dir, "pairs.txt", e2e(20));
    let weights =
        |out: &Path| std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let blow = exploding("lora");

    // One step and nothing more: what every later step, skipped, must leave as it is.
    let one = dir.join("one");
    let only_first = with(&blow, &["--steps", "1"]);
    let only_first: Vec<&str> = only_first[2..].to_vec(); // drop `--steps 6`
    train_ok(&finetune_args(&data, &one, &only_first));

    let skip = with(&blow, &["--skip-nonfinite", "--max-consecutive-skips", "9"]);
    let straight = dir.join("straight");
    let printed = train_ok(&finetune_args(&data, &straight, &skip));
    assert!(
        printed.contains("step 2: the loss is NaN and the gradient norm NaN: step skipped"),
        "{printed}"
    );
    assert!(
        weights(&one) == weights(&straight),
        "a skipped step changed a weight"
    );
    let records = metrics(&straight);
    let skipped: Vec<(u64, f64)> = records
        .iter()
        .filter(|r| r["skipped"] == true)
        .map(|r| (r["step"].as_u64().unwrap(), r["lr_scale"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        skipped,
        [(2, 0.5), (3, 0.25), (4, 0.125), (5, 0.0625), (6, 0.03125)]
    );
    assert_eq!(records[1]["loss"], "NaN");

    // Stopped within the skips and resumed: the same skips, the same lowered rate.
    let resumed = dir.join("resumed");
    train_ok(&finetune_args(
        &data,
        &resumed,
        &with(&skip, &["--stop-after", "3"]),
    ));
    let printed = train_ok(&finetune_args(&data, &resumed, &with(&skip, &["--resume"])));
    assert!(printed.contains("resuming after step 3 of 6"), "{printed}");
    let strip = |records: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        records
            .into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("tokens_per_s");
                r
            })
            .collect()
    };
    assert_eq!(strip(metrics(&straight)), strip(metrics(&resumed)));
    assert!(weights(&straight) == weights(&resumed));

    // Too many in a row: the run stops and says why.
    let out = dir.join("give-up");
    let limited = with(
        &blow,
        &[
            "--skip-nonfinite",
            "--max-consecutive-skips",
            "2",
            "--skip-lr-factor",
            "0.25",
        ],
    );
    let e = train_fails(&finetune_args(&data, &out, &limited));
    assert!(
        e.contains("step 4: the loss is NaN")
            && e.contains("3 non-finite steps in a row, more than --max-consecutive-skips 2")
            && e.contains("6.25e-2 × --lr"),
        "{e}"
    );
    let e = train_fails(&finetune_args(
        &data,
        &dir.join("bad-factor"),
        &with(&blow, &["--skip-nonfinite", "--skip-lr-factor", "0"]),
    ));
    assert!(
        e.contains("--skip-lr-factor 0: it must be above 0 and at most 1"),
        "{e}"
    );
}

/// Sends `signal` (`libc::SIGINT`, `libc::SIGTERM`) to process `pid`.
#[cfg(unix)]
fn send(signal: libc::c_int, pid: u32) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) only sends a signal; `pid` is our own child, not yet waited for.
    let result = unsafe { libc::kill(pid, signal) };
    assert_eq!(result, 0, "kill({pid}, {signal})");
}

/// Starts `args`, signals it once `out` has `lines` metrics records, and returns the step it
/// says it stopped after, checking its status and message.
#[cfg(unix)]
fn interrupt(args: &[String], out: &Path, lines: usize, signal: libc::c_int, total: u32) -> u32 {
    let mut child = spawn(args);
    assert!(
        wait_for_lines(&mut child, out, lines),
        "the run ended before the signal"
    );
    send(signal, child.id());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(130),
        "after signal {signal}:\n{stderr}"
    );
    let said = stderr
        .lines()
        .find_map(|l| l.strip_prefix("interrupted: stopped after step "))
        .unwrap_or_else(|| panic!("no `interrupted:` line in:\n{stderr}"));
    assert!(
        said.contains(&format!("of {total}, checkpoint saved in")),
        "{said}"
    );
    assert!(said.contains("--resume"), "{said}");
    let step: u32 = said.split(' ').next().unwrap().parse().unwrap();
    let saved = train::checkpoint::load(&out.join("checkpoint")).unwrap();
    assert_eq!(saved.progress.step, step);
    assert_eq!(
        metrics(out)
            .iter()
            .filter(|r| r.get("loss").is_some())
            .count() as u32,
        step
    );
    step
}

#[cfg(unix)]
#[test]
fn ctrl_c_and_sigterm_save_a_checkpoint_and_the_run_resumes_exactly() {
    let dir = scratch("signals");
    let data = write(&dir, "pairs.txt", e2e(40));
    // No periodic checkpoint: the only ones are those the signals make.
    let args = [
        "--steps",
        "80",
        "--batch",
        "2",
        "--save-every",
        "0",
        "--seed",
        "3",
        "--warmup",
        "5",
        "--schedule",
        "cosine",
        "--dropout",
        "0.1",
        "--lr",
        "1e-2",
    ];
    let straight = dir.join("straight");
    train_ok(&finetune_args(&data, &straight, &args));

    let out = dir.join("interrupted");
    let first = interrupt(
        &finetune_args(&data, &out, &args),
        &out,
        3,
        libc::SIGINT,
        80,
    );
    assert!((3..80).contains(&first), "stopped after {first}");
    let resume = finetune_args(&data, &out, &with(&args, &["--resume"]));
    let second = interrupt(&resume, &out, first as usize + 3, libc::SIGTERM, 80);
    assert!((first + 3..80).contains(&second), "{first} then {second}");
    let printed = train_ok(&resume);
    assert!(
        printed.contains(&format!("resuming after step {second} of 80")),
        "{printed}"
    );

    assert_eq!(loss_bits(&straight), loss_bits(&out));
    let weights =
        |out: &Path| std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(weights(&straight) == weights(&out));
}
