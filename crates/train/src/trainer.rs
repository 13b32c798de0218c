//! One training step, shared by `pretrain`, the fine-tuning commands and the benches:
//! [`step`] takes an optimizer step over one batch or over several micro-batches together
//! (gradient accumulation).
//!
//! A step: forward on a recording tape → mean cross-entropy over the counted tokens →
//! backward into [`Grads`] (trainable parameters only; each micro-batch adds into the same
//! `Grads`, which on a GPU keeps them in the optimizer's gradient arena: [`AdamW::grads`]) →
//! the global gradient norm on the device → AdamW at the scheduled learning rate, clipping each
//! gradient as it reads it. The profiler ([`tensor::profile`]) sees three phases:
//! `forward`, `backward` and `optimizer`.
//!
//! **One readback per step.** The loss stays on the device; the norm, the clip factor and the
//! finite check are computed there ([`autograd::grad_norm_clip`]) and the update reads them
//! ([`AdamW::step_clipped`]), so the host waits once, after the whole step is recorded, for the
//! loss, the norm and whether the step was skipped.
//!
//! **Non-finite steps.** A loss or gradient norm that is NaN or infinite is caught before the
//! optimizer can write it into the weights or its moments: the update kernels see it on the
//! device and write nothing; the host then takes back the optimizer's step count
//! ([`AdamW::take_back`]), so parameters and optimizer are as they were, and returns
//! [`NonFinite`], which a caller either skips (`train finetune --skip-nonfinite`) or turns into
//! the error that stops the run ([`NonFinite::stop`]).
//!
//! (Metrics are written by [`crate::metrics`]; checkpoints a run resumes from exactly by
//! [`crate::checkpoint`].)

use std::time::Instant;

use autograd::{AdamW, Grads, Schedule, grad_norm_clip};
use tensor::Tensor;
use tensor::ops::elementwise::add;
use tensor::profile;
use transformer::Gpt2;

use crate::batch::Batch;

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
    /// Clip the global gradient norm over the trainable parameters to this (0 = no clipping;
    /// the norm is measured and reported either way).
    pub clip: f32,
}

/// A step whose loss or gradient norm was not finite; nothing was updated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonFinite {
    /// The step, counted from 1.
    pub step: u32,
    pub loss: f32,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
}

impl NonFinite {
    /// The error that stops a run at this step.
    pub fn stop(self) -> crate::Error {
        format!("{self}; stopping before the weights are damaged (try a lower learning rate)")
            .into()
    }
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

/// One optimizer step of `model` over the micro-batches `micro` together (one batch: a slice of
/// one): the gradients of all of them are summed into one [`Grads`] before clipping and the
/// update, and the reported loss is that of the whole.
///
/// Each micro-batch's loss is a mean over its counted tokens, so it is weighted by its share of
/// all counted tokens (1/n when they count equally many): the sum is then the mean over every
/// counted token of the micro-batches, exactly the loss one batch holding all of them would
/// have, and so are the gradients, up to f32 rounding. Only one micro-batch's activations are
/// alive at a time.
///
/// A non-finite loss or gradient norm is not an error: the step is abandoned before the update,
/// leaving the parameters and the optimizer (its moments and its step count) as they were, and
/// `Ok(Err(NonFinite))` says so. `step_index` counts from 0 and picks the scheduled rate.
pub fn step(
    model: &Gpt2,
    opt: &mut AdamW,
    micro: &[Batch],
    cfg: &OptimConfig,
    step_index: u32,
) -> crate::Result<Result<StepStats, NonFinite>> {
    let start = Instant::now();
    // On a GPU the gradients land in the optimizer's gradient arena: the norm and the update
    // below are then a few dispatches over all of them.
    let mut grads = opt.grads()?;
    let (loss, saved_peak) = forward_backward(model, micro, &mut grads)?;
    let grad_bytes = grads.memory().peak;
    let _phase = profile::phase("optimizer");
    // The norm is measured in every case (for the metrics and the non-finite check); a limit of
    // 0 means no clipping.
    let limit = if cfg.clip > 0.0 {
        cfg.clip
    } else {
        f32::INFINITY
    };
    let clip = grad_norm_clip(&grads, limit, &[&loss])?;
    let lr = cfg.schedule.lr(cfg.lr, step_index);
    opt.step_clipped(&grads, lr, &clip)?;
    // The step's one wait: everything above is recorded before it.
    let report = clip.read()?;
    let (loss, grad_norm) = (report.checked[0], report.norm);
    if report.skipped {
        opt.take_back();
        return Ok(Err(NonFinite {
            step: step_index + 1,
            loss,
            grad_norm,
        }));
    }
    Ok(Ok(StepStats {
        loss,
        grad_norm,
        lr,
        seconds: start.elapsed().as_secs_f64(),
        saved_peak,
        grad_bytes,
    }))
}

/// The forward and backward halves of [`step`]: each micro-batch in turn, its gradients added
/// into `grads`; returns the loss of the micro-batches taken together (a one-element tensor on
/// the model's device, the shares added in order in f32) and the most bytes one tape held for
/// backward.
fn forward_backward(
    model: &Gpt2,
    micro: &[Batch],
    grads: &mut Grads,
) -> crate::Result<(Tensor, u64)> {
    let counted = |b: &Batch| b.weights.iter().sum::<f32>();
    let total: f32 = micro.iter().map(counted).sum();
    if total <= 0.0 {
        return Err("a training step without a single counted token".into());
    }
    let (mut loss_sum, mut saved_peak): (Option<Tensor>, u64) = (None, 0);
    for batch in micro {
        let tape = model.training_tape();
        let loss = {
            let _phase = profile::phase("forward");
            let loss = model.loss(
                &tape,
                &batch.ids,
                &batch.targets,
                &batch.weights,
                batch.b,
                batch.t,
            )?;
            let share = counted(batch) / total;
            if share == 1.0 {
                loss
            } else {
                tape.scale(&loss, share)?
            }
        };
        saved_peak = saved_peak.max(tape.saved_memory().peak);
        {
            let _phase = profile::phase("backward");
            tape.backward(&loss, grads)?;
        }
        loss_sum = Some(match loss_sum {
            None => loss.value.clone(),
            Some(sum) => add(&sum, &loss.value)?,
        });
    }
    let loss_sum = loss_sum.ok_or("a training step without a micro-batch")?;
    Ok((loss_sum, saved_peak))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Example, batch};
    use transformer::Checkpoint;

    /// Clipping through [`step`]: `clip` 0 measures the norm and changes nothing (the update of
    /// an unreachable limit), a limit of half the norm halves the gradient. AdamW with β1 = β2 = 0
    /// and an eps far above every gradient makes the update lr·g/(|g| + eps) ≈ lr·g/eps, linear
    /// in g, so the halving shows in the update.
    #[test]
    fn clipping_scales_the_gradient_to_the_limit_and_0_turns_it_off() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/gpt2-tiny"
        );
        let ckpt = Checkpoint::load(dir).unwrap();
        let rows = [Example {
            ids: b"the quick brown fox jumps"
                .iter()
                .map(|&b| u32::from(b))
                .collect(),
            completion_start: 0,
        }];
        let refs: Vec<&Example> = rows.iter().collect();
        let micro = [batch(&refs, 0)];
        // (grad norm, the change of the first weight) after one step with limit `clip`.
        let run = |clip: f32| -> (f32, Vec<f32>) {
            let model = Gpt2::from_checkpoint(&ckpt, &tensor::Device::cpu(), true).unwrap();
            let params: Vec<_> = model
                .named_params()
                .into_iter()
                .filter_map(|p| p.as_trainable().cloned())
                .collect();
            let before = params[0].value.to_vec().unwrap();
            let mut opt = AdamW::new(vec![autograd::ParamGroup::new(params.clone(), 0.0)]);
            (opt.beta1, opt.beta2, opt.eps) = (0.0, 0.0, 1e3);
            let cfg = OptimConfig {
                lr: 1.0,
                schedule: Schedule::Constant,
                clip,
            };
            let stats = step(&model, &mut opt, &micro, &cfg, 0).unwrap().unwrap();
            let after = params[0].value.to_vec().unwrap();
            let delta = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            (stats.grad_norm, delta)
        };
        let (norm, free) = run(0.0);
        assert!(norm.is_finite() && norm > 0.0, "{norm}");
        let (norm_big, unclipped) = run(1e9);
        assert_eq!(norm, norm_big);
        assert_eq!(free, unclipped, "clip 0 leaves the gradient as it is");
        let (_, halved) = run(norm / 2.0);
        let biggest = free.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(biggest > 0.0);
        for (h, f) in halved.iter().zip(&free) {
            assert!((h - 0.5 * f).abs() <= 1e-3 * biggest, "{h} vs half of {f}");
        }
    }

    /// A NaN weight makes the loss and the norm NaN: on the CPU and on the GPU (where the skip
    /// is decided by the update kernels and learned by the host afterwards) the step reports
    /// [`NonFinite`] and leaves every parameter and the optimizer (step count, moments) as
    /// they were; the next step with good weights is then a first step.
    #[test]
    fn a_non_finite_step_changes_nothing_on_the_cpu_and_the_gpu() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/gpt2-tiny"
        );
        let ckpt = Checkpoint::load(dir).unwrap();
        let rows = [Example {
            ids: b"over the lazy dog".iter().map(|&b| u32::from(b)).collect(),
            completion_start: 0,
        }];
        let refs: Vec<&Example> = rows.iter().collect();
        let micro = [batch(&refs, 0)];
        let cfg = OptimConfig {
            lr: 1e-2,
            schedule: Schedule::Constant,
            clip: 1.0,
        };
        let mut devices = vec![tensor::Device::cpu()];
        devices.extend(tensor::testing::gpu());
        for device in &devices {
            let model = Gpt2::from_checkpoint(&ckpt, device, true).unwrap();
            let params: Vec<_> = model
                .named_params()
                .into_iter()
                .filter_map(|p| p.as_trainable().cloned())
                .collect();
            let mut opt = AdamW::new(vec![autograd::ParamGroup::new(params.clone(), 0.0)]);
            let last = params.last().unwrap();
            let good = last.value.to_vec().unwrap();
            let nan = vec![f32::NAN; good.len()];
            let set = |v: &[f32]| {
                let t = tensor::Tensor::from_vec(v.to_vec(), last.value.shape(), device).unwrap();
                tensor::ops::slice::write_axis(&last.value, 0, 0, &t, false).unwrap();
            };
            set(&nan);
            let before: Vec<Vec<f32>> = params.iter().map(|p| p.value.to_vec().unwrap()).collect();
            let bad = step(&model, &mut opt, &micro, &cfg, 0)
                .unwrap()
                .unwrap_err();
            assert!(bad.loss.is_nan() && bad.grad_norm.is_nan(), "{bad}");
            let after: Vec<Vec<f32>> = params.iter().map(|p| p.value.to_vec().unwrap()).collect();
            // NaN != NaN: compare bits.
            let bits = |v: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
                v.iter()
                    .map(|x| x.iter().map(|f| f.to_bits()).collect())
                    .collect()
            };
            assert_eq!(
                bits(&after),
                bits(&before),
                "a skipped step changed a weight"
            );
            assert_eq!(opt.step, 0);
            assert!(opt.state_tensors().is_empty() && opt.memory().live == 0);
            set(&good);
            let stats = step(&model, &mut opt, &micro, &cfg, 0).unwrap().unwrap();
            assert!(stats.loss.is_finite() && stats.grad_norm > 0.0);
            assert_eq!((opt.step, opt.state_tensors().len()), (1, params.len()));
        }
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
        let (loss_apart, _) = forward_backward(&model, &micro, &mut apart).unwrap();
        let (loss_together, _) =
            forward_backward(&model, &[batch(&refs, 0)], &mut together).unwrap();
        let (loss_apart, loss_together) = (
            loss_apart.to_vec().unwrap()[0],
            loss_together.to_vec().unwrap()[0],
        );
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
