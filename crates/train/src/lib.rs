//! # train: the program people run
//!
//! The top layer: the default run ([`main_job`]: LoRA against full fine-tuning on E2E NLG, with
//! BLEU and slot accuracy) and the subcommands [`pretrain`], `finetune` ([`finetune_cmd`]), [`generate`],
//! [`merge`], [`eval`], [`analyze`], [`serve`](mod@serve), [`bench`](mod@bench) and [`devices`].
//!
//! - A training step is [`trainer::step`]; runs record [`metrics`] and save a [`checkpoint`]
//!   that resumes them exactly.
//! - Data: [`e2e`] (the E2E NLG split and examples) or [`finetune_data`] (text, JSONL, E2E
//!   files), made into [`batch`]es drawn in a seeded order ([`batch::Batches`]).
//! - The default run: [`finetune::train_e2e`] and [`finetune::score_heldout`] (with [`bleu`] and [`slots`]),
//!   [`latency`] (the merged-adapter check), [`report`] (table and run directory) and
//!   [`loss_plot`] (`loss.svg`).
//! - [`runtime_dir`]: the environment Mesa's Vulkan layer wants, set up before wgpu starts.
//!
//! All logic lives in this library so that integration tests run exactly what the binary runs;
//! `main.rs` only parses arguments.

pub mod analyze;
pub mod batch;
pub mod bench;
pub mod bleu;
pub mod checkpoint;
pub mod combine;
pub mod devices;
pub mod e2e;
pub mod eval;
pub mod finetune;
pub mod finetune_cmd;
pub mod finetune_data;
pub mod generate;
pub mod hub;
pub mod latency;
pub mod loss_plot;
pub mod main_job;
pub mod merge;
pub mod metrics;
pub mod pretrain;
pub mod quantize;
pub mod report;
pub mod runtime_dir;
pub mod serve;
pub mod slots;
pub mod trainer;

use std::path::Path;

use tensor::Device;
use transformer::{Checkpoint, Gpt2, GptConfig, Tokenizer};

/// Errors of the binary: any layer's error, printed as its message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// The tokenizer of the model in `dir` ([`Tokenizer::for_model`]), saying on stderr which one it
/// is: the directory's own files, or a built-in one.
pub fn model_tokenizer(dir: &Path, config: &GptConfig) -> Result<Tokenizer> {
    let tokenizer = Tokenizer::for_model(dir, config)?;
    eprintln!("note: tokenizer: {}", tokenizer.describe());
    Ok(tokenizer)
}

/// Load a model directory onto `device`, every parameter trainable or every one frozen.
pub fn load_model(dir: &Path, device: &Device, trainable: bool) -> Result<Gpt2> {
    let ckpt = Checkpoint::load(dir)?;
    Ok(Gpt2::from_checkpoint(&ckpt, device, trainable)?)
}

/// Load a model directory onto `device` with every parameter frozen, its Linear weights
/// quantized on the host first when `quantize` asks (a directory saved in NF4 is NF4 anyway).
pub fn load_frozen(dir: &Path, device: &Device, quantize: quantize::QuantizeArgs) -> Result<Gpt2> {
    let mut ckpt = Checkpoint::load(dir)?;
    quantize.apply(&mut ckpt)?;
    let mut model = Gpt2::from_checkpoint(&ckpt, device, false)?;
    quantize.store(&mut model)?;
    Ok(model)
}

/// Copies the tokenizer files of model directory `from` that exist (`vocab.json`,
/// `merges.txt`, `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) into
/// `to`, so a model written from it keeps its tokenizer.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    let names = [
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ];
    for name in names {
        let src = from.join(name);
        if src.exists() {
            std::fs::copy(&src, to.join(name)).map_err(|e| format!("{}: {e}", src.display()))?;
        }
    }
    Ok(())
}

/// Load a frozen model, quantized as `quantize` says, and, if given, attach a LoRA adapter
/// saved in PEFT's layout (ours or one PEFT wrote). Warnings about config keys we do not use
/// are printed to stderr.
pub fn load_with_adapter(
    dir: &Path,
    adapter: Option<&Path>,
    device: &Device,
    quantize: quantize::QuantizeArgs,
) -> Result<(Gpt2, Option<lora::LoraModel>)> {
    let mut model = load_frozen(dir, device, quantize)?;
    let Some(adapter) = adapter else {
        return Ok((model, None));
    };
    let loaded = lora::LoraModel::load_peft(adapter, &model)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let mut lora = loaded.lora;
    lora.attach(&mut model)?;
    Ok((model, Some(lora)))
}
