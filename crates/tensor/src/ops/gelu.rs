//! GELU, the activation of GPT-2's MLP, in its tanh form, and its backward.
//!
//! Forward, element by element:
//!   u = K·(x + A·x³),  K = √(2/π) ≈ 0.7978845608,  A = 0.044715
//!   y = 0.5·x·(1 + tanh u)
//!
//! Backward: dx = dy · gelu'(x) with
//!   gelu'(x) = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh² u)·K·(1 + 3A·x²)
//! (product rule on 0.5·x·(1 + tanh u), d tanh u/dx = sech² u · du/dx, sech² = 1 − tanh²).
//! Nothing is saved by the forward: the backward takes the input x and recomputes u and tanh u.
//!
//! Evaluation (CPU and GPU alike): WGSL's tanh is loosely specified and 1 − tanh² u cancels in
//! the tails, so both use the logistic form. With e = exp(−2u) and s = 1/(1 + e) = 0.5·(1 + tanh u),
//! 1 − s = e·s and 1 − tanh² u = 4·s·(1 − s), hence
//!   y = x·s,   gelu'(x) = s + 2·x·s·(1 − s)·K·(1 + 3A·x²),
//! products and one quotient, each good to a few ulp. For |u| ≥ 40, s is taken as 0 or 1 and the
//! second term as 0 (exp(80) still fits f32; what is dropped is below 1e-32), so huge |x|
//! (x³ overflows from |x| ≈ 7e12) cannot give NaN.
//!
//! Kernel: `shaders/gelu.wgsl`, one invocation per element.

use std::mem::MaybeUninit;
use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

/// √(2/π).
const K: f32 = 0.797_884_6;
/// GPT-2's cubic coefficient.
const A: f32 = 0.044_715;
/// |u| from which s = 0.5·(1 + tanh u) is taken as exactly 0 or 1.
const U_SAT: f32 = 40.0;

kernel_params! {
    /// The `Params` struct of `gelu.wgsl`.
    struct Params {
        n: u32,
        off_x: u32,
        off_dy: u32,
        off_out: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "gelu",
        source: shaders::GELU,
        entry,
    }
}

/// (s, 1 − s) with s = 0.5·(1 + tanh u) = 1/(1 + exp(−2u)), saturated at |u| ≥ U_SAT as in
/// the kernel.
#[inline(always)]
fn halves(u: f32) -> (f32, f32) {
    if u.abs() < U_SAT {
        let e = crate::fastmath::exp(-2.0 * u);
        let s = 1.0 / (1.0 + e);
        (s, e * s)
    } else {
        let s = if u > 0.0 { 1.0 } else { 0.0 };
        (s, 1.0 - s)
    }
}

#[inline(always)]
fn inner(x: f32) -> f32 {
    K * (x + A * x * x * x)
}

/// GELU of one value (CPU path).
#[inline(always)]
pub(crate) fn gelu_scalar(x: f32) -> f32 {
    x * halves(inner(x)).0
}

/// gelu'(x) of one value (CPU path).
#[inline(always)]
pub(crate) fn gelu_grad_scalar(x: f32) -> f32 {
    let u = inner(x);
    let (s, s1) = halves(u);
    let tail = if u.abs() < U_SAT {
        2.0 * x * s * s1 * K * (1.0 + 3.0 * A * x * x)
    } else {
        0.0
    };
    s + tail
}

crate::fastmath::multiversion! {
    /// `out[i] = gelu(x[i])` over equal-length slices (vectorised; module doc).
    gelu_slice => gelu_slice_generic(x: &[f32], out: &mut [MaybeUninit<f32>]) -> ()
}

#[inline(always)]
fn gelu_slice_generic(x: &[f32], out: &mut [MaybeUninit<f32>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(gelu_scalar(v));
    }
}

crate::fastmath::multiversion! {
    /// `out[i] = dy[i]·gelu'(x[i])` over equal-length slices (vectorised).
    gelu_backward_slice => gelu_backward_slice_generic(x: &[f32], dy: &[f32], out: &mut [MaybeUninit<f32>]) -> ()
}

#[inline(always)]
fn gelu_backward_slice_generic(x: &[f32], dy: &[f32], out: &mut [MaybeUninit<f32>]) {
    for ((o, &v), &d) in out.iter_mut().zip(x).zip(dy) {
        o.write(d * gelu_grad_scalar(v));
    }
}

crate::fastmath::multiversion! {
    /// `d[i] *= gelu'(x[i])` over equal-length slices, in place (vectorised).
    gelu_grad_mul_slice => gelu_grad_mul_slice_generic(x: &[f32], d: &mut [f32]) -> ()
}

#[inline(always)]
fn gelu_grad_mul_slice_generic(x: &[f32], d: &mut [f32]) {
    for (o, &v) in d.iter_mut().zip(x) {
        *o *= gelu_grad_scalar(v);
    }
}

/// CPU: `d[i] *= gelu'(x[i])` in place, on every core when large: [`gelu_backward`]'s value
/// (the same product `d·gelu'(x)`, bit for bit) without a new tensor.
pub(crate) fn gelu_grad_mul_cpu(x: &[f32], d: &mut [f32]) {
    let chunk = crate::cpu::even_rows(d.len());
    crate::cpu::for_rows(d, chunk, |c, row| {
        gelu_grad_mul_slice(&x[c * chunk..c * chunk + row.len()], row)
    });
}

/// Launch `entry` over every element of `out`, split over bindings when large.
fn launch(
    ctx: &Arc<GpuContext>,
    entry: &'static str,
    x: &Tensor,
    dy: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    for (start, len) in ctx.row_chunks(out.numel(), &[1])? {
        if len == 0 {
            continue;
        }
        let (xv, ov) = (ctx.view(x, start, len)?, ctx.view(out, start, len)?);
        let mut params = Params {
            n: len as u32,
            off_x: xv.offset,
            off_out: ov.offset,
            ..Zeroable::zeroed()
        };
        let mut bindings = vec![(1, xv.binding), (3, ov.binding)];
        if let Some(dy) = dy {
            let dv = ctx.view(dy, start, len)?;
            params.off_dy = dv.offset;
            bindings.push((2, dv.binding));
        }
        let groups = grid_2d(len, 256, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.dispatch(
            kernel(entry),
            bytemuck::bytes_of(&params),
            &bindings,
            groups,
        )?;
    }
    Ok(())
}

/// `y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, element by element, any shape.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    match x.device() {
        Device::Cpu(ctx) => {
            let xd = x.cpu_data()?;
            let chunk = crate::cpu::even_rows(xd.len());
            // SAFETY: gelu_slice writes every element of o (zipped with x's row, as long).
            let out = unsafe {
                crate::cpu::collect_rows(xd.len(), chunk, |c, o| {
                    gelu_slice(&xd[c * chunk..c * chunk + o.len()], o)
                })
            };
            Ok(Tensor::cpu_from(&ctx, out, x.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, x.shape())?;
            launch(&ctx, "gelu_forward", x, None, &out)?;
            Ok(out)
        }
    }
}

/// `dx = dy · gelu'(x)` (derivative in the module doc); `x` is the forward's input, shapes equal.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    if x.shape() != dy.shape() {
        return shape_err(
            "gelu_backward",
            format!("dy of the shape of x, {:?}", x.shape()),
            dy.shape(),
        );
    }
    match same_device("gelu_backward", &[x, dy])? {
        Device::Cpu(ctx) => {
            let (xd, dyd) = (x.cpu_data()?, dy.cpu_data()?);
            let chunk = crate::cpu::even_rows(xd.len());
            // SAFETY: gelu_backward_slice writes every element of o (zipped with x's and dy's
            // rows, as long).
            let out = unsafe {
                crate::cpu::collect_rows(xd.len(), chunk, |c, o| {
                    let at = c * chunk..c * chunk + o.len();
                    gelu_backward_slice(&xd[at.clone()], &dyd[at], o)
                })
            };
            Ok(Tensor::cpu_from(&ctx, out, x.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, x.shape())?;
            launch(&ctx, "gelu_backward", x, Some(dy), &out)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{assert_close, assert_close_slices, gpu, random_vec, sizes};
    use proptest::prelude::*;

    /// Values in [-4, 4): both tails of the tanh and its middle.
    fn inputs(shape: &[usize], seed: u64, device: &Device) -> Tensor {
        let v = random_vec(shape.iter().product(), seed)
            .iter()
            .map(|v| 4.0 * v)
            .collect();
        Tensor::from_vec(v, shape, device).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn gelu_matches_cpu_random(rows in sizes(), cols in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let cpu = Device::cpu();
            let (x, dy) = (inputs(&[rows, cols], seed, &cpu), inputs(&[rows, cols], seed + 1, &cpu));
            let (gx, gdy) = (x.to_device(&g).unwrap(), dy.to_device(&g).unwrap());
            // The GPU's exp and division are not the CPU's to the last bit (seen: 2 ulp);
            // tolerance 1e-6 absolute + 1e-6 relative.
            assert_close("gelu", &gelu(&gx).unwrap(), &gelu(&x).unwrap(), 1e-6, 1e-6);
            let (got, want) = (gelu_backward(&gx, &gdy).unwrap(), gelu_backward(&x, &dy).unwrap());
            assert_close("gelu_backward", &got, &want, 1e-6, 1e-6);
        }
    }

    #[test]
    fn gelu_cpu_matches_f64_and_finite_differences() {
        // Hand values (f64 evaluation of the tanh form).
        let xs = [-3.0f32, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0];
        let want_y = [
            -0.003_637_392,
            -0.158_808,
            -0.154_286,
            0.0,
            0.345_714,
            0.841_192,
            1.954_598,
            2.996_363,
        ];
        let want_d = [
            -0.011_584_17,
            -0.082_964_08,
            0.132_630_1,
            0.5,
            0.867_370,
            1.082_964,
            1.086_099,
            1.011_584,
        ];
        let cpu = Device::cpu();
        let x = Tensor::from_vec(xs.to_vec(), &[8], &cpu).unwrap();
        let ones = Tensor::full(&[8], 1.0, &cpu).unwrap();
        assert_close_slices(
            "gelu hand",
            &gelu(&x).unwrap().to_vec().unwrap(),
            &want_y,
            1e-6,
            0.0,
        );
        let d = gelu_backward(&x, &ones).unwrap().to_vec().unwrap();
        assert_close_slices("gelu' hand", &d, &want_d, 1e-6, 0.0);
        // Central differences of the f64 forward, at points across the curve, with dy ≠ 1.
        let xs: Vec<f32> = (0..41).map(|i| -6.0 + 0.3 * i as f32).collect();
        let dys = random_vec(41, 3);
        // L = Σ dy·gelu(x), so ∂L/∂x_i = dy_i·gelu'(x_i).
        let dy64 = reference::widen(&dys);
        let loss = |x: &[f64]| -> f64 {
            reference::gelu(x)
                .iter()
                .zip(&dy64)
                .map(|(y, d)| y * d)
                .sum()
        };
        let fd = reference::narrow(&reference::numeric_gradient(
            loss,
            &reference::widen(&xs),
            1e-5,
        ));
        let x = Tensor::from_vec(xs, &[41], &cpu).unwrap();
        let dy = Tensor::from_vec(dys, &[41], &cpu).unwrap();
        let got = gelu_backward(&x, &dy).unwrap().to_vec().unwrap();
        assert_close_slices("gelu' vs finite differences", &got, &fd, 1e-6, 1e-6);
    }

    #[test]
    fn gelu_matches_cpu_extreme_inputs() {
        // Saturated tails: gelu(x) = x and gelu' = 1 for large x, 0 and 0 for very negative x;
        // nothing may turn into NaN (x³ overflows to ∞ from |x| ≈ 7e12).
        let Some(g) = gpu() else { return };
        let xs = vec![
            -1e30f32, -1e13, -1e3, -30.0, -6.0, -5.5, 5.5, 6.0, 30.0, 1e3, 1e13, 1e30,
        ];
        let cpu = Device::cpu();
        let x = Tensor::from_vec(xs.clone(), &[12], &cpu).unwrap();
        let dy = Tensor::full(&[12], 1.0, &cpu).unwrap();
        let (y, d) = (
            gelu(&x).unwrap().to_vec().unwrap(),
            gelu_backward(&x, &dy).unwrap().to_vec().unwrap(),
        );
        for (i, &v) in xs.iter().enumerate() {
            if v.abs() >= 30.0 {
                assert_eq!(y[i], if v > 0.0 { v } else { 0.0 }, "gelu({v})");
                assert_eq!(d[i], if v > 0.0 { 1.0 } else { 0.0 }, "gelu'({v})");
            }
        }
        let (gx, gdy) = (x.to_device(&g).unwrap(), dy.to_device(&g).unwrap());
        assert_close(
            "gelu extreme",
            &gelu(&gx).unwrap(),
            &gelu(&x).unwrap(),
            1e-6,
            1e-6,
        );
        assert_close(
            "gelu' extreme",
            &gelu_backward(&gx, &gdy).unwrap(),
            &gelu_backward(&x, &dy).unwrap(),
            1e-6,
            1e-6,
        );
    }

    #[test]
    fn gelu_matches_cpu_split_bindings() {
        // A context that binds at most 4 KiB forces 3000 elements into several dispatches.
        let Some(_) = gpu() else { return };
        let g = crate::testing::gpu_with_binding_limit(4096);
        let cpu = Device::cpu();
        let (x, dy) = (inputs(&[1000, 3], 1, &cpu), inputs(&[1000, 3], 2, &cpu));
        let (gx, gdy) = (x.to_device(&g).unwrap(), dy.to_device(&g).unwrap());
        assert_close(
            "gelu split",
            &gelu(&gx).unwrap(),
            &gelu(&x).unwrap(),
            1e-6,
            1e-6,
        );
        let (got, want) = (
            gelu_backward(&gx, &gdy).unwrap(),
            gelu_backward(&x, &dy).unwrap(),
        );
        assert_close("gelu_backward split", &got, &want, 1e-6, 1e-6);
    }

    #[test]
    fn shapes_are_checked() {
        let cpu = Device::cpu();
        let x = Tensor::zeros(&[2, 3], &cpu).unwrap();
        let dy = Tensor::zeros(&[3, 2], &cpu).unwrap();
        let e = gelu_backward(&x, &dy).unwrap_err().to_string();
        assert!(
            e.contains("gelu_backward") && e.contains("[2, 3]") && e.contains("[3, 2]"),
            "{e}"
        );
    }
}
