//! `train finetune` with PEFT's LoRA options (rsLoRA, rank/alpha patterns, layers, bias modes,
//! modules_to_save, gaussian/PiSSA/OLoRA init, LoRA+, weight decay, no clipping, --eval-data)
//! saves adapters that PEFT loads with the logits we compute.
//!
//! `tests/fixtures/ours-in-peft/finetuned/` holds one adapter per line of its `cases.txt`, made
//! by our finetune (`make_adapters.sh`), with PEFT 0.21.2's logits for each on the tiny model
//! (`../make_peft_logits.py`). For each case this test
//! 1. runs the same `train finetune` again and checks it writes the committed adapter: the same
//!    config, the same tensors (to 1e-5 of their scale: CPU kernels may round differently on
//!    another machine);
//! 2. loads the committed adapter and checks our logits equal PEFT's to 1e-4.

mod common;

use std::path::{Path, PathBuf};

use autograd::Tape;
use common::{metrics, root, scratch, train_fails, train_ok};
use lora::LoraModel;
use tensor::Device;
use transformer::tensor_file::read_tensors;
use transformer::{Checkpoint, Gpt2};

fn fixtures() -> PathBuf {
    root().join("tests/fixtures/ours-in-peft/finetuned")
}

/// (name, options) of each line of `cases.txt`, the common options (`*`) first in each.
fn cases() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(fixtures().join("cases.txt")).unwrap();
    let mut common = Vec::new();
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, options) = line.split_once('\t').expect("NAME<tab>OPTIONS");
        let options: Vec<String> = options.split_whitespace().map(String::from).collect();
        if name == "*" {
            common = options;
        } else {
            out.push((name.to_string(), [common.clone(), options].concat()));
        }
    }
    out
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Our logits (T·V) of the fixture's ids with the adapter in `dir` attached to the tiny model.
fn logits_with(dir: &Path) -> Vec<f32> {
    let ckpt = Checkpoint::load(integration_tests::gpt2_tiny::dir()).unwrap();
    let mut model = Gpt2::from_checkpoint(&ckpt, &Device::cpu(), false).unwrap();
    let mut lora = LoraModel::load_peft(dir, &model).unwrap().lora;
    lora.attach(&mut model).unwrap();
    let (ids, _, _) = integration_tests::gpt2_tiny::batch();
    let tape = Tape::inference();
    let logits = model.logits(&tape, &ids, 1, ids.len()).unwrap();
    logits.value.to_vec().unwrap()
}

#[test]
fn what_finetune_saves_with_pefts_options_gives_pefts_logits() {
    let cases = cases();
    assert!(cases.len() >= 7, "cases.txt lists {} cases", cases.len());
    let dir = scratch("finetune-peft");
    for (name, options) in &cases {
        let committed = fixtures().join(name);
        let out = dir.join(name);
        let mut args = vec![
            "finetune".to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        args.extend(options.iter().cloned());
        train_ok(&args);
        let made = out.join("adapter");
        assert_eq!(
            json(&made.join(lora::CONFIG_FILE)),
            json(&committed.join(lora::CONFIG_FILE)),
            "{name}: adapter_config.json"
        );
        let ours = read_tensors(&made.join(lora::WEIGHTS_FILE)).unwrap();
        let given = read_tensors(&committed.join(lora::WEIGHTS_FILE)).unwrap();
        let names = |t: &[(String, Vec<usize>, Vec<f32>)]| -> Vec<(String, Vec<usize>)> {
            t.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect()
        };
        assert_eq!(names(&ours), names(&given), "{name}: tensors and shapes");
        for ((key, _, a), (_, _, b)) in ours.iter().zip(&given) {
            // The k third of c_attn's bias has no effect on any output (softmax ignores a
            // shift shared by every key): its gradient is rounding noise, whose sign AdamW
            // turns into steps of the learning rate's size. Its values are not reproducible
            // across summation orders and are not compared.
            let c3 = a.len();
            let k_bias =
                key.contains("attn.c_attn") && key.ends_with(".bias") && !key.contains("lora_");
            let skip_k = |i: usize| k_bias && (c3 / 3..2 * c3 / 3).contains(&i);
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = a
                .iter()
                .zip(b)
                .enumerate()
                .filter(|(i, _)| !skip_k(*i))
                .fold(0.0f32, |m, (_, (x, y))| m.max((x - y).abs()));
            // Re-running the finetune reproduces the committed adapter up to f32 summation
            // order, which training amplifies: the fused attention (its own order of the same
            // sums) moved rslora_patterns' c_attn B by 4.5e-5 of its scale after its steps.
            assert!(
                worst <= 2e-4 * scale,
                "{name}: {key} is {worst} off the committed adapter (scale {scale})"
            );
        }
        let want = integration_tests::read_f64(&committed.join("peft_logits.safetensors"));
        let ok = integration_tests::check_tensor(
            &format!("{name}: logits vs PEFT"),
            &logits_with(&committed),
            integration_tests::get(&want, "logits_f64"),
            1e-4,
            0.0,
        );
        assert!(ok, "{name}: our logits differ from PEFT's");
    }
    // --eval-data with --eval-every 2: held-out losses after steps 2 and 4, none split off.
    let lora_plus = dir.join("lora_plus");
    let evals: Vec<u64> = metrics(&lora_plus)
        .iter()
        .filter(|r| r.get("eval_loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [2, 4]);
}

#[test]
fn pefts_options_are_checked_with_their_names() {
    let dir = scratch("finetune-peft-options");
    let out = dir.join("run");
    let data = fixtures().join("train.txt");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["finetune", "--model", "tests/fixtures/gpt2-tiny", "--data"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(data.display().to_string());
        a.extend([
            "--out".to_string(),
            out.display().to_string(),
            "--steps".into(),
            "1".into(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    for (extra, message) in [
        (
            &["--rank-pattern", "c_fc=2"][..],
            "rank_pattern key `c_fc` matches no adapted module",
        ),
        (&["--rank-pattern", "c_attn"], "expected KEY=VALUE"),
        (&["--alpha-pattern", "c_attn=x"], "is not a number"),
        (&["--modules-to-save", "wte"], "tied"),
        (&["--modules-to-save", "c_attn"], "also carries an adapter"),
        (&["--layers", "2"], "layer 2 does not exist"),
        (&["--init", "pissa", "--r", "65"], "it must be 1 to 64"),
        (&["--lora-plus-ratio", "0"], "--lora-plus-ratio 0"),
        (&["--max-grad-norm=-1"], "--max-grad-norm -1"),
    ] {
        // Status 1 for our checks, 2 for clap's.
        let out = common::run(&base(extra));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
    }
    let stderr = train_fails(&base(&["--lora-plus-ratio", "0"]));
    assert!(stderr.contains("it must be above 0"), "{stderr}");
    let out = common::run(&base(&["--full", "--use-rslora"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--use-rslora"),
        "{stderr}"
    );
}

/// A run with a PiSSA init (W0 changed), trained biases, a modules_to_save copy and LoRA+,
/// stopped after step 2 and resumed, saves the adapter of the uninterrupted run, byte for byte.
#[test]
fn a_resumed_pissa_run_saves_the_uninterrupted_runs_adapter() {
    let dir = scratch("finetune-peft-resume");
    let options = cases()
        .into_iter()
        .find(|(name, _)| name == "pissa")
        .unwrap()
        .1;
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "finetune".to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        args.extend(options.iter().cloned());
        args.extend(["--bias", "all", "--lora-plus-ratio", "4"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        train_ok(&args);
    };
    let (whole, parts) = (dir.join("whole"), dir.join("parts"));
    run(&whole, &[]);
    run(&parts, &["--stop-after", "2"]);
    assert!(!parts.join("adapter").exists(), "stopped before the end");
    run(&parts, &["--resume"]);
    for file in [lora::WEIGHTS_FILE, lora::CONFIG_FILE] {
        let a = std::fs::read(whole.join("adapter").join(file)).unwrap();
        let b = std::fs::read(parts.join("adapter").join(file)).unwrap();
        assert!(a == b, "{file} differs after resuming");
    }
}
