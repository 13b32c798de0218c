//! Loading an adapter that PEFT saved (or that [`LoraModel::save_peft`] wrote) for a given
//! base model.
//!
//! The weights file decides what is adapted: every `…h.{i}.{module}.lora_A.weight` /
//! `lora_B.weight` pair becomes a whole-module adapter. `adapter_config.json` (read by
//! `peft_config.rs`) supplies α, the scaling rule and dropout, and is checked against the file
//! and the model; anything that does not fit is an error saying what differs:
//! - a layer the model lacks, or a layer `target_modules` names that the file lacks (layer count);
//! - A not (r, in) or B not (out, r) for the model's W (in, out) (shapes);
//! - weights for a module `target_modules` does not name (targets);
//! - a rank other than `r` / `rank_pattern` says, or a rank of 0 (rank);
//! - `layers_to_transform` naming a layer the model lacks (layer count).
//!
//! The weights file is read by [`transformer::tensor_file::read_tensors`], so a damaged file
//! (truncated, a header that lies, an unreadable dtype) is an error naming it, and so is a NaN
//! or infinite value in any A, B or bias (the tensor and the count of such values are named).
//! A tensor given twice (with and without the `transformer.` prefix) is an error too.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tensor::Tensor;
use transformer::tensor_file::read_tensors;
use transformer::{Gpt2, NamedTensor};

use crate::config::{Site, layers_phrase, scaling};
use crate::error::{Error, Result};
use crate::model::LoraModel;
use crate::peft_config::{PeftConfig, config_from, matches, parse_config, pattern_value};
use crate::peft_save::{CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE};
use crate::target::{Module, Target};

/// An adapter read from disk, and what the caller may want to print about its config.
pub struct LoadedAdapter {
    pub lora: LoraModel,
    pub warnings: Vec<String>,
}

/// A tensor read from the file: shape, values.
type Weight = (Vec<usize>, Vec<f32>);

/// `h.{i}.{module}.lora_{A,B}.weight` (after the prefix) → (layer, module, is_a).
fn parse_lora_key(rest: &str) -> Option<(usize, Module, bool)> {
    let (stem, is_a) = if let Some(s) = rest.strip_suffix(".lora_A.weight") {
        (s, true)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, false)
    };
    let (layer, path) = stem.strip_prefix("h.")?.split_once('.')?;
    let module = Module::ALL.into_iter().find(|m| m.path() == path)?;
    Some((layer.parse().ok()?, module, is_a))
}

fn target_of(module: Module) -> Target {
    match module {
        Module::CAttn => Target::CAttn,
        Module::AttnProj => Target::O,
        Module::Fc => Target::Fc,
        Module::MlpProj => Target::Proj,
    }
}

/// The LoRA pairs of a weights file by (layer, module), and the biases it carries.
struct FileWeights {
    pairs: BTreeMap<(usize, Module), (Option<Weight>, Option<Weight>)>,
    biases: Vec<NamedTensor>,
}

/// Reads the weights file and sorts its tensors; keys that are neither a LoRA weight of a
/// layer the model has nor one of the model's biases are errors.
fn read_weights(path: &Path, model: &Gpt2) -> Result<FileWeights> {
    let mismatch = |m: String| Error::mismatch(Some(path), m);
    let n_layer = model.config.n_layer;
    let shapes: BTreeMap<String, Vec<usize>> = transformer::parameter_shapes(&model.config)
        .into_iter()
        .collect();
    let mut file = FileWeights {
        pairs: BTreeMap::new(),
        biases: Vec::new(),
    };
    for (key, shape, data) in read_tensors(path)? {
        // PEFT's prefix, then GPT2LMHeadModel's (absent when the base was a bare GPT2Model).
        let rest = key.strip_prefix("base_model.model.").unwrap_or("");
        let rest = rest.strip_prefix("transformer.").unwrap_or(rest);
        if let Some((layer, module, is_a)) = parse_lora_key(rest) {
            if layer >= n_layer {
                return Err(mismatch(format!(
                    "tensor `{key}` is for layer {layer}, but the model has {}",
                    layers_phrase(n_layer)
                )));
            }
            let slot = file.pairs.entry((layer, module)).or_default();
            let slot = if is_a { &mut slot.0 } else { &mut slot.1 };
            if slot.replace((shape, data)).is_some() {
                return Err(mismatch(format!(
                    "tensor `{key}`: the file holds this LoRA weight twice (with and without \
                     the `transformer.` prefix)"
                )));
            }
        } else if let Some(want) = shapes.get(rest).filter(|_| rest.ends_with(".bias")) {
            if *want != shape {
                return Err(mismatch(format!(
                    "tensor `{key}` is {shape:?}, the model's `{rest}` is {want:?}"
                )));
            }
            if file.biases.iter().any(|(name, _, _)| name == rest) {
                return Err(mismatch(format!(
                    "tensor `{key}`: the file holds the bias `{rest}` twice"
                )));
            }
            file.biases.push((rest.to_string(), shape, data));
        } else {
            return Err(mismatch(format!(
                "tensor `{key}` is neither a LoRA weight of a GPT-2 Linear \
                 ({KEY_PREFIX}h.{{i}}.{{attn.c_attn|attn.c_proj|mlp.c_fc|mlp.c_proj}}.lora_{{A|B}}.weight) \
                 nor a bias of the model"
            )));
        }
    }
    Ok(file)
}

/// The layers and modules the config names must be exactly those the file holds.
fn check_targets(pc: &PeftConfig, file: &FileWeights, n_layer: usize, path: &Path) -> Result<()> {
    let mismatch = |m: String| Error::mismatch(Some(path), m);
    if let Some(l) = pc.layers.iter().flatten().find(|&&l| l >= n_layer) {
        return Err(mismatch(format!(
            "layers_to_transform names layer {l}, but the model has {}",
            layers_phrase(n_layer)
        )));
    }
    let layers = pc.layers.clone().unwrap_or_else(|| (0..n_layer).collect());
    if let Some((l, m)) = file.pairs.keys().find(|(l, _)| !layers.contains(l)) {
        return Err(mismatch(format!(
            "the file has weights for h.{l}.{}, but layers_to_transform is {layers:?}",
            m.path()
        )));
    }
    let Some(targets) = &pc.targets else {
        return Ok(()); // a regular expression: the file decides
    };
    for &layer in &layers {
        for module in Module::ALL {
            let named = targets
                .iter()
                .any(|t| matches(&format!("transformer.h.{layer}.{}", module.path()), t));
            let held = file.pairs.contains_key(&(layer, module));
            if named && !held {
                let in_file: Vec<usize> = file
                    .pairs
                    .keys()
                    .filter(|(_, m)| *m == module)
                    .map(|(l, _)| *l)
                    .collect();
                return Err(mismatch(format!(
                    "target_modules {targets:?} names h.{layer}.{path} but the file has no weights \
                     for it (the model has {}; the file has {path} weights in layers {in_file:?})",
                    layers_phrase(n_layer),
                    path = module.path(),
                )));
            }
            if held && !named {
                return Err(mismatch(format!(
                    "the file has weights for h.{layer}.{}, which target_modules {targets:?} does not name",
                    module.path()
                )));
            }
        }
    }
    Ok(())
}

/// One (layer, module) of the file as a site: checks A (r, in) and B (out, r) against the
/// model's W (in, out) and r against the config; α from the config.
fn site_of(
    pc: &PeftConfig,
    layer: usize,
    module: Module,
    sa: &[usize],
    sb: &[usize],
    c: usize,
) -> std::result::Result<Site, String> {
    let stem = format!("{KEY_PREFIX}h.{layer}.{}", module.path());
    let (n_in, n_out) = module.shape(c);
    let r = sa.first().copied().unwrap_or(0);
    if sa != [r, n_in] || sb != [n_out, r] {
        return Err(format!(
            "{stem}: lora_A is {sa:?} and lora_B {sb:?}, but the model's W is [{n_in}, {n_out}], \
             so they must be [r, {n_in}] and [{n_out}, r]"
        ));
    }
    let name = format!("transformer.h.{layer}.{}", module.path());
    let want_r = pattern_value(&pc.rank_pattern, &name)
        .and_then(Value::as_u64)
        .map_or(pc.r, |v| v as usize);
    if r != want_r {
        return Err(format!(
            "{stem}: rank {r} in the file, but adapter_config.json says r = {want_r}"
        ));
    }
    if r == 0 {
        return Err(format!(
            "{stem}: rank 0 (lora_A is {sa:?}); a LoRA rank is at least 1"
        ));
    }
    let alpha = pattern_value(&pc.alpha_pattern, &name)
        .and_then(Value::as_f64)
        .map_or(pc.alpha, |v| v as f32);
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(format!(
            "{stem}: lora_alpha is {alpha} in adapter_config.json; it must be positive and finite"
        ));
    }
    Ok(Site {
        layer,
        target: target_of(module),
        in_features: n_in,
        col0: 0,
        width: n_out,
        r,
        alpha,
        scale: scaling(alpha, r, pc.use_rslora),
    })
}

impl LoraModel {
    /// Reads `dir/adapter_config.json` + `dir/adapter_model.safetensors` (PEFT's layout) for
    /// `model`, checks that they fit it, and puts A and B on the model's device. The result is
    /// detached: [`LoraModel::attach`] it to train or run it, or [`LoraModel::merge`] it.
    pub fn load_peft(dir: impl AsRef<Path>, model: &Gpt2) -> Result<LoadedAdapter> {
        let dir = dir.as_ref();
        let mut warnings = Vec::new();
        let config_path = dir.join(CONFIG_FILE);
        let pc = parse_config(&config_path, &mut warnings)?;
        let path = dir.join(WEIGHTS_FILE);
        let file = read_weights(&path, model)?;
        check_targets(&pc, &file, model.config.n_layer, &path)?;
        let device = model.wte.value().device();
        let mut weights = Vec::new();
        for ((layer, module), pair) in file.pairs {
            let (Some((sa, a)), Some((sb, b))) = pair else {
                let stem = format!("{KEY_PREFIX}h.{layer}.{}", module.path());
                let message = format!("{stem}: lora_A and lora_B must both be present");
                return Err(Error::mismatch(Some(&path), message));
            };
            let site = site_of(&pc, layer, module, &sa, &sb, model.config.n_embd)
                .map_err(|m| Error::mismatch(Some(&path), m))?;
            let (a, b) = (
                Tensor::from_vec(a, &sa, &device)?,
                Tensor::from_vec(b, &sb, &device)?,
            );
            weights.push((site, a, b));
        }
        if weights.is_empty() {
            return Err(Error::mismatch(
                Some(&path),
                "the file holds no LoRA weights",
            ));
        }
        let config = config_from(&pc, &weights);
        if let Err(Error::Config { message, .. }) = config.validate() {
            return Err(Error::config_in(&config_path, message));
        }
        let mut lora = LoraModel::from_weights(config, weights, file.biases, 0);
        lora.base_model = pc.base_model;
        Ok(LoadedAdapter { lora, warnings })
    }
}
