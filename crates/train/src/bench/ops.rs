//! `train bench ops`: where the time of a training step goes, by op family and phase.
//!
//! Runs warm-up steps, then `--steps` steps with the profiler of [`tensor::profile`] on, and
//! reports per (phase, family) the time per step and its share of the profiled total. Phases
//! are forward (embedding to loss), backward and optimizer (clipping and AdamW). Families are
//! those the ops' guards name (matmul, softmax, layernorm, elementwise, reduce, layout,
//! embedding, loss, sgmv, optimizer) and the wider scopes that absorb them: `attention` (q·kᵀ,
//! scaling, causal softmax, att·v and the head reshapes, forward and backward; the q, k, v and
//! output projections stay `matmul`) and `optimizer`.
//!
//! How the time was measured is part of the output: CPU wall time per scope; on a GPU with
//! timestamp queries, GPU time per compute pass; without them, host time with a device sync at
//! each scope's ends (slower, but still a fair split). Profiling adds work (syncs, extra passes),
//! so the step time under the profiler is reported next to the unprofiled one.

use clap::Parser;
use serde_json::json;
use tensor::{Device, profile};

use super::table::{Report, f};
use super::{Budget, Mode, median, parse_bt, shape, step_flops, token_batch, trainee};

/// Options of `train bench ops`.
#[derive(Parser, Debug, Clone)]
pub struct OpsArgs {
    /// Model shape: e2e, tiny, 124m, medium or a config.json path [default: 124m on a GPU, tiny on the CPU].
    #[arg(long)]
    pub model: Option<String>,
    /// Batch shape B×T [default: 8x1024 on a GPU, 8x128 on the CPU].
    #[arg(long)]
    pub bt: Option<String>,
    #[command(flatten)]
    pub mode: super::ModeArgs,
    /// Unmeasured steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Profiled steps (and as many unprofiled ones for comparison).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Skip a case whose estimated time exceeds this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub budget: f64,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `train bench ops`.
pub fn run(args: &OpsArgs, device: &Device) -> crate::Result<()> {
    let label = super::device_label(device);
    let name = args
        .model
        .clone()
        .unwrap_or_else(|| if device.is_gpu() { "124m" } else { "tiny" }.to_string());
    let (b, t) =
        parse_bt(
            args.bt
                .as_deref()
                .unwrap_or(if device.is_gpu() { "8x1024" } else { "8x128" }),
        )?;
    let cfg = shape(&name)?;
    if t > cfg.n_positions {
        return Err(format!(
            "T = {t} exceeds the context of {} of model `{name}`",
            cfg.n_positions
        )
        .into());
    }
    let mut budget = Budget::new(args.budget, device)?;
    let steps = args.steps.max(1);
    for mode in args.mode.parse()? {
        let flops = step_flops(&cfg, b, t, matches!(mode, Mode::Full));
        // Warm-up, unprofiled and profiled steps, the latter up to a few times slower.
        let estimate = budget.estimate(flops) * (args.warmup + 3 * steps) as f64;
        let title = format!(
            "time by op family: {name} {} {b}x{t} on {label}",
            mode.name()
        );
        let report = Report::new(
            args.json,
            &title,
            &[
                ("phase", 10),
                ("family", 12),
                ("ms/step", 10),
                ("share %", 8),
                ("scopes/step", 11),
            ],
        );
        let what = json!({"device": label, "model": name, "mode": mode.name(), "b": b, "t": t});
        if estimate > args.budget {
            let why = format!("about {estimate:.0} s at this device's rate (--budget)");
            super::step::skip(&report, "ops", what, &why);
            continue;
        }
        let mut tr = trainee(&cfg, &mode, device, 1)?;
        let batch = token_batch(b, t, cfg.vocab_size, 7);
        for _ in 0..args.warmup {
            tr.step(&batch)?;
        }
        let mut plain = Vec::new();
        for _ in 0..steps {
            let start = std::time::Instant::now();
            tr.step(&batch)?;
            plain.push(start.elapsed().as_secs_f64());
        }
        let method = profile::start(device);
        let start = std::time::Instant::now();
        let run = (0..steps).try_for_each(|_| tr.step(&batch).map(|_| ()));
        let profiled_secs = start.elapsed().as_secs_f64() / steps as f64;
        let p = profile::stop();
        run?;
        budget.observe(flops, median(&plain));
        let total = p.total();
        // Phases in the order they run, then the costliest family first.
        let order = |phase: &str| {
            ["forward", "backward", "optimizer"]
                .iter()
                .position(|&x| x == phase)
        };
        let mut entries = p.entries.clone();
        entries.sort_by(|x, y| {
            (order(x.phase), -x.seconds)
                .partial_cmp(&(order(y.phase), -y.seconds))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for e in &entries {
            let ms = e.seconds / steps as f64 * 1e3;
            let share = if total > 0.0 {
                100.0 * e.seconds / total
            } else {
                0.0
            };
            let calls = e.calls as f64 / steps as f64;
            let mut v = what.clone();
            v["bench"] = json!("ops");
            v["method"] = json!(method.name());
            v["phase"] = json!(e.phase);
            v["family"] = json!(e.family);
            v["ms_per_step"] = json!(ms);
            v["share"] = json!(share / 100.0);
            v["scopes_per_step"] = json!(calls);
            report.row(
                v,
                &[
                    e.phase.to_string(),
                    e.family.to_string(),
                    f(ms, 2),
                    f(share, 1),
                    f(calls, 0),
                ],
            );
        }
        let mut summary = what.clone();
        summary["bench"] = json!("ops");
        summary["summary"] = json!(true);
        summary["method"] = json!(method.name());
        summary["profiled_ms_per_step"] = json!(total / steps as f64 * 1e3);
        summary["step_ms_under_profiler"] = json!(profiled_secs * 1e3);
        summary["step_ms_unprofiled"] = json!(median(&plain) * 1e3);
        report.note(
            summary,
            &format!(
                "method: {}; families sum to {:.1} ms/step; a step took {:.1} ms under the \
                 profiler, {:.1} ms without",
                method.name(),
                total / steps as f64 * 1e3,
                profiled_secs * 1e3,
                median(&plain) * 1e3
            ),
        );
    }
    Ok(())
}
