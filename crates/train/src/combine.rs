//! `train combine`: several LoRA adapters of one base made into one adapter, as PEFT's
//! `add_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank,
//! svd_clamp, density, majority_sign_method)` does it for `linear`, `cat`, `svd` and `ties` (the math is [`lora::combine()`]'s), written as a PEFT adapter directory.
//!
//! ```text
//! train combine --model BASE --adapter A1 --weight 0.7 --adapter A2 --weight -0.4 \
//!     --combination cat --out COMBINED
//! ```

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use lora::{Combination, CombineInput, LoraModel};
use serde_json::Value;
use tensor::Device;

/// PEFT's `combination_type`.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum CombinationArg {
    /// A = Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ: equal ranks only; an approximation (cross
    /// terms), PEFT's cheapest.
    Linear,
    /// A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]: exact, rank Σ rᵢ.
    Cat,
    /// The best rank-R fit (SVD) of Σ wᵢsᵢ·Bᵢ·Aᵢ: R = --svd-rank, else the largest rᵢ.
    Svd,
    /// TIES-merging of the A's and of the B's (trim to --density, elect signs, average the
    /// agreeing entries), with linear's weights: equal ranks only.
    Ties,
}

/// PEFT's `majority_sign_method` of `ties`.
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum MajorityArg {
    /// The sign of the sum of the values.
    Total,
    /// The sign most adapters have.
    Frequency,
}

/// Options of `train combine`.
#[derive(Args, Debug, Clone)]
pub struct CombineArgs {
    /// The base model the adapters were trained on (their shapes are checked against it), or a
    /// Hugging Face Hub id (`org/name[@revision]`, as for `eval --model`).
    #[arg(long, value_parser = crate::hub::model_dir)]
    pub model: PathBuf,
    /// An adapter directory (PEFT layout) or Hub id; give it once per adapter, each followed by
    /// its --weight. The first adapter's config is the combined one's (as PEFT copies it).
    #[arg(long, required = true, value_parser = crate::hub::adapter_dir)]
    pub adapter: Vec<PathBuf>,
    /// The weight wᵢ of each --adapter, in the same order (negative weights subtract).
    #[arg(long, required = true, allow_negative_numbers = true)]
    pub weight: Vec<f64>,
    /// How to combine them (PEFT's combination_type).
    #[arg(long, value_enum, default_value = "svd")]
    pub combination: CombinationArg,
    /// The combined rank for svd [default: the largest input rank].
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// For svd: clamp A and B to the given quantile (0, 1] of their entries, as PEFT's
    /// svd_clamp. SVD's signs are not unique, so a clamped result can differ from PEFT's.
    #[arg(long)]
    pub svd_clamp: Option<f64>,
    /// For ties: the fraction of each A's and B's entries kept (the largest in magnitude).
    #[arg(long)]
    pub density: Option<f64>,
    /// For ties: how the sign of each entry is elected.
    #[arg(long, value_enum, default_value = "total")]
    pub majority_sign: MajorityArg,
    /// The directory to write the combined adapter into (adapter_config.json +
    /// adapter_model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// `train combine`.
pub fn run(args: &CombineArgs, device: &Device) -> crate::Result<()> {
    if args.adapter.len() != args.weight.len() {
        return Err(format!(
            "{} --adapter but {} --weight: give one weight per adapter",
            args.adapter.len(),
            args.weight.len()
        )
        .into());
    }
    let how = match args.combination {
        CombinationArg::Linear => Combination::Linear,
        CombinationArg::Cat => Combination::Cat,
        CombinationArg::Svd => Combination::Svd {
            rank: args.svd_rank,
            clamp: args.svd_clamp,
        },
        CombinationArg::Ties => Combination::Ties {
            density: args
                .density
                .ok_or("--combination ties needs --density (the fraction of entries kept)")?,
            majority: match args.majority_sign {
                MajorityArg::Total => lora::combine::MajoritySign::Total,
                MajorityArg::Frequency => lora::combine::MajoritySign::Frequency,
            },
        },
    };
    if how.name() != "ties" && args.density.is_some() {
        return Err("--density is for --combination ties".into());
    }
    if how.name() != "svd" && (args.svd_rank.is_some() || args.svd_clamp.is_some()) {
        return Err("--svd-rank and --svd-clamp are for --combination svd".into());
    }
    let model = crate::load_model(&args.model, device, false)?;
    let mut loras = Vec::new();
    let mut configs = Vec::new();
    for dir in &args.adapter {
        let loaded = LoraModel::load_peft(dir, &model)?;
        for w in &loaded.warnings {
            eprintln!("warning: {}: {w}", dir.display());
        }
        loras.push(loaded.lora);
        let path = dir.join(lora::CONFIG_FILE);
        let text = transformer::tensor_file::read_text(&path, lora::MAX_ADAPTER_CONFIG_BYTES)?;
        let config: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        configs.push(config);
    }
    let inputs: Vec<CombineInput> = loras
        .iter()
        .zip(&configs)
        .zip(&args.weight)
        .map(|((lora, config), &weight)| CombineInput {
            lora,
            config,
            weight,
        })
        .collect();
    let combined = lora::combine(&inputs, how)?;
    combined.save(&args.out)?;
    // What we wrote must load: the same check every other command makes of an adapter.
    LoraModel::load_peft(&args.out, &model)?;
    println!(
        "combined {} adapter(s) ({}) into rank {} over {} Linear(s): wrote {}",
        inputs.len(),
        how.name(),
        combined.rank,
        combined.modules.len(),
        args.out.display()
    );
    Ok(())
}
