//! What the default run prints and saves: the comparison table, samples, the merged-model
//! check with inference latencies, and the run directory (adapter, metrics.jsonl,
//! predictions.txt, loss.svg, config.json, summary.md).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use autograd::Tape;
use lora::LoraModel;
use transformer::{GenerateConfig, Gpt2, Tokenizer, generate};

use crate::e2e::E2eData;
use crate::main_job::{Row, RunArgs};

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// The comparison as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| run | trainable / total params | BLEU | final loss | tokens/s | train s | weights MiB | grads MiB | optimizer MiB | activations MiB |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        match &r.report {
            Some(rep) => {
                let m = &rep.memory;
                let _ = writeln!(
                    t,
                    "| {} | {} / {} | {:.1} | {:.3} | {:.0} | {:.1} | {} | {} | {} | {} |",
                    r.name,
                    rep.trainable,
                    r.total_params,
                    r.bleu.score,
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
                    "| {} | 0 / {} | {:.1} | – | – | – | – | – | – | – |",
                    r.name, r.total_params, r.bleu.score
                );
            }
        }
    }
    t
}

/// Print `n` held-out MRs with our output and their first reference.
pub fn samples(data: &E2eData, predictions: &[String], n: usize) {
    for ((mr, refs), pred) in data.heldout().iter().zip(predictions).take(n) {
        println!(
            "\nMR:        {mr}\ngenerated: {pred}\nreference: {}",
            refs[0]
        );
    }
}

/// Seconds per call of `f`, the best of 3 after a warm-up.
fn best_of(mut f: impl FnMut() -> crate::Result<()>) -> crate::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Merge the adapter, check merged logits equal unmerged ones, and time greedy decoding of 32
/// tokens for the base, the unmerged and the merged model. Leaves the adapter unmerged.
pub fn inference_latency(
    model: &Gpt2,
    lora: &LoraModel,
    tok: &Tokenizer,
    data: &E2eData,
) -> crate::Result<String> {
    let prompt = format!("{} ||", data.heldout()[0].0);
    let ids = tok.encode(&prompt);
    let logits = |m: &Gpt2| -> crate::Result<Vec<f32>> {
        Ok(m.logits(&Tape::inference(), &ids, 1, ids.len())?
            .value
            .to_vec()?)
    };
    let cfg = GenerateConfig {
        max_new_tokens: 32,
        stop_at_eot: false,
        ..GenerateConfig::default()
    };
    let decode = |m: &Gpt2| -> crate::Result<f64> {
        let secs = best_of(|| {
            generate(m, tok, &[prompt.as_str()], &cfg)
                .map(|_| ())
                .map_err(Into::into)
        })?;
        Ok(secs / cfg.max_new_tokens as f64 * 1e3)
    };
    let unmerged = logits(model)?;
    let t_unmerged = decode(model)?;
    lora.merge(model)?;
    let merged = logits(model)?;
    let t_merged = decode(model)?;
    lora.unmerge(model)?;
    let scale = unmerged.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let diff = unmerged
        .iter()
        .zip(&merged)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    if diff > 1e-5 * scale.max(1.0) * 10.0 {
        return Err(
            format!("merged and unmerged logits differ by {diff} (largest logit {scale})").into(),
        );
    }
    // The base: detach the adapter's effect by timing a model without one.
    let base = Gpt2::from_checkpoint(&model.to_checkpoint()?, &model.wte.value().device(), false)?;
    let t_base = decode(&base)?;
    Ok(format!(
        "merged vs unmerged logits: max |diff| {diff:.2e} (largest logit {scale:.2}, relative {:.2e})\n\
         greedy decoding, batch 1, ms per token: base {t_base:.2}, LoRA unmerged {t_unmerged:.2}, LoRA merged {t_merged:.2}",
        diff / scale.max(f32::MIN_POSITIVE)
    ))
}

/// A loss curve as SVG.
pub fn plot_losses(path: &Path, series: &[(&str, &[f32])]) -> crate::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let steps = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(2);
    let top = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0f32, f32::max)
        .max(0.1);
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss (completion tokens)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(40)
        .build_cartesian_2d(0..steps, 0f32..top * 1.05)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| format!("{e}"))?;
    for (i, (name, losses)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                losses.iter().enumerate().map(|(s, &l)| (s, l)),
                color,
            ))
            .map_err(|e| format!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| format!("{e}"))?;
    root.present()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// Write the run directory's files.
pub fn save_run(
    out: &Path,
    args: &RunArgs,
    rows: &[Row],
    predictions: &[String],
    table: &str,
    latency: &str,
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
            serde_json::json!({"run": r.name, "eval": "bleu_heldout", "bleu": r.bleu.score})
        );
    }
    write("metrics.jsonl", metrics)?;
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({"run": r.name, "bleu": r.bleu.score, "total_params": r.total_params});
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
    write(
        "config.json",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": args.model, "data": args.data, "steps": args.steps, "batch": args.batch,
            "r": args.r, "alpha": args.alpha, "targets": args.targets, "lora_lr": args.lora_lr,
            "full_lr": args.full_lr, "seed": args.seed, "full": !args.no_full,
        }))? + "\n",
    )?;
    let series: Vec<(&str, &[f32])> = rows
        .iter()
        .filter_map(|r| {
            r.report
                .as_ref()
                .map(|rep| (r.name.as_str(), rep.losses.as_slice()))
        })
        .collect();
    plot_losses(&out.join("loss.svg"), &series)?;
    write(
        "summary.md",
        format!(
            "# E2E NLG fine-tuning run\n\nBLEU-4 on {} held-out MRs (greedy decoding, sacrebleu-compatible, tokenize='none').\n\n{table}\n{latency}\n",
            predictions.len()
        ),
    )?;
    Ok(())
}
