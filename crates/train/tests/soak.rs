//! A long run's memory does not grow: over many fine-tuning steps, the bytes held by live
//! tensors on the device come back to the same value after every step, for LoRA and for full
//! fine-tuning, on the CPU backend (30 steps) and on the GPU (3 steps: the test GPU may be a
//! slow software one).
//!
//! The loop is the one `train finetune` runs: LoRA dropout reseeded each step, micro-batches
//! of varying lengths accumulated into one step (so every step allocates differently shaped
//! activations), a held-out evaluation and a checkpoint every few steps. The first step
//! allocates AdamW's moments, which stay for the run; from then on every byte a step allocates
//! must be freed by its end. One test function runs every case in turn, because the devices
//! (and their counters) are shared by the whole test process.

use autograd::{AdamW, ParamGroup, Schedule, Trainable};
use lora::{LoraConfig, LoraModel, Target};
use tensor::Device;
use train::batch::{Batch, Example, batch};
use train::checkpoint::{self, Progress};
use train::finetune_cmd::heldout_loss;
use train::trainer::{OptimConfig, step};
use transformer::{Checkpoint, Gpt2};

fn tiny() -> Checkpoint {
    Checkpoint::load(integration_tests::gpt2_tiny::dir()).unwrap()
}

/// Examples of 10 to 57 bytes, their first third context.
fn examples() -> Vec<Example> {
    (0..16)
        .map(|i| {
            let len = 10 + (i * 23) % 48;
            Example {
                ids: (0..len).map(|j| ((i * 7 + j * 13) % 256) as u32).collect(),
                completion_start: len / 3,
            }
        })
        .collect()
}

/// The micro-batches of step `i`: two, of sizes and lengths that change from step to step.
fn micro_batches(data: &[Example], i: usize) -> Vec<Batch> {
    let pick = |k: usize, n: usize| -> Vec<&Example> {
        (0..n)
            .map(|j| &data[(i * 5 + k * 3 + j) % data.len()])
            .collect()
    };
    vec![batch(&pick(0, 1 + i % 3), 0), batch(&pick(1, 2), 0)]
}

/// Live bytes on `device` after each of `steps` steps of LoRA (`full` false) or full
/// fine-tuning.
fn live_bytes_per_step(device: &Device, full: bool, steps: usize) -> Vec<u64> {
    let mut model = Gpt2::from_checkpoint(&tiny(), device, full).unwrap();
    let (lora, params): (Option<LoraModel>, Vec<Trainable>) = if full {
        let params = model.named_params().into_iter();
        (
            None,
            params.filter_map(|p| p.as_trainable().cloned()).collect(),
        )
    } else {
        let targets = [
            Target::parse("c_attn").unwrap(),
            Target::parse("fc").unwrap(),
        ];
        let mut config = LoraConfig::new(4, 8.0, &targets);
        config.dropout = 0.1;
        let lora = LoraModel::inject(&mut model, &config, 1).unwrap();
        let params = lora.trainable_params();
        (Some(lora), params)
    };
    let mut opt = AdamW::new(vec![ParamGroup::new(params.clone(), 0.01)]);
    let cfg = OptimConfig {
        lr: 1e-3,
        schedule: Schedule::Constant,
        clip: 1.0,
    };
    let data = examples();
    let dir = integration_tests::scratch(&format!("train-soak-{full}"));
    let mut progress = Progress::start(0, serde_json::json!({}));
    let mut live = Vec::new();
    for i in 0..steps {
        if let Some(lora) = &lora {
            lora.set_dropout_seed(i as u64);
        }
        let s = step(&model, &mut opt, &micro_batches(&data, i), &cfg, i as u32)
            .unwrap()
            .unwrap();
        assert!(s.loss.is_finite());
        progress.step += 1;
        progress.losses.push(s.loss);
        if i % 3 == 1 {
            heldout_loss(&model, &data[..5], 2, 0).unwrap();
            checkpoint::save(&dir, &progress, &params, &opt).unwrap();
        }
        live.push(device.memory().live);
    }
    live
}

/// Every step after the first `warm_up` leaves exactly the live bytes the warm-up left.
fn assert_flat(live: &[u64], warm_up: usize, what: &str) {
    let settled = live[warm_up - 1];
    for (i, &bytes) in live.iter().enumerate().skip(warm_up) {
        assert_eq!(
            bytes,
            settled,
            "{what}: after step {} the device holds {bytes} bytes, after step {warm_up} \
             {settled} (all steps: {live:?})",
            i + 1
        );
    }
}

#[test]
fn live_bytes_return_to_the_same_value_after_every_step() {
    let cpu = Device::cpu();
    for full in [false, true] {
        let what = if full { "full, CPU" } else { "LoRA, CPU" };
        let before = cpu.memory().live;
        let live = live_bytes_per_step(&cpu, full, 30);
        assert!(
            live[0] > before,
            "{what}: the model and AdamW's moments are counted"
        );
        assert_flat(&live, 1, what);
        assert_eq!(
            cpu.memory().live,
            before,
            "{what}: dropping the run frees everything"
        );
    }
    let Some(gpu) = tensor::testing::gpu() else {
        return;
    };
    for full in [false, true] {
        let what = if full { "full, GPU" } else { "LoRA, GPU" };
        let before = gpu.memory().live;
        let live = live_bytes_per_step(&gpu, full, 3);
        assert_flat(&live, 1, what);
        assert_eq!(
            gpu.memory().live,
            before,
            "{what}: dropping the run frees everything"
        );
    }
}
