//! The `config.json` keys by which one GPT-2 computes a different function from another, and
//! which this crate follows rather than refuses: the MLP's activation and width, the attention
//! scale, and whether the output head is tied to the token embedding.
//!
//! Each key is read as `transformers`' `GPT2Config` reads it, with its default when absent:
//!
//! | key | default | what changes |
//! |---|---|---|
//! | `activation_function` | `gelu_new` | the MLP's nonlinearity ([`Activation`]) |
//! | `n_inner` | null = 4·C | the MLP's width: `c_fc` (C, n_inner), `mlp.c_proj` (n_inner, C) |
//! | `scale_attn_weights` | true | scores scaled by 1/√hs (false: not scaled) |
//! | `scale_attn_by_inverse_layer_idx` | false | scores of block i further scaled by 1/(i+1) |
//! | `tie_word_embeddings` | true | false: logits = ln_f(x)·lm_headᵀ with its own `lm_head.weight` (V, C) |

use serde_json::{Map, Value};

/// The MLP's activation, by the names of `transformers`' `ACT2FN` (`activations.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    /// (`gelu_fast` writes the same polynomial as √(2/π)·x·(1 + 0.044715·x²)).
    #[default]
    GeluTanh,
    /// `gelu`: x·Φ(x) = 0.5·x·(1 + erf(x/√2)), PyTorch's exact GELU.
    GeluErf,
    /// `relu`: max(x, 0).
    Relu,
    /// `silu` (also `swish`): x·σ(x).
    Silu,
    /// `quick_gelu`: x·σ(1.702·x).
    QuickGelu,
}

impl Activation {
    /// The `activation_function` names this crate computes, and what each means.
    pub const ACCEPTED: &'static str = "gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu, \
                                        silu, swish, quick_gelu";

    /// The activation `transformers` runs for this `activation_function` name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" | "gelu_python" => Activation::GeluErf,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            _ => return None,
        })
    }

    /// The name written to `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::GeluTanh => "gelu_new",
            Activation::GeluErf => "gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::QuickGelu => "quick_gelu",
        }
    }
}

/// How this GPT-2 departs from GPT-2 small's conventions (the module table); `Default` is none.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    pub activation: Activation,
    /// The MLP's width; `None` means 4·C.
    pub n_inner: Option<usize>,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub tie_word_embeddings: bool,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            activation: Activation::GeluTanh,
            n_inner: None,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            tie_word_embeddings: true,
        }
    }
}

impl Variant {
    /// Reads the keys of the module table from a `config.json` object (`null` = absent).
    pub(crate) fn from_json(obj: &Map<String, Value>) -> Result<Self, String> {
        let present = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let flag = |key: &str, default: bool| -> Result<bool, String> {
            match present(key) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| format!("field `{key}`: expected true or false, found {v}")),
            }
        };
        let activation = match present("activation_function") {
            None => Activation::GeluTanh,
            Some(v) => v
                .as_str()
                .and_then(Activation::from_hf_name)
                .ok_or_else(|| {
                    format!(
                        "field `activation_function`: {v} is not one this program computes \
                         (it computes {})",
                        Activation::ACCEPTED
                    )
                })?,
        };
        let n_inner = match present("n_inner") {
            None => None,
            Some(v) => Some(v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                format!("field `n_inner`: expected null or a positive integer, found {v}")
            })? as usize),
        };
        Ok(Variant {
            activation,
            n_inner,
            scale_attn_weights: flag("scale_attn_weights", true)?,
            scale_attn_by_inverse_layer_idx: flag("scale_attn_by_inverse_layer_idx", false)?,
            tie_word_embeddings: flag("tie_word_embeddings", true)?,
        })
    }

    /// The factor the attention scores of block `layer` (from 0) are multiplied by.
    pub fn attention_scale(&self, head_size: usize, layer: usize) -> f32 {
        // In f64 and rounded once, as `transformers` computes its Python-float `scaling`.
        let mut scale = 1.0f64;
        if self.scale_attn_weights {
            scale = (head_size as f64).powf(-0.5);
        }
        if self.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        scale as f32
    }
}
