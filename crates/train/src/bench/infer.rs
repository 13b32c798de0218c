//! `train bench infer`: inference with the KV cache, with and without adapters.
//!
//! For each batch size B: a prompt of P random tokens per sequence is fed at once (prefill:
//! prompt tokens/s), then N tokens are generated greedily one position at a time (ms per
//! generated position of the whole batch: the latency per token a user sees, and B/that as
//! generated tokens/s). Each case reads the logits back to the host, as generation does.
//!
//! Variants, on one frozen base model with random weights:
//! - `base`: no adapter;
//! - `unmerged`: a LoRA adapter attached, computing s·(x·Aᵀ)·Bᵀ beside every adapted Linear;
//! - `merged`: the same adapter folded into W (cost should equal the base's);
//! - `mixed`: an `AdapterBank` of two adapters, sequence b served by adapter a, b or none in
//!   turn, the adapters' terms computed for all rows at once by SGMV.
//!
//! Adapters are made with [`lora::Init::BothRandom`] (B ≠ 0), so their terms are not zeros a kernel
//! could skip. Runs are repeated `--repeats` times after a warm-up; medians are reported.

use clap::Parser;
use lora::{AdapterBank, Init, LoraConfig, LoraModel};
use serde_json::json;
use tensor::Device;
use transformer::generate::{argmax, last_logits};
use transformer::{Gpt2, KvCache, init_checkpoint};

use super::table::{Report, f};
use super::{Budget, forward_flops, median, random_ids, shape};

/// Options of `train bench infer`.
#[derive(Parser, Debug, Clone)]
pub struct InferArgs {
    /// Model shape: e2e, tiny, 124m, medium or a config.json path [default: 124m on a GPU, e2e on the CPU].
    #[arg(long)]
    pub model: Option<String>,
    /// Batch sizes (sequences decoded together).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub prompt: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// The adapters' LoRA settings.
    #[command(flatten)]
    pub lora: super::LoraArgs,
    /// Measured repetitions of each case (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip a batch size whose estimated time exceeds this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub budget: f64,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Seconds of the prefill and of the whole decode, for B sequences.
fn generate_once(
    model: &Gpt2,
    device: &Device,
    prompt: &[u32],
    b: usize,
    p: usize,
    n: usize,
) -> crate::Result<(f64, f64)> {
    let v = model.config.vocab_size;
    let mut cache = KvCache::new(&model.config, b, device)?;
    let start = std::time::Instant::now();
    let mut logits = last_logits(model, &mut cache, prompt, b, p)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    for _ in 0..n {
        let next: Vec<u32> = logits.chunks_exact(v).map(argmax).collect();
        logits = last_logits(model, &mut cache, &next, b, 1)?;
    }
    Ok((prefill, start.elapsed().as_secs_f64()))
}

struct Timing {
    prefill: f64,
    decode: f64,
}

fn measure(model: &Gpt2, device: &Device, b: usize, args: &InferArgs) -> crate::Result<Timing> {
    let prompt = random_ids(b * args.prompt, model.config.vocab_size, 3);
    generate_once(model, device, &prompt, b, args.prompt, args.new_tokens)?;
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats.max(1) {
        let (p, d) = generate_once(model, device, &prompt, b, args.prompt, args.new_tokens)?;
        pre.push(p);
        dec.push(d);
    }
    Ok(Timing {
        prefill: median(&pre),
        decode: median(&dec),
    })
}

/// `train bench infer`.
pub fn run(args: &InferArgs, device: &Device) -> crate::Result<()> {
    let label = super::device_label(device);
    let name = args
        .model
        .clone()
        .unwrap_or_else(|| if device.is_gpu() { "124m" } else { "e2e" }.to_string());
    let cfg = shape(&name)?;
    if args.prompt == 0 || args.new_tokens == 0 || args.prompt + args.new_tokens > cfg.n_positions {
        return Err(format!(
            "a prompt of {} and {} new tokens: expected both > 0 and together within the \
             context of {} of model `{name}`",
            args.prompt, args.new_tokens, cfg.n_positions
        )
        .into());
    }
    let targets: Vec<lora::Target> = args
        .lora
        .targets
        .iter()
        .map(|t| lora::Target::parse(t))
        .collect::<Result<_, _>>()?;
    let mut lcfg = LoraConfig::new(args.lora.r, args.lora.alpha, &targets);
    lcfg.init = Init::BothRandom;
    let mut model = Gpt2::from_checkpoint(&init_checkpoint(&cfg, 1)?, device, false)?;
    let mut lora = LoraModel::new(&model, &lcfg, 2)?;
    let other = LoraModel::new(&model, &lcfg, 3)?;
    let report = Report::new(
        args.json,
        &format!(
            "inference with the KV cache: {name}, prompt {} + {} new tokens, on {label} \
             (median of {})",
            args.prompt, args.new_tokens, args.repeats
        ),
        &[
            ("variant", 9),
            ("B", 3),
            ("prefill ms", 10),
            ("prompt tok/s", 12),
            ("ms/token", 9),
            ("gen tok/s", 9),
        ],
    );
    let mut budget = Budget::new(args.budget, device)?;
    for &b in &args.batch {
        let what = json!({"device": label, "model": name, "b": b, "t": args.prompt});
        let flops = forward_flops(&cfg, b * args.prompt, args.prompt)
            + args.new_tokens as f64 * forward_flops(&cfg, b, args.prompt + args.new_tokens);
        // Four variants, one warm-up and the repeats each.
        let estimate = budget.estimate(flops) * 4.0 * (1 + args.repeats) as f64;
        if b == 0 || estimate > args.budget {
            let why = match b {
                0 => "a batch of 0 sequences".to_string(),
                _ => format!("about {estimate:.0} s at this device's rate (--budget)"),
            };
            super::step::skip(&report, "infer", what, &why);
            continue;
        }
        for variant in ["base", "unmerged", "merged", "mixed"] {
            let mut bank = None;
            match variant {
                "unmerged" => lora.attach(&mut model)?,
                "merged" => {
                    lora.merge(&model)?;
                }
                "mixed" => {
                    let mut bk = AdapterBank::new(&model);
                    bk.insert("a", &lora)?;
                    bk.insert("b", &other)?;
                    bk.attach(&mut model)?;
                    let names = [Some("a"), Some("b"), None];
                    let routes: Vec<Option<&str>> = (0..b).map(|i| names[i % 3]).collect();
                    bk.route(&routes)?;
                    bank = Some(bk);
                }
                _ => {}
            }
            let timing = measure(&model, device, b, args);
            // Leave the model as it was before this variant, whatever happened.
            match variant {
                "merged" => {
                    lora.unmerge(&model)?;
                    lora.detach(&mut model)?;
                }
                "mixed" => {
                    if let Some(mut bk) = bank {
                        bk.detach(&mut model)?;
                    }
                }
                _ => {}
            }
            let timing = timing?;
            budget.observe(flops, timing.prefill + timing.decode);
            let per_token = timing.decode / args.new_tokens as f64;
            let mut v = what.clone();
            v["bench"] = json!("infer");
            v["variant"] = json!(variant);
            v["new_tokens"] = json!(args.new_tokens);
            v["prefill_ms"] = json!(timing.prefill * 1e3);
            v["prompt_tokens_per_s"] = json!((b * args.prompt) as f64 / timing.prefill);
            v["ms_per_token"] = json!(per_token * 1e3);
            v["generated_tokens_per_s"] = json!(b as f64 / per_token);
            report.row(
                v,
                &[
                    variant.to_string(),
                    b.to_string(),
                    f(timing.prefill * 1e3, 1),
                    f((b * args.prompt) as f64 / timing.prefill, 0),
                    f(per_token * 1e3, 2),
                    f(b as f64 / per_token, 1),
                ],
            );
        }
    }
    Ok(())
}
