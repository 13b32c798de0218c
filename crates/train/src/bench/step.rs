//! `train bench step`: one training step of a GPT-2 shape, LoRA against full fine-tuning.
//!
//! For each model shape, mode (lora, full) and batch shape B×T: build the model with random
//! weights, run `--warmup` steps (pipelines compiled, buffer pool and allocator warm, AdamW state
//! allocated), then `--steps` measured ones, and report the median ms/step, tokens/s (B·T over
//! the median), and memory by purpose: parameters, gradients (peak), optimizer state (AdamW's m
//! and v) and activations (the tape's peak of tensors saved for backward), plus the device's
//! peak of live tensor bytes over the measured steps and, on Linux, the process's peak RSS (a
//! high-water mark since the process started, so it only grows from case to case).

use clap::Parser;
use serde_json::json;
use tensor::Device;

use super::table::{Report, f, mib};
use super::{Budget, Mode, median, parse_bt, peak_rss, shape, step_flops, token_batch, trainee};

/// Options of `train bench step`.
#[derive(Parser, Debug, Clone)]
pub struct StepArgs {
    /// Model shapes: e2e, tiny, 124m, medium or config.json paths [default: 124m on a GPU, e2e,tiny on the CPU].
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Batch shapes B×T [default: 8x1024,4x1024,8x256 on a GPU, 8x128,1x128 on the CPU];
    /// shapes longer than a model's context are skipped.
    #[arg(long, value_delimiter = ',')]
    pub bt: Vec<String>,
    #[command(flatten)]
    pub mode: super::ModeArgs,
    /// Unmeasured steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Measured steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Skip a case whose estimated time (warm-up and measured steps) exceeds this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub budget: f64,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured training-step case.
pub struct StepCase {
    pub model: String,
    pub mode: String,
    pub b: usize,
    pub t: usize,
    pub trainable: usize,
    pub ms: f64,
    pub tokens_per_s: f64,
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub device_peak: u64,
    pub rss_peak: Option<u64>,
}

impl StepCase {
    pub fn to_json(&self, bench: &str, device: &str) -> serde_json::Value {
        json!({"bench": bench, "device": device, "model": self.model, "mode": self.mode,
            "b": self.b, "t": self.t, "trainable_params": self.trainable,
            "ms_per_step": self.ms, "tokens_per_s": self.tokens_per_s,
            "memory": {"parameters": self.parameters, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations,
                "device_peak": self.device_peak, "process_peak_rss": self.rss_peak}})
    }
}

pub(crate) fn default_models(device: &Device) -> Vec<String> {
    let v: &[&str] = if device.is_gpu() {
        &["124m"]
    } else {
        &["e2e", "tiny"]
    };
    v.iter().map(|s| s.to_string()).collect()
}

fn default_bt(device: &Device) -> Vec<String> {
    let v: &[&str] = if device.is_gpu() {
        &["8x1024", "4x1024", "8x256"]
    } else {
        &["8x128", "1x128"]
    };
    v.iter().map(|s| s.to_string()).collect()
}

/// Warm up, then measure `steps` steps of `tr` on a B×T batch.
pub(crate) fn measure(
    tr: &mut super::Trainee,
    model: &str,
    mode: &Mode,
    (b, t): (usize, usize),
    warmup: usize,
    steps: usize,
    device: &Device,
) -> crate::Result<StepCase> {
    let batch = token_batch(b, t, tr.model.config.vocab_size, 7);
    for _ in 0..warmup {
        tr.step(&batch)?;
    }
    device.reset_peak_memory();
    let (mut times, mut activations, mut gradients) = (Vec::new(), 0u64, 0u64);
    for _ in 0..steps.max(1) {
        let start = std::time::Instant::now();
        let m = tr.step(&batch)?;
        times.push(start.elapsed().as_secs_f64());
        activations = activations.max(m.saved_peak);
        gradients = gradients.max(m.grad_bytes);
    }
    let secs = median(&times);
    Ok(StepCase {
        model: model.to_string(),
        mode: mode.name().to_string(),
        b,
        t,
        trainable: tr.trainable,
        ms: secs * 1e3,
        tokens_per_s: (b * t) as f64 / secs,
        parameters: tr.parameter_bytes,
        gradients,
        optimizer: tr.opt.memory().peak,
        activations,
        device_peak: device.memory().peak,
        rss_peak: peak_rss(),
    })
}

pub(crate) const COLUMNS: [(&str, usize); 12] = [
    ("model", 7),
    ("mode", 8),
    ("B", 3),
    ("T", 5),
    ("trainable", 10),
    ("ms/step", 10),
    ("tokens/s", 9),
    ("weights MiB", 11),
    ("grads MiB", 9),
    ("optim MiB", 9),
    ("activ MiB", 9),
    ("dev peak MiB", 12),
];

pub(crate) fn cells(c: &StepCase) -> Vec<String> {
    vec![
        c.model.clone(),
        c.mode.clone(),
        c.b.to_string(),
        c.t.to_string(),
        c.trainable.to_string(),
        f(c.ms, 1),
        f(c.tokens_per_s, 0),
        mib(c.parameters),
        mib(c.gradients),
        mib(c.optimizer),
        mib(c.activations),
        mib(c.device_peak),
    ]
}

/// Report a skipped case.
pub(crate) fn skip(report: &Report, bench: &str, what: serde_json::Value, why: &str) {
    let mut v = what;
    v["bench"] = json!(bench);
    v["skipped"] = json!(why);
    let text = format!("skipped {}: {why}", short(&v));
    report.note(v, &text);
}

fn short(v: &serde_json::Value) -> String {
    let mode = v["mode"]
        .as_str()
        .map_or(String::new(), |m| format!(" {m}"));
    let model = v["model"].as_str().unwrap_or("?");
    format!("{model}{mode} {}x{}", v["b"], v["t"])
}

/// `train bench step`.
pub fn run(args: &StepArgs, device: &Device) -> crate::Result<()> {
    let label = super::device_label(device);
    let models = match args.models.is_empty() {
        true => default_models(device),
        false => args.models.clone(),
    };
    let bts = match args.bt.is_empty() {
        true => default_bt(device),
        false => args.bt.clone(),
    };
    let bts: Vec<(usize, usize)> = bts.iter().map(|s| parse_bt(s)).collect::<Result<_, _>>()?;
    let modes = args.mode.parse()?;
    let report = Report::new(
        args.json,
        &format!(
            "training step on {label} (median of {} after {} warm-up)",
            args.steps, args.warmup
        ),
        &COLUMNS,
    );
    let mut budget = Budget::new(args.budget, device)?;
    for name in &models {
        let cfg = shape(name)?;
        for mode in &modes {
            let mut tr: Option<super::Trainee> = None;
            for &(b, t) in &bts {
                let what =
                    json!({"device": label, "model": name, "mode": mode.name(), "b": b, "t": t});
                if t > cfg.n_positions {
                    let why = format!("T = {t} exceeds the context of {}", cfg.n_positions);
                    skip(&report, "step", what, &why);
                    continue;
                }
                let flops = step_flops(&cfg, b, t, matches!(mode, Mode::Full));
                let estimate = budget.estimate(flops) * (args.warmup + args.steps) as f64;
                if estimate > args.budget {
                    let why = format!("about {estimate:.0} s at this device's rate (--budget)");
                    skip(&report, "step", what, &why);
                    continue;
                }
                if tr.is_none() {
                    tr = Some(trainee(&cfg, mode, device, 1)?);
                }
                let tr = tr.as_mut().expect("built above");
                let case = measure(tr, name, mode, (b, t), args.warmup, args.steps, device)?;
                budget.observe(flops, case.ms / 1e3);
                report.row(case.to_json("step", &label), &cells(&case));
            }
        }
    }
    if !report.is_json()
        && let Some(rss) = peak_rss()
    {
        println!("  process peak RSS: {} MiB", mib(rss));
    }
    Ok(())
}
