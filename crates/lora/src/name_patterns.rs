//! Rank and α by module name, as PEFT's `rank_pattern` and `alpha_pattern` give them
//! ([`crate::LoraConfig::name_rank_pattern`], `name_alpha_pattern`): every key is a regular
//! expression matched as `(.*\.)?(key)$` against the module's full name
//! (`transformer.h.1.attn.c_attn`), and the first matching key, in the order given, wins
//! (`peft_pattern.rs` holds the rule; the loader uses the same one).
//!
//! Unlike PEFT, a key that matches no adapted module is refused: it is most likely a typo, and
//! it would otherwise change nothing without a word.

use std::collections::BTreeSet;

use serde_json::json;

use crate::config::LoraConfig;
use crate::error::{Error, Result};
use crate::peft_pattern::PatternKeys;

/// The compiled patterns of one config, and which of their keys matched a module so far.
pub(crate) struct NamePatterns {
    rank: PatternKeys,
    alpha: PatternKeys,
    used: BTreeSet<(&'static str, String)>,
    keys: Vec<(&'static str, String)>,
}

impl NamePatterns {
    pub fn new(cfg: &LoraConfig) -> Result<NamePatterns> {
        let rank = cfg
            .name_rank_pattern
            .iter()
            .map(|(k, r)| (k.clone(), json!(r)))
            .collect();
        let alpha = cfg
            .name_alpha_pattern
            .iter()
            .map(|(k, a)| (k.clone(), json!(a)))
            .collect();
        let keys = (cfg
            .name_rank_pattern
            .iter()
            .map(|(k, _)| ("rank_pattern", k.clone())))
        .chain(
            cfg.name_alpha_pattern
                .iter()
                .map(|(k, _)| ("alpha_pattern", k.clone())),
        )
        .collect();
        Ok(NamePatterns {
            rank: PatternKeys::new("rank_pattern", rank).map_err(Error::config)?,
            alpha: PatternKeys::new("alpha_pattern", alpha).map_err(Error::config)?,
            used: BTreeSet::new(),
            keys,
        })
    }

    /// The rank and α of module `name` (full name): the first matching key's, else the
    /// defaults given. A rank below 1 or an α that is not positive is refused by key.
    pub fn rank_alpha(&mut self, name: &str, r: usize, alpha: f32) -> Result<(usize, f32)> {
        let mut r = r;
        if let Some((key, v)) = self.rank.lookup(name).map_err(Error::config)? {
            r = v.as_u64().unwrap_or(0) as usize;
            if r == 0 {
                return Err(Error::config(format!(
                    "rank_pattern `{key}` gives {name} rank {v}; a rank is at least 1"
                )));
            }
            self.used.insert(("rank_pattern", key.to_string()));
        }
        let mut alpha = alpha;
        if let Some((key, v)) = self.alpha.lookup(name).map_err(Error::config)? {
            alpha = v.as_f64().unwrap_or(f64::NAN) as f32;
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(Error::config(format!(
                    "alpha_pattern `{key}` gives {name} alpha {v}; it must be > 0"
                )));
            }
            self.used.insert(("alpha_pattern", key.to_string()));
        }
        Ok((r, alpha))
    }

    /// Refuses a key that matched no module.
    pub fn all_used(&self) -> Result<()> {
        match self.keys.iter().find(|k| !self.used.contains(k)) {
            None => Ok(()),
            Some((what, key)) => Err(Error::config(format!(
                "{what} key `{key}` matches no adapted module (names are like \
                 transformer.h.0.attn.c_attn; a key matches the end of a name after a `.`, as \
                 a regular expression)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use transformer::GptConfig;

    use crate::{LoraConfig, Target};

    fn tiny() -> GptConfig {
        let mut g = GptConfig::gpt2_small();
        g.n_layer = 3;
        g
    }

    #[test]
    fn the_first_matching_key_gives_rank_and_alpha() {
        let mut cfg = LoraConfig::new(4, 8.0, &[Target::CAttn, Target::Fc]);
        cfg.name_rank_pattern = vec![(r"h\.1\.attn\.c_attn".into(), 2), ("c_attn".into(), 6)];
        cfg.name_alpha_pattern = vec![(r".*c_fc".into(), 3.0)];
        let sites = cfg.sites(&tiny()).unwrap();
        let of = |layer, t| {
            let s = sites
                .iter()
                .find(|s| s.layer == layer && s.target == t)
                .unwrap();
            (s.r, s.alpha, s.scale)
        };
        assert_eq!(of(0, Target::CAttn), (6, 8.0, 8.0 / 6.0));
        assert_eq!(of(1, Target::CAttn), (2, 8.0, 4.0));
        assert_eq!(of(2, Target::Fc), (4, 3.0, 0.75));
        cfg.use_rslora = true;
        let s = &cfg.sites(&tiny()).unwrap()[0];
        assert_eq!(s.scale, 8.0 / 6f32.sqrt());
    }

    #[test]
    fn keys_that_match_nothing_or_say_nothing_are_refused() {
        let mut cfg = LoraConfig::new(4, 8.0, &[Target::CAttn]);
        cfg.name_rank_pattern = vec![("c_fc".into(), 2)];
        let e = cfg.sites(&tiny()).unwrap_err().to_string();
        assert!(
            e.contains("rank_pattern key `c_fc` matches no adapted module"),
            "{e}"
        );
        cfg.name_rank_pattern = vec![("c_attn".into(), 0)];
        let e = cfg.sites(&tiny()).unwrap_err().to_string();
        assert!(e.contains("a rank is at least 1"), "{e}");
        cfg.name_rank_pattern = vec![("c_(attn".into(), 2)];
        let e = cfg.sites(&tiny()).unwrap_err().to_string();
        assert!(e.contains("rank_pattern `c_(attn`"), "{e}");
        cfg.name_rank_pattern.clear();
        cfg.name_alpha_pattern = vec![("c_attn".into(), -1.0)];
        let e = cfg.sites(&tiny()).unwrap_err().to_string();
        assert!(e.contains("must be > 0"), "{e}");
    }

    #[test]
    fn modules_to_save_are_checked_against_the_model() {
        let mut cfg = LoraConfig::new(4, 8.0, &[Target::CAttn]);
        cfg.modules_to_save = vec!["ln_f".into(), "h.0.ln_2".into()];
        let count = cfg.count(&tiny()).unwrap();
        let plain = LoraConfig::new(4, 8.0, &[Target::CAttn])
            .count(&tiny())
            .unwrap();
        assert_eq!(count.trainable - plain.trainable, 4 * 768);
        cfg.modules_to_save = vec!["ln_g".into()];
        assert!(
            cfg.sites(&tiny())
                .unwrap_err()
                .to_string()
                .contains("names no module")
        );
        cfg.modules_to_save = vec!["h.0.mlp".into()];
        assert!(
            cfg.sites(&tiny())
                .unwrap_err()
                .to_string()
                .contains("names no module")
        );
        cfg.modules_to_save = vec!["wte".into()];
        assert!(cfg.sites(&tiny()).unwrap_err().to_string().contains("tied"));
        cfg.modules_to_save = vec!["c_attn".into()];
        let e = cfg.sites(&tiny()).unwrap_err().to_string();
        assert!(e.contains("also carries an adapter"), "{e}");
    }
}
