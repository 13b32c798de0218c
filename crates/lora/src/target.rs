//! Where an update goes: the four Linears of a GPT-2 block ([`Module`]) and the targets a
//! [`crate::LoraConfig`] names ([`Target`]): a whole Linear, or the q, k or v column block of the
//! fused `c_attn`.

use transformer::model::{Block, Linear};

use crate::error::{Error, Result};

/// A Linear (Conv1D, `y = x·W + b`, W: (in, out)) of a GPT-2 block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    /// `attn.c_attn`: (C, 3C), q, k, v fused.
    CAttn,
    /// `attn.c_proj`: (C, C), heads back into the residual stream.
    AttnProj,
    /// `mlp.c_fc`: (C, 4C).
    Fc,
    /// `mlp.c_proj`: (4C, C).
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

    /// (in, out) of W for a model of width C.
    pub fn shape(self, c: usize) -> (usize, usize) {
        match self {
            Module::CAttn => (c, 3 * c),
            Module::AttnProj => (c, c),
            Module::Fc => (c, 4 * c),
            Module::MlpProj => (4 * c, c),
        }
    }

    /// out of W given its in (C → 3C, C, 4C; 4C → C).
    pub fn out_features(self, in_features: usize) -> usize {
        match self {
            Module::MlpProj => in_features / 4,
            _ => self.shape(in_features).1,
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

    /// The columns of the module's output this target adds into: (first, width).
    pub fn columns(self, c: usize) -> (usize, usize) {
        match self {
            Target::Q => (0, c),
            Target::K => (c, c),
            Target::V => (2 * c, c),
            _ => (0, self.module().shape(c).1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_column_blocks_of_c_attn() {
        let c = 64;
        assert_eq!(Target::Q.columns(c), (0, 64));
        assert_eq!(Target::K.columns(c), (64, 64));
        assert_eq!(Target::V.columns(c), (128, 64));
        assert_eq!(Target::CAttn.columns(c), (0, 192));
        assert_eq!(Target::Proj.module().shape(c), (256, 64));
    }
}
