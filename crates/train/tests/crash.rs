//! A run killed (SIGKILL: no chance to clean up) at random moments loses nothing: after every
//! kill, `checkpoint/` holds either nothing yet or a complete checkpoint of some step, whose
//! saved losses are those of an uninterrupted run, and whatever a torn write left beside it is
//! a hidden temporary file that is never read (and that `--resume` deletes). A chain of sessions, each killed at a seeded
//! random moment and the next resuming, ends with the losses and weights of an uninterrupted
//! run, bit for bit (CPU backend).
//!
//! The moments: after a random number of new metrics records (each step writes one, then its
//! checkpoint), plus a random delay of up to 3 ms, so that kills land while loading, while
//! stepping and while checkpoints are written.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// A small seeded generator (xorshift64*), so the moments are the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

const STEPS: u32 = 40;

/// A write's temporary file: ours (`.state.safetensors.tmp.PID`) or the one the `safetensors`
/// crate writes before renaming it to ours (`.tmpXXXXXX`).
fn is_temporary(name: &str) -> bool {
    name.starts_with(".state.safetensors.tmp.") || name.starts_with(".tmp")
}

/// Checks what a kill left in `out`; the step of its checkpoint, if it has one.
fn check_after_kill(out: &Path, straight_losses: &[f32]) -> Option<u32> {
    let dir = out.join("checkpoint");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for name in &names {
        assert!(
            name == "state.safetensors" || is_temporary(name),
            "unexpected {name} in {}",
            dir.display()
        );
    }
    if !train::checkpoint::exists(&dir) {
        return None;
    }
    let saved = train::checkpoint::load(&dir)
        .unwrap_or_else(|e| panic!("the checkpoint left by a kill does not load: {e}"));
    let step = saved.progress.step;
    assert!(step <= STEPS);
    let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&saved.progress.losses),
        bits(&straight_losses[..step as usize]),
        "the losses saved at step {step}"
    );
    Some(step)
}

#[test]
fn killed_at_random_moments_a_run_resumes_to_the_uninterrupted_result() {
    let dir = scratch("crash");
    let data = write(&dir, "pairs.txt", e2e(40));
    let args = [
        "--steps",
        "40",
        "--batch",
        "2",
        "--save-every",
        "1",
        "--seed",
        "9",
        "--dropout",
        "0.1",
        "--lr",
        "1e-2",
        "--warmup",
        "3",
    ];
    let straight = dir.join("straight");
    train_ok(&finetune_args(&data, &straight, &args));
    let straight_losses = train::checkpoint::load(&straight.join("checkpoint"))
        .unwrap()
        .progress
        .losses;
    assert_eq!(straight_losses.len(), STEPS as usize);

    let out = dir.join("killed");
    let mut rng = Rng(0x5EED_CAFE);
    let (mut saved, mut kills, mut torn) = (None, 0, 0);
    for round in 0..10 {
        let resume = saved.is_some();
        let extra: &[&str] = if resume { &["--resume"] } else { &[] };
        let session: Vec<&str> = args.iter().chain(extra).copied().collect();
        let mut child = spawn(&finetune_args(&data, &out, &session));
        // The first round may die while loading, before any checkpoint.
        let from = saved.unwrap_or(0) as usize;
        let more = if round == 0 {
            rng.below(3)
        } else {
            1 + rng.below(8)
        } as usize;
        let reached = more == 0 || wait_for_lines(&mut child, &out, from + more);
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if !reached || status.success() {
            break; // it finished first: nothing was interrupted
        }
        kills += 1;
        let names = std::fs::read_dir(out.join("checkpoint")).map(|d| d.count());
        torn += usize::from(names.is_ok_and(|n| n > 1));
        let now = check_after_kill(&out, &straight_losses);
        assert!(
            now >= saved,
            "the checkpoint went back from {saved:?} to {now:?}"
        );
        saved = now;
        if saved == Some(STEPS) {
            break;
        }
    }
    eprintln!("{kills} kills; {torn} left a torn temporary file; last checkpoint {saved:?}");
    assert!(
        kills >= 4,
        "only {kills} sessions were killed before they ended"
    );

    let extra: &[&str] = if saved.is_some() { &["--resume"] } else { &[] };
    let last: Vec<&str> = args.iter().chain(extra).copied().collect();
    train_ok(&finetune_args(&data, &out, &last));
    let names: Vec<_> = std::fs::read_dir(out.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["state.safetensors"], "--resume removes torn writes");
    assert_eq!(loss_bits(&straight), loss_bits(&out));
    let weights =
        |out: &Path| std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(weights(&straight) == weights(&out));
}
