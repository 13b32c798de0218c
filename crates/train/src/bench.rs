//! `train bench ...`: measured speed. Results are recorded in `docs/benchmarks.md` with the
//! machine and the date; tests never time anything.
//!
//! `bench matmul` measures C = A·B in f32 for square sizes and for the matmuls of a GPT-2 124M
//! training step at B·T = 8192 rows (768→2304 for c_attn, 768→768 for attn.c_proj, 768→3072 for
//! mlp.c_fc, 3072→768 for mlp.c_proj, 768→50257 for the tied lm_head, x·wteᵀ), on every device
//! present: each GPU adapter, the CPU backend (matrixmultiply), and the CPU's naive oracle loop.

use std::time::{Duration, Instant};

use clap::Args;
use tensor::ops::matmul::{MatmulOpts, matmul, matmul_naive_cpu};
use tensor::{Device, Tensor};

/// Options of `train bench matmul`.
#[derive(Args, Debug, Clone)]
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
                trans_b,
            });
        }
    }
    cases
}

/// A device under test: how to run one product on it.
enum Runner {
    Device(Device),
    Naive,
}

fn run_once(runner: &Runner, a: &Tensor, b: &Tensor, opts: MatmulOpts) -> crate::Result<()> {
    match runner {
        Runner::Device(d) => {
            let c = matmul(a, b, None, opts)?;
            d.sync()?;
            drop(c);
        }
        Runner::Naive => {
            matmul_naive_cpu(a, b, None, opts)?;
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
            "gpu" => match Device::gpu() {
                Ok(g) => runners.push((g.describe(), Runner::Device(g))),
                Err(e) => eprintln!("no GPU measured: {e}"),
            },
            "cpu" => runners.push((Device::cpu().describe(), Runner::Device(Device::cpu()))),
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
    for (label, runner) in &runners {
        if !args.json {
            println!("\n{label}");
            println!(
                "{:<30} {:>6} {:>6} {:>6} {:>10} {:>10}",
                "case", "M", "K", "N", "ms", "GFLOP/s"
            );
        }
        let device = match runner {
            Runner::Device(d) => d.clone(),
            Runner::Naive => Device::cpu(),
        };
        // Rate so far, to skip cases that would take longer than the budget.
        let mut rate: Option<f64> = None;
        for case in &cases {
            let flops = 2.0 * case.m as f64 * case.k as f64 * case.n as f64;
            if let Some(r) = rate {
                let estimate = flops / r;
                if estimate > args.budget {
                    report_skip(args.json, label, case, estimate);
                    continue;
                }
            }
            let a = Tensor::full(&[case.m, case.k], 0.5, &device)?;
            let b_shape = if case.trans_b {
                [case.n, case.k]
            } else {
                [case.k, case.n]
            };
            let b = Tensor::full(&b_shape, 0.25, &device)?;
            let opts = MatmulOpts {
                trans_a: false,
                trans_b: case.trans_b,
            };
            let min = Duration::from_secs_f64((args.budget / 10.0).min(1.0));
            let secs = time(|| run_once(runner, &a, &b, opts), min)?;
            let gflops = flops / secs / 1e9;
            rate = Some(rate.map_or(gflops * 1e9, |r: f64| r.min(gflops * 1e9)));
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "matmul", "device": label, "case": case.name,
                        "m": case.m, "k": case.k, "n": case.n, "ms": secs * 1e3, "gflops": gflops})
                );
            } else {
                println!(
                    "{:<30} {:>6} {:>6} {:>6} {:>10.2} {:>10.1}",
                    case.name,
                    case.m,
                    case.k,
                    case.n,
                    secs * 1e3,
                    gflops
                );
            }
        }
    }
    Ok(())
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
