//! The size table of GPT-2 and a model directory's weights: `config.json` + `model.safetensors`.
//!
//! [`parameter_shapes`] is the single list of every parameter's name and shape; loading, saving,
//! allocation and the optimizer all walk it, so a name or a shape is written down once. Names are
//! Hugging Face's without the `transformer.` prefix (the crate docs show the full layout).
//!
//! [`Checkpoint::load`] accepts what `transformers` writes and what the Hub serves:
//! - the weights in one of three layouts, looked for in this order: `model.safetensors`;
//!   `model.safetensors.index.json` with the shards its `weight_map` names
//!   (`save_pretrained(max_shard_size=...)`, large models on the Hub); `pytorch_model.bin`,
//!   PyTorch's pickle, read by a reader that only rebuilds tensors (`torch_pickle.rs`);
//! - keys with the `transformer.` prefix (`GPT2LMHeadModel.save_pretrained`) or without it
//!   (`GPT2Model`, and `openai-community/gpt2`'s own `model.safetensors`);
//! - `lm_head.weight`: with `tie_word_embeddings` (the default) it must equal `wte.weight` bit for
//!   bit (ignoring a different one would silently change the model); with
//!   `"tie_word_embeddings": false` it is the model's own output head, in the size table;
//! - the attention buffers `h.{i}.attn.bias` (the causal mask) and `h.{i}.attn.masked_bias`,
//!   which are constants, not parameters: skipped;
//! - f32, f16 or bf16 storage, read to f32;
//! - bitsandbytes' 4-bit NF4 weights for the blocks' four Linears, with `quantization_config`
//!   in `config.json` (a model `transformers` saved after loading it with
//!   `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`, or `train quantize`'s
//!   output): kept as codes in [`Checkpoint::nf4`], never dequantized on load
//!   ([`crate::nf4_file`] gives the layout).
//!
//! Anything else is an error, and so is an unknown extra tensor: a tensor we would not use means
//! the file describes a model other than `config.json` says (say, a wrong `n_layer`).
//!
//! [`Checkpoint::save`] writes what `GPT2LMHeadModel.from_pretrained` reads: `transformer.`-prefixed
//! f32 tensors with metadata `{"format": "pt"}`, no `lm_head.weight` (tied), each file replaced
//! atomically. [`Checkpoint::save_as`] stores f16 or bf16 instead, half the bytes, for models
//! shipped in a repository. [`Checkpoint::quantize_nf4`] turns the Linears' weights into NF4
//! codes on the host, and `save` then writes them as bitsandbytes does, with the
//! `quantization_config` that makes `from_pretrained` rebuild the 4-bit layers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;
use tensor::quant::{self, Nf4Weight};

use crate::config::{GptConfig, MAX_CONFIG_BYTES};
use crate::error::{Error, Result};
use crate::nf4_file;
use crate::tensor_file::{self, NamedTensor, SaveDtype};
use crate::weight_files::{self, Weights};

/// Every parameter of a GPT-2 with this config, in a fixed order: name (Hugging Face's, without
/// `transformer.`) and shape. Conv1D weights are stored `[in, out]`, so `y = x·W + b`. An untied
/// model ends with `lm_head.weight` (V, C), a name `transformers` writes without the prefix.
pub fn parameter_shapes(cfg: &GptConfig) -> Vec<(String, Vec<usize>)> {
    let (c, v, f) = (cfg.n_embd, cfg.vocab_size, cfg.inner_size());
    let mut table = vec![
        ("wte.weight".to_string(), vec![v, c]), // token embedding (V,C), tied to lm_head
        ("wpe.weight".to_string(), vec![cfg.n_positions, c]), // position embedding (n_positions,C)
    ];
    for i in 0..cfg.n_layer {
        let block = [
            ("ln_1.weight", vec![c]),
            ("ln_1.bias", vec![c]),
            ("attn.c_attn.weight", vec![c, 3 * c]), // fused q,k,v: (C,3C)
            ("attn.c_attn.bias", vec![3 * c]),
            ("attn.c_proj.weight", vec![c, c]), // heads back to the residual: (C,C)
            ("attn.c_proj.bias", vec![c]),
            ("ln_2.weight", vec![c]),
            ("ln_2.bias", vec![c]),
            ("mlp.c_fc.weight", vec![c, f]), // expand: (C,F), F = n_inner, 4C by default
            ("mlp.c_fc.bias", vec![f]),
            ("mlp.c_proj.weight", vec![f, c]), // contract: (F,C)
            ("mlp.c_proj.bias", vec![c]),
        ];
        table.extend(
            block
                .into_iter()
                .map(|(name, shape)| (format!("h.{i}.{name}"), shape)),
        );
    }
    table.push(("ln_f.weight".to_string(), vec![c]));
    table.push(("ln_f.bias".to_string(), vec![c]));
    if !cfg.variant.tie_word_embeddings {
        table.push((LM_HEAD.to_string(), vec![v, c]));
    }
    table
}

/// The untied output head's name, the same in `GPT2LMHeadModel` files with or without prefix.
pub const LM_HEAD: &str = "lm_head.weight";

/// Number of parameters (lm_head tied, so counted once): 124,439,808 for GPT-2 small.
pub fn num_parameters(cfg: &GptConfig) -> usize {
    parameter_shapes(cfg)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

/// A model's config and weights, in host memory: f32, and NF4 codes for a quantized base.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: GptConfig,
    /// `(name, shape, values)` in exactly the order and with the names and shapes of
    /// [`parameter_shapes`]`(&config)`, less the weights in `nf4`; values row-major. A `Vec`
    /// rather than a map so that the order is the size table's; [`Checkpoint::get`] finds one
    /// by name.
    pub tensors: Vec<NamedTensor>,
    /// The weights stored in NF4, by the size table's name (only the blocks' four Linear
    /// weights), each quantized in `nn.Linear`'s orientation, (out, in): the table's shape
    /// reversed. Empty for a float model.
    pub nf4: BTreeMap<String, Nf4Weight>,
}

/// The suffixes of the weights a quantized base stores in NF4: every block's four Linears.
const QUANTIZED: [&str; 4] = [
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
];

/// Whether `name` (without `transformer.`) is one of a block's four Linear weights.
pub fn is_block_linear_weight(name: &str) -> bool {
    name.strip_prefix("h.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(layer, field)| layer.parse::<usize>().is_ok() && QUANTIZED.contains(&field))
}

/// The prefix `GPT2LMHeadModel` puts before `GPT2Model`'s parameter names.
const PREFIX: &str = "transformer.";

impl Checkpoint {
    /// Loads `dir/config.json` and the weights beside it (see the module docs for what is
    /// accepted).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let config = GptConfig::from_file(&config_path)?;
        let raw: Value =
            serde_json::from_str(&tensor_file::read_text(&config_path, MAX_CONFIG_BYTES)?)
                .map_err(|e| Error::checkpoint(&config_path, format!("not valid JSON: {e}")))?;
        let wants_nf4 =
            nf4_file::wants_nf4(&raw).map_err(|m| Error::checkpoint(&config_path, m))?;
        let unprefixed = |key: &str| key.strip_prefix(PREFIX).unwrap_or(key).to_string();
        let weights =
            weight_files::read_weights(dir, |key| !is_attention_buffer(&unprefixed(key)))?;
        Self::from_file_tensors(config, weights, wants_nf4)
    }

    /// Matches the tensors read from a model's files against the size table of `config`.
    fn from_file_tensors(config: GptConfig, weights: Weights, wants_nf4: bool) -> Result<Self> {
        let Weights {
            tensors: found,
            nf4: found_nf4,
            path,
        } = weights;
        let path = path.as_path();
        let err = |message: String| Error::checkpoint(path, message);
        let mut nf4 = BTreeMap::new();
        for (key, w) in found_nf4 {
            let name = key.strip_prefix(PREFIX).unwrap_or(&key).to_string();
            if !is_block_linear_weight(&name) {
                return Err(err(format!(
                    "tensor `{key}` is stored in NF4; only the blocks' Linear weights ({}) can be",
                    QUANTIZED.join(", ")
                )));
            }
            if nf4.insert(name.clone(), w).is_some() {
                return Err(err(format!(
                    "NF4 weight `{name}` appears twice, with and without the `{PREFIX}` prefix"
                )));
            }
        }
        match (wants_nf4, nf4.keys().next()) {
            (true, None) => {
                return Err(err(
                    "config.json's `quantization_config` asks for bitsandbytes 4-bit weights,                      but the file holds none"
                        .into(),
                ));
            }
            (false, Some(first)) => {
                return Err(err(format!(
                    "holds NF4 weights (`{first}`, ...) but config.json has no                      `quantization_config`"
                )));
            }
            _ => {}
        }
        let mut by_name = BTreeMap::new();
        let mut lm_head = None;
        for (key, shape, data) in found {
            let name = key.strip_prefix(PREFIX).unwrap_or(&key).to_string();
            if name == LM_HEAD && config.variant.tie_word_embeddings {
                lm_head = Some((shape, data));
            } else if by_name.insert(name.clone(), (shape, data)).is_some() {
                return Err(err(format!(
                    "tensor `{name}` appears twice, with and without the `{PREFIX}` prefix"
                )));
            }
        }

        let mut tensors = Vec::new();
        let mut missing = Vec::new();
        for (name, expected) in parameter_shapes(&config) {
            if let Some(w) = nf4.get(&name) {
                let stored = [expected[1], expected[0]];
                if w.shape() != stored {
                    return Err(err(format!(
                        "NF4 weight `{name}`: expected shape (out, in) = {stored:?}, found {:?} \
                         (config: {})",
                        w.shape(),
                        describe(&config)
                    )));
                }
                continue;
            }
            match by_name.remove(&name) {
                None => missing.push(format!("`{name}` {expected:?}")),
                Some((shape, _)) if shape != expected => {
                    return Err(err(format!(
                        "tensor `{name}`: expected shape {expected:?}, found {shape:?} \
                         (config: {})",
                        describe(&config)
                    )));
                }
                Some((shape, data)) => tensors.push((name, shape, data)),
            }
        }
        if !missing.is_empty() {
            return Err(err(format!(
                "missing {} tensor(s) of the GPT-2 size table for config ({}): {}",
                missing.len(),
                describe(&config),
                abridged(&missing)
            )));
        }
        if !by_name.is_empty() {
            let unknown: Vec<String> = by_name.keys().map(|k| format!("`{k}`")).collect();
            return Err(err(format!(
                "{} tensor(s) not in the GPT-2 size table for config ({}): {}",
                unknown.len(),
                describe(&config),
                abridged(&unknown)
            )));
        }
        if let Some((shape, data)) = lm_head {
            let (_, wte_shape, wte) = &tensors[0];
            let same = shape == *wte_shape
                && data
                    .iter()
                    .zip(wte)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
            if !same {
                return Err(err(
                    "tensor `lm_head.weight` differs from `wte.weight`, but config.json ties \
                     them (tie_word_embeddings is absent or true): set \"tie_word_embeddings\": \
                     false if the head is the model's own"
                        .to_string(),
                ));
            }
        }
        Ok(Checkpoint {
            config,
            tensors,
            nf4,
        })
    }

    /// A float checkpoint: `tensors` in the size table's order.
    pub fn new(config: GptConfig, tensors: Vec<NamedTensor>) -> Checkpoint {
        Checkpoint {
            config,
            tensors,
            nf4: BTreeMap::new(),
        }
    }

    /// QLoRA's frozen base: stores the weights of every block's four Linears in NF4 (blocks of
    /// 64 values, as bitsandbytes quantizes `nn.Linear`'s (out, in) weight; with
    /// `double_quant` the block scales in 8 bits too), about 0.5 byte per weight instead of 4,
    /// on the host, so no f32 copy of them ever reaches a device. Embeddings, layer norms and
    /// biases stay f32, as bitsandbytes leaves them. Weights already in NF4 are kept.
    pub fn quantize_nf4(&mut self, double_quant: bool) -> Result<()> {
        let mut kept = Vec::with_capacity(self.tensors.len());
        for (name, shape, values) in std::mem::take(&mut self.tensors) {
            if !is_block_linear_weight(&name) {
                kept.push((name, shape, values));
                continue;
            }
            let &[in_f, out_f] = &shape[..] else {
                return Err(Error::Invalid(format!(
                    "`{name}`: shape {shape:?}, expected (in, out)"
                )));
            };
            // Conv1D stores W (in, out); bitsandbytes quantizes nn.Linear's Wᵀ, (out, in).
            let transposed: Vec<f32> = (0..in_f * out_f)
                .map(|e| values[(e % in_f) * out_f + e / in_f])
                .collect();
            let q = Nf4Weight::quantize(
                &transposed,
                &[out_f, in_f],
                quant::DEFAULT_BLOCK,
                double_quant,
            )
            .map_err(|e| Error::Invalid(format!("`{name}`: {e}")))?;
            self.nf4.insert(name, q);
        }
        self.tensors = kept;
        Ok(())
    }

    /// Whether some weights are stored in NF4.
    pub fn is_quantized(&self) -> bool {
        !self.nf4.is_empty()
    }

    /// The shape and values of the parameter `name` (without `transformer.`).
    pub fn get(&self, name: &str) -> Option<(&[usize], &[f32])> {
        let (_, shape, data) = self.tensors.iter().find(|(n, _, _)| n == name)?;
        Some((shape, data))
    }

    /// Writes `dir/model.safetensors` (f32) and `dir/config.json`, creating `dir` if needed.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_as(dir, SaveDtype::F32)
    }

    /// As [`Checkpoint::save`], storing the weights as `dtype`.
    ///
    /// Each file is replaced atomically; the weights are written before the config. The pair is
    /// not one atomic unit: a crash between the two renames leaves new weights beside the old
    /// config, which `load` rejects unless the shapes agree.
    pub fn save_as(&self, dir: impl AsRef<Path>, dtype: SaveDtype) -> Result<()> {
        let dir = dir.as_ref();
        let path = dir.join("model.safetensors");
        self.config.validate()?;
        self.check_against_table()
            .map_err(|m| Error::checkpoint(&path, format!("refusing to write: {m}")))?;
        if self.is_quantized() && dtype != SaveDtype::F32 {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "refusing to write: a model with NF4 weights is saved with its other tensors                      in f32 (they define the dtype the 4-bit weights dequantize to), not {dtype:?}"
                ),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self
            .tensors
            .iter()
            .map(|(name, shape, data)| (saved_name(name), &shape[..], &data[..]));
        let raw = self
            .nf4
            .iter()
            .flat_map(|(name, w)| nf4_file::nf4_tensors(&saved_name(name), w))
            .collect();
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        tensor_file::write_tensors_and_raw(&path, tensors, raw, dtype, Some(metadata))?;
        let config = match self.nf4.values().next() {
            None => self.config.to_json(),
            Some(w) => {
                let double_quant = matches!(w.scales(), quant::Scales::Double { .. });
                let mut value: Value = serde_json::from_str(&self.config.to_json())
                    .map_err(|e| Error::Invalid(format!("config JSON: {e}")))?;
                value["quantization_config"] = nf4_file::quantization_config(double_quant);
                let mut text = serde_json::to_string_pretty(&value)
                    .map_err(|e| Error::Invalid(format!("config JSON: {e}")))?;
                text.push('\n');
                text
            }
        };
        tensor_file::write_file_atomically(&dir.join("config.json"), config.as_bytes())
    }

    /// The tensors are the size table's, in its order, each with as many values as its shape.
    fn check_against_table(&self) -> std::result::Result<(), String> {
        let mut table = parameter_shapes(&self.config);
        for (name, w) in &self.nf4 {
            let Some(at) = table.iter().position(|(n, _)| n == name) else {
                return Err(format!("NF4 weight `{name}` is not in the size table"));
            };
            let (_, shape) = table.remove(at);
            if !is_block_linear_weight(name) || w.shape() != [shape[1], shape[0]] {
                return Err(format!(
                    "NF4 weight `{name}` {:?}: expected a block's Linear weight, (out, in) = \
                     [{}, {}]",
                    w.shape(),
                    shape[1],
                    shape[0]
                ));
            }
        }
        if table.len() != self.tensors.len() {
            let (want, have) = (table.len(), self.tensors.len());
            return Err(format!(
                "config ({}) has {want} float tensors, checkpoint holds {have}",
                describe(&self.config)
            ));
        }
        for ((want_name, want_shape), (name, shape, data)) in table.iter().zip(&self.tensors) {
            if (want_name, want_shape) != (name, shape) {
                return Err(format!(
                    "expected tensor `{want_name}` {want_shape:?}, found `{name}` {shape:?}"
                ));
            }
            let len: usize = shape.iter().product();
            if data.len() != len {
                return Err(format!(
                    "tensor `{name}`: shape {shape:?} needs {len} values, found {}",
                    data.len()
                ));
            }
        }
        Ok(())
    }
}

/// The name `GPT2LMHeadModel` saves a parameter under: `transformer.` + ours, `lm_head.weight` as is.
fn saved_name(name: &str) -> String {
    if name == LM_HEAD {
        name.to_string()
    } else {
        format!("{PREFIX}{name}")
    }
}

/// `h.{i}.attn.bias` / `h.{i}.attn.masked_bias`: buffers (the causal mask and its fill value)
/// older `transformers` versions saved with the weights. Not `h.{i}.attn.c_attn.bias`.
fn is_attention_buffer(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("h.") else {
        return false;
    };
    let Some((layer, field)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok() && (field == "attn.bias" || field == "attn.masked_bias")
}

fn describe(cfg: &GptConfig) -> String {
    format!(
        "L={} C={} V={} n_positions={}",
        cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_positions
    )
}

/// The first few items of a long list, then how many more.
fn abridged(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_table_counts_gpt2s_parameters() {
        // 124,439,808 and 354,823,168: the counts `transformers` reports for gpt2 / gpt2-medium.
        assert_eq!(num_parameters(&GptConfig::gpt2_small()), 124_439_808);
        assert_eq!(num_parameters(&GptConfig::gpt2_medium()), 354_823_168);
        let table = parameter_shapes(&GptConfig::gpt2_small());
        assert_eq!(table.len(), 2 + 12 * 12 + 2);
        assert_eq!(
            table[4],
            ("h.0.attn.c_attn.weight".to_string(), vec![768, 2304])
        );
        assert_eq!(table.last().unwrap().0, "ln_f.bias");
    }

    #[test]
    fn attention_buffers_are_told_from_parameters() {
        assert!(is_attention_buffer("h.11.attn.bias"));
        assert!(is_attention_buffer("h.0.attn.masked_bias"));
        assert!(!is_attention_buffer("h.0.attn.c_attn.bias"));
        assert!(!is_attention_buffer("h.x.attn.bias"));
    }

    #[test]
    fn save_refuses_a_checkpoint_that_breaks_the_table() {
        let config = GptConfig::from_json_str(
            r#"{"n_layer": 1, "n_head": 1, "n_embd": 2, "vocab_size": 256, "n_positions": 4}"#,
        )
        .unwrap();
        let mut tensors: Vec<NamedTensor> = parameter_shapes(&config)
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                (name, shape, vec![0.5; n])
            })
            .collect();
        tensors[3].2.pop(); // h.0.ln_1.bias now has one value too few
        let ckpt = Checkpoint::new(config, tensors);
        let dir = std::env::temp_dir().join(format!("transformer-refuse-{}", std::process::id()));
        let e = ckpt.save(&dir).unwrap_err().to_string();
        assert!(
            e.contains(
                "refusing to write: tensor `h.0.ln_1.bias`: shape [2] needs 2 values, found 1"
            ),
            "{e}"
        );
        assert!(!dir.exists());
    }
}
