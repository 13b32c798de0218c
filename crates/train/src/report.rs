//! What the default run prints and saves: the comparison table ([`Row`], [`table`]), samples,
//! and the run directory ([`save_run`]: metrics.jsonl, results.json, predictions.txt,
//! config.json, loss.svg, summary.md; the adapter is saved beside them by
//! [`crate::main_job`]).

use std::fmt::Write as _;
use std::path::Path;

use crate::bleu::Bleu;
use crate::e2e::E2eData;
use crate::finetune::RunReport;
use crate::loss_plot::{Curve, plot_losses};
use crate::slots::SlotAccuracy;

/// One row of the comparison.
pub struct Row {
    pub name: String,
    pub bleu: Bleu,
    /// Share of held-out outputs that state the MR's name, food, area, near.
    pub slots: SlotAccuracy,
    pub report: Option<RunReport>,
    pub total_params: usize,
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// `92/90/97/88`: the slot accuracies in percent, in [`crate::slots::SLOTS`]' order.
fn slot_cell(s: &SlotAccuracy) -> String {
    crate::slots::SLOTS
        .iter()
        .map(|n| s.percent(n).map_or("–".into(), |p| format!("{p:.0}")))
        .collect::<Vec<_>>()
        .join("/")
}

/// The comparison as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| run | trainable / total params | BLEU | name/food/area/near % | final loss | tokens/s | train s | weights MiB | grads MiB | optimizer MiB | activations MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        match &r.report {
            Some(rep) => {
                let m = &rep.memory;
                let _ = writeln!(
                    t,
                    "| {} | {} / {} | {:.1} | {} | {:.3} | {:.0} | {:.1} | {} | {} | {} | {} |",
                    r.name,
                    rep.trainable,
                    r.total_params,
                    r.bleu.score,
                    slot_cell(&r.slots),
                    rep.final_loss,
                    rep.tokens_per_s,
                    rep.seconds,
                    mib(m.parameters.peak),
                    mib(m.gradients.peak),
                    mib(m.optimizer.peak),
                    mib(m.activations.peak)
                );
            }
            None => {
                let _ = writeln!(
                    t,
                    "| {} | 0 / {} | {:.1} | {} | – | – | – | – | – | – | – |",
                    r.name,
                    r.total_params,
                    r.bleu.score,
                    slot_cell(&r.slots)
                );
            }
        }
    }
    t
}

/// `n` held-out MRs spread over the set (every `len / n`-th), each with our output and its
/// first reference.
pub fn samples(data: &E2eData, predictions: &[String], n: usize) -> String {
    let stride = (predictions.len() / n.max(1)).max(1);
    let mut s = String::new();
    for ((mr, refs), pred) in data
        .heldout()
        .iter()
        .zip(predictions)
        .step_by(stride)
        .take(n)
    {
        let _ = writeln!(
            s,
            "MR:        {mr}\ngenerated: {pred}\nreference: {}\n",
            refs[0]
        );
    }
    s
}

/// The texts of a run's `summary.md`.
pub struct Summary<'a> {
    pub table: &'a str,
    /// Held-out MRs with outputs ([`samples`]).
    pub samples: &'a str,
    /// The merge check and latency, or why they were skipped.
    pub latency: &'a str,
    /// How the outputs were decoded ([`crate::finetune::decoding`]).
    pub decoding: &'a str,
}

/// Write the run directory's files; `config` is the run's options, saved as `config.json`.
pub fn save_run(
    out: &Path,
    config: &serde_json::Value,
    rows: &[Row],
    predictions: &[String],
    summary: &Summary,
) -> crate::Result<()> {
    let write = |name: &str, text: String| -> crate::Result<()> {
        let path = out.join(name);
        transformer::tensor_file::write_file_atomically(&path, text.as_bytes())?;
        Ok(())
    };
    let mut metrics = String::new();
    for r in rows {
        if let Some(rep) = &r.report {
            for (i, l) in rep.losses.iter().enumerate() {
                let _ = writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"run": r.name, "step": i + 1, "loss": l})
                );
            }
        }
        let _ = writeln!(
            metrics,
            "{}",
            serde_json::json!({"run": r.name, "eval": "bleu_heldout", "bleu": r.bleu.score, "slots": r.slots.to_json()})
        );
    }
    write("metrics.jsonl", metrics)?;
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({"run": r.name, "bleu": r.bleu.score,
                "slot_accuracy_percent": r.slots.to_json(), "total_params": r.total_params});
            if let Some(rep) = &r.report {
                let m = &rep.memory;
                v["trainable_params"] = rep.trainable.into();
                v["final_loss"] = rep.final_loss.into();
                v["tokens_per_s"] = rep.tokens_per_s.into();
                v["train_seconds"] = rep.seconds.into();
                v["memory_peak_bytes"] = serde_json::json!({"parameters": m.parameters.peak,
                    "gradients": m.gradients.peak, "optimizer": m.optimizer.peak, "activations": m.activations.peak});
            }
            v
        })
        .collect();
    write(
        "results.json",
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    write("predictions.txt", predictions.join("\n") + "\n")?;
    write("config.json", serde_json::to_string_pretty(config)? + "\n")?;
    let curves: Vec<Curve> = rows
        .iter()
        .filter_map(|r| {
            r.report.as_ref().map(|rep| Curve {
                name: &r.name,
                losses: &rep.losses,
                heldout: &[],
            })
        })
        .collect();
    let title = "E2E NLG fine-tuning: training loss (completion tokens)";
    plot_losses(&out.join("loss.svg"), title, &curves)?;
    write(
        "summary.md",
        format!(
            "# E2E NLG fine-tuning run\n\nBLEU-4 on {} held-out MRs ({}, sacrebleu-compatible, \
             tokenize='none'); name/food/area/near: the share of outputs that contain the MR's \
             value for that slot (ignoring case).\n\n{}\nSamples of the first LoRA \
             run:\n\n```text\n{}```\n\n{}\n",
            predictions.len(),
            summary.decoding,
            summary.table,
            summary.samples,
            summary.latency
        ),
    )?;
    Ok(())
}
