//! `train bench serve`: a load generator (C concurrent streaming clients, closed loop) against
//! the completions server of crates/serve, run in this process on 127.0.0.1.
//!
//! Each request is an E2E test MR as a prompt (`MR ||`, as fine-tuning formats it), `max_tokens`
//! greedy tokens past any end-of-text (`ignore_eos`), so every case generates the same number
//! of tokens. Request k goes to adapter k mod A. Cases, on one base model:
//! - `base`: every request on the base model;
//! - `mixed A`: A distinct adapters (rank r, random A and B) in one stream of requests, served
//!   unmerged by the adapter bank (SGMV), sequences of any adapters sharing every step;
//! - `merged`: every request on one adapter merged into the base (the cost of the base);
//! - `switch A`: the naive alternative: requests served adapter by adapter, merging the next
//!   adapter into the base (and unmerging the last) to switch.
//!
//! For each: generated tokens/s, latency and time to first token (p50, p99) per request. Then
//! the cost of an adapter: time of `POST /v1/adapters` while the mixed case runs and into an
//! idle server, and per loaded adapter the growth of the process's resident memory and the
//! bank's stack bytes (`serve_adapter_memory_bytes`), against the adapter's own bytes.
//! `--soak SECONDS` adds a soak: C clients while adapters are loaded and unloaded every two
//! seconds; failed requests and resident memory after warm-up and at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use lora::{Init, LoraConfig, LoraModel, Target};
use serde_json::{Value, json};
use serve::{Mode, ServeConfig, Server};
use tensor::Device;
use transformer::Checkpoint;

use super::median;
use super::table::{Report, f};

/// Options of `train bench serve`.
#[derive(Parser, Debug, Clone)]
pub struct ServeBenchArgs {
    /// The base model directory.
    #[arg(long, default_value = "models/base")]
    pub model: PathBuf,
    /// E2E pairs (`MR||reference` lines); their distinct MRs are the prompts.
    #[arg(long, default_value = "data/e2e/test.txt")]
    pub data: PathBuf,
    /// Numbers of distinct adapters mixed in the stream of requests.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub adapters: Vec<usize>,
    /// Numbers of adapters for the switch-by-merging server.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub switch: Vec<usize>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Requests per case.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// The adapters' rank (targets q and v).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Also run a soak of this many seconds (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub soak: f64,
    /// Where to write the adapters [default: a fresh directory under the system's temp dir].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one case.
#[derive(Default)]
struct Load {
    tokens: usize,
    seconds: f64,
    latency: Vec<f64>,
    ttft: Vec<f64>,
    failed: usize,
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// The distinct MRs of an E2E file, as prompts.
fn prompts(path: &Path) -> crate::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some((mr, _)) = line.split_once("||") else {
            continue;
        };
        let p = format!("{} ||", mr.trim());
        if out.last() != Some(&p) && !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(format!("{}: no `MR||reference` line", path.display()).into());
    }
    Ok(out)
}

/// Writes `n` random adapters of rank `r` (q, v) for the model in `dir/a{i}`.
fn write_adapters(model: &Path, dir: &Path, n: usize, r: usize) -> crate::Result<u64> {
    let ckpt = Checkpoint::load(model)?;
    let base = transformer::Gpt2::from_checkpoint(&ckpt, &Device::cpu(), false)?;
    let mut cfg = LoraConfig::new(r, 2.0 * r as f32, &[Target::Q, Target::V]);
    cfg.init = Init::BothRandom;
    let mut bytes = 0;
    for i in 0..n {
        let lora = LoraModel::new(&base, &cfg, 1000 + i as u64)?;
        bytes = lora.lora_bytes();
        lora.save_peft(dir.join(format!("a{i}")))?;
    }
    Ok(bytes)
}

/// Resident memory of this process in bytes (Linux; 0 elsewhere).
fn rss() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        });
    pages.unwrap_or(0) * 4096
}

/// One streamed request: (tokens, latency, time to first token), or an error.
async fn request(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> Result<(usize, f64, f64), String> {
    let start = Instant::now();
    let mut resp = client
        .post(format!("{url}/v1/completions"))
        .json(
            &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0, "stream": true, "ignore_eos": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!(
            "{status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut ttft = None;
    let mut body = String::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        ttft.get_or_insert_with(|| start.elapsed().as_secs_f64());
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    let tokens = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
        .ok_or_else(|| format!("no usage in the stream: {body}"))?;
    Ok((
        tokens as usize,
        start.elapsed().as_secs_f64(),
        ttft.unwrap_or(0.0),
    ))
}

/// C clients until `stop` (or `requests` requests); request k on `models[k % len]`.
async fn drive(
    url: &str,
    models: Vec<String>,
    prompts: Arc<Vec<String>>,
    concurrency: usize,
    requests: Option<usize>,
    max_tokens: usize,
    stop: Arc<AtomicBool>,
) -> Load {
    let next = Arc::new(AtomicUsize::new(0));
    let models = Arc::new(models);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (url, next, models, prompts, stop) = (
            url.to_string(),
            next.clone(),
            models.clone(),
            prompts.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut load = Load::default();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if requests.is_some_and(|n| k >= n) || stop.load(Ordering::Relaxed) {
                    return load;
                }
                let model = &models[k % models.len()];
                let prompt = &prompts[k % prompts.len()];
                match request(&client, &url, model, prompt, max_tokens).await {
                    Ok((tokens, latency, ttft)) => {
                        load.tokens += tokens;
                        load.latency.push(latency);
                        load.ttft.push(ttft);
                    }
                    Err(e) => {
                        eprintln!("request on {model} failed: {e}");
                        load.failed += 1;
                    }
                }
            }
        }));
    }
    let mut total = Load::default();
    for t in tasks {
        let l = t.await.expect("a client task panicked");
        total.tokens += l.tokens;
        total.latency.extend(l.latency);
        total.ttft.extend(l.ttft);
        total.failed += l.failed;
    }
    total.seconds = start.elapsed().as_secs_f64();
    total
}

fn start_server(
    args: &ServeBenchArgs,
    device: &Device,
    mode: Mode,
    adapters: &[(String, PathBuf)],
    root: &Path,
) -> crate::Result<(Server, String)> {
    let mut cfg = ServeConfig::new(&args.model);
    cfg.model_name = Some("base".into());
    cfg.port = 0;
    cfg.mode = mode;
    cfg.adapters = adapters.to_vec();
    cfg.adapter_dirs = vec![root.to_path_buf()];
    cfg.discover = false;
    cfg.max_batch = args.concurrency.max(1);
    cfg.requests.max_queue = 4 * args.concurrency.max(16);
    let server = Server::start(cfg, device.clone())?;
    let url = format!("http://{}", server.addr());
    Ok((server, url))
}

/// `train bench serve`.
pub fn run(args: &ServeBenchArgs, device: &Device) -> crate::Result<()> {
    if args.concurrency == 0 || args.requests == 0 || args.max_tokens == 0 {
        return Err("--concurrency, --requests and --max-tokens must be at least 1".into());
    }
    let prompts = Arc::new(prompts(&args.data)?);
    let work = match &args.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("bench-serve-{}", std::process::id())),
    };
    // Adapters go in work/adapters; the server's root is work/root (empty but for what the
    // load probe copies in), so that discovery loads nothing unasked.
    let most = args
        .adapters
        .iter()
        .chain(&args.switch)
        .copied()
        .max()
        .unwrap_or(1)
        .max(if args.soak > 0.0 { 20 } else { 2 });
    let (store, root) = (work.join("adapters"), work.join("root"));
    std::fs::create_dir_all(&root)?;
    let adapter_bytes = write_adapters(&args.model, &store, most, args.rank)?;
    let named = |n: usize| -> Vec<(String, PathBuf)> {
        (0..n)
            .map(|i| (format!("a{i}"), store.join(format!("a{i}"))))
            .collect()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = Report::new(
        args.json,
        &format!(
            "train bench serve: {} clients, {} requests of {} tokens per case, rank {}, {}",
            args.concurrency,
            args.requests,
            args.max_tokens,
            args.rank,
            super::device_label(device)
        ),
        &[
            ("case", 12),
            ("tokens/s", 9),
            ("vs base", 8),
            ("p50 ms", 8),
            ("p99 ms", 8),
            ("ttft p50", 9),
            ("ttft p99", 9),
            ("failed", 6),
        ],
    );
    let mut base_rate = None;
    let mut cases: Vec<(String, Mode, usize, bool)> = vec![("base".into(), Mode::Bank, 0, false)];
    for &a in &args.adapters {
        cases.push((
            format!("mixed {a}"),
            Mode::Bank,
            a,
            a == 16 || a == *args.adapters.iter().max().unwrap_or(&a),
        ));
    }
    cases.push(("merged".into(), Mode::MergeSwitch, 1, false));
    for &a in &args.switch {
        cases.push((format!("switch {a}"), Mode::MergeSwitch, a, false));
    }
    let mut load_times = Vec::new();
    for (name, mode, a, probe) in cases {
        let (server, url) = start_server(args, device, mode, &named(a), &root)?;
        let models: Vec<String> = if a == 0 {
            vec!["base".into()]
        } else {
            (0..a).map(|i| format!("a{i}")).collect()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let load = runtime.block_on(async {
            let prober = probe.then(|| {
                let (url, store, root, stop) =
                    (url.clone(), store.clone(), root.clone(), stop.clone());
                tokio::spawn(load_probe(url, store, root, stop))
            });
            let load = drive(
                &url,
                models,
                prompts.clone(),
                args.concurrency,
                Some(args.requests),
                args.max_tokens,
                Arc::new(AtomicBool::new(false)),
            )
            .await;
            stop.store(true, Ordering::Relaxed);
            if let Some(p) = prober {
                load_times.extend(p.await.unwrap_or_default());
            }
            load
        });
        server.shutdown();
        server.wait()?;
        let rate = load.tokens as f64 / load.seconds;
        let base = *base_rate.get_or_insert(rate);
        let ms = |v: &[f64], p| percentile(v, p) * 1e3;
        report.row(
            json!({"bench": "serve", "case": name, "adapters": a, "tokens_per_s": rate,
                   "vs_base": rate / base, "latency_p50_ms": ms(&load.latency, 0.5),
                   "latency_p99_ms": ms(&load.latency, 0.99), "ttft_p50_ms": ms(&load.ttft, 0.5),
                   "ttft_p99_ms": ms(&load.ttft, 0.99), "failed": load.failed,
                   "requests": load.latency.len(), "concurrency": args.concurrency}),
            &[
                name.clone(),
                f(rate, 1),
                format!("{:.2}x", rate / base),
                f(ms(&load.latency, 0.5), 0),
                f(ms(&load.latency, 0.99), 0),
                f(ms(&load.ttft, 0.5), 0),
                f(ms(&load.ttft, 0.99), 0),
                load.failed.to_string(),
            ],
        );
    }
    if !load_times.is_empty() {
        let ms: Vec<f64> = load_times.iter().map(|s| s * 1e3).collect();
        report.note(
            json!({"bench": "serve", "adapter_load_ms_median": median(&ms),
                   "adapter_load_ms_max": ms.iter().copied().fold(0.0, f64::max),
                   "loads": ms.len()}),
            &format!(
                "loading a rank-{} adapter while serving: median {:.1} ms, max {:.1} ms ({} loads)",
                args.rank,
                median(&ms),
                ms.iter().copied().fold(0.0, f64::max),
                ms.len()
            ),
        );
    }
    memory_per_adapter(
        args,
        device,
        &store,
        &root,
        &runtime,
        adapter_bytes,
        &report,
    )?;
    if args.soak > 0.0 {
        soak(args, device, &store, &root, prompts, &runtime, &report)?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// While a case runs: load and unload one more adapter, over and over; the load times.
async fn load_probe(url: String, store: PathBuf, root: PathBuf, stop: Arc<AtomicBool>) -> Vec<f64> {
    let client = reqwest::Client::new();
    let dir = root.join("probe");
    if copy_dir(&store.join("a0"), &dir).is_err() {
        return Vec::new();
    }
    let mut times = Vec::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let r = client
            .post(format!("{url}/v1/adapters"))
            .json(&json!({"name": "probe", "path": "probe"}))
            .send()
            .await;
        if !r.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        times.push(t.elapsed().as_secs_f64());
        let _ = client
            .delete(format!("{url}/v1/adapters/probe"))
            .send()
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    times
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// Resident memory growth per adapter loaded through `POST /v1/adapters`, against the
/// adapter's own bytes (the first load is a warm-up, not counted).
fn memory_per_adapter(
    args: &ServeBenchArgs,
    device: &Device,
    store: &Path,
    root: &Path,
    runtime: &tokio::runtime::Runtime,
    adapter_bytes: u64,
    report: &Report,
) -> crate::Result<()> {
    let n = args.adapters.iter().copied().max().unwrap_or(1);
    for i in 0..n {
        copy_dir(&store.join(format!("a{i}")), &root.join(format!("mem{i}")))?;
    }
    let (server, url) = start_server(args, device, Mode::Bank, &[], root)?;
    let loaded = runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut before = 0;
        let mut times = Vec::new();
        for i in 0..n {
            if i == 1 {
                before = rss();
            }
            let name = format!("mem{i}");
            let t = Instant::now();
            let r = client
                .post(format!("{url}/v1/adapters"))
                .json(&json!({"name": name, "path": name}))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!(
                    "loading {name}: {}",
                    r.text().await.unwrap_or_default()
                ));
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let after = rss();
        let metrics = client
            .get(format!("{url}/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((
            before,
            after,
            times,
            metric(&metrics, "serve_adapter_memory_bytes"),
        ))
    });
    server.shutdown();
    server.wait()?;
    let (before, after, times, bank_bytes) = loaded?;
    report.note(
        json!({"bench": "serve", "adapter_load_idle_ms_median": median(&times),
               "adapter_load_idle_ms_max": times.iter().copied().fold(0.0, f64::max),
               "loads": times.len()}),
        &format!(
            "loading a rank-{} adapter into an idle server: median {:.1} ms, max {:.1} ms ({} loads)",
            args.rank,
            median(&times),
            times.iter().copied().fold(0.0, f64::max),
            times.len()
        ),
    );
    if n < 2 {
        return Ok(());
    }
    let per = after.saturating_sub(before) as f64 / (n - 1) as f64;
    let bank = bank_bytes.unwrap_or(f64::NAN) / n as f64;
    report.note(
        json!({"bench": "serve", "adapters_loaded": n, "rss_per_adapter_bytes": per,
               "bank_bytes_per_adapter": bank, "adapter_bytes": adapter_bytes}),
        &format!(
            "memory per loaded adapter ({n} loaded): {:.1} KiB resident, {:.1} KiB in the bank's \
             stacks, the adapter's own weights {:.1} KiB ({:.2}x resident, {:.2}x in the bank)",
            per / 1024.0,
            bank / 1024.0,
            adapter_bytes as f64 / 1024.0,
            per / adapter_bytes as f64,
            bank / adapter_bytes as f64
        ),
    );
    Ok(())
}

/// The value of the sample `name` (no labels) in Prometheus' text format.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
}

/// C clients on 16 adapters and the base while other adapters are loaded, used and unloaded
/// every two seconds; failures and resident memory.
fn soak(
    args: &ServeBenchArgs,
    device: &Device,
    store: &Path,
    root: &Path,
    prompts: Arc<Vec<String>>,
    runtime: &tokio::runtime::Runtime,
    report: &Report,
) -> crate::Result<()> {
    let stable: Vec<(String, PathBuf)> = (0..16)
        .map(|i| (format!("a{i}"), store.join(format!("a{i}"))))
        .collect();
    for i in 16..20 {
        copy_dir(
            &store.join(format!("a{i}")),
            &root.join(format!("churn{}", i - 16)),
        )?;
    }
    let (server, url) = start_server(args, device, Mode::Bank, &stable, root)?;
    let mut models: Vec<String> = stable.iter().map(|(n, _)| n.clone()).collect();
    models.push("base".into());
    let stop = Arc::new(AtomicBool::new(false));
    let duration = Duration::from_secs_f64(args.soak);
    let (load, churn_failed, churns, rss_warm, rss_end) = runtime.block_on(async {
        let clients = tokio::spawn({
            let (url, stop, prompts) = (url.clone(), stop.clone(), prompts.clone());
            let (c, t) = (args.concurrency, args.max_tokens);
            async move { drive(&url, models, prompts, c, None, t, stop).await }
        });
        let start = Instant::now();
        let client = reqwest::Client::new();
        let (mut failed, mut churns, mut rss_warm) = (0, 0, 0);
        let mut k = 0;
        while start.elapsed() < duration {
            let name = format!("churn{}", k % 4);
            k += 1;
            let ok = client
                .post(format!("{url}/v1/adapters"))
                .json(&json!({"name": name, "path": name}))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let used = ok
                && request(&client, &url, &name, &prompts[k % prompts.len()], 8)
                    .await
                    .is_ok();
            let gone = client
                .delete(format!("{url}/v1/adapters/{name}"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            failed += usize::from(!(ok && used && gone));
            churns += 1;
            if rss_warm == 0 && start.elapsed() >= duration / 5 {
                rss_warm = rss();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let load = clients.await.expect("the clients' task panicked");
        (load, failed, churns, rss_warm.max(1), rss())
    });
    server.shutdown();
    server.wait()?;
    report.note(
        json!({"bench": "serve", "soak_seconds": args.soak, "requests": load.latency.len(),
               "failed": load.failed, "adapter_cycles": churns, "adapter_cycles_failed": churn_failed,
               "rss_after_warmup": rss_warm, "rss_end": rss_end,
               "tokens_per_s": load.tokens as f64 / load.seconds}),
        &format!(
            "soak {:.0} s: {} requests, {} failed; {} adapter load/use/unload cycles, {} failed; \
             resident memory after warm-up {:.1} MiB, at the end {:.1} MiB",
            args.soak,
            load.latency.len(),
            load.failed,
            churns,
            churn_failed,
            rss_warm as f64 / 1048576.0,
            rss_end as f64 / 1048576.0
        ),
    );
    Ok(())
}
