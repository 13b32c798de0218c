//! `--quantize nf4`: QLoRA's frozen base. The weights of every block's four Linears are stored
//! in 4-bit NormalFloat as bitsandbytes stores them ([`transformer::Gpt2::quantize_nf4`]), about
//! an eighth of their f32 bytes; embeddings, layer norms, biases and the adapters stay f32.

use clap::{Args, ValueEnum};
use transformer::Gpt2;

/// How the frozen base is stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Quantization {
    /// f32, as loaded.
    #[default]
    None,
    /// 4-bit NormalFloat in blocks of 64 (QLoRA, bitsandbytes' `nf4`).
    Nf4,
}

/// The flags of every command that runs a frozen base.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct QuantizeArgs {
    /// Store the base's Linear weights in 4 bits (`nf4`: QLoRA's NormalFloat, as bitsandbytes
    /// stores it; products dequantize on the fly). Only with a frozen base (LoRA, eval,
    /// generate); merging, DoRA and PiSSA/OLoRA need the f32 base and are refused with it.
    #[arg(long, value_enum, default_value = "none")]
    pub quantize: Quantization,
    /// With --quantize nf4: also quantize the block scales to 8 bits (bitsandbytes'
    /// `bnb_4bit_use_double_quant`), about 0.4 bit less per weight.
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
}

impl QuantizeArgs {
    /// Quantizes `model`'s Linears as asked (nothing for `none`), saying so on stderr with the
    /// bytes before and after.
    pub fn apply(&self, model: &mut Gpt2) -> crate::Result<()> {
        if self.quantize == Quantization::None {
            if self.double_quant {
                return Err("--double-quant needs --quantize nf4".into());
            }
            return Ok(());
        }
        let before: u64 = model.linears().map(|l| 4 * l.weight.numel() as u64).sum();
        model.quantize_nf4(self.double_quant)?;
        let after: u64 = model
            .linears()
            .map(|l| match &l.weight {
                transformer::Weight::Nf4(q) => q.codes.bytes(),
                transformer::Weight::Dense(p) => p.value().bytes(),
            })
            .sum();
        eprintln!(
            "note: base Linear weights in NF4{}: {:.1} MB instead of {:.1} MB in f32",
            if self.double_quant {
                " (double quantization)"
            } else {
                ""
            },
            after as f64 / 1e6,
            before as f64 / 1e6
        );
        Ok(())
    }

    /// The run-identity entry (None for f32), so a resumed run repeats it.
    pub fn identity(&self) -> Option<serde_json::Value> {
        (self.quantize != Quantization::None)
            .then(|| serde_json::json!({"nf4": true, "double_quant": self.double_quant}))
    }
}
