//! `train bench scaling`: how a training step's time and memory grow with B, with T and with
//! the model, for LoRA and full fine-tuning.
//!
//! Three sweeps around a base point (model₀, B₀×T₀): B over `--b` at T₀, T over `--t` at B₀
//! (on model₀), and the model over `--models` at B₀×T₀. Each point is measured as in
//! `bench step` (warm-up, median of measured steps, memory by purpose). What to expect:
//! weights, gradients and optimizer state do not depend on B or T; activations and time grow
//! linearly in B, and in T plus a T² term from attention's scores; LoRA's gradient and
//! optimizer memory stay a small constant while full fine-tuning's are 2× and 3× the weights'
//! (gradients; m and v).

use clap::Parser;
use serde_json::json;
use tensor::Device;

use super::step::{COLUMNS, cells, measure, skip};
use super::table::Report;
use super::{Budget, Mode, parse_bt, shape, step_flops, trainee};

/// Options of `train bench scaling`.
#[derive(Parser, Debug, Clone)]
pub struct ScalingArgs {
    /// Models of the size sweep; the first is the model of the B and T sweeps
    /// [default: 124m,medium on a GPU, tiny,e2e,124m on the CPU].
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// The base point B₀×T₀ [default: 4x512 on a GPU, 2x64 on the CPU].
    #[arg(long)]
    pub base: Option<String>,
    /// Batch sizes of the B sweep [default: 1,2,4,8].
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub b: Vec<usize>,
    /// Sequence lengths of the T sweep [default: 128,256,512,1024 on a GPU, 32,64,128 on the
    /// CPU].
    #[arg(long, value_delimiter = ',')]
    pub t: Vec<usize>,
    #[command(flatten)]
    pub mode: super::ModeArgs,
    /// Unmeasured steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Measured steps (the median is reported).
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Skip a point whose estimated time exceeds this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub budget: f64,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `train bench scaling`.
pub fn run(args: &ScalingArgs, device: &Device) -> crate::Result<()> {
    let label = super::device_label(device);
    let gpu = device.is_gpu();
    let models: Vec<String> = if args.models.is_empty() {
        let d: &[&str] = if gpu {
            &["124m", "medium"]
        } else {
            &["tiny", "e2e", "124m"]
        };
        d.iter().map(|s| s.to_string()).collect()
    } else {
        args.models.clone()
    };
    let (b0, t0) = parse_bt(
        args.base
            .as_deref()
            .unwrap_or(if gpu { "4x512" } else { "2x64" }),
    )?;
    let ts: Vec<usize> = match args.t.is_empty() {
        true if gpu => vec![128, 256, 512, 1024],
        true => vec![32, 64, 128],
        false => args.t.clone(),
    };
    let mut points: Vec<(&'static str, String, usize, usize)> = Vec::new();
    for &b in &args.b {
        points.push(("B", models[0].clone(), b, t0));
    }
    for &t in &ts {
        points.push(("T", models[0].clone(), b0, t));
    }
    for m in &models {
        points.push(("model", m.clone(), b0, t0));
    }
    let mut budget = Budget::new(args.budget, device)?;
    for mode in args.mode.parse()? {
        let mut columns = vec![("sweep", 5)];
        columns.extend(COLUMNS);
        let report = Report::new(
            args.json,
            &format!(
                "scaling, {} fine-tuning, on {label} (base point {}x{b0}x{t0}; median of {} \
                 after {} warm-up)",
                mode.name(),
                models[0],
                args.steps,
                args.warmup
            ),
            &columns,
        );
        // One model at a time: a point's model is built when the sweep reaches it.
        let mut current: Option<(String, super::Trainee)> = None;
        for (axis, name, b, t) in &points {
            let cfg = shape(name)?;
            let what = json!({"device": label, "sweep": axis, "model": name,
                "mode": mode.name(), "b": b, "t": t});
            if *b == 0 || *t == 0 || *t > cfg.n_positions {
                let why = format!("B = {b}, T = {t} with a context of {}", cfg.n_positions);
                skip(&report, "scaling", what, &why);
                continue;
            }
            let flops = step_flops(&cfg, *b, *t, matches!(mode, Mode::Full));
            let estimate = budget.estimate(flops) * (args.warmup + args.steps) as f64;
            if estimate > args.budget {
                let why = format!("about {estimate:.0} s at this device's rate (--budget)");
                skip(&report, "scaling", what, &why);
                continue;
            }
            if current.as_ref().is_none_or(|(n, _)| n != name) {
                drop(current.take()); // free the previous model first
                current = Some((name.clone(), trainee(&cfg, &mode, device, 1)?));
            }
            let (_, tr) = current.as_mut().expect("built above");
            let case = measure(tr, name, &mode, (*b, *t), args.warmup, args.steps, device)?;
            budget.observe(flops, case.ms / 1e3);
            let mut v = case.to_json("scaling", &label);
            v["sweep"] = json!(axis);
            let mut row = vec![axis.to_string()];
            row.extend(cells(&case));
            report.row(v, &row);
        }
    }
    Ok(())
}
