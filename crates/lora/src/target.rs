//! Where an update goes: the four Linears of a GPT-2 block ([`Module`]) and the targets a
//! [`crate::LoraConfig`] names ([`Target`]): a whole Linear, or the q, k or v column block of the
//! fused `c_attn`.

use transformer::GptConfig;
use transformer::model::{Block, Linear};

use crate::error::{Error, Result};

/// A Linear (Conv1D, `y = x·W + b`, W: (in, out)) of a GPT-2 block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    /// `attn.c_attn`: (C, 3C), q, k, v fused.
    CAttn,
    /// `attn.c_proj`: (C, C), heads back into the residual stream.
    AttnProj,
    /// `mlp.c_fc`: (C, F), F the MLP's width (`n_inner`, 4C unless the config says otherwise).
    Fc,
    /// `mlp.c_proj`: (F, C).
    MlpProj,
}

impl Module {
    pub const ALL: [Module; 4] = [Module::CAttn, Module::AttnProj, Module::Fc, Module::MlpProj];

    /// The module's path inside block `h.{i}`, as Hugging Face names it.
    pub fn path(self) -> &'static str {
        match self {
            Module::CAttn => "attn.c_attn",
            Module::AttnProj => "attn.c_proj",
            Module::Fc => "mlp.c_fc",
            Module::MlpProj => "mlp.c_proj",
        }
    }

    /// (in, out) of W in a model of config `gpt`: C = `n_embd`, F = its MLP width
    /// ([`GptConfig::inner_size`]).
    pub fn shape(self, gpt: &GptConfig) -> (usize, usize) {
        let (c, f) = (gpt.n_embd, gpt.inner_size());
        match self {
            Module::CAttn => (c, 3 * c),
            Module::AttnProj => (c, c),
            Module::Fc => (c, f),
            Module::MlpProj => (f, c),
        }
    }

    pub fn linear(self, block: &Block) -> &Linear {
        match self {
            Module::CAttn => &block.c_attn,
            Module::AttnProj => &block.attn_c_proj,
            Module::Fc => &block.c_fc,
            Module::MlpProj => &block.mlp_c_proj,
        }
    }

    pub fn linear_mut(self, block: &mut Block) -> &mut Linear {
        match self {
            Module::CAttn => &mut block.c_attn,
            Module::AttnProj => &mut block.attn_c_proj,
            Module::Fc => &mut block.c_fc,
            Module::MlpProj => &mut block.mlp_c_proj,
        }
    }
}

/// Where a LoRA update goes: a whole Linear, or one of the q, k, v column blocks of `c_attn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Columns [0, C) of `c_attn`: the queries.
    Q,
    /// Columns [C, 2C) of `c_attn`: the keys.
    K,
    /// Columns [2C, 3C) of `c_attn`: the values.
    V,
    /// All of `c_attn` (PEFT's default for GPT-2).
    CAttn,
    /// `attn.c_proj`, the attention output.
    O,
    /// `mlp.c_fc`.
    Fc,
    /// `mlp.c_proj`.
    Proj,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::CAttn,
        Target::O,
        Target::Fc,
        Target::Proj,
    ];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::CAttn => "c_attn",
            Target::O => "o",
            Target::Fc => "fc",
            Target::Proj => "proj",
        }
    }

    /// Parses a target name (`q`, `k`, `v`, `c_attn`, `o`, `fc`, `proj`).
    pub fn parse(name: &str) -> Result<Target> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
                Error::config(format!(
                    "unknown target `{name}`; known: {}",
                    known.join(", ")
                ))
            })
    }

    pub fn module(self) -> Module {
        match self {
            Target::Q | Target::K | Target::V | Target::CAttn => Module::CAttn,
            Target::O => Module::AttnProj,
            Target::Fc => Module::Fc,
            Target::Proj => Module::MlpProj,
        }
    }

    /// Whether the target is a column block (q, k or v) of `c_attn` rather than a whole Linear.
    pub fn is_slice(self) -> bool {
        matches!(self, Target::Q | Target::K | Target::V)
    }

    /// The columns of the module's output this target adds into, in a model of config `gpt`:
    /// (first, width).
    pub fn columns(self, gpt: &GptConfig) -> (usize, usize) {
        let c = gpt.n_embd;
        match self {
            Target::Q => (0, c),
            Target::K => (c, c),
            Target::V => (2 * c, c),
            _ => (0, self.module().shape(gpt).1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_column_blocks_of_c_attn() {
        let mut gpt = GptConfig::gpt2_small();
        gpt.n_embd = 64;
        assert_eq!(Target::Q.columns(&gpt), (0, 64));
        assert_eq!(Target::K.columns(&gpt), (64, 64));
        assert_eq!(Target::V.columns(&gpt), (128, 64));
        assert_eq!(Target::CAttn.columns(&gpt), (0, 192));
        assert_eq!(Target::Proj.module().shape(&gpt), (256, 64));
        assert!(Target::V.is_slice() && !Target::CAttn.is_slice());
    }

    #[test]
    fn the_mlp_is_as_wide_as_n_inner() {
        let mut gpt = GptConfig::gpt2_small();
        gpt.n_embd = 8;
        gpt.variant.n_inner = Some(20);
        assert_eq!(Module::Fc.shape(&gpt), (8, 20));
        assert_eq!(Module::MlpProj.shape(&gpt), (20, 8));
        assert_eq!(Target::Fc.columns(&gpt), (0, 20));
        assert_eq!(Target::CAttn.columns(&gpt), (0, 24));
    }
}
