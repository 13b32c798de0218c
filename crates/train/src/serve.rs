//! `train serve`: the OpenAI-compatible completions server of crates/serve over one base model
//! and any number of LoRA adapters (see docs/serve.md).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tensor::Device;

/// Options of `train serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Base model directory: config.json + model.safetensors (+ vocab.json, merges.txt).
    /// Or a Hugging Face Hub id, `name` or `org/name`, with `@revision` for a branch, tag or
    /// commit (`org/name@v1`): read from the HF cache ($HF_HUB_CACHE, else $HF_HOME/hub), and
    /// downloaded into it unless HF_HUB_OFFLINE=1. A local path that exists always wins.
    #[arg(long)]
    pub model: PathBuf,
    /// The base model's name in requests [default: the model directory's name, or the Hub id
    /// as given].
    #[arg(long)]
    pub model_name: Option<String>,
    /// An adapter to serve, as NAME=DIR (a PEFT adapter directory, or a Hub id as for --model);
    /// may be repeated.
    #[arg(long, value_parser = parse_adapter)]
    pub adapter: Vec<(String, PathBuf)>,
    /// Load every adapter found in this directory (each subdirectory with an
    /// adapter_config.json, named after it); POST /v1/adapters loads only from under these
    /// directories. May be repeated.
    #[arg(long)]
    pub adapter_dir: Vec<PathBuf>,
    /// Address to listen on; the default answers this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, env = "SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most sequences decoded in one step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most new tokens in one step (prefills count their whole prompt).
    #[arg(long, default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// KV cache budget in MiB: a sequence is admitted when its prompt + max_tokens fit.
    #[arg(long, default_value_t = 512.0)]
    pub kv_cache_mb: f64,
    /// Most prompts waiting for admission; more are answered 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body in KiB (413 beyond).
    #[arg(long, default_value_t = 1024)]
    pub max_body_kb: usize,
    /// Longest prompt in bytes (413 beyond).
    #[arg(long, default_value_t = 32768)]
    pub max_prompt_bytes: usize,
    /// Most prompts in one request (413 beyond).
    #[arg(long, default_value_t = 16)]
    pub max_prompts: usize,
    /// Seconds to let running requests finish after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    #[command(flatten)]
    pub quant: crate::quantize::QuantizeArgs,
}

/// `NAME=DIR`.
fn parse_adapter(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), crate::hub::adapter_dir(dir)?))
        }
        _ => Err(format!("expected NAME=DIR, found `{s}`")),
    }
}

impl ServeArgs {
    pub fn config(&self) -> crate::Result<serve::ServeConfig> {
        if !(self.drain_timeout >= 0.0 && self.drain_timeout.is_finite()) {
            return Err(format!(
                "--drain-timeout {}: expected a number of seconds ≥ 0",
                self.drain_timeout
            )
            .into());
        }
        if !(self.kv_cache_mb > 0.0 && self.kv_cache_mb.is_finite()) {
            return Err(format!("--kv-cache-mb {}: expected a size > 0", self.kv_cache_mb).into());
        }
        let spec = self.model.to_string_lossy();
        let model = crate::hub::model_dir(&spec)?;
        let mut cfg = serve::ServeConfig::new(&model);
        // A Hub id is served under the id, not its snapshot's commit hash.
        cfg.model_name = self
            .model_name
            .clone()
            .or_else(|| (model != self.model).then(|| spec.to_string()));
        cfg.adapters = self.adapter.clone();
        cfg.adapter_dirs = self.adapter_dir.clone();
        cfg.host = self.host.clone();
        cfg.port = self.port;
        cfg.api_key = self.api_key.clone().filter(|k| !k.is_empty());
        cfg.max_batch = self.max_batch;
        cfg.max_batch_tokens = self.max_batch_tokens;
        cfg.kv_cache_mb = self.kv_cache_mb;
        cfg.requests = serve::RequestLimits {
            max_body_bytes: self.max_body_kb * 1024,
            max_prompt_bytes: self.max_prompt_bytes,
            max_prompts: self.max_prompts,
            max_queue: self.max_queue,
        };
        cfg.drain_timeout = Duration::from_secs_f64(self.drain_timeout);
        cfg.quantize_nf4 = self.quant.nf4()?;
        cfg.f16_base = self.quant.precision == crate::quantize::Precision::F16;
        Ok(cfg)
    }
}

/// `train serve`: serves until SIGTERM or Ctrl-C, then drains and returns.
pub fn run(args: &ServeArgs, device: &Device) -> crate::Result<()> {
    serve::run(args.config()?, device.clone())
}
