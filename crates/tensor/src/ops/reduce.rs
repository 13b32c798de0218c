//! Reductions: `sum` and `mean` over one axis, `sum_all` over every element.
//!
//! Math: x is viewed as (outer, A, inner) around `axis` (outer = product of the dims before it,
//! inner = product of the dims after it); the output has shape (outer, inner), i.e. x's shape with
//! the axis removed (a 1-D input gives shape `[1]`).
//! - `sum(x, axis)[o, i]  = Σ_a x[o, a, i]`           backward: dx[o, a, i] = dy[o, i] (broadcast over a)
//! - `mean(x, axis)[o, i] = (1/A) Σ_a x[o, a, i]`     backward: dx[o, a, i] = dy[o, i] / A
//! - `sum_all(x)          = Σ x`, shape `[1]`         backward: `dx = dy[0]` everywhere
//! - `sum_all_scaled(x, α) = α · Σ x`, shape `[1]`    backward: `dx = α·dy[0]` everywhere;
//!   the sum rounded to f32, then times α in f32: bit for bit `scale(&sum_all(x)?, α)` on either
//!   device, in one op (on the GPU the last pass applies α: one dispatch fewer). The mean loss
//!   `(1/Σw)·Σ_n l_n` of the cross-entropies is one.
//!
//! The bias gradient of `add_bias` is `sum(dy, 0)` with dy: (N, C).
//!
//! Kernel: `shaders/reduce.wgsl`, workgroup-memory tree reductions. The axis is cut into items
//! of `rows` rows; each workgroup sums one item for up to 64 columns and writes a partial sum, and
//! the pass is repeated on the partials until one item is left (two passes for the bias gradient
//! of (8192, 768) and for `sum_all` over 40M elements). Every addition happens in an order fixed by
//! the shape and the device's binding limit, so results are deterministic. The CPU path adds
//! in f64 and rounds once.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::{Device, Error, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `reduce.wgsl`.
    struct Params {
        a: u32,
        inner: u32,
        groups: u32,
        rows: u32,
        w: u32,
        lanes: u32,
        tiles: u32,
        k0: u32,
        items: u32,
        x_base: u32,
        off_x: u32,
        off_out: u32,
        alpha: f32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

const KERNEL: Kernel = Kernel {
    shader: "reduce",
    source: shaders::REDUCE,
    entry: "reduce_sum",
};

/// Invocations per workgroup (the WGSL `@workgroup_size`).
const WORKGROUP: usize = 256;
/// Rows of the axis that one invocation adds sequentially in a pass, before the tree.
const PER_INVOCATION: usize = 32;

/// (outer, A, inner) of `x` around `axis`, and the output shape.
fn split_axis(
    op: &'static str,
    x: &Tensor,
    axis: usize,
) -> Result<(usize, usize, usize, Vec<usize>)> {
    let shape = x.shape();
    if axis >= shape.len() {
        return shape_err(
            op,
            format!("an axis below the rank {} of the input", shape.len()),
            format!("axis {axis} of shape {shape:?}"),
        );
    }
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    let mut out_shape: Vec<usize> = shape
        .iter()
        .enumerate()
        .filter(|&(d, _)| d != axis)
        .map(|(_, &n)| n)
        .collect();
    if out_shape.is_empty() {
        out_shape.push(1);
    }
    Ok((outer, shape[axis], inner, out_shape))
}

/// CPU path: `out[o, i] = alpha · Σ_a x[o, a, i]`, accumulated in f64.
fn reduce_cpu(x: &[f32], outer: usize, a: usize, inner: usize, alpha: f64) -> Vec<f32> {
    let mut out = vec![0.0; outer * inner];
    crate::cpu::for_rows(&mut out, inner, |o, row| {
        let block = &x[o * a * inner..(o + 1) * a * inner];
        if inner == 1 {
            row[0] = (block.iter().map(|&v| v as f64).sum::<f64>() * alpha) as f32;
            return;
        }
        let mut acc = vec![0.0f64; inner];
        for src in block.chunks_exact(inner) {
            for (s, &v) in acc.iter_mut().zip(src) {
                *s += v as f64;
            }
        }
        for (y, s) in row.iter_mut().zip(acc) {
            *y = (s * alpha) as f32;
        }
    });
    out
}

/// GPU: passes of `reduce_sum` until the axis is reduced to one item; the last pass writes
/// `out_shape` scaled by `alpha`.
fn reduce_gpu(
    ctx: &Arc<GpuContext>,
    x: &Tensor,
    (outer, mut a, inner): (usize, usize, usize),
    alpha: f32,
    out_shape: &[usize],
) -> Result<Tensor> {
    if x.numel() > u32::MAX as usize {
        return Err(Error::Limit {
            limit: "elements addressable by a u32 index",
            needed: x.numel() as u64,
            available: u32::MAX as u64,
        });
    }
    let w = inner.next_power_of_two().min(64);
    let lanes = WORKGROUP / w;
    let tiles = inner.div_ceil(w);
    let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
    let room = (ctx.max_binding_bytes().saturating_sub(align) / 4) as usize;
    let fit = room / inner;
    if fit == 0 {
        return Err(Error::Limit {
            limit: "max_storage_buffer_binding_size",
            needed: inner as u64 * 4 + align,
            available: ctx.max_binding_bytes(),
        });
    }
    let mut cur = x.clone();
    loop {
        let rows = (lanes * PER_INVOCATION).min(fit).min(a);
        let groups = a.div_ceil(rows);
        let last = groups == 1;
        let out = if last {
            Tensor::gpu_uninit(ctx, out_shape)?
        } else {
            Tensor::gpu_uninit(ctx, &[outer, groups, inner])?
        };
        // First element of item k; item_start(outer · groups) is the end of the input.
        let item_start = |k: usize| ((k / groups) * a + (k % groups) * rows) * inner;
        for (k0, items) in ctx.row_chunks(outer * groups, &[rows * inner, inner])? {
            if items == 0 {
                continue;
            }
            let start = item_start(k0);
            let xv = ctx.view(&cur, start, item_start(k0 + items) - start)?;
            let ov = ctx.view(&out, k0 * inner, items * inner)?;
            let params = Params {
                a: a as u32,
                inner: inner as u32,
                groups: groups as u32,
                rows: rows as u32,
                w: w as u32,
                lanes: lanes as u32,
                tiles: tiles as u32,
                k0: k0 as u32,
                items: items as u32,
                x_base: start as u32,
                off_x: xv.offset,
                off_out: ov.offset,
                alpha: if last { alpha } else { 1.0 },
                ..Zeroable::zeroed()
            };
            let grid = grid_2d(
                items * tiles * WORKGROUP,
                WORKGROUP as u32,
                ctx.limits.max_compute_workgroups_per_dimension,
            );
            ctx.dispatch(
                KERNEL,
                bytemuck::bytes_of(&params),
                &[(1, xv.binding), (2, ov.binding)],
                grid,
            )?;
        }
        if last {
            return Ok(out);
        }
        cur = out;
        a = groups;
    }
}

/// `alpha · Σ_a x[o, a, i]` on x's device.
fn reduce(
    x: &Tensor,
    dims: (usize, usize, usize),
    mean: bool,
    out_shape: &[usize],
) -> Result<Tensor> {
    let (outer, a, inner) = dims;
    let device = x.device();
    if a == 0 {
        // An empty sum is 0; an empty mean is 0/0 (NaN, as in torch).
        return Tensor::full(out_shape, if mean { f32::NAN } else { 0.0 }, &device);
    }
    if outer * inner == 0 {
        return Tensor::uninit(out_shape, &device);
    }
    let alpha = if mean { 1.0 / a as f64 } else { 1.0 };
    match device {
        Device::Cpu(ctx) => {
            let out = reduce_cpu(&x.cpu_data()?, outer, a, inner, alpha);
            Ok(Tensor::cpu_from(&ctx, out, out_shape))
        }
        Device::Gpu(ctx) => reduce_gpu(&ctx, x, dims, alpha as f32, out_shape),
    }
}

/// `Σ_a x[o, a, i]` over `axis`: x's shape with the axis removed (`[1]` for a 1-D x).
pub fn sum(x: &Tensor, axis: usize) -> Result<Tensor> {
    let _profile = crate::profile::scope("reduce");
    let (outer, a, inner, shape) = split_axis("sum", x, axis)?;
    reduce(x, (outer, a, inner), false, &shape)
}

/// `(1/A) Σ_a x[o, a, i]` over `axis`: x's shape with the axis removed (`[1]` for a 1-D x).
pub fn mean(x: &Tensor, axis: usize) -> Result<Tensor> {
    let _profile = crate::profile::scope("reduce");
    let (outer, a, inner, shape) = split_axis("mean", x, axis)?;
    reduce(x, (outer, a, inner), true, &shape)
}

/// The sum of every element, shape `[1]`.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("reduce");
    reduce(x, (1, x.numel(), 1), false, &[1])
}

/// `α · Σ x`, shape `[1]`: [`sum_all`] and a scale by α in one op, bit for bit
/// `scale(&sum_all(x)?, α)` (the sum rounded to f32 first, on either device; module doc).
pub fn sum_all_scaled(x: &Tensor, alpha: f32) -> Result<Tensor> {
    let _profile = crate::profile::scope("reduce");
    let n = x.numel();
    match x.device() {
        Device::Gpu(ctx) if n > 0 => reduce_gpu(&ctx, x, (1, n, 1), alpha, &[1]),
        Device::Gpu(_) => Tensor::full(&[1], 0.0 * alpha, &x.device()),
        Device::Cpu(ctx) => {
            let total = reduce_cpu(&x.cpu_data()?, 1, n, 1, 1.0)[0];
            Ok(Tensor::cpu_from(&ctx, vec![total * alpha], &[1]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::scale;
    use crate::testing::{assert_close, gpu, gpu_with_binding_limit, random, sizes};
    use proptest::prelude::*;

    /// GPU sums add f32 in a fixed order (≤ 32 sequential adds per invocation, then a tree of
    /// ≤ 8 levels per pass); with inputs in [-1, 1) an error bound is ~40·2⁻²⁴·Σ|x| ≤ 3e-6·A.
    fn tol(a: usize) -> f32 {
        3e-6 * a as f32
    }

    fn check(x: &Tensor, g: &Device, axis: usize) {
        let gx = x.to_device(g).unwrap();
        let a = x.shape()[axis];
        assert_close(
            "sum",
            &sum(&gx, axis).unwrap(),
            &sum(x, axis).unwrap(),
            tol(a),
            0.0,
        );
        assert_close(
            "mean",
            &mean(&gx, axis).unwrap(),
            &mean(x, axis).unwrap(),
            3e-6,
            0.0,
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10))]

        #[test]
        fn sum_matches_cpu_2d(rows in sizes(), cols in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let x = random(&[rows, cols], seed, &Device::cpu());
            check(&x, &g, 0);
            check(&x, &g, 1);
        }

        #[test]
        fn sum_matches_cpu_middle_axis(b in 1usize..6, t in sizes(), c in 1usize..20, seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let x = random(&[b, t, c], seed, &Device::cpu());
            for axis in 0..3 {
                check(&x, &g, axis);
            }
        }

        #[test]
        fn sum_all_matches_cpu(n in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let x = random(&[n, 3], seed, &Device::cpu());
            let got = sum_all(&x.to_device(&g).unwrap()).unwrap();
            assert_close("sum_all", &got, &sum_all(&x).unwrap(), tol(3 * n), 0.0);
        }

        #[test]
        fn sum_all_scaled_is_sum_all_then_scale(n in sizes(), alpha in -3.0f32..3.0, seed in 0u64..1000) {
            // Bit for bit the two ops it replaces, on each device; the GPU against the CPU as
            // `sum_all` is (the sums' order differs), the tolerance scaled by |α|.
            let x = random(&[n, 3], seed, &Device::cpu());
            let two_ops = |x: &Tensor| scale(&sum_all(x).unwrap(), alpha).unwrap().to_vec().unwrap();
            let cpu = sum_all_scaled(&x, alpha).unwrap();
            prop_assert_eq!(cpu.to_vec().unwrap(), two_ops(&x));
            let Some(g) = gpu() else { return Ok(()) };
            let gx = x.to_device(&g).unwrap();
            let got = sum_all_scaled(&gx, alpha).unwrap();
            prop_assert_eq!(got.to_vec().unwrap(), two_ops(&gx));
            assert_close("sum_all_scaled", &got, &cpu, tol(3 * n) * alpha.abs(), 0.0);
        }
    }

    #[test]
    fn sum_cpu_matches_hand_worked_values() {
        let cpu = Device::cpu();
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &cpu).unwrap();
        assert_eq!(sum(&x, 0).unwrap().to_vec().unwrap(), [5.0, 7.0, 9.0]);
        assert_eq!(sum(&x, 1).unwrap().to_vec().unwrap(), [6.0, 15.0]);
        assert_eq!(mean(&x, 1).unwrap().to_vec().unwrap(), [2.0, 5.0]);
        assert_eq!(mean(&x, 0).unwrap().to_vec().unwrap(), [2.5, 3.5, 4.5]);
        let s = sum_all(&x).unwrap();
        assert_eq!((s.shape(), s.to_vec().unwrap()), (&[1][..], vec![21.0]));
        let v = Tensor::from_vec(vec![1.0, -2.0, 4.5], &[3], &cpu).unwrap();
        let s = sum(&v, 0).unwrap();
        assert_eq!((s.shape(), s.to_vec().unwrap()), (&[1][..], vec![3.5]));
        // Empty axes: the sum is 0, the mean NaN (as in torch); an empty output stays empty.
        let mut devices = vec![cpu];
        devices.extend(gpu());
        for d in &devices {
            let e = Tensor::zeros(&[0, 3], d).unwrap();
            assert_eq!(sum(&e, 0).unwrap().to_vec().unwrap(), [0.0; 3]);
            assert!(mean(&e, 0).unwrap().to_vec().unwrap()[0].is_nan());
            assert_eq!(sum(&e, 1).unwrap().shape(), [0]);
        }
    }

    #[test]
    fn sum_matches_cpu_2d_grid() {
        // 66,000 rows reduced along the last axis: one workgroup each, more than 65,535 → 2-D grid.
        let Some(g) = gpu() else { return };
        // (About 4 s on lavapipe, so `sum` only.)
        let x = random(&[66_000, 3], 8, &Device::cpu());
        let got = sum(&x.to_device(&g).unwrap(), 1).unwrap();
        assert_close("sum 2-D grid", &got, &sum(&x, 1).unwrap(), tol(3), 0.0);
    }

    #[test]
    fn sum_matches_cpu_multi_pass() {
        // 300,001 ones: > 8192 per item forces a second pass; integers below 2^24 add exactly.
        let Some(g) = gpu() else { return };
        let ones = Tensor::full(&[300_001], 1.0, &g).unwrap();
        assert_eq!(sum_all(&ones).unwrap().to_vec().unwrap(), [300_001.0]);
        // Bias-gradient shape: 64 columns × 4 lanes, 128 rows per item → 17 items, then a second pass.
        let x = random(&[2049, 77], 5, &Device::cpu());
        let gx = x.to_device(&g).unwrap();
        assert_close(
            "sum axis 0",
            &sum(&gx, 0).unwrap(),
            &sum(&x, 0).unwrap(),
            tol(2049),
            0.0,
        );
        let x = random(&[100_003], 6, &Device::cpu());
        let got = sum_all(&x.to_device(&g).unwrap()).unwrap();
        assert_close("sum_all", &got, &sum_all(&x).unwrap(), tol(100_003), 0.0);
        // α on the last of two passes: the bits of the two ops it replaces.
        let scaled = sum_all_scaled(&x.to_device(&g).unwrap(), 0.3).unwrap();
        assert_eq!(
            scaled.to_vec().unwrap(),
            scale(&got, 0.3).unwrap().to_vec().unwrap()
        );
        // Deterministic: the same input gives the same bits.
        let again = sum_all(&x.to_device(&g).unwrap()).unwrap();
        assert_eq!(
            got.to_vec().unwrap()[0].to_bits(),
            again.to_vec().unwrap()[0].to_bits()
        );
    }

    #[test]
    fn reduce_large_tensors_are_split_over_bindings() {
        // 4 KiB bindings hold 960 elements after the alignment lead: items shrink, passes multiply.
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        let x = random(&[1000, 3], 1, &Device::cpu());
        check(&x, &g, 0);
        check(&x, &g, 1);
        let x = random(&[3, 700, 5], 2, &Device::cpu());
        check(&x, &g, 1);
        let x = random(&[10_000], 3, &Device::cpu());
        let gx = x.to_device(&g).unwrap();
        let Device::Gpu(ctx) = &g else { unreachable!() };
        let before = ctx.dispatch_count();
        let got = sum_all(&gx).unwrap();
        // 11 items of 960 elements need 11 first-pass dispatches.
        assert!(ctx.dispatch_count() - before >= 11);
        assert_close(
            "sum_all split",
            &got,
            &sum_all(&x).unwrap(),
            tol(10_000),
            0.0,
        );
        let scaled = sum_all_scaled(&gx, -2.0).unwrap();
        assert_eq!(
            scaled.to_vec().unwrap(),
            scale(&got, -2.0).unwrap().to_vec().unwrap()
        );
    }

    #[test]
    fn reduce_shapes_are_checked() {
        let x = Tensor::zeros(&[2, 3], &Device::cpu()).unwrap();
        let e = sum(&x, 2).unwrap_err().to_string();
        assert!(
            e.contains("sum") && e.contains("axis 2") && e.contains("[2, 3]"),
            "{e}"
        );
        let e = mean(&x, 5).unwrap_err().to_string();
        assert!(e.contains("rank 2"), "{e}");
    }
}
