//! The options of `train finetune` that set up the adapters as PEFT's `LoraConfig` does
//! (`use_rslora`, `use_dora`, `layers_to_transform`, `rank_pattern`, `alpha_pattern`, `bias`,
//! `modules_to_save`, `init_lora_weights`) and LoRA+'s learning rate of B; what they make of a
//! [`LoraConfig`], and what of them a resumed run must repeat.

use clap::{Args, ValueEnum};
use lora::{BiasMode, Init, LoraConfig, Target};
use serde_json::{Map, Value, json};

/// PEFT's LoRA options beyond r, alpha, targets and dropout.
#[derive(Args, Debug, Clone)]
pub struct LoraOptions {
    /// Rank-stabilised LoRA (PEFT's use_rslora): scale the update by alpha/√r instead of
    /// alpha/r.
    #[arg(long, conflicts_with = "full")]
    pub use_rslora: bool,
    /// Adapt only these blocks, 0-based, e.g. `--layers 0,2,5` (PEFT's layers_to_transform)
    /// [default: every block].
    #[arg(long, value_delimiter = ',', conflicts_with = "full")]
    pub layers: Vec<usize>,
    /// Ranks by module name, `KEY=R,...` (PEFT's rank_pattern): each KEY is a regular
    /// expression matched against the end of a module's full name after a dot
    /// (`transformer.h.1.attn.c_attn` is matched by `c_attn`, `h\.1\.attn\.c_attn`,
    /// `h\.[01]\..*`); the first key that matches, in the order given, sets the rank. A key that
    /// matches no adapted module is an error. Keys cannot contain `,` or `=`.
    #[arg(long, value_delimiter = ',', value_parser = rank_entry, conflicts_with = "full")]
    pub rank_pattern: Vec<(String, usize)>,
    /// Alphas by module name, `KEY=A,...` (PEFT's alpha_pattern), matched as --rank-pattern.
    #[arg(long, value_delimiter = ',', value_parser = alpha_entry, conflicts_with = "full")]
    pub alpha_pattern: Vec<(String, f32)>,
    /// Which biases train along with the adapters and are saved in the adapter (PEFT's bias):
    /// none, lora_only (the biases of the Linears that carry an adapter) or all (every bias,
    /// layer norms' included).
    #[arg(long, value_enum, default_value = "none", conflicts_with = "full")]
    pub bias: BiasArg,
    /// Modules trained whole and saved in the adapter (PEFT's modules_to_save), e.g.
    /// `--modules-to-save ln_f,h.1.ln_2`: each names every module whose full name
    /// (`transformer.h.1.ln_2`) ends with it, as in PEFT. A module with an adapter, and the
    /// token embedding `wte` (tied to the output head), are refused.
    #[arg(long, value_delimiter = ',', conflicts_with = "full")]
    pub modules_to_save: Vec<String>,
    /// How A and B start (PEFT's init_lora_weights): kaiming (A ~ kaiming-uniform, B = 0, PEFT's
    /// default), gaussian (A ~ N(0, 1/r²), B = 0), pissa (A, B from the top-r singular triplets
    /// of W0) or olora (from the QR decomposition of W0). pissa and olora take s·B·A out of W0
    /// during training; the adapter is saved converted to a plain LoRA of rank 2r (alpha 2α, or
    /// √2·α with --use-rslora) that gives the trained model on the original base, as PEFT's
    /// `path_initial_model_for_weight_conversion` does.
    #[arg(long, value_enum, default_value = "kaiming", conflicts_with = "full")]
    pub init: InitArg,
    /// DoRA (PEFT's use_dora): a trained magnitude per output column scales the adapted
    /// weight's normalised columns, m ⊙ (W0 + s·B·A)/‖W0 + s·B·A‖ (the norm held constant in
    /// the backward, as PEFT does). Whole modules only (c_attn, not q/k/v), with --dropout 0 and
    /// the kaiming or gaussian init.
    #[arg(long, conflicts_with = "full")]
    pub use_dora: bool,
    /// LoRA+: B's learning rate is this many times A's (Hayou et al. 2024; PEFT's
    /// loraplus_lr_ratio; 16 is the paper's usual choice). As in PEFT's LoRA+ optimizer, biases
    /// and layer-norm parameters train at B's rate. 1: plain LoRA.
    #[arg(long, default_value_t = 1.0, conflicts_with = "full")]
    pub lora_plus_ratio: f32,
}

/// `--bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BiasArg {
    None,
    #[value(name = "lora_only")]
    LoraOnly,
    All,
}

/// `--init`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InitArg {
    Kaiming,
    Gaussian,
    Pissa,
    Olora,
}

fn entry(text: &str) -> Result<(String, &str), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v)),
        _ => Err(format!("`{text}`: expected KEY=VALUE")),
    }
}

fn rank_entry(text: &str) -> Result<(String, usize), String> {
    let (k, v) = entry(text)?;
    let r = v
        .parse()
        .map_err(|_| format!("`{text}`: the rank `{v}` is not a whole number"))?;
    Ok((k, r))
}

fn alpha_entry(text: &str) -> Result<(String, f32), String> {
    let (k, v) = entry(text)?;
    let a = v
        .parse()
        .map_err(|_| format!("`{text}`: the alpha `{v}` is not a number"))?;
    Ok((k, a))
}

impl LoraOptions {
    /// The adapters' config: rank, alpha, targets and dropout as given, and these options.
    pub fn config(
        &self,
        r: usize,
        alpha: f32,
        targets: &[Target],
        dropout: f32,
    ) -> lora::Result<LoraConfig> {
        let mut cfg = LoraConfig::new(r, alpha, targets);
        cfg.dropout = dropout;
        cfg.use_rslora = self.use_rslora;
        cfg.use_dora = self.use_dora;
        cfg.layers = (!self.layers.is_empty()).then(|| self.layers.clone());
        cfg.name_rank_pattern = self.rank_pattern.clone();
        cfg.name_alpha_pattern = self.alpha_pattern.clone();
        cfg.bias = BiasMode::parse(match self.bias {
            BiasArg::None => "none",
            BiasArg::LoraOnly => "lora_only",
            BiasArg::All => "all",
        })?;
        cfg.modules_to_save = self.modules_to_save.clone();
        cfg.init = match self.init {
            InitArg::Kaiming => Init::KaimingUniform,
            InitArg::Gaussian => Init::Gaussian,
            InitArg::Pissa => Init::Pissa,
            InitArg::Olora => Init::Olora,
        };
        Ok(cfg)
    }

    /// The options that differ from their defaults, for the run's identity (so that a run
    /// started before these options existed still resumes).
    pub fn identity(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if self.use_rslora {
            m.insert("use_rslora".into(), json!(true));
        }
        if self.use_dora {
            m.insert("use_dora".into(), json!(true));
        }
        if !self.layers.is_empty() {
            m.insert("layers".into(), json!(self.layers));
        }
        if !self.rank_pattern.is_empty() {
            m.insert("rank_pattern".into(), json!(self.rank_pattern));
        }
        if !self.alpha_pattern.is_empty() {
            m.insert("alpha_pattern".into(), json!(self.alpha_pattern));
        }
        if self.bias != BiasArg::None {
            m.insert("bias".into(), json!(format!("{:?}", self.bias)));
        }
        if !self.modules_to_save.is_empty() {
            m.insert("modules_to_save".into(), json!(self.modules_to_save));
        }
        if self.init != InitArg::Kaiming {
            m.insert("init".into(), json!(format!("{:?}", self.init)));
        }
        if self.lora_plus_ratio != 1.0 {
            m.insert("lora_plus_ratio".into(), json!(self.lora_plus_ratio));
        }
        m
    }
}
