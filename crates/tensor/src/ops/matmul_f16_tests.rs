//! The f16-weight product against the f32 product with the rounded weight, on both backends and
//! through both GPU kernels; rounding and refusal of what f16 cannot hold.

use super::*;
use crate::ops::matmul::{MatmulOpts, matmul};
use crate::ops::matmul_tiled::{self, GpuMatmul};
use crate::testing::{assert_close, gpu, gpu_with_binding_limit, random_vec};

/// X·op(W) [+ b] with W in f16 against the f32 product with W's rounded values.
fn check(device: &Device, [m, k, n]: [usize; 3], trans_w: bool, bias: bool) {
    let stored = if trans_w { [n, k] } else { [k, n] };
    let values: Vec<f32> = random_vec(k * n, 11).iter().map(|v| v * 0.3).collect();
    let w = F16Tensor::from_f32("w", &values, &stored, device).unwrap();
    let x = Tensor::from_vec(random_vec(m * k, 12), &[m, k], device).unwrap();
    let b = Tensor::from_vec(random_vec(n, 13), &[n], device).unwrap();
    let b = bias.then_some(&b);
    let got = matmul_f16(&x, &w, b, trans_w).unwrap();
    let rounded = Tensor::from_vec(w.to_f32().unwrap(), &stored, device).unwrap();
    let opts = MatmulOpts {
        trans_b: trans_w,
        ..Default::default()
    };
    let want = matmul(&x, &rounded, b, opts).unwrap();
    let what = format!("{m}x{k}x{n} trans_w {trans_w} bias {bias}");
    assert_close(&what, &got, &want, 1e-5, 1e-5);
}

fn shapes(device: &Device) {
    for trans_w in [false, true] {
        // Tiles cut on every side, an odd number of elements (a spare half in the last word).
        check(device, [5, 70, 101], trans_w, true);
        check(device, [130, 9, 7], trans_w, false);
        check(device, [3, 300, 65], trans_w, true);
        // Whole vec4s and full 128-tiles: the tiled kernel's shapes.
        check(device, [136, 64, 256], trans_w, true);
    }
}
crate::on_devices!(shapes, shapes_cpu, shapes_gpu);

/// Each GPU kernel reads f16 pairs: the first kernel forced, and the tiled one forced (and
/// counted), in both transposes.
#[test]
fn both_gpu_kernels_read_halves() {
    let Some(g) = gpu() else { return };
    for trans_w in [false, true] {
        let ((), tiled) = matmul_tiled::tests::forced(GpuMatmul::Tile64, || {
            check(&g, [136, 64, 256], trans_w, true)
        });
        assert_eq!(tiled, 0);
        let ((), tiled) = matmul_tiled::tests::forced(GpuMatmul::Tile128, || {
            check(&g, [136, 64, 256], trans_w, true);
            check(&g, [128, 8, 132], trans_w, false);
        });
        // Each check runs the f16 product and its f32 reference: all four took the tiled kernel.
        assert_eq!(
            tiled, 4,
            "trans_w {trans_w}: the f16 products took the tiled kernel"
        );
    }
}

/// X and Y larger than one binding are cut into row chunks; W is bound whole.
#[test]
fn rows_are_cut_to_fit_the_bindings() {
    let Some(_) = gpu() else { return };
    let small = gpu_with_binding_limit(64 * 1024);
    for trans_w in [false, true] {
        check(&small, [300, 100, 96], trans_w, true);
    }
    // A weight over one binding is refused with the limit it exceeds.
    let w = F16Tensor::from_f32("big", &vec![0.5; 200 * 400], &[200, 400], &small).unwrap();
    let x = Tensor::from_vec(vec![1.0; 2 * 200], &[2, 200], &small).unwrap();
    let err = matmul_f16(&x, &w, None, false).unwrap_err().to_string();
    assert!(err.contains("max_storage_buffer_binding_size"), "{err}");
}

#[test]
fn weights_round_to_the_nearest_half_ties_to_even() {
    let device = Device::cpu();
    // 1 + 2⁻¹¹ lies halfway between 1 and 1 + 2⁻¹⁰ (f16's spacing above 1): the tie goes to
    // the even 1. 1 + 3·2⁻¹¹ lies halfway between 1 + 2⁻¹⁰ and 1 + 2·2⁻¹⁰: it goes up, to even.
    let tie_low = 1.0 + 2f32.powi(-11);
    let tie_high = 1.0 + 3.0 * 2f32.powi(-11);
    let values = [tie_low, tie_high, -2.5, 65504.0, 1e-7, 0.1];
    let w = F16Tensor::from_f32("w", &values, &[2, 3], &device).unwrap();
    let back = w.to_f32().unwrap();
    assert_eq!(back[0], 1.0);
    assert_eq!(back[1], 1.0 + 2.0 * 2f32.powi(-10));
    assert_eq!(back[2], -2.5);
    assert_eq!(back[3], 65504.0);
    // A subnormal half: 1e-7 is about 1.68 units of 2⁻²⁴.
    assert_eq!(back[4], 2.0 * 2f32.powi(-24));
    assert!((back[5] - 0.1).abs() <= 0.1 * 2f32.powi(-11));
    assert_eq!(w.shape(), [2, 3]);
    // 6 halves padded to 8: four words.
    assert_eq!(w.bytes(), 16);
}

#[test]
fn values_f16_cannot_hold_are_refused_by_place() {
    let device = Device::cpu();
    let err = F16Tensor::from_f32(
        "h.0.mlp.c_fc.weight",
        &[0.0, 1.0, 7e4, 0.0],
        &[2, 2],
        &device,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("h.0.mlp.c_fc.weight")
            && err.contains("row 1, column 0")
            && err.contains("70000"),
        "{err}"
    );
    assert!(F16Tensor::from_f32("w", &[f32::NAN], &[1, 1], &device).is_err());
    let err = F16Tensor::from_f32("w", &[1.0; 5], &[2, 3], &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("6 values for shape [2, 3]"), "{err}");
}

#[test]
fn mismatched_shapes_are_refused_naming_both() {
    let device = Device::cpu();
    let w = F16Tensor::from_f32("w", &[0.5; 12], &[3, 4], &device).unwrap();
    let x = Tensor::from_vec(vec![1.0; 8], &[2, 4], &device).unwrap();
    let err = matmul_f16(&x, &w, None, false).unwrap_err().to_string();
    assert!(err.contains("X (M, 3)") && err.contains("[2, 4]"), "{err}");
    assert!(matmul_f16(&x, &w, None, true).is_ok());
    let b = Tensor::from_vec(vec![0.0; 4], &[4], &device).unwrap();
    let err = matmul_f16(&x, &w, Some(&b), true).unwrap_err().to_string();
    assert!(err.contains("bias of shape [3]"), "{err}");
}

/// `C += X·op(W)` against C plus the product, on both backends.
fn accumulates(device: &Device) {
    for trans_w in [false, true] {
        let (m, k, n) = (70, 36, 44);
        let stored = if trans_w { [n, k] } else { [k, n] };
        let w = F16Tensor::from_f32("w", &random_vec(k * n, 21), &stored, device).unwrap();
        let x = Tensor::from_vec(random_vec(m * k, 22), &[m, k], device).unwrap();
        let c0 = random_vec(m * n, 23);
        let c = Tensor::from_vec(c0.clone(), &[m, n], device).unwrap();
        matmul_f16_accumulate(&c, &x, &w, trans_w).unwrap();
        let y = matmul_f16(&x, &w, None, trans_w).unwrap().to_vec().unwrap();
        let want: Vec<f32> = c0.iter().zip(&y).map(|(a, b)| a + b).collect();
        let want = Tensor::from_vec(want, &[m, n], device).unwrap();
        assert_close("C += X·op(W)", &c, &want, 1e-5, 1e-5);
        let wrong = Tensor::zeros(&[m, n + 1], device).unwrap();
        assert!(matmul_f16_accumulate(&wrong, &x, &w, trans_w).is_err());
    }
}
crate::on_devices!(accumulates, accumulates_cpu, accumulates_gpu);

/// The kernels widen every kind of half exactly (normal, subnormal, zero, the largest): X = I
/// gives W's rounded values back exactly, through both kernels (compared as floats: a product's
/// sum starts at +0, so −0 comes back as +0).
#[test]
fn halves_widen_exactly_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let k = 8;
    let values = [
        1.0 + 2f32.powi(-10),
        -2.5,
        65504.0,
        -65504.0,
        1e-7,
        -3e-6,
        -0.0,
        0.0,
        6.1e-5,
        0.1,
        -1.0 / 3.0,
        1024.5,
    ];
    let n = 16;
    let mut w = vec![0.0f32; k * n];
    for (i, v) in w.iter_mut().enumerate() {
        *v = values[i % values.len()]
            * if (i / values.len()).is_multiple_of(2) {
                1.0
            } else {
                -1.0
            };
    }
    let eye: Vec<f32> = (0..k * k)
        .map(|i| f32::from(u8::from(i / k == i % k)))
        .collect();
    for kernel in [GpuMatmul::Tile64, GpuMatmul::Tile128] {
        let wt = F16Tensor::from_f32("w", &w, &[k, n], &g).unwrap();
        let x = Tensor::from_vec(eye.clone(), &[k, k], &g).unwrap();
        let (y, _) = matmul_tiled::tests::forced(kernel, || matmul_f16(&x, &wt, None, false));
        assert_eq!(
            y.unwrap().to_vec().unwrap(),
            wt.to_f32().unwrap(),
            "{kernel:?}"
        );
    }
}

/// A thin product with a long K takes the split-K pair, whose partial pass reads the halves
/// too: the rule's choice, and split-K forced.
#[test]
fn the_split_k_path_reads_halves() {
    let Some(g) = gpu() else { return };
    let split = || crate::ops::matmul::splitk::tests::SPLIT.with(std::cell::Cell::get);
    for kernel in [GpuMatmul::Auto, GpuMatmul::SplitK] {
        for trans_w in [false, true] {
            let before = split();
            matmul_tiled::tests::forced(kernel, || check(&g, [8, 1024, 72], trans_w, true));
            // The f16 product and its f32 reference each split.
            assert_eq!(split() - before, 2, "{kernel:?} trans_w {trans_w}");
        }
    }
}
