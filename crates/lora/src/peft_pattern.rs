//! How PEFT (0.21) matches the names in an `adapter_config.json` against a module's full name
//! (`transformer.h.0.attn.c_attn` for a GPT2LMHeadModel, `h.0.attn.c_attn` for a bare
//! GPT2Model), so that every adapter selects the modules, ranks and α that PEFT selects.
//!
//! | config key | PEFT's test for module name `n` |
//! |---|---|
//! | `target_modules`, a string | `re.fullmatch(pattern, n)` |
//! | `target_modules`, a list | `n` is an entry, or ends with `.` + an entry (literal) |
//! | `exclude_modules` | the same two rules; an excluded module is never adapted |
//! | `rank_pattern`, `alpha_pattern` | the **first** key, in the file's order, for which `re.match(rf"(.*\.)?({key})$", n)` matches: every key is a regular expression, and several may match |
//! | `layers_to_transform` (list targets only) | the index after `layers_pattern` (or after the second dot-separated segment): `re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", n)` |
//!
//! Python's `re` is read here by `fancy_regex`, which also knows look-around and back
//! references. A key it cannot compile is refused by name rather than skipped: a skipped key
//! would change a scale silently.

use fancy_regex::Regex;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// A JSON object's entries in the file's order (`serde_json::Map` sorts them), duplicates
/// kept so that they can be refused.
#[derive(Debug, Default)]
pub(crate) struct Ordered(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `rank_pattern` and `alpha_pattern` in the file's order (everything else is ignored here).
#[derive(serde::Deserialize, Default)]
pub(crate) struct PatternOrder {
    #[serde(default)]
    pub rank_pattern: Option<Ordered>,
    #[serde(default)]
    pub alpha_pattern: Option<Ordered>,
}

/// Compiles a Python regular expression, or says which key of which config entry it is.
fn compile(what: &str, key: &str, regex: &str) -> Result<Regex, String> {
    Regex::new(regex).map_err(|e| {
        format!(
            "{what} `{key}` is a regular expression this loader cannot read ({e}); PEFT matches \
             it with Python's `re`, so the adapter cannot be loaded exactly: rewrite the key \
             without that construct"
        )
    })
}

/// Whether `re` matches `name`; a match that gives up (back-tracking limit) is an error.
fn is_match(re: &Regex, name: &str) -> Result<bool, String> {
    re.is_match(name)
        .map_err(|e| format!("matching `{}` against `{name}`: {e}", re.as_str()))
}

/// `rank_pattern` or `alpha_pattern`: (key, its compiled `(.*\.)?(key)$`, value), file order.
pub(crate) struct PatternKeys {
    what: &'static str,
    keys: Vec<(String, Regex, Value)>,
}

impl PatternKeys {
    pub fn new(what: &'static str, entries: Vec<(String, Value)>) -> Result<PatternKeys, String> {
        let mut keys: Vec<(String, Regex, Value)> = Vec::new();
        for (key, value) in entries {
            if keys.iter().any(|(k, _, _)| *k == key) {
                return Err(format!("{what} has the key `{key}` twice"));
            }
            let re = compile(what, &key, &format!(r"^(.*\.)?({key})$"))?;
            keys.push((key, re, value));
        }
        Ok(PatternKeys { what, keys })
    }

    /// PEFT's `get_pattern_key`: the first key (file order) matching `name`, and its value.
    pub fn lookup(&self, name: &str) -> Result<Option<(&str, &Value)>, String> {
        for (key, re, value) in &self.keys {
            if is_match(re, name)? {
                return Ok(Some((key, value)));
            }
        }
        Ok(None)
    }

    /// The value of the first key matching `name` as a number, if any matches.
    pub fn number(&self, name: &str) -> Result<Option<f64>, String> {
        match self.lookup(name)? {
            None => Ok(None),
            Some((key, v)) => v.as_f64().map(Some).ok_or_else(|| {
                format!("{} key `{key}` has the value {v}, not a number", self.what)
            }),
        }
    }
}

/// `target_modules` or `exclude_modules`: a regular expression (full match) or literal names.
pub(crate) enum ModuleSet {
    Regex(String, Regex),
    Names(Vec<String>),
}

impl ModuleSet {
    pub fn regex(what: &str, pattern: &str) -> Result<ModuleSet, String> {
        let re = compile(what, pattern, &format!("^(?:{pattern})$"))?;
        Ok(ModuleSet::Regex(pattern.to_string(), re))
    }

    /// PEFT's test: full match of the regex, or the name / a `.`-suffix equal to an entry.
    pub fn matches(&self, name: &str) -> Result<bool, String> {
        match self {
            ModuleSet::Regex(_, re) => is_match(re, name),
            ModuleSet::Names(names) => Ok(names
                .iter()
                .any(|t| name == t || name.ends_with(&format!(".{t}")))),
        }
    }

    /// Whether this is a list (then `layers_to_transform` applies).
    pub fn is_list(&self) -> bool {
        matches!(self, ModuleSet::Names(_))
    }
}

impl std::fmt::Display for ModuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSet::Regex(p, _) => write!(f, "`{p}` (a regular expression)"),
            ModuleSet::Names(n) => write!(f, "{n:?}"),
        }
    }
}

/// PEFT's layer index of module `name` for `layers_to_transform`: the number after
/// `layers_pattern` (any of them), or after the second dot-separated segment without one.
pub(crate) fn layer_index(name: &str, layers_pattern: &[String]) -> Result<Option<usize>, String> {
    let regexes = if layers_pattern.is_empty() {
        vec![r"^.*?\.[^.]*\.(?P<idx>\d+)\.".to_string()]
    } else {
        layers_pattern
            .iter()
            .map(|p| format!(r"^(?:^|.*?\.){p}\.(?P<idx>\d+)\."))
            .collect()
    };
    for r in regexes {
        let re = compile("layers_pattern", &r, &r)?;
        let caps = re
            .captures(name)
            .map_err(|e| format!("matching `{r}` against `{name}`: {e}"))?;
        if let Some(c) = caps {
            return Ok(c.name("idx").and_then(|m| m.as_str().parse().ok()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(entries: &[(&str, Value)]) -> PatternKeys {
        let e = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        PatternKeys::new("alpha_pattern", e).unwrap()
    }

    #[test]
    fn pattern_keys_match_as_pefts_get_pattern_key() {
        let n = "transformer.h.1.attn.c_attn";
        // A literal suffix after a dot, or the whole name.
        assert!(keys(&[("c_attn", json!(2))]).lookup(n).unwrap().is_some());
        assert!(keys(&[(n, json!(2))]).lookup(n).unwrap().is_some());
        // Not a suffix that cuts a segment ("attn" is not `.attn` at the end).
        assert!(keys(&[("attn", json!(2))]).lookup(n).unwrap().is_none());
        assert!(keys(&[("_attn", json!(2))]).lookup(n).unwrap().is_none());
        // Regular expressions.
        assert!(
            keys(&[(r"h\.\d\.attn\.c_attn", json!(2))])
                .lookup(n)
                .unwrap()
                .is_some()
        );
        assert!(
            keys(&[(r".*c_(attn|fc)", json!(2))])
                .lookup(n)
                .unwrap()
                .is_some()
        );
        assert!(
            keys(&[(r"h\.0\..*", json!(2))])
                .lookup(n)
                .unwrap()
                .is_none()
        );
        // The first key in order wins, however specific the later ones are.
        let k = keys(&[("c_attn", json!(2)), ("h.1.attn.c_attn", json!(16))]);
        assert_eq!(k.number(n).unwrap(), Some(2.0));
        let k = keys(&[("h.1.attn.c_attn", json!(16)), ("c_attn", json!(2))]);
        assert_eq!(k.number(n).unwrap(), Some(16.0));
        // `.` is a regex metacharacter there, as in PEFT: "h.1" also matches "h_1_".
        assert!(
            keys(&[("h.1.attn.c_attn", json!(2))])
                .lookup("transformer.h_1_attn.c_attn")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn unreadable_or_repeated_keys_are_refused_by_name() {
        let e = PatternKeys::new("rank_pattern", vec![("c_(attn".into(), json!(2))]);
        assert!(e.err().unwrap().contains("rank_pattern `c_(attn`"));
        let twice = vec![("c_fc".into(), json!(2)), ("c_fc".into(), json!(3))];
        let e = PatternKeys::new("rank_pattern", twice);
        assert!(e.err().unwrap().contains("`c_fc` twice"));
        let k = keys(&[("c_fc", json!("x"))]);
        assert!(
            k.number("h.0.mlp.c_fc")
                .unwrap_err()
                .contains("not a number")
        );
    }

    #[test]
    fn module_sets_match_as_pefts_check_target_module_exists() {
        let list = ModuleSet::Names(vec!["c_attn".into(), "h.0.mlp.c_proj".into()]);
        assert!(list.matches("transformer.h.3.attn.c_attn").unwrap());
        assert!(list.matches("transformer.h.0.mlp.c_proj").unwrap());
        assert!(!list.matches("transformer.h.1.mlp.c_proj").unwrap());
        let re = ModuleSet::regex("target_modules", r".*\.0\..*").unwrap();
        assert!(re.matches("transformer.h.0.mlp.c_fc").unwrap());
        assert!(!re.matches("transformer.h.1.mlp.c_fc").unwrap());
        // Full match: a regex matching only a part of the name does not select it.
        let re = ModuleSet::regex("target_modules", "c_attn").unwrap();
        assert!(!re.matches("transformer.h.0.attn.c_attn").unwrap());
    }

    #[test]
    fn layer_indices_follow_pefts_rule() {
        let n = "transformer.h.7.attn.c_attn";
        assert_eq!(layer_index(n, &[]).unwrap(), Some(7));
        assert_eq!(layer_index(n, &["h".into()]).unwrap(), Some(7));
        assert_eq!(layer_index(n, &["layers".into()]).unwrap(), None);
        assert_eq!(layer_index("h.2.mlp.c_fc", &[]).unwrap(), None); // no second segment
        assert_eq!(layer_index("h.2.mlp.c_fc", &["h".into()]).unwrap(), Some(2));
    }

    #[test]
    fn ordered_objects_keep_the_files_order() {
        let text = r#"{"rank_pattern": {"z": 1, "a": 2}, "other": 3}"#;
        let p: PatternOrder = serde_json::from_str(text).unwrap();
        let keys: Vec<String> = p
            .rank_pattern
            .unwrap()
            .0
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["z", "a"]);
    }
}
