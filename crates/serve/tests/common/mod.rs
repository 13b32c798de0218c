//! What the server tests share: the fixture model `tests/fixtures/gpt2-tiny` (2 layers, C = 64,
//! bytes as tokens, a context of 64), random adapters saved in PEFT's layout under a temporary
//! adapter root, a server on 127.0.0.1 with port 0, and a few HTTP helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use lora::{Init, LoraConfig, LoraModel, Target};
use serde_json::{Value, json};
use serve::{ServeConfig, Server};
use tensor::Device;
use transformer::{Checkpoint, GenerateConfig, Gpt2, Tokenizer, generate};

pub fn fixture() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/gpt2-tiny"
    ))
}

/// The shipped E2E base model (4 layers, C = 128, GPT-2's tokenizer): slower steps, for tests
/// that must catch a request while it runs.
pub fn e2e() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/base"))
}

pub fn model_at(dir: &Path) -> Gpt2 {
    let ckpt = Checkpoint::load(dir).unwrap();
    Gpt2::from_checkpoint(&ckpt, &Device::cpu(), false).unwrap()
}

/// A fresh directory under the system's temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "serve-test-{tag}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves random adapters "a0", "a1", ... for the fixture (rank 4 on q, v, and c_fc for odd
/// ones; B random so that they change the output) under `root`.
pub fn write_adapters(root: &Path, n: usize) {
    write_adapters_for(&fixture(), root, n)
}

pub fn write_adapters_for(model: &Path, root: &Path, n: usize) {
    let model = model_at(model);
    for i in 0..n {
        let targets: &[Target] = if i % 2 == 0 {
            &[Target::Q, Target::V]
        } else {
            &[Target::Q, Target::V, Target::Fc]
        };
        let mut cfg = LoraConfig::new(4, 16.0, targets);
        cfg.init = Init::BothRandom;
        let lora = LoraModel::new(&model, &cfg, 100 + i as u64).unwrap();
        lora.save_peft(root.join(format!("a{i}"))).unwrap();
    }
}

/// A server on the fixture with `n` adapters under a fresh root; `tweak` changes the config.
pub fn start(n: usize, tweak: impl FnOnce(&mut ServeConfig)) -> (Server, String, PathBuf) {
    start_on(&fixture(), n, tweak)
}

/// The same on the model in `model`.
pub fn start_on(
    model: &Path,
    n: usize,
    tweak: impl FnOnce(&mut ServeConfig),
) -> (Server, String, PathBuf) {
    let root = temp_dir("root");
    write_adapters_for(model, &root, n);
    let mut cfg = ServeConfig::new(model);
    cfg.model_name = Some("base".into());
    cfg.port = 0;
    cfg.adapter_dirs = vec![root.clone()];
    tweak(&mut cfg);
    let server = Server::start(cfg, Device::cpu()).unwrap();
    let url = format!("http://{}", server.addr());
    (server, url, root)
}

/// The greedy text `train generate --model <fixture> [--adapter <dir>]` gives for `prompt`:
/// the same loading (the adapter attached unmerged, alone) and the same decoding.
pub fn offline(adapter: Option<&Path>, prompt: &str, max_tokens: usize, stop: &[&str]) -> String {
    offline_on(&fixture(), adapter, prompt, max_tokens, stop)
}

pub fn offline_on(
    dir: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    max_tokens: usize,
    stop: &[&str],
) -> String {
    let mut model = model_at(dir);
    let mut lora = adapter.map(|d| LoraModel::load_peft(d, &model).unwrap().lora);
    if let Some(l) = &mut lora {
        l.attach(&mut model).unwrap();
    }
    let tok = Tokenizer::for_model(dir, &model.config).unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: max_tokens,
        temperature: 0.0,
        stop_strings: stop.iter().map(|s| s.to_string()).collect(),
        ..GenerateConfig::default()
    };
    generate(&model, &tok, &[prompt], &cfg)
        .unwrap()
        .remove(0)
        .text
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// POST `body` as JSON to `url`; the status and the JSON answer.
pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn get(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A greedy completion: its text.
pub async fn complete(url: &str, model: &str, prompt: &str, max_tokens: usize) -> String {
    let (status, body) = post(
        &format!("{url}/v1/completions"),
        &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["choices"][0]["text"].as_str().unwrap().to_string()
}

/// The `data:` payloads of a server-sent event stream, read to its end.
pub async fn sse(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

/// The value of metric `name` (with labels, as written) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
