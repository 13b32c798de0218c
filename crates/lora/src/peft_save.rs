//! Saving in PEFT's layout, so `PeftModel.from_pretrained(gpt2, dir)` loads what we trained:
//!
//! ```text
//! dir/adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
//!                                 "target_modules": ["c_attn"], "fan_in_fan_out": true, ...}
//! dir/adapter_model.safetensors  base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight  (r, in)
//!                                base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight  (out, r)
//!                                (+ base_model.model.transformer.<bias> for bias modes all/lora_only,
//!                                 `h.{i}.attn.c_attn.base_layer.bias` for a Linear with a LoRA,
//!                                 and every parameter of `modules_to_save`: `ln_f.weight`, …;
//!                                 `h.{i}.….lora_magnitude_vector` (out) with DoRA)
//! ```
//! Each file is replaced atomically (the pair is written weights first, then the config).
//!
//! Adapters made with a PiSSA or OLoRA init are saved as PEFT saves them with
//! `path_initial_model_for_weight_conversion`: the plain LoRA of rank 2r and α 2α (√2·α with
//! rsLoRA) that adds the trained change to the original W0 (see [`crate::base_init`]).
//!
//! q, k and v cannot be written as PEFT targets: PEFT only sees the fused `c_attn`. A q/v
//! adapter is therefore saved as the equivalent `c_attn` adapter of rank r_q + r_v: A stacked,
//! B block-diagonal into the q and v column blocks, zeros elsewhere:
//! ```text
//! A_c = [A_q; A_v]  (r_q + r_v, C)      B_c = ┌ B_q·(s_q/s_c)   0           ┐  rows [0, C)
//!                                             │ 0              0           │  rows [C, 2C)
//!                                             └ 0              B_v·(s_v/s_c)┘  rows [2C, 3C)
//! ```
//! so that s_c·(x·A_cᵀ)·B_cᵀ = s_q·(x·A_qᵀ)·B_qᵀ in the q columns and likewise for v. s_c is
//! the first slice's scale (the ratios are exactly 1 when the slices share r and α), written as
//! `rank_pattern`/`alpha_pattern` entries for `c_attn`. Loading the file back gives a `c_attn`
//! adapter that computes the same function.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Map, Value, json};
use transformer::SaveDtype;
use transformer::tensor_file::{write_file_atomically, write_tensors};

use crate::base_init;
use crate::config::{Init, Site};
use crate::error::{Error, Result};
use crate::linear::LoraUpdate;
use crate::model::LoraModel;
use crate::target::Module;

/// What PEFT puts before a GPT2LMHeadModel's parameter names in an adapter file.
pub const KEY_PREFIX: &str = "base_model.model.transformer.";

/// The adapter's config file in a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The adapter's weights file in a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The `target_modules` entry that selects `module` in every GPT-2 block, and nothing else
/// (PEFT matches an entry against a module's name, or a suffix of it after a dot).
pub fn peft_target_name(module: Module) -> &'static str {
    match module {
        Module::CAttn => "c_attn",
        Module::AttnProj => "attn.c_proj",
        Module::Fc => "c_fc",
        Module::MlpProj => "mlp.c_proj",
    }
}

/// One LoRA of one Linear, as PEFT sees it: A (r, in), B (out, r), row-major on the host.
pub(crate) struct PeftModule {
    pub layer: usize,
    pub module: Module,
    pub r: usize,
    pub alpha: f32,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
    /// DoRA's magnitude m (out), PEFT's `lora_magnitude_vector`.
    pub magnitude: Option<Vec<f32>>,
}

/// A JSON number: an integer when the value is one (PEFT's configs write `"lora_alpha": 8`),
/// else the shortest decimal that reads back as the same f32 (0.05, not 0.05000000074505806).
fn number(x: f32) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e9 {
        json!(x as i64)
    } else {
        json!(x.to_string().parse::<f64>().unwrap_or(x as f64))
    }
}

impl LoraModel {
    /// α of a rank-2r converted adapter with the scale of rank r and α `alpha`: 2α, or √2·α
    /// with rsLoRA (PEFT's `save_pretrained` with `path_initial_model_for_weight_conversion`).
    fn converted_alpha(&self, alpha: f32) -> f32 {
        if self.config.use_rslora {
            alpha * std::f32::consts::SQRT_2
        } else {
            2.0 * alpha
        }
    }

    /// Site `i`'s rank, α, A and B as saved: after a PiSSA/OLoRA init, the plain LoRA of rank 2r
    /// that adds the trained change to the original W0 ([`crate::base_init::converted`]).
    fn saved_site(
        &self,
        i: usize,
        site: &Site,
        lora: &LoraUpdate,
    ) -> Result<(usize, f32, Vec<f32>, Vec<f32>)> {
        let (a, b) = (lora.a.value().to_vec()?, lora.b.value().to_vec()?);
        match self.initial.get(i) {
            None => Ok((site.r, site.alpha, a, b)),
            Some((a0, b0)) => {
                let (a, b) = base_init::converted(&a, &b, a0, b0, site.width, site.r);
                Ok((2 * site.r, self.converted_alpha(site.alpha), a, b))
            }
        }
    }

    /// The adapters grouped per Linear, q/k/v slices folded into one `c_attn` update.
    pub(crate) fn peft_modules(&self) -> Result<Vec<PeftModule>> {
        type Part<'s> = (&'s Site, usize, f32, Vec<f32>, Vec<f32>);
        let mut groups: BTreeMap<(usize, Module), Vec<Part>> = BTreeMap::new();
        for (i, (site, lora)) in self.sites().enumerate() {
            let (r, alpha, a, b) = self.saved_site(i, site, lora)?;
            groups
                .entry((site.layer, site.target.module()))
                .or_default()
                .push((site, r, alpha, a, b));
        }
        let mut out = Vec::with_capacity(groups.len());
        for ((layer, module), mut parts) in groups {
            let in_f = parts[0].0.in_features;
            let first = parts[0].0;
            // A whole Linear's site spans all of W's columns; slices are of c_attn (C, 3C).
            let out_f = if first.target.is_slice() {
                3 * in_f
            } else {
                first.width
            };
            let dora = |layer: usize, module: Module| {
                self.sites()
                    .find(|(s, _)| s.layer == layer && s.target.module() == module)
                    .and_then(|(_, l)| l.dora.as_ref().map(|d| d.magnitude.value().to_vec()))
                    .transpose()
            };
            if parts.len() == 1 && !first.target.is_slice() {
                let magnitude = dora(layer, module)?;
                let (_, r, alpha, a, b) = parts.remove(0);
                out.push(PeftModule {
                    layer,
                    module,
                    r,
                    alpha,
                    a,
                    b,
                    in_features: in_f,
                    out_features: out_f,
                    magnitude,
                });
                continue;
            }
            if dora(layer, module)?.is_some() {
                return Err(Error::State(format!(
                    "h.{layer}.{}: DoRA on column slices cannot be saved for PEFT",
                    module.path()
                )));
            }
            // Slices of c_attn: stack A, place each B in its column block, rescaled to s_c.
            let r: usize = parts.iter().map(|p| p.1).sum();
            let s_c = first.scale;
            let alpha = if self.config.use_rslora {
                s_c * (r as f32).sqrt()
            } else {
                s_c * r as f32
            };
            let (mut a, mut b) = (Vec::with_capacity(r * in_f), vec![0.0f32; out_f * r]);
            let mut k0 = 0; // first row of A_c (column of B_c) of this part
            for (site, ri, _, ai, bi) in &parts {
                a.extend_from_slice(ai);
                let ratio = site.scale / s_c;
                // bi: (width, ri)
                for j in 0..site.width {
                    for k in 0..*ri {
                        // ×1 (equal scales) leaves the value's bits as they are.
                        b[(site.col0 + j) * r + k0 + k] = bi[j * ri + k] * ratio;
                    }
                }
                k0 += ri;
            }
            out.push(PeftModule {
                layer,
                module,
                r,
                alpha,
                a,
                b,
                in_features: in_f,
                out_features: out_f,
                magnitude: None,
            });
        }
        Ok(out)
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` in PEFT's layout
    /// (see the module docs), creating `dir` if needed.
    pub fn save_peft(&self, dir: impl AsRef<Path>) -> Result<()> {
        if !self.eval_only.is_empty() {
            return Err(Error::State(format!(
                "this adapter was loaded with {}, which this crate evaluates and merges but does \
                 not save; keep the original adapter directory",
                self.eval_only.join(", ")
            )));
        }
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let modules = self.peft_modules()?;
        let biases = self.biases_on_host()?;
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for m in &modules {
            let stem = format!("{KEY_PREFIX}h.{}.{}", m.layer, m.module.path());
            tensors.push((
                format!("{stem}.lora_A.weight"),
                vec![m.r, m.in_features],
                &m.a,
            ));
            tensors.push((
                format!("{stem}.lora_B.weight"),
                vec![m.out_features, m.r],
                &m.b,
            ));
            if let Some(magnitude) = &m.magnitude {
                tensors.push((
                    format!("{stem}.lora_magnitude_vector"),
                    vec![m.out_features],
                    magnitude,
                ));
            }
        }
        for (name, shape, values) in &biases {
            // The bias of a Linear that carries a LoRA is its `base_layer`'s for PEFT.
            let adapted = modules
                .iter()
                .any(|m| name == &format!("h.{}.{}.bias", m.layer, m.module.path()));
            let name = match name.strip_suffix(".bias") {
                Some(module) if adapted => format!("{module}.base_layer.bias"),
                _ => name.clone(),
            };
            tensors.push((format!("{KEY_PREFIX}{name}"), shape.clone(), values));
        }
        write_adapter_files(dir, &tensors, &self.peft_config(&modules))
    }

    /// `adapter_config.json` with PEFT's keys; ranks and alphas that differ from `r` and
    /// `lora_alpha` go into `rank_pattern`/`alpha_pattern`, per module when every layer agrees,
    /// else per layer (`h.{i}.attn.c_attn`).
    fn peft_config(&self, modules: &[PeftModule]) -> Value {
        let mut cfg = self.config.clone();
        if !self.initial.is_empty() {
            // Saved converted to a plain LoRA of rank 2r with the same scales.
            cfg.r *= 2;
            cfg.alpha = self.converted_alpha(cfg.alpha);
        }
        let cfg = &cfg;
        let mut targets: Vec<Module> = modules.iter().map(|m| m.module).collect();
        targets.sort();
        targets.dedup();
        let (mut rank_pattern, mut alpha_pattern) = (Map::new(), Map::new());
        for &module in &targets {
            let of: Vec<&PeftModule> = modules.iter().filter(|m| m.module == module).collect();
            let name = peft_target_name(module);
            let per_layer = |m: &PeftModule| format!("h.{}.{}", m.layer, module.path());
            if of.iter().all(|m| m.r == of[0].r) {
                if of[0].r != cfg.r {
                    rank_pattern.insert(name.into(), json!(of[0].r));
                }
            } else {
                for m in of.iter().filter(|m| m.r != cfg.r) {
                    rank_pattern.insert(per_layer(m), json!(m.r));
                }
            }
            if of.iter().all(|m| m.alpha == of[0].alpha) {
                if of[0].alpha != cfg.alpha {
                    alpha_pattern.insert(name.into(), number(of[0].alpha));
                }
            } else {
                for m in of.iter().filter(|m| m.alpha != cfg.alpha) {
                    alpha_pattern.insert(per_layer(m), number(m.alpha));
                }
            }
        }
        let init = match cfg.init {
            // PiSSA and OLoRA adapters are saved converted to a plain LoRA (PEFT writes `true`).
            Init::KaimingUniform | Init::Pissa | Init::Olora => json!(true),
            Init::Gaussian => json!("gaussian"),
            Init::BothRandom => json!(false),
        };
        let modules_to_save = match cfg.modules_to_save.is_empty() {
            true => Value::Null,
            false => json!(cfg.modules_to_save),
        };
        let layers = cfg.layers.as_ref().map(|l| {
            let mut l = l.clone();
            l.sort_unstable();
            l
        });
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": cfg.r,
            "lora_alpha": number(cfg.alpha),
            "target_modules": targets.iter().map(|&m| peft_target_name(m)).collect::<Vec<_>>(),
            "lora_dropout": number(cfg.dropout),
            "bias": cfg.bias.name(),
            "fan_in_fan_out": true,
            "use_rslora": cfg.use_rslora,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "layers_to_transform": layers,
            "layers_pattern": null,
            "init_lora_weights": init,
            "inference_mode": true,
            "modules_to_save": modules_to_save,
            "use_dora": cfg.use_dora,
            "lora_bias": false,
            "revision": null,
        })
    }
}

/// Writes an adapter directory's two files as PEFT does: `tensors` (key, shape, values) as
/// [`WEIGHTS_FILE`] (f32, with PEFT's `format: pt` metadata) and `config` as [`CONFIG_FILE`].
pub(crate) fn write_adapter_files(
    dir: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    config: &Value,
) -> Result<()> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_tensors(
        &dir.join(WEIGHTS_FILE),
        tensors
            .iter()
            .map(|(n, s, v)| (n.clone(), s.as_slice(), *v)),
        SaveDtype::F32,
        Some(metadata),
    )?;
    let text = serde_json::to_string_pretty(config).expect("JSON values serialise");
    write_file_atomically(&dir.join(CONFIG_FILE), text.as_bytes())?;
    Ok(())
}
