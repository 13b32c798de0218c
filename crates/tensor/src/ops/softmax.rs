//! Softmax over the last axis, optionally with the causal mask of attention, and its backward.
//!
//! x: (…, R, Cn) is viewed as rows of length Cn; row g is row r = g mod R of its (R, Cn) matrix.
//!
//! Forward, per row, over the columns it keeps (all Cn, or the first r + (Cn − R) + 1 when causal):
//!   m = max_c x_c,   y_c = exp(x_c − m) / Σ_k exp(x_k − m)
//! Subtracting the row max changes nothing mathematically and keeps every exponent ≤ 0, so large
//! logits cannot overflow and the denominator is ≥ 1.
//!
//! Causal mask: column c of row r is masked (y_c = 0) when c > r + (Cn − R). With R = Cn (full
//! attention) that is c > r; with R < Cn the R rows are the last R queries of Cn keys (a KV cache),
//! so query r sits at key position r + Cn − R and sees every key up to it. R ≤ Cn is required.
//!
//! Backward: with y = softmax(x), ∂y_c/∂x_k = y_c·(δ_ck − y_k), so
//!   dx_k = Σ_c dy_c·y_c·(δ_ck − y_k) = y_k·(dy_k − Σ_c y_c·dy_c).
//! Only the output y is saved for it; masked columns have y = 0, hence dx = 0, so the backward
//! needs no mask.
//!
//! The CPU path evaluates exp with the vectorised [`fastmath`](crate::fastmath) kernels (sums
//! in f32 lanes over blocks, the blocks in f64); its backward's dot product sums f32 lanes per block, blocks in f64. Kernel: `shaders/softmax.wgsl`, one workgroup of 256 per row,
//! with workgroup-memory tree reductions for the max and the sums.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `softmax.wgsl`.
    struct Params {
        rows: u32,
        cols: u32,
        off_x: u32,
        off_dy: u32,
        off_out: u32,
        r0: u32,
        r_len: u32,
        causal: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "softmax",
        source: shaders::SOFTMAX,
        entry,
    }
}

/// Columns that row `g` keeps: all `cols`, or `r + cols − r_len + 1` with r = g mod r_len.
fn kept(g: usize, cols: usize, r_len: usize, causal: bool) -> usize {
    if causal {
        g % r_len + cols - r_len + 1
    } else {
        cols
    }
}

/// Launch one workgroup per row of `out`, in as many dispatches as the binding limit needs, on
/// grids of at most `max_groups` workgroups per dimension. `a` is x (forward) or y (backward).
#[allow(clippy::too_many_arguments)]
fn launch(
    ctx: &Arc<GpuContext>,
    entry: &'static str,
    a: &Tensor,
    dy: Option<&Tensor>,
    out: &Tensor,
    r_len: usize,
    causal: bool,
    max_groups: u32,
) -> Result<()> {
    let cols = out.last_dim();
    let rows = out.numel() / cols.max(1);
    for (start, len) in ctx.row_chunks(rows, &[cols])? {
        if len == 0 {
            continue;
        }
        let (av, ov) = (
            ctx.view(a, start * cols, len * cols)?,
            ctx.view(out, start * cols, len * cols)?,
        );
        let mut params = Params {
            rows: len as u32,
            cols: cols as u32,
            off_x: av.offset,
            off_out: ov.offset,
            r0: (start % r_len) as u32,
            r_len: r_len as u32,
            causal: causal as u32,
            ..Zeroable::zeroed()
        };
        let mut bindings = vec![(1, av.binding), (3, ov.binding)];
        if let Some(dy) = dy {
            let dv = ctx.view(dy, start * cols, len * cols)?;
            params.off_dy = dv.offset;
            bindings.push((2, dv.binding));
        }
        let groups = grid_2d(len, 1, max_groups);
        ctx.dispatch(
            kernel(entry),
            bytemuck::bytes_of(&params),
            &bindings,
            groups,
        )?;
    }
    Ok(())
}

/// Softmax over the last axis of x: (…, R, Cn); `causal` masks column c of row r when
/// c > r + (Cn − R) (needs at least two axes and R ≤ Cn). See the module doc.
pub fn softmax(x: &Tensor, causal: bool) -> Result<Tensor> {
    let _profile = crate::profile::scope("softmax");
    let shape = x.shape();
    let cols = x.last_dim();
    let r_len = if shape.len() >= 2 {
        shape[shape.len() - 2]
    } else {
        1
    };
    if causal && (shape.len() < 2 || r_len > cols) {
        return shape_err(
            "softmax",
            "x of shape (…, R, Cn) with R ≤ Cn for the causal mask",
            shape,
        );
    }
    if x.numel() == 0 {
        return Tensor::uninit(shape, &x.device());
    }
    match x.device() {
        Device::Cpu(ctx) => {
            let xd = x.cpu_data()?;
            let mut out = vec![0.0; xd.len()];
            crate::cpu::for_rows(&mut out, cols, |g, row| {
                let xs = &xd[g * cols..(g + 1) * cols];
                let lim = kept(g, cols, r_len, causal);
                let kept = &mut row[..lim];
                kept.copy_from_slice(&xs[..lim]);
                let m = crate::fastmath::max(kept);
                let z = crate::fastmath::exp_sub_sum(kept, m);
                crate::fastmath::scale(kept, (1.0 / z) as f32);
                // Masked columns keep the 0.0 they were made with.
            });
            Ok(Tensor::cpu_from(&ctx, out, shape))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, shape)?;
            let max = ctx.limits.max_compute_workgroups_per_dimension;
            launch(
                &ctx,
                "softmax_forward",
                x,
                None,
                &out,
                r_len.max(1),
                causal,
                max,
            )?;
            Ok(out)
        }
    }
}

/// `dx = y ⊙ (dy − Σ_c y·dy)` per row of the last axis, y the forward's output; shapes equal.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("softmax");
    if y.shape() != dy.shape() {
        return shape_err(
            "softmax_backward",
            format!("dy of the shape of y, {:?}", y.shape()),
            dy.shape(),
        );
    }
    let device = same_device("softmax_backward", &[y, dy])?;
    if y.numel() == 0 {
        return Tensor::uninit(y.shape(), &device);
    }
    let cols = y.last_dim();
    match device {
        Device::Cpu(ctx) => {
            let (yd, dyd) = (y.cpu_data()?, dy.cpu_data()?);
            let mut out = vec![0.0; yd.len()];
            crate::cpu::for_rows(&mut out, cols, |g, row| {
                let (ys, ds) = (
                    &yd[g * cols..(g + 1) * cols],
                    &dyd[g * cols..(g + 1) * cols],
                );
                let dot = crate::fastmath::dot(ys, ds) as f32;
                for ((o, &a), &b) in row.iter_mut().zip(ys).zip(ds) {
                    *o = a * (b - dot);
                }
            });
            Ok(Tensor::cpu_from(&ctx, out, y.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, y.shape())?;
            let max = ctx.limits.max_compute_workgroups_per_dimension;
            launch(&ctx, "softmax_backward", y, Some(dy), &out, 1, false, max)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{assert_close, assert_close_slices, gpu, random, random_vec, sizes};
    use proptest::prelude::*;

    /// Values in [-4, 4): logits of a realistic spread.
    fn logits(shape: &[usize], seed: u64, device: &Device) -> Tensor {
        let v = random_vec(shape.iter().product(), seed)
            .iter()
            .map(|v| 4.0 * v)
            .collect();
        Tensor::from_vec(v, shape, device).unwrap()
    }

    /// GPU forward and backward against the CPU, on the same inputs, to `atol` + `rtol`·|want|.
    fn check_to(
        what: &str,
        x: &Tensor,
        dy: &Tensor,
        causal: bool,
        g: &Device,
        atol: f32,
        rtol: f32,
    ) {
        let want = softmax(x, causal).unwrap();
        let got = softmax(&x.to_device(g).unwrap(), causal).unwrap();
        assert_close(&format!("{what} forward"), &got, &want, atol, rtol);
        let want_dx = softmax_backward(&want, dy).unwrap();
        let got_dx =
            softmax_backward(&want.to_device(g).unwrap(), &dy.to_device(g).unwrap()).unwrap();
        assert_close(&format!("{what} backward"), &got_dx, &want_dx, atol, rtol);
    }

    /// [`check_to`] at 1e-5 absolute: y ≤ 1, and the differences seen are ~1e-7.
    fn check(what: &str, x: &Tensor, dy: &Tensor, causal: bool, g: &Device) {
        check_to(what, x, dy, causal, g, 1e-5, 0.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn softmax_matches_cpu_random(b in 1usize..3, r in sizes(), c in sizes(), causal in any::<bool>(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            // Causal needs R ≤ Cn; R < Cn is the KV-cache case.
            let r = if causal { r.min(c) } else { r };
            let cpu = Device::cpu();
            let x = logits(&[b, r, c], seed, &cpu);
            let dy = random(&[b, r, c], seed + 1, &cpu);
            check(&format!("[{b}, {r}, {c}] causal={causal}"), &x, &dy, causal, &g);
        }
    }

    #[test]
    fn softmax_cpu_matches_hand_and_finite_differences() {
        let cpu = Device::cpu();
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3], &cpu).unwrap();
        let want = [0.090_030_57, 0.244_728_47, 0.665_240_96];
        assert_close_slices(
            "softmax hand",
            &softmax(&x, false).unwrap().to_vec().unwrap(),
            &want,
            1e-7,
            0.0,
        );
        // KV-cache mask, R = 2 queries over Cn = 3 keys: row 0 keeps 2 columns, row 1 all 3.
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0], &[2, 3], &cpu).unwrap();
        let y = softmax(&x, true).unwrap().to_vec().unwrap();
        let e = 1.0f32.exp();
        let want = [
            1.0 / (1.0 + e),
            e / (1.0 + e),
            0.0,
            want[0],
            want[1],
            want[2],
        ];
        assert_close_slices("causal hand", &y, &want, 1e-7, 0.0);
        // Backward against central differences of L = Σ dy·softmax(x), in f64.
        let (r, c) = (4, 6);
        for causal in [false, true] {
            let xs = random_vec(r * c, 7)
                .iter()
                .map(|&v| 3.0 * v as f64)
                .collect::<Vec<_>>();
            let dys = random_vec(r * c, 8);
            let loss = |xs: &[f64]| -> f64 {
                let y = reference::softmax(xs, r, c, causal);
                y.iter().zip(&dys).map(|(a, &b)| a * b as f64).sum()
            };
            let fd = reference::narrow(&reference::numeric_gradient(loss, &xs, 1e-6));
            let x =
                Tensor::from_vec(xs.iter().map(|&v| v as f32).collect(), &[r, c], &cpu).unwrap();
            let dy = Tensor::from_vec(dys.clone(), &[r, c], &cpu).unwrap();
            let dx = softmax_backward(&softmax(&x, causal).unwrap(), &dy).unwrap();
            // f32 inputs vs f64 differences: 1e-6 absolute.
            assert_close_slices(
                &format!("dx vs finite differences, causal={causal}"),
                &dx.to_vec().unwrap(),
                &fd,
                1e-6,
                0.0,
            );
        }
    }

    #[test]
    fn softmax_matches_cpu_large_values() {
        // Logits near ±1e4 overflow exp() unless the max is subtracted. Rows: 1e4 + k/2, and
        // −1e4 − k/2, both exact in f32; the f64 reference is computed on the same f32 values.
        let Some(g) = gpu() else { return };
        let c = 37;
        let mut xs: Vec<f32> = (0..c).map(|k| 1e4 + 0.5 * k as f32).collect();
        xs.extend((0..c).map(|k| -1e4 - 0.5 * k as f32));
        let cpu = Device::cpu();
        let x = Tensor::from_vec(xs.clone(), &[2, c], &cpu).unwrap();
        let want = reference::narrow(&reference::softmax(&reference::widen(&xs), 2, c, false));
        for (dev, what) in [(&cpu, "cpu"), (&g, "gpu")] {
            let y = softmax(&x.to_device(dev).unwrap(), false)
                .unwrap()
                .to_vec()
                .unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{what}: {y:?}");
            assert_close_slices(
                &format!("{what} large logits vs f64"),
                &y,
                &want,
                1e-6,
                1e-5,
            );
        }
        check("large logits", &x, &random(&[2, c], 3, &cpu), true, &g);
    }

    #[test]
    fn softmax_matches_cpu_long_rows() {
        // GPT-2's vocabulary: each invocation loops over ~196 columns of a 50,257-wide row.
        let Some(g) = gpu() else { return };
        let cpu = Device::cpu();
        let (x, dy) = (logits(&[3, 50_257], 4, &cpu), random(&[3, 50_257], 5, &cpu));
        // y is ~1e-4 at most here, so an absolute 1e-5 would say little: 1e-9 + 1e-5 relative.
        check_to("long rows", &x, &dy, false, &g, 1e-9, 1e-5);
    }

    #[test]
    fn softmax_matches_cpu_2d_grid() {
        // Grids capped at 7 workgroups per dimension: 50 rows make a 7 × 8 grid whose last 6
        // workgroups have no row. The same indexing serves > 65,535 rows on a real device.
        let Some(g) = gpu() else { return };
        let Device::Gpu(ctx) = &g else { unreachable!() };
        let cpu = Device::cpu();
        let (x, dy) = (logits(&[2, 25, 31], 6, &cpu), random(&[2, 25, 31], 7, &cpu));
        let (gx, gdy) = (x.to_device(&g).unwrap(), dy.to_device(&g).unwrap());
        for causal in [false, true] {
            let want = softmax(&x, causal).unwrap();
            let got = Tensor::gpu_uninit(ctx, x.shape()).unwrap();
            launch(ctx, "softmax_forward", &gx, None, &got, 25, causal, 7).unwrap();
            assert_close("2-D grid forward", &got, &want, 1e-5, 0.0);
            let want_dx = softmax_backward(&want, &dy).unwrap();
            let got_dx = Tensor::gpu_uninit(ctx, x.shape()).unwrap();
            launch(
                ctx,
                "softmax_backward",
                &want.to_device(&g).unwrap(),
                Some(&gdy),
                &got_dx,
                1,
                false,
                7,
            )
            .unwrap();
            assert_close("2-D grid backward", &got_dx, &want_dx, 1e-5, 0.0);
        }
    }

    #[test]
    fn softmax_matches_cpu_split_bindings() {
        // 4 KiB bindings hold 25 rows of 37: chunks start mid-matrix, which the causal row index
        // must follow.
        let Some(_) = gpu() else { return };
        let g = crate::testing::gpu_with_binding_limit(4096);
        let cpu = Device::cpu();
        let (x, dy) = (logits(&[4, 30, 37], 8, &cpu), random(&[4, 30, 37], 9, &cpu));
        check("split causal", &x, &dy, true, &g);
        check("split", &x, &dy, false, &g);
    }

    #[test]
    fn shapes_are_checked() {
        let cpu = Device::cpu();
        let x = Tensor::zeros(&[2, 5, 3], &cpu).unwrap();
        let e = softmax(&x, true).unwrap_err().to_string();
        assert!(
            e.contains("softmax") && e.contains("R ≤ Cn") && e.contains("[2, 5, 3]"),
            "{e}"
        );
        let e = softmax(&Tensor::zeros(&[4], &cpu).unwrap(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4]"), "{e}");
        let dy = Tensor::zeros(&[2, 3, 5], &cpu).unwrap();
        let e = softmax_backward(&x, &dy).unwrap_err().to_string();
        assert!(
            e.contains("softmax_backward") && e.contains("[2, 5, 3]") && e.contains("[2, 3, 5]"),
            "{e}"
        );
    }
}
