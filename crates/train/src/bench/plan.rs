//! `train bench plan`: the accounting of one training step, counted instead of timed, so it
//! runs anywhere (a software GPU, a loaded CI machine) and compares exactly before and after
//! a change.
//!
//! For a model shape, batch B×T and mode (LoRA or full), on a device: build the model with
//! random weights, take `--warmup` steps (pipelines compiled, AdamW's state allocated), then
//! count one step with [`tensor::counts`]: ops by family, GPU dispatches by kernel with the
//! workgroups, invocations and bytes they bind (and of those, the bytes the kernel may write),
//! buffer copies, uploads, command submissions, blocking host waits (where and why: the step's
//! one readback of loss, gradient norm and skip flag, which is also where the step ends), matmul FLOPs by
//! shape, the host time spent recording each dispatch, and the device memory by purpose.
//!
//! On a GPU the step is a **dry run** by default ([`tensor::GpuOptions::dry_run`]): every
//! dispatch is validated and encoded but nothing is submitted, readbacks return 1.0 without
//! waiting (clipping is applied on the device either way, so the work is that of any step), and
//! buffers are created but never written, so GPT-2 124M at 8×1024 (and medium) is counted on
//! a software adapter in seconds. The counts are those of an executed step (a test compares
//! them on a small model); `--execute` runs the kernels instead.
//!
//! Memory by purpose: frozen and trainable parameters are exact (their tensors' bytes), and so
//! is the optimizer state (AdamW's m and v); saved activations are the live bytes the forward
//! leaves for the backward (live at the backward's first allocation minus live at the
//! forward's: exact, the loss included); gradients are the peak of the gradient buffers;
//! `other` is the device's peak of live tensor bytes minus the bytes live when the step began
//! and the activations and gradients: the temporaries at the peak, approximate because the
//! gradients may peak after some activations were freed. The live bytes at the start and the
//! peak of each phase are printed as measured, and so is the held peak: live tensors plus the
//! buffers the GPU pool keeps cached for reuse, i.e. what the driver had allocated at most.

use std::collections::BTreeMap;

use clap::Parser;
use serde_json::{Value, json};
use tensor::counts::{self, Counts};
use tensor::{Device, DeviceChoice, GpuOptions};
use transformer::GptConfig;

use super::table::{Report, f, mib};
use super::{LoraArgs, Mode, token_batch, trainee};

/// Options of `train bench plan`.
#[derive(Parser, Debug, Clone)]
#[command(
    about = "Count one training step: dispatches by kernel, submissions, blocking waits, bytes \
             bound, matmul FLOPs by shape, memory by purpose (a dry run on a GPU)",
    long_about = "Count one training step instead of timing it: ops by family, GPU dispatches \
                  by kernel (workgroups, invocations, bytes bound and writable, host µs to \
                  record), copies, uploads, submissions, blocking host waits by phase and \
                  cause, matmul FLOPs by shape, and device memory by purpose. Weights are \
                  random (nothing is downloaded). On a GPU the step is a dry run: kernels are \
                  recorded and validated but never executed, readbacks return 1.0, so GPT-2 \
                  124M at 8x1024 is counted on a software adapter in seconds; --execute runs \
                  them. Pick the device with the global --device (cpu, gpu; auto: a GPU \
                  adapter if any, software included, else the CPU)."
)]
pub struct PlanArgs {
    /// Model shape: gpt2 (124M), gpt2-medium (355M), a bench shape (e2e, tiny, 124m, medium),
    /// or the path of a Hugging Face config.json.
    #[arg(long, default_value = "gpt2")]
    pub shape: String,
    /// Sequences per batch (B).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (T).
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// What the step trains: lora (the base frozen) or full.
    #[arg(long, default_value = "lora")]
    pub mode: String,
    /// The frozen base's precision with --mode lora: f32, or f16 (its Linear weights stored in
    /// f16, products summed in f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: crate::quantize::Precision,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// Uncounted steps first (the first compiles pipelines and allocates AdamW's state).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// On a GPU, execute the kernels instead of a dry run.
    #[arg(long)]
    pub execute: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// The configuration of `name`: GPT-2's names, a bench shape, or a config.json path.
pub fn plan_shape(name: &str) -> crate::Result<GptConfig> {
    match name {
        "gpt2" => return super::shape("124m"),
        "gpt2-medium" => return super::shape("medium"),
        _ => {}
    }
    super::shape(name)
}

/// The device of a plan: the CPU, or a dry-run (or, with `execute`, ordinary) GPU context on
/// any adapter, software ones included. `Auto` without any adapter falls back to the CPU.
fn plan_device(choice: DeviceChoice, execute: bool) -> crate::Result<Device> {
    if choice == DeviceChoice::Cpu {
        return Ok(Device::cpu());
    }
    let gpu = Device::gpu_with(&GpuOptions {
        allow_software: true,
        dry_run: !execute,
        ..Default::default()
    });
    match (gpu, choice) {
        (Ok(d), _) => Ok(d),
        (Err(e), DeviceChoice::Auto) => {
            eprintln!("note: no GPU adapter ({e}); counting on the CPU backend");
            Ok(Device::cpu())
        }
        (Err(e), _) => Err(e.into()),
    }
}

/// Memory by purpose (see the module doc for what is approximate), in bytes.
struct Memory {
    frozen: u64,
    trainable: u64,
    optimizer: u64,
    activations: u64,
    gradients: u64,
    /// Live bytes when the step's forward began (parameters, optimizer state, leftovers).
    baseline: u64,
    device_peak: u64,
    /// Live tensors plus the pool's cached buffers, at most, during the counted step.
    held_peak: u64,
    pooled: u64,
}

impl Memory {
    fn other(&self) -> u64 {
        self.device_peak
            .saturating_sub(self.baseline + self.activations + self.gradients)
    }

    fn to_json(&self) -> Value {
        json!({"frozen_parameters": self.frozen, "trainable_parameters": self.trainable,
            "optimizer_state": self.optimizer, "saved_activations": self.activations,
            "gradients": self.gradients, "other": self.other(), "live_at_step_start": self.baseline,
            "device_peak": self.device_peak, "held_peak": self.held_peak,
            "pool_cached": self.pooled})
    }
}

/// `train bench plan`.
pub fn run(args: &PlanArgs, choice: DeviceChoice) -> crate::Result<()> {
    let cfg = plan_shape(&args.shape)?;
    let (b, t) = (args.batch, args.seq);
    if b == 0 || t == 0 {
        return Err(format!("--batch and --seq must be positive, got {b} and {t}").into());
    }
    if t > cfg.n_positions {
        return Err(format!(
            "--seq {t} exceeds the context of {} of shape `{}`",
            cfg.n_positions, args.shape
        )
        .into());
    }
    let l = &args.lora;
    let mode = Mode::parse(&args.mode, l.r, l.alpha, &l.targets)?.at(args.precision)?;
    let device = plan_device(choice, args.execute)?;
    let dry_run = matches!(&device, Device::Gpu(g) if g.is_dry_run());
    let mut tr = trainee(&cfg, &mode, &device, 1)?;
    let batch = token_batch(b, t, cfg.vocab_size, 7);
    for _ in 0..args.warmup {
        tr.step(&batch)?;
    }
    device.reset_peak_memory();
    counts::start();
    let start = std::time::Instant::now();
    let stepped = tr.step(&batch);
    let wall = start.elapsed().as_secs_f64();
    let c = counts::stop();
    let stats = stepped?;
    let trainable = tr.trainable as u64 * 4;
    let dm = device.memory();
    let phase = |name: &str| c.memory.iter().find(|m| m.phase == name);
    let (forward, backward) = (phase("forward"), phase("backward"));
    let baseline = forward.map_or(0, |m| m.live_at_start);
    let memory = Memory {
        frozen: tr.parameter_bytes.saturating_sub(trainable),
        trainable,
        optimizer: tr.opt.memory().peak,
        activations: backward.map_or(0, |m| m.live_at_start.saturating_sub(baseline)),
        gradients: stats.grad_bytes,
        baseline,
        device_peak: dm.peak,
        held_peak: c.held_peak,
        pooled: dm.pooled,
    };
    let mode_name = match &mode {
        Mode::Lora { r, targets, .. } => {
            let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
            format!("lora r={r} {}", names.join(","))
        }
        Mode::Full => "full".into(),
    };
    let head = json!({"bench": "plan", "device": super::device_label(&device),
        "dry_run": dry_run, "shape": args.shape, "mode": mode.name(), "mode_detail": mode_name,
        "b": b, "t": t, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
        "vocab_size": cfg.vocab_size, "trainable_params": tr.trainable,
        "tape_saved_peak": stats.saved_peak});
    let plan = Plan {
        c: &c,
        wall,
        memory: &memory,
    };
    if args.json {
        let mut v = head;
        for (k, x) in plan.to_json().as_object().expect("an object") {
            v[k] = x.clone();
        }
        println!("{v}");
    } else {
        println!(
            "\nstep accounting: {} ({} layers, {} wide, vocabulary {}) {mode_name} {b}x{t} on \
             {}{}",
            args.shape,
            cfg.n_layer,
            cfg.n_embd,
            cfg.vocab_size,
            super::device_label(&device),
            if dry_run { ", dry run" } else { "" }
        );
        plan.print();
    }
    Ok(())
}

/// One counted step and what goes with it.
struct Plan<'a> {
    c: &'a Counts,
    wall: f64,
    memory: &'a Memory,
}

/// Dispatch rows summed over contexts, by kernel, most calls first.
fn by_kernel(c: &Counts) -> Vec<tensor::counts::DispatchCount> {
    let mut m: BTreeMap<&str, tensor::counts::DispatchCount> = BTreeMap::new();
    for d in &c.dispatches {
        let e = m
            .entry(&d.kernel)
            .or_insert_with(|| tensor::counts::DispatchCount {
                kernel: d.kernel.clone(),
                ..Default::default()
            });
        e.calls += d.calls;
        e.workgroups += d.workgroups;
        e.invocations += d.invocations;
        e.bytes_bound += d.bytes_bound;
        e.bytes_writable += d.bytes_writable;
        e.host_ns += d.host_ns;
    }
    let mut v: Vec<_> = m.into_values().collect();
    v.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.kernel.cmp(&b.kernel)));
    v
}

/// `(phase, scope) → (dispatches, bytes bound)` and `family → op calls`.
fn by_scope(c: &Counts) -> BTreeMap<(&'static str, &'static str), (u64, u64, u64)> {
    let mut m: BTreeMap<_, (u64, u64, u64)> = BTreeMap::new();
    for o in &c.ops {
        m.entry((o.at.phase, o.at.scope)).or_default().0 += o.calls;
    }
    for d in &c.dispatches {
        let e = m.entry((d.at.phase, d.at.scope)).or_default();
        e.1 += d.calls;
        e.2 += d.bytes_bound;
    }
    m
}

/// MiB with three decimals (the tiny shapes' tensors are kilobytes).
fn mib3(bytes: u64) -> String {
    f(bytes as f64 / (1u64 << 20) as f64, 3)
}

fn gb(bytes: u64) -> String {
    f(bytes as f64 / 1e9, 3)
}

impl Plan<'_> {
    fn totals(&self) -> Value {
        let c = self.c;
        let (copies, copy_bytes) = c.transfer("copy");
        let (uploads, upload_bytes) = c.transfer("upload");
        let dispatches = c.dispatch_calls();
        let per = |ns: f64, n: u64| if n == 0 { 0.0 } else { ns / n as f64 / 1e3 };
        json!({"ops": c.op_calls(), "dispatches": dispatches, "copies": copies,
            "copy_bytes": copy_bytes, "uploads": uploads, "upload_bytes": upload_bytes,
            "submissions": c.submissions, "blocking_waits": c.wait_calls(),
            "bytes_bound": c.bytes_bound(), "bytes_writable": c.bytes_writable(),
            "matmul_flops": c.matmul_flops(),
            "host_us_per_dispatch_recording": per(c.dispatch_host_ns() as f64, dispatches),
            "step_wall_ms": self.wall * 1e3,
            "step_wall_us_per_dispatch": per(self.wall * 1e9, dispatches.max(c.op_calls()))})
    }

    fn to_json(&self) -> Value {
        let c = self.c;
        let at = |a: &tensor::counts::Context| json!({"phase": a.phase, "scope": a.scope});
        let kernels: Vec<Value> = by_kernel(c)
            .iter()
            .map(|d| {
                json!({"kernel": d.kernel, "calls": d.calls, "workgroups": d.workgroups,
                "invocations": d.invocations, "bytes_bound": d.bytes_bound,
                "bytes_writable": d.bytes_writable, "host_ns": d.host_ns})
            })
            .collect();
        let dispatches: Vec<Value> = c
            .dispatches
            .iter()
            .map(|d| {
                json!({"at": at(&d.at), "kernel": d.kernel, "calls": d.calls,
                "workgroups": d.workgroups, "invocations": d.invocations,
                "bytes_bound": d.bytes_bound, "bytes_writable": d.bytes_writable,
                "host_ns": d.host_ns})
            })
            .collect();
        let ops: Vec<Value> = c
            .ops
            .iter()
            .map(|o| json!({"at": at(&o.at), "family": o.family, "calls": o.calls}))
            .collect();
        let rows = |v: &[tensor::counts::TransferCount]| -> Vec<Value> {
            v.iter()
                .map(|w| json!({"at": at(&w.at), "what": w.what, "calls": w.calls, "bytes": w.bytes}))
                .collect()
        };
        let matmuls: Vec<Value> = c
            .matmuls
            .iter()
            .map(|m| {
                json!({"at": at(&m.at), "batch": m.batch, "m": m.m, "n": m.n, "k": m.k,
                "trans_a": m.trans_a, "trans_b": m.trans_b, "calls": m.calls, "flops": m.flops})
            })
            .collect();
        json!({"totals": self.totals(), "kernels": kernels, "dispatches": dispatches,
            "ops": ops, "transfers": rows(&c.transfers), "waits": rows(&c.waits),
            "matmuls": matmuls, "memory": self.memory.to_json(),
            "memory_by_phase": c.memory.iter().map(|m| json!({"phase": m.phase,
                "live_at_start": m.live_at_start, "peak": m.peak})).collect::<Vec<_>>()})
    }

    fn print(&self) {
        let c = self.c;
        let t = self.totals();
        println!(
            "  {} ops, {} dispatches, {} copies ({} MiB), {} uploads ({} MiB), {} submissions, \
             {} blocking waits",
            t["ops"],
            t["dispatches"],
            t["copies"],
            mib(t["copy_bytes"].as_u64().unwrap_or(0)),
            t["uploads"],
            mib(t["upload_bytes"].as_u64().unwrap_or(0)),
            t["submissions"],
            t["blocking_waits"]
        );
        let flops = f(c.matmul_flops() as f64 / 1e9, 3);
        let per = f(t["step_wall_us_per_dispatch"].as_f64().unwrap_or(0.0), 1);
        let wall = f(self.wall * 1e3, 1);
        if c.dispatches.is_empty() {
            println!("  matmul {flops} GFLOP, step {wall} ms wall ({per} µs per op)");
        } else {
            let host = t["host_us_per_dispatch_recording"].as_f64().unwrap_or(0.0);
            println!(
                "  bound {} GB (writable {} GB), matmul {flops} GFLOP, host {} µs per dispatch \
                 to record, step {wall} ms wall ({per} µs per dispatch)",
                gb(c.bytes_bound()),
                gb(c.bytes_writable()),
                f(host, 1),
            );
        }
        if !c.dispatches.is_empty() {
            let r = Report::new(
                false,
                "dispatches by kernel",
                &[
                    ("kernel", 42),
                    ("calls", 6),
                    ("workgroups", 11),
                    ("invocations", 13),
                    ("bound GB", 9),
                    ("writable GB", 11),
                    ("host µs", 8),
                ],
            );
            for d in by_kernel(c) {
                r.row(
                    Value::Null,
                    &[
                        d.kernel.clone(),
                        d.calls.to_string(),
                        d.workgroups.to_string(),
                        d.invocations.to_string(),
                        gb(d.bytes_bound),
                        gb(d.bytes_writable),
                        f(d.host_ns as f64 / 1e3 / d.calls.max(1) as f64, 1),
                    ],
                );
            }
        }
        let r = Report::new(
            false,
            "by phase and scope (outermost profiler family)",
            &[
                ("phase", 10),
                ("scope", 12),
                ("ops", 6),
                ("dispatches", 10),
                ("bound GB", 9),
            ],
        );
        for ((phase, scope), (ops, n, bytes)) in by_scope(c) {
            r.row(
                Value::Null,
                &[
                    phase.into(),
                    scope.into(),
                    ops.to_string(),
                    n.to_string(),
                    gb(bytes),
                ],
            );
        }
        let r = Report::new(
            false,
            "ops by family (innermost scope)",
            &[("family", 12), ("calls", 6)],
        );
        let mut fam: BTreeMap<&str, u64> = BTreeMap::new();
        for o in &c.ops {
            *fam.entry(o.family).or_default() += o.calls;
        }
        for (family, calls) in fam {
            r.row(Value::Null, &[family.into(), calls.to_string()]);
        }
        let r = Report::new(
            false,
            "blocking host waits and transfers",
            &[
                ("what", 9),
                ("phase", 10),
                ("scope", 12),
                ("calls", 6),
                ("MiB", 9),
            ],
        );
        for w in c.waits.iter().chain(&c.transfers) {
            r.row(
                Value::Null,
                &[
                    w.what.into(),
                    w.at.phase.into(),
                    w.at.scope.into(),
                    w.calls.to_string(),
                    mib(w.bytes),
                ],
            );
        }
        let r = Report::new(
            false,
            "matmuls by shape (batch × M×K · K×N; t = transposed operand), most FLOPs first",
            &[
                ("phase", 10),
                ("scope", 10),
                ("batch", 6),
                ("M", 6),
                ("N", 6),
                ("K", 6),
                ("t", 3),
                ("calls", 6),
                ("GFLOP", 9),
            ],
        );
        let mut mm: Vec<_> = c.matmuls.iter().collect();
        mm.sort_by_key(|m| std::cmp::Reverse(m.flops));
        for m in mm {
            let tr = match (m.trans_a, m.trans_b) {
                (false, false) => "-",
                (true, false) => "a",
                (false, true) => "b",
                (true, true) => "ab",
            };
            r.row(
                Value::Null,
                &[
                    m.at.phase.into(),
                    m.at.scope.into(),
                    m.batch.to_string(),
                    m.m.to_string(),
                    m.n.to_string(),
                    m.k.to_string(),
                    tr.into(),
                    m.calls.to_string(),
                    f(m.flops as f64 / 1e9, 3),
                ],
            );
        }
        let r = Report::new(
            false,
            "device memory by phase (live tensor bytes)",
            &[("phase", 10), ("MiB at start", 12), ("peak MiB", 10)],
        );
        for p in &c.memory {
            r.row(
                Value::Null,
                &[p.phase.into(), mib3(p.live_at_start), mib3(p.peak)],
            );
        }
        let m = self.memory;
        let r = Report::new(
            false,
            "device memory by purpose (`other`: the peak's temporaries, approximate)",
            &[("purpose", 22), ("MiB", 10)],
        );
        for (name, bytes) in [
            ("frozen parameters", m.frozen),
            ("trainable parameters", m.trainable),
            ("optimizer state", m.optimizer),
            ("live at step start", m.baseline),
            ("saved activations", m.activations),
            ("gradients", m.gradients),
            ("other (temporaries)", m.other()),
            ("device peak", m.device_peak),
            ("held peak (+ pool)", m.held_peak),
            ("pool cached at end", m.pooled),
        ] {
            r.row(Value::Null, &[name.into(), mib3(bytes)]);
        }
    }
}
