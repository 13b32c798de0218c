//! `train bench matmul` measures C = A·B in f32 for square sizes and for the matmuls of a GPT-2 124M
//! training step at B·T = 8192 rows (768→2304 for c_attn, 768→768 for attn.c_proj, 768→3072 for
//! mlp.c_fc, 3072→768 for mlp.c_proj, 768→50257 for the tied lm_head, x·wteᵀ, and LoRA's
//! r = 8 weight gradient dA = dpᵀ·x, 8×768 with K = B·T), on every device
//! present: the GPU once per matrix-product kernel (`tile64`, `tile128`, `splitk`; only the one
//! `--matmul-kernel` names when it names one), the CPU backend (`tensor::sgemm`: gemm or matrixmultiply, `--cpu-gemm`),
//! and the CPU's naive oracle loop.
//!
//! **Fraction of peak.** Each case also reports its share of the device's *measured* peak: the
//! best GFLOP/s of any case of this run on that device (usually the largest square size that
//! fit the budget). It is not the hardware's datasheet peak, which f32 matmul in WGSL or in
//! the CPU libraries does not reach; it says how far a shape (a thin lm_head, a small square) falls
//! short of what this implementation can do on this device. Rows of a device are printed once
//! all its cases have run, since the peak is known only then.

use std::time::{Duration, Instant};

use clap::Parser;
use tensor::ops::matmul::{GpuMatmul, MatmulOpts, gpu_matmul, matmul, set_gpu_matmul};
use tensor::reference::matmul_tensors;
use tensor::{Device, Tensor};

/// Options of `train bench matmul`.
#[derive(Parser, Debug, Clone)]
pub struct MatmulArgs {
    /// Square sizes to measure (M = N = K).
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048,4096")]
    pub sizes: Vec<usize>,
    /// Rows (B·T) of the GPT-2 124M training shapes; 0 skips them.
    #[arg(long, default_value_t = 8192)]
    pub rows: usize,
    /// Devices: any of gpu, cpu, naive (the CPU's plain-loop oracle).
    #[arg(long, value_delimiter = ',', default_value = "gpu,cpu,naive")]
    pub devices: Vec<String>,
    /// Skip a case whose estimated time (from the device's rate so far) exceeds this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub budget: f64,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured (or skipped) case.
struct Case {
    name: String,
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
}

fn cases(args: &MatmulArgs) -> Vec<Case> {
    let mut cases: Vec<Case> = args
        .sizes
        .iter()
        .map(|&s| Case {
            name: format!("square {s}"),
            m: s,
            k: s,
            n: s,
            trans_a: false,
            trans_b: false,
        })
        .collect();
    if args.rows > 0 {
        for (name, k, n, trans_b) in [
            ("c_attn 768→2304", 768, 2304, false),
            ("attn.c_proj 768→768", 768, 768, false),
            ("mlp.c_fc 768→3072", 768, 3072, false),
            ("mlp.c_proj 3072→768", 3072, 768, false),
            ("lm_head 768→50257 (x·wteᵀ)", 768, 50257, true),
        ] {
            cases.push(Case {
                name: name.into(),
                m: args.rows,
                k,
                n,
                trans_a: false,
                trans_b,
            });
        }
        // LoRA's dA = dpᵀ·x: a thin output, K = B·T (the split-K path's case).
        cases.push(Case {
            name: "lora dA r=8 (dpᵀ·x)".into(),
            m: 8,
            k: args.rows,
            n: 768,
            trans_a: true,
            trans_b: false,
        });
    }
    cases
}

/// A device under test: how to run one product on it (on a GPU, with which kernel).
enum Runner {
    Device(Device, Option<GpuMatmul>),
    Naive,
}

fn run_once(runner: &Runner, a: &Tensor, b: &Tensor, opts: MatmulOpts) -> crate::Result<()> {
    match runner {
        Runner::Device(d, _) => {
            let c = matmul(a, b, None, opts)?;
            d.sync()?;
            drop(c);
        }
        Runner::Naive => {
            matmul_tensors(a, b, None, opts)?;
        }
    }
    Ok(())
}

/// Time `run` until at least `min` has passed (and at least once after a warm-up); seconds per run.
fn time(mut run: impl FnMut() -> crate::Result<()>, min: Duration) -> crate::Result<f64> {
    run()?;
    let start = Instant::now();
    let mut n = 0u32;
    while n == 0 || start.elapsed() < min {
        run()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() / n as f64)
}

/// `train bench matmul`.
pub fn bench_matmul(args: &MatmulArgs) -> crate::Result<()> {
    let mut runners: Vec<(String, Runner)> = Vec::new();
    for d in &args.devices {
        match d.as_str() {
            // Each kernel variant, unless `--matmul-kernel` forced one.
            "gpu" => match Device::gpu() {
                Ok(g) => {
                    let kernels = match gpu_matmul() {
                        GpuMatmul::Auto => {
                            let mut all =
                                vec![GpuMatmul::Tile64, GpuMatmul::Tile128, GpuMatmul::SplitK];
                            // The cooperative-matrix kernel where the adapter runs f32 products
                            // on it (`train devices` says).
                            if let Device::Gpu(ctx) = &g
                                && ctx.coop().config_for(false).is_some()
                            {
                                all.push(GpuMatmul::Coop);
                            }
                            all
                        }
                        forced => vec![forced],
                    };
                    for k in kernels {
                        let label = format!("{}, kernel {}", g.describe(), k.name());
                        runners.push((label, Runner::Device(g.clone(), Some(k))));
                    }
                }
                Err(e) => eprintln!("no GPU measured: {e}"),
            },
            "cpu" => runners.push((
                Device::cpu().describe(),
                Runner::Device(Device::cpu(), None),
            )),
            "naive" => runners.push((
                "CPU naive loop (test oracle, 1 thread)".into(),
                Runner::Naive,
            )),
            other => {
                return Err(format!("unknown device `{other}`: expected gpu, cpu or naive").into());
            }
        }
    }
    let cases = cases(args);
    let chosen = gpu_matmul();
    for (label, runner) in &runners {
        if let Runner::Device(_, Some(kernel)) = runner {
            set_gpu_matmul(*kernel);
        }
        // (case, seconds) or (case, estimated seconds of a skipped case).
        let mut rows: Vec<(&Case, Result<f64, f64>)> = Vec::new();
        let device = match runner {
            Runner::Device(d, _) => d.clone(),
            Runner::Naive => Device::cpu(),
        };
        // Rate so far, to skip cases that would take longer than the budget.
        let mut rate: Option<f64> = None;
        for case in &cases {
            let flops = flops(case);
            if let Some(r) = rate {
                let estimate = flops / r;
                if estimate > args.budget {
                    rows.push((case, Err(estimate)));
                    continue;
                }
            }
            let a_shape = if case.trans_a {
                [case.k, case.m]
            } else {
                [case.m, case.k]
            };
            let a = Tensor::full(&a_shape, 0.5, &device)?;
            let b_shape = if case.trans_b {
                [case.n, case.k]
            } else {
                [case.k, case.n]
            };
            let b = Tensor::full(&b_shape, 0.25, &device)?;
            let opts = MatmulOpts {
                trans_a: case.trans_a,
                trans_b: case.trans_b,
            };
            let min = Duration::from_secs_f64((args.budget / 10.0).min(1.0));
            let secs = time(|| run_once(runner, &a, &b, opts), min)?;
            let gflops = flops / secs / 1e9;
            rate = Some(rate.map_or(gflops * 1e9, |r: f64| r.min(gflops * 1e9)));
            rows.push((case, Ok(secs)));
        }
        print_device(args.json, label, &rows);
    }
    set_gpu_matmul(chosen);
    Ok(())
}

fn flops(case: &Case) -> f64 {
    2.0 * case.m as f64 * case.k as f64 * case.n as f64
}

/// Print a device's rows with each case's fraction of the best GFLOP/s measured on it.
fn print_device(json: bool, label: &str, rows: &[(&Case, Result<f64, f64>)]) {
    let peak = rows
        .iter()
        .filter_map(|(c, r)| r.as_ref().ok().map(|s| flops(c) / s / 1e9))
        .fold(0.0f64, f64::max);
    if !json {
        println!("\n{label}");
        println!("measured peak: {peak:.1} GFLOP/s (best case of this run)");
        println!(
            "{:<30} {:>6} {:>6} {:>6} {:>10} {:>10} {:>7}",
            "case", "M", "K", "N", "ms", "GFLOP/s", "of peak"
        );
    }
    for (case, result) in rows {
        let secs = match result {
            Ok(s) => *s,
            Err(estimate) => {
                report_skip(json, label, case, *estimate);
                continue;
            }
        };
        let gflops = flops(case) / secs / 1e9;
        let fraction = if peak > 0.0 { gflops / peak } else { 0.0 };
        if json {
            println!(
                "{}",
                serde_json::json!({"bench": "matmul", "device": label, "case": case.name,
                    "m": case.m, "k": case.k, "n": case.n, "ms": secs * 1e3, "gflops": gflops,
                    "peak_gflops": peak, "fraction_of_peak": fraction})
            );
        } else {
            println!(
                "{:<30} {:>6} {:>6} {:>6} {:>10.2} {:>10.1} {:>6.0}%",
                case.name,
                case.m,
                case.k,
                case.n,
                secs * 1e3,
                gflops,
                100.0 * fraction
            );
        }
    }
}

fn report_skip(json: bool, label: &str, case: &Case, estimate: f64) {
    if json {
        println!(
            "{}",
            serde_json::json!({"bench": "matmul", "device": label, "case": case.name,
                "m": case.m, "k": case.k, "n": case.n, "skipped": true, "estimated_s": estimate})
        );
    } else {
        println!(
            "{:<30} {:>6} {:>6} {:>6}   skipped: about {estimate:.0} s at this device's rate (--budget)",
            case.name, case.m, case.k, case.n
        );
    }
}
