//! Reading a PEFT `adapter_config.json` (LoRA, and AdaLoRA for inference).
//!
//! Config keys we do not interpret are tolerated; those set to something other than
//! null/false/empty come back as warnings for the caller to print. Keys of PEFT features that
//! change the function and that this crate does not compute (`layer_replication`,
//! `trainable_token_indices`, `target_parameters`, LoRA variants other than DoRA…) are errors
//! naming the key.
//!
//! `target_modules`, `exclude_modules`, `rank_pattern`, `alpha_pattern` and
//! `layers_to_transform` select modules exactly as PEFT's do (`peft_pattern.rs`): pattern keys
//! are regular expressions tried in the file's order, the first match wins.
//!
//! A file that is not a JSON object, lacks `r`, or gives a key the wrong type is an error naming
//! the file and the key; the file is read only up to [`MAX_CONFIG_BYTES`].

use std::path::Path;

use serde_json::{Map, Value};
use transformer::tensor_file::read_text;

use crate::config::{BiasMode, Init, LoraConfig, Site};
use crate::error::{Error, Result};
use crate::model::SiteWeights;
use crate::peft_pattern::{ModuleSet, PatternKeys, PatternOrder};

/// The largest `adapter_config.json` read (1 MiB; PEFT writes about 2 kB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Config keys this loader interprets, or knows to leave alone.
const KNOWN: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "fan_in_fan_out",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
    "task_type",
    "base_model_name_or_path",
    "inference_mode",
    "revision",
    "peft_version",
    "auto_mapping",
    "modules_to_save",
    "use_dora",
    "lora_bias",
    "exclude_modules",
    "trainable_token_indices",
    // AdaLoRA's schedule: training only.
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    // Initialisations (they matter when training starts, not for a saved adapter).
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    // Only read with `use_qalora`, which is refused; PEFT writes its default, 16, everywhere.
    "qalora_group_size",
];

/// Keys of PEFT features that change what the adapted model computes and that this loader
/// does not compute: set to anything but null/false/empty, they are refused by name.
const REFUSED: &[(&str, &str)] = &[
    ("layer_replication", "layers repeated by the adapter"),
    ("target_parameters", "LoRA on bare nn.Parameters"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("arrow_config", "Arrow routing"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("kasa_config", "KaSA"),
    ("use_qalora", "QA-LoRA"),
    ("megatron_config", "Megatron layers"),
    (
        "ensure_weight_tying",
        "LoRA tied across the embedding and the output head",
    ),
];

/// null, false, "", {} or []: a key left at "off".
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Which tuner saved the adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Kind {
    Lora,
    /// AdaLoRA (SVD form, ΔW = B·(A ⊙ E)·α/(ranknum + 1e-5)), `init_r` its ranknum.
    AdaLora {
        init_r: usize,
    },
}

/// The parsed `adapter_config.json`.
pub(crate) struct PeftConfig {
    pub kind: Kind,
    pub r: usize,
    pub alpha: f32,
    pub targets: Option<ModuleSet>,
    pub exclude: Option<ModuleSet>,
    pub dropout: f32,
    pub bias: BiasMode,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub lora_bias: bool,
    /// `modules_to_save` entries (PEFT matches a module when its name ends with one).
    pub modules_to_save: Vec<String>,
    pub rank_pattern: PatternKeys,
    pub alpha_pattern: PatternKeys,
    /// AdaLoRA's kept triplets per module (`….lora_E` → mask), when its budget step ran.
    pub adalora_masks: Map<String, Value>,
    pub layers: Option<Vec<usize>>,
    pub layers_pattern: Vec<String>,
    pub init: Init,
    pub base_model: Option<String>,
}

/// A list of strings, or one string (`what` names the key in errors).
fn strings(v: &Value, what: &str) -> std::result::Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what} entry {v} is not a string"))
            })
            .collect(),
        _ => Err(format!("{what} is neither a list nor a string: {v}")),
    }
}

/// `target_modules` / `exclude_modules`: a string is a regular expression, a list literal names.
fn module_set(v: Option<&Value>, what: &str) -> std::result::Result<Option<ModuleSet>, String> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => ModuleSet::regex(what, s).map(Some),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(v) => Ok(Some(ModuleSet::Names(strings(v, what)?))),
    }
}

pub(crate) fn parse_config(path: &Path, warnings: &mut Vec<String>) -> Result<PeftConfig> {
    let text = read_text(path, MAX_CONFIG_BYTES)?;
    let err = |m: String| Error::config_in(path, m);
    let json: Value = serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| err("not a JSON object".into()))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let num = |k: &str, default: f64| -> Result<f64> {
        get(k).map_or(Ok(default), |v| {
            v.as_f64()
                .ok_or_else(|| err(format!("`{k}` is not a number: {v}")))
        })
    };
    let flag = |k: &str| -> Result<bool> {
        match get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(err(format!("`{k}` is not true or false: {v}"))),
        }
    };
    let kind = match get("peft_type").and_then(Value::as_str) {
        None | Some("LORA") => Kind::Lora,
        Some("ADALORA") => {
            let init_r = get("init_r")
                .and_then(Value::as_u64)
                .ok_or_else(|| err("an ADALORA config without an integer `init_r`".into()))?;
            Kind::AdaLora {
                init_r: init_r as usize,
            }
        }
        Some(other) => {
            return Err(err(format!(
                "peft_type is `{other}`; only LORA and ADALORA adapters load here"
            )));
        }
    };
    for (key, what) in REFUSED {
        if let Some(v) = get(key).filter(|v| !is_unset(v)) {
            return Err(err(format!(
                "`{key}` is {v}: {what} changes what the model computes, and this loader does not \
                 compute it; the adapter cannot be used here"
            )));
        }
    }
    for (key, value) in obj {
        let refused = REFUSED.iter().any(|(k, _)| k == key);
        if !KNOWN.contains(&key.as_str()) && !refused && !is_unset(value) {
            warnings.push(format!(
                "{}: key `{key}` = {value} is not interpreted",
                path.display()
            ));
        }
    }
    if get("fan_in_fan_out") == Some(&Value::Bool(false)) {
        warnings.push(format!("{}: fan_in_fan_out is false; GPT-2's Conv1D layers store W as (in, out), which PEFT treats as fan_in_fan_out = true (A and B are stored the same either way)", path.display()));
    }
    let r = match kind {
        Kind::AdaLora { init_r } => init_r as u64,
        Kind::Lora => get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| err("`r` is missing or not an integer".into()))?,
    };
    let targets = module_set(get("target_modules"), "target_modules").map_err(err)?;
    let exclude = module_set(get("exclude_modules"), "exclude_modules").map_err(err)?;
    let modules_to_save = match get("modules_to_save") {
        None => Vec::new(),
        Some(v) => strings(v, "modules_to_save").map_err(err)?,
    };
    // The pattern objects again, in the file's order (serde_json's Map sorts its keys).
    let order: PatternOrder =
        serde_json::from_str(&text).map_err(|e| err(format!("rank_pattern/alpha_pattern: {e}")))?;
    let ordered =
        |k: &str, o: Option<crate::peft_pattern::Ordered>| -> Result<Vec<(String, Value)>> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::Object(_)) => Ok(o.map(|o| o.0).unwrap_or_default()),
                Some(v) => Err(err(format!("`{k}` is not an object: {v}"))),
            }
        };
    let rank_entries = ordered("rank_pattern", order.rank_pattern)?;
    let alpha_entries = ordered("alpha_pattern", order.alpha_pattern)?;
    // AdaLoRA's rank_pattern is not PEFT LoRA's: full names of its E vectors → kept triplets.
    let (rank_entries, adalora_masks) = match kind {
        Kind::Lora => (rank_entries, Map::new()),
        Kind::AdaLora { .. } => (Vec::new(), rank_entries.into_iter().collect()),
    };
    let rank_pattern = PatternKeys::new("rank_pattern", rank_entries).map_err(err)?;
    let alpha_pattern = PatternKeys::new("alpha_pattern", alpha_entries).map_err(err)?;
    let layers = match get("layers_to_transform") {
        None => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_u64().map(|l| l as usize).ok_or_else(|| {
                        err(format!(
                            "layers_to_transform entry {v} is not a layer index"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(v) => Some(vec![
            v.as_u64()
                .ok_or_else(|| err(format!("layers_to_transform is {v}")))? as usize,
        ]),
    };
    let layers_pattern = match get("layers_pattern") {
        None => Vec::new(),
        Some(v) => strings(v, "layers_pattern").map_err(err)?,
    };
    let init = match get("init_lora_weights") {
        None | Some(Value::Bool(true)) => Init::KaimingUniform,
        Some(Value::Bool(false)) => Init::BothRandom,
        Some(Value::String(s)) if s == "gaussian" => Init::Gaussian,
        Some(v) => {
            warnings.push(format!("{}: init_lora_weights {v}: if that init changed the base weights (PiSSA, OLoRA, LoftQ), this adapter needs those changed weights too", path.display()));
            Init::KaimingUniform
        }
    };
    let (use_dora, lora_bias) = (flag("use_dora")?, flag("lora_bias")?);
    if use_dora && lora_bias {
        return Err(err(
            "`use_dora` and `lora_bias` are both true, which PEFT refuses to build".into(),
        ));
    }
    Ok(PeftConfig {
        kind,
        r: r as usize,
        alpha: num("lora_alpha", 8.0)? as f32,
        targets,
        exclude,
        dropout: num("lora_dropout", 0.0)? as f32,
        bias: BiasMode::parse(get("bias").and_then(Value::as_str).unwrap_or("none"))
            .map_err(|e| err(e.to_string()))?,
        use_rslora: flag("use_rslora")?,
        use_dora,
        lora_bias,
        modules_to_save,
        rank_pattern,
        alpha_pattern,
        adalora_masks,
        layers,
        layers_pattern,
        init,
        base_model: get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Our config for what was loaded: targets from the file; per-target rank/α overrides where
/// every layer of a target agrees (per-layer values live on the sites).
pub(crate) fn config_from(pc: &PeftConfig, weights: &[SiteWeights]) -> LoraConfig {
    let mut cfg = LoraConfig::new(pc.r, pc.alpha, &[]);
    for SiteWeights { site, .. } in weights {
        if !cfg.targets.contains(&site.target) {
            cfg.targets.push(site.target);
        }
    }
    for &t in &cfg.targets.clone() {
        let of: Vec<&Site> = weights
            .iter()
            .map(|w| &w.site)
            .filter(|s| s.target == t)
            .collect();
        if of.iter().all(|s| s.r == of[0].r) && of[0].r != pc.r {
            cfg.rank_pattern.insert(t, of[0].r);
        }
        if of.iter().all(|s| s.alpha == of[0].alpha) && of[0].alpha != pc.alpha {
            cfg.alpha_pattern.insert(t, of[0].alpha);
        }
    }
    cfg.layers = pc.layers.clone();
    cfg.dropout = pc.dropout;
    cfg.bias = pc.bias;
    cfg.init = pc.init;
    cfg.use_rslora = pc.use_rslora;
    cfg
}
