//! [`GptConfig`]: the handful of numbers that fix a GPT-2's shapes, read from and written to a
//! Hugging Face `config.json`.
//!
//! Hugging Face configs carry many keys (dropouts, generation defaults, summary heads...). We read
//! the five sizes and the layer-norm epsilon, the keys of [`Variant`] (activation, MLP width,
//! attention scale, untied head), ignore keys that do not change the math, and refuse keys that
//! would make this crate compute a different function than `transformers` does (another
//! architecture's `model_type`, an activation we do not compute, cross-attention), so a checkpoint
//! either loads and means what it meant in PyTorch, or fails with a message saying why.
//!
//! A config is also a promise about sizes that later code allocates from (the size table, the
//! model), so [`GptConfig::validate`] bounds them ([`GptConfig::MAX_LAYERS`],
//! [`GptConfig::MAX_DIM`], [`GptConfig::MAX_PARAMETERS`]): a hostile `"n_layer": 1e18` or
//! `"n_embd": 2^62` is an error naming the field, never an overflow or an attempt to allocate
//! it. `config.json` itself is read only up to [`MAX_CONFIG_BYTES`].

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::tensor_file::read_text;
use crate::variant::Variant;

/// The largest `config.json` read (16 MiB; Hugging Face's GPT-2 config is under 1 kB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Which tokenizer a model's ids come from, when its directory has no `vocab.json`/`merges.txt`.
///
/// Stored in `config.json` under our own optional key `"tokenizer"` (`"bytes"` | `"gpt2"`);
/// `transformers` ignores unknown keys. Without the key: `Bytes` when `vocab_size == 256`, else
/// `Gpt2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per byte of UTF-8: V = 256, no merges, no special tokens.
    Bytes,
    /// GPT-2's byte-level BPE (`r50k_base`): V = 50257, `<|endoftext|>` = 50256.
    Gpt2,
}

impl TokenizerKind {
    /// The name used in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Bytes => "bytes",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }

    /// The smallest `vocab_size` whose embedding can hold every id this tokenizer produces.
    pub fn min_vocab_size(self) -> usize {
        match self {
            TokenizerKind::Bytes => 256,
            TokenizerKind::Gpt2 => 50257,
        }
    }
}

/// The hyper-parameters of a GPT-2, in Hugging Face's names (letters as in the crate docs).
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    /// L: number of transformer blocks `h.0 ... h.{L-1}`.
    pub n_layer: usize,
    /// NH: attention heads per block; each head sees hs = C / NH channels.
    pub n_head: usize,
    /// C: width of the residual stream.
    pub n_embd: usize,
    /// V: rows of the token embedding `wte` (and, tied, columns of the logits).
    pub vocab_size: usize,
    /// Rows of the position embedding `wpe`: the longest T the model can see.
    pub n_positions: usize,
    /// The ε in layer norm's `(x - mean) / sqrt(var + ε)`; GPT-2 uses 1e-5.
    pub layer_norm_epsilon: f32,
    /// Tokenizer to use when the model directory has no tokenizer files.
    pub tokenizer: TokenizerKind,
    /// Activation, MLP width, attention scale, tied head ([`Variant::default`]: GPT-2's).
    pub variant: Variant,
}

impl GptConfig {
    /// The most blocks a config may have (GPT-2 XL has 48).
    pub const MAX_LAYERS: usize = 1 << 12;
    /// The largest `n_head`, `n_embd`, `vocab_size` or `n_positions` (2^24 = 16,777,216).
    pub const MAX_DIM: usize = 1 << 24;
    /// The most parameters a config may describe (2^36, 256 GiB of f32; GPT-2 XL has 1.6·2^30).
    pub const MAX_PARAMETERS: u64 = 1 << 36;

    /// GPT-2 small (124M parameters), as `openai-community/gpt2`.
    pub fn gpt2_small() -> Self {
        Self::gpt2_sized(12, 12, 768)
    }

    /// GPT-2 medium (355M parameters), as `openai-community/gpt2-medium`.
    pub fn gpt2_medium() -> Self {
        Self::gpt2_sized(24, 16, 1024)
    }

    fn gpt2_sized(n_layer: usize, n_head: usize, n_embd: usize) -> Self {
        GptConfig {
            n_layer,
            n_head,
            n_embd,
            vocab_size: 50257,
            n_positions: 1024,
            layer_norm_epsilon: 1e-5,
            tokenizer: TokenizerKind::Gpt2,
            variant: Variant::default(),
        }
    }

    /// The MLP's width: `n_inner`, 4·C unless the config says otherwise.
    pub fn inner_size(&self) -> usize {
        self.variant
            .n_inner
            .unwrap_or(self.n_embd.saturating_mul(4))
    }

    /// hs: channels per attention head, C / NH.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path, MAX_CONFIG_BYTES)?;
        parse(&text, Some(path))
    }

    /// Parses and validates the text of a `config.json`; errors carry no file name.
    pub fn from_json_str(text: &str) -> Result<Self> {
        parse(text, None)
    }

    /// Checks that the sizes describe a model we can build: all positive and within
    /// [`GptConfig::MAX_LAYERS`] / [`GptConfig::MAX_DIM`], at most
    /// [`GptConfig::MAX_PARAMETERS`] parameters in all, C divisible by NH, ε positive. (Whether
    /// the vocabulary fits the tokenizer is [`crate::Tokenizer::for_model`]'s check.)
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|message| Error::Config {
            path: None,
            message,
        })
    }

    fn check(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_inner", self.inner_size()),
        ];
        for (key, value) in sizes {
            if value == 0 {
                return Err(format!("`{key}` must be positive, found 0"));
            }
            let max = if key == "n_layer" {
                Self::MAX_LAYERS
            } else {
                Self::MAX_DIM
            };
            if value > max {
                return Err(format!("`{key}` must be at most {max}, found {value}"));
            }
        }
        // Within the bounds above every term fits in u128 (and most in u64).
        let (l, c) = (self.n_layer as u128, self.n_embd as u128);
        let (v, p) = (self.vocab_size as u128, self.n_positions as u128);
        let f = self.inner_size() as u128;
        let head = if self.variant.tie_word_embeddings {
            0
        } else {
            v * c
        };
        let parameters = (v + p) * c + l * (4 * c * c + 2 * c * f + 9 * c + f) + 2 * c + head;
        if parameters > u128::from(Self::MAX_PARAMETERS) {
            return Err(format!(
                "{parameters} parameters (L={} C={} V={} n_positions={}) is more than the {} \
                 this crate accepts",
                self.n_layer,
                self.n_embd,
                self.vocab_size,
                self.n_positions,
                Self::MAX_PARAMETERS
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "`n_embd` ({}) must be divisible by `n_head` ({}): each head gets hs = C/NH channels",
                self.n_embd, self.n_head
            ));
        }
        let eps = self.layer_norm_epsilon;
        if !(eps.is_finite() && eps > 0.0) {
            return Err(format!(
                "`layer_norm_epsilon` must be positive and finite, found {eps}"
            ));
        }
        Ok(())
    }

    /// A `config.json` that `transformers.GPT2LMHeadModel.from_pretrained` loads as this model,
    /// plus our `"tokenizer"` key, with every key of [`Variant`] written out.
    pub fn to_json(&self) -> String {
        let mut config = json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "activation_function": self.variant.activation.hf_name(),
            "n_inner": self.variant.n_inner,
            "scale_attn_weights": self.variant.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.variant.scale_attn_by_inverse_layer_idx,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "layer_norm_epsilon": f32_as_json(self.layer_norm_epsilon),
            "tie_word_embeddings": self.variant.tie_word_embeddings,
            "tokenizer": self.tokenizer.name(),
        });
        if self.tokenizer == TokenizerKind::Gpt2 && self.vocab_size > 50256 {
            // <|endoftext|> opens and closes every GPT-2 document. (A smaller vocabulary is a
            // BPE of the model's own, whose files say which id ends a document.)
            config["bos_token_id"] = json!(50256);
            config["eos_token_id"] = json!(50256);
        }
        let mut text = serde_json::to_string_pretty(&config).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// 1e-5f32 widened to f64 is 9.999999747378752e-6; going through the shortest decimal that
/// round-trips the f32 gives the f64 1e-5 that Python's `GPT2Config` holds (written `0.00001`).
fn f32_as_json(x: f32) -> Value {
    let shortest: f64 = x.to_string().parse().unwrap_or(f64::from(x));
    json!(shortest)
}

fn parse(text: &str, path: Option<&Path>) -> Result<GptConfig> {
    let err = |message: String| Error::Config {
        path: path.map(Path::to_path_buf),
        message,
    };
    let value: Value =
        serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(err("expected a JSON object {\"n_layer\": ..}".to_string()));
    };
    // Another architecture lacks GPT-2's keys; say what it is before any key is missed.
    refuse_other_architecture(obj).map_err(err)?;
    let size = |key: &str| -> Result<usize> {
        match obj.get(key) {
            None => Err(err(format!("field `{key}` is missing"))),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                err(format!(
                    "field `{key}`: expected a non-negative integer, found {v}"
                ))
            }),
        }
    };
    let n_embd = size("n_embd")?;

    let layer_norm_epsilon = match present(obj, "layer_norm_epsilon") {
        None => 1e-5,
        Some(v) => v.as_f64().ok_or_else(|| {
            err(format!(
                "field `layer_norm_epsilon`: expected a number, found {v}"
            ))
        })? as f32,
    };
    let vocab_size = size("vocab_size")?;
    let tokenizer = match present(obj, "tokenizer") {
        None if vocab_size == 256 => TokenizerKind::Bytes,
        None => TokenizerKind::Gpt2,
        Some(v) => match v.as_str() {
            Some("bytes") => TokenizerKind::Bytes,
            Some("gpt2") => TokenizerKind::Gpt2,
            _ => {
                return Err(err(format!(
                    "field `tokenizer`: expected \"bytes\" or \"gpt2\", found {v}"
                )));
            }
        },
    };
    let config = GptConfig {
        n_layer: size("n_layer")?,
        n_head: size("n_head")?,
        n_embd,
        vocab_size,
        n_positions: size("n_positions")?,
        layer_norm_epsilon,
        tokenizer,
        variant: Variant::from_json(obj).map_err(err)?,
    };
    config.check().map_err(err)?;
    refuse_other_math(obj).map_err(err)?;
    Ok(config)
}

/// A `model_type` other than `gpt2` (or an `architectures` entry that is no GPT-2 class), named.
fn refuse_other_architecture(obj: &Map<String, Value>) -> std::result::Result<(), String> {
    let supported = "this program runs GPT-2 only (model_type \"gpt2\", architectures \
                     GPT2LMHeadModel or GPT2Model)";
    if let Some(v) = present(obj, "model_type")
        && v != "gpt2"
    {
        let arch = present(obj, "architectures").map_or(String::new(), |a| format!(" ({a})"));
        return Err(format!(
            "model_type {v}{arch} is another architecture: {supported}"
        ));
    }
    if let Some(list) = present(obj, "architectures").and_then(Value::as_array) {
        for a in list {
            if !a.as_str().is_some_and(|a| a.starts_with("GPT2")) {
                return Err(format!("architectures names {a}: {supported}"));
            }
        }
    }
    Ok(())
}

/// Refuses GPT-2 configurations whose forward pass this crate does not compute.
fn refuse_other_math(obj: &Map<String, Value>) -> std::result::Result<(), String> {
    if let Some(v) = present(obj, "add_cross_attention")
        && v != false
    {
        return Err(format!(
            "field `add_cross_attention`: expected false (decoder-only GPT-2), found {v}"
        ));
    }
    Ok(())
}

/// The value of `key`, treating JSON `null` as absent (Hugging Face writes `"n_inner": null`).
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openai-community/gpt2`'s config.json, abridged only in its task-specific params.
    const HF_GPT2: &str = r#"{
      "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
      "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
      "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
      "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
      "resid_pdrop": 0.1, "summary_activation": null, "summary_first_dropout": 0.1,
      "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
      "vocab_size": 50257
    }"#;

    #[test]
    fn reads_hugging_face_gpt2_config() {
        let cfg = GptConfig::from_json_str(HF_GPT2).unwrap();
        assert_eq!(cfg, GptConfig::gpt2_small());
        assert_eq!(cfg.head_size(), 64);
    }

    #[test]
    fn to_json_round_trips_and_speaks_transformers() {
        for cfg in [
            GptConfig::gpt2_medium(),
            GptConfig {
                vocab_size: 256,
                ..bytes_tiny()
            },
        ] {
            let text = cfg.to_json();
            assert_eq!(GptConfig::from_json_str(&text).unwrap(), cfg);
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["model_type"], "gpt2");
            assert_eq!(v["architectures"][0], "GPT2LMHeadModel");
            assert_eq!(v["n_ctx"], v["n_positions"]);
            assert_eq!(v["tie_word_embeddings"], true);
        }
        let text = bytes_tiny().to_json();
        assert!(text.contains("\"layer_norm_epsilon\": 0.00001,"), "{text}");
    }

    fn bytes_tiny() -> GptConfig {
        GptConfig::from_json_str(
            r#"{"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 256, "n_positions": 64}"#,
        )
        .unwrap()
    }

    #[test]
    fn tokenizer_kind_defaults_by_vocab_size_and_obeys_the_key() {
        assert_eq!(bytes_tiny().tokenizer, TokenizerKind::Bytes);
        let mut v: Value = serde_json::from_str(HF_GPT2).unwrap();
        assert_eq!(
            GptConfig::from_json_str(&v.to_string()).unwrap().tokenizer,
            TokenizerKind::Gpt2
        );
        v["tokenizer"] = json!("bytes");
        assert_eq!(
            GptConfig::from_json_str(&v.to_string()).unwrap().tokenizer,
            TokenizerKind::Bytes
        );
    }

    /// The error for the tiny config with `key` set to `value` (`null` removes the key).
    fn error_with(key: &str, value: Value) -> String {
        let mut v =
            json!({"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 256, "n_positions": 64});
        match value {
            Value::Null => v.as_object_mut().unwrap().remove(key),
            value => v.as_object_mut().unwrap().insert(key.to_string(), value),
        };
        GptConfig::from_json_str(&v.to_string())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_field_and_what_was_found() {
        let cases = [
            ("n_embd", Value::Null, "field `n_embd` is missing"),
            (
                "n_head",
                json!("four"),
                "field `n_head`: expected a non-negative integer, found \"four\"",
            ),
            (
                "n_head",
                json!(5),
                "`n_embd` (64) must be divisible by `n_head` (5)",
            ),
            ("n_layer", json!(0), "`n_layer` must be positive, found 0"),
            (
                "activation_function",
                json!("tanh"),
                "field `activation_function`: \"tanh\" is not one this program computes",
            ),
            (
                "n_inner",
                json!("big"),
                "field `n_inner`: expected null or a positive integer, found \"big\"",
            ),
            (
                "scale_attn_weights",
                json!(1),
                "field `scale_attn_weights`: expected true or false, found 1",
            ),
            (
                "model_type",
                json!("llama"),
                "model_type \"llama\" is another architecture: this program runs GPT-2 only",
            ),
            (
                "add_cross_attention",
                json!(true),
                "field `add_cross_attention`: expected false",
            ),
        ];
        for (key, value, wanted) in cases {
            let e = error_with(key, value);
            assert!(
                e.starts_with("invalid GPT-2 config: ") && e.contains(wanted),
                "{e}"
            );
        }
        let error_of = |text: &str| GptConfig::from_json_str(text).unwrap_err().to_string();
        assert!(error_of("[1, 2]").contains("expected a JSON object"));
        assert!(error_of("{").contains("not valid JSON"));
    }

    #[test]
    fn variants_are_read_and_written_back() {
        let text = r#"{"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 256,
            "n_positions": 64, "activation_function": "quick_gelu", "n_inner": 100,
            "scale_attn_weights": false, "scale_attn_by_inverse_layer_idx": true,
            "tie_word_embeddings": false}"#;
        let cfg = GptConfig::from_json_str(text).unwrap();
        let want = Variant {
            activation: crate::Activation::QuickGelu,
            n_inner: Some(100),
            scale_attn_weights: false,
            scale_attn_by_inverse_layer_idx: true,
            tie_word_embeddings: false,
        };
        assert_eq!((&cfg.variant, cfg.inner_size()), (&want, 100));
        assert_eq!(GptConfig::from_json_str(&cfg.to_json()).unwrap(), cfg);
        assert_eq!(cfg.variant.attention_scale(16, 1), 0.5);
        // Another architecture is named before any missing GPT-2 key.
        let e = GptConfig::from_json_str(r#"{"model_type": "llama", "hidden_size": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type \"llama\""), "{e}");
    }

    #[test]
    fn from_file_names_the_file() {
        let e = GptConfig::from_file("/nonexistent/config.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent/config.json: "), "{e}");
    }
}
