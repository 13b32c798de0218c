//! Elementwise ops: `add`, `mul`, `scale`, `axpy` (in place), `add_bias`, and `fill`.
//!
//! Math (all over flat arrays of equal length n, except the bias):
//! - `add(a, b)      = a + b`            d/da = 1, d/db = 1
//! - `mul(a, b)      = a ⊙ b`            d/da = b, d/db = a
//! - `scale(a, s)    = s · a`            d/da = s
//! - `scale_by(a, k, s) = s · (k · a)` with s a (1) tensor, so a scale computed on the GPU stays
//!   there, and k a constant folded into the same pass (a `scale` by k and a scale by s in one
//!   dispatch; the same f32 operations in the same order, so the same bits)
//! - `axpy(y, s, x):   y ← y + s · x`    (in place; how gradients accumulate)
//! - `add_bias(x, b) = x + b` with x: (…, C), b: (C), b broadcast over every row;
//!   db = Σ_rows dy (a `sum` over the leading axes, in `reduce`).
//!
//! Kernel: `shaders/elementwise.wgsl`, one invocation per element.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `elementwise.wgsl`.
    struct Params {
        n: u32,
        cols: u32,
        off_a: u32,
        off_b: u32,
        off_out: u32,
        col0: u32,
        alpha: f32,
        _pad: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "elementwise",
        source: shaders::ELEMENTWISE,
        entry,
    }
}

/// How one elementwise launch binds its operands.
enum Operands<'a> {
    /// `out = f(a)` (scale) or `out = f(out, a)` (axpy, in place).
    One(&'a Tensor),
    /// `out = f(a, b)` with a and b as long as out.
    Two(&'a Tensor, &'a Tensor),
    /// `out = a + bias` with bias of length `cols`, bound whole.
    Bias(&'a Tensor, &'a Tensor),
    /// `out = s[0] · (alpha · a)` with s a one-element tensor, bound whole.
    Scalar(&'a Tensor, &'a Tensor),
    /// `out = alpha`.
    Zero,
}

/// Launch `entry` over all elements of `out`, in as many dispatches as the binding limit needs.
fn launch(
    ctx: &Arc<GpuContext>,
    entry: &'static str,
    out: &Tensor,
    ops: Operands<'_>,
    alpha: f32,
) -> Result<()> {
    let n = out.numel();
    let cols = match ops {
        Operands::Bias(_, b) => b.numel(),
        _ => 1,
    };
    for (start, len) in ctx.row_chunks(n, &[1])? {
        if len == 0 {
            continue;
        }
        let o = ctx.view(out, start, len)?;
        let mut params = Params {
            n: len as u32,
            cols: cols as u32,
            off_out: o.offset,
            col0: (start % cols) as u32,
            alpha,
            ..Zeroable::zeroed()
        };
        let mut bindings = vec![(3, o.binding)];
        match ops {
            Operands::One(a) => {
                let a = ctx.view(a, start, len)?;
                params.off_a = a.offset;
                bindings.push((1, a.binding));
            }
            Operands::Two(a, b) => {
                let (a, b) = (ctx.view(a, start, len)?, ctx.view(b, start, len)?);
                params.off_a = a.offset;
                params.off_b = b.offset;
                bindings.push((1, a.binding));
                bindings.push((2, b.binding));
            }
            Operands::Bias(a, b) | Operands::Scalar(a, b) => {
                let (a, b) = (ctx.view(a, start, len)?, ctx.view_all(b)?);
                params.off_a = a.offset;
                params.off_b = b.offset;
                bindings.push((1, a.binding));
                bindings.push((2, b.binding));
            }
            Operands::Zero => {}
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

/// Set every element of a GPU tensor to `value`.
pub(crate) fn fill_gpu(ctx: &Arc<GpuContext>, t: &Tensor, value: f32) -> Result<()> {
    launch(ctx, "fill", t, Operands::Zero, value)
}

fn check_same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return shape_err(op, format!("shapes equal to {:?}", a.shape()), b.shape());
    }
    Ok(())
}

/// CPU path of a binary elementwise op.
fn binary_cpu(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    let (x, y) = (a.cpu_data()?, b.cpu_data()?);
    let row = crate::cpu::even_rows(x.len());
    // SAFETY: each row is zipped with x's and y's rows, as long as it, and written whole.
    let out = unsafe {
        crate::cpu::collect_rows(x.len(), row, |r, o| {
            let at = r * row..r * row + o.len();
            for ((o, &p), &q) in o.iter_mut().zip(&x[at.clone()]).zip(&y[at]) {
                o.write(f(p, q));
            }
        })
    };
    Ok(Tensor::cpu_from(&cpu_ctx(a), out, a.shape()))
}

fn cpu_ctx(t: &Tensor) -> Arc<crate::device::CpuContext> {
    match t.device() {
        Device::Cpu(c) => c,
        Device::Gpu(_) => unreachable!("cpu_ctx of a GPU tensor"),
    }
}

/// `f` is generic (each op's closure its own instantiation), not a `fn` pointer: a pointer would
/// be called once per element and keep the CPU loop from vectorising.
fn binary(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Tensor> {
    check_same_shape(op, a, b)?;
    match same_device(op, &[a, b])? {
        Device::Cpu(_) => binary_cpu(a, b, f),
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, a.shape())?;
            launch(&ctx, op, &out, Operands::Two(a, b), 0.0)?;
            Ok(out)
        }
    }
}

/// `a + b`, shapes equal.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    binary("add", a, b, |x, y| x + y)
}

/// `a ⊙ b` (elementwise product), shapes equal.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    binary("mul", a, b, |x, y| x * y)
}

/// `s · a`.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    match a.device() {
        Device::Cpu(ctx) => {
            let x = a.cpu_data()?;
            let row = crate::cpu::even_rows(x.len());
            // SAFETY: each row is zipped with x's row, as long as it, and written whole.
            let out = unsafe {
                crate::cpu::collect_rows(x.len(), row, |r, out| {
                    let xr = &x[r * row..r * row + out.len()];
                    for (o, &v) in out.iter_mut().zip(xr) {
                        o.write(s * v);
                    }
                })
            };
            Ok(Tensor::cpu_from(&ctx, out, a.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, a.shape())?;
            launch(&ctx, "scale", &out, Operands::One(a), s)?;
            Ok(out)
        }
    }
}

/// `s · (k · a)` where `s` is a one-element tensor on a's device and `k` a constant: one pass,
/// the bits of `scale_by(&scale(a, k)?, 1.0, s)` (with k = 1, of `s · a`).
pub fn scale_by(a: &Tensor, k: f32, s: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    if s.numel() != 1 {
        return shape_err("scale_by", "a one-element scale", s.shape());
    }
    match same_device("scale_by", &[a, s])? {
        Device::Cpu(ctx) => {
            let v = s.cpu_data()?[0];
            let x = a.cpu_data()?;
            let row = crate::cpu::even_rows(x.len());
            // SAFETY: each row is zipped with x's row, as long as it, and written whole.
            let out = unsafe {
                crate::cpu::collect_rows(x.len(), row, |r, out| {
                    let xr = &x[r * row..r * row + out.len()];
                    for (o, &e) in out.iter_mut().zip(xr) {
                        o.write(v * (k * e));
                    }
                })
            };
            Ok(Tensor::cpu_from(&ctx, out, a.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, a.shape())?;
            launch(&ctx, "scale_by", &out, Operands::Scalar(a, s), k)?;
            Ok(out)
        }
    }
}

/// In place: `y ← y + s · x`, shapes equal. Writes into `y`'s storage (shared by its clones).
pub fn axpy(y: &Tensor, s: f32, x: &Tensor) -> Result<()> {
    let _profile = crate::profile::scope("elementwise");
    check_same_shape("axpy", y, x)?;
    match same_device("axpy", &[y, x])? {
        Device::Cpu(_) => {
            if y.same_storage(x) {
                let mut yd = y.cpu_data_mut()?;
                yd.iter_mut().for_each(|v| *v += s * *v);
                return Ok(());
            }
            let xd = x.cpu_data()?;
            let mut yd = y.cpu_data_mut()?;
            crate::cpu::for_each(&mut yd, |i, v| *v += s * xd[i]);
            Ok(())
        }
        Device::Gpu(ctx) => launch(&ctx, "axpy", y, Operands::One(x), s),
    }
}

/// `x + b` with b: (C) broadcast over the rows of x: (…, C).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    let c = x.last_dim();
    if b.shape() != [c] {
        return shape_err("add_bias", format!("bias of shape [{c}]"), b.shape());
    }
    match same_device("add_bias", &[x, b])? {
        Device::Cpu(ctx) => {
            let (xd, bd) = (x.cpu_data()?, b.cpu_data()?);
            // SAFETY: each row (C elements) is zipped with x's row and b, as long as it, and
            // written whole.
            let out = unsafe {
                crate::cpu::collect_rows(xd.len(), c, |r, row| {
                    let xr = &xd[r * c..r * c + row.len()];
                    for ((o, &v), &bj) in row.iter_mut().zip(xr).zip(bd.iter()) {
                        o.write(v + bj);
                    }
                })
            };
            Ok(Tensor::cpu_from(&ctx, out, x.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, x.shape())?;
            launch(&ctx, "add_bias", &out, Operands::Bias(x, b), 0.0)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, random, sizes};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn binary_ops_match_cpu(n in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let a = random(&[n], seed, &Device::cpu());
            let b = random(&[n], seed + 1, &Device::cpu());
            let (ga, gb) = (a.to_device(&g).unwrap(), b.to_device(&g).unwrap());
            // Exact: one f32 operation per element on both devices.
            assert_close("add", &add(&ga, &gb).unwrap(), &add(&a, &b).unwrap(), 0.0, 0.0);
            assert_close("mul", &mul(&ga, &gb).unwrap(), &mul(&a, &b).unwrap(), 0.0, 0.0);
            assert_close("scale", &scale(&ga, -1.5).unwrap(), &scale(&a, -1.5).unwrap(), 0.0, 0.0);
            let s = Tensor::scalar(0.75, &Device::cpu()).unwrap();
            let gs = s.to_device(&g).unwrap();
            assert_close("scale_by", &scale_by(&ga, 1.0, &gs).unwrap(), &scale_by(&a, 1.0, &s).unwrap(), 0.0, 0.0);
            let folded = scale_by(&ga, -1.3, &gs).unwrap();
            assert_close("scale_by k", &folded, &scale_by(&a, -1.3, &s).unwrap(), 0.0, 0.0);
            // The bits of the two passes it replaces, on both devices.
            assert_close("scale_by k = two ops", &folded, &scale_by(&scale(&ga, -1.3).unwrap(), 1.0, &gs).unwrap(), 0.0, 0.0);
            assert_close("scale_by k = two ops (CPU)", &scale_by(&a, -1.3, &s).unwrap(), &scale_by(&scale(&a, -1.3).unwrap(), 1.0, &s).unwrap(), 0.0, 0.0);
            let (y, gy) = (a.copy().unwrap(), ga.copy().unwrap());
            axpy(&y, 0.25, &b).unwrap();
            axpy(&gy, 0.25, &gb).unwrap();
            assert_close("axpy", &gy, &y, 1e-7, 0.0);
        }

        #[test]
        fn add_bias_matches_cpu(rows in sizes(), cols in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let x = random(&[rows, cols], seed, &Device::cpu());
            let b = random(&[cols], seed + 1, &Device::cpu());
            let want = add_bias(&x, &b).unwrap();
            let got = add_bias(&x.to_device(&g).unwrap(), &b.to_device(&g).unwrap()).unwrap();
            assert_close("add_bias", &got, &want, 0.0, 0.0);
        }
    }

    #[test]
    fn shapes_are_checked() {
        let cpu = Device::cpu();
        let a = Tensor::zeros(&[2, 3], &cpu).unwrap();
        let b = Tensor::zeros(&[3, 2], &cpu).unwrap();
        let e = add(&a, &b).unwrap_err().to_string();
        assert!(
            e.contains("add") && e.contains("[2, 3]") && e.contains("[3, 2]"),
            "{e}"
        );
        let e = add_bias(&a, &b).unwrap_err().to_string();
        assert!(e.contains("bias of shape [3]"), "{e}");
    }

    #[test]
    fn large_tensors_are_split_over_bindings() {
        // A context that binds at most 4 KiB forces 1000 elements into several dispatches.
        let Some(_) = gpu() else { return };
        let g = crate::testing::gpu_with_binding_limit(4096);
        let a = random(&[1000, 3], 1, &Device::cpu());
        let b = random(&[3], 2, &Device::cpu());
        let want = add_bias(&a, &b).unwrap();
        let got = add_bias(&a.to_device(&g).unwrap(), &b.to_device(&g).unwrap()).unwrap();
        assert_close("add_bias split", &got, &want, 0.0, 0.0);
        let want = add(&a, &a).unwrap();
        let ga = a.to_device(&g).unwrap();
        assert_close("add split", &add(&ga, &ga).unwrap(), &want, 0.0, 0.0);
    }
}
