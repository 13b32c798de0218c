//! The grouped-product checks, over the cases and layouts of `matmul_group_tests.rs`.

use super::*;

#[test]
fn lora_products_are_one_dispatch_each_and_match_f64() {
    let cases = lora_cases();
    for (i, case) in cases.iter().enumerate() {
        case.check(i as u64, &Device::cpu(), false);
    }
    let Some((g, _lock)) = counting_gpu() else {
        return;
    };
    for (i, case) in cases.iter().enumerate() {
        case.check(i as u64, &g, true);
    }
}

#[test]
fn every_transpose_case_and_layout_matches_f64_and_cpu() {
    use Layout::*;
    let layouts = [
        [Shared, Columns { gap: 3 }, Columns { gap: 1 }],
        [
            Columns { gap: 0 },
            Shared,
            Slots {
                gap: 5,
                reversed: false,
            },
        ],
        [
            Slots {
                gap: 0,
                reversed: true,
            },
            Shared,
            Slots {
                gap: 2,
                reversed: true,
            },
        ],
        // Falling back: separate buffers, irregular steps, steps of opposite signs.
        [Separate, Shared, Columns { gap: 0 }],
        [Shared, Columns { gap: 0 }, Ragged],
        [
            Slots {
                gap: 1,
                reversed: true,
            },
            Slots {
                gap: 1,
                reversed: false,
            },
            Separate,
        ],
        [
            Slots {
                gap: 1,
                reversed: true,
            },
            Columns { gap: 1 },
            Columns { gap: 0 },
        ],
    ];
    let gpu = counting_gpu();
    for (i, layouts) in layouts.into_iter().enumerate() {
        for o in TRANSPOSES {
            for accumulate in [false, true] {
                // Odd sizes are the proptest's; these are one dispatch per product.
                let case = GroupCase {
                    g: 3,
                    m: 3,
                    k: 8,
                    n: 12,
                    o,
                    alpha: -1.5,
                    accumulate,
                    layouts,
                };
                let seed = i as u64 * 100;
                let cpu = case.check(seed, &Device::cpu(), false);
                if let Some((g, _)) = &gpu {
                    // Opposite signs are not one step: one dispatch per product.
                    let mixed = i == 6;
                    let got = if mixed {
                        let ops = case.operands(seed, g);
                        assert_eq!(case.run(&ops), 3, "{case:?}");
                        (0..3).map(|z| ops[2].block(z)).collect()
                    } else {
                        case.check(seed, g, true)
                    };
                    for z in 0..3 {
                        assert_close_slices(
                            &format!("{case:?} GPU vs CPU"),
                            &got[z],
                            &cpu[z],
                            1e-4,
                            1e-5,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_tiled_kernel_takes_aligned_groups_and_leaves_the_others() {
    // M, N ≥ 128 so that the rule would pick it; `forced` makes it take every fitting dispatch.
    let Some((g, _lock)) = counting_gpu() else {
        return;
    };
    use Layout::*;
    for o in TRANSPOSES {
        // Offsets, strides and leading dimensions multiples of 4: the tiled kernel, in one go.
        let aligned = GroupCase {
            g: 2,
            m: 132,
            k: 12,
            n: 136,
            o,
            alpha: 0.75,
            accumulate: true,
            layouts: [
                Shared,
                Slots {
                    gap: 4,
                    reversed: false,
                },
                Columns { gap: 4 },
            ],
        };
        let ((), tiled) = forced(GpuMatmul::Tile128, || {
            aligned.check(1, &g, true);
        });
        assert_eq!(tiled, 1, "{aligned:?}");
        // A C stride of 137 columns is not whole vec4s: the first kernel, still one dispatch.
        let odd = GroupCase {
            layouts: [
                Shared,
                Slots {
                    gap: 4,
                    reversed: false,
                },
                Columns { gap: 1 },
            ],
            ..aligned.clone()
        };
        let ((), tiled) = forced(GpuMatmul::Tile128, || {
            odd.check(2, &g, true);
        });
        assert_eq!(tiled, 0, "{odd:?}");
    }
}

#[test]
fn groups_larger_than_a_binding_are_cut() {
    // 4 KiB bindings: the group's range of each operand does not fit one, a product's does
    // (cut into several batched dispatches) or does not (split per product).
    let Some(_) = gpu() else { return };
    let g = gpu_with_binding_limit(4096);
    use Layout::*;
    for (m, k, n) in [(9, 8, 7), (40, 30, 20)] {
        for o in [opts(false, true), opts(true, false)] {
            let case = GroupCase {
                g: 20,
                m,
                k,
                n,
                o,
                alpha: 1.0,
                accumulate: true,
                layouts: [
                    Slots {
                        gap: 3,
                        reversed: false,
                    },
                    Shared,
                    Slots {
                        gap: 0,
                        reversed: false,
                    },
                ],
            };
            let cpu = case.check(3, &Device::cpu(), false);
            let ops = case.operands(3, &g);
            let dispatches = case.run(&ops);
            assert!(dispatches > 1, "{case:?}: {dispatches} dispatches");
            for (z, want) in cpu.iter().enumerate() {
                assert_close_slices(&format!("{case:?}"), &ops[2].block(z), want, 1e-4, 1e-5);
            }
        }
    }
}

#[test]
fn identical_c_views_take_the_sum() {
    // dx = Σ_z dp_z·A_z (+ dx): one C view for the group, on both devices.
    let (rows, r, n_in, g) = (6, 3, 5, 3);
    for device in [Some(Device::cpu()), gpu()].into_iter().flatten() {
        for accumulate in [false, true] {
            let dp =
                Tensor::from_vec(random_vec(rows * g * r, 1), &[rows, g * r], &device).unwrap();
            let a: Vec<Tensor> = (0..g)
                .map(|z| {
                    Tensor::from_vec(random_vec(r * n_in, 2 + z as u64), &[r, n_in], &device)
                        .unwrap()
                })
                .collect();
            let c0 = random_vec(rows * n_in, 9);
            let c = Tensor::from_vec(c0.clone(), &[rows, n_in], &device).unwrap();
            let dpv: Vec<MatView> = (0..g).map(|z| MatView::cols(&dp, z * r, r)).collect();
            let av: Vec<MatView> = a.iter().map(MatView::all).collect();
            matmul_into_group(
                &[MatView::all(&c)],
                &dpv,
                &av,
                MatmulOpts::default(),
                2.0,
                accumulate,
            )
            .unwrap();
            let mut want: Vec<f64> = if accumulate {
                widen(&c0)
            } else {
                vec![0.0; rows * n_in]
            };
            let dpd = dp.to_vec().unwrap();
            for (z, az) in a.iter().enumerate() {
                let dpz: Vec<f32> = dpd
                    .chunks(g * r)
                    .flat_map(|row| row[z * r..(z + 1) * r].to_vec())
                    .collect();
                let p = reference::matmul(
                    &widen(&dpz),
                    &widen(&az.to_vec().unwrap()),
                    None,
                    [1, rows, r, n_in],
                    MatmulOpts::default(),
                );
                for (w, p) in want.iter_mut().zip(p) {
                    *w += 2.0 * p;
                }
            }
            let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
            assert_close_slices(
                &format!("sum on {device:?}"),
                &c.to_vec().unwrap(),
                &want,
                1e-4,
                1e-5,
            );
        }
    }
}

#[test]
fn group_outputs_are_one_allocation_on_a_gpu() {
    let Some(g) = gpu() else { return };
    let outs = group_outputs(3, &[2, 5], &g).unwrap();
    let (root, base) = outs[0].arena().unwrap();
    for (z, t) in outs.iter().enumerate() {
        assert_eq!(t.shape(), [2, 5]);
        assert_eq!(t.offset_in(&root), Some(base + 10 * z));
    }
    assert_eq!(group_outputs(2, &[4], &Device::cpu()).unwrap().len(), 2);
}

#[test]
fn group_errors_are_clear() {
    let cpu = Device::cpu();
    let z = |s: &[usize]| Tensor::zeros(s, &cpu).unwrap();
    let (a, b, c, wide) = (z(&[4, 3]), z(&[3, 5]), z(&[4, 5]), z(&[4, 12]));
    let b2 = z(&[2, 5]);
    let o = MatmulOpts::default();
    let all = MatView::all;
    let err = |c: &[MatView], a: &[MatView], b: &[MatView]| {
        matmul_into_group(c, a, b, o, 1.0, false)
            .unwrap_err()
            .to_string()
    };
    // Products of different shapes.
    let e = err(
        &[all(&c), all(&c)],
        &[all(&a), MatView::cols(&a, 0, 2)],
        &[all(&b), all(&b2)],
    );
    assert!(
        e.contains("(M, K, N) = (4, 3, 5)") && e.contains("(4, 2, 5)"),
        "{e}"
    );
    // An empty group is nothing to do.
    matmul_into_group(&[], &[], &[], o, 1.0, false).unwrap();
    // Slices of neither 1 nor g views.
    let e = err(
        &[all(&c), all(&c), all(&c)],
        &[all(&a), all(&a)],
        &[all(&b)],
    );
    assert!(e.contains("1 or g = 3 A views") && e.contains('2'), "{e}");
    // C views that partly overlap.
    let e = err(
        &[MatView::cols(&wide, 0, 5), MatView::cols(&wide, 3, 5)],
        &[all(&a)],
        &[all(&b)],
    );
    assert!(
        e.contains("partly overlapping") && e.contains("views 0 and 1"),
        "{e}"
    );
    // C in A's storage.
    let e = err(
        &[MatView::cols(&wide, 0, 5)],
        &[MatView::cols(&wide, 6, 3)],
        &[all(&b)],
    );
    assert!(e.contains("must not share storage"), "{e}");
}

#[test]
fn overlap_is_exact() {
    // Two (3, 2) views of ld 5 at starts 0 and δ: they share an element when δ = 5·di + dj
    // with di < 3 and |dj| < 2.
    let cpu = Device::cpu();
    let t = Tensor::zeros(&[4, 5], &cpu).unwrap();
    let place = |start| Place {
        root: t.clone(),
        start,
        ld: 5,
        rows: 3,
        cols: 2,
    };
    for delta in 0..20usize {
        let brute = (0..3).any(|i| {
            (0..2).any(|j| (0..3).any(|i2| (0..2).any(|j2| i * 5 + j == delta + i2 * 5 + j2)))
        });
        assert_eq!(place(0).overlaps(&place(delta)), brute, "δ = {delta}");
    }
}

fn layouts_a_b() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::Separate),
        Just(Layout::Shared),
        (0usize..3).prop_map(|gap| Layout::Columns { gap }),
        Just(Layout::Ragged),
        (0usize..3, any::<bool>()).prop_map(|(gap, reversed)| Layout::Slots { gap, reversed }),
    ]
}

fn layouts_c() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::Separate),
        (0usize..3).prop_map(|gap| Layout::Columns { gap }),
        Just(Layout::Ragged),
        (0usize..3).prop_map(|gap| Layout::Slots {
            gap,
            reversed: false
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn grouped_products_match_f64_and_cpu(g in 1usize..4, m in 1usize..20, k in 1usize..20,
                                          n in 1usize..20, ta: bool, tb: bool, alpha in -2.0f32..2.0,
                                          accumulate: bool, la in layouts_a_b(), lb in layouts_a_b(),
                                          lc in layouts_c(), seed in 0u64..1000) {
        // Reversed slots beside forward steps are not one step: leave them out of the count.
        let reversed = |l: Layout| matches!(l, Layout::Slots { reversed: true, .. });
        let forward = |l: Layout| matches!(l, Layout::Columns { .. } | Layout::Slots { reversed: false, .. });
        let mixed = [la, lb, lc].iter().any(|&l| reversed(l)) && [la, lb, lc].iter().any(|&l| forward(l));
        let case = GroupCase { g, m, k, n, o: opts(ta, tb), alpha, accumulate, layouts: [la, lb, lc] };
        let cpu = case.check(seed, &Device::cpu(), false);
        if let Some((gd, _lock)) = counting_gpu() {
            let got = case.check(seed, &gd, !mixed);
            for z in 0..g {
                assert_close_slices(&format!("{case:?} GPU vs CPU"), &got[z], &cpu[z], 1e-4, 1e-5);
            }
        }
    }
}

/// `matmul_into` on each product gives the group's numbers bit for bit on the GPU: the same
/// kernel and order of sums, one dispatch or g (K a multiple of 4: not cut in chunks, which
/// would sum in another order; M cut is the same sums).
#[test]
fn one_dispatch_and_a_loop_agree_to_the_bit() {
    let Some(g) = gpu() else { return };
    use Layout::*;
    let case = GroupCase {
        g: 3,
        m: 33,
        k: 16,
        n: 12,
        o: opts(false, true),
        alpha: 0.3,
        accumulate: true,
        layouts: [
            Shared,
            Slots {
                gap: 2,
                reversed: false,
            },
            Columns { gap: 0 },
        ],
    };
    let grouped = case.operands(4, &g);
    case.run(&grouped);
    let looped = case.operands(4, &g);
    let [a, b, c] = &looped;
    let (av, bv, cv) = (a.mat_views(), b.mat_views(), c.mat_views());
    for z in 0..3 {
        matmul_into(cv[z], av[0], bv[z], case.o, case.alpha, true).unwrap();
    }
    for z in 0..3 {
        assert_eq!(grouped[2].block(z), looped[2].block(z), "product {z}");
    }
}
