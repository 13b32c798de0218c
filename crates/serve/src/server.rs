//! Starting and stopping: [`Server::start`] loads the model and the adapters on the engine's
//! thread, binds the address, and serves HTTP on a tokio runtime of its own; [`Server::shutdown`]
//! (or SIGTERM / Ctrl-C with [`ServeConfig::signals`]) stops accepting connections, lets the
//! running requests finish for up to `drain_timeout`, then stops the engine.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tensor::Device;
use tokio::sync::Notify;
use transformer::{Checkpoint, Gpt2, Tokenizer};

use crate::Result;
use crate::engine::reader::Reader;
use crate::engine::{Command, Engine, EngineLimits, Mode, Shared, forward::SeqCache};
use crate::http::{App, RequestLimits, router};
use crate::metrics::Metrics;
use crate::paths::Roots;

/// Everything `train serve` can set.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The base model directory (config.json, model.safetensors, tokenizer files if any).
    pub model: PathBuf,
    /// The base model's name in requests; default: the directory's name.
    pub model_name: Option<String>,
    /// Adapters to load at start, by name.
    pub adapters: Vec<(String, PathBuf)>,
    /// Adapter roots: every subdirectory holding an `adapter_config.json` is loaded at start
    /// (named after the subdirectory), and `POST /v1/adapters` loads only from under them.
    pub adapter_dirs: Vec<PathBuf>,
    /// Load the adapters found under `adapter_dirs` at start (else they are only roots).
    pub discover: bool,
    pub host: String,
    /// 0: any free port (see [`Server::addr`]).
    pub port: u16,
    /// Every request must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub max_batch: usize,
    pub max_batch_tokens: usize,
    pub kv_cache_mb: f64,
    pub requests: RequestLimits,
    pub drain_timeout: Duration,
    pub mode: Mode,
    /// Store the base's Linear weights in NF4 (QLoRA's 4-bit base) before serving: `Some(double
    /// quantization)`. A model directory saved in NF4 is served in NF4 without it.
    pub quantize_nf4: Option<bool>,
    /// Store the base's frozen Linear weights in f16 (`--precision f16`): half their bytes,
    /// products summed in f32.
    pub f16_base: bool,
    /// Stop on SIGTERM and Ctrl-C.
    pub signals: bool,
}

impl ServeConfig {
    /// Defaults for `model`: 127.0.0.1, port 8000, no key, 32 sequences per step.
    pub fn new(model: impl Into<PathBuf>) -> ServeConfig {
        ServeConfig {
            model: model.into(),
            model_name: None,
            adapters: Vec::new(),
            adapter_dirs: Vec::new(),
            discover: true,
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_batch: 32,
            max_batch_tokens: 2048,
            kv_cache_mb: 512.0,
            requests: RequestLimits {
                max_body_bytes: 1 << 20,
                max_prompt_bytes: 32 << 10,
                max_prompts: 16,
                max_queue: 256,
            },
            drain_timeout: Duration::from_secs(30),
            mode: Mode::Bank,
            quantize_nf4: None,
            f16_base: false,
            signals: false,
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    base_name: String,
    stop: Arc<Notify>,
    thread: JoinHandle<Result<()>>,
}

/// Every subdirectory of `root` holding an `adapter_config.json`, by name.
pub fn discover(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir(root)
        .map_err(|e| format!("adapter directory {}: {e}", root.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("adapter directory {}: {e}", root.display()))?
            .path();
        if path.join("adapter_config.json").is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            found.push((name, path));
        }
    }
    found.sort();
    Ok(found)
}

impl Server {
    /// Loads everything and starts serving; returns once the address is bound and the model
    /// and adapters are loaded (or with the first error).
    pub fn start(cfg: ServeConfig, device: Device) -> Result<Server> {
        let mut ckpt = Checkpoint::load(&cfg.model)?;
        if let Some(double_quant) = cfg.quantize_nf4.filter(|_| !ckpt.is_quantized()) {
            ckpt.quantize_nf4(double_quant)?;
        }
        let tokenizer = Arc::new(Tokenizer::for_model(&cfg.model, &ckpt.config)?);
        let roots = Roots::new(&cfg.adapter_dirs)?;
        let base_name = match &cfg.model_name {
            Some(n) => n.clone(),
            None => cfg
                .model
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "base".into()),
        };
        let mut startup = cfg.adapters.clone();
        for root in cfg.adapter_dirs.iter().filter(|_| cfg.discover) {
            startup.extend(discover(root)?);
        }
        for (name, _) in &startup {
            crate::api::check_name(name).map_err(|e| e.message)?;
        }
        let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
            .map_err(|e| format!("cannot listen on {}:{}: {e}", cfg.host, cfg.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            base_name: base_name.clone(),
            adapters: RwLock::new(Vec::new()),
            queued: AtomicUsize::new(0),
            metrics: Metrics::new(),
        });
        let kv_budget_bytes = (cfg.kv_cache_mb * 1024.0 * 1024.0) as u64;
        let limits = EngineLimits {
            max_batch: cfg.max_batch.max(1),
            max_batch_tokens: cfg.max_batch_tokens.max(1),
            kv_budget_bytes,
            mode: cfg.mode,
        };
        let app = Arc::new(App {
            shared: shared.clone(),
            commands: Mutex::new(mpsc::channel().0), // replaced below once the engine is up
            tokenizer: tokenizer.clone(),
            limits: cfg.requests.clone(),
            n_ctx: ckpt.config.n_positions,
            kv_bytes_per_position: SeqCache::bytes_per_position(&ckpt.config),
            kv_budget_bytes,
            api_key: cfg.api_key.clone(),
            roots,
            reader: Reader {
                config: ckpt.config.clone(),
                mode: cfg.mode,
            },
        });
        // The engine thread builds the model (it never leaves that thread) and the adapters.
        let (commands, inbox) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<std::result::Result<(), String>>();
        let engine_shared = shared.clone();
        let engine_tok = tokenizer.clone();
        let f16_base = cfg.f16_base;
        let engine = std::thread::Builder::new()
            .name("serve-engine".into())
            .spawn(move || {
                let built = (|| -> Result<Engine> {
                    let mut model = Gpt2::from_checkpoint(&ckpt, &device, false)?;
                    drop(ckpt);
                    if f16_base {
                        model.store_frozen_linears_in_f16()?;
                    }
                    let mut engine = Engine::new(model, engine_tok, limits, engine_shared)?;
                    for (name, dir) in startup {
                        engine.load(&name, dir.clone()).map_err(|(_, m)| {
                            format!("adapter `{name}` ({}): {m}", dir.display())
                        })?;
                    }
                    Ok(engine)
                })();
                match built {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(()));
                        engine.run(inbox);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| "the engine thread ended while loading".to_string())??;
        *app.commands.lock().expect("not shared yet") = commands.clone();
        let stop = Arc::new(Notify::new());
        let (stop2, signals, drain) = (stop.clone(), cfg.signals, cfg.drain_timeout);
        let thread = std::thread::Builder::new()
            .name("serve-http".into())
            .spawn(move || -> Result<()> {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                let result = runtime.block_on(serve(listener, app, stop2, signals, drain));
                let _ = commands.send(Command::Stop);
                drop(commands);
                let _ = engine.join();
                result
            })?;
        Ok(Server {
            addr,
            base_name,
            stop,
            thread,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base model's name in requests.
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// Stops accepting connections and drains (as SIGTERM does); [`Server::wait`] to join.
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }

    /// Waits until the server has stopped.
    pub fn wait(self) -> Result<()> {
        self.thread
            .join()
            .map_err(|_| "the server thread panicked".to_string())?
    }
}

/// Serves until told to stop, then drains for at most `drain`.
async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    stop: Arc<Notify>,
    signals: bool,
    drain: Duration,
) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    if signals {
        let stop = stop.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            eprintln!("stopping: no new connections; finishing running requests");
            stop.notify_one();
        });
    }
    let stopped = Arc::new(Notify::new());
    let stopped2 = stopped.clone();
    let server = axum::serve(listener, router(app)).with_graceful_shutdown(async move {
        stop.notified().await;
        stopped2.notify_one();
    });
    let mut task = tokio::spawn(async move { server.await });
    tokio::select! {
        r = &mut task => return Ok(r.map_err(|e| e.to_string())??),
        _ = stopped.notified() => {}
    }
    match tokio::time::timeout(drain, &mut task).await {
        Ok(r) => r.map_err(|e| e.to_string())??,
        Err(_) => {
            eprintln!(
                "drain timeout of {:.1} s reached: stopping the requests still running",
                drain.as_secs_f64()
            );
            task.abort();
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Starts the server, says where it listens, and serves until SIGTERM or Ctrl-C.
pub fn run(mut cfg: ServeConfig, device: Device) -> Result<()> {
    cfg.signals = true;
    let server = Server::start(cfg, device)?;
    eprintln!(
        "serving `{}` on http://{}/v1 (Ctrl-C or SIGTERM to stop)",
        server.base_name(),
        server.addr()
    );
    server.wait()
}
