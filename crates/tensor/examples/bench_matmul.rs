//! Throughput of `matmul` on GPT-2 small's shapes, on the GPU and the CPU.
//!
//! `cargo run --release -p tensor --example bench_matmul [rows] [reps]` (rows = B·T, default 1024).
//! Prints GFLOP/s (2·M·N·K per product) for the forward product and both backward products of
//! each layer shape.

use std::time::Instant;

use tensor::ops::matmul::{MatmulOpts, matmul};
use tensor::{Device, Tensor};

fn fill(shape: &[usize], device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(data, shape, device).unwrap()
}

fn sync(device: &Device) {
    if let Device::Gpu(ctx) = device {
        ctx.sync().unwrap();
    }
}

/// Seconds per product of `a`, `b` with `opts`, averaged over `reps` after one warm-up.
fn time(device: &Device, a: &Tensor, b: &Tensor, opts: MatmulOpts, reps: usize) -> f64 {
    drop(matmul(a, b, None, opts).unwrap());
    sync(device);
    let start = Instant::now();
    for _ in 0..reps {
        drop(matmul(a, b, None, opts).unwrap());
    }
    sync(device);
    start.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().unwrap())
        .collect();
    let rows = args.first().copied().unwrap_or(1024);
    let reps = args.get(1).copied().unwrap_or(10);
    let mut devices = vec![];
    if std::env::var_os("BENCH_GPU_ONLY").is_none() {
        devices.push(("cpu", Device::cpu()));
    }
    match Device::gpu() {
        Ok(g) => {
            if let Device::Gpu(ctx) = &g {
                println!("GPU: {}", ctx.info());
            }
            devices.insert(0, ("gpu", g));
        }
        Err(e) => println!("no GPU: {e}"),
    }
    let nn = MatmulOpts::default();
    let nt = MatmulOpts {
        trans_a: false,
        trans_b: true,
    };
    let tn = MatmulOpts {
        trans_a: true,
        trans_b: false,
    };
    // (name, K, N): x (rows, K) · W (K, N), as in GPT-2 small (C = 768).
    let layers = [
        ("qkv", 768, 2304),
        ("attn proj", 768, 768),
        ("fc", 768, 3072),
        ("fc proj", 3072, 768),
    ];
    for (dev_name, device) in &devices {
        for (name, k, n) in layers {
            if std::env::var("BENCH_LAYER").is_ok_and(|l| l != name) {
                continue;
            }
            let x = fill(&[rows, k], device);
            let w = fill(&[k, n], device);
            let dy = fill(&[rows, n], device);
            let flops = 2.0 * (rows * k * n) as f64;
            let fwd = time(device, &x, &w, nn, reps);
            let dx = time(device, &dy, &w, nt, reps);
            let dw = time(device, &x, &dy, tn, reps);
            println!(
                "{dev_name} {name:>9} ({rows}x{k})·({k}x{n}): forward {:7.1}  dx = dy·Wᵀ {:7.1}  dW = xᵀ·dy {:7.1} GFLOP/s",
                flops / fwd / 1e9,
                flops / dx / 1e9,
                flops / dw / 1e9
            );
        }
    }
}
