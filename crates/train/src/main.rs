//! `train`: the command-line program. This file only parses arguments; the work is in the
//! library (`crates/train/src/lib.rs`), so tests run the same code.

use clap::{Parser, Subcommand};
use tensor::DeviceChoice;

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "LoRA fine-tuning of GPT-2 style models, from the GPU matmul up",
    long_about = "LoRA fine-tuning of GPT-2 style models on our own WGSL tensor engine \
                  (wgpu: Vulkan, Metal, DX12) with a CPU fallback."
)]
struct Cli {
    /// The default run's options (used when no subcommand is given).
    #[command(flatten)]
    run: train::main_job::RunArgs,
    /// Where to run: auto (a hardware GPU if present, else the CPU), cpu, or gpu (any adapter,
    /// software ones included).
    #[arg(long, global = true, default_value = "auto", value_parser = parse_device)]
    device: DeviceChoice,
    /// The CPU backend's matrix product: auto (the gemm crate where the CPU has AVX-512, the
    /// matrixmultiply crate elsewhere, as measured in docs/benchmarks.md), gemm, or
    /// matrixmultiply.
    #[arg(long, global = true, default_value = "auto", env = "TENSOR_CPU_GEMM", value_parser = tensor::sgemm::CpuGemm::parse)]
    cpu_gemm: tensor::sgemm::CpuGemm,
    /// The GPU's matrix-product kernel: auto (on a hardware GPU, the kernel measured fastest for
    /// each class of shapes, once, remembered in ~/.cache/lora-gpu/matmul-tune.tsv; on a software
    /// adapter the 128×128-tile kernel where a product's operands are whole vec4s and its output
    /// holds a tile, the 64×64 one elsewhere), tune (measure on any adapter), tile64 (always the
    /// first kernel), tile128 (wherever it fits), splitk, or coop (cooperative matrices, the GPU's
    /// matrix units, for the products the adapter has a configuration for, the default rule for
    /// the others: `train devices` lists them; an error on an adapter with none).
    #[arg(long, global = true, default_value = "auto", value_parser = tensor::ops::matmul::GpuMatmul::parse)]
    matmul_kernel: tensor::ops::matmul::GpuMatmul,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices: every GPU adapter wgpu sees, the CPU backend, and which one `auto` picks.
    Devices,
    /// Train a small GPT-2 from scratch (how the shipped base model was made).
    Pretrain(train::pretrain::PretrainArgs),
    /// Fine-tune a model on a data file (text, JSONL with context/completion, or E2E
    /// `context||completion` lines): LoRA or full, with gradient accumulation; resumable exactly.
    Finetune(train::finetune_cmd::FinetuneArgs),
    /// Fold a LoRA adapter into its base and write a merged checkpoint (Hugging Face layout).
    Merge(train::merge::MergeArgs),
    /// Store a model's Linear weights in 4-bit NF4 (QLoRA's base, bitsandbytes' layout): a
    /// model directory that this program and transformers load quantized.
    Quantize(train::quantize::QuantizeCmdArgs),
    /// Combine LoRA adapters into one, as PEFT's add_weighted_adapter (linear, cat, svd, ties).
    Combine(train::combine::CombineArgs),
    /// The paper's section-7 analysis of one or two adapters: singular values of each learned
    /// update, and the subspace similarity between two adapters (tables, JSON, SVG heat map).
    Analyze(train::analyze::AnalyzeArgs),
    /// Score a text file: mean next-token cross-entropy and perplexity.
    Eval(train::eval::EvalArgs),
    /// Continue prompts with a model: greedy, temperature, top-k, top-p, or beam search.
    Generate(train::generate::GenerateArgs),
    /// Serve a base model and its LoRA adapters over HTTP (OpenAI-compatible completions,
    /// continuous batching of sequences with different adapters; see docs/serve.md).
    Serve(train::serve::ServeArgs),
    /// Benchmarks (see docs/benchmarks.md for recorded results).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Matmul GFLOP/s for square sizes and GPT-2 124M's training shapes, on every device present.
    Matmul(train::bench::MatmulArgs),
    /// One training step, LoRA and full: ms/step, tokens/s, memory by purpose.
    Step(train::bench::StepArgs),
    /// Time of a training step by op family and phase (profiler).
    Ops(train::bench::OpsArgs),
    /// Count one training step: dispatches by kernel, submissions, blocking waits, bytes bound,
    /// matmul FLOPs by shape, memory by purpose (a dry run on a GPU: runs anywhere, in seconds).
    Plan(train::bench::PlanArgs),
    /// Inference with the KV cache: base, unmerged, merged and mixed-adapter batches.
    Infer(train::bench::InferArgs),
    /// Step time and memory against B, T and model size.
    Scaling(train::bench::ScalingArgs),
    /// A load generator against `train serve`: many adapters mixed against the base model, one
    /// merged adapter, and switching adapters by merging.
    Serve(train::bench::ServeBenchArgs),
    /// Every bench with its defaults for the chosen device.
    All(train::bench::AllArgs),
}

fn main() {
    keep_freed_memory();
    give_mesa_a_runtime_dir();
    let cli = Cli::parse();
    tensor::ops::matmul::set_gpu_matmul(cli.matmul_kernel);
    let result = tensor::sgemm::set_cpu_gemm(cli.cpu_gemm)
        .map_err(train::Error::from)
        .and_then(|()| match cli.command {
            None => device(cli.device).and_then(|d| train::main_job::run(&cli.run, &d)),
            Some(c) => subcommand(c, cli.device),
        });
    if let Err(e) = result {
        // A run stopped by Ctrl-C/SIGTERM saved its checkpoint: not a failure, but a distinct
        // status, as shells give a process a signal ended.
        if e.is::<train::finetune_cmd::interrupt::Interrupted>() {
            eprintln!("{e}");
            std::process::exit(train::finetune_cmd::interrupt::EXIT_CODE);
        }
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn subcommand(command: Command, choice: DeviceChoice) -> train::Result<()> {
    let cli_device = choice;
    match command {
        Command::Devices => train::devices::print_devices(),
        Command::Generate(args) => device(cli_device).and_then(|d| train::generate::run(&args, &d)),
        Command::Serve(args) => device(cli_device).and_then(|d| train::serve::run(&args, &d)),
        Command::Pretrain(args) => device(cli_device).and_then(|d| train::pretrain::run(&args, &d)),
        Command::Finetune(args) => {
            device(cli_device).and_then(|d| train::finetune_cmd::run(&args, &d))
        }
        Command::Merge(args) => device(cli_device).and_then(|d| train::merge::run(&args, &d)),
        Command::Quantize(args) => train::quantize::run(&args),
        Command::Combine(args) => device(cli_device).and_then(|d| train::combine::run(&args, &d)),
        Command::Analyze(args) => device(cli_device).and_then(|d| train::analyze::run(&args, &d)),
        Command::Eval(args) => device(cli_device).and_then(|d| train::eval::run(&args, &d)),
        Command::Bench { what } => match what {
            BenchCommand::Matmul(args) => train::bench::bench_matmul(&args),
            BenchCommand::Step(args) => {
                device(cli_device).and_then(|d| train::bench::step::run(&args, &d))
            }
            BenchCommand::Ops(args) => {
                device(cli_device).and_then(|d| train::bench::ops::run(&args, &d))
            }
            BenchCommand::Plan(args) => train::bench::plan::run(&args, cli_device),
            BenchCommand::Infer(args) => {
                device(cli_device).and_then(|d| train::bench::infer::run(&args, &d))
            }
            BenchCommand::Serve(args) => {
                device(cli_device).and_then(|d| train::bench::serve::run(&args, &d))
            }
            BenchCommand::Scaling(args) => {
                device(cli_device).and_then(|d| train::bench::scaling::run(&args, &d))
            }
            BenchCommand::All(args) => {
                device(cli_device).and_then(|d| train::bench::run_all(&args, &d))
            }
        },
    }
}

/// Open the chosen device and say which it is.
fn device(choice: DeviceChoice) -> train::Result<tensor::Device> {
    train::devices::open(choice)
}

/// Parse `--device auto|cpu|gpu`.
fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse().map_err(|e: tensor::Error| e.to_string())
}

/// Set `XDG_RUNTIME_DIR` to a private directory when the environment has no usable one, so
/// that Mesa's Vulkan device-select layer does not print `error: XDG_RUNTIME_DIR is invalid or
/// not set` before our output (see `train::runtime_dir`). It must happen here, first: the
/// variable is read when wgpu creates its first instance, and changing the environment is only
/// sound while no other thread exists.
fn give_mesa_a_runtime_dir() {
    if let Some(dir) = train::runtime_dir::missing() {
        // SAFETY: called at the start of `main`, before any thread is started (no thread can
        // be reading the environment while it changes).
        unsafe { std::env::set_var(train::runtime_dir::VAR, dir) };
    }
}

/// Ask glibc's allocator to serve every allocation from its heap and to keep freed memory
/// there. A training step frees and re-allocates the same large buffers (logits alone are tens
/// of MB); by default each of those is a fresh `mmap`, whose pages the kernel must fault in and
/// zero on every step. Measured on the default run: about a quarter of the CPU time went there.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is called before any thread
    // is started, and glibc documents both parameters as safe to change at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
