//! `train finetune --adalora`: AdaLoRA instead of LoRA (see [`lora::adalora`]), with the
//! options of PEFT's `AdaLoraConfig`; `total_step` is the run's step count.
//!
//! ```text
//! train finetune --adalora --init-r 12 --target-r 8 --tinit 0 --tfinal 0 --delta-t 1
//!                --beta1 0.85 --beta2 0.85 --orth-reg-weight 0.5 [--alpha 16 --targets c_attn ...]
//! ```

use clap::Args;
use lora::{AdaLoraConfig, AdaLoraSchedule, Target};

/// AdaLoRA's options (PEFT's `AdaLoraConfig` names).
#[derive(Args, Debug, Clone)]
pub struct AdaLoraArgs {
    /// Train AdaLoRA (SVD-form updates, rank allocated by importance) instead of LoRA; saves
    /// a PEFT ADALORA adapter. --alpha is its lora_alpha and --targets its whole Linears.
    #[arg(long, conflicts_with = "full")]
    pub adalora: bool,
    /// Initial rank of every update.
    #[arg(long, default_value_t = 12, requires = "adalora")]
    pub init_r: usize,
    /// Target average rank at the end.
    #[arg(long, default_value_t = 8, requires = "adalora")]
    pub target_r: usize,
    /// Steps of warm-up before any pruning.
    #[arg(long, default_value_t = 0, requires = "adalora")]
    pub tinit: usize,
    /// Steps at the end with the final rank pattern fixed.
    #[arg(long, default_value_t = 0, requires = "adalora")]
    pub tfinal: usize,
    /// Steps between two budget allocations (PEFT's deltaT).
    #[arg(long, default_value_t = 1, requires = "adalora")]
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    #[arg(long, default_value_t = 0.85, requires = "adalora")]
    pub beta1: f32,
    /// EMA factor of the uncertainty.
    #[arg(long, default_value_t = 0.85, requires = "adalora")]
    pub beta2: f32,
    /// Weight of the orthogonal regularizer of P and Q.
    #[arg(long, default_value_t = 0.5, requires = "adalora")]
    pub orth_reg_weight: f32,
}

impl AdaLoraArgs {
    /// The config for `targets` (whole Linears only), α `alpha`, a run of `total_step` steps.
    pub fn config(
        &self,
        targets: &[String],
        alpha: f32,
        total_step: usize,
    ) -> crate::Result<AdaLoraConfig> {
        let mut modules = Vec::new();
        for name in targets {
            let t = Target::parse(name)?;
            if matches!(t, Target::Q | Target::K | Target::V) {
                let message = format!(
                    "--targets {name}: AdaLoRA adapts whole Linears (c_attn, o, fc, proj), \
                     not a slice of c_attn"
                );
                return Err(message.into());
            }
            modules.push(t.module());
        }
        if !(self.orth_reg_weight >= 0.0 && self.orth_reg_weight.is_finite()) {
            let w = self.orth_reg_weight;
            return Err(format!("--orth-reg-weight {w}: it must be 0 or more").into());
        }
        modules.sort();
        modules.dedup();
        Ok(AdaLoraConfig {
            init_r: self.init_r,
            target_r: self.target_r,
            lora_alpha: alpha,
            modules,
            orth_reg_weight: self.orth_reg_weight,
            schedule: AdaLoraSchedule {
                tinit: self.tinit,
                tfinal: self.tfinal,
                delta_t: self.delta_t,
                beta1: self.beta1,
                beta2: self.beta2,
                total_step,
            },
        })
    }
}
