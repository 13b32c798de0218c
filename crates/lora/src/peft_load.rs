//! Loading an adapter that PEFT saved (or that [`LoraModel::save_peft`] wrote) for a given
//! base model.
//!
//! The weights file decides what is adapted: every `…h.{i}.{module}.lora_A.weight` /
//! `lora_B.weight` pair becomes a whole-module adapter. `adapter_config.json` (read by
//! `peft_config.rs`) supplies α, the scaling rule and dropout, and is checked against the file
//! and the model, selecting modules, ranks and α exactly as PEFT does (`peft_pattern.rs`);
//! anything that does not fit is an error saying what differs:
//! - a layer the model lacks, or a layer `target_modules` names that the file lacks (layer count);
//! - A not (r, in) or B not (out, r) for the model's W (in, out) (shapes);
//! - weights for a module `target_modules` does not name, or `exclude_modules` names (targets);
//! - a rank other than `r` / `rank_pattern` says, or a rank of 0 (rank);
//! - `layers_to_transform` naming a layer the model lacks (layer count).
//!
//! What else PEFT saves in an adapter, and how it is read:
//! - `lora_B.bias` (`lora_bias`): Δy = s·((x·Aᵀ)·Bᵀ + b_B), merged as b ← b + s·b_B;
//! - `lora_magnitude_vector` (`use_dora`): DoRA's magnitude m, see [`crate::linear`];
//! - `lora_A`, `lora_E`, `lora_B` (`peft_type` ADALORA): ΔW = B·(A ⊙ E)·α/(ranknum + 1e-5),
//!   read as the LoRA with A' = A ⊙ E (each row of A times its E) and s = α/(init_r + 1e-5),
//!   PEFT's ranknum being `init_r` for every module, pruned or not;
//! - model parameters (`bias` all / lora_only, `…base_layer.bias`; `modules_to_save` copies of
//!   layer norms): they replace the model's when the adapter is attached;
//! - `wte.token_adapter.trainable_tokens_delta` (`trainable_token_indices`): the new rows of the
//!   tied embedding (PEFT ties the output head's rows to them), written into `wte` at attach.
//!
//! - LoRA on the embedding (`wte.lora_embedding_A/B`) or on the tied output head
//!   (`lm_head.lora_A/B`, with `lm_head.base_layer.weight`, the tied matrix), and a
//!   `modules_to_save` copy of `wte`: PEFT uses them for one of the tied matrix's two uses
//!   only, read as a [`transformer::TokenAdapter`] ([`crate::token_lora`]).
//!
//! The weights file is read by [`transformer::tensor_file::read_tensors`] (or, for
//! `adapter_model.bin`, by [`transformer::torch_pickle::read_state_dict`]), so a damaged file
//! (truncated, a header that lies, an unreadable dtype) is an error naming it, and so is a NaN
//! or infinite value in any tensor (the tensor and the count of such values are named).
//! A tensor given twice (with and without the `transformer.` prefix) is an error too.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tensor::Tensor;
use transformer::tensor_file::read_tensors;
use transformer::torch_pickle::read_state_dict;
use transformer::{Gpt2, GptConfig, NamedTensor};

use crate::config::{Site, layers_phrase, module_saved, scaling};
use crate::error::{Error, Result};
use crate::model::{LoraModel, SiteWeights, TokenRows};
use crate::peft_config::{Kind, PeftConfig, config_from, parse_config};
use crate::peft_pattern::layer_index;
use crate::peft_save::{CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE};
use crate::target::{Module, Target};
use crate::token_lora::{TokenFile, token_lora};

/// An adapter read from disk, and what the caller may want to print about its config.
pub struct LoadedAdapter {
    pub lora: LoraModel,
    pub warnings: Vec<String>,
}

/// A tensor read from the file: shape, values.
type Weight = (Vec<usize>, Vec<f32>);

/// Which tensor of an adapted Linear a key names.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    A,
    B,
    /// AdaLoRA's singular values, (r, 1).
    E,
    /// `lora_B.bias` (`lora_bias = true`).
    LoraBias,
    /// DoRA's magnitude (out).
    Magnitude,
}

const PARTS: &[(&str, Part)] = &[
    (".lora_A.weight", Part::A),
    (".lora_B.weight", Part::B),
    (".lora_B.bias", Part::LoraBias),
    (".lora_magnitude_vector.weight", Part::Magnitude),
    (".lora_magnitude_vector", Part::Magnitude),
    (".lora_A", Part::A),
    (".lora_B", Part::B),
    (".lora_E", Part::E),
];

/// `h.{i}.{module}.<part>` (after the prefix) → (layer, module, part).
fn parse_lora_key(rest: &str) -> Option<(usize, Module, Part)> {
    let (stem, part) = PARTS
        .iter()
        .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|s| (s, *part)))?;
    let (layer, path) = stem.strip_prefix("h.")?.split_once('.')?;
    let module = Module::ALL.into_iter().find(|m| m.path() == path)?;
    Some((layer.parse().ok()?, module, part))
}

fn target_of(module: Module) -> Target {
    match module {
        Module::CAttn => Target::CAttn,
        Module::AttnProj => Target::O,
        Module::Fc => Target::Fc,
        Module::MlpProj => Target::Proj,
    }
}

/// The tensors of one adapted Linear.
#[derive(Default)]
struct ModuleTensors {
    a: Option<Weight>,
    b: Option<Weight>,
    e: Option<Weight>,
    lora_bias: Option<Weight>,
    magnitude: Option<Weight>,
}

impl ModuleTensors {
    fn slot(&mut self, part: Part) -> &mut Option<Weight> {
        match part {
            Part::A => &mut self.a,
            Part::B => &mut self.b,
            Part::E => &mut self.e,
            Part::LoraBias => &mut self.lora_bias,
            Part::Magnitude => &mut self.magnitude,
        }
    }
}

/// The tensors of a weights file, sorted.
struct FileWeights {
    /// `transformer.` when the keys carry it (PEFT's module names then start with it).
    prefix: &'static str,
    modules: BTreeMap<(usize, Module), ModuleTensors>,
    /// Model parameters the file replaces (size-table names): biases, modules_to_save copies.
    params: Vec<NamedTensor>,
    /// `trainable_tokens_delta`: (n, C), the new rows of `wte`.
    token_delta: Option<Weight>,
    /// LoRA on `wte` or `lm_head`, a copy of `wte`.
    token: TokenFile,
}

/// PEFT's weights file when `save_pretrained(safe_serialization=False)` wrote the adapter:
/// PyTorch's `torch.save` zip of the state dict, read by [`transformer::torch_pickle`] (which
/// rebuilds tensors and never runs code).
pub const BIN_WEIGHTS_FILE: &str = "adapter_model.bin";

/// The weights file of the adapter in `dir`: `adapter_model.safetensors`, or
/// `adapter_model.bin` when only that exists (PEFT prefers the safetensors file too).
fn weights_path(dir: &Path) -> std::path::PathBuf {
    let (safe, bin) = (dir.join(WEIGHTS_FILE), dir.join(BIN_WEIGHTS_FILE));
    if !safe.exists() && bin.exists() {
        bin
    } else {
        safe
    }
}

/// The module of a model parameter (`h.0.ln_2.weight` → `h.0.ln_2`).
fn module_of(param: &str) -> &str {
    param.rsplit_once('.').map_or(param, |(m, _)| m)
}

/// Reads the weights file and sorts its tensors; a key that is none of the above is an error.
fn read_weights(path: &Path, model: &Gpt2, pc: &PeftConfig) -> Result<FileWeights> {
    let mismatch = |m: String| Error::mismatch(Some(path), m);
    let n_layer = model.config.n_layer;
    let shapes: BTreeMap<String, Vec<usize>> = transformer::parameter_shapes(&model.config)
        .into_iter()
        .collect();
    let mut file = FileWeights {
        prefix: "",
        modules: BTreeMap::new(),
        params: Vec::new(),
        token_delta: None,
        token: TokenFile::default(),
    };
    let wte_saved = module_saved(&pc.modules_to_save, "wte.weight");
    let tensors = if path.extension().is_some_and(|e| e == "bin") {
        read_state_dict(path, |_| true)?
    } else {
        read_tensors(path)?
    };
    for (key, shape, data) in tensors {
        // PEFT's prefix, then GPT2LMHeadModel's (absent when the base was a bare GPT2Model).
        let rest = key.strip_prefix("base_model.model.").unwrap_or("");
        let rest = match rest.strip_prefix("transformer.") {
            Some(r) => {
                file.prefix = "transformer.";
                r
            }
            None => rest,
        };
        if rest == "lm_head.base_layer.weight" {
            // The head's base weight: the tied matrix (PEFT loads it into both uses).
            let name = match model.lm_head {
                Some(_) => "lm_head.weight",
                None => "wte.weight",
            };
            if Some(&shape) != shapes.get(name) {
                return Err(mismatch(format!(
                    "tensor `{key}` is {shape:?}, the model's `{name}` is {:?}",
                    shapes.get(name)
                )));
            }
            file.params.push((name.to_string(), shape, data));
            continue;
        }
        if (rest.starts_with("wte.") || rest.starts_with("lm_head."))
            && rest != "wte.token_adapter.trainable_tokens_delta"
        {
            file.token
                .take(rest, &shape, data, wte_saved)
                .map_err(|m| mismatch(format!("tensor `{key}`: {m}")))?;
            continue;
        }
        if let Some((layer, module, part)) = parse_lora_key(rest) {
            if layer >= n_layer {
                return Err(mismatch(format!(
                    "tensor `{key}` is for layer {layer}, but the model has {}",
                    layers_phrase(n_layer)
                )));
            }
            let slot = file.modules.entry((layer, module)).or_default().slot(part);
            if slot.replace((shape, data)).is_some() {
                return Err(mismatch(format!(
                    "tensor `{key}`: the file holds this LoRA weight twice (with and without \
                     the `transformer.` prefix)"
                )));
            }
            continue;
        }
        if rest == "wte.token_adapter.trainable_tokens_delta" {
            if file.token_delta.replace((shape, data)).is_some() {
                return Err(mismatch(format!("tensor `{key}` is given twice")));
            }
            continue;
        }
        // A parameter of a LoRA-wrapped Linear is saved under its `base_layer`.
        let name = rest.replace(".base_layer.", ".");
        let Some(want) = shapes.get(&name) else {
            return Err(mismatch(format!(
                "tensor `{key}` is neither a LoRA weight of a GPT-2 Linear \
                 ({KEY_PREFIX}h.{{i}}.{{attn.c_attn|attn.c_proj|mlp.c_fc|mlp.c_proj}}.lora_{{A|B}}.weight) \
                 nor a parameter of the model"
            )));
        };
        let saved = pc
            .modules_to_save
            .iter()
            .any(|m| format!("{}{}", file.prefix, module_of(&name)).ends_with(m.as_str()));
        if !name.ends_with(".bias") && !saved {
            return Err(mismatch(format!(
                "tensor `{key}` replaces the model's `{name}`, but modules_to_save {:?} does not \
                 name its module",
                pc.modules_to_save
            )));
        }
        if *want != shape {
            return Err(mismatch(format!(
                "tensor `{key}` is {shape:?}, the model's `{name}` is {want:?}"
            )));
        }
        if file.params.iter().any(|(n, _, _)| *n == name) {
            return Err(mismatch(format!(
                "tensor `{key}`: the file holds the parameter `{name}` twice"
            )));
        }
        file.params.push((name, shape, data));
    }
    Ok(file)
}

/// Whether PEFT adapts the module `name` of block `layer` under this config (its
/// `check_target_module_exists`); `None` when `target_modules` is absent (the file decides).
pub(crate) fn peft_targets(
    pc: &PeftConfig,
    name: &str,
) -> std::result::Result<Option<bool>, String> {
    if let Some(ex) = &pc.exclude
        && ex.matches(name)?
    {
        return Ok(Some(false));
    }
    for m in &pc.modules_to_save {
        let re = fancy_regex::Regex::new(&format!(r"^(^|.*\.){m}($|\..*)")).map_err(|e| {
            format!("modules_to_save `{m}` is not a pattern this loader reads: {e}")
        })?;
        if re.is_match(name).map_err(|e| e.to_string())? {
            return Ok(Some(false));
        }
    }
    let Some(targets) = &pc.targets else {
        return Ok(None);
    };
    if !targets.matches(name)? {
        return Ok(Some(false));
    }
    match (&pc.layers, targets.is_list()) {
        (Some(layers), true) => {
            let index = layer_index(name, &pc.layers_pattern)?;
            Ok(Some(index.is_some_and(|i| layers.contains(&i))))
        }
        _ => Ok(Some(true)),
    }
}

/// The modules the config adapts must be exactly those the file holds.
fn check_targets(pc: &PeftConfig, file: &FileWeights, n_layer: usize, path: &Path) -> Result<()> {
    let mismatch = |m: String| Error::mismatch(Some(path), m);
    if let Some(l) = pc.layers.iter().flatten().find(|&&l| l >= n_layer) {
        return Err(mismatch(format!(
            "layers_to_transform names layer {l}, but the model has {}",
            layers_phrase(n_layer)
        )));
    }
    let targets = pc
        .targets
        .as_ref()
        .map_or_else(|| "(none)".to_string(), |t| t.to_string());
    for layer in 0..n_layer {
        for module in Module::ALL {
            let name = format!("{}h.{layer}.{}", file.prefix, module.path());
            let held = file.modules.contains_key(&(layer, module));
            let named = match peft_targets(pc, &name).map_err(|m| Error::config_in(path, m))? {
                Some(named) => named,
                None => held, // no target_modules: the file decides
            };
            if named && !held {
                let in_file: Vec<usize> = file
                    .modules
                    .keys()
                    .filter(|(_, m)| *m == module)
                    .map(|(l, _)| *l)
                    .collect();
                return Err(mismatch(format!(
                    "target_modules {targets} names h.{layer}.{path} but the file has no weights \
                     for it (the model has {}; the file has {path} weights in layers {in_file:?})",
                    layers_phrase(n_layer),
                    path = module.path(),
                )));
            }
            if held && !named {
                let why = pc.layers.as_ref().map_or_else(String::new, |l| {
                    format!(", or layers_to_transform {l:?} leaves out")
                });
                return Err(mismatch(format!(
                    "the file has weights for h.{layer}.{}, which target_modules {targets} does \
                     not name (or exclude_modules / modules_to_save exclude{why})",
                    module.path()
                )));
            }
        }
    }
    Ok(())
}

/// The value of an AdaLoRA mask entry: how many triplets it keeps.
fn kept(mask: &Value) -> Option<usize> {
    let a = mask.as_array()?;
    let mut n = 0;
    for v in a {
        n += usize::from(v.as_bool()?);
    }
    Some(n)
}

/// One adapted Linear of the file, checked: its site, A (AdaLoRA's A ⊙ E), B and extras.
struct FileSite {
    site: Site,
    a: Vec<f32>,
    b: Weight,
    lora_bias: Option<Weight>,
    magnitude: Option<Weight>,
}

/// One (layer, module) of the file as a site with its tensors: checks every shape against the
/// model's W (in, out), the rank against the config, and builds A' = A ⊙ E for AdaLoRA.
fn site_of(
    pc: &PeftConfig,
    prefix: &str,
    layer: usize,
    module: Module,
    t: ModuleTensors,
    gpt: &GptConfig,
) -> std::result::Result<Option<FileSite>, String> {
    let stem = format!("{KEY_PREFIX}h.{layer}.{}", module.path());
    let name = format!("{prefix}h.{layer}.{}", module.path());
    let (n_in, n_out) = module.shape(gpt);
    let (Some((sa, a)), Some(b)) = (t.a, t.b) else {
        return Err(format!("{stem}: lora_A and lora_B must both be present"));
    };
    let sb = &b.0;
    let r = sa.first().copied().unwrap_or(0);
    if sa != [r, n_in] || *sb != [n_out, r] {
        return Err(format!(
            "{stem}: lora_A is {sa:?} and lora_B {sb:?}, but the model's W is [{n_in}, {n_out}], \
             so they must be [r, {n_in}] and [{n_out}, r]"
        ));
    }
    for (what, tensor, wanted) in [
        ("lora_B.bias", &t.lora_bias, pc.lora_bias),
        ("lora_magnitude_vector", &t.magnitude, pc.use_dora),
    ] {
        match (tensor, wanted) {
            (Some((shape, _)), true) if *shape != [n_out] => {
                return Err(format!(
                    "{stem}: {what} is {shape:?}; the module has {n_out} outputs"
                ));
            }
            (Some(_), false) => {
                let key = if what == "lora_B.bias" {
                    "lora_bias"
                } else {
                    "use_dora"
                };
                return Err(format!(
                    "{stem}: the file has {what}, but adapter_config.json does not set `{key}`"
                ));
            }
            (None, true) => {
                return Err(format!(
                    "{stem}: adapter_config.json sets {} but the file has no {what} for this module",
                    if what == "lora_B.bias" {
                        "lora_bias"
                    } else {
                        "use_dora"
                    }
                ));
            }
            _ => {}
        }
    }
    let (a, r_want, scale, alpha) = match pc.kind {
        Kind::Lora => {
            if t.e.is_some() {
                return Err(format!(
                    "{stem}: the file has lora_E (AdaLoRA) but peft_type is LORA"
                ));
            }
            let want_r = pc.rank_pattern.number(&name)?.map_or(pc.r, |v| v as usize);
            let alpha = pc
                .alpha_pattern
                .number(&name)?
                .map_or(pc.alpha, |v| v as f32);
            (a, want_r, scaling(alpha, r, pc.use_rslora), alpha)
        }
        Kind::AdaLora { init_r } => {
            let Some((se, e)) = t.e else {
                return Err(format!("{stem}: an ADALORA adapter without lora_E"));
            };
            if se != [r, 1] {
                return Err(format!(
                    "{stem}: lora_E is {se:?}, lora_A {sa:?}; E must be [r, 1]"
                ));
            }
            let want_r = match pc.adalora_masks.get(&format!("{name}.lora_E")) {
                None => init_r,
                Some(m) => kept(m).ok_or_else(|| {
                    format!("rank_pattern entry `{name}.lora_E` is not a list of true/false")
                })?,
            };
            if r == 0 && want_r == 0 {
                return Ok(None); // every triplet pruned: ΔW = 0
            }
            // A' = A ⊙ E: row k of A times E[k].
            let a = a
                .chunks(n_in)
                .zip(&e)
                .flat_map(|(row, ek)| row.iter().map(move |v| v * ek))
                .collect();
            // PEFT: scaling = lora_alpha if lora_alpha > 0 else init_r.
            let alpha = if pc.alpha > 0.0 {
                pc.alpha as f64
            } else {
                init_r as f64
            };
            let s = alpha / (init_r as f64 + 1e-5);
            (a, want_r, s as f32, (s * r as f64) as f32)
        }
    };
    if r != r_want {
        return Err(format!(
            "{stem}: rank {r} in the file, but adapter_config.json says r = {r_want}"
        ));
    }
    if r == 0 {
        return Err(format!(
            "{stem}: rank 0 (lora_A is {sa:?}); a LoRA rank is at least 1"
        ));
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(format!(
            "{stem}: lora_alpha is {alpha} in adapter_config.json; it must be positive and finite"
        ));
    }
    let site = Site {
        layer,
        target: target_of(module),
        in_features: n_in,
        col0: 0,
        width: n_out,
        r,
        alpha,
        scale,
    };
    Ok(Some(FileSite {
        site,
        a,
        b,
        lora_bias: t.lora_bias,
        magnitude: t.magnitude,
    }))
}

/// `trainable_token_indices` (a list, or `{module: list}` naming the embedding) and the file's
/// delta rows as the rows of `wte` they replace.
fn token_rows(
    json: Option<&Value>,
    delta: Option<Weight>,
    model: &Gpt2,
) -> std::result::Result<Option<TokenRows>, String> {
    let indices = match json {
        None => None,
        Some(Value::Array(a)) => Some(a.clone()),
        Some(Value::Object(o)) => {
            let mut lists = o.iter();
            match (lists.next(), lists.next()) {
                (Some((m, Value::Array(a))), None) if m == "wte" || m.ends_with(".wte") => {
                    Some(a.clone())
                }
                _ => {
                    return Err(format!(
                        "trainable_token_indices {} names modules other than `wte`",
                        Value::Object(o.clone())
                    ));
                }
            }
        }
        Some(v) => return Err(format!("trainable_token_indices is {v}, not a list")),
    };
    let (v, c) = (model.config.vocab_size, model.config.n_embd);
    match (indices, delta) {
        (None, None) => Ok(None),
        (Some(_), None) => {
            Err("trainable_token_indices is set, but the file has no trainable_tokens_delta".into())
        }
        (None, Some(_)) => Err(
            "the file has trainable_tokens_delta, but trainable_token_indices is not set".into(),
        ),
        (Some(idx), Some((shape, rows))) => {
            let ids = idx
                .iter()
                .map(|i| i.as_u64().filter(|&i| (i as usize) < v).map(|i| i as usize))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    format!(
                        "trainable_token_indices {idx:?}: every entry must be a token id below {v}"
                    )
                })?;
            if shape != [ids.len(), c] {
                return Err(format!(
                    "trainable_tokens_delta is {shape:?}, but {} token ids of width {c} need [{}, {c}]",
                    ids.len(),
                    ids.len()
                ));
            }
            Ok(Some(TokenRows { ids, rows }))
        }
    }
}

impl LoraModel {
    /// Reads `dir/adapter_config.json` + `dir/adapter_model.safetensors` (PEFT's layout; or
    /// `adapter_model.bin`, PyTorch's pickle, when only that exists: [`BIN_WEIGHTS_FILE`]) for
    /// `model`, checks that they fit it, and puts the tensors on the model's device. The result
    /// is detached: [`LoraModel::attach`] it to run it, or attach and [`LoraModel::merge`] it.
    pub fn load_peft(dir: impl AsRef<Path>, model: &Gpt2) -> Result<LoadedAdapter> {
        let dir = dir.as_ref();
        let mut warnings = Vec::new();
        let config_path = dir.join(CONFIG_FILE);
        let mut pc = parse_config(&config_path, &mut warnings)?;
        let path = weights_path(dir);
        let mut file = read_weights(&path, model, &pc)?;
        check_targets(&pc, &file, model.config.n_layer, &path)?;
        let token = token_lora(&pc, std::mem::take(&mut file.token), file.prefix, model)
            .map_err(|m| Error::mismatch(Some(&path), m))?;
        let saves_modules = !pc.modules_to_save.is_empty();
        // A copy of `wte` is the token adapter's; the config's modules_to_save are the rest.
        pc.modules_to_save
            .retain(|m| !module_saved(std::slice::from_ref(m), "wte.weight"));
        let device = model.wte.value().device();
        let upload = |shape: &[usize], v: Vec<f32>| Tensor::from_vec(v, shape, &device);
        let mut weights = Vec::new();
        let modules = std::mem::take(&mut file.modules);
        for ((layer, module), tensors) in modules {
            let Some(fs) = site_of(&pc, file.prefix, layer, module, tensors, &model.config)
                .map_err(|m| Error::mismatch(Some(&path), m))?
            else {
                continue;
            };
            weights.push(SiteWeights {
                a: upload(&[fs.site.r, fs.site.in_features], fs.a)?,
                b: upload(&fs.b.0, fs.b.1)?,
                lora_bias: fs.lora_bias.map(|(s, v)| upload(&s, v)).transpose()?,
                magnitude: fs.magnitude.map(|(s, v)| upload(&s, v)).transpose()?,
                site: fs.site,
            });
        }
        let config_json: Value = serde_json::from_str(&transformer::tensor_file::read_text(
            &config_path,
            crate::MAX_ADAPTER_CONFIG_BYTES,
        )?)
        .map_err(|e| Error::config_in(&config_path, e.to_string()))?;
        let tokens = token_rows(
            config_json
                .get("trainable_token_indices")
                .filter(|v| !v.is_null()),
            file.token_delta.take(),
            model,
        )
        .map_err(|m| Error::mismatch(Some(&path), m))?;
        if weights.is_empty() && file.params.is_empty() && tokens.is_none() && token.is_none() {
            return Err(Error::mismatch(
                Some(&path),
                "the file holds no LoRA weights",
            ));
        }
        let config = config_from(&pc, &weights);
        if !weights.is_empty()
            && let Err(Error::Config { message, .. }) = config.validate()
        {
            return Err(Error::config_in(&config_path, message));
        }
        let mut eval_only = Vec::new();
        for (on, what) in [
            (pc.use_dora, "DoRA magnitudes (use_dora)"),
            (pc.lora_bias, "biases of lora_B (lora_bias)"),
            (saves_modules, "modules_to_save copies"),
            (
                token.as_ref().is_some_and(|t| t.embed.is_some()),
                "LoRA on the token embedding (lora_embedding_A/B)",
            ),
            (
                token.as_ref().is_some_and(|t| t.head.is_some()),
                "LoRA on the tied output head (lm_head)",
            ),
            (
                tokens.is_some(),
                "trainable token rows (trainable_token_indices)",
            ),
        ] {
            if on {
                eval_only.push(what.to_string());
            }
        }
        let mut lora = LoraModel::from_weights(config, weights, file.params, 0);
        lora.base_model = pc.base_model;
        lora.set_loaded_extras(tokens, eval_only);
        lora.set_token_lora(token);
        Ok(LoadedAdapter { lora, warnings })
    }
}
