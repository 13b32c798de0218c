//! Tests of `ops/matmul_gelu.rs`: the CPU path against f64 and against the unfused ops, the GPU
//! epilogues (both kernels, K split over dispatches) against the CPU and the unfused GPU ops, on
//! shapes that are multiples of no tile.
use super::*;
use crate::ops::gelu::{gelu, gelu_backward};
use crate::ops::matmul_tiled::{self, Dispatch, GpuMatmul};
use crate::reference::{self, narrow, widen};
use crate::testing::{assert_close, assert_close_slices, gpu, gpu_with_binding_limit, random};
use proptest::prelude::*;

/// gelu'(u) in f64 from the tanh form (module doc).
fn gelu_grad64(u: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let t = (k * (u + 0.044715 * u * u * u)).tanh();
    0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * u * u)
}

/// One problem: x `(lead…, M, K)`, W `(K, N)` (`(N, K)` with `tb`), an optional bias `(N)`, and
/// for the backward dy `(lead…, M, K)` against the same W.
#[derive(Clone, Debug)]
struct Case {
    lead: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    tb: bool,
    bias: bool,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, tb: bool) -> Case {
        Case {
            lead: vec![],
            m,
            k,
            n,
            tb,
            bias: true,
        }
    }
    fn opts(&self) -> MatmulOpts {
        MatmulOpts {
            trans_a: false,
            trans_b: self.tb,
        }
    }
    /// x, W and the bias on `device`, the same numbers for the same seed. x is scaled so that
    /// u = x·W + b spans GELU's bend and both tails (|u| up to about 3).
    fn tensors(&self, seed: u64, device: &Device) -> (Tensor, Tensor, Option<Tensor>) {
        let mut sx = self.lead.clone();
        sx.extend([self.m, self.k]);
        let sw = if self.tb {
            [self.n, self.k]
        } else {
            [self.k, self.n]
        };
        let scale = 3.0 / (self.k as f32).sqrt();
        let x = random(&sx, seed, &Device::cpu()).to_vec().unwrap();
        let x: Vec<f32> = x.iter().map(|v| v * scale * 1.7).collect();
        let x = Tensor::from_vec(x, &sx, device).unwrap();
        let bias = self.bias.then(|| random(&[self.n], seed + 2, device));
        (x, random(&sw, seed + 1, device), bias)
    }
}

/// Tolerance of a sum of K products of values around 1: f32 rounding far below `1e-5·K`.
fn atol(k: usize) -> f32 {
    1e-5 * k.max(1) as f32
}
const RTOL: f32 = 1e-5;

/// The CPU ops against f64: u and g against `reference::matmul` and `reference::gelu`, and the
/// backward against `(dy·op(W)) ⊙ gelu'(u)` evaluated in f64 at the u the forward returned.
fn check_cpu_against_f64(case: &Case, seed: u64) {
    let cpu = Device::cpu();
    let (x, w, bias) = case.tensors(seed, &cpu);
    let (u, g) = matmul_gelu(&x, &w, bias.as_ref(), case.opts()).unwrap();
    let rows: usize = case.lead.iter().product::<usize>() * case.m;
    let bias64 = bias.as_ref().map(|b| widen(&b.to_vec().unwrap()));
    let u64 = reference::matmul(
        &widen(&x.to_vec().unwrap()),
        &widen(&w.to_vec().unwrap()),
        bias64.as_deref(),
        [1, rows, case.k, case.n],
        case.opts(),
    );
    let what = format!("{case:?}");
    let tol = atol(case.k);
    assert_close_slices(
        &format!("u {what}"),
        &u.to_vec().unwrap(),
        &narrow(&u64),
        tol,
        RTOL,
    );
    let g64 = reference::gelu(&u64);
    assert_close_slices(
        &format!("g {what}"),
        &g.to_vec().unwrap(),
        &narrow(&g64),
        tol,
        RTOL,
    );
    // Backward: dy (…, M, K) against the same W (as the next layer's dx uses it).
    let dy = random(x.shape(), seed + 7, &cpu);
    let du = matmul_gelu_backward(&dy, &w, &u, case.opts()).unwrap();
    let dg64 = reference::matmul(
        &widen(&dy.to_vec().unwrap()),
        &widen(&w.to_vec().unwrap()),
        None,
        [1, rows, case.k, case.n],
        case.opts(),
    );
    let want: Vec<f64> = dg64
        .iter()
        .zip(widen(&u.to_vec().unwrap()))
        .map(|(d, u)| d * gelu_grad64(u))
        .collect();
    assert_close_slices(
        &format!("dU {what}"),
        &du.to_vec().unwrap(),
        &narrow(&want),
        tol,
        RTOL,
    );
}

/// The fused ops on `g` against the CPU's, and against the unfused ops on the same GPU (the
/// same kernel choice, so the product is the same; GELU is the same WGSL function). Returns
/// the dispatches the two fused ops took.
fn check_gpu(g: &Device, case: &Case, seed: u64) -> u64 {
    let Device::Gpu(ctx) = g else { unreachable!() };
    let what = format!("{case:?}");
    let (x, w, bias) = case.tensors(seed, &Device::cpu());
    let (gx, gw, gbias) = case.tensors(seed, g);
    let (u, act) = matmul_gelu(&x, &w, bias.as_ref(), case.opts()).unwrap();
    let before = ctx.dispatch_count();
    let (gu, gact) = matmul_gelu(&gx, &gw, gbias.as_ref(), case.opts()).unwrap();
    let mut dispatches = ctx.dispatch_count() - before;
    let tol = atol(case.k);
    assert_close(&format!("u {what}"), &gu, &u, tol, RTOL);
    assert_close(&format!("g {what}"), &gact, &act, tol, RTOL);
    let plain_u = matmul(&gx, &gw, gbias.as_ref(), case.opts()).unwrap();
    assert_close(&format!("u vs unfused {what}"), &gu, &plain_u, 1e-6, 1e-6);
    let plain_g = gelu(&plain_u).unwrap();
    assert_close(&format!("g vs unfused {what}"), &gact, &plain_g, 1e-6, 1e-6);

    let dy = random(x.shape(), seed + 7, &Device::cpu());
    let gdy = dy.to_device(g).unwrap();
    let du = matmul_gelu_backward(&dy, &w, &u, case.opts()).unwrap();
    // The GPU's own u, so the comparison with the CPU measures the backward alone.
    let saved_u = u.to_device(g).unwrap();
    let before = ctx.dispatch_count();
    let gdu = matmul_gelu_backward(&gdy, &gw, &saved_u, case.opts()).unwrap();
    dispatches += ctx.dispatch_count() - before;
    assert_close(&format!("dU {what}"), &gdu, &du, tol, RTOL);
    let plain_dg = matmul(&gdy, &gw, None, case.opts()).unwrap();
    let plain_du = gelu_backward(&u.to_device(g).unwrap(), &plain_dg).unwrap();
    assert_close(
        &format!("dU vs unfused {what}"),
        &gdu,
        &plain_du,
        1e-6,
        1e-6,
    );
    dispatches
}

fn leads() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![Just(vec![]), Just(vec![3]), Just(vec![2, 3])]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn cpu_matmul_gelu_matches_f64(lead in leads(), m in 1usize..40, k in 1usize..70,
                                   n in 1usize..70, tb: bool, bias: bool, seed in 0u64..1000) {
        check_cpu_against_f64(&Case { lead, bias, ..Case::new(m, k, n, tb) }, seed);
    }

    #[test]
    fn matmul_gelu_matches_cpu_shapes(lead in leads(), m in crate::testing::sizes(),
                                      k in crate::testing::sizes(), n in 1usize..150, tb: bool,
                                      bias: bool, seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        check_gpu(&g, &Case { lead, bias, ..Case::new(m.min(150), k, n, tb) }, seed);
    }
}

#[test]
fn cpu_matmul_gelu_is_the_unfused_ops_to_the_bit() {
    let cpu = Device::cpu();
    for tb in [false, true] {
        let case = Case {
            lead: vec![2],
            ..Case::new(37, 33, 70, tb)
        };
        let (x, w, bias) = case.tensors(5, &cpu);
        let (u, g) = matmul_gelu(&x, &w, bias.as_ref(), case.opts()).unwrap();
        let plain_u = matmul(&x, &w, bias.as_ref(), case.opts()).unwrap();
        assert_eq!(u.to_vec().unwrap(), plain_u.to_vec().unwrap());
        assert_eq!(
            g.to_vec().unwrap(),
            gelu(&plain_u).unwrap().to_vec().unwrap()
        );
        let dy = random(x.shape(), 9, &cpu);
        let du = matmul_gelu_backward(&dy, &w, &u, case.opts()).unwrap();
        let dg = matmul(&dy, &w, None, case.opts()).unwrap();
        let want = gelu_backward(&u, &dg).unwrap();
        assert_eq!(du.to_vec().unwrap(), want.to_vec().unwrap());
    }
}

#[test]
fn matmul_gelu_matches_cpu_hostile_shapes() {
    // One row or column, smaller than a workgroup, one past a tile of either kernel, K = 1.
    let Some(g) = gpu() else { return };
    let cases = [
        Case::new(1, 1, 1, false),
        Case::new(1, 17, 65, true),
        Case::new(65, 1, 3, false),
        Case::new(129, 7, 129, true),
        Case {
            lead: vec![2, 2],
            bias: false,
            ..Case::new(17, 33, 5, false)
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        check_gpu(&g, case, i as u64);
    }
}

#[test]
fn tiled_gelu_epilogues_match_cpu_on_edges() {
    // Multiples of 4 (the tiled kernel's vec4s) but of no tile (128): partial tiles in M and N.
    let Some(g) = gpu() else { return };
    for (i, case) in [
        Case::new(132, 36, 260, false),
        Case::new(4, 8, 132, true),
        Case {
            lead: vec![3],
            ..Case::new(44, 40, 136, true)
        },
    ]
    .iter()
    .enumerate()
    {
        let (_, tiled) =
            matmul_tiled::tests::forced(GpuMatmul::Tile128, || check_gpu(&g, case, 10 + i as u64));
        assert!(tiled > 0, "{case:?} did not take the tiled kernel");
    }
}

#[test]
fn gelu_epilogues_match_cpu_with_k_split_over_dispatches() {
    // A binding of 4 KiB (under 1024 floats) cuts these products along M, N and K; the epilogue
    // must run once, on the last K chunk, after the chunks before it have summed into C. Both
    // kernels (Tile128 takes the vec4-aligned sub-blocks).
    let Some(_) = gpu() else { return };
    let g = gpu_with_binding_limit(4096);
    for kernel in [GpuMatmul::Tile64, GpuMatmul::Tile128] {
        for (i, case) in [
            Case::new(70, 50, 60, false),
            Case::new(70, 50, 60, true),
            Case::new(3, 1500, 4, false), // K longer than a binding
            Case::new(3, 1500, 4, true),
            Case::new(64, 128, 96, true),
        ]
        .iter()
        .enumerate()
        {
            let (fused, _) = matmul_tiled::tests::forced(kernel, || check_gpu(&g, case, i as u64));
            assert!(fused > 2, "{case:?} was not split ({fused} dispatches)");
        }
    }
}

#[test]
fn each_epilogue_has_its_entry_point_in_both_kernels() {
    let d = Dispatch {
        m: 256,
        n: 256,
        k: 256,
        trans_a: false,
        trans_b: true,
        ld: [256; 3],
        off: [0; 3],
        stride: [0; 3],
        off_bias: None,
        b_f16: false,
        epilogue: None,
    };
    let entry = |choice, epilogue| {
        let (kernel, _, _) = matmul_tiled::pick(choice, &Dispatch { epilogue, ..d });
        format!("{}::{}", kernel.shader, kernel.entry)
    };
    let fwd = Some((Epilogue::Gelu, 0));
    let bwd = Some((Epilogue::GeluBackward, 8));
    assert_eq!(entry(GpuMatmul::Auto, None), "matmul_tiled::matmul_tiled");
    assert_eq!(
        entry(GpuMatmul::Auto, fwd),
        "matmul_tiled::matmul_tiled_gelu"
    );
    assert_eq!(
        entry(GpuMatmul::Auto, bwd),
        "matmul_tiled::matmul_tiled_gelu_backward"
    );
    assert_eq!(entry(GpuMatmul::Tile64, fwd), "matmul::matmul_gelu");
    assert_eq!(
        entry(GpuMatmul::Tile64, bwd),
        "matmul::matmul_gelu_backward"
    );
    // The epilogue's tensor is read as vec4s by the tiled kernel: an offset inside a vec4 is
    // left to the first kernel.
    let odd = Some((Epilogue::Gelu, 2));
    assert_eq!(entry(GpuMatmul::Tile128, odd), "matmul::matmul_gelu");
}

#[test]
fn shapes_are_checked() {
    let cpu = Device::cpu();
    let x = Tensor::zeros(&[2, 3, 4], &cpu).unwrap();
    let w = Tensor::zeros(&[4, 5], &cpu).unwrap();
    let transposed = MatmulOpts {
        trans_a: true,
        trans_b: false,
    };
    let e = matmul_gelu(&x, &w, None, transposed)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("matmul_gelu") && e.contains("without trans_a"),
        "{e}"
    );
    let w3 = Tensor::zeros(&[2, 4, 5], &cpu).unwrap();
    let e = matmul_gelu(&x, &w3, None, MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2-D weight (K, N)") && e.contains("[2, 4, 5]"),
        "{e}"
    );
    let bias = Tensor::zeros(&[4], &cpu).unwrap();
    let e = matmul_gelu(&x, &w, Some(&bias), MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias of shape [5]") && e.contains("[4]"), "{e}");
    let u = Tensor::zeros(&[2, 3, 4], &cpu).unwrap();
    let e = matmul_gelu_backward(&x, &w, &u, MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("matmul_gelu_backward") && e.contains("[2, 3, 5]") && e.contains("[2, 3, 4]"),
        "{e}"
    );
}
