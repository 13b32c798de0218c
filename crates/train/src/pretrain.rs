//! `train pretrain`: train a small GPT-2 from scratch with this engine.
//!
//! The project's shipped base model (`models/base`) was made by this command's defaults
//! (`train pretrain --out models/base`, 11.5 minutes on 2 cores): a byte-level BPE of 4,096
//! tokens learned on the training text ([`transformer::train_bpe`]), 4 layers, 4 heads, width
//! 128, 128 positions (1.33 M parameters); 1,500 steps of 16 windows of 129 tokens drawn half
//! from the first 90 % of Tiny Shakespeare and half from the E2E training references (no
//! meaning representations, nothing held out), the references of one MR next to each other;
//! AdamW at 2e-3, 60 warm-up steps then cosine decay to 10 %.
//!
//! Why each choice (measured on the E2E default run, `docs/benchmarks.md`):
//! - Without the in-domain sentences the base knows no restaurant words and LoRA on E2E learns
//!   next to nothing.
//! - GPT-2's 50,257-token vocabulary made the embedding 6.4 M of a 7.2 M-parameter model and the
//!   output layer most of a fine-tuning step; 4,096 tokens learned on this corpus encode it in
//!   about as many tokens, so the same compute trains a model whose parameters are in its body.
//! - Grouped references repeat a restaurant's name and food from sentence to sentence: the base
//!   learns to copy them from its context, which fine-tuning then points at the MR.

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
    /// The E2E references' order in their stream: `grouped` puts the references of one MR next
    /// to each other (so the text repeats a restaurant's name and food from sentence to
    /// sentence), `shuffled` orders every reference at random.
    #[arg(long, value_enum, default_value_t = E2eOrder::Grouped)]
    pub e2e_order: E2eOrder,
    /// Vocabulary: 0 uses GPT-2's 50,257 tokens; N > 0 learns a byte-level BPE of N tokens on
    /// the training text (the general text's first 90 %, the E2E training MRs and references)
    /// and saves it beside the model as `vocab.json` + `merges.txt`.
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    /// Context length (positions) of the model and of the training windows.
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    #[arg(long, default_value_t = 1500)]
    pub steps: u32,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 60)]
    pub warmup: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Store the weights in f16 (half the file; the model still computes in f32).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub f16: bool,
}

/// How the E2E references follow each other in the pretraining stream.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum E2eOrder {
    Grouped,
    Shuffled,
}

/// Token streams to draw windows from.
struct Corpus {
    train_text: Vec<u32>,
    val_text: Vec<u32>,
    e2e: Vec<u32>,
}

fn corpus(args: &PretrainArgs, tok: &Tokenizer, rng: &mut StdRng) -> crate::Result<Corpus> {
    let text = read_text(args)?;
    let ids = tok.encode(&text);
    let cut = ids.len() * 9 / 10;
    let (train_text, val_text) = (ids[..cut].to_vec(), ids[cut..].to_vec());
    let mut e2e = Vec::new();
    if !args.e2e.is_empty() {
        let data = crate::e2e::E2eData::load(&args.e2e)?;
        let mut groups = match args.e2e_order {
            E2eOrder::Grouped => data.train_references_by_mr(),
            E2eOrder::Shuffled => {
                let mut refs = data.train_references();
                refs.sort_unstable();
                refs.dedup();
                refs.into_iter().map(|r| vec![r]).collect()
            }
        };
        groups.shuffle(rng);
        let eot = tok.eot().unwrap_or(b'\n' as u32);
        for r in groups.into_iter().flatten() {
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

fn read_text(args: &PretrainArgs) -> crate::Result<String> {
    std::fs::read_to_string(&args.text).map_err(|e| format!("{}: {e}", args.text.display()).into())
}

/// The tokenizer to pretrain with: GPT-2's, or (`--vocab N`) a BPE learned on the training
/// text and saved in `args.out`.
fn tokenizer(args: &PretrainArgs) -> crate::Result<Tokenizer> {
    if args.vocab == 0 {
        return Ok(Tokenizer::gpt2());
    }
    let text = read_text(args)?;
    // The general text's training part, cut at the same byte share as the token streams.
    let mut cut = text.len() * 9 / 10;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut texts = vec![text[..cut].to_string()];
    if !args.e2e.is_empty() {
        let data = crate::e2e::E2eData::load(&args.e2e)?;
        for (mr, r) in data.train_pairs() {
            texts.push(format!("{mr} || {r}"));
        }
    }
    let n = transformer::train_bpe(texts.iter(), args.vocab, &args.out)?;
    let tok = Tokenizer::from_dir(&args.out)?.ok_or("the BPE files were not written")?;
    println!(
        "learned a byte-level BPE of {n} tokens; saved {}",
        args.out.join("vocab.json").display()
    );
    Ok(tok)
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
    let tok = tokenizer(args)?;
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
    finish_config(&args.out, (args.vocab > 0).then(|| tok.eot()).flatten())?;
    println!(
        "{} steps in {secs:.1} s ({:.0} tokens/s); final training loss {last:.3}, validation loss {val:.3}; saved {}",
        args.steps,
        (args.steps as usize * args.batch * args.ctx) as f64 / secs,
        args.out.display()
    );
    Ok(())
}

/// Say in `dir/config.json` what `transformers` would otherwise assume wrongly of this model:
/// it was trained without dropout (`transformers` defaults `resid_pdrop`, `embd_pdrop` and
/// `attn_pdrop` to 0.1, so fine-tuning it there would silently add dropout), and, for a learned
/// vocabulary, its `<|endoftext|>` id as `bos_token_id` and `eos_token_id`, the token
/// `generate` stops at.
fn finish_config(dir: &std::path::Path, eot: Option<u32>) -> crate::Result<()> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)?;
    for key in ["resid_pdrop", "embd_pdrop", "attn_pdrop"] {
        config[key] = 0.0.into();
    }
    if let Some(eot) = eot {
        config["bos_token_id"] = eot.into();
        config["eos_token_id"] = eot.into();
    }
    let text = serde_json::to_string_pretty(&config)? + "\n";
    transformer::tensor_file::write_file_atomically(&path, text.as_bytes())?;
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
