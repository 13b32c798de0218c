//! `--model` and `--adapter` given as Hugging Face Hub ids, resolved from a Hub cache laid out
//! on disk in a scratch directory as `huggingface_hub` lays it out (`models--org--name/blobs/`,
//! `snapshots/<commit>/` of symbolic links into the blobs, `refs/<branch or tag>`), with
//! `HF_HUB_CACHE` pointing at it and `HF_HUB_OFFLINE=1` so nothing asks the network:
//! - `eval --model org/tiny --adapter org/tiny-lora@v1` scores what the fixture directories
//!   score (a tag ref, a commit hash, and `main`);
//! - `merge` takes the same ids;
//! - an id that is not cached fails naming the id, the cache and that the Hub was not asked;
//!   with the Hub allowed but unreachable (`HF_ENDPOINT` at a closed local port) it says the
//!   machine could not reach the Hub;
//! - a local directory of the same name wins over the cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{root, scratch, tiny, train_command};

const COMMIT_MAIN: &str = "1111111111111111111111111111111111111111";
const COMMIT_V1: &str = "2222222222222222222222222222222222222222";

/// Puts the files of `src` into the cache as snapshot `commit` of `repo`, each a symbolic link
/// to a blob named by its content, and points `refs/<rev>` at it for every rev in `refs`.
fn cache_repo(cache: &Path, repo: &str, src: &Path, commit: &str, refs: &[&str]) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        // A stand-in for the blob's hash: unique per content here.
        let blob = format!("{:016x}{:08x}", fnv(&bytes), bytes.len());
        std::fs::write(folder.join("blobs").join(&blob), &bytes).unwrap();
        let link = snapshot.join(path.file_name().unwrap());
        #[cfg(unix)]
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&blob), &link).unwrap();
        #[cfg(not(unix))]
        std::fs::write(&link, &bytes).unwrap();
    }
    for r in refs {
        let at = folder.join("refs").join(r);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, commit).unwrap();
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A cache holding the tiny model as `org/tiny` (main) and its adapter as `org/tiny-lora`
/// (main at one commit, tag v1 at another).
fn cache() -> common::Scratch {
    let dir = scratch("hub-cache");
    let fixture = PathBuf::from(tiny());
    cache_repo(&dir, "org/tiny", &fixture, COMMIT_MAIN, &["main"]);
    let adapter = fixture.join("adapter");
    cache_repo(&dir, "org/tiny-lora", &adapter, COMMIT_MAIN, &["main"]);
    cache_repo(&dir, "org/tiny-lora", &adapter, COMMIT_V1, &["v1"]);
    dir
}

fn train(cache: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = train_command();
    command
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_ENDPOINT");
    for (k, v) in env {
        command.env(k, v);
    }
    command.args(args).output().unwrap()
}

fn loss(cache: &Path, args: &[&str]) -> f64 {
    let out = train(cache, &[], args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train {args:?} failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

fn text() -> (common::Scratch, String) {
    let dir = scratch("hub-text");
    let path = dir.join("t.txt");
    std::fs::write(
        &path,
        "It was the best of times, it was the worst of times.",
    )
    .unwrap();
    let s = path.display().to_string();
    (dir, s)
}

#[test]
fn hub_ids_score_what_the_directories_score() {
    let cache = cache();
    let (_t, data) = text();
    let adapter = format!("{}/adapter", tiny());
    let want = loss(
        &cache,
        &[
            "eval",
            "--json",
            "--model",
            &tiny(),
            "--adapter",
            &adapter,
            "--data",
            &data,
        ],
    );
    for (model, adapter) in [
        ("org/tiny", "org/tiny-lora"),
        ("org/tiny@main", "org/tiny-lora@v1"),
        (
            &format!("org/tiny@{COMMIT_MAIN}")[..],
            &format!("org/tiny-lora@{COMMIT_V1}")[..],
        ),
    ] {
        let got = loss(
            &cache,
            &[
                "eval",
                "--json",
                "--model",
                model,
                "--adapter",
                adapter,
                "--data",
                &data,
            ],
        );
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{model} + {adapter}: {got} vs {want}"
        );
    }
    let base = loss(
        &cache,
        &["eval", "--json", "--model", &tiny(), "--data", &data],
    );
    assert_ne!(base, want, "the adapter must change the loss");

    // merge takes ids too; the merged model scores what the adapter scores.
    let out = scratch("hub-merged");
    let merged = out.join("m");
    let o = train(
        &cache,
        &[],
        &[
            "merge",
            "--model",
            "org/tiny",
            "--adapter",
            "org/tiny-lora@v1",
            "--out",
            merged.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = loss(
        &cache,
        &[
            "eval",
            "--json",
            "--model",
            merged.to_str().unwrap(),
            "--data",
            &data,
        ],
    );
    assert!((got - want).abs() < 1e-5, "merged {got} vs {want}");
}

#[test]
fn a_missing_id_names_the_id_the_cache_and_why() {
    let cache = cache();
    let (_t, data) = text();
    let o = train(
        &cache,
        &[],
        &["eval", "--model", "org/absent@v2", "--data", &data],
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    for s in [
        "org/absent@v2",
        &cache.display().to_string()[..],
        "models--org--absent/refs/v2",
        "HF_HUB_OFFLINE",
    ] {
        assert!(e.contains(s), "`{e}` does not say `{s}`");
    }
    // A revision the cache lacks, of a repository it has.
    let o = train(
        &cache,
        &[],
        &[
            "eval",
            "--model",
            "org/tiny",
            "--adapter",
            "org/tiny-lora@v9",
            "--data",
            &data,
        ],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("org/tiny-lora@v9"), "{e}");

    // Online, but the Hub cannot be reached: a closed port on this machine.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let o = train(
        &cache,
        &[("HF_HUB_OFFLINE", "0"), ("HF_ENDPOINT", &endpoint)],
        &["eval", "--model", "org/absent", "--data", &data],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("org/absent") && e.contains("could not reach the Hugging Face Hub"),
        "{e}"
    );
}

#[test]
fn a_local_directory_wins_over_the_hub() {
    let cache = cache();
    let (_t, data) = text();
    // A relative path `org/tiny` that exists in the working directory, shaped like a Hub id.
    let local = scratch("hub-local");
    let org = local.join("org");
    std::fs::create_dir_all(&org).unwrap();
    // org/tiny here is the merged fixture model, not the cached base: its loss tells which.
    let merged = org.join("tiny");
    let o = train(
        &cache,
        &[],
        &[
            "merge",
            "--model",
            &tiny(),
            "--adapter",
            &format!("{}/adapter", tiny()),
            "--out",
            merged.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |dir: &Path| {
        let o = train_command()
            .current_dir(dir)
            .env("HF_HUB_CACHE", &*cache)
            .env("HF_HUB_OFFLINE", "1")
            .args(["eval", "--json", "--model", "org/tiny", "--data", &data])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let from_local = run(&local);
    let from_cache = run(&root());
    assert_ne!(
        from_local, from_cache,
        "the local org/tiny must be the one read"
    );
}
