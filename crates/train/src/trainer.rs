//! The training loop's pieces, shared by `pretrain` and `finetune`: one optimizer step over a
//! batch, the learning-rate schedule, clipping, progress, metrics, and checkpoints that a run
//! can resume from exactly.
//!
//! A step: forward on a recording tape → mean cross-entropy over the counted tokens →
//! backward into `Grads` (trainable parameters only) → clip the global norm → AdamW at the
//! scheduled learning rate. A non-finite loss or gradient norm stops the run with the step
//! number, before the optimizer can write NaN into the weights.

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
    let start = Instant::now();
    let tape = Tape::new();
    let (_, loss) = model.loss(
        &tape,
        &batch.ids,
        &batch.targets,
        &batch.weights,
        batch.b,
        batch.t,
    )?;
    let saved_peak = tape.saved_memory().peak;
    let mut grads = Grads::new();
    tape.backward(&loss, &mut grads)?;
    let grad_bytes = grads.memory().peak;
    let loss_value = loss.value.to_vec()?[0];
    let grad_norm = if cfg.clip > 0.0 {
        clip_grad_norm(&mut grads, cfg.clip)?
    } else {
        f32::NAN
    };
    if !loss_value.is_finite() || (cfg.clip > 0.0 && !grad_norm.is_finite()) {
        return Err(format!(
            "step {}: the loss is {loss_value} and the gradient norm {grad_norm}; stopping before \
             the weights are damaged (try a lower learning rate)",
            step_index + 1
        )
        .into());
    }
    let lr = cfg.schedule.lr(cfg.lr, step_index);
    opt.step(&grads, lr)?;
    Ok(StepStats {
        loss: loss_value,
        grad_norm,
        lr,
        seconds: start.elapsed().as_secs_f64(),
        saved_peak,
        grad_bytes,
    })
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

    pub fn write(&mut self, value: serde_json::Value) -> crate::Result<()> {
        writeln!(self.file, "{value}").map_err(|e| format!("{}: {e}", self.path.display()))?;
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
