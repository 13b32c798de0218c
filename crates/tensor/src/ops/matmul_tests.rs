//! Tests of `ops/matmul.rs`: the CPU path against the f64 oracle, the GPU kernel against the
//! CPU on hostile shapes, binding splits, and the backward table.
use super::*;
use crate::ops::{matmul_tiled, matmul_tune};
use crate::testing::{assert_close, gpu, gpu_with_binding_limit, random, sizes};
use proptest::prelude::*;

fn opts(trans_a: bool, trans_b: bool) -> MatmulOpts {
    MatmulOpts { trans_a, trans_b }
}

/// Tolerance of every comparison: inputs are uniform in [-1, 1), so a sum of K products has
/// f32 rounding error far below `atol = 1e-5·K` (plus `rtol = 1e-5` of the value).
fn atol(k: usize) -> f32 {
    1e-5 * k.max(1) as f32
}
const RTOL: f32 = 1e-5;

/// One test problem: batch dims `lead`, op(A): (M, K), op(B): (K, N), B 2-D when `shared`.
#[derive(Clone, Debug)]
struct Case {
    lead: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    o: MatmulOpts,
    shared: bool,
    bias: bool,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, o: MatmulOpts) -> Case {
        Case {
            lead: vec![],
            m,
            k,
            n,
            o,
            shared: false,
            bias: false,
        }
    }
    /// A, B, bias and a starting C on `device`, the same numbers for the same seed.
    fn tensors(&self, seed: u64, device: &Device) -> (Tensor, Tensor, Option<Tensor>, Tensor) {
        let (m, k, n) = (self.m, self.k, self.n);
        let mut sa = self.lead.clone();
        sa.extend(if self.o.trans_a { [k, m] } else { [m, k] });
        let mut sb = if self.shared {
            vec![]
        } else {
            self.lead.clone()
        };
        sb.extend(if self.o.trans_b { [n, k] } else { [k, n] });
        let mut sc = self.lead.clone();
        sc.extend([m, n]);
        let bias = self.bias.then(|| random(&[n], seed + 2, device));
        (
            random(&sa, seed, device),
            random(&sb, seed + 1, device),
            bias,
            random(&sc, seed + 3, device),
        )
    }
}

/// GPU `matmul` and `matmul_accumulate` against the CPU path (sgemm) on `g`; returns the
/// number of kernel dispatches `matmul_accumulate` took.
fn check_gpu(g: &Device, case: &Case, seed: u64) -> u64 {
    let Device::Gpu(ctx) = g else { unreachable!() };
    let what = format!("{case:?}");
    let (a, b, bias, c) = case.tensors(seed, &Device::cpu());
    let (ga, gb, gbias, gc) = case.tensors(seed, g);
    let want = matmul(&a, &b, bias.as_ref(), case.o).unwrap();
    let got = matmul(&ga, &gb, gbias.as_ref(), case.o).unwrap();
    assert_close(&what, &got, &want, atol(case.k), RTOL);
    matmul_accumulate(&c, &a, &b, case.o).unwrap();
    let before = ctx.dispatch_count();
    matmul_accumulate(&gc, &ga, &gb, case.o).unwrap();
    let dispatches = ctx.dispatch_count() - before;
    assert_close(
        &format!("accumulate {what}"),
        &gc,
        &c,
        atol(case.k) + 1e-6,
        RTOL,
    );
    dispatches
}

fn leads() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![Just(vec![]), Just(vec![3]), Just(vec![2, 3])]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn cpu_matmul_matches_f64_naive(lead in leads(), m in sizes(), k in sizes(), n in sizes(),
                                    ta: bool, tb: bool, shared: bool, bias: bool, seed in 0u64..1000) {
        let case = Case { lead, m: m.min(70), k, n: n.min(70), o: opts(ta, tb), shared, bias };
        let (a, b, bias, c) = case.tensors(seed, &Device::cpu());
        let want = crate::reference::matmul_tensors(&a, &b, bias.as_ref(), case.o).unwrap();
        let got = matmul(&a, &b, bias.as_ref(), case.o).unwrap();
        assert_close(&format!("{case:?}"), &got, &want, atol(k), RTOL);
        // C += product, against the oracle plus C's starting value.
        let want_acc: Vec<f32> = c.to_vec().unwrap().iter().zip(crate::reference::matmul_tensors(&a, &b, None, case.o)
            .unwrap().to_vec().unwrap()).map(|(x, y)| x + y).collect();
        matmul_accumulate(&c, &a, &b, case.o).unwrap();
        crate::testing::assert_close_slices("accumulate", &c.to_vec().unwrap(), &want_acc, atol(k) + 1e-6, RTOL);
    }

    #[test]
    fn matmul_matches_cpu_shapes(m in sizes(), k in sizes(), n in sizes(), ta: bool, tb: bool,
                                 bias: bool, seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        check_gpu(&g, &Case { bias, ..Case::new(m, k, n, opts(ta, tb)) }, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    #[test]
    fn matmul_matches_cpu_batched(lead in leads(), m in 1usize..70, k in 1usize..70, n in 1usize..70,
                                  ta: bool, tb: bool, shared: bool, bias: bool, seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        check_gpu(&g, &Case { lead, m, k, n, o: opts(ta, tb), shared, bias }, seed);
    }
}

#[test]
fn matmul_matches_cpu_hostile_shapes() {
    let Some(g) = gpu() else { return };
    let shapes = [
        (17, 33, 5),
        (17, 5, 33),
        (1, 768, 257),
        (1, 1, 1),
        (3, 2000, 5),
        (65, 1, 129),
        (64, 64, 64),
        (7, 0, 9),
    ];
    for (m, k, n) in shapes {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            check_gpu(
                &g,
                &Case {
                    bias: true,
                    ..Case::new(m, k, n, opts(ta, tb))
                },
                7,
            );
        }
    }
    // T = 1 rows against a shared weight, and a batched product with one row per entry.
    let o = opts(false, true);
    check_gpu(
        &g,
        &Case {
            lead: vec![4],
            shared: true,
            bias: true,
            ..Case::new(1, 65, 130, o)
        },
        8,
    );
    check_gpu(
        &g,
        &Case {
            lead: vec![5],
            ..Case::new(1, 9, 1, opts(true, false))
        },
        9,
    );
}

#[test]
fn matmul_matches_cpu_split_bindings() {
    // A binding of 4 KiB holds under 1024 floats, so these small operands are cut along M, N
    // and K (and, for rows longer than a binding, along their columns).
    let Some(_) = gpu() else { return };
    let g = gpu_with_binding_limit(4096);
    let mut cases = Vec::new();
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let o = opts(ta, tb);
        cases.push(Case {
            bias: true,
            ..Case::new(70, 50, 60, o)
        }); // M, N, K chunks
        cases.push(Case {
            bias: true,
            ..Case::new(3, 4, 1500, o)
        }); // C rows > one binding
        cases.push(Case::new(3, 1500, 4, o)); // K longer than a binding
        cases.push(Case {
            lead: vec![3],
            ..Case::new(40, 30, 20, o)
        }); // per-entry splits
        cases.push(Case {
            lead: vec![20],
            bias: true,
            ..Case::new(9, 8, 7, o)
        }); // batched, several entries per binding
        cases.push(Case {
            lead: vec![2],
            shared: true,
            ..Case::new(33, 40, 50, o)
        });
    }
    for (i, case) in cases.iter().enumerate() {
        let dispatches = check_gpu(&g, case, i as u64);
        eprintln!("{case:?}: {dispatches} dispatches");
        assert!(dispatches > 1, "{case:?} was not split");
    }
}

#[test]
fn matmul_matches_cpu_batch_split_over_dispatches() {
    // With at most 2 batch entries per dispatch (65,535 on a device), 5 entries take 3.
    // A context of its own, so that no other test's dispatches are counted.
    let Some(_) = gpu() else { return };
    let g = gpu_with_binding_limit(u64::MAX);
    let Device::Gpu(ctx) = &g else { unreachable!() };
    for o in [opts(false, false), opts(true, true)] {
        let case = Case {
            lead: vec![5],
            bias: true,
            ..Case::new(9, 13, 11, o)
        };
        let (a, b, bias, _) = case.tensors(3, &Device::cpu());
        let (ga, gb, gbias, _) = case.tensors(3, &g);
        let want = matmul(&a, &b, bias.as_ref(), o).unwrap();
        let got = Tensor::gpu_uninit(ctx, want.shape()).unwrap();
        let d = dims("test", &ga, &gb, o).unwrap();
        let before = ctx.dispatch_count();
        launch(ctx, &got, &ga, &gb, gbias.as_ref(), &d, o, false, 2, None).unwrap();
        assert_eq!(ctx.dispatch_count() - before, 3);
        assert_close(&format!("{case:?}"), &got, &want, atol(13), RTOL);
    }
}

#[test]
fn shape_errors_are_clear() {
    let cpu = Device::cpu();
    let z = |s: &[usize]| Tensor::zeros(s, &cpu).unwrap();
    let e = matmul(&z(&[2, 3]), &z(&[4, 5]), None, MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("matmul") && e.contains("K = 3") && e.contains("[4, 5]"),
        "{e}"
    );
    let e = matmul(&z(&[2, 3, 4]), &z(&[3, 4, 5]), None, MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("batch dims [2]") && e.contains("[3, 4, 5]"),
        "{e}"
    );
    let e = matmul(
        &z(&[2, 3]),
        &z(&[3, 4]),
        Some(&z(&[3])),
        MatmulOpts::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bias of shape [4]"), "{e}");
    let e = matmul_accumulate(&z(&[2, 2]), &z(&[2, 3]), &z(&[3, 4]), MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, 4]") && e.contains("[2, 2]"), "{e}");
    let e = matmul(&z(&[3]), &z(&[3, 4]), None, MatmulOpts::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least 2 dims"), "{e}");
    // trans_b: B is (N, K) = (4, 3), so K = 3 matches A (2, 3).
    assert_eq!(
        matmul(&z(&[2, 3]), &z(&[4, 3]), None, opts(false, true))
            .unwrap()
            .shape(),
        [2, 4]
    );
}

#[test]
fn backward_rules_are_adjoints() {
    // The module doc's table: dA is the gradient of L = <dC, op(A)·op(B)> with respect to A,
    // so for any A', <dA, A'> = <dC, op(A')·op(B)> (the product is linear in A); same for B.
    let cpu = Device::cpu();
    let dot = |x: &Tensor, y: &Tensor| -> f64 {
        x.to_vec()
            .unwrap()
            .iter()
            .zip(y.to_vec().unwrap())
            .map(|(&p, q)| p as f64 * q as f64)
            .sum()
    };
    let (m, k, n) = (5, 7, 3);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let o = opts(ta, tb);
        let (a, b, _, dc) = Case::new(m, k, n, o).tensors(1, &cpu);
        let (a2, b2, _, _) = Case::new(m, k, n, o).tensors(5, &cpu);
        let (da, db) = match (ta, tb) {
            (false, false) => (
                matmul(&dc, &b, None, opts(false, true)),
                matmul(&a, &dc, None, opts(true, false)),
            ),
            (false, true) => (
                matmul(&dc, &b, None, opts(false, false)),
                matmul(&dc, &a, None, opts(true, false)),
            ),
            (true, false) => (
                matmul(&b, &dc, None, opts(false, true)),
                matmul(&a, &dc, None, opts(false, false)),
            ),
            (true, true) => (
                matmul(&b, &dc, None, opts(true, true)),
                matmul(&dc, &a, None, opts(true, true)),
            ),
        };
        let (da, db) = (da.unwrap(), db.unwrap());
        assert_eq!((da.shape(), db.shape()), (a.shape(), b.shape()), "{o:?}");
        let lhs = [dot(&da, &a2), dot(&db, &b2)];
        let rhs = [
            dot(&dc, &matmul(&a2, &b, None, o).unwrap()),
            dot(&dc, &matmul(&a, &b2, None, o).unwrap()),
        ];
        for (l, r) in lhs.into_iter().zip(rhs) {
            assert!((l - r).abs() < 1e-4 * (1.0 + r.abs()), "{o:?}: {l} vs {r}");
        }
    }
}

/// Multiples of 4 (what `matmul_tiled.wgsl` takes), not of its 128 tile or 8 K slice.
fn quads() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=3, 1usize..=40, 30usize..=70].prop_map(|q| 4 * q)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The second-generation kernel, forced, against the CPU in every transpose case, batched or
    /// not, B shared or not, with and without bias, plain and accumulating.
    #[test]
    fn tiled_kernel_matches_cpu(lead in leads(), m in quads(), k in quads(), n in quads(), ta: bool,
                                tb: bool, shared: bool, bias: bool, seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        let case = Case { lead, m, k, n, o: opts(ta, tb), shared, bias };
        let (_, tiled) = matmul_tiled::tests::forced(matmul_tiled::GpuMatmul::Tile128, || {
            check_gpu(&g, &case, seed)
        });
        prop_assert!(tiled > 0, "{case:?} did not take the tiled kernel");
    }
}

#[test]
fn tiled_kernel_matches_cpu_on_edges_and_split_bindings() {
    let Some(g) = gpu() else { return };
    let small = gpu_with_binding_limit(64 * 1024);
    let forced = |dev: &Device, case: Case, seed: u64| {
        let (_, tiled) = matmul_tiled::tests::forced(matmul_tiled::GpuMatmul::Tile128, || {
            check_gpu(dev, &case, seed)
        });
        assert!(tiled > 0, "{case:?} did not take the tiled kernel");
    };
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let o = opts(ta, tb);
        // Just under, at and over one tile; K under one slice.
        for (m, k, n) in [(124, 8, 132), (128, 128, 128), (260, 4, 4), (132, 516, 256)] {
            forced(
                &g,
                Case {
                    bias: true,
                    ..Case::new(m, k, n, o)
                },
                (m + k + n) as u64,
            );
        }
        // Cut over 64 KiB bindings (16,384 floats): M, N and K chunks at offsets that stay
        // multiples of 4, accumulating after the first K chunk.
        forced(
            &small,
            Case {
                bias: true,
                ..Case::new(200, 180, 160, o)
            },
            7,
        );
    }
    // Auto leaves a thin product (N = 8) and an odd K to the first kernel; even forced, K = 0
    // (nothing to read) goes there too.
    let (_, tiled) = matmul_tiled::tests::forced(matmul_tiled::GpuMatmul::Auto, || {
        check_gpu(&g, &Case::new(256, 64, 8, opts(false, true)), 1);
        check_gpu(&g, &Case::new(256, 63, 256, opts(false, false)), 2);
    });
    assert_eq!(tiled, 0);
    let (_, tiled) = matmul_tiled::tests::forced(matmul_tiled::GpuMatmul::Tile128, || {
        check_gpu(
            &g,
            &Case {
                bias: true,
                ..Case::new(4, 0, 8, opts(false, false))
            },
            3,
        );
    });
    assert_eq!(tiled, 0);
}

#[test]
fn tuning_measures_a_class_once_and_remembers_it_on_disk() {
    use std::sync::atomic::Ordering;
    let Some(g) = gpu() else { return };
    let Device::Gpu(ctx) = &g else { unreachable!() };
    let dir = std::env::temp_dir().join(format!("matmul-tune-test-{}", std::process::id()));
    let file = dir.join("tune.tsv");
    let _ = std::fs::remove_dir_all(&dir);
    matmul_tune::tests::PATH.with(|p| *p.borrow_mut() = Some(file.clone()));
    matmul_tune::forget();
    let tune = |case: Case, seed: u64| {
        matmul_tiled::tests::forced(GpuMatmul::Tune, || check_gpu(&g, &case, seed))
    };
    // The first product of its class is measured (its accumulating twin, same class, is not),
    // and the result is still the product.
    let before = matmul_tune::MEASURED.load(Ordering::Relaxed);
    tune(
        Case {
            bias: true,
            ..Case::new(256, 200, 132, opts(false, true))
        },
        1,
    );
    assert_eq!(matmul_tune::MEASURED.load(Ordering::Relaxed) - before, 1);
    let text = std::fs::read_to_string(&file).unwrap();
    let adapter = matmul_tune::adapter_key(ctx);
    let line = format!("{adapter}\tNT m8 n8 k8\t");
    assert!(text.starts_with(&line), "{text}");
    let kernel = text.trim_end().rsplit('\t').next().unwrap();
    assert!(["tile64", "tile128"].contains(&kernel), "{text}");
    // A new process (forgotten state) reads the answer instead of measuring, past a line it
    // cannot read; a shape only the first kernel takes is never measured.
    std::fs::write(&file, format!("garbage line\n{text}")).unwrap();
    matmul_tune::forget();
    tune(Case::new(252, 132, 140, opts(false, true)), 2);
    tune(Case::new(256, 63, 256, opts(false, false)), 3);
    assert_eq!(matmul_tune::MEASURED.load(Ordering::Relaxed) - before, 1);
    matmul_tune::tests::PATH.with(|p| *p.borrow_mut() = None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[path = "matmul_view_tests.rs"]
mod views;
