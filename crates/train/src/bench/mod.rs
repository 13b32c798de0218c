//! `train bench ...`: measured speed and memory. Results are recorded in `docs/benchmarks.md`
//! with the machine and the date; tests run every bench with the tiniest settings but never
//! assert on a time.
//!
//! - [`matmul`](mod@matmul): GFLOP/s of C = A·B for square sizes and GPT-2 124M's training shapes, and the
//!   fraction of the device's measured peak;
//! - [`step`]: one training step (forward, loss, backward, clipping, AdamW) of a GPT-2 shape with
//!   random weights, LoRA and full fine-tuning: ms/step, tokens/s, memory by purpose;
//! - [`ops`]: where a step's time goes, by op family (the profiler of [`tensor::profile`]);
//! - [`plan`]: what a step asks of the device, counted rather than timed (dispatches by kernel,
//!   submissions, blocking waits, bytes bound, matmul FLOPs by shape, memory by purpose), as a
//!   dry run on a GPU, so it runs anywhere;
//! - [`infer`]: prompt throughput and time per generated token with the KV cache, for the base
//!   model, an unmerged and a merged adapter, and a batch mixing adapters (SGMV);
//! - [`scaling`]: step time and memory against B, T and the model's size;
//! - [`serve`]: a load generator against the completions server: many adapters mixed in one
//!   stream of requests, against the base model, one merged adapter and switching by merging.
//!
//! Every bench prints a table, or one JSON object per line with `--json`, and skips a case
//! whose estimated time exceeds `--budget` seconds (the estimate comes from the FLOPs of the
//! case and the rate the device achieved so far, starting from a short matmul probe).
//!
//! The model shapes ([`shape`]): `e2e` (the shipped base model: 4 layers, 4 heads, 128 wide,
//! its 4,096-token vocabulary, 128 positions; results recorded before 2026-12-07 used GPT-2's
//! vocabulary of 50,257, as the base then did), `tiny` (4 layers, 4 heads, 256 wide, a byte
//! vocabulary of 256, 256 positions: the model of the PyTorch CPU comparison), `124m` (GPT-2
//! small) and `medium` (GPT-2 medium, 355M); or the path of a Hugging Face `config.json`. Weights are random (GPT-2's init): speed does not depend on
//! their values.

pub mod infer;
pub mod matmul;
pub mod ops;
pub mod plan;
pub mod scaling;
pub mod serve;
pub mod step;
pub mod table;

use crate::quantize::Precision;
use std::time::Instant;

use autograd::{AdamW, ParamGroup, Schedule, Trainable};
use lora::{LoraConfig, LoraModel, Target};
use tensor::ops::matmul::{MatmulOpts, matmul};
use tensor::{Device, Tensor};
use transformer::{Gpt2, GptConfig, TokenizerKind, init_checkpoint};

use crate::batch::Batch;
use crate::trainer::{self, OptimConfig, StepStats};

pub use infer::InferArgs;
pub use matmul::{MatmulArgs, bench_matmul};
pub use ops::OpsArgs;
pub use plan::PlanArgs;
pub use scaling::ScalingArgs;
pub use serve::ServeBenchArgs;
pub use step::StepArgs;

/// Options of `train bench all`.
#[derive(clap::Parser, Debug, Clone)]
pub struct AllArgs {
    /// Skip a case whose estimated time exceeds this many seconds (passed to every bench).
    #[arg(long, default_value_t = 60.0)]
    pub budget: f64,
    /// Print one JSON object per measurement instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `train bench all`: every bench with its defaults for `device` (matmul on that device and the
/// CPU), in the order of the module doc.
pub fn run_all(args: &AllArgs, device: &Device) -> crate::Result<()> {
    use clap::Parser;
    let budget = args.budget.to_string();
    let mut common = vec!["--budget", budget.as_str()];
    if args.json {
        common.push("--json");
    }
    let with = |name: &'static str, extra: &[&'static str]| {
        let mut v = vec![name];
        v.extend(extra);
        v.extend(common.iter().copied());
        v
    };
    let devices: &[&str] = if device.is_gpu() {
        &["--devices", "gpu,cpu"]
    } else {
        &["--devices", "cpu"]
    };
    bench_matmul(&MatmulArgs::try_parse_from(with("matmul", devices))?)?;
    step::run(&StepArgs::try_parse_from(with("step", &[]))?, device)?;
    ops::run(&OpsArgs::try_parse_from(with("ops", &[]))?, device)?;
    infer::run(&InferArgs::try_parse_from(with("infer", &[]))?, device)?;
    scaling::run(&ScalingArgs::try_parse_from(with("scaling", &[]))?, device)
}

/// The model shapes benches accept, by name.
pub const SHAPES: [&str; 4] = ["e2e", "tiny", "124m", "medium"];

/// The configuration of a named shape (see the module doc).
pub fn shape(name: &str) -> crate::Result<GptConfig> {
    let small = GptConfig::gpt2_small();
    Ok(match name {
        "e2e" => GptConfig {
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            n_positions: 128,
            vocab_size: 4096,
            ..small
        },
        "tiny" => GptConfig {
            n_layer: 4,
            n_head: 4,
            n_embd: 256,
            vocab_size: 256,
            n_positions: 256,
            tokenizer: TokenizerKind::Bytes,
            ..small
        },
        "124m" => small,
        "medium" => GptConfig::gpt2_medium(),
        other if std::path::Path::new(other).is_file() => {
            GptConfig::from_file(std::path::Path::new(other))?
        }
        other => {
            return Err(format!(
                "unknown model shape `{other}`: expected one of {}, or the path of a config.json",
                SHAPES.join(", ")
            )
            .into());
        }
    })
}

/// Parse `BxT` (e.g. `8x1024`) into (B, T).
pub fn parse_bt(s: &str) -> crate::Result<(usize, usize)> {
    let bad = || format!("`{s}` is not a batch shape: expected BxT with B, T > 0, e.g. 8x1024");
    let (b, t) = s.split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let (b, t): (usize, usize) = (
        b.trim().parse().map_err(|_| bad())?,
        t.trim().parse().map_err(|_| bad())?,
    );
    if b == 0 || t == 0 {
        return Err(bad().into());
    }
    Ok((b, t))
}

/// What a training step updates.
#[derive(Clone, Debug)]
pub enum Mode {
    /// LoRA of rank r with this alpha on these targets; the base is frozen, and with `nf4` its
    /// Linear weights are stored in NF4 with double quantization (QLoRA's setting), with `f16`
    /// in f16 (`--precision f16`).
    Lora {
        r: usize,
        alpha: f32,
        targets: Vec<Target>,
        nf4: bool,
        f16: bool,
    },
    /// Every parameter trainable.
    Full,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Lora { nf4: true, .. } => "qlora",
            Mode::Lora { f16: true, .. } => "lora-f16",
            Mode::Lora { .. } => "lora",
            Mode::Full => "full",
        }
    }

    /// `lora`, `qlora` (LoRA on an NF4 base) or `full`, LoRA with rank `r`, `alpha` and targets
    /// `targets` (e.g. q,v).
    pub fn parse(name: &str, r: usize, alpha: f32, targets: &[String]) -> crate::Result<Mode> {
        let lora = |nf4| -> crate::Result<Mode> {
            Ok(Mode::Lora {
                r,
                alpha,
                targets: targets
                    .iter()
                    .map(|t| Target::parse(t))
                    .collect::<Result<_, _>>()?,
                nf4,
                f16: false,
            })
        };
        match name {
            "lora" => lora(false),
            "qlora" => lora(true),
            "full" => Ok(Mode::Full),
            other => Err(format!("unknown mode `{other}`: expected lora, qlora or full").into()),
        }
    }

    /// The mode with its frozen base stored at `precision`: f16 applies to LoRA on an f32
    /// base; QLoRA's base is NF4 and full fine-tuning trains every weight in f32, so both are
    /// refused with f16.
    pub fn at(self, precision: Precision) -> crate::Result<Mode> {
        match (self, precision) {
            (mode, Precision::F32) => Ok(mode),
            (
                Mode::Lora {
                    nf4: false,
                    r,
                    alpha,
                    targets,
                    ..
                },
                Precision::F16,
            ) => Ok(Mode::Lora {
                r,
                alpha,
                targets,
                nf4: false,
                f16: true,
            }),
            (mode, Precision::F16) => Err(format!(
                "--precision f16 stores LoRA's frozen base in f16; mode `{}` cannot take it \
                 (qlora's base is NF4, full fine-tuning trains every weight in f32)",
                mode.name()
            )
            .into()),
        }
    }
}

/// A randomly initialised model set up for training, with its optimizer.
pub struct Trainee {
    pub model: Gpt2,
    pub lora: Option<LoraModel>,
    pub opt: AdamW,
    /// Trainable parameter values.
    pub trainable: usize,
    /// Bytes of every parameter (base and adapter).
    pub parameter_bytes: u64,
}

/// Build `cfg` with GPT-2's random init on `device`, for `mode`.
pub fn trainee(cfg: &GptConfig, mode: &Mode, device: &Device, seed: u64) -> crate::Result<Trainee> {
    let mut ckpt = init_checkpoint(cfg, seed)?;
    if let Mode::Lora { nf4: true, .. } = mode {
        ckpt.quantize_nf4(true)?;
    }
    let full = matches!(mode, Mode::Full);
    let mut model = Gpt2::from_checkpoint(&ckpt, device, full)?;
    drop(ckpt);
    let (lora, params): (Option<LoraModel>, Vec<Trainable>) = match mode {
        Mode::Lora {
            r,
            alpha,
            targets,
            f16,
            ..
        } => {
            let lcfg = LoraConfig::new(*r, *alpha, targets);
            let lora = LoraModel::inject(&mut model, &lcfg, seed)?;
            if *f16 {
                model.store_frozen_linears_in_f16()?;
            }
            let params = lora.trainable_params();
            (Some(lora), params)
        }
        Mode::Full => (
            None,
            model
                .named_params()
                .iter()
                .filter_map(|p| p.as_trainable().cloned())
                .collect(),
        ),
    };
    let trainable = params.iter().map(|p| p.value.numel()).sum();
    // Weights stored as NF4 codes or f16 halves are not Params: their bytes are counted here.
    let stored_bytes: u64 = model
        .linears()
        .map(|l| match &l.weight {
            transformer::Weight::Dense(_) => 0,
            stored => stored.bytes(),
        })
        .sum();
    let parameter_bytes = autograd::memory::parameter_bytes(model.named_params()).live
        + stored_bytes
        + lora.as_ref().map_or(0, LoraModel::lora_bytes);
    Ok(Trainee {
        model,
        lora,
        opt: AdamW::new(vec![ParamGroup::new(params, 0.01)]),
        trainable,
        parameter_bytes,
    })
}

/// Pseudo-random ids (a fixed linear congruential sequence; no statistics depend on them).
pub fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// B sequences of T pseudo-random token ids below `vocab`, their next-token targets and unit
/// weights (every position counts, as in pretraining-style batches).
pub fn token_batch(b: usize, t: usize, vocab: usize, seed: u64) -> Batch {
    let ids = random_ids(b * t + 1, vocab, seed);
    Batch {
        targets: ids[1..].to_vec(),
        ids: ids[..b * t].to_vec(),
        weights: vec![1.0; b * t],
        b,
        t,
        lengths: vec![t; b],
    }
}

/// The optimizer of every bench's step: AdamW at a constant 1e-4, the global norm clipped to 1.
const BENCH_OPTIM: OptimConfig = OptimConfig {
    lr: 1e-4,
    schedule: Schedule::Constant,
    clip: 1.0,
};

impl Trainee {
    /// One optimizer step on `batch` ([`crate::trainer::step`], with its profiler phases). The
    /// time around it is the step's: the step ends with its one readback (loss, norm, skip
    /// flag), recorded after every other command of the step, and the device runs commands in
    /// order, so the readback's wait is a wait for the whole step (no second sync is needed, and
    /// the step accounting counts one wait). A non-finite loss is an error: random weights
    /// should never give one.
    pub fn step(&mut self, batch: &Batch) -> crate::Result<StepStats> {
        let stats = trainer::step(
            &self.model,
            &mut self.opt,
            std::slice::from_ref(batch),
            &BENCH_OPTIM,
            0,
        )?
        .map_err(|bad| format!("the benchmark {bad}"))?;
        Ok(stats)
    }
}

/// Multiply-adds ×2 of one training step of `cfg` on B×T tokens: the forward's matmuls
/// (12·C² per token per layer, the head's V·C, attention's 2·T·C per token per layer) counted
/// once for the forward and twice (full: dx and dW) or once (LoRA: dx only, the adapters'
/// thin products neglected) for the backward.
pub fn step_flops(cfg: &GptConfig, b: usize, t: usize, full: bool) -> f64 {
    let (c, l, v) = (cfg.n_embd as f64, cfg.n_layer as f64, cfg.vocab_size as f64);
    let n = (b * t) as f64;
    let forward = 2.0 * n * (l * 12.0 * c * c + v * c) + 2.0 * 2.0 * n * t as f64 * c * l;
    forward * if full { 3.0 } else { 2.0 }
}

/// Multiply-adds ×2 of a forward pass over `n` new tokens that attend to `ctx` positions.
pub fn forward_flops(cfg: &GptConfig, n: usize, ctx: usize) -> f64 {
    let (c, l, v) = (cfg.n_embd as f64, cfg.n_layer as f64, cfg.vocab_size as f64);
    2.0 * n as f64 * (l * 12.0 * c * c + v * c + 2.0 * ctx as f64 * c * l)
}

/// Skips cases whose estimated time exceeds a budget: the estimate is the case's FLOPs over the
/// rate the device achieved on the last case measured (before the first: half the rate of a
/// short 256³ matmul probe).
pub struct Budget {
    pub seconds: f64,
    rate: f64,
}

impl Budget {
    pub fn new(seconds: f64, device: &Device) -> crate::Result<Budget> {
        let n = 256;
        let a = Tensor::full(&[n, n], 0.5, device)?;
        let _ = matmul(&a, &a, None, MatmulOpts::default())?;
        device.sync()?;
        let start = Instant::now();
        for _ in 0..3 {
            let _ = matmul(&a, &a, None, MatmulOpts::default())?;
        }
        device.sync()?;
        let secs = start.elapsed().as_secs_f64().max(1e-9) / 3.0;
        Ok(Budget {
            seconds,
            rate: 0.5 * 2.0 * (n * n * n) as f64 / secs,
        })
    }

    /// Estimated seconds of work of `flops`.
    pub fn estimate(&self, flops: f64) -> f64 {
        flops / self.rate
    }

    /// Learn the rate from a measured case.
    pub fn observe(&mut self, flops: f64, seconds: f64) {
        if seconds > 0.0 && flops > 0.0 {
            self.rate = flops / seconds;
        }
    }
}

/// The median of `xs` (mean of the two middle values for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The LoRA settings of the benches (rank, alpha, targets).
#[derive(clap::Args, Debug, Clone)]
pub struct LoraArgs {
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// LoRA targets.
    #[arg(long, value_delimiter = ',', default_value = "q,v")]
    pub targets: Vec<String>,
}

/// Which fine-tuning modes a training bench compares, and the LoRA settings.
#[derive(clap::Args, Debug, Clone)]
pub struct ModeArgs {
    /// Modes: lora, qlora (LoRA on a base stored in NF4 with double quantization), full.
    #[arg(long, value_delimiter = ',', default_value = "lora,full")]
    pub modes: Vec<String>,
    /// The frozen base's precision for the lora mode: f32, or f16 (its Linear weights stored in
    /// f16, products summed in f32; `f32,f16` benches both). qlora and full stay as they are.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32")]
    pub precision: Vec<Precision>,
    #[command(flatten)]
    pub lora: LoraArgs,
}

impl ModeArgs {
    /// The modes asked for, each with the LoRA settings, lora once per precision.
    pub fn parse(&self) -> crate::Result<Vec<Mode>> {
        let l = &self.lora;
        let mut modes = Vec::new();
        for m in &self.modes {
            let mode = Mode::parse(m, l.r, l.alpha, &l.targets)?;
            if !matches!(mode, Mode::Lora { nf4: false, .. }) {
                modes.push(mode);
                continue;
            }
            for &p in &self.precision {
                modes.push(mode.clone().at(p)?);
            }
        }
        Ok(modes)
    }
}

/// The process's peak resident set size in bytes (getrusage), where the platform tells it.
pub fn peak_rss() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid pointer is always a valid call.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            return Some(usage.ru_maxrss as u64 * 1024);
        }
    }
    None
}

/// A short label of the device for tables and JSON.
pub fn device_label(device: &Device) -> String {
    match device {
        Device::Cpu(_) => format!("cpu ({} threads)", tensor::cpu::threads()),
        Device::Gpu(g) => {
            let info = g.info();
            let kind = if g.is_software() { ", software" } else { "" };
            format!("gpu {} ({}{kind})", info.name, info.backend)
        }
    }
}
