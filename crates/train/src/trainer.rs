//! The training loop's pieces, shared by `pretrain` and the fine-tuning commands: one optimizer
//! step over a batch or over several micro-batches (gradient accumulation), clipping, progress
//! and metrics. (Checkpoints a run resumes from exactly are in [`crate::checkpoint`].)
//!
//! A step: forward on a recording tape → mean cross-entropy over the counted tokens →
//! backward into `Grads` (trainable parameters only; each micro-batch adds into the same
//! `Grads`) → clip the global norm → AdamW at the scheduled learning rate.
//!
//! **Non-finite steps.** A loss or gradient norm that is NaN or infinite is caught before the
//! optimizer can write it into the weights or its moments: [`try_step_accumulated`] then leaves
//! parameters and optimizer untouched and returns [`NonFinite`], for a caller that skips such
//! steps (`train finetune --skip-nonfinite`); [`step_accumulated`] turns it into an error that
//! names the step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use autograd::{AdamW, Grads, Schedule, Tape, clip_grad_norm};
use transformer::Gpt2;

/// Batches are right-padded rows of B sequences of T tokens with loss weights (see `e2e`).
pub use crate::e2e::Batch;

/// What one step measured.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub loss: f32,
    pub grad_norm: f32,
    pub lr: f32,
    pub seconds: f64,
    /// Bytes the tape held for backward at the end of the forward pass.
    pub saved_peak: u64,
    /// Bytes of gradient buffers.
    pub grad_bytes: u64,
}

/// Optimiser settings of a run.
#[derive(Clone, Debug)]
pub struct OptimConfig {
    pub lr: f32,
    pub schedule: Schedule,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub clip: f32,
}

/// One optimizer step of `model` on `batch`.
pub fn step(
    model: &Gpt2,
    opt: &mut AdamW,
    batch: &Batch,
    cfg: &OptimConfig,
    step_index: u32,
) -> crate::Result<StepStats> {
    step_accumulated(model, opt, std::slice::from_ref(batch), cfg, step_index)
}

/// A step whose loss or gradient norm was not finite; nothing was updated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonFinite {
    /// The step, counted from 1.
    pub step: u32,
    pub loss: f32,
    /// The global gradient norm before clipping (NaN when the run does not clip).
    pub grad_norm: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: the loss is {} and the gradient norm {}",
            self.step, self.loss, self.grad_norm
        )
    }
}

/// One optimizer step over the micro-batches `micro` together (gradient accumulation): the
/// gradients of all of them are summed into one [`Grads`] before clipping and the update.
/// See [`accumulate`] for how they are weighted; the reported loss is that of the whole.
pub fn step_accumulated(
    model: &Gpt2,
    opt: &mut AdamW,
    micro: &[Batch],
    cfg: &OptimConfig,
    step_index: u32,
) -> crate::Result<StepStats> {
    try_step_accumulated(model, opt, micro, cfg, step_index)?.map_err(|bad| {
        format!("{bad}; stopping before the weights are damaged (try a lower learning rate)").into()
    })
}

/// [`step_accumulated`], but a non-finite loss or gradient norm is not an error: the step is
/// abandoned before the update, leaving the parameters and the optimizer (its moments and its
/// step count) as they were, and `Ok(Err(NonFinite))` says so.
pub fn try_step_accumulated(
    model: &Gpt2,
    opt: &mut AdamW,
    micro: &[Batch],
    cfg: &OptimConfig,
    step_index: u32,
) -> crate::Result<Result<StepStats, NonFinite>> {
    let start = Instant::now();
    let mut grads = Grads::new();
    let (loss_value, saved_peak) = accumulate(model, micro, &mut grads)?;
    let grad_bytes = grads.memory().peak;
    let grad_norm = if cfg.clip > 0.0 {
        clip_grad_norm(&mut grads, cfg.clip)?
    } else {
        f32::NAN
    };
    if !loss_value.is_finite() || (cfg.clip > 0.0 && !grad_norm.is_finite()) {
        return Ok(Err(NonFinite {
            step: step_index + 1,
            loss: loss_value,
            grad_norm,
        }));
    }
    let lr = cfg.schedule.lr(cfg.lr, step_index);
    opt.step(&grads, lr)?;
    Ok(Ok(StepStats {
        loss: loss_value,
        grad_norm,
        lr,
        seconds: start.elapsed().as_secs_f64(),
        saved_peak,
        grad_bytes,
    }))
}

/// Forward and backward of each micro-batch in turn, its gradients added into `grads`; returns
/// the loss of the micro-batches taken together and the most bytes one tape held for backward.
///
/// Each micro-batch's loss is a mean over its counted tokens, so it is weighted by its share of
/// all counted tokens (1/n when they count equally many): the sum is then the mean over every
/// counted token of the micro-batches, exactly the loss one batch holding all of them would
/// have, and so are the gradients, up to f32 rounding. Only one micro-batch's activations are
/// alive at a time.
pub fn accumulate(model: &Gpt2, micro: &[Batch], grads: &mut Grads) -> crate::Result<(f32, u64)> {
    let counted = |b: &Batch| b.weights.iter().sum::<f32>();
    let total: f32 = micro.iter().map(counted).sum();
    if total <= 0.0 {
        return Err("a training step without a single counted token".into());
    }
    let (mut loss_sum, mut saved_peak) = (0.0f32, 0u64);
    for batch in micro {
        let tape = Tape::new();
        let loss = model.loss(
            &tape,
            &batch.ids,
            &batch.targets,
            &batch.weights,
            batch.b,
            batch.t,
        )?;
        let share = counted(batch) / total;
        let loss = if share == 1.0 {
            loss
        } else {
            tape.scale(&loss, share)?
        };
        saved_peak = saved_peak.max(tape.saved_memory().peak);
        tape.backward(&loss, grads)?;
        loss_sum += loss.value.to_vec()?[0];
    }
    Ok((loss_sum, saved_peak))
}

/// Metrics written as one JSON object per line.
pub struct Metrics {
    file: std::fs::File,
    pub path: PathBuf,
}

impl Metrics {
    pub fn create(path: &Path) -> crate::Result<Metrics> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Reopen a run's metrics to continue it after `step`: records of later steps (written
    /// after the checkpoint being resumed from) are dropped, the rest kept, and new ones appended.
    pub fn resume(path: &Path, step: u32) -> crate::Result<Metrics> {
        let name = path.display();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // A crash in the middle of a write can leave a last line without its newline: it is
        // a record of a step after the checkpoint (records are written after their step), so
        // it goes with them.
        let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
        let mut kept = String::new();
        for line in whole.lines() {
            let record: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{name}: {e} in `{line}`"))?;
            if record["step"]
                .as_u64()
                .is_some_and(|s| s <= u64::from(step))
            {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        transformer::tensor_file::write_file_atomically(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("{name}: {e}"))?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `value` as one line, in a single write (a record is never interleaved with
    /// another, and a crash leaves at most the last one torn).
    pub fn write(&mut self, value: serde_json::Value) -> crate::Result<()> {
        let line = format!("{value}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        Ok(())
    }
}

/// A progress bar showing step, loss, tokens/s and time left.
pub fn progress(steps: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}"
        ))
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2e::{Example, batch};
    use transformer::Checkpoint;

    /// A record torn by a crash (no newline at the end) and the records after the checkpoint
    /// are dropped when a run resumes; the kept ones stay and new ones follow.
    #[test]
    fn resumed_metrics_drop_a_torn_last_record() {
        let dir = std::env::temp_dir().join(format!("train-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let text = "{\"step\":1}\n{\"step\":2,\"eval_loss\":1}\n{\"step\":3}\n{\"step\":4,\"lo";
        std::fs::write(&path, text).unwrap();
        let mut metrics = Metrics::resume(&path, 2).unwrap();
        metrics.write(serde_json::json!({"step": 3})).unwrap();
        let back = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            back,
            "{\"step\":1}\n{\"step\":2,\"eval_loss\":1}\n{\"step\":3}\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two micro-batches of 2 give the loss and gradients of one batch of 4: examples of
    /// different lengths and prompt lengths, so the micro-batches count different numbers of
    /// tokens and are padded differently.
    #[test]
    fn two_micro_batches_equal_one_batch_of_both() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/gpt2-tiny"
        );
        let ckpt = Checkpoint::load(dir).unwrap();
        let model = Gpt2::from_checkpoint(&ckpt, &tensor::Device::cpu(), true).unwrap();
        let example = |text: &str, completion_start| Example {
            ids: text.bytes().map(u32::from).collect(),
            completion_start,
        };
        let rows = [
            example("name : Aromi || a coffee shop .", 16),
            example("area : riverside || by the river", 18),
            example("x || y", 4),
            example("food : Thai | price : cheap || cheap Thai food here", 30),
        ];
        let refs: Vec<&Example> = rows.iter().collect();
        let (mut apart, mut together) = (Grads::new(), Grads::new());
        let micro = [batch(&refs[..2], 0), batch(&refs[2..], 0)];
        let (loss_apart, _) = accumulate(&model, &micro, &mut apart).unwrap();
        let (loss_together, _) = accumulate(&model, &[batch(&refs, 0)], &mut together).unwrap();
        assert!(
            (loss_apart - loss_together).abs() < 1e-5,
            "{loss_apart} vs {loss_together}"
        );
        assert_eq!(apart.len(), model.named_params().len());
        let mut worst = 0.0f32;
        for id in together.ids() {
            let a = apart.get(id).unwrap().to_vec().unwrap();
            let b = together.get(id).unwrap().to_vec().unwrap();
            for (x, y) in a.iter().zip(&b) {
                worst = worst.max((x - y).abs());
            }
        }
        assert!(worst < 1e-5, "largest gradient difference {worst}");
    }
}
