//! Bad data for `train finetune`, beyond the cases of `tests/finetune.rs` (empty file, a
//! non-UTF-8 byte on line 1, an E2E line without `||`, JSONL without its fields, `--batch`
//! above the examples): each gives a message that says what is wrong and where.
//!
//! The policy for sequences longer than the context (or `--seq-len`): such an example is
//! dropped, not truncated (cutting its context would teach completions of facts the model was
//! not given), and a warning says how many; a file of nothing but such examples is refused.

mod common;

use common::*;

fn fails_with(dir: &std::path::Path, name: &str, content: &[u8], extra: &[&str], want: &[&str]) {
    let data = write(dir, name, content);
    let out = dir.join(format!("out-{name}"));
    let mut args = vec!["--steps", "1"];
    args.extend_from_slice(extra);
    let e = train_fails(&finetune_args(&data, &out, &args));
    for w in want {
        assert!(e.contains(w), "{name}: expected `{w}` in:\n{e}");
    }
    assert!(
        !out.join("checkpoint").exists(),
        "{name}: nothing is written"
    );
}

#[test]
fn a_bad_byte_is_located_by_line_and_byte_offset() {
    let dir = scratch("bad-utf8");
    // Line 2 starts at byte 12; its é in Latin-1 (0xE9) is at byte 12 + 10 = 22.
    let content = b"a : b||ok .\nc : d||caf\xe9 .\n";
    assert_eq!(content[22], 0xe9);
    fails_with(
        &dir,
        "latin1.txt",
        content,
        &[],
        &["latin1.txt: not UTF-8 text (line 2, byte 22 is not valid UTF-8)"],
    );
}

#[test]
fn e2e_and_missing_files_name_the_problem() {
    let dir = scratch("bad-lines");
    fails_with(
        &dir,
        "pairs.txt",
        b"a : b||B .\n\nc : d||D .\ne : f||F || G .\n",
        &[],
        &["pairs.txt line 4: more than one `||`"],
    );
    fails_with(
        &dir,
        "forced.txt",
        b"just some text\n",
        &["--format", "e2e"],
        &[
            "forced.txt line 1: no `||` between context and completion",
            "--format text",
        ],
    );
    let missing = dir.join("missing.txt");
    let out = dir.join("out-missing");
    let e = train_fails(&finetune_args(&missing, &out, &["--steps", "1"]));
    assert!(e.contains("missing.txt: No such file"), "{e}");
}

#[test]
fn examples_longer_than_the_context_are_dropped_and_counted() {
    let dir = scratch("too-long");
    // The tiny model's context is 64 tokens (bytes): 3 of these 10 examples are longer.
    let mut content = e2e(7);
    for i in 0..3 {
        content.push_str(&format!(
            "name : R{i} | food : Thai||{}\n",
            "very ".repeat(12)
        ));
    }
    let data = write(&dir, "pairs.txt", &content);
    let out = dir.join("run");
    let output = run(&finetune_args(
        &data,
        &out,
        &["--steps", "2", "--batch", "2"],
    ));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "warning: 3 of the 10 examples of {} are longer than 64 tokens (--seq-len) and \
             were dropped, not truncated"
                .replace("{}", &data.display().to_string())
                .as_str()
        ),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("7 examples (7 training, 0 held out); 3 longer than 64"),
        "{stdout}"
    );

    // A shorter --seq-len drops more; when none fits, the run is refused.
    fails_with(
        &dir,
        "all-long.txt",
        content.as_bytes(),
        &["--seq-len", "16"],
        &["all-long.txt: no training example: each of its 10 examples is longer than 16 tokens"],
    );
    fails_with(
        &dir,
        "seq.txt",
        content.as_bytes(),
        &["--seq-len", "100"],
        &["--seq-len 100: it must be 2 to the model's context, 64"],
    );
}

#[test]
fn a_batch_larger_than_the_training_examples_is_refused() {
    let dir = scratch("big-batch");
    // 20 examples, of which --eval-every holds out every twentieth: 19 train.
    fails_with(
        &dir,
        "pairs.txt",
        e2e(20).as_bytes(),
        &["--eval-every", "1", "--batch", "20"],
        &["--batch 20 is larger than the 19 training examples of"],
    );
    fails_with(
        &dir,
        "accum.txt",
        e2e(4).as_bytes(),
        &["--grad-accum", "0"],
        &["--batch and --grad-accum must be at least 1"],
    );
}
