//! How the frozen base is stored: QLoRA's 4 bits (`--quantize nf4`) or half precision
//! (`--precision f16`), flags of the commands that run a frozen base; and `train quantize`, which
//! writes a quantized model directory.
//!
//! The weights of every block's four Linears are stored in 4-bit NormalFloat as bitsandbytes
//! stores them ([`transformer::Checkpoint::quantize_nf4`]), about an eighth of their f32 bytes;
//! embeddings, layer norms, biases and the adapters stay f32. Quantizing happens on the host
//! before the model is built, so no f32 copy of those weights ever reaches the device. A model
//! directory that is already quantized (bitsandbytes' layout, with `quantization_config` in
//! `config.json`: what `train quantize` and `transformers`' `save_pretrained` write) loads as
//! it is with any `--model`.

use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};
use transformer::Checkpoint;

/// How the frozen base is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Quantization {
    /// As loaded: f32, or NF4 for a directory saved quantized.
    #[default]
    None,
    /// 4-bit NormalFloat in blocks of 64 (QLoRA, bitsandbytes' `nf4`).
    Nf4,
}

/// The precision the frozen base's Linear weights are stored in on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    /// 4 bytes a weight.
    #[default]
    F32,
    /// 2 bytes a weight, each rounded to the nearest f16; products still sum in f32.
    F16,
}

/// The flags of every command that runs a frozen base.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct QuantizeArgs {
    /// Store the base's Linear weights in 4 bits (`nf4`: QLoRA's NormalFloat, as bitsandbytes
    /// stores it; products dequantize on the fly). Only with a frozen base (LoRA, eval,
    /// generate, serve); merging, DoRA and PiSSA/OLoRA need the f32 base and are refused with
    /// it. A model directory saved quantized (`train quantize`) is NF4 without this flag.
    #[arg(long, value_enum, default_value = "none")]
    pub quantize: Quantization,
    /// With --quantize nf4: also quantize the block scales to 8 bits (bitsandbytes'
    /// `bnb_4bit_use_double_quant`), about 0.4 bit less per weight.
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
    /// Store the frozen base's Linear weights in f16 (`f16`: half their bytes, each value
    /// rounded to the nearest f16, every product still summed in f32; any GPU adapter, and the
    /// CPU) or as loaded (`f32`). In training, f16 also keeps the activations saved for the
    /// backward pass in f16 (about half a step's memory; the forward values and every sum stay
    /// f32). Adapters, embeddings, layer norms and biases stay f32, as do the optimizer's state
    /// and gradients. Only with a frozen base (not --full, not with
    /// --quantize nf4); merging and DoRA need the f32 base and are refused with it. Adapters
    /// trained this way are ordinary f32 adapters.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
}

impl QuantizeArgs {
    /// Quantizes the Linear weights of `ckpt` as asked (nothing for `none`), on the host, saying
    /// so on stderr with the bytes before and after.
    pub fn apply(&self, ckpt: &mut Checkpoint) -> crate::Result<()> {
        let Some(double_quant) = self.nf4()? else {
            return Ok(());
        };
        if ckpt.is_quantized() {
            eprintln!("note: the model is already stored in NF4; --quantize changes nothing");
            return Ok(());
        }
        let before = linear_bytes(ckpt);
        ckpt.quantize_nf4(double_quant)?;
        eprintln!(
            "note: base Linear weights in NF4{}: {:.1} MB instead of {:.1} MB in f32",
            if double_quant {
                " (double quantization)"
            } else {
                ""
            },
            linear_bytes(ckpt) as f64 / 1e6,
            before as f64 / 1e6
        );
        Ok(())
    }

    /// `Some(double quantization)` for NF4, None for as-loaded.
    pub fn nf4(&self) -> crate::Result<Option<bool>> {
        if self.quantize != Quantization::None && self.precision == Precision::F16 {
            return Err(
                "--quantize nf4 and --precision f16 both say how the frozen base is \
                        stored: pick one"
                    .into(),
            );
        }
        match self.quantize {
            Quantization::None if self.double_quant => {
                Err("--double-quant needs --quantize nf4".into())
            }
            Quantization::None => Ok(None),
            Quantization::Nf4 => Ok(Some(self.double_quant)),
        }
    }

    /// The run-identity entry (None for f32), so a resumed run repeats it.
    pub fn identity(&self) -> Option<serde_json::Value> {
        if self.precision == Precision::F16 {
            return Some(serde_json::json!({"f16": true}));
        }
        (self.quantize != Quantization::None)
            .then(|| serde_json::json!({"nf4": true, "double_quant": self.double_quant}))
    }

    /// Whether the base is stored in a form merging cannot write into (NF4 or f16): `Some` of
    /// its name, e.g. for "the base is in NF4".
    pub fn compact_base(&self, ckpt_is_quantized: bool) -> Option<&'static str> {
        if self.precision == Precision::F16 {
            Some("f16")
        } else if self.quantize != Quantization::None || ckpt_is_quantized {
            Some("NF4")
        } else {
            None
        }
    }

    /// After the model is built from a checkpoint [`QuantizeArgs::apply`] saw (which refused
    /// `--precision f16` with `--quantize nf4`), and any adapter attached: with `--precision
    /// f16`, stores its frozen Linear weights in f16, saying so on stderr with the bytes before
    /// and after.
    pub fn store(&self, model: &mut transformer::Gpt2) -> crate::Result<()> {
        if self.precision != Precision::F16 {
            return Ok(());
        }
        let (before, after) = model.store_frozen_linears_in_f16()?;
        eprintln!(
            "note: base Linear weights in f16: {:.1} MB instead of {:.1} MB",
            after as f64 / 1e6,
            before as f64 / 1e6
        );
        Ok(())
    }
}

/// Bytes of the blocks' Linear weights: 4 per value in f32, [`tensor::quant::Nf4Weight::storage_bytes`]
/// in NF4.
pub fn linear_bytes(ckpt: &Checkpoint) -> u64 {
    let dense: usize = ckpt
        .tensors
        .iter()
        .filter(|(name, _, _)| transformer::checkpoint::is_block_linear_weight(name))
        .map(|(_, _, v)| 4 * v.len())
        .sum();
    let nf4: usize = ckpt.nf4.values().map(|w| w.storage_bytes()).sum();
    (dense + nf4) as u64
}

/// Options of `train quantize`.
#[derive(Parser, Debug, Clone)]
pub struct QuantizeCmdArgs {
    /// The f32 (or f16/bf16) model directory to quantize.
    /// Or a Hugging Face Hub id, `name` or `org/name`, with `@revision` for a branch, tag or
    /// commit (`org/name@v1`): read from the HF cache ($HF_HUB_CACHE, else $HF_HOME/hub), and
    /// downloaded into it unless HF_HUB_OFFLINE=1. A local path that exists always wins.
    #[arg(long, value_parser = crate::hub::model_dir)]
    pub model: PathBuf,
    /// Where to write the quantized model directory: `model.safetensors` with bitsandbytes'
    /// tensors (`weight` codes, `weight.absmax`, `weight.quant_map`, ...), `config.json` with
    /// its `quantization_config`, and the tokenizer files. `transformers` loads it with
    /// `from_pretrained` (bitsandbytes installed); every `--model` of this program reads it.
    #[arg(long)]
    pub out: PathBuf,
    /// Also quantize the block scales to 8 bits (bitsandbytes' `bnb_4bit_use_double_quant`).
    #[arg(long)]
    pub double_quant: bool,
}

/// `train quantize`.
pub fn run(args: &QuantizeCmdArgs) -> crate::Result<()> {
    let mut ckpt = Checkpoint::load(&args.model)?;
    if ckpt.is_quantized() {
        return Err(format!(
            "{}: the model is already stored in NF4; quantize its f32 original",
            args.model.display()
        )
        .into());
    }
    if args.out.exists() && args.out.canonicalize().ok() == args.model.canonicalize().ok() {
        return Err(
            "--out is the model directory itself: write the quantized model elsewhere".into(),
        );
    }
    let before = linear_bytes(&ckpt);
    ckpt.quantize_nf4(args.double_quant)?;
    ckpt.save(&args.out)?;
    crate::copy_tokenizer_files(&args.model, &args.out)?;
    println!(
        "quantized {} to NF4{}: the Linear weights take {:.2} MB instead of {:.2} MB; wrote {}",
        args.model.display(),
        if args.double_quant {
            " with double quantization"
        } else {
            ""
        },
        linear_bytes(&ckpt) as f64 / 1e6,
        before as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}
