//! A range of one axis: `slice_axis` reads it out, `write_axis` writes or adds into it.
//!
//! Math, with the big tensor viewed as (outer, A, inner) around `axis` and s = start:
//! - `slice_axis(x, axis, s, len)[o, i, j] = x[o, s + i, j]`, shape (outer, len, inner) with the
//!   axis replaced by `len`;
//! - `write_axis(dst, axis, s, src, accumulate)`: in place, `dst[o, s + i, j] (+)= src[o, i, j]`.
//!
//! They are each other's backward: d(slice)/dx writes dy into a zero tensor at the same range;
//! d(write)/dsrc = slice of d(dst). Uses: the KV cache (append a token's k, v at position t of a
//! (B, NH, T_max, hs) cache, read the first t positions back) and LoRA on a slice of the fused
//! q,k,v projection (add the adapter's output into columns [C, 2C) of (N, 3C)).
//!
//! Kernel: `shaders/slice.wgsl`, one invocation per element of the small tensor; a launch is
//! split over ranges of `outer` so that both bindings fit.

use std::sync::Arc;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `slice.wgsl`.
    struct Params {
        n: u32,
        axis_len: u32,
        len: u32,
        inner: u32,
        start: u32,
        off_big: u32,
        off_small: u32,
        _pad: u32,
    }
}

/// (outer, A, inner) of `shape` around `axis`.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

fn check_range(
    op: &'static str,
    shape: &[usize],
    axis: usize,
    start: usize,
    len: usize,
) -> Result<()> {
    if axis >= shape.len() {
        return shape_err(
            op,
            format!("an axis below the rank {}", shape.len()),
            format!("axis {axis} of {shape:?}"),
        );
    }
    if start + len > shape[axis] {
        return shape_err(
            op,
            format!("a range within axis {axis} of length {}", shape[axis]),
            format!("{start}..{} of {shape:?}", start + len),
        );
    }
    Ok(())
}

/// Launch `entry` moving `len` positions of `axis` between `big` and `small`.
fn launch(
    ctx: &Arc<GpuContext>,
    entry: &'static str,
    big: &Tensor,
    small: &Tensor,
    axis: usize,
    start: usize,
) -> Result<()> {
    let (outer, a, inner) = around(big.shape(), axis);
    let len = small.shape()[axis];
    for (o0, on) in ctx.row_chunks(outer, &[a * inner, len * inner])? {
        let n = on * len * inner;
        if n == 0 {
            continue;
        }
        let b = ctx.view(big, o0 * a * inner, on * a * inner)?;
        let s = ctx.view(small, o0 * len * inner, n)?;
        let params = Params {
            n: n as u32,
            axis_len: a as u32,
            len: len as u32,
            inner: inner as u32,
            start: start as u32,
            off_big: b.offset,
            off_small: s.offset,
            _pad: 0,
        };
        let kernel = Kernel {
            shader: "slice",
            source: shaders::SLICE,
            entry,
        };
        let groups = grid_2d(n, 256, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.dispatch(
            kernel,
            bytemuck::bytes_of(&params),
            &[(1, b.binding), (2, s.binding)],
            groups,
        )?;
    }
    Ok(())
}

/// Positions `start..start + len` of `axis` of x, as a new tensor.
pub fn slice_axis(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    let _profile = crate::profile::scope("layout");
    check_range("slice_axis", x.shape(), axis, start, len)?;
    let mut shape = x.shape().to_vec();
    shape[axis] = len;
    match x.device() {
        Device::Cpu(ctx) => {
            let (outer, a, inner) = around(x.shape(), axis);
            let xd = x.cpu_data()?;
            let mut out = Vec::with_capacity(outer * len * inner);
            for o in 0..outer {
                let base = (o * a + start) * inner;
                out.extend_from_slice(&xd[base..base + len * inner]);
            }
            Ok(Tensor::cpu_from(&ctx, out, &shape))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, &shape)?;
            launch(&ctx, "slice_read", x, &out, axis, start)?;
            Ok(out)
        }
    }
}

/// In place: positions `start..` of `axis` of `dst` are set to (or, with `accumulate`,
/// increased by) `src`, whose shape is dst's with that axis shorter.
pub fn write_axis(
    dst: &Tensor,
    axis: usize,
    start: usize,
    src: &Tensor,
    accumulate: bool,
) -> Result<()> {
    let _profile = crate::profile::scope("layout");
    let len = src.shape().get(axis).copied().unwrap_or(0);
    check_range("write_axis", dst.shape(), axis, start, len)?;
    let mut expected = dst.shape().to_vec();
    expected[axis] = len;
    if src.shape() != expected {
        return shape_err(
            "write_axis",
            format!("a source of shape {expected:?}"),
            src.shape(),
        );
    }
    match same_device("write_axis", &[dst, src])? {
        Device::Cpu(_) => {
            let (outer, a, inner) = around(dst.shape(), axis);
            let sd = src.cpu_data()?;
            let mut dd = dst.cpu_data_mut()?;
            for o in 0..outer {
                let base = (o * a + start) * inner;
                let row = &sd[o * len * inner..(o + 1) * len * inner];
                let out = &mut dd[base..base + len * inner];
                if accumulate {
                    out.iter_mut().zip(row).for_each(|(d, s)| *d += s);
                } else {
                    out.copy_from_slice(row);
                }
            }
            Ok(())
        }
        Device::Gpu(ctx) => {
            let entry = if accumulate {
                "slice_accumulate"
            } else {
                "slice_write"
            };
            launch(&ctx, entry, dst, src, axis, start)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, gpu_with_binding_limit, random};
    use proptest::prelude::*;

    fn check_on(g: &Device, shape: &[usize], axis: usize, start: usize, len: usize, seed: u64) {
        let cpu = Device::cpu();
        let x = random(shape, seed, &cpu);
        let gx = x.to_device(g).unwrap();
        let want = slice_axis(&x, axis, start, len).unwrap();
        assert_close(
            "slice_axis",
            &slice_axis(&gx, axis, start, len).unwrap(),
            &want,
            0.0,
            0.0,
        );
        let src = random(want.shape(), seed + 1, &cpu);
        for accumulate in [false, true] {
            let (dst, gdst) = (x.copy().unwrap(), x.to_device(g).unwrap().copy().unwrap());
            write_axis(&dst, axis, start, &src, accumulate).unwrap();
            write_axis(&gdst, axis, start, &src.to_device(g).unwrap(), accumulate).unwrap();
            assert_close("write_axis", &gdst, &dst, 0.0, 0.0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn slice_matches_cpu(a in 1usize..5, b in 1usize..20, c in 1usize..9, axis in 0usize..3, seed in 0u64..100, frac in 0.0f64..1.0) {
            let Some(g) = gpu() else { return Ok(()) };
            let shape = [a, b, c];
            let n = shape[axis];
            let start = ((n as f64) * frac) as usize % n;
            let len = 1 + (seed as usize % (n - start));
            check_on(&g, &shape, axis, start, len, seed);
        }
    }

    #[test]
    fn slice_cpu_matches_hand_worked_values() {
        let cpu = Device::cpu();
        // x = [[0 1 2], [3 4 5]]; columns 1..3 → [[1 2], [4 5]]
        let x = Tensor::from_vec((0..6).map(|v| v as f32).collect(), &[2, 3], &cpu).unwrap();
        assert_eq!(
            slice_axis(&x, 1, 1, 2).unwrap().to_vec().unwrap(),
            [1.0, 2.0, 4.0, 5.0]
        );
        let src = Tensor::from_vec(vec![10.0, 20.0], &[2, 1], &cpu).unwrap();
        write_axis(&x, 1, 0, &src, true).unwrap();
        assert_eq!(x.to_vec().unwrap(), [10.0, 1.0, 2.0, 23.0, 4.0, 5.0]);
        write_axis(&x, 1, 2, &src, false).unwrap();
        assert_eq!(x.to_vec().unwrap(), [10.0, 1.0, 10.0, 23.0, 4.0, 20.0]);
    }

    #[test]
    fn slice_matches_cpu_split_bindings() {
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        check_on(&g, &[40, 30, 3], 1, 5, 20, 3);
        check_on(&g, &[300, 7], 1, 2, 4, 4);
    }

    #[test]
    fn slice_ranges_are_checked() {
        let x = Tensor::zeros(&[2, 3], &Device::cpu()).unwrap();
        let e = slice_axis(&x, 1, 2, 2).unwrap_err().to_string();
        assert!(e.contains("2..4") && e.contains("length 3"), "{e}");
        let e = slice_axis(&x, 2, 0, 1).unwrap_err().to_string();
        assert!(e.contains("axis 2"), "{e}");
        let src = Tensor::zeros(&[3, 1], &Device::cpu()).unwrap();
        let e = write_axis(&x, 1, 0, &src, false).unwrap_err().to_string();
        assert!(e.contains("[2, 1]") && e.contains("[3, 1]"), "{e}");
    }
}
