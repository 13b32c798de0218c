//! Attention head split and merge: the permutes between (B, T, C) activations and (B, NH, T, hs)
//! per-head tensors, with C = NH·hs.
//!
//! Math (x: (B, T, W), rows of width W, of which the C columns from `col0` are used; a 2-D x of
//! shape (T, W) is taken as B = 1):
//! - `split_heads(x, nh, col0, c)[b, h, t, d] = x[b, t, col0 + h·hs + d]`, shape (B, NH, T, hs).
//!   Splitting the fused q,k,v projection (B, T, 3C) with col0 = 0, C, 2C gives q, k and v.
//! - `merge_heads(y)[b, t, h·hs + d] = y[b, h, t, d]`, shape (B, T, NH·hs).
//! - `merge_heads_into(dst, col0, y)`: in place, `dst[b, t, col0 + h·hs + d] = y[b, h, t, d]`;
//!   the other columns of dst are left as they are.
//!
//! Backward (both are permutations, so each one's gradient is the other one):
//! - of `split_heads`: `merge_heads_into(dx, col0, dy)`, where dx is the (B, T, W) gradient of x,
//!   zero (or already holding the other slices) elsewhere. The backward of q, k, v = split of one
//!   (B, T, 3C) tensor writes dq, dk, dv into one (B, T, 3C) gradient at col0 = 0, C, 2C.
//! - of `merge_heads`: `split_heads(dy, nh, 0, C)`.
//!
//! Kernel: `shaders/permute.wgsl`, one invocation per written element. A GPU launch is split over
//! whole batches so that every binding fits; one batch must fit in one binding.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Error, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `permute.wgsl`.
    struct Params {
        n: u32,
        t: u32,
        w: u32,
        c: u32,
        nh: u32,
        hs: u32,
        col0: u32,
        off_src: u32,
        off_dst: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// Sizes of one split or merge: (B, T, W) wide tensor, NH heads of hs, columns from col0.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    w: usize,
    nh: usize,
    hs: usize,
    col0: usize,
}

impl Dims {
    fn c(&self) -> usize {
        self.nh * self.hs
    }
}

/// (B, T, W) of a (B, T, W) or (T, W) tensor.
fn wide_dims(op: &'static str, x: &Tensor) -> Result<(usize, usize, usize)> {
    match *x.shape() {
        [t, w] => Ok((1, t, w)),
        [b, t, w] => Ok((b, t, w)),
        ref s => shape_err(op, "a (B, T, W) or (T, W) tensor", s),
    }
}

/// Check that the C = NH·hs columns from col0 fit in rows of width W.
fn check_cols(op: &'static str, d: &Dims) -> Result<()> {
    if d.col0 + d.c() > d.w {
        return shape_err(
            op,
            format!(
                "columns {}..{} (col0 + NH·hs) within rows of width {}",
                d.col0,
                d.col0 + d.c(),
                d.w
            ),
            format!("width {}", d.w),
        );
    }
    Ok(())
}

/// Launch `entry` ("split_heads" or "merge_heads") between the wide tensor and the heads tensor,
/// split over whole batches.
fn launch(
    ctx: &Arc<GpuContext>,
    entry: &'static str,
    wide: &Tensor,
    heads: &Tensor,
    d: Dims,
) -> Result<()> {
    let c = d.c();
    let (wide_per_b, heads_per_b) = (d.t * d.w, d.nh * d.t * d.hs);
    if wide.numel().max(heads.numel()) > u32::MAX as usize {
        return Err(Error::Limit {
            limit: "elements addressable by a u32 index",
            needed: wide.numel().max(heads.numel()) as u64,
            available: u32::MAX as u64,
        });
    }
    let kernel = Kernel {
        shader: "permute",
        source: shaders::PERMUTE,
        entry,
    };
    for (b0, nb) in ctx.row_chunks(d.b, &[wide_per_b, heads_per_b])? {
        let n = nb * d.t * c;
        if n == 0 {
            continue;
        }
        let wv = ctx.view(wide, b0 * wide_per_b, nb * wide_per_b)?;
        let hv = ctx.view(heads, b0 * heads_per_b, nb * heads_per_b)?;
        // split: src = wide, dst = heads; merge: src = heads, dst = wide.
        let (src, dst) = if entry == "split_heads" {
            (wv, hv)
        } else {
            (hv, wv)
        };
        let params = Params {
            n: n as u32,
            t: d.t as u32,
            w: d.w as u32,
            c: c as u32,
            nh: d.nh as u32,
            hs: d.hs as u32,
            col0: d.col0 as u32,
            off_src: src.offset,
            off_dst: dst.offset,
            ..Zeroable::zeroed()
        };
        let groups = grid_2d(n, 256, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.dispatch(
            kernel,
            bytemuck::bytes_of(&params),
            &[(1, src.binding), (2, dst.binding)],
            groups,
        )?;
    }
    Ok(())
}

/// Heads `nh` of the C = `c` columns of x: (B, T, W) starting at `col0`, as (B, NH, T, hs):
/// `out[b, h, t, d] = x[b, t, col0 + h·hs + d]`. A (T, W) x is taken as B = 1.
pub fn split_heads(x: &Tensor, nh: usize, col0: usize, c: usize) -> Result<Tensor> {
    let _profile = crate::profile::scope("layout");
    let (b, t, w) = wide_dims("split_heads", x)?;
    if nh == 0 || !c.is_multiple_of(nh) {
        return shape_err(
            "split_heads",
            format!("C = {c} divisible by NH = {nh}"),
            x.shape(),
        );
    }
    let d = Dims {
        b,
        t,
        w,
        nh,
        hs: c / nh,
        col0,
    };
    check_cols("split_heads", &d)?;
    let shape = [b, nh, t, d.hs];
    match x.device() {
        Device::Cpu(ctx) => {
            let xd = x.cpu_data()?;
            let mut out = vec![0.0; shape.iter().product()];
            // Row r of hs elements is (b, h, t) = (r / (NH·T), r / T % NH, r % T).
            crate::cpu::for_rows(&mut out, d.hs, |r, row| {
                let (bi, h, ti) = (r / (nh * t), r / t % nh, r % t);
                let start = (bi * t + ti) * w + col0 + h * d.hs;
                row.copy_from_slice(&xd[start..start + d.hs]);
            });
            Ok(Tensor::cpu_from(&ctx, out, &shape))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, &shape)?;
            launch(&ctx, "split_heads", x, &out, d)?;
            Ok(out)
        }
    }
}

/// (B, NH, T, hs) → (B, T, NH·hs): `out[b, t, h·hs + d] = x[b, h, t, d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("layout");
    let &[b, nh, t, hs] = x.shape() else {
        return shape_err("merge_heads", "a (B, NH, T, hs) tensor", x.shape());
    };
    let out = Tensor::uninit(&[b, t, nh * hs], &x.device())?;
    merge_heads_into(&out, 0, x)?;
    Ok(out)
}

/// In place: `dst[b, t, col0 + h·hs + d] = x[b, h, t, d]` for x: (B, NH, T, hs) and dst: (B, T, W)
/// (or (T, W) with B = 1); the other columns of dst are untouched.
pub fn merge_heads_into(dst: &Tensor, col0: usize, x: &Tensor) -> Result<()> {
    let _profile = crate::profile::scope("layout");
    let &[xb, nh, xt, hs] = x.shape() else {
        return shape_err("merge_heads_into", "x of shape (B, NH, T, hs)", x.shape());
    };
    let (b, t, w) = wide_dims("merge_heads_into", dst)?;
    if (b, t) != (xb, xt) {
        return shape_err(
            "merge_heads_into",
            format!(
                "dst of shape ({xb}, {xt}, W) for x of shape {:?}",
                x.shape()
            ),
            dst.shape(),
        );
    }
    let d = Dims {
        b,
        t,
        w,
        nh,
        hs,
        col0,
    };
    check_cols("merge_heads_into", &d)?;
    if dst.same_storage(x) {
        return Err(Error::Invalid(
            "merge_heads_into: dst and x share their storage".into(),
        ));
    }
    match same_device("merge_heads_into", &[dst, x])? {
        Device::Cpu(_) => {
            let xd = x.cpu_data()?;
            let mut out = dst.cpu_data_mut()?;
            // Row r of W elements is (b, t) = (r / T, r % T).
            crate::cpu::for_rows(&mut out, w, |r, row| {
                let (bi, ti) = (r / t, r % t);
                for h in 0..nh {
                    let start = ((bi * nh + h) * t + ti) * hs;
                    row[col0 + h * hs..col0 + (h + 1) * hs].copy_from_slice(&xd[start..start + hs]);
                }
            });
            Ok(())
        }
        Device::Gpu(ctx) => launch(&ctx, "merge_heads", dst, x, d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, gpu, gpu_with_binding_limit, random, sizes};
    use proptest::prelude::*;

    /// split q, k, v of a (B, T, 3C + extra) tensor, merge them back into a copy: GPU and CPU
    /// must agree exactly (pure copies).
    fn check_round_trip(
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        extra: usize,
        g: &Device,
        seed: u64,
    ) {
        let c = nh * hs;
        let cpu = Device::cpu();
        let x = random(&[b, t, 3 * c + extra], seed, &cpu);
        let gx = x.to_device(g).unwrap();
        let dst = random(&[b, t, 3 * c + extra], seed + 1, &cpu);
        let gdst = dst.to_device(g).unwrap();
        for col0 in [0, c, 2 * c] {
            let (want, got) = (
                split_heads(&x, nh, col0, c).unwrap(),
                split_heads(&gx, nh, col0, c).unwrap(),
            );
            assert_eq!(want.shape(), [b, nh, t, hs]);
            assert_close("split_heads", &got, &want, 0.0, 0.0);
            assert_close(
                "merge_heads",
                &merge_heads(&got).unwrap(),
                &merge_heads(&want).unwrap(),
                0.0,
                0.0,
            );
            merge_heads_into(&dst, col0, &want).unwrap();
            merge_heads_into(&gdst, col0, &got).unwrap();
        }
        assert_close("merge_heads_into", &gdst, &dst, 0.0, 0.0);
        // q, k, v merged back at their columns rebuild x there; the extra columns keep dst's values.
        let (xd, dd) = (x.to_vec().unwrap(), dst.to_vec().unwrap());
        let w = 3 * c + extra;
        for (i, (&xv, &dv)) in xd.iter().zip(&dd).enumerate() {
            if i % w < 3 * c {
                assert_eq!(xv, dv, "element {i}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn split_heads_matches_cpu(b in 1usize..4, t in sizes(), nh in 1usize..5, hs in 1usize..10,
                                   extra in 0usize..3, seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            check_round_trip(b, t, nh, hs, extra, &g, seed);
        }
    }

    #[test]
    fn split_heads_cpu_matches_naive_indexing() {
        let (b, t, nh, hs, w, col0) = (2, 3, 2, 4, 19, 5);
        let xs: Vec<f32> = (0..b * t * w).map(|i| i as f32).collect();
        let x = Tensor::from_vec(xs.clone(), &[b, t, w], &Device::cpu()).unwrap();
        let y = split_heads(&x, nh, col0, nh * hs)
            .unwrap()
            .to_vec()
            .unwrap();
        let m = merge_heads(&split_heads(&x, nh, col0, nh * hs).unwrap()).unwrap();
        assert_eq!(m.shape(), [b, t, nh * hs]);
        let m = m.to_vec().unwrap();
        for bi in 0..b {
            for h in 0..nh {
                for ti in 0..t {
                    for d in 0..hs {
                        let want = xs[(bi * t + ti) * w + col0 + h * hs + d];
                        assert_eq!(y[((bi * nh + h) * t + ti) * hs + d], want);
                        assert_eq!(m[(bi * t + ti) * nh * hs + h * hs + d], want);
                    }
                }
            }
        }
        // A (T, W) input is one batch.
        let x2 = x.reshape(&[b * t, w]).unwrap();
        let y2 = split_heads(&x2, nh, col0, nh * hs).unwrap();
        assert_eq!(y2.shape(), [1, nh, b * t, hs]);
        let Some(g) = gpu() else { return };
        assert_close(
            "2-D",
            &split_heads(&x2.to_device(&g).unwrap(), nh, col0, nh * hs).unwrap(),
            &y2,
            0.0,
            0.0,
        );
    }

    #[test]
    fn permute_large_tensors_are_split_over_bindings() {
        // 4 KiB bindings: (7, 13, 3·12 + 1) holds 481 elements per batch, so ~2 batches per dispatch.
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        check_round_trip(7, 13, 3, 4, 1, &g, 3);
        // One batch larger than a binding is an error, not a wrong answer.
        let x = Tensor::zeros(&[1, 1000, 3], &g).unwrap();
        assert!(matches!(split_heads(&x, 1, 0, 3), Err(Error::Limit { .. })));
    }

    #[test]
    fn permute_shapes_are_checked() {
        let cpu = Device::cpu();
        let x = Tensor::zeros(&[2, 3, 12], &cpu).unwrap();
        let e = split_heads(&x, 5, 0, 12).unwrap_err().to_string();
        assert!(e.contains("divisible by NH = 5"), "{e}");
        let e = split_heads(&x, 2, 8, 8).unwrap_err().to_string();
        assert!(e.contains("columns 8..16") && e.contains("width 12"), "{e}");
        let e = merge_heads(&x).unwrap_err().to_string();
        assert!(
            e.contains("(B, NH, T, hs)") && e.contains("[2, 3, 12]"),
            "{e}"
        );
        let y = Tensor::zeros(&[2, 2, 4, 3], &cpu).unwrap();
        let e = merge_heads_into(&x, 0, &y).unwrap_err().to_string();
        assert!(e.contains("(2, 4, W)") && e.contains("[2, 3, 12]"), "{e}");
    }
}
