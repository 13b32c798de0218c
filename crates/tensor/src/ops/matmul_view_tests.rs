//! Products over views ([`MatView`]: column and row blocks of wider tensors) against the f64
//! oracle on the blocks, on both devices, across split bindings; and the views' errors.

use super::*;

/// A [`MatView`] test problem: op(A): (M, K), op(B): (K, N), each operand stored inside a wider
/// tensor with `extra[i]` more columns and `extra_rows[i]` more rows, the view starting at column
/// `col0[i]` ≤ `extra[i]` and row `row0[i]` ≤ `extra_rows[i]`.
#[derive(Clone, Debug)]
struct ViewCase {
    m: usize,
    k: usize,
    n: usize,
    o: MatmulOpts,
    extra: [usize; 3],
    col0: [usize; 3],
    extra_rows: [usize; 3],
    row0: [usize; 3],
    alpha: f32,
    accumulate: bool,
}

impl ViewCase {
    /// The wide A, B, C tensors on `device`, the same numbers for the same seed.
    fn tensors(&self, seed: u64, device: &Device) -> [Tensor; 3] {
        let (m, k, n) = (self.m, self.k, self.n);
        let stored = [
            if self.o.trans_a { [k, m] } else { [m, k] },
            if self.o.trans_b { [n, k] } else { [k, n] },
            [m, n],
        ];
        std::array::from_fn(|i| {
            let [rows, cols] = stored[i];
            let shape = [rows + self.extra_rows[i], cols + self.extra[i]];
            random(&shape, seed + i as u64, device)
        })
    }

    /// The views of the case over `t` = [A, B, C].
    fn views<'a>(&self, t: &'a [Tensor; 3]) -> [MatView<'a>; 3] {
        std::array::from_fn(|i| {
            let cols = t[i].last_dim() - self.extra[i];
            let rows = t[i].shape()[0] - self.extra_rows[i];
            MatView::cols(&t[i], self.col0[i], cols).rows(self.row0[i], rows)
        })
    }

    /// Run `matmul_into` on `t` = [A, B, C] (C is changed in place).
    fn run(&self, t: &[Tensor; 3]) {
        let [a, b, c] = self.views(t);
        matmul_into(c, a, b, self.o, self.alpha, self.accumulate).unwrap();
    }
}

/// The block of a view of a 2-D CPU tensor, copied out.
fn block(v: &MatView) -> Vec<f32> {
    let ld = v.tensor.last_dim();
    let rows = v.rows.unwrap();
    if ld == 0 {
        return Vec::new(); // a block of no columns (K = 0)
    }
    let all = v.tensor.to_vec().unwrap();
    all.chunks(ld)
        .skip(v.row0)
        .take(rows)
        .flat_map(|row| row[v.col0..v.col0 + v.cols].to_vec())
        .collect()
}

/// What `case.run` must leave in C, from the f64 oracle on the blocks copied out of [A, B, C]:
/// C's other columns unchanged, its block α·op(A)·op(B) (+ the old block with `accumulate`).
fn view_oracle(case: &ViewCase, t: &[Tensor; 3]) -> Vec<f32> {
    let cpu = Device::cpu();
    let [av, bv, cv] = case.views(t);
    let dense = |v: &MatView| Tensor::from_vec(block(v), &[v.rows.unwrap(), v.cols], &cpu).unwrap();
    let prod = crate::reference::matmul_tensors(&dense(&av), &dense(&bv), None, case.o).unwrap();
    let mut want = t[2].to_vec().unwrap();
    let ld = t[2].last_dim();
    for (i, row) in prod.to_vec().unwrap().chunks(case.n.max(1)).enumerate() {
        for (j, &p) in row.iter().enumerate() {
            let w = &mut want[(cv.row0 + i) * ld + cv.col0 + j];
            *w = case.alpha * p + if case.accumulate { *w } else { 0.0 };
        }
    }
    want
}

fn view_cases() -> impl Strategy<Value = ViewCase> {
    (
        (
            1usize..40,
            0usize..40,
            1usize..40,
            any::<bool>(),
            any::<bool>(),
        ),
        (
            proptest::array::uniform3(0usize..5),
            proptest::array::uniform3(0usize..4),
            -2.0f32..2.0,
            any::<bool>(),
        ),
        proptest::array::uniform3(0usize..=100),
    )
        .prop_map(
            |((m, k, n, ta, tb), (extra, extra_rows, alpha, accumulate), pick)| ViewCase {
                m,
                k,
                n,
                o: opts(ta, tb),
                extra,
                col0: std::array::from_fn(|i| pick[i] * extra[i] / 100),
                extra_rows,
                row0: std::array::from_fn(|i| pick[i] * extra_rows[i] / 100),
                alpha,
                accumulate,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn cpu_matmul_into_views_matches_f64(case in view_cases(), seed in 0u64..1000) {
        let t = case.tensors(seed, &Device::cpu());
        let want = view_oracle(&case, &t);
        case.run(&t);
        crate::testing::assert_close_slices(&format!("{case:?}"), &t[2].to_vec().unwrap(), &want,
            2.0 * atol(case.k), RTOL);
    }

    #[test]
    fn matmul_into_views_matches_cpu(case in view_cases(), seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        let (cpu, gpu_t) = (case.tensors(seed, &Device::cpu()), case.tensors(seed, &g));
        case.run(&cpu);
        case.run(&gpu_t);
        assert_close(&format!("{case:?}"), &gpu_t[2], &cpu[2], 2.0 * atol(case.k), RTOL);
    }

    #[test]
    fn matmul_scaled_matches_f64_and_cpu(m in 1usize..70, k in sizes(), n in 1usize..70, ta: bool,
                                         tb: bool, bias: bool, alpha in -3.0f32..3.0, seed in 0u64..1000) {
        // α scales the product, not the bias: C = α·op(A)·op(B) + bias.
        let case = Case { bias, ..Case::new(m, k, n, opts(ta, tb)) };
        let (a, b, bias, _) = case.tensors(seed, &Device::cpu());
        let prod = crate::reference::matmul_tensors(&a, &b, None, case.o).unwrap().to_vec().unwrap();
        let bias_v = bias.as_ref().map(|t| t.to_vec().unwrap());
        let want: Vec<f32> = prod.iter().enumerate()
            .map(|(i, p)| alpha * p + bias_v.as_ref().map_or(0.0, |b| b[i % n])).collect();
        let got = matmul_scaled(&a, &b, bias.as_ref(), case.o, alpha).unwrap();
        crate::testing::assert_close_slices("scaled", &got.to_vec().unwrap(), &want, 3.0 * atol(k), RTOL);
        let Some(g) = gpu() else { return Ok(()) };
        let (ga, gb, gbias, _) = case.tensors(seed, &g);
        let gpu_c = matmul_scaled(&ga, &gb, gbias.as_ref(), case.o, alpha).unwrap();
        assert_close(&format!("{case:?} α {alpha}"), &gpu_c, &got, 3.0 * atol(k), RTOL);
    }
}

#[test]
fn matmul_into_views_matches_cpu_split_bindings() {
    // 4 KiB bindings: the views' rows (ld up to 1,503) are cut as whole-tensor operands are,
    // with the wider leading dimensions and the columns' offsets.
    let Some(_) = gpu() else { return };
    let g = gpu_with_binding_limit(4096);
    let Device::Gpu(ctx) = &g else { unreachable!() };
    for (i, (ta, tb)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        for (m, k, n, extra) in [(70, 50, 60, [7, 3, 40]), (3, 4, 1500, [2, 1, 3])] {
            let case = ViewCase {
                m,
                k,
                n,
                o: opts(ta, tb),
                extra,
                col0: [extra[0] / 2, extra[1], 1],
                extra_rows: [3, 0, 5],
                row0: [1, 0, 5],
                alpha: 0.5,
                accumulate: i % 2 == 0,
            };
            let (cpu, gpu_t) = (
                case.tensors(i as u64, &Device::cpu()),
                case.tensors(i as u64, &g),
            );
            case.run(&cpu);
            let before = ctx.dispatch_count();
            case.run(&gpu_t);
            assert!(ctx.dispatch_count() - before > 1, "{case:?} was not split");
            assert_close(&format!("{case:?}"), &gpu_t[2], &cpu[2], atol(k), RTOL);
        }
    }
}

#[test]
fn view_errors_are_clear() {
    let cpu = Device::cpu();
    let z = |s: &[usize]| Tensor::zeros(s, &cpu).unwrap();
    let (a, b, c) = (z(&[4, 6]), z(&[3, 5]), z(&[4, 9]));
    let o = MatmulOpts::default();
    // Columns past the tensor's width.
    let e = matmul_into(
        MatView::cols(&c, 5, 5),
        MatView::cols(&a, 0, 3),
        MatView::all(&b),
        o,
        1.0,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("C with at least col0 + cols = 5 + 5") && e.contains("[4, 9]"),
        "{e}"
    );
    // K of the A view (4 columns) against B's 3 rows.
    let e = matmul_view(MatView::cols(&a, 1, 4), MatView::all(&b), o, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("K = 4") && e.contains("(3, 5)"), "{e}");
    // A C view of the wrong width.
    let e = matmul_into(
        MatView::cols(&c, 0, 4),
        MatView::cols(&a, 0, 3),
        MatView::all(&b),
        o,
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("(4, 5)") && e.contains("(4, 4)"), "{e}");
    // C sharing A's storage.
    let e = matmul_into(
        MatView::cols(&a, 0, 5),
        MatView::cols(&a, 0, 3),
        MatView::all(&b),
        o,
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("must not share storage"), "{e}");
    // A row block past the tensor's last row.
    let e = matmul_into(
        MatView::all(&c).rows(2, 3),
        MatView::cols(&a, 0, 3),
        MatView::all(&b),
        o,
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("C with at least row0 + rows = 2 + 3 rows of 9") && e.contains("[4, 9]"),
        "{e}"
    );
}
