//! The training loop of `train finetune --adalora`, in PEFT's documented order per step:
//! the loss of each micro-batch plus its share of the orthogonal regularizer → backward
//! (the micro-batches' gradients added) → clip the global norm (`--max-grad-norm`) → AdamW at
//! the scheduled rate → the rank allocator's `update_and_allocate(step)` with that step's
//! gradients ([`lora::RankAllocator`]). Batches are drawn as for LoRA ([`crate::batch::Batches`]).
//!
//! `--out` receives `metrics.jsonl` (step, loss with the regularizer, lr, grad_norm, budget, and
//! kept ranks after each allocation), `loss.svg` (that loss by step) and `adapter/`: a PEFT ADALORA adapter pruned by the final
//! rank pattern ([`lora::AdaLora::save_peft`]), which `train eval --adapter` and `train merge`
//! load like any PEFT adapter. AdaLoRA runs are not checkpointed: `--resume` and `--stop-after`
//! are refused, as are LoRA-only options (dropout, DoRA, rsLoRA, patterns, ...).

use std::path::PathBuf;

use autograd::{AdamW, Grads, ParamGroup, clip_grad_norm};
use lora::{AdaLora, RankAllocator};
use serde_json::json;
use tensor::Device;
use transformer::{Checkpoint, Gpt2};

use super::FinetuneArgs;
use super::session::Plan;
use crate::batch::{Batches, Example, batch};
use crate::loss_plot::{Curve, plot_losses};
use crate::metrics::Metrics;

/// Refuses what an AdaLoRA run does not do.
fn check(args: &FinetuneArgs) -> crate::Result<()> {
    if args.resume || args.stop_after.is_some() {
        return Err(
            "--adalora runs are not checkpointed: --resume and --stop-after are refused".into(),
        );
    }
    if args.dropout != 0.0 {
        return Err(format!(
            "--dropout {}: --adalora trains without dropout",
            args.dropout
        )
        .into());
    }
    let lora_only = args.lora_options.identity();
    if !lora_only.is_empty() {
        let names: Vec<&String> = lora_only.keys().collect();
        return Err(format!("--adalora does not take the LoRA options {names:?}").into());
    }
    if args.skip_nonfinite {
        return Err("--adalora stops at a non-finite step; --skip-nonfinite is refused".into());
    }
    Ok(())
}

/// Trains, saves `adapter/`, and returns its path.
pub(super) fn run(
    args: &FinetuneArgs,
    base: &Checkpoint,
    device: &Device,
    plan: Plan,
) -> crate::Result<PathBuf> {
    check(args)?;
    let total = plan.total as usize;
    let config = args.adalora.config(&args.targets, args.alpha, total)?;
    let mut model = Gpt2::from_checkpoint(base, device, false)?;
    let ada = AdaLora::inject(&mut model, &config, args.seed)?;
    args.quant.store(&mut model)?;
    let trainables = ada
        .trainable_params()
        .into_iter()
        .filter_map(|p| p.as_trainable().cloned())
        .collect();
    let mut opt = AdamW::new(vec![ParamGroup::new(trainables, args.weight_decay)]);
    let updates: Vec<&lora::SvdUpdate> = ada.updates.iter().map(|(_, u)| u).collect();
    let mut allocator = RankAllocator::new(
        config.schedule.clone(),
        config.init_r,
        config.target_r,
        updates.len(),
    );
    let schedule = args.schedule(plan.total);
    let lengths = plan.train.iter().map(|e| e.ids.len()).collect();
    let mut order = Batches::new(lengths, args.batch, args.seed).with_buckets(8);
    std::fs::create_dir_all(&args.out)?;
    let mut metrics = Metrics::create(&args.out.join("metrics.jsonl"))?;
    println!(
        "AdaLoRA on {} Linears: rank {} → {} on average, {} trainable values",
        updates.len(),
        config.init_r,
        config.target_r,
        ada.trainable_params()
            .iter()
            .map(|p| p.value().numel())
            .sum::<usize>()
    );
    let mut losses = Vec::with_capacity(total);
    for i in 0..total {
        let micro: Vec<_> = (0..args.grad_accum)
            .map(|_| {
                let rows: Vec<&Example> =
                    order.next_batch().iter().map(|&j| &plan.train[j]).collect();
                batch(&rows, plan.pad)
            })
            .collect();
        let counted: Vec<f32> = micro.iter().map(|b| b.weights.iter().sum()).collect();
        let all: f32 = counted.iter().sum();
        if all <= 0.0 {
            return Err("a training step without a single counted token".into());
        }
        let mut grads = Grads::new();
        let mut loss_sum = 0.0f32;
        for (b, c) in micro.iter().zip(&counted) {
            let tape = model.training_tape();
            let ce = model.loss(&tape, &b.ids, &b.targets, &b.weights, b.b, b.t)?;
            let loss = tape.scale(&ada.regularized(&tape, &ce)?, c / all)?;
            tape.backward(&loss, &mut grads)?;
            loss_sum += loss.value.to_vec()?[0];
        }
        let limit = if args.max_grad_norm > 0.0 {
            args.max_grad_norm
        } else {
            f32::INFINITY
        };
        let grad_norm = clip_grad_norm(&mut grads, limit)?;
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            let message = format!("step {}: loss {loss_sum}, gradient norm {grad_norm}", i + 1);
            return Err(message.into());
        }
        let lr = schedule.lr(args.lr(), i as u32);
        opt.step(&grads, lr)?;
        let budget = allocator.budget(i).0;
        let masked = allocator.update_and_allocate(i, &updates, &grads)?;
        let mut record = json!({"step": i + 1, "loss": loss_sum, "lr": lr,
            "grad_norm": grad_norm, "budget": budget});
        if masked && let Some(p) = &allocator.rank_pattern {
            let ranks: Vec<usize> = p.iter().map(|k| k.iter().filter(|&&x| x).count()).collect();
            record["ranks"] = json!(ranks);
        }
        metrics.write(record)?;
        losses.push(loss_sum);
        if (i + 1) % 10 == 0 || i + 1 == total {
            println!(
                "step {}/{total}: loss {loss_sum:.4}, budget {budget}",
                i + 1
            );
        }
    }
    let name = format!(
        "AdaLoRA r {} to {}",
        args.adalora.init_r, args.adalora.target_r
    );
    let curve = Curve {
        name: &name,
        losses: &losses,
        heldout: &[],
    };
    let title = format!(
        "fine-tuning {} on {}: loss of the counted tokens, with the orthogonal regularizer",
        args.model.display(),
        args.data.display()
    );
    plot_losses(&args.out.join("loss.svg"), &title, &[curve])?;
    let dir = args.out.join("adapter");
    ada.save_peft(&dir, allocator.rank_pattern.as_deref())?;
    if let Some(p) = &allocator.rank_pattern {
        for ((name, _), keep) in ada.updates.iter().zip(p) {
            println!("{name}: rank {}", keep.iter().filter(|&&k| k).count());
        }
    }
    Ok(dir)
}
