//! A fine-tuning run in progress ([`Session`]): the model and what trains it, one optimizer
//! step, the loop with its metrics, evaluations and checkpoints, and the saved result.
//!
//! **A step that goes wrong.** When a step's loss or gradient norm is not finite, nothing is
//! updated ([`crate::trainer::step`]). By default the session then stops with
//! an error naming the step and the last checkpoint, which is left as it was. With
//! `--skip-nonfinite` the step is skipped instead: it counts as a step (its batches are used up,
//! the schedule moves on) but changes no weight and no optimizer state; its loss is recorded as
//! NaN; and from then on the learning rate is multiplied by `--skip-lr-factor` once more. After
//! `--max-consecutive-skips` skipped steps in a row the session stops. The NaN losses, which the
//! checkpoint saves, are the record of the skips: a resumed run recounts them to get the same
//! learning-rate factor and the same count of skips in a row, so it goes on exactly as an
//! uninterrupted one.
//!
//! **Signals.** Between steps the loop asks [`super::interrupt::requested`]; after Ctrl-C or
//! SIGTERM it saves the checkpoint and ends with [`Interrupted`].

use std::path::PathBuf;

use autograd::{AdamW, ParamGroup, Tape, Trainable};
use lora::{LoraModel, Target};
use serde_json::{Value, json};
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

use super::FinetuneArgs;
use super::interrupt::{self, Interrupted};
use super::optim_groups::param_groups;
use crate::batch::{Batch, Batches, Example, batch};
use crate::checkpoint::{self, Progress, Saved};
use crate::loss_plot::{Curve, plot_losses};
use crate::metrics::{Metrics, progress};
use crate::trainer::{NonFinite, OptimConfig};

/// What a run trains on and for how long, decided from the options and the data.
pub(super) struct Plan {
    pub train: Vec<Example>,
    pub heldout: Vec<Example>,
    /// Pads batches: the end-of-text token.
    pub pad: u32,
    /// Optimizer steps of the whole run.
    pub total: u32,
    /// The options that define the run, saved with every checkpoint.
    pub run_id: Value,
}

/// A run: the model, what trains it, the data order and where it stands.
pub(super) struct Session<'a> {
    args: &'a FinetuneArgs,
    plan: Plan,
    model: Gpt2,
    /// The adapters (None for full fine-tuning).
    lora: Option<LoraModel>,
    /// What AdamW updates: LoRA's A and B, or every weight.
    params: Vec<Trainable>,
    opt: AdamW,
    optim: OptimConfig,
    order: Batches,
    pub(super) state: Progress,
    metrics: Metrics,
    /// The step of the checkpoint on disk, if this run has one.
    saved_step: Option<u32>,
    /// What the learning rate is multiplied by: `--skip-lr-factor` once per skipped step.
    lr_scale: f32,
}

impl<'a> Session<'a> {
    /// The model on `device` with fresh adapters (unless `--full`) and a fresh optimizer, then,
    /// when resuming, the saved weights, optimizer state and data position put back.
    pub(super) fn start(
        args: &'a FinetuneArgs,
        base: &Checkpoint,
        device: &Device,
        plan: Plan,
        saved: Option<Saved>,
    ) -> crate::Result<Session<'a>> {
        let mut model = Gpt2::from_checkpoint(base, device, args.full)?;
        let (lora, params) = trainables(args, &mut model)?;
        // After the adapters are set up (PiSSA/OLoRA rewrite the base they start from).
        args.quant.store(&mut model)?;
        let groups = if args.full {
            vec![ParamGroup::new(params.clone(), args.weight_decay)]
        } else {
            let ratio = args.lora_options.lora_plus_ratio;
            param_groups(&params, args.weight_decay, ratio)
        };
        let mut opt = AdamW::new(groups);
        let lengths = plan.train.iter().map(|e| e.ids.len()).collect();
        let mut order = Batches::new(lengths, args.batch, args.seed).with_buckets(8);
        let path = args.out.join("metrics.jsonl");
        let (state, metrics, saved_step) = match saved {
            None => {
                let state = Progress::start(args.seed, plan.run_id.clone());
                (state, Metrics::create(&path)?, None)
            }
            Some(saved) => {
                let state = saved.restore(&params, &mut opt)?;
                for _ in 0..state.batches_drawn {
                    order.next_batch();
                }
                println!("resuming after step {} of {}", state.step, plan.total);
                let metrics = Metrics::resume(&path, state.step)?;
                let step = state.step;
                (state, metrics, Some(step))
            }
        };
        let lr_scale = skipped(&state.losses).fold(1.0, |scale, _| scale * args.skip_lr_factor);
        let optim = OptimConfig {
            lr: args.lr() * lr_scale,
            schedule: args.schedule(plan.total),
            clip: args.max_grad_norm,
        };
        Ok(Session {
            args,
            plan,
            model,
            lora,
            params,
            opt,
            optim,
            order,
            state,
            metrics,
            saved_step,
            lr_scale,
        })
    }

    /// Writes the checkpoint of the steps so far.
    fn save_checkpoint(&mut self) -> crate::Result<()> {
        let dir = self.args.out.join("checkpoint");
        checkpoint::save(&dir, &self.state, &self.params, &self.opt)?;
        self.saved_step = Some(self.state.step);
        Ok(())
    }

    /// Steps until `stop`, with progress, metrics, evaluations (every `--eval-every` steps and
    /// after the last) and checkpoints (every `--save-every` steps and at `stop`).
    pub(super) fn train_until(&mut self, stop: u32) -> crate::Result<()> {
        let args = self.args;
        let bar = progress(u64::from(self.plan.total), "fine-tune");
        bar.set_position(u64::from(self.state.step));
        while self.state.step < stop {
            if interrupt::requested() {
                bar.finish_and_clear();
                self.save_checkpoint()?;
                return Err(Interrupted {
                    step: self.state.step,
                    total: self.plan.total,
                    checkpoint: args.out.join("checkpoint"),
                }
                .into());
            }
            let (loss, tokens_per_s) = self.step()?;
            bar.set_message(format!("loss {loss:.3} {tokens_per_s:.0} tok/s"));
            bar.inc(1);
            let step = self.state.step;
            let last = step == self.plan.total;
            let every = args.eval_every > 0 && step.is_multiple_of(args.eval_every);
            if !self.plan.heldout.is_empty() && (every || last) {
                let loss =
                    heldout_loss(&self.model, &self.plan.heldout, args.batch, self.plan.pad)?;
                bar.suspend(|| println!("step {step}: held-out loss {loss:.4}"));
                self.metrics
                    .write(json!({"step": step, "eval_loss": loss}))?;
            }
            if (args.save_every > 0 && step.is_multiple_of(args.save_every)) || step == stop {
                self.save_checkpoint()?;
            }
        }
        bar.finish();
        Ok(())
    }

    /// One optimizer step over `--grad-accum` micro-batches; returns its loss and tokens/s.
    fn step(&mut self) -> crate::Result<(f32, f64)> {
        let i = self.state.step;
        if let Some(lora) = &self.lora {
            lora.set_dropout_seed(dropout_seed(self.args.seed, i));
        }
        let mut micro = Vec::with_capacity(self.args.grad_accum);
        for _ in 0..self.args.grad_accum {
            let rows: Vec<&Example> = self
                .order
                .next_batch()
                .iter()
                .map(|&j| &self.plan.train[j])
                .collect();
            micro.push(batch(&rows, self.plan.pad));
        }
        let outcome = crate::trainer::step(&self.model, &mut self.opt, &micro, &self.optim, i)?;
        self.state.step = i + 1;
        self.state.batches_drawn += micro.len() as u64;
        let s = match outcome {
            Ok(s) => s,
            Err(bad) => return self.skip(bad),
        };
        self.state.losses.push(s.loss);
        let tokens: usize = micro.iter().map(Batch::completion_tokens).sum();
        let tokens_per_s = tokens as f64 / s.seconds;
        self.metrics
            .write(json!({"step": i + 1, "loss": s.loss, "lr": s.lr,
            "grad_norm": s.grad_norm, "tokens": tokens, "tokens_per_s": tokens_per_s,
            "epoch": self.order.epoch()}))?;
        Ok((s.loss, tokens_per_s))
    }

    /// After a non-finite step (nothing updated, its batches used up): the error that stops the
    /// run, or with `--skip-nonfinite` the step recorded as skipped and the learning rate lowered.
    fn skip(&mut self, bad: NonFinite) -> crate::Result<(f32, f64)> {
        let args = self.args;
        let checkpoint = match self.saved_step {
            Some(step) => format!(
                "the checkpoint of step {step} in {} is as it was",
                args.out.join("checkpoint").display()
            ),
            None => "no checkpoint was written yet".to_string(),
        };
        if !args.skip_nonfinite {
            return Err(format!(
                "{bad}: stopped before the update, so no weight was changed; {checkpoint}. \
                 Resume with --skip-nonfinite to skip such steps and lower the learning rate, or \
                 start again with a lower --lr"
            )
            .into());
        }
        self.state.losses.push(f32::NAN);
        let in_a_row = skipped_in_a_row(&self.state.losses);
        if in_a_row > args.max_consecutive_skips {
            return Err(format!(
                "{bad}: {in_a_row} non-finite steps in a row, more than \
                 --max-consecutive-skips {}, each skipped with the learning rate lowered to \
                 {:e} × --lr; stopping ({checkpoint})",
                args.max_consecutive_skips, self.lr_scale
            )
            .into());
        }
        self.lr_scale *= args.skip_lr_factor;
        self.optim.lr = args.lr() * self.lr_scale;
        println!(
            "{bad}: step skipped (no update); learning rate now {:e} × --lr",
            self.lr_scale
        );
        self.metrics
            .write(json!({"step": bad.step, "skipped": true,
            "loss": json_number(bad.loss), "grad_norm": json_number(bad.grad_norm),
            "lr_scale": self.lr_scale, "epoch": self.order.epoch()}))?;
        Ok((bad.loss, 0.0))
    }

    /// Writes the adapter (PEFT layout) or the whole model, and the loss plot; returns where
    /// the weights went.
    pub(super) fn save_result(&self) -> crate::Result<PathBuf> {
        let out = &self.args.out;
        let finite = finite_losses(&self.state.losses);
        let heldout = crate::metrics::eval_losses(&self.metrics.path)?;
        let args = self.args;
        let name = if args.full {
            "full fine-tuning".to_string()
        } else {
            format!("LoRA r {} alpha {}", args.r, args.alpha)
        };
        let curve = Curve {
            name: &name,
            losses: &finite,
            heldout: &heldout,
        };
        let title = format!(
            "fine-tuning {} on {}: loss of the counted tokens",
            args.model.display(),
            args.data.display()
        );
        plot_losses(&out.join("loss.svg"), &title, &[curve])?;
        if let Some(lora) = &self.lora {
            let dir = out.join("adapter");
            lora.save_peft(&dir)?;
            return Ok(dir);
        }
        let dir = out.join("model");
        self.model.to_checkpoint()?.save(&dir)?;
        for file in ["vocab.json", "merges.txt"] {
            let from = self.args.model.join(file);
            if from.exists() {
                std::fs::copy(&from, dir.join(file))
                    .map_err(|e| format!("{}: {e}", from.display()))?;
            }
        }
        Ok(dir)
    }
}

/// The skipped steps among `losses` (recorded as NaN).
fn skipped(losses: &[f32]) -> impl Iterator<Item = &f32> {
    losses.iter().filter(|l| l.is_nan())
}

/// How many of the last steps were skipped, in a row.
fn skipped_in_a_row(losses: &[f32]) -> u32 {
    losses.iter().rev().take_while(|l| l.is_nan()).count() as u32
}

/// `losses` with each skipped step's NaN replaced by the loss before it (for the plot).
pub(super) fn finite_losses(losses: &[f32]) -> Vec<f32> {
    let mut last = None;
    losses
        .iter()
        .filter_map(|&l| {
            if !l.is_nan() {
                last = Some(l);
            }
            last
        })
        .collect()
}

/// A number for metrics.jsonl, or its name as a string for NaN and infinities (which JSON lacks).
fn json_number(x: f32) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        json!(x.to_string())
    }
}

/// Fresh adapters on `model`, its base frozen, or with `--full` every weight: what AdamW trains.
fn trainables(
    args: &FinetuneArgs,
    model: &mut Gpt2,
) -> crate::Result<(Option<LoraModel>, Vec<Trainable>)> {
    if args.full {
        println!(
            "full fine-tuning: {} trainable parameters",
            model.num_params()
        );
        let params = model.named_params().into_iter();
        return Ok((
            None,
            params.filter_map(|p| p.as_trainable().cloned()).collect(),
        ));
    }
    let targets = args.targets.iter().map(|t| Target::parse(t));
    let targets: Vec<Target> = targets.collect::<Result<_, _>>()?;
    let config = args
        .lora_options
        .config(args.r, args.alpha, &targets, args.dropout)?;
    let lora = LoraModel::inject(model, &config, args.seed)?;
    println!("{}", lora.param_count(model));
    let params = lora.trainable_params();
    Ok((Some(lora), params))
}

/// The base seed of LoRA dropout at `step`: restarted every step, so that a resumed run draws
/// the same masks as an uninterrupted one (SplitMix64's increment spreads the steps apart).
fn dropout_seed(seed: u64, step: u32) -> u64 {
    seed.wrapping_add(u64::from(step).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Mean loss over the counted tokens of `examples`, in batches of `batch`, without dropout.
pub fn heldout_loss(
    model: &Gpt2,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
) -> crate::Result<f32> {
    let (mut total, mut count) = (0.0f64, 0.0f64);
    for chunk in examples.chunks(batch_size.max(1)) {
        let rows: Vec<&Example> = chunk.iter().collect();
        let b = batch(&rows, pad);
        let counted = f64::from(b.weights.iter().sum::<f32>());
        if counted == 0.0 {
            continue;
        }
        let tape = Tape::inference();
        let loss = model.loss(&tape, &b.ids, &b.targets, &b.weights, b.b, b.t)?;
        total += f64::from(loss.value.to_vec()?[0]) * counted;
        count += counted;
    }
    Ok((total / count) as f32)
}
