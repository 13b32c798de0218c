//! `train combine` on the two PEFT adapters of `crates/lora/tests/fixtures/combine` (made with
//! PEFT by its `make.py`, which also recorded what PEFT's `add_weighted_adapter` gives): the
//! directory it writes loads, and its logits of the fixture's ids are PEFT's combined adapter's
//! (1e-4), for each combination type. Wrong arguments are refused by name.

mod common;

use std::path::PathBuf;

use autograd::Tape;
use common::{root, scratch, tiny, train_command};
use lora::LoraModel;
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

fn fixture(name: &str) -> PathBuf {
    root().join("crates/lora/tests/fixtures/combine").join(name)
}

/// The fixture ids' logits with the adapter in `dir` attached to the tiny model.
fn logits(dir: &std::path::Path) -> Vec<f32> {
    let device = Device::cpu();
    let mut model =
        Gpt2::from_checkpoint(&Checkpoint::load(tiny()).unwrap(), &device, false).unwrap();
    let mut lora = LoraModel::load_peft(dir, &model).unwrap().lora;
    lora.attach(&mut model).unwrap();
    let (ids, _, _) = integration_tests::gpt2_tiny::batch();
    let tape = Tape::inference();
    model
        .logits(&tape, &ids, 1, ids.len())
        .unwrap()
        .value
        .to_vec()
        .unwrap()
}

fn combine(extra: &[&str]) -> std::process::Output {
    let (a1, a2) = (fixture("a1"), fixture("a2"));
    train_command()
        .args(["combine", "--model", &tiny()])
        .args(["--adapter", a1.to_str().unwrap(), "--weight", "0.7"])
        .args(["--adapter", a2.to_str().unwrap(), "--weight", "-0.4"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn combined_adapters_give_peft_s_logits() {
    let dir = scratch("combine");
    for (case, extra) in [
        ("linear", &["--combination", "linear"][..]),
        ("cat", &["--combination", "cat"][..]),
        ("svd", &["--combination", "svd", "--svd-rank", "3"][..]),
        ("ties", &["--combination", "ties", "--density", "0.5"][..]),
        (
            "ties_frequency",
            &[
                "--combination",
                "ties",
                "--density",
                "0.7",
                "--majority-sign",
                "frequency",
            ][..],
        ),
    ] {
        let out = dir.join(case);
        let mut args = extra.to_vec();
        args.extend(["--out", out.to_str().unwrap()]);
        let o = combine(&args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        println!("{case}: {stdout}");
        let got = logits(&out);
        let want =
            transformer::tensor_file::read_tensors(&fixture(case).join("expected.safetensors"))
                .unwrap();
        let d = got
            .iter()
            .zip(&want[0].2)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-4, "{case}: logits differ from PEFT's by {d}");
    }
}

#[test]
fn wrong_arguments_are_refused_by_name() {
    let dir = scratch("combine-bad");
    let out = dir.join("x");
    let a1 = fixture("a1");
    let o = train_command()
        .args([
            "combine",
            "--model",
            &tiny(),
            "--adapter",
            a1.to_str().unwrap(),
        ])
        .args([
            "--adapter",
            a1.to_str().unwrap(),
            "--weight",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("2 --adapter but 1 --weight"),
        "{e}"
    );
    let o = combine(&[
        "--combination",
        "cat",
        "--svd-rank",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--svd-rank"), "{e}");
    let o = combine(&[
        "--combination",
        "svd",
        "--svd-rank",
        "65",
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("at most 64 singular values"),
        "{e}"
    );
}
