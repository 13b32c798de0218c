//! Tests of `ops/sgmv.rs`: the GPU kernel against the CPU path, the CPU path against
//! the definition in f64, rows without adapter, binding splits and shape checks.
use super::*;
use crate::testing::{
    assert_close, assert_close_slices, gpu, gpu_with_binding_limit, random, sizes,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// N indices over `n_adapters` adapters, about one row in five without adapter.
fn random_indices(n: usize, n_adapters: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| match rng.random_range(0..5) {
            0 => NO_ADAPTER,
            _ => rng.random_range(0..n_adapters as u32),
        })
        .collect()
}

/// [x, indices, A, B, scales] on the CPU, for N rows and `k` adapters.
fn operands(n: usize, n_in: usize, n_out: usize, rank: usize, k: usize, seed: u64) -> [Tensor; 5] {
    let cpu = Device::cpu();
    let scales: Vec<f32> = (0..k).map(|i| 0.5 + i as f32).collect();
    [
        random(&[n, n_in], seed, &cpu),
        Tensor::from_u32(&random_indices(n, k, seed), &cpu).unwrap(),
        random(&[k, rank, n_in], seed + 1, &cpu),
        random(&[k, n_out, rank], seed + 2, &cpu),
        Tensor::from_vec(scales, &[k], &cpu).unwrap(),
    ]
}

fn on(device: &Device, t: &[Tensor; 5]) -> [Tensor; 5] {
    t.clone().map(|t| t.to_device(device).unwrap())
}

fn run(t: &[Tensor; 5]) -> Tensor {
    sgmv(&t[0], &t[1], &t[2], &t[3], &t[4]).unwrap()
}

/// The definition in f64 (`tensor::reference::sgmv`): per row, s·B·(A·x) with the row's own
/// adapter.
fn naive(t: &[Tensor; 5]) -> Vec<f32> {
    let [x, _, a, b, s] = t
        .clone()
        .map(|t| crate::reference::widen(&t.to_vec().unwrap()));
    let idx = t[1].to_u32().unwrap();
    let dims = [t[2].shape()[2], t[2].shape()[1], t[3].shape()[1]];
    crate::reference::narrow(&crate::reference::sgmv(&x, &idx, &a, &b, &s, dims))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn sgmv_matches_cpu(n in sizes(), n_in in sizes(), n_out in sizes(), rank in 1usize..17,
                        k in 1usize..5, seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        let t = operands(n, n_in, n_out, rank, k, seed);
        // Same sums in the same order; the GPU may fuse a multiply and an add (one rounding
        // fewer), so allow a few ulps of the terms' scale (|y| reaches ~10² here).
        assert_close("sgmv", &run(&on(&g, &t)), &run(&t), 1e-4, 1e-5);
    }

    #[test]
    fn sgmv_cpu_matches_naive(n in sizes(), n_in in sizes(), n_out in sizes(), rank in 1usize..17,
                              k in 1usize..5, seed in 0u64..1000) {
        let t = operands(n, n_in, n_out, rank, k, seed);
        // f32 sums of ≤ 257 terms against f64.
        assert_close_slices("sgmv vs f64", &run(&t).to_vec().unwrap(), &naive(&t), 1e-3, 1e-4);
    }
}

#[test]
fn sgmv_hand_worked() {
    // Two adapters of rank 1 over in = 2, out = 2; rows: adapter 1, none, adapter 0.
    let cpu = Device::cpu();
    let t = [
        Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2], &cpu).unwrap(),
        Tensor::from_u32(&[1, NO_ADAPTER, 0], &cpu).unwrap(),
        Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0], &[2, 1, 2], &cpu).unwrap(), // A0 = e0, A1 = e1
        Tensor::from_vec(vec![1.0, 2.0, 10.0, 20.0], &[2, 2, 1], &cpu).unwrap(),
        Tensor::from_vec(vec![0.5, 2.0], &[2], &cpu).unwrap(),
    ];
    // Row 0: h = 2·x[1] = 4, y = (40, 80). Row 1: zero. Row 2: h = 0.5·x[0] = 2.5, y = (2.5, 5).
    let want = [40.0, 80.0, 0.0, 0.0, 2.5, 5.0];
    assert_eq!(run(&t).to_vec().unwrap(), want);
    let Some(g) = gpu() else { return };
    assert_eq!(run(&on(&g, &t)).to_vec().unwrap(), want);
}

#[test]
fn rows_without_adapter_give_zeros() {
    // The sentinel and any other index ≥ n_adapters: zero rows, on both devices (the GPU's
    // outputs start as NaN, so an unwritten row would show).
    let mut t = operands(9, 5, 7, 3, 2, 1);
    t[1] = Tensor::from_u32(
        &[NO_ADAPTER, 2, 99, NO_ADAPTER, 0, 1, NO_ADAPTER, 2, 1],
        &Device::cpu(),
    )
    .unwrap();
    let check = |y: Vec<f32>| {
        for (n, row) in y.chunks(7).enumerate() {
            let zero = row.iter().all(|&v| v == 0.0);
            assert_eq!(zero, ![4, 5, 8].contains(&n), "row {n}: {row:?}");
        }
    };
    check(run(&t).to_vec().unwrap());
    let Some(g) = gpu() else { return };
    check(run(&on(&g, &t)).to_vec().unwrap());
}

#[test]
fn sgmv_keeps_leading_axes_and_splits_bindings() {
    let t = operands(3 * 86, 13, 11, 4, 3, 2);
    let x3 = t[0].reshape(&[3, 86, 13]).unwrap();
    let y3 = sgmv(&x3, &t[1], &t[2], &t[3], &t[4]).unwrap();
    assert_eq!(y3.shape(), [3, 86, 11]);
    let Some(_) = gpu() else { return };
    // Bindings of at most 4 KiB: x (258 × 13 f32, 13.4 KB) and y are cut into row ranges.
    let g = gpu_with_binding_limit(4096);
    let got = sgmv(
        &x3.to_device(&g).unwrap(),
        &t[1].to_device(&g).unwrap(),
        &t[2].to_device(&g).unwrap(),
        &t[3].to_device(&g).unwrap(),
        &t[4].to_device(&g).unwrap(),
    )
    .unwrap();
    assert_close("sgmv split", &got, &y3, 1e-4, 1e-5);
}

#[test]
fn sgmv_checks_shapes() {
    let t = operands(4, 5, 6, 2, 3, 0);
    let err = |t: &[Tensor; 5]| {
        sgmv(&t[0], &t[1], &t[2], &t[3], &t[4])
            .unwrap_err()
            .to_string()
    };
    let mut bad = t.clone();
    bad[0] = random(&[4, 6], 0, &Device::cpu());
    assert!(err(&bad).contains("x of shape (…, 5)"), "{}", err(&bad));
    let mut bad = t.clone();
    bad[1] = Tensor::from_u32(&[0, 1], &Device::cpu()).unwrap();
    assert!(err(&bad).contains("4 adapter indices"), "{}", err(&bad));
    let mut bad = t.clone();
    bad[3] = random(&[3, 6, 3], 0, &Device::cpu());
    assert!(
        err(&bad).contains("B of shape (3, out, 2)"),
        "{}",
        err(&bad)
    );
    let mut bad = t.clone();
    bad[4] = random(&[2], 0, &Device::cpu());
    assert!(err(&bad).contains("scales of shape [3]"), "{}", err(&bad));
}
