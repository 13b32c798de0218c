//! Helpers for tests of this crate and the crates above it (feature `testing`): the GPU device
//! of the tests, [`on_devices!`](crate::on_devices) to run one test body on every device, random
//! tensors, shape strategies and a comparison that reports the worst elements. The f64 oracles
//! the tests compare with are in [`reference`](crate::reference).
//!
//! GPU tests call [`gpu`]. When wgpu finds no adapter it returns `None` and the test passes
//! after printing "skipped"; but when the environment variable `CI` is set it panics instead, so
//! CI can never pass without running the GPU path.

/// Runs a test body `fn(&Device)` on the CPU (test `$cpu`) and on the GPU of [`gpu`] (test
/// `$gpu`, skipped outside CI when wgpu finds no adapter).
///
/// ```text
/// fn adds(device: &tensor::Device) { /* … */ }
/// tensor::on_devices!(adds, adds_cpu, adds_gpu);
/// ```
#[macro_export]
macro_rules! on_devices {
    ($body:ident, $cpu:ident, $gpu:ident) => {
        #[test]
        fn $cpu() {
            $body(&$crate::Device::cpu());
        }

        #[test]
        fn $gpu() {
            if let Some(g) = $crate::testing::gpu() {
                $body(&g);
            }
        }
    };
}

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::gpu::GpuOptions;
use crate::{Device, Tensor};

/// The shared GPU device for tests, with outputs poisoned with NaN; `None` (a skip) only
/// outside CI.
pub fn gpu() -> Option<Device> {
    match Device::gpu() {
        Ok(device) => {
            if let Device::Gpu(ctx) = &device {
                ctx.set_poison_outputs(true);
            }
            Some(device)
        }
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI is set and no GPU adapter is usable, so the GPU tests cannot run: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no GPU adapter ({e})");
            None
        }
    }
}

/// A fresh GPU device whose storage bindings are limited to `bytes`, to test how ops split
/// tensors larger than one binding. Call only after [`gpu`] returned a device.
pub fn gpu_with_binding_limit(bytes: u64) -> Device {
    let device = Device::gpu_with(&GpuOptions {
        allow_software: true,
        max_binding_bytes: Some(bytes),
        ..Default::default()
    })
    .expect("a GPU adapter was found a moment ago");
    if let Device::Gpu(ctx) = &device {
        ctx.set_poison_outputs(true);
    }
    device
}

/// Values uniform in [-1, 1), reproducible from `seed`.
pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A random tensor on `device`.
pub fn random(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    Tensor::from_vec(random_vec(shape.iter().product(), seed), shape, device).unwrap()
}

/// Sizes that break tiled kernels: 1, primes, one past a power of two, and a random range.
pub fn sizes() -> impl proptest::strategy::Strategy<Value = usize> {
    use proptest::prelude::*;
    prop_oneof![
        Just(1usize),
        Just(7),
        Just(17),
        Just(63),
        Just(129),
        Just(257),
        2usize..200
    ]
}

/// Assert `|got - want| <= atol + rtol·|want|` elementwise (NaN never passes), reporting the
/// five worst elements and the largest difference.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes differ");
    assert_close_slices(
        what,
        &got.to_vec().unwrap(),
        &want.to_vec().unwrap(),
        atol,
        rtol,
    );
}

/// [`assert_close`] over slices.
pub fn assert_close_slices(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut bad: Vec<(usize, f32, f32, f32)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter_map(|(i, (&g, &w))| {
            let diff = (g - w).abs();
            let ok = diff <= atol + rtol * w.abs() || (g == w);
            (!ok || g.is_nan() != w.is_nan()).then_some((i, g, w, diff))
        })
        .collect();
    if !bad.is_empty() {
        let max = bad.iter().map(|b| b.3).fold(0.0f32, f32::max);
        bad.sort_by(|x, y| y.3.total_cmp(&x.3));
        let worst: Vec<String> = bad
            .iter()
            .take(5)
            .map(|(i, g, w, _)| format!("[{i}] got {g} want {w}"))
            .collect();
        panic!(
            "{what}: {} of {} elements differ (atol {atol}, rtol {rtol}); max diff {max}; worst: {}",
            bad.len(),
            got.len(),
            worst.join(", ")
        );
    }
}
