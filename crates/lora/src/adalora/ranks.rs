//! Where an AdaLoRA adapter's budget went: the rank each adapted matrix kept, read from the
//! `rank_pattern` of its `adapter_config.json` (PEFT's: `transformer.h.{l}.{module}.lora_E` →
//! one true/false per singular value of `init_r`).

use std::fmt;
use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::peft_save::CONFIG_FILE;

/// One adapted matrix: its layer, its module path (`attn.c_attn`), and the rank it kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptRank {
    pub layer: usize,
    pub module: String,
    pub rank: usize,
}

/// The final ranks of an AdaLoRA adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaLoraRanks {
    pub init_r: usize,
    pub ranks: Vec<KeptRank>,
}

impl AdaLoraRanks {
    /// `None` for an adapter that is not ADALORA or has no rank pattern (no allocation ran).
    pub fn read(dir: &Path) -> Result<Option<AdaLoraRanks>> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        let config: Value =
            serde_json::from_str(&text).map_err(|e| Error::config_in(&path, e.to_string()))?;
        if config["peft_type"] != "ADALORA" {
            return Ok(None);
        }
        let Some(pattern) = config["rank_pattern"].as_object() else {
            return Ok(None);
        };
        let init_r = config["init_r"].as_u64().ok_or_else(|| {
            Error::config_in(&path, "an ADALORA config without an integer `init_r`")
        })? as usize;
        let mut ranks = Vec::new();
        for (key, keep) in pattern {
            let bad = || {
                Error::config_in(
                    &path,
                    format!(
                        "rank_pattern `{key}`: expected `transformer.h.L.MODULE.lora_E` → [bool; {init_r}]"
                    ),
                )
            };
            let rest = key.strip_prefix("transformer.h.").ok_or_else(bad)?;
            let (layer, module) = rest.split_once('.').ok_or_else(bad)?;
            let module = module.strip_suffix(".lora_E").ok_or_else(bad)?;
            let layer: usize = layer.parse().map_err(|_| bad())?;
            let flags = keep
                .as_array()
                .filter(|a| a.len() == init_r)
                .ok_or_else(bad)?;
            let mut rank = 0;
            for f in flags {
                rank += usize::from(f.as_bool().ok_or_else(bad)?);
            }
            ranks.push(KeptRank {
                layer,
                module: module.to_string(),
                rank,
            });
        }
        ranks.sort_by(|a, b| (a.layer, &a.module).cmp(&(b.layer, &b.module)));
        Ok(Some(AdaLoraRanks { init_r, ranks }))
    }

    pub fn to_json(&self) -> Value {
        let ranks: Vec<Value> = self
            .ranks
            .iter()
            .map(|r| json!({"layer": r.layer, "module": r.module, "rank": r.rank}))
            .collect();
        json!({"init_r": self.init_r, "ranks": ranks})
    }
}

/// A table: one row per layer, one column per module, the kept rank in each cell.
impl fmt::Display for AdaLoraRanks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut modules: Vec<&str> = self.ranks.iter().map(|r| r.module.as_str()).collect();
        modules.sort();
        modules.dedup();
        let mut layers: Vec<usize> = self.ranks.iter().map(|r| r.layer).collect();
        layers.dedup();
        let kept: usize = self.ranks.iter().map(|r| r.rank).sum();
        writeln!(
            f,
            "AdaLoRA ranks kept (of init_r {}): {kept} of {} in all",
            self.init_r,
            self.init_r * self.ranks.len()
        )?;
        write!(f, "{:>6}", "layer")?;
        for m in &modules {
            write!(f, " {m:>12}")?;
        }
        writeln!(f)?;
        for l in layers {
            write!(f, "{l:>6}")?;
            for m in &modules {
                match self.ranks.iter().find(|r| r.layer == l && r.module == *m) {
                    Some(r) => write!(f, " {:>12}", r.rank)?,
                    None => write!(f, " {:>12}", "-")?,
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
