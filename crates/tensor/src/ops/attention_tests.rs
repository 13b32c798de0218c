//! Tests of [`super`]: the CPU path against the unfused f64 loops of
//! [`reference::attention`](crate::reference::attention) (whose backward is checked against
//! finite differences), the GPU against the CPU.

use super::*;
use crate::reference;
use crate::testing::{assert_close_slices, gpu, random_vec, sizes};
use proptest::prelude::*;

/// qkv (B, T, 3C) with values in [-2, 2) (scores of a realistic spread), and dy (B, T, C).
fn inputs(b: usize, t: usize, nh: usize, hs: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let c = nh * hs;
    let qkv = random_vec(b * t * 3 * c, seed)
        .iter()
        .map(|v| 2.0 * v)
        .collect();
    (qkv, random_vec(b * t * c, seed + 1))
}

/// y, lse and d(qkv) of the op on `device`, downloaded.
fn run(
    qkv: &[f32],
    dy: &[f32],
    [b, t, nh, hs]: [usize; 4],
    scale: f32,
    device: &Device,
) -> [Vec<f32>; 3] {
    let c = nh * hs;
    let x = Tensor::from_vec(qkv.to_vec(), &[b, t, 3 * c], device).unwrap();
    let g = Tensor::from_vec(dy.to_vec(), &[b, t, c], device).unwrap();
    let (y, lse) = causal_attention(&x, nh, scale).unwrap();
    let dx = causal_attention_backward(&x, &y, &lse, &g, nh, scale).unwrap();
    [y, lse, dx].map(|t| t.to_vec().unwrap())
}

/// The CPU path against the f64 reference, to `tol` absolute and relative.
fn check_cpu(shape: [usize; 4], scale: f32, seed: u64, tol: f32) {
    let [b, t, nh, _] = shape;
    let (qkv, dy) = inputs(shape[0], t, nh, shape[3], seed);
    let [y, lse, dx] = run(&qkv, &dy, shape, scale, &Device::cpu());
    let (qkv64, dy64) = (reference::widen(&qkv), reference::widen(&dy));
    let (want_y, want_lse) = reference::attention(&qkv64, b, t, nh, scale as f64);
    let want_dx = reference::attention_backward(&qkv64, &dy64, b, t, nh, scale as f64);
    let what = format!("{shape:?} scale {scale}");
    assert_close_slices(
        &format!("{what} y"),
        &y,
        &reference::narrow(&want_y),
        tol,
        tol,
    );
    let want_lse = reference::narrow(&want_lse);
    assert_close_slices(&format!("{what} lse"), &lse, &want_lse, tol, tol);
    let want_dx = reference::narrow(&want_dx);
    assert_close_slices(&format!("{what} dqkv"), &dx, &want_dx, tol, tol);
}

/// The GPU against the CPU on the same inputs.
fn check_gpu(shape: [usize; 4], scale: f32, seed: u64, g: &Device) {
    let (qkv, dy) = inputs(shape[0], shape[1], shape[2], shape[3], seed);
    let want = run(&qkv, &dy, shape, scale, &Device::cpu());
    let got = run(&qkv, &dy, shape, scale, g);
    for (name, (got, want)) in ["y", "lse", "dqkv"].iter().zip(got.iter().zip(&want)) {
        assert_close_slices(&format!("{shape:?} gpu {name}"), got, want, 1e-5, 1e-4);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn cpu_matches_reference(b in 1usize..3, t in sizes(), nh in 1usize..4, hs in 1usize..=20,
                             scale in 0.2f32..1.0, seed in 0u64..1000) {
        // T up to 257 crosses several 32-row tiles, with a ragged last one.
        check_cpu([b, t, nh, hs], scale, seed, 2e-5);
    }

    #[test]
    fn gpu_matches_cpu(b in 1usize..3, t in 1usize..40, nh in 1usize..4, hs in 1usize..=20,
                       scale in 0.2f32..1.0, seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        check_gpu([b, t, nh, hs], scale, seed, &g);
    }
}

#[test]
fn cpu_matches_reference_wide_heads_and_threads() {
    // hs = 70 (not a multiple of 8 lanes), 4 heads × 2 sequences over T = 70: enough work for
    // the threaded path, tiles ragged.
    check_cpu([2, 70, 4, 70], 70f32.powf(-0.5), 3, 2e-5);
}

#[test]
fn gpu_matches_cpu_two_column_chunks() {
    // hs = 70: two 64-column chunks, each workgroup recomputing the scores over all 70.
    let Some(g) = gpu() else { return };
    check_gpu([1, 35, 2, 70], 0.2, 4, &g);
}

#[test]
fn gpu_matches_cpu_split_bindings() {
    // 8 KiB bindings hold two sequences of qkv (7 × 3·36 floats = 3 KiB each): three dispatches.
    let Some(_) = gpu() else { return };
    let g = crate::testing::gpu_with_binding_limit(8192);
    check_gpu([5, 7, 3, 12], 0.5, 5, &g);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let (b, t, nh, hs, scale) = (2, 5, 2, 3, 0.7);
    let (qkv, dy) = inputs(b, t, nh, hs, 6);
    let (qkv, dy) = (reference::widen(&qkv), reference::widen(&dy));
    let loss = |x: &[f64]| -> f64 {
        let (y, _) = reference::attention(x, b, t, nh, scale);
        y.iter().zip(&dy).map(|(a, b)| a * b).sum()
    };
    let fd = reference::numeric_gradient(loss, &qkv, 1e-6);
    let got = reference::attention_backward(&qkv, &dy, b, t, nh, scale);
    for (n, (a, w)) in got.iter().zip(&fd).enumerate() {
        assert!(
            (a - w).abs() < 1e-7,
            "element {n}: {a} vs finite differences {w}"
        );
    }
}

#[test]
fn one_position_attends_to_itself() {
    // T = 1: y = v, lse = s·q·k, and the only gradients are dv = dy and dq, dk from dS = 0.
    let cpu = Device::cpu();
    let qkv = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 1, 6], &cpu).unwrap();
    let (y, lse) = causal_attention(&qkv, 1, 0.5).unwrap();
    assert_eq!(y.to_vec().unwrap(), [5.0, 6.0]);
    assert_eq!(lse.to_vec().unwrap(), [0.5 * (3.0 + 8.0)]);
    let dy = Tensor::from_vec(vec![1.0, -1.0], &[1, 1, 2], &cpu).unwrap();
    let dx = causal_attention_backward(&qkv, &y, &lse, &dy, 1, 0.5).unwrap();
    assert_eq!(dx.to_vec().unwrap(), [0.0, 0.0, 0.0, 0.0, 1.0, -1.0]);
}

#[test]
fn shapes_are_checked() {
    let cpu = Device::cpu();
    let qkv = Tensor::zeros(&[2, 3, 12], &cpu).unwrap();
    let e = causal_attention(&qkv, 3, 1.0).unwrap_err().to_string();
    assert!(
        e.contains("causal_attention") && e.contains("NH = 3") && e.contains("[2, 3, 12]"),
        "{e}"
    );
    let (y, lse) = causal_attention(&qkv, 2, 1.0).unwrap();
    assert_eq!((y.shape(), lse.shape()), (&[2, 3, 4][..], &[2, 2, 3][..]));
    let bad = Tensor::zeros(&[2, 3, 5], &cpu).unwrap();
    let e = causal_attention_backward(&qkv, &y, &lse, &bad, 2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dy of shape [2, 3, 4]") && e.contains("[2, 3, 5]"),
        "{e}"
    );
}
