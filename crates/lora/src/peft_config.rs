//! Reading a PEFT `adapter_config.json`.
//!
//! Config keys we do not interpret are tolerated; those set to something other than
//! null/false/empty come back as warnings for the caller to print. Features that change the
//! function (DoRA, `lora_bias`, `modules_to_save`) are errors.
//!
//! `rank_pattern`/`alpha_pattern` keys and `target_modules` entries match a module when they
//! equal its name (`transformer.h.0.attn.c_attn`) or a dot-separated suffix of it, as PEFT's
//! do for literal names; the longest matching pattern key wins. A regular expression (a string
//! `target_modules`, or pattern keys with regex syntax) is not interpreted: a warning says so.
//!
//! A file that is not a JSON object, lacks `r`, or gives a key the wrong type is an error naming
//! the file and the key; the file is read only up to [`MAX_CONFIG_BYTES`].

use std::path::Path;

use serde_json::{Map, Value};
use tensor::Tensor;
use transformer::tensor_file::read_text;

use crate::config::{BiasMode, Init, LoraConfig, Site};
use crate::error::{Error, Result};

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

fn has_regex_syntax(s: &str) -> bool {
    s.chars().any(|c| "*+?()[]{}|^$\\".contains(c))
}

/// Whether the literal pattern `pat` names the module `key` (equal, or a suffix after a dot).
pub(crate) fn matches(key: &str, pat: &str) -> bool {
    key == pat || key.ends_with(&format!(".{pat}"))
}

/// The value of the longest key of `patterns` that names `key`.
pub(crate) fn pattern_value<'a>(patterns: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    let mut found = patterns
        .iter()
        .filter(|(p, _)| matches(key, p))
        .collect::<Vec<_>>();
    found.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    found.first().map(|(_, v)| *v)
}

/// The parsed `adapter_config.json`.
pub(crate) struct PeftConfig {
    pub r: usize,
    pub alpha: f32,
    pub targets: Option<Vec<String>>,
    pub dropout: f32,
    pub bias: BiasMode,
    pub use_rslora: bool,
    pub rank_pattern: Map<String, Value>,
    pub alpha_pattern: Map<String, Value>,
    pub layers: Option<Vec<usize>>,
    pub init: Init,
    pub base_model: Option<String>,
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
    let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
    match get("peft_type").and_then(Value::as_str) {
        None | Some("LORA") => {}
        Some(other) => {
            return Err(err(format!(
                "peft_type is `{other}`; only LORA adapters load here"
            )));
        }
    }
    for (key, what) in [("use_dora", "DoRA"), ("lora_bias", "a bias on lora_B")] {
        if flag(key) {
            return Err(err(format!("`{key}` is true: {what} is not supported")));
        }
    }
    if get("modules_to_save").is_some_and(|v| !is_unset(v)) {
        return Err(err(
            "`modules_to_save` is set: whole-module copies are not supported".into(),
        ));
    }
    for (key, value) in obj {
        if !KNOWN.contains(&key.as_str()) && !is_unset(value) {
            warnings.push(format!(
                "{}: key `{key}` = {value} is not interpreted",
                path.display()
            ));
        }
    }
    if get("fan_in_fan_out") == Some(&Value::Bool(false)) {
        warnings.push(format!("{}: fan_in_fan_out is false; GPT-2's Conv1D layers store W as (in, out), which PEFT treats as fan_in_fan_out = true (A and B are stored the same either way)", path.display()));
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| err("`r` is missing or not an integer".into()))?;
    let targets = match get("target_modules") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| err(format!("target_modules entry {v} is not a string")))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(Value::String(s)) => {
            warnings.push(format!("{}: target_modules `{s}` is a regular expression, not checked; the weights file decides what is adapted", path.display()));
            None
        }
        Some(v) => {
            return Err(err(format!(
                "target_modules is neither a list nor a string: {v}"
            )));
        }
    };
    let mut patterns = |k: &str| -> Result<Map<String, Value>> {
        let map = get(k).map_or(Ok(Map::new()), |v| {
            v.as_object()
                .cloned()
                .ok_or_else(|| err(format!("`{k}` is not an object")))
        })?;
        for p in map.keys().filter(|p| has_regex_syntax(p)) {
            warnings.push(format!(
                "{}: {k} key `{p}` is a regular expression; only literal module names are matched",
                path.display()
            ));
        }
        Ok(map)
    };
    let (rank_pattern, alpha_pattern) = (patterns("rank_pattern")?, patterns("alpha_pattern")?);
    let layers = match get("layers_to_transform") {
        None => None,
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
    let init = match get("init_lora_weights") {
        None | Some(Value::Bool(true)) => Init::KaimingUniform,
        Some(Value::Bool(false)) => Init::BothRandom,
        Some(Value::String(s)) if s == "gaussian" => Init::Gaussian,
        Some(v) => {
            warnings.push(format!("{}: init_lora_weights {v}: if that init changed the base weights (PiSSA, OLoRA, LoftQ), this adapter needs those changed weights too", path.display()));
            Init::KaimingUniform
        }
    };
    Ok(PeftConfig {
        r: r as usize,
        alpha: num("lora_alpha", 8.0)? as f32,
        targets,
        dropout: num("lora_dropout", 0.0)? as f32,
        bias: BiasMode::parse(get("bias").and_then(Value::as_str).unwrap_or("none"))
            .map_err(|e| err(e.to_string()))?,
        use_rslora: flag("use_rslora"),
        rank_pattern,
        alpha_pattern,
        layers,
        init,
        base_model: get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Our config for what was loaded: targets from the file; per-target rank/α overrides where
/// every layer of a target agrees (per-layer values live on the sites).
pub(crate) fn config_from(pc: &PeftConfig, weights: &[(Site, Tensor, Tensor)]) -> LoraConfig {
    let mut cfg = LoraConfig::new(pc.r, pc.alpha, &[]);
    for (site, _, _) in weights {
        if !cfg.targets.contains(&site.target) {
            cfg.targets.push(site.target);
        }
    }
    for &t in &cfg.targets.clone() {
        let of: Vec<&Site> = weights
            .iter()
            .map(|w| &w.0)
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
