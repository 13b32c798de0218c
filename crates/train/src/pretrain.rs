//! `train pretrain`: train a small GPT-2 from scratch with this engine.
//!
//! The project's shipped base model (`models/base`) was made by this command's defaults: GPT-2's
//! BPE tokenizer, 4 layers, 4 heads, width 128, 128 positions; windows of 129 tokens drawn half
//! from the first 90 % of Tiny Shakespeare and half from the sentences of the E2E training
//! references (no meaning representations, nothing held out); AdamW, warm-up then cosine decay
//! to 10 %. Without the in-domain sentences the base knows no restaurant words and LoRA on E2E
//! learns next to nothing.

use std::path::PathBuf;

use autograd::{AdamW, ParamGroup, Schedule};
use clap::Args;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tensor::Device;
use transformer::{Gpt2, GptConfig, SaveDtype, Tokenizer, TokenizerKind, init_checkpoint};

use crate::batch::Batch;
use crate::metrics::{Metrics, progress};
use crate::trainer::{NonFinite, OptimConfig, step};

/// Options of `train pretrain`.
#[derive(Args, Debug, Clone)]
pub struct PretrainArgs {
    /// Where to write the model directory (config.json + model.safetensors).
    #[arg(long, default_value = "models/base")]
    pub out: PathBuf,
    /// Text file: the general-domain corpus (its last 10 % is held out for the validation loss).
    #[arg(long, default_value = "data/tinyshakespeare.txt")]
    pub text: PathBuf,
    /// E2E data directory whose training references are mixed in (empty string: none).
    #[arg(long, default_value = "data/e2e")]
    pub e2e: String,
    /// Fraction of windows drawn from the E2E references.
    #[arg(long, default_value_t = 0.5)]
    pub mix: f64,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    /// Context length (positions) of the model and of the training windows.
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    #[arg(long, default_value_t = 300)]
    pub steps: u32,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 30)]
    pub warmup: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Store the weights in f16 (half the file; the model still computes in f32).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub f16: bool,
}

/// Token streams to draw windows from.
struct Corpus {
    train_text: Vec<u32>,
    val_text: Vec<u32>,
    e2e: Vec<u32>,
}

fn corpus(args: &PretrainArgs, tok: &Tokenizer, rng: &mut StdRng) -> crate::Result<Corpus> {
    let text =
        std::fs::read_to_string(&args.text).map_err(|e| format!("{}: {e}", args.text.display()))?;
    let ids = tok.encode(&text);
    let cut = ids.len() * 9 / 10;
    let (train_text, val_text) = (ids[..cut].to_vec(), ids[cut..].to_vec());
    let mut e2e = Vec::new();
    if !args.e2e.is_empty() {
        let data = crate::e2e::E2eData::load(&args.e2e)?;
        let mut refs: Vec<&str> = data.train_references();
        refs.sort_unstable();
        refs.dedup();
        refs.shuffle(rng);
        let eot = tok.eot().unwrap_or(b'\n' as u32);
        for r in refs {
            e2e.extend(tok.encode(&format!(" {r}")));
            e2e.push(eot);
        }
    }
    let need = args.ctx + 2;
    if train_text.len() < need || val_text.len() < need {
        return Err(format!(
            "{}: too short for windows of {} tokens",
            args.text.display(),
            args.ctx + 1
        )
        .into());
    }
    Ok(Corpus {
        train_text,
        val_text,
        e2e,
    })
}

/// B random windows of T + 1 tokens: inputs and next-token targets, every position counted.
fn sample(c: &Corpus, b: usize, t: usize, mix: f64, rng: &mut StdRng) -> Batch {
    let mut batch = Batch {
        ids: vec![],
        targets: vec![],
        weights: vec![],
        b,
        t,
        lengths: vec![t; b],
    };
    for _ in 0..b {
        let src = if !c.e2e.is_empty() && c.e2e.len() > t + 1 && rng.random_bool(mix) {
            &c.e2e
        } else {
            &c.train_text
        };
        let start = rng.random_range(0..src.len() - t - 1);
        batch.ids.extend_from_slice(&src[start..start + t]);
        batch
            .targets
            .extend_from_slice(&src[start + 1..start + t + 1]);
        batch.weights.extend(std::iter::repeat_n(1.0, t));
    }
    batch
}

/// `train pretrain`.
pub fn run(args: &PretrainArgs, device: &Device) -> crate::Result<()> {
    let tok = Tokenizer::gpt2();
    let cfg = GptConfig {
        n_layer: args.layers,
        n_head: args.heads,
        n_embd: args.width,
        vocab_size: tok.vocab_size(),
        n_positions: args.ctx,
        layer_norm_epsilon: 1e-5,
        tokenizer: TokenizerKind::Gpt2,
        variant: Default::default(),
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let corpus = corpus(args, &tok, &mut rng)?;
    let model = Gpt2::from_checkpoint(&init_checkpoint(&cfg, args.seed)?, device, true)?;
    println!(
        "pretraining a GPT-2 of {} parameters (L {} NH {} C {} T {} V {}) on {} + {} tokens",
        model.num_params(),
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.n_positions,
        cfg.vocab_size,
        corpus.train_text.len(),
        corpus.e2e.len()
    );
    let params: Vec<_> = model
        .named_params()
        .into_iter()
        .filter_map(|p| p.as_trainable().cloned())
        .collect();
    let mut opt = AdamW::new(vec![ParamGroup::new(params, 0.01)]);
    let optim = OptimConfig {
        lr: args.lr,
        schedule: Schedule::WarmupCosine {
            warmup: args.warmup,
            total: args.steps,
            min_ratio: 0.1,
        },
        clip: 1.0,
    };
    let mut metrics = Metrics::create(&args.out.join("pretrain_metrics.jsonl"))?;
    let bar = progress(args.steps as u64, "pretrain");
    let start = std::time::Instant::now();
    let mut last = f32::NAN;
    for i in 0..args.steps {
        let batch = sample(&corpus, args.batch, args.ctx, args.mix, &mut rng);
        let s = step(&model, &mut opt, std::slice::from_ref(&batch), &optim, i)?
            .map_err(NonFinite::stop)?;
        last = s.loss;
        let tps = (batch.b * batch.t) as f64 / s.seconds;
        bar.set_message(format!("loss {:.3} {:.0} tok/s", s.loss, tps));
        bar.inc(1);
        metrics.write(serde_json::json!({"step": i + 1, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm, "tokens_per_s": tps}))?;
    }
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    let val = val_loss(&model, &corpus, args.ctx)?;
    let ckpt = model.to_checkpoint()?;
    ckpt.save_as(
        &args.out,
        if args.f16 {
            SaveDtype::F16
        } else {
            SaveDtype::F32
        },
    )?;
    println!(
        "{} steps in {secs:.1} s ({:.0} tokens/s); final training loss {last:.3}, validation loss {val:.3}; saved {}",
        args.steps,
        (args.steps as usize * args.batch * args.ctx) as f64 / secs,
        args.out.display()
    );
    Ok(())
}

/// Mean loss over up to 16 consecutive windows of the held-out text.
fn val_loss(model: &Gpt2, c: &Corpus, t: usize) -> crate::Result<f32> {
    let windows = ((c.val_text.len() - 1) / t).min(16);
    let mut batch = Batch {
        ids: vec![],
        targets: vec![],
        weights: vec![],
        b: windows,
        t,
        lengths: vec![t; windows],
    };
    for w in 0..windows {
        batch.ids.extend_from_slice(&c.val_text[w * t..(w + 1) * t]);
        batch
            .targets
            .extend_from_slice(&c.val_text[w * t + 1..(w + 1) * t + 1]);
        batch.weights.extend(std::iter::repeat_n(1.0, t));
    }
    let tape = autograd::Tape::inference();
    let loss = model.loss(
        &tape,
        &batch.ids,
        &batch.targets,
        &batch.weights,
        batch.b,
        t,
    )?;
    Ok(loss.value.to_vec()?[0])
}
