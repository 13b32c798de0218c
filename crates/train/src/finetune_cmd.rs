//! `train finetune`: fine-tune a GPT-2 on a data file, with LoRA (the default) or every weight,
//! and resume an interrupted run exactly.
//!
//! ```text
//! train finetune --model DIR --data FILE [--format auto|text|jsonl|e2e]
//!                [--lora --r 8 --alpha 16 --targets c_attn --dropout 0 | --full]
//!                [--use-rslora --use-dora --layers 0,2 --rank-pattern KEY=R,.. --alpha-pattern KEY=A,..
//!                 --bias none|lora_only|all --modules-to-save ln_f,.. --init kaiming|gaussian|
//!                 pissa|olora --lora-plus-ratio 1]
//!                [--adalora --init-r 12 --target-r 8 --tinit 0 --tfinal 0 --delta-t 1
//!                 --beta1 0.85 --beta2 0.85 --orth-reg-weight 0.5]
//!                [--lr --schedule linear --warmup 0 --batch 8 --grad-accum 1 --seq-len
//!                 --weight-decay 0.01 --max-grad-norm 1]
//!                [--steps N | --epochs 1] [--eval-every N] [--eval-data FILE] [--seed 0]
//!                [--out runs/finetune] [--save-every 100] [--resume] [--stop-after N]
//!                [--skip-nonfinite --skip-lr-factor 0.5 --max-consecutive-skips 5]
//! ```
//!
//! The data formats, and what the loss counts in each, are in [`crate::finetune_data`]. Each
//! optimizer step draws `--grad-accum` micro-batches of `--batch` examples from a seeded,
//! length-bucketed order ([`crate::batch::Batches`]) and adds their gradients into one [`autograd::Grads`]
//! ([`crate::trainer::step`]); then the global norm is clipped to `--max-grad-norm` (1) and
//! AdamW (weight decay `--weight-decay`, 0.01; B's rate `--lora-plus-ratio` times A's, see
//! `finetune_cmd/optim_groups.rs`) steps at the scheduled rate. The LoRA options mirror PEFT's
//! `LoraConfig` (`finetune_cmd/lora_args.rs`), and what is saved loads in PEFT. `--adalora` trains
//! AdaLoRA instead (PEFT's `AdaLoraConfig`, `total_step` = the run's steps; its own loop in
//! `finetune_cmd/adalora_run.rs`), saving a PEFT ADALORA adapter. `--epochs E` means ⌈E · examples / (batch ·
//! grad-accum)⌉ steps.
//!
//! `--out` receives `metrics.jsonl` (one record per step: loss, lr, grad_norm, counted tokens,
//! tokens/s, epoch; and `eval_loss` records every `--eval-every` steps and after the last),
//! `checkpoint/` (every `--save-every` steps and when the session ends; see
//! [`crate::checkpoint`]), and at the end `adapter/` (PEFT's layout, for `train eval
//! --adapter`) or `model/` (a full checkpoint, for `train eval --model`) and `loss.svg`.
//!
//! `--resume` continues from `checkpoint/` and requires the options the run was started with
//! (the data file's hash included); without it, an existing checkpoint is never overwritten.
//! `--stop-after N` ends a session after step N, checkpointed, as an interruption would: a run
//! of 6 steps and one stopped after 3 then resumed have the same losses, bit for bit, on the
//! CPU backend (`tests/finetune.rs`).
//!
//! **When things go wrong.**
//! - A step whose loss or gradient norm is NaN or infinite updates nothing and stops the run
//!   with the step's number; the last checkpoint is left as it was. `--skip-nonfinite` skips
//!   such steps instead and lowers the learning rate (see `finetune_cmd/session.rs`).
//! - Ctrl-C or SIGTERM: the step under way finishes, the checkpoint is saved, and the command
//!   exits with status 130 and a message saying how to resume ([`interrupt`]).
//! - A crash or `kill -9` at any moment: every file is replaced atomically, so `checkpoint/`
//!   holds the last complete save (a torn write leaves only a hidden temporary file, which
//!   `--resume` deletes), and `--resume` continues from it exactly (`tests/crash.rs`).
//! - Bad data: an empty file, text that is not UTF-8 (the line and byte offset are named), an
//!   E2E line without `||` or a JSONL line without its fields (the line number is named), or a
//!   `--batch` larger than the training examples are refused with a message; examples longer
//!   than `--seq-len` (the model's context by default) are dropped, and a warning says how many
//!   (see [`crate::finetune_data`]).

mod adalora_args;
mod adalora_run;
pub mod interrupt;
mod lora_args;
mod optim_groups;
mod session;

use std::path::PathBuf;
use std::time::Instant;

use autograd::Schedule;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tensor::Device;
use transformer::Checkpoint;

use crate::checkpoint::{self, Saved};
use crate::e2e::end_of_text;
use crate::finetune_data::{self, Dataset, Format, split_heldout};
use session::{Plan, Session};

pub use adalora_args::AdaLoraArgs;
pub use lora_args::{BiasArg, InitArg, LoraOptions};

pub use session::heldout_loss;

/// Options of `train finetune`.
#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    /// Model directory: a Hugging Face GPT-2 checkpoint (config.json + model.safetensors, with
    /// vocab.json + merges.txt or GPT-2's own tokenizer) or one of ours.
    /// Or a Hugging Face Hub id, `name` or `org/name`, with `@revision` for a branch, tag or
    /// commit (`org/name@v1`): read from the HF cache ($HF_HUB_CACHE, else $HF_HOME/hub), and
    /// downloaded into it unless HF_HUB_OFFLINE=1. A local path that exists always wins.
    #[arg(long, value_parser = crate::hub::model_dir)]
    pub model: PathBuf,
    /// Training data: plain text, JSONL with `context`/`completion`, or `context||completion`
    /// lines (E2E); see --format.
    #[arg(long)]
    pub data: PathBuf,
    /// How to read --data: auto (`.jsonl` → jsonl; else a first line starting with `{` → jsonl,
    /// containing `||` → e2e, otherwise text), text, jsonl or e2e.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Train LoRA adapters on the frozen model (the default).
    #[arg(long, conflicts_with = "full")]
    pub lora: bool,
    /// Train every weight instead of adapters.
    #[arg(long)]
    pub full: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// LoRA alpha: the update is scaled by alpha / r.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// LoRA targets: any of q, k, v, c_attn, o, fc, proj.
    #[arg(long, value_delimiter = ',', default_value = "c_attn")]
    pub targets: Vec<String>,
    /// Dropout on the adapters' input.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    #[command(flatten)]
    pub lora_options: LoraOptions,
    #[command(flatten)]
    pub adalora: AdaLoraArgs,
    /// AdamW's decoupled weight decay (p ← p − lr·wd·p each step). With LoRA, biases and
    /// layer norms (--bias, --modules-to-save) are not decayed, as in Hugging Face's Trainer.
    #[arg(long, default_value_t = WEIGHT_DECAY)]
    pub weight_decay: f32,
    /// Clip the global norm of the trainable parameters' gradients to this before each update
    /// (0: no clipping; the norm is still measured and logged as grad_norm).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Peak learning rate [default: 1e-3 with LoRA, 1e-4 with --full].
    #[arg(long)]
    pub lr: Option<f32>,
    /// Learning-rate schedule after the warm-up: constant, or linear or cosine decay to 0.
    #[arg(long, value_enum, default_value = "linear")]
    pub schedule: ScheduleKind,
    /// Warm-up steps (linear from 0 to --lr).
    #[arg(long, default_value_t = 0)]
    pub warmup: u32,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Longest sequence: text windows are this long, longer examples are dropped [default:
    /// the model's context].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u32>,
    /// Passes over the training examples (the default is 1) instead of --steps.
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Score a held-out set every N steps and after the last: 5 % of the examples, or the
    /// --eval-data file (0: no held-out 5 %; with --eval-data, once after the last step).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u32,
    /// Held-out data (read with --format, like --data): its loss is logged every --eval-every
    /// steps and after the last, and no examples are split off the training data.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The run's directory.
    #[arg(long, default_value = "runs/finetune")]
    pub out: PathBuf,
    /// Write a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub save_every: u32,
    /// Continue the run saved in `--out`/checkpoint (same options required).
    #[arg(long)]
    pub resume: bool,
    /// End this session after step N, checkpointed, as an interruption would.
    #[arg(long)]
    pub stop_after: Option<u32>,
    /// Skip a step whose loss or gradient norm is NaN or infinite (no weight or optimizer
    /// change) and lower the learning rate, instead of stopping the run.
    #[arg(long)]
    pub skip_nonfinite: bool,
    /// With --skip-nonfinite: multiply the learning rate by this after each skipped step.
    #[arg(long, default_value_t = 0.5, requires = "skip_nonfinite")]
    pub skip_lr_factor: f32,
    /// With --skip-nonfinite: stop when more than this many steps in a row were non-finite.
    #[arg(long, default_value_t = 5, requires = "skip_nonfinite")]
    pub max_consecutive_skips: u32,
    #[command(flatten)]
    pub quant: crate::quantize::QuantizeArgs,
}

/// The learning rate after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// AdamW's weight decay by default, as in the E2E recipe.
const WEIGHT_DECAY: f32 = 0.01;

impl FinetuneArgs {
    fn lr(&self) -> f32 {
        self.lr.unwrap_or(if self.full { 1e-4 } else { 1e-3 })
    }

    fn schedule(&self, total: u32) -> Schedule {
        let warmup = self.warmup;
        match self.schedule {
            ScheduleKind::Constant if warmup == 0 => Schedule::Constant,
            // A cosine from 100 % to 100 % is flat: the warm-up, then a constant rate.
            ScheduleKind::Constant => Schedule::WarmupCosine {
                warmup,
                total,
                min_ratio: 1.0,
            },
            ScheduleKind::Linear => Schedule::WarmupLinear { warmup, total },
            ScheduleKind::Cosine => Schedule::WarmupCosine {
                warmup,
                total,
                min_ratio: 0.0,
            },
        }
    }

    /// Optimizer steps of the run: --steps, or --epochs (default 1) over `examples`.
    fn total_steps(&self, examples: usize) -> u32 {
        self.steps.unwrap_or_else(|| {
            let per_step = self.batch * self.grad_accum;
            let epochs = self.epochs.unwrap_or(1) as usize;
            (epochs * examples).div_ceil(per_step) as u32
        })
    }

    /// The options that define the run (what a resumed run must repeat).
    fn identity(&self, data: &Dataset, seq_len: usize, total: u32) -> Value {
        let mut run = json!({
            "model": self.model, "data": self.data,
            "data_fnv1a64": format!("{:016x}", data.fingerprint),
            "format": data.format.name(),
            "mode": if self.full { "full" } else { "lora" },
            "lr": short(self.lr()), "schedule": format!("{:?}", self.schedule).to_lowercase(),
            "warmup": self.warmup, "batch": self.batch, "grad_accum": self.grad_accum,
            "seq_len": seq_len, "steps": total, "eval_every": self.eval_every, "seed": self.seed,
        });
        if !self.full {
            let mut lora = json!({"r": self.r, "alpha": short(self.alpha),
                "targets": self.targets, "dropout": short(self.dropout)});
            lora.as_object_mut()
                .expect("an object")
                .extend(self.lora_options.identity());
            run["lora"] = lora;
        }
        // Only when not the defaults, so that a run started before these options resumes.
        if self.weight_decay != WEIGHT_DECAY {
            run["weight_decay"] = json!(short(self.weight_decay));
        }
        if self.max_grad_norm != 1.0 {
            run["max_grad_norm"] = json!(short(self.max_grad_norm));
        }
        if let Some(eval) = &self.eval_data {
            run["eval_data"] = json!(eval);
        }
        if let Some(quant) = self.quant.identity() {
            run["quantize"] = quant;
        }
        run
    }
}

/// `train finetune`.
pub fn run(args: &FinetuneArgs, device: &Device) -> crate::Result<()> {
    let started = Instant::now();
    let mut base = Checkpoint::load(&args.model)?;
    if args.full && args.quant.quantize != crate::quantize::Quantization::None {
        return Err("--quantize stores a frozen base: it trains adapters, not --full".into());
    }
    if args.full && args.quant.precision == crate::quantize::Precision::F16 {
        return Err(
            "--precision f16 stores a frozen base: it trains adapters, not --full \
                    (full fine-tuning keeps every weight in f32)"
                .into(),
        );
    }
    // On the host, before any weight reaches the device.
    args.quant.apply(&mut base)?;
    let tok = crate::model_tokenizer(&args.model, &base.config)?;
    let context = base.config.n_positions;
    let seq_len = args.seq_len.unwrap_or(context);
    if !(2..=context).contains(&seq_len) {
        let message =
            format!("--seq-len {seq_len}: it must be 2 to the model's context, {context}");
        return Err(message.into());
    }
    if args.batch == 0 || args.grad_accum == 0 {
        return Err("--batch and --grad-accum must be at least 1".into());
    }
    if !(args.skip_lr_factor > 0.0 && args.skip_lr_factor <= 1.0) {
        let factor = args.skip_lr_factor;
        return Err(format!("--skip-lr-factor {factor}: it must be above 0 and at most 1").into());
    }
    if !(args.weight_decay >= 0.0 && args.weight_decay.is_finite()) {
        let wd = args.weight_decay;
        return Err(format!("--weight-decay {wd}: it must be 0 or more").into());
    }
    if !(args.max_grad_norm >= 0.0 && args.max_grad_norm.is_finite()) {
        let m = args.max_grad_norm;
        return Err(format!("--max-grad-norm {m}: it must be 0 (no clipping) or more").into());
    }
    let ratio = args.lora_options.lora_plus_ratio;
    if !(ratio > 0.0 && ratio.is_finite()) {
        return Err(format!("--lora-plus-ratio {ratio}: it must be above 0").into());
    }
    let data = finetune_data::load(&args.data, args.format, &tok, seq_len)?;
    let (train, heldout) = match &args.eval_data {
        Some(path) => {
            let eval = finetune_data::load(path, args.format, &tok, seq_len)?;
            if eval.examples.is_empty() {
                let message = format!(
                    "--eval-data {}: no example of at most {seq_len} tokens",
                    path.display()
                );
                return Err(message.into());
            }
            (data.examples.clone(), eval.examples)
        }
        None if args.eval_every > 0 => split_heldout(data.examples.clone()),
        None => (data.examples.clone(), Vec::new()),
    };
    println!(
        "{}: {}, {} examples ({} training, {} held out); {} longer than {seq_len} tokens dropped",
        args.data.display(),
        data.format.name(),
        data.examples.len(),
        train.len(),
        heldout.len(),
        data.dropped
    );
    if data.dropped > 0 {
        eprintln!(
            "warning: {} of the {} examples of {} are longer than {seq_len} tokens (--seq-len) \
             and were dropped, not truncated",
            data.dropped,
            data.dropped + data.examples.len(),
            args.data.display()
        );
    }
    if args.batch > train.len() {
        let message = format!(
            "--batch {} is larger than the {} training examples of {}",
            args.batch,
            train.len(),
            args.data.display()
        );
        return Err(message.into());
    }
    let total = args.total_steps(train.len());
    if total == 0 {
        return Err("--steps 0 (or --epochs 0): nothing to train".into());
    }
    let run_id = args.identity(&data, seq_len, total);
    let saved = resume_point(args, &run_id)?;
    let plan = Plan {
        train,
        heldout,
        pad: end_of_text(&tok),
        total,
        run_id,
    };
    if args.adalora.adalora {
        let saved_to = adalora_run::run(args, &base, device, plan)?;
        println!(
            "{total} steps; saved {} in {:.1} s (and metrics.jsonl, loss.svg in {})",
            saved_to.display(),
            started.elapsed().as_secs_f64(),
            args.out.display()
        );
        return Ok(());
    }
    let mut session = Session::start(args, &base, device, plan, saved)?;
    drop(base);
    let stop = args
        .stop_after
        .map_or(total, |s| s.clamp(session.state.step, total));
    interrupt::watch();
    session.train_until(stop)?;
    if session.state.step < total {
        println!(
            "stopped after step {} of {total}; `--resume` continues from {}",
            session.state.step,
            args.out.join("checkpoint").display()
        );
        return Ok(());
    }
    let saved_to = session.save_result()?;
    let finite = session::finite_losses(&session.state.losses);
    let last = finite.last().copied().unwrap_or(f32::NAN);
    println!(
        "{total} steps, final training loss {last:.4}; saved {} in {:.1} s (and metrics.jsonl, \
         loss.svg, checkpoint/ in {})",
        saved_to.display(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// The checkpoint to resume from, if `--resume`; refuses to start afresh over an earlier run's
/// checkpoint, and to resume with options other than the run's.
fn resume_point(args: &FinetuneArgs, run_id: &Value) -> crate::Result<Option<Saved>> {
    let dir = args.out.join("checkpoint");
    remove_torn_writes(&dir);
    match (args.resume, checkpoint::exists(&dir)) {
        (false, false) => Ok(None),
        (false, true) => Err(format!(
            "{} holds the checkpoint of an earlier run: pass --resume to continue it, or choose \
             another --out (or delete it) to start afresh",
            dir.display()
        )
        .into()),
        (true, false) => Err(format!("--resume: no checkpoint in {}", dir.display()).into()),
        (true, true) => {
            let saved = checkpoint::load(&dir)?;
            let differences = differences(&saved.progress.run, run_id);
            if !differences.is_empty() {
                return Err(format!(
                    "--resume: the checkpoint in {} was made with other options ({}); resume \
                     with the same ones",
                    dir.display(),
                    differences.join("; ")
                )
                .into());
            }
            Ok(Some(saved))
        }
    }
}

/// Deletes the temporary files that writes interrupted by a crash left in the checkpoint
/// directory: ours (`.NAME.tmp.PID`, see [`transformer::tensor_file::write_atomically`]) and
/// the one the `safetensors` crate writes first and renames to ours (`.tmpXXXXXX`, the
/// `tempfile` crate's names). They are never read, but each is as large as a checkpoint. (One
/// run writes to a directory at a time, so none of them belongs to a write still going on.)
fn remove_torn_writes(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if (name.starts_with(".tmp") || (name.starts_with('.') && name.contains(".tmp.")))
            && let Err(e) = std::fs::remove_file(entry.path())
        {
            eprintln!("warning: {}: {e}", entry.path().display());
        }
    }
}

/// `x` as the shortest decimal that reads back as the same f32 (0.001, not 0.0010000000474974513).
fn short(x: f32) -> Value {
    json!(x.to_string().parse::<f64>().unwrap_or(f64::from(x)))
}

/// `key: saved, now given` for each option that differs.
fn differences(saved: &Value, now: &Value) -> Vec<String> {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return vec![format!("{saved} vs {now}")];
    };
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| {
            format!(
                "{k}: {} then, {} now",
                saved.get(k).unwrap_or(&Value::Null),
                now.get(k).unwrap_or(&Value::Null)
            )
        })
        .collect()
}
