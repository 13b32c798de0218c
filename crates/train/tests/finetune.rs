//! `train finetune` on the tiny fixture model (byte tokenizer, 64 positions): every data format,
//! full fine-tuning, exact resumption, and the messages for bad data.

mod common;

use std::path::Path;

use common::{e2e, finetune, loss_bits, metrics, scratch, tiny, train_fails, train_ok};
use serde_json::Value;

fn jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            let v = serde_json::json!({"context": format!("Q: {i} + {i}?"), "completion": format!(" {}", 2 * i)});
            format!("{v}\n")
        })
        .collect()
}

fn text() -> String {
    "the quick brown fox jumps over the lazy dog. ".repeat(30)
}

fn eval_loss(model: &str, adapter: Option<&Path>, text: &Path) -> f64 {
    let mut args = vec![
        "eval",
        "--model",
        model,
        "--data",
        text.to_str().unwrap(),
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let v: Value = serde_json::from_str(&train_ok(&args)).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn every_format_trains_and_saves_an_adapter_eval_loads() {
    let dir = scratch("formats");
    let sample = dir.join("sample.txt");
    std::fs::write(&sample, "the lazy dog jumps over the quick brown fox.").unwrap();
    for (name, content, format) in [
        ("data.txt", text(), "text"),
        ("data.jsonl", jsonl(30), "jsonl"),
        ("pairs.txt", e2e(30), "e2e"),
    ] {
        let data = dir.join(name);
        std::fs::write(&data, content).unwrap();
        let out = dir.join(format);
        let printed = finetune(
            &data,
            &out,
            &["--steps", "3", "--batch", "2", "--lr", "1e-2"],
        );
        assert!(printed.contains(&format!(": {format},")), "{printed}");
        let steps: Vec<u64> = metrics(&out)
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3], "{format}");
        assert!(
            std::fs::read_to_string(out.join("loss.svg"))
                .unwrap()
                .contains("<svg")
        );
        let adapter = out.join("adapter");
        let (base, tuned) = (
            eval_loss(&tiny(), None, &sample),
            eval_loss(&tiny(), Some(&adapter), &sample),
        );
        assert!(base != tuned, "{format}: the adapter changes the model");
    }
}

#[test]
fn full_fine_tuning_saves_a_model_eval_loads() {
    let dir = scratch("full");
    let data = dir.join("data.txt");
    std::fs::write(&data, text()).unwrap();
    let out = dir.join("run");
    finetune(
        &data,
        &out,
        &["--full", "--steps", "4", "--batch", "2", "--lr", "1e-3"],
    );
    let model = out.join("model");
    let tuned = eval_loss(model.to_str().unwrap(), None, &data);
    let base = eval_loss(&tiny(), None, &data);
    assert!(
        tuned < base,
        "4 steps on the text lower its loss: {base} → {tuned}"
    );
}

#[test]
fn a_resumed_run_has_the_losses_of_an_uninterrupted_one_bit_for_bit() {
    let dir = scratch("resume");
    let data = dir.join("data.jsonl");
    std::fs::write(&data, jsonl(60)).unwrap();
    // Everything that carries state across steps: warm-up and cosine decay, LoRA dropout,
    // two micro-batches a step, held-out evaluation; full fine-tuning as well as LoRA.
    let common = [
        "--steps",
        "6",
        "--batch",
        "3",
        "--grad-accum",
        "2",
        "--warmup",
        "2",
        "--schedule",
        "cosine",
        "--lr",
        "5e-3",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--seed",
        "11",
    ];
    let modes = [
        (
            "lora",
            &["--dropout", "0.1", "--targets", "q,v,fc"][..],
            "adapter/adapter_model.safetensors",
        ),
        ("full", &["--full"][..], "model/model.safetensors"),
    ];
    for (name, mode, weights) in modes {
        let args: Vec<&str> = common.iter().chain(mode).copied().collect();
        let straight = dir.join(format!("{name}-straight"));
        finetune(&data, &straight, &args);

        let resumed = dir.join(format!("{name}-resumed"));
        let first: Vec<&str> = args.iter().copied().chain(["--stop-after", "3"]).collect();
        let printed = finetune(&data, &resumed, &first);
        assert!(printed.contains("stopped after step 3 of 6"), "{printed}");
        let trained = metrics(&resumed)
            .iter()
            .filter(|r| r.get("loss").is_some())
            .count();
        assert_eq!(trained, 3, "{name}");
        // A write that a crash interrupted leaves a temporary file behind; it must not matter.
        std::fs::write(resumed.join("checkpoint/.state.safetensors.tmp.1"), b"torn").unwrap();
        let again: Vec<&str> = args.iter().copied().chain(["--resume"]).collect();
        let printed = finetune(&data, &resumed, &again);
        assert!(printed.contains("resuming after step 3 of 6"), "{printed}");

        let (a, b) = (loss_bits(&straight), loss_bits(&resumed));
        assert_eq!(a.len(), 6 + 3, "{name}: 6 training and 3 held-out losses");
        assert_eq!(
            a, b,
            "{name}: losses of the uninterrupted and the resumed run"
        );
        let bytes = |run: &Path| std::fs::read(run.join(weights)).unwrap();
        assert!(
            bytes(&straight) == bytes(&resumed),
            "{name}: the saved weights differ"
        );
    }
}

#[test]
fn resuming_needs_the_same_options_and_a_checkpoint() {
    let dir = scratch("resume-checks");
    let data = dir.join("data.txt");
    std::fs::write(&data, text()).unwrap();
    let out = dir.join("run");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let model = tiny();
    let base = [
        "finetune", "--model", &model, "--data", d, "--out", o, "--steps", "4", "--batch", "2",
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let e = train_fails(&with(&["--resume"]));
    assert!(e.contains("--resume: no checkpoint in"), "{e}");
    train_ok(&with(&["--stop-after", "2"]));
    let e = train_fails(&with(&[]));
    assert!(
        e.contains("holds the checkpoint of an earlier run: pass --resume"),
        "{e}"
    );
    let e = train_fails(&with(&["--resume", "--lr", "0.01", "--r", "4"]));
    assert!(
        e.contains("other options") && e.contains("lr: 0.001 then, 0.01 now"),
        "{e}"
    );
    std::fs::write(&data, text() + "more").unwrap();
    let e = train_fails(&with(&["--resume"]));
    assert!(e.contains("data_fnv1a64"), "{e}");
}

#[test]
fn bad_data_files_give_their_messages() {
    let dir = scratch("bad");
    let model = tiny();
    let check = |name: &str, content: &[u8], extra: &[&str], want: &str| {
        let data = dir.join(name);
        std::fs::write(&data, content).unwrap();
        let out = dir.join(format!("out-{name}"));
        let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
        let mut args = vec![
            "finetune", "--model", &model, "--data", d, "--out", o, "--steps", "1",
        ];
        args.extend_from_slice(extra);
        let e = train_fails(&args);
        assert!(e.contains(want), "{name}: expected `{want}` in:\n{e}");
    };
    check("empty.txt", b"", &[], "empty.txt: the file is empty");
    check(
        "latin1.txt",
        b"caf\xe9 au lait\n",
        &[],
        "latin1.txt: not UTF-8 text (line 1",
    );
    check(
        "pairs.txt",
        b"a : b||B .\nno separator\n",
        &[],
        "pairs.txt line 2: no `||`",
    );
    check(
        "list.jsonl",
        b"[\"context\", \"completion\"]\n",
        &[],
        "list.jsonl line 1: expected a JSON object",
    );
    check(
        "half.jsonl",
        b"{\"context\": \"a\", \"completion\": \"b\"}\n{\"context\": \"c\"}\n",
        &[],
        "half.jsonl line 2: no `completion` field",
    );
    check(
        "few.jsonl",
        jsonl(3).as_bytes(),
        &["--batch", "4"],
        "--batch 4 is larger than the 3 training examples",
    );
}
