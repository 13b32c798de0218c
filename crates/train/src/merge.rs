//! `train merge`: fold a LoRA adapter into its base, W = W0 + (alpha/r)·(B·A)ᵀ, and write the
//! merged model in Hugging Face's layout (config.json + model.safetensors), so `transformers`
//! (or this program) loads it as a plain GPT-2 that costs exactly what the base costs.

use std::path::PathBuf;

use clap::Args;
use tensor::Device;

/// Options of `train merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The base model directory.
    /// Or a Hugging Face Hub id, `name` or `org/name`, with `@revision` for a branch, tag or
    /// commit (`org/name@v1`): read from the HF cache ($HF_HUB_CACHE, else $HF_HOME/hub), and
    /// downloaded into it unless HF_HUB_OFFLINE=1. A local path that exists always wins.
    #[arg(long, value_parser = crate::hub::model_dir)]
    pub model: PathBuf,
    /// The adapter directory (PEFT layout), or a Hub id, as for --model.
    #[arg(long, value_parser = crate::hub::adapter_dir)]
    pub adapter: PathBuf,
    /// Where to write the merged model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Store the merged weights in f16.
    #[arg(long)]
    pub f16: bool,
}

/// `train merge`.
pub fn run(args: &MergeArgs, device: &Device) -> crate::Result<()> {
    let (mut model, lora) =
        crate::load_with_adapter(&args.model, Some(&args.adapter), device, Default::default())?;
    let mut lora = lora.expect("an adapter was given");
    lora.merge(&model)?;
    lora.detach(&mut model)?;
    let dtype = if args.f16 {
        transformer::SaveDtype::F16
    } else {
        transformer::SaveDtype::F32
    };
    model.to_checkpoint()?.save_as(&args.out, dtype)?;
    // The tokenizer files travel with the model when it has them.
    crate::copy_tokenizer_files(&args.model, &args.out)?;
    println!(
        "merged {} into {}: wrote {}",
        args.adapter.display(),
        args.model.display(),
        args.out.display()
    );
    Ok(())
}
