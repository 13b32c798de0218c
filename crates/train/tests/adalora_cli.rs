//! `train finetune --adalora` on the tiny fixture: the budget follows PEFT's cubic schedule,
//! allocations are recorded, the saved adapter is PEFT's ADALORA layout pruned to the final rank
//! pattern (target_r · modules triplets in all), `train analyze` lists the kept ranks, and
//! `train eval` and `train merge` load it.
//! Parity of the AdaLoRA math with PEFT's own run is `crates/lora/tests/adalora_parity.rs`.

mod common;

use common::{finetune, metrics, scratch, tiny, train_fails, train_ok};
use serde_json::Value;

const ADALORA: [&str; 17] = [
    "--steps",
    "12",
    "--batch",
    "2",
    "--lr",
    "1e-2",
    "--adalora",
    "--init-r",
    "12",
    "--target-r",
    "8",
    "--tinit",
    "2",
    "--tfinal",
    "2",
    "--delta-t",
    "2",
];

#[test]
fn adalora_trains_prunes_saves_peft_layout_and_merges() {
    let dir = scratch("adalora");
    let data = dir.join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(30),
    )
    .unwrap();
    let out = dir.join("run");
    let mut args = ADALORA.to_vec();
    args.extend(["--targets", "c_attn,fc"]);
    let printed = finetune(&data, &out, &args);
    assert!(printed.contains("AdaLoRA on 4 Linears"), "{printed}");

    let records = metrics(&out);
    let budgets: Vec<u64> = records
        .iter()
        .map(|r| r["budget"].as_u64().unwrap())
        .collect();
    assert_eq!(budgets, [48, 48, 48, 42, 38, 35, 34, 32, 32, 32, 32, 32]);
    let allocated: Vec<u64> = records
        .iter()
        .filter(|r| r.get("ranks").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(allocated, [5, 7, 9, 11, 12]);
    for r in records.iter().filter(|r| r.get("ranks").is_some()) {
        let kept: u64 = r["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(kept, r["budget"].as_u64().unwrap(), "step {}", r["step"]);
    }

    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("AdaLoRA"), "loss.svg");
    let adapter = out.join("adapter");
    let text = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["peft_type"], "ADALORA");
    assert_eq!(config["init_r"], 12);
    assert_eq!(config["total_step"], 12);
    let pattern = config["rank_pattern"].as_object().unwrap();
    assert_eq!(pattern.len(), 4);
    let ranks: Vec<usize> = pattern
        .values()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .filter(|b| b.as_bool().unwrap())
                .count()
        })
        .collect();
    assert_eq!(ranks.iter().sum::<usize>(), 32);
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (key, r) in pattern.keys().zip(&ranks) {
        let stem = format!("base_model.model.{}", key.strip_suffix(".lora_E").unwrap());
        assert_eq!(
            st.tensor(&format!("{stem}.lora_E")).unwrap().shape(),
            [*r, 1]
        );
        assert_eq!(
            st.tensor(&format!("{stem}.lora_A")).unwrap().shape(),
            [*r, 64]
        );
        assert_eq!(st.tensor(&format!("{stem}.lora_B")).unwrap().shape()[1], *r);
    }

    let model = tiny();
    let a = adapter.to_str().unwrap();
    let printed = train_ok(&["analyze", "--model", &model, "--adapter", a]);
    assert!(
        printed.contains("AdaLoRA ranks kept (of init_r 12): 32 of 48"),
        "{printed}"
    );
    let v: Value = serde_json::from_str(&train_ok(&[
        "analyze",
        "--model",
        &model,
        "--adapter",
        a,
        "--json",
    ]))
    .unwrap();
    let listed = v["adapters"][0]["adalora"]["ranks"]
        .as_array()
        .unwrap()
        .clone();
    let mut want: Vec<(String, u64)> = pattern
        .keys()
        .zip(&ranks)
        .map(|(k, r)| (k.clone(), *r as u64))
        .collect();
    want.sort();
    let mut got: Vec<(String, u64)> = listed
        .iter()
        .map(|r| {
            let name = format!(
                "transformer.h.{}.{}.lora_E",
                r["layer"],
                r["module"].as_str().unwrap()
            );
            (name, r["rank"].as_u64().unwrap())
        })
        .collect();
    got.sort();
    assert_eq!(
        got, want,
        "train analyze's ranks against the adapter's rank_pattern"
    );
    let eval = |adapter: Option<&std::path::Path>, model: &str| -> f64 {
        let mut a = vec![
            "eval",
            "--model",
            model,
            "--data",
            data.to_str().unwrap(),
            "--json",
        ];
        if let Some(p) = adapter {
            a.extend(["--adapter", p.to_str().unwrap()]);
        }
        let v: Value = serde_json::from_str(&train_ok(&a)).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let base = eval(None, &model);
    let with = eval(Some(&adapter), &model);
    assert!(
        with < base,
        "the adapter does not lower the loss: {with} vs {base}"
    );
    let merged = dir.join("merged");
    train_ok(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let folded = eval(None, merged.to_str().unwrap());
    assert!(
        (folded - with).abs() < 1e-4 * with,
        "merged {folded}, with the adapter {with}"
    );
}

#[test]
fn adalora_refuses_slices_and_schedules_without_a_budgeting_phase() {
    let dir = scratch("adalora-refusals");
    let data = dir.join("data.txt");
    std::fs::write(
        &data,
        "the quick brown fox jumps over the lazy dog. ".repeat(30),
    )
    .unwrap();
    let out = dir.join("run");
    let mut args: Vec<String> = common::finetune_args(&data, &out, &ADALORA);
    args.extend(["--targets".into(), "q,v".into()]);
    let e = train_fails(&args);
    assert!(e.contains("whole Linears"), "{e}");
    let mut late = ADALORA;
    let at = late.iter().position(|&a| a == "--tinit").unwrap();
    late[at + 1] = "10";
    let args = common::finetune_args(&data, &out, &late);
    let e = train_fails(&args);
    assert!(e.contains("no budgeting phase"), "{e}");
}
