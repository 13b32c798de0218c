//! Saving AdaLoRA in PEFT 0.21's layout (what `AdaLoraModel.save_pretrained` writes).
//!
//! `adapter_model.safetensors`: per adapted Linear `base_model.model.transformer.h.{l}.{module}`,
//! its `.lora_A` (r', in), `.lora_E` (r', 1), `.lora_B` (out, r') — no `.weight` suffix (PEFT keeps
//! them in ParameterDicts), and no `ranknum` (PEFT drops it: it is `init_r`, deterministic).
//! With a rank pattern, r' is the number of kept triplets and only their rows of A and E and
//! columns of B are written (PEFT's `resize_state_dict_by_rank_pattern`); a module whose
//! pattern keeps everything is written whole.
//!
//! `adapter_config.json`: `peft_type` ADALORA, `init_r`, `target_r`, the schedule, `lora_alpha`,
//! `target_modules`, and `rank_pattern` as PEFT records it: `transformer.h.{l}.{module}.lora_E`
//! → one true/false per singular value (true = kept), or null before any allocation.

use std::path::Path;

use serde_json::{Map, Value, json};

use super::AdaLora;
use crate::error::{Error, Result};
use crate::peft_save::{KEY_PREFIX, peft_target_name, write_adapter_files};

/// An f32 as JSON as PEFT writes it: an integer when integral (`lora_alpha` 8), otherwise
/// its shortest decimal form (0.85, not 0.8500000238418579).
fn number(x: f32) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e9 {
        json!(x as i64)
    } else {
        let v: f64 = x.to_string().parse().expect("an f32 prints as a number");
        json!(v)
    }
}

impl AdaLora {
    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (module doc), with
    /// `rank_pattern` (one kept-flag list per update, in [`AdaLora::updates`]' order) if given.
    pub fn save_peft(
        &self,
        dir: impl AsRef<Path>,
        rank_pattern: Option<&[Vec<bool>]>,
    ) -> Result<()> {
        let dir = dir.as_ref();
        if let Some(p) = rank_pattern
            && p.len() != self.updates.len()
        {
            return Err(Error::State(format!(
                "a rank pattern of {} modules for {} AdaLoRA updates",
                p.len(),
                self.updates.len()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut pattern_json = Map::new();
        for (i, (name, u)) in self.updates.iter().enumerate() {
            let (r, n_in) = (u.a.value().shape()[0], u.a.value().shape()[1]);
            let out = u.b.value().shape()[0];
            let keep: Vec<bool> = match rank_pattern {
                Some(p) if p[i].len() != r => {
                    return Err(Error::State(format!(
                        "{name}: rank pattern of {} for rank {r}",
                        p[i].len()
                    )));
                }
                Some(p) => p[i].clone(),
                None => vec![true; r],
            };
            if rank_pattern.is_some() {
                pattern_json.insert(format!("{name}.lora_E"), json!(keep));
            }
            let rows: Vec<usize> = (0..r).filter(|&k| keep[k]).collect();
            let (a, e, b) = (
                u.a.value().to_vec()?,
                u.e.value().to_vec()?,
                u.b.value().to_vec()?,
            );
            let kr = rows.len();
            let a: Vec<f32> = rows
                .iter()
                .flat_map(|&k| a[k * n_in..(k + 1) * n_in].iter().copied())
                .collect();
            let e: Vec<f32> = rows.iter().map(|&k| e[k]).collect();
            let b: Vec<f32> = (0..out)
                .flat_map(|o| rows.iter().map(move |&k| o * r + k))
                .map(|j| b[j])
                .collect();
            let stem = format!(
                "{KEY_PREFIX}{}",
                name.strip_prefix("transformer.").unwrap_or(name)
            );
            tensors.push((format!("{stem}.lora_A"), vec![kr, n_in], a));
            tensors.push((format!("{stem}.lora_B"), vec![out, kr], b));
            tensors.push((format!("{stem}.lora_E"), vec![kr, 1], e));
        }
        let tensors: Vec<(String, Vec<usize>, &[f32])> = tensors
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
            .collect();
        write_adapter_files(
            dir,
            &tensors,
            &self.peft_config(rank_pattern.map(|_| pattern_json)),
        )
    }

    fn peft_config(&self, rank_pattern: Option<Map<String, Value>>) -> Value {
        let c = &self.config;
        let s = &c.schedule;
        let mut modules = c.modules.clone();
        modules.sort();
        modules.dedup();
        json!({
            "peft_type": "ADALORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "r": c.target_r,
            "init_r": c.init_r,
            "target_r": c.target_r,
            "tinit": s.tinit,
            "tfinal": s.tfinal,
            "deltaT": s.delta_t,
            "beta1": number(s.beta1),
            "beta2": number(s.beta2),
            "orth_reg_weight": number(c.orth_reg_weight),
            "total_step": s.total_step,
            "lora_alpha": number(c.lora_alpha),
            "target_modules": modules.iter().map(|&m| peft_target_name(m)).collect::<Vec<_>>(),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": true,
            "use_rslora": false,
            "rank_pattern": rank_pattern,
            "alpha_pattern": {},
            "layers_to_transform": null,
            "layers_pattern": null,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "use_dora": false,
            "lora_bias": false,
            "revision": null,
        })
    }
}
