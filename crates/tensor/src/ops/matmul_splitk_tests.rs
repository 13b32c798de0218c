//! Tests of `ops/matmul_splitk.rs`: the slicing rule on GPT-2's shapes (no GPU), and the
//! split-K path against the f64 oracle on the GPU: shapes that are not multiples of any tile,
//! every transpose case, batched and grouped products, α, bias, accumulation, views with
//! leading dimensions, slices with a shorter last one, and binding splits.

use std::cell::Cell;

use proptest::prelude::*;

use super::*;
use crate::ops::matmul::{
    MatView, MatmulOpts, group_outputs, matmul_accumulate, matmul_into, matmul_into_group,
    matmul_scaled,
};
use crate::ops::matmul_tiled::tests::forced;
use crate::reference::{self, widen};
use crate::testing::{assert_close_slices, gpu, gpu_with_binding_limit, random, random_vec};
use crate::{Device, Tensor};

thread_local! {
    /// Slices forced on this test thread for `GpuMatmul::SplitK` (instead of the rule's).
    pub(crate) static SLICES: Cell<Option<u32>> = const { Cell::new(None) };
    /// Products this thread recorded on the split-K path.
    pub(crate) static SPLIT: Cell<u64> = const { Cell::new(0) };
}

/// Run `f` with `choice` forced on this thread (and, for `SplitK`, `slices` slices when
/// given); returns its result and how many products took the split-K path.
fn split_run<R>(choice: GpuMatmul, slices: Option<u32>, f: impl FnOnce() -> R) -> (R, u64) {
    let before = SPLIT.with(Cell::get);
    SLICES.with(|s| s.set(slices));
    let (r, _) = forced(choice, f);
    SLICES.with(|s| s.set(None));
    (r, SPLIT.with(Cell::get) - before)
}

fn opts(trans_a: bool, trans_b: bool) -> MatmulOpts {
    MatmulOpts { trans_a, trans_b }
}

fn dispatch(m: u32, n: u32, k: u32) -> Dispatch {
    Dispatch {
        m,
        n,
        k,
        trans_a: false,
        trans_b: false,
        ld: [k, n, n],
        off: [0; 3],
        stride: [0; 3],
        off_bias: None,
        b_f16: false,
        epilogue: None,
    }
}

/// Tolerance: inputs in [-1, 1), a sum of K products in another order than the oracle's.
fn atol(k: usize) -> f32 {
    2e-5 * k.max(1) as f32
}

#[test]
fn slices_partition_k_in_multiples_of_the_k_step() {
    for k in [1u32, 15, 16, 17, 100, 1000, 8192, 50_257] {
        for s in 1..40 {
            let sp = Split::of(k, s);
            assert!(sp.slices >= 1 && sp.slices <= s, "k {k}, s {s}: {sp:?}");
            assert_eq!(sp.slice_k % BK, 0, "k {k}, s {s}: {sp:?}");
            // Every slice but the last is full and the last is not empty: they cover [0, K).
            assert!((sp.slices - 1) * sp.slice_k < k && sp.slices * sp.slice_k >= k);
        }
    }
    assert_eq!(
        Split::of(0, 5),
        Split {
            slices: 1,
            slice_k: 0
        }
    );
    // 100 in 7: slices of 16, the last 4 long.
    assert_eq!(
        Split::of(100, 7),
        Split {
            slices: 7,
            slice_k: 16
        }
    );
}

#[test]
fn the_rule_splits_loras_weight_gradients_and_nothing_of_full_training() {
    // GPT-2 124M, r = 8, B·T = 8192: dA_z = dp_zᵀ·x (8 × 768) and dB_z = d_zᵀ·h_z (768 × 8),
    // q and v as one grouped dispatch (nz = 2): 24 tiles, 10 slices of 832, 240 workgroups.
    let da = Dispatch {
        trans_a: true,
        ..dispatch(8, 768, 8192)
    };
    let db = Dispatch {
        trans_a: true,
        ..dispatch(768, 8, 8192)
    };
    for d in [da, db] {
        assert_eq!(rule_slices(&d, 2), 10);
        let sp = plan(GpuMatmul::Auto, &d, 2, 65_535, 1 << 25).unwrap();
        assert_eq!(
            sp,
            Split {
                slices: 10,
                slice_k: 832
            }
        );
    }
    // The forward h = s·x·Aᵀ (8192 × 8, K = 768) and dp (K = 768): 128 tiles each way, K short.
    assert_eq!(
        plan(GpuMatmul::Auto, &dispatch(8192, 8, 768), 2, 65_535, 1 << 25),
        None
    );
    // Full fine-tuning's smallest weight gradient, 768 × 768 with K = 8192: 144 tiles.
    assert_eq!(
        plan(
            GpuMatmul::Auto,
            &dispatch(768, 768, 8192),
            1,
            65_535,
            1 << 25
        ),
        None
    );
    // Too short a K for two slices of 256.
    assert_eq!(
        plan(GpuMatmul::Tune, &dispatch(8, 8, 511), 1, 65_535, 1 << 25),
        None
    );
    // Forcing it takes any shape, with two slices where K has two steps.
    let big = plan(
        GpuMatmul::SplitK,
        &dispatch(768, 768, 100),
        1,
        65_535,
        1 << 25,
    )
    .unwrap();
    assert_eq!(big.slices, 2);
    assert_eq!(plan(GpuMatmul::Tile64, &da, 2, 65_535, 1 << 25), None);
    assert_eq!(plan(GpuMatmul::Tile128, &da, 2, 65_535, 1 << 25), None);
}

#[test]
fn the_grid_and_the_binding_cap_the_slices() {
    let d = dispatch(8, 8, 1 << 20);
    // batch · S ≤ max_z: 3 entries on a grid of 10 give 3 slices.
    assert_eq!(plan(GpuMatmul::Auto, &d, 3, 10, 1 << 25).unwrap().slices, 3);
    // nz · S · M · N ≤ room: 64 floats per slice, 200 floats of room give 3.
    assert_eq!(plan(GpuMatmul::Auto, &d, 1, 65_535, 200).unwrap().slices, 3);
    // Not one slice's room: unsplit, even when forced.
    assert_eq!(plan(GpuMatmul::SplitK, &d, 1, 65_535, 63), None);
}

/// One whole-tensor problem: batch dims `lead`, op(A): (M, K), op(B): (K, N), B 2-D when
/// `shared`; `slices` forces the split (None: the rule of `Auto`).
#[derive(Clone, Debug)]
struct Case {
    lead: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    o: MatmulOpts,
    shared: bool,
    bias: bool,
    alpha: f32,
    slices: Option<u32>,
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
            alpha: 1.0,
            slices: None,
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
        (
            random(&sa, seed, device),
            random(&sb, seed + 1, device),
            self.bias.then(|| random(&[n], seed + 2, device)),
            random(&sc, seed + 3, device),
        )
    }

    /// `matmul_scaled` (α, bias) and `matmul_accumulate` on the GPU `g` against the f64
    /// oracle; returns the products that took the split-K path.
    fn check(&self, g: &Device, seed: u64) -> u64 {
        let what = format!("{self:?}");
        let (a, b, bias, c0) = self.tensors(seed, &Device::cpu());
        let (ga, gb, gbias, gc) = self.tensors(seed, g);
        let prod = reference::matmul_tensors(&a, &b, None, self.o)
            .unwrap()
            .to_vec()
            .unwrap();
        let bias_v = bias.map(|t| t.to_vec().unwrap());
        let want: Vec<f32> = prod
            .iter()
            .enumerate()
            .map(|(e, &p)| self.alpha * p + bias_v.as_ref().map_or(0.0, |b| b[e % self.n.max(1)]))
            .collect();
        let want_acc: Vec<f32> = c0
            .to_vec()
            .unwrap()
            .iter()
            .zip(&prod)
            .map(|(c, p)| c + p)
            .collect();
        let choice = if self.slices.is_some() {
            GpuMatmul::SplitK
        } else {
            GpuMatmul::Auto
        };
        let (got, split) = split_run(choice, self.slices, || {
            let got = matmul_scaled(&ga, &gb, gbias.as_ref(), self.o, self.alpha).unwrap();
            matmul_accumulate(&gc, &ga, &gb, self.o).unwrap();
            got
        });
        let tol = atol(self.k);
        assert_close_slices(&what, &got.to_vec().unwrap(), &want, tol, 1e-5);
        let acc = gc.to_vec().unwrap();
        assert_close_slices(&format!("accumulate {what}"), &acc, &want_acc, tol, 1e-5);
        split
    }
}

fn leads() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![Just(vec![]), Just(vec![3]), Just(vec![2, 2])]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn splitk_matches_f64_shapes(lead in leads(), m in 1usize..70, k in 0usize..600,
                                 n in 1usize..70, ta: bool, tb: bool, shared: bool, bias: bool,
                                 alpha in -2.0f32..2.0, slices in 1u32..9, seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        let case = Case { lead, shared, bias, alpha, slices: Some(slices),
                          ..Case::new(m, k, n, opts(ta, tb)) };
        // Both products (the scaled one and the accumulating one) took the split path.
        prop_assert!(case.check(&g, seed) >= 2, "{case:?}");
    }
}

#[test]
fn splitk_matches_f64_on_hostile_shapes_with_short_last_slices() {
    let Some(g) = gpu() else { return };
    // (M, K, N, slices): K of 100 in 7 (16 × 6 + 4), 1000 in 3 (336 + 336 + 328), more slices
    // than K steps, tiles cut by the edges, one row, one column.
    let shapes = [
        (17, 100, 5, 7),
        (5, 1000, 70, 3),
        (65, 33, 129, 9),
        (1, 257, 1, 4),
        (3, 2000, 5, 2),
        (7, 0, 9, 3),
    ];
    for (m, k, n, s) in shapes {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let case = Case {
                bias: true,
                alpha: 0.5,
                slices: Some(s),
                ..Case::new(m, k, n, opts(ta, tb))
            };
            // Two products, each cut by launch_2d where a side is not a multiple of 4.
            assert!(case.check(&g, 11) >= 2, "{case:?}");
        }
    }
}

#[test]
fn auto_takes_split_k_for_thin_products_only() {
    let Some(g) = gpu() else { return };
    // r × 70 with K = 1100: 2 tiles, 4 slices (288 · 3 + 236).
    let thin = Case {
        bias: true,
        alpha: 2.0,
        ..Case::new(5, 1100, 70, opts(true, false))
    };
    assert!(thin.check(&g, 1) >= 2);
    let batched = Case {
        lead: vec![2],
        ..Case::new(70, 600, 6, opts(true, false))
    };
    assert_eq!(batched.check(&g, 2), 2);
    // A short K, or an output of more than 128 tiles (one row of 130), is not split.
    assert_eq!(Case::new(5, 300, 70, opts(false, false)).check(&g, 3), 0);
    assert_eq!(
        Case::new(1, 520, 130 * 64, opts(false, true)).check(&g, 4),
        0
    );
    // 100 tiles with K = 600: two slices.
    assert!(Case::new(640, 600, 640, opts(false, true)).check(&g, 5) >= 2);
}

#[test]
fn splitk_matches_f64_through_views_with_leading_dimensions() {
    // C (rows, cols) = α·op(A)·op(B) (+ C) into a column block of a wider tensor, A and B read
    // from column blocks too: every leading dimension differs from the block's width.
    let Some(g) = gpu() else { return };
    // Sides that are multiples of 4, so that launch_2d keeps the product whole: one split
    // product (K = 300 in slices of 112, 112 and 76).
    let (m, k, n) = (12, 300, 8);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for accumulate in [false, true] {
            let o = opts(ta, tb);
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let (aw, bw, cw) = (ac + 5, bc + 3, n + 7);
            let (a0, b0, c0) = (2, 1, 4);
            let av = random_vec(ar * aw, 1);
            let bv = random_vec(br * bw, 2);
            let cv = random_vec(m * cw, 3);
            let block = |v: &[f32], w: usize, col0: usize, rows: usize, cols: usize| {
                let mut out = Vec::with_capacity(rows * cols);
                for r in 0..rows {
                    out.extend_from_slice(&v[r * w + col0..r * w + col0 + cols]);
                }
                out
            };
            let prod = reference::matmul(
                &widen(&block(&av, aw, a0, ar, ac)),
                &widen(&block(&bv, bw, b0, br, bc)),
                None,
                [1, m, k, n],
                o,
            );
            let alpha = -1.5f32;
            let mut want = cv.clone();
            for i in 0..m {
                for j in 0..n {
                    let old = if accumulate { cv[i * cw + c0 + j] } else { 0.0 };
                    want[i * cw + c0 + j] = old + alpha * prod[i * n + j] as f32;
                }
            }
            let ta_ = Tensor::from_vec(av, &[ar, aw], &g).unwrap();
            let tb_ = Tensor::from_vec(bv, &[br, bw], &g).unwrap();
            let tc = Tensor::from_vec(cv, &[m, cw], &g).unwrap();
            let ((), split) = split_run(GpuMatmul::SplitK, Some(3), || {
                matmul_into(
                    MatView::cols(&tc, c0, n),
                    MatView::cols(&ta_, a0, ac),
                    MatView::cols(&tb_, b0, bc),
                    o,
                    alpha,
                    accumulate,
                )
                .unwrap()
            });
            assert_eq!(split, 1);
            let what = format!("view {o:?}, accumulate {accumulate}");
            // The columns outside the block keep their values.
            assert_close_slices(&what, &tc.to_vec().unwrap(), &want, atol(k), 1e-5);
        }
    }
}

#[test]
fn splitk_matches_f64_for_loras_grouped_weight_gradients() {
    // dA_z = dp_zᵀ·x and dB_z = d_zᵀ·h_z for z ∈ {q, v}, laid out as the tape lays them out:
    // dp and h column blocks of one (rows, g·r) tensor, x shared, d_z column blocks of c_attn's
    // (rows, 3w) gradient at 0 and 2w, the outputs views of one allocation. One batched
    // dispatch pair each, under the rule (rows = 1100) and forced with a short last slice.
    let Some(g) = gpu() else { return };
    let (gz, rows, n_in, r, w) = (2usize, 1100usize, 20usize, 4usize, 24usize);
    let dp_h = Tensor::from_vec(random_vec(rows * gz * r, 5), &[rows, gz * r], &g).unwrap();
    let x = Tensor::from_vec(random_vec(rows * n_in, 6), &[rows, n_in], &g).unwrap();
    let d = Tensor::from_vec(random_vec(rows * 3 * w, 7), &[rows, 3 * w], &g).unwrap();
    let host = |t: &Tensor, col0: usize, cols: usize| {
        let (v, width) = (t.to_vec().unwrap(), t.shape()[1]);
        let mut out = Vec::new();
        for row in v.chunks(width) {
            out.extend_from_slice(&row[col0..col0 + cols]);
        }
        widen(&out)
    };
    let ta = opts(true, false);
    for slices in [None, Some(7)] {
        let choice = slices.map_or(GpuMatmul::Auto, |_| GpuMatmul::SplitK);
        // dA_z (r, in).
        let da = group_outputs(gz, &[r, n_in], &g).unwrap();
        let c: Vec<MatView> = da.iter().map(MatView::all).collect();
        let a: Vec<MatView> = (0..gz).map(|z| MatView::cols(&dp_h, z * r, r)).collect();
        let ((), split) = split_run(choice, slices, || {
            matmul_into_group(&c, &a, &[MatView::all(&x)], ta, 1.0, false).unwrap()
        });
        assert_eq!(split, 1, "dA, {slices:?}: one batched split product");
        for (z, da_z) in da.iter().enumerate() {
            let want = reference::matmul(
                &host(&dp_h, z * r, r),
                &host(&x, 0, n_in),
                None,
                [1, r, rows, n_in],
                ta,
            );
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            let what = format!("dA_{z}, {slices:?}");
            assert_close_slices(&what, &da_z.to_vec().unwrap(), &want, atol(rows), 1e-5);
        }
        // dB_z (w, r), accumulating into a starting value.
        let db = group_outputs(gz, &[w, r], &g).unwrap();
        let start: Vec<Vec<f32>> = (0..gz).map(|z| random_vec(w * r, 20 + z as u64)).collect();
        for (t, s) in db.iter().zip(&start) {
            t.copy_from(&Tensor::from_vec(s.clone(), &[w, r], &g).unwrap())
                .unwrap();
        }
        let c: Vec<MatView> = db.iter().map(MatView::all).collect();
        let a: Vec<MatView> = (0..gz).map(|z| MatView::cols(&d, 2 * w * z, w)).collect();
        let b: Vec<MatView> = (0..gz).map(|z| MatView::cols(&dp_h, z * r, r)).collect();
        let ((), split) = split_run(choice, slices, || {
            matmul_into_group(&c, &a, &b, ta, 0.25, true).unwrap()
        });
        assert_eq!(split, 1, "dB, {slices:?}: one batched split product");
        for (z, (db_z, start_z)) in db.iter().zip(&start).enumerate() {
            let p = reference::matmul(
                &host(&d, 2 * w * z, w),
                &host(&dp_h, z * r, r),
                None,
                [1, w, rows, r],
                ta,
            );
            let want: Vec<f32> = p
                .iter()
                .zip(start_z)
                .map(|(&p, &s)| s + 0.25 * p as f32)
                .collect();
            let what = format!("dB_{z}, {slices:?}");
            assert_close_slices(&what, &db_z.to_vec().unwrap(), &want, atol(rows), 1e-5);
        }
    }
}

#[test]
fn splitk_matches_f64_with_split_bindings() {
    // A binding of 4 KiB holds under 1024 floats: operands cut along M, N and K by launch_2d,
    // each sub-block split along K again (K chunks after the first accumulate), batched
    // entries over several dispatches; an output block with no room for one slice's scratch
    // runs unsplit.
    let Some(_) = gpu() else { return };
    let g = gpu_with_binding_limit(4096);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let o = opts(ta, tb);
        let cases = [
            Case {
                bias: true,
                ..Case::new(70, 50, 60, o)
            },
            Case::new(3, 1500, 4, o),
            Case {
                lead: vec![20],
                bias: true,
                ..Case::new(9, 40, 7, o)
            },
            Case {
                lead: vec![2],
                shared: true,
                ..Case::new(33, 40, 20, o)
            },
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let case = Case {
                slices: Some(3),
                alpha: 0.75,
                ..case
            };
            let split = case.check(&g, i as u64);
            assert!(split >= 2, "{case:?}: {split} split products");
        }
    }
}
