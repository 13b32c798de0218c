//! Hugging Face Hub ids where a model or adapter directory is expected (`--model`, `--adapter`).
//!
//! `--model gpt2`, `--model org/name` or `--model org/name@rev` names a repository of the Hub,
//! at the revision after `@` (a branch, a tag or a commit hash; `main` when absent). This is
//! the `org/name@rev` of `huggingface_hub`'s file system (`hf://org/name@rev`); a flag such as
//! `--revision` would not say which of `--model` and `--adapter` it is for.
//!
//! **Resolution, in order** (one function, [`resolve`], which every path-taking flag calls):
//! 1. a directory or file that exists at that path is used as it is: a local folder named
//!    `gpt2` always wins over the Hub;
//! 2. a text that is not shaped like a Hub id (`./x`, `/abs`, `a/b/c`, …) is left to the loader,
//!    which says the path is missing;
//! 3. the local Hugging Face cache, laid out as `huggingface_hub` and `transformers` lay it out:
//!    `<cache>/models--org--name/refs/<rev>` holds the commit hash of a branch or tag,
//!    `<cache>/models--org--name/snapshots/<commit>/` the files (symbolic links into
//!    `../../blobs/`). A snapshot counts when it holds `config.json` (a model) or
//!    `adapter_config.json` (an adapter); a cached snapshot is used without asking the Hub
//!    whether the branch moved. The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!    `~/.cache/huggingface/hub`;
//! 4. unless `HF_HUB_OFFLINE` is set (`1`, `true`, `yes`, `on`), the files this program reads
//!    are downloaded into that cache with the `hf-hub` crate (`$HF_ENDPOINT` and `$HF_TOKEN`
//!    or `$HF_HOME/token` are honoured), and the snapshot is used: for a model `config.json`,
//!    the tokenizer files and the weights (`model.safetensors` or its index and shards, else
//!    `pytorch_model.bin` or its shards); for an adapter `adapter_config.json` and
//!    `adapter_model.safetensors`, else `adapter_model.bin`.
//!
//! When none of these finds it, the error names the id, the cache directory searched, and
//! whether the machine is offline or could not reach the Hub (and why).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// What a directory must hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// A model: `config.json` and its weights.
    Model,
    /// A PEFT adapter: `adapter_config.json` and its weights.
    Adapter,
}

impl Kind {
    /// The file that makes a snapshot a model or an adapter.
    fn marker(self) -> &'static str {
        match self {
            Kind::Model => "config.json",
            Kind::Adapter => "adapter_config.json",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Model => "model",
            Kind::Adapter => "adapter",
        }
    }
}

/// A repository of the Hub at a revision: `org/name@rev`.
#[derive(Clone, Debug, PartialEq)]
pub struct HubId {
    /// `name` or `org/name`.
    pub repo: String,
    /// A branch, a tag or a commit hash; `main` when the id gives none.
    pub revision: String,
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

/// One part of a repository id as the Hub allows it: letters, digits, `-`, `_`, `.`, not
/// starting or ending with `-` or `.`, without `--` or `..`.
fn id_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 96
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
        && !s.contains("--")
        && !s.contains("..")
}

/// `name`, `org/name`, with an optional `@rev`, as a [`HubId`]; `None` for any other text.
pub fn parse_id(spec: &str) -> Option<HubId> {
    let (repo, revision) = match spec.split_once('@') {
        Some((repo, rev)) => (repo, rev),
        None => (spec, "main"),
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let revision_ok = !revision.is_empty()
        && !revision
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        && !revision.contains('\\');
    (parts.len() <= 2 && parts.iter().all(|p| id_part(p)) && revision_ok).then(|| HubId {
        repo: repo.to_string(),
        revision: revision.to_string(),
    })
}

/// Where the Hub's files are cached, and whether the Hub may be asked.
#[derive(Clone, Debug)]
pub struct Hub {
    /// `$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache: PathBuf,
    /// `HF_HUB_OFFLINE` is set: the cache only.
    pub offline: bool,
}

/// Whether an environment flag is on, as `huggingface_hub` reads them.
fn flag_on(value: Option<String>) -> bool {
    value.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

impl Hub {
    /// The cache and mode the environment chooses (see the module doc).
    pub fn from_env() -> Hub {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let cache = match (var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME")) {
            (Some(c), _, _) => PathBuf::from(c),
            (None, Some(home), _) => PathBuf::from(home).join("hub"),
            (None, None, Some(home)) => PathBuf::from(home).join(".cache/huggingface/hub"),
            (None, None, None) => Cache::from_env().path().clone(),
        };
        Hub {
            cache,
            offline: flag_on(std::env::var("HF_HUB_OFFLINE").ok()),
        }
    }

    /// The snapshot directory of `id` in the cache, if it holds a `kind`.
    pub fn cached(&self, id: &HubId, kind: Kind) -> Option<PathBuf> {
        let repo = Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone());
        // A branch or tag: refs/<rev> names the commit (hf-hub reads it).
        let by_ref = Cache::new(self.cache.clone())
            .repo(repo.clone())
            .get(kind.marker())
            .and_then(|p| p.parent().map(Path::to_path_buf));
        // A commit hash: its snapshot directly.
        let by_commit = || {
            let dir = self
                .cache
                .join(repo.folder_name())
                .join("snapshots")
                .join(&id.revision);
            dir.join(kind.marker()).exists().then_some(dir)
        };
        by_ref.or_else(by_commit)
    }

    /// `spec` as a local path: itself when it exists or is not a Hub id, else the snapshot of
    /// the Hub id in the cache, downloaded there first when it is missing and the Hub may be
    /// asked.
    pub fn resolve(&self, spec: &str, kind: Kind) -> Result<PathBuf, String> {
        let path = PathBuf::from(spec);
        if path.exists() {
            return Ok(path);
        }
        let Some(id) = parse_id(spec) else {
            return Ok(path);
        };
        if let Some(dir) = self.cached(&id, kind) {
            return Ok(dir);
        }
        let missing = format!(
            "no {noun} directory `{spec}` here, and the Hugging Face Hub {noun} `{id}` is not \
             in the cache {cache} (looked for {folder}/refs/{rev} and a snapshot holding {marker})",
            noun = kind.noun(),
            cache = self.cache.display(),
            folder = Repo::model(id.repo.clone()).folder_name(),
            rev = id.revision,
            marker = kind.marker(),
        );
        if self.offline {
            return Err(format!(
                "{missing}; HF_HUB_OFFLINE is set, so the Hub was not asked (unset it to \
                 download, or copy the files into the cache)"
            ));
        }
        self.download(&id, kind)
            .map_err(|why| format!("{missing}; {why}"))
    }

    /// Downloads what this program reads of `id` into the cache; the snapshot directory.
    fn download(&self, id: &HubId, kind: Kind) -> Result<PathBuf, String> {
        let mut builder = ApiBuilder::from_cache(Cache::new(self.cache.clone()))
            .with_progress(std::io::stderr().is_terminal())
            .with_token(
                std::env::var("HF_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty())
                    .or_else(|| Cache::from_env().token()),
            );
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder
            .build()
            .map_err(|e| format!("the Hub client could not start: {e}"))?;
        let repo = api.repo(Repo::with_revision(
            id.repo.clone(),
            RepoType::Model,
            id.revision.clone(),
        ));
        let info = repo.info().map_err(|e| unreachable_why(&e))?;
        let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let wanted = files_to_fetch(&names, kind);
        if !wanted.contains(&kind.marker()) {
            return Err(format!(
                "the Hub repository `{id}` has no {} at its top level, so it is not a {} \
                 (its files: {})",
                kind.marker(),
                kind.noun(),
                names.join(", ")
            ));
        }
        eprintln!(
            "note: downloading {} file(s) of {id} (commit {}) into {}",
            wanted.len(),
            info.sha,
            self.cache.display()
        );
        let mut snapshot = None;
        for name in wanted {
            let path = repo
                .get(name)
                .map_err(|e| format!("downloading `{name}` of `{id}` failed: {e}"))?;
            if name == kind.marker() {
                snapshot = path.parent().map(Path::to_path_buf);
            }
        }
        snapshot.ok_or_else(|| format!("`{id}`: the downloaded {} has no folder", kind.marker()))
    }
}

/// What a failed request to the Hub means for the user.
fn unreachable_why(e: &hf_hub::api::sync::ApiError) -> String {
    use hf_hub::api::sync::ApiError;
    if let ApiError::RequestError(r) = e
        && let ureq::Error::Status(status @ 401..=404, _) = **r
    {
        return format!(
            "the Hub answered {status}: no such repository or revision, or a private or gated \
             one (set HF_TOKEN to a token that may read it)"
        );
    }
    format!("this machine could not reach the Hugging Face Hub ({e})")
}

/// The files of a repository (its `siblings`) this program reads for a `kind`: the marker,
/// tokenizer files (models), and one weights format, safetensors first as `transformers` and
/// PEFT prefer it.
pub fn files_to_fetch<'a>(names: &[&'a str], kind: Kind) -> Vec<&'a str> {
    let top: Vec<&str> = names.iter().copied().filter(|n| !n.contains('/')).collect();
    let pick = |keep: &dyn Fn(&str) -> bool| -> Vec<&'a str> {
        top.iter().copied().filter(|n| keep(n)).collect()
    };
    match kind {
        Kind::Model => {
            let mut out = pick(&|n| {
                matches!(
                    n,
                    "config.json"
                        | "tokenizer.json"
                        | "tokenizer_config.json"
                        | "vocab.json"
                        | "merges.txt"
                        | "added_tokens.json"
                        | "special_tokens_map.json"
                )
            });
            let safetensors = pick(&|n| {
                n == "model.safetensors"
                    || n == "model.safetensors.index.json"
                    || (n.starts_with("model-") && n.ends_with(".safetensors"))
            });
            if safetensors.is_empty() {
                out.extend(pick(&|n| {
                    n == "pytorch_model.bin"
                        || n == "pytorch_model.bin.index.json"
                        || (n.starts_with("pytorch_model-") && n.ends_with(".bin"))
                }));
            } else {
                out.extend(safetensors);
            }
            out
        }
        Kind::Adapter => {
            let mut out = pick(&|n| n == "adapter_config.json");
            let safe = pick(&|n| n == lora::WEIGHTS_FILE);
            out.extend(if safe.is_empty() {
                pick(&|n| n == lora::BIN_WEIGHTS_FILE)
            } else {
                safe
            });
            out
        }
    }
}

/// [`Hub::resolve`] with the environment's cache and mode.
pub fn resolve(spec: &str, kind: Kind) -> Result<PathBuf, String> {
    Hub::from_env().resolve(spec, kind)
}

/// The value parser of `--model`: a model directory or a Hub id ([`resolve`]).
pub fn model_dir(spec: &str) -> Result<PathBuf, String> {
    resolve(spec, Kind::Model)
}

/// The value parser of `--adapter`: an adapter directory or a Hub id ([`resolve`]).
pub fn adapter_dir(spec: &str) -> Result<PathBuf, String> {
    resolve(spec, Kind::Adapter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        let id = |s| parse_id(s).map(|h| (h.repo, h.revision));
        assert_eq!(id("gpt2"), Some(("gpt2".into(), "main".into())));
        assert_eq!(
            id("org/name@v1.0"),
            Some(("org/name".into(), "v1.0".into()))
        );
        assert_eq!(
            id("org/n@refs/pr/3"),
            Some(("org/n".into(), "refs/pr/3".into()))
        );
        for path in [
            "./x",
            "/abs",
            "a/b/c",
            "x/",
            "a--b/c",
            "..",
            "a@",
            "org/n@../x",
            "",
        ] {
            assert_eq!(parse_id(path), None, "{path}");
        }
    }

    #[test]
    fn one_weights_format_is_fetched_safetensors_first() {
        let names = [
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tf_model.h5",
            "onnx/model.onnx",
            "vocab.json",
            "merges.txt",
        ];
        assert_eq!(
            files_to_fetch(&names, Kind::Model),
            [
                "config.json",
                "vocab.json",
                "merges.txt",
                "model.safetensors"
            ]
        );
        assert_eq!(
            files_to_fetch(&["config.json", "pytorch_model.bin"], Kind::Model),
            ["config.json", "pytorch_model.bin"]
        );
        assert_eq!(
            files_to_fetch(&["adapter_model.bin", "adapter_config.json"], Kind::Adapter),
            ["adapter_config.json", "adapter_model.bin"]
        );
    }

    #[test]
    fn offline_and_missing_names_the_id_and_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let hub = Hub {
            cache: cache.path().to_path_buf(),
            offline: true,
        };
        let e = hub.resolve("org/absent@v2", Kind::Adapter).unwrap_err();
        for s in [
            "org/absent@v2",
            &cache.path().display().to_string(),
            "models--org--absent/refs/v2",
            "HF_HUB_OFFLINE",
        ] {
            assert!(e.contains(s), "`{e}` does not say `{s}`");
        }
        // Not an id: left to the loader.
        assert_eq!(
            hub.resolve("./no/such/dir", Kind::Model).unwrap(),
            PathBuf::from("./no/such/dir")
        );
    }

    #[test]
    fn a_commit_hash_names_its_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = cache.path().join("models--gpt2/snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let hub = Hub {
            cache: cache.path().to_path_buf(),
            offline: true,
        };
        assert_eq!(
            hub.resolve(&format!("gpt2@{commit}"), Kind::Model).unwrap(),
            snap
        );
        // No refs/main: `gpt2` alone is not cached.
        assert!(hub.resolve("gpt2", Kind::Model).is_err());
        // And no adapter in that snapshot.
        assert!(
            hub.resolve(&format!("gpt2@{commit}"), Kind::Adapter)
                .is_err()
        );
    }
}
