//! Segmented gather matrix-vector product (`sgmv`): the LoRA terms of many adapters over one
//! batch in one launch, each row with its own adapter (Punica's SGMV, S-LoRA's batched LoRA).
//! **Forward only**: it serves adapters, it does not train them (there is no backward).
//!
//! Math, with x: (N, in) (or (…, in) with N the product of the leading axes), one adapter index
//! a_n per row, and `n_adapters` adapters stacked as A: (n_adapters, r, in),
//! B: (n_adapters, out, r), s: (n_adapters):
//!
//! ```text
//! h[n, :] = s[a_n] · A[a_n] · x[n, :]      (N, r)     "shrink"
//! y[n, :] = B[a_n] · h[n, :]               (N, out)   "expand"
//! ```
//!
//! so `y[n] = s[a_n]·B[a_n]·A[a_n]·x[n]`, the LoRA term of row n's adapter (in this workspace's
//! row layout, `s·(x·Aᵀ)·Bᵀ` row by row). An index ≥ `n_adapters`, such as the sentinel
//! [`NO_ADAPTER`] (`u32::MAX`), means the row has no adapter: its y is zero. The indices are a
//! tensor made by [`Tensor::from_u32`], so one upload serves every layer of a forward pass.
//!
//! Why not one matmul per adapter? A batch of B sequences served by k adapters would then cost
//! k launches per layer, each over a gathered copy of its rows. Gathering each row's A and B
//! *inside* the kernel costs one pair of launches whatever the mix, and nothing is copied.
//! Punica's kernels tile the same computation; this one is the plain form: one invocation per
//! output element, each summing in ascending order, and the CPU path does exactly that.
//!
//! Kernel: `shaders/sgmv.wgsl`, two entry points (`sgmv_shrink`, then `sgmv_expand`). Rows are
//! cut into ranges whose x, h and y each fit one storage binding; A, B and the scales are bound
//! whole (every adapter of one site together must fit one binding: 128 MiB on lavapipe, far more
//! than the 2·r·(in + out)·4 bytes per adapter of a GPT-2 layer).

use std::sync::Arc;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

/// The index of a row without adapter (any index ≥ the number of adapters means the same).
pub const NO_ADAPTER: u32 = u32::MAX;

kernel_params! {
    /// The `Params` struct of `sgmv.wgsl`.
    struct Params {
        rows: u32,
        n_in: u32,
        n_out: u32,
        rank: u32,
        n_adapters: u32,
        off_idx: u32,
        off_scales: u32,
        off_x: u32,
        off_a: u32,
        off_h: u32,
        off_b: u32,
        off_y: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "sgmv",
        source: shaders::SGMV,
        entry,
    }
}

/// The sizes of one `sgmv` call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    rows: usize,
    n_in: usize,
    n_out: usize,
    rank: usize,
    n_adapters: usize,
}

/// Checks the operands against each other; returns the sizes.
fn dims(x: &Tensor, idx: &Tensor, a: &Tensor, b: &Tensor, scales: &Tensor) -> Result<Dims> {
    let &[n_adapters, rank, n_in] = a.shape() else {
        return shape_err("sgmv", "A of shape (n_adapters, r, in)", a.shape());
    };
    if b.shape().len() != 3 || b.shape()[0] != n_adapters || b.shape()[2] != rank {
        return shape_err(
            "sgmv",
            format!(
                "B of shape ({n_adapters}, out, {rank}) for A of shape {:?}",
                a.shape()
            ),
            b.shape(),
        );
    }
    if scales.shape() != [n_adapters] {
        return shape_err(
            "sgmv",
            format!("scales of shape [{n_adapters}]"),
            scales.shape(),
        );
    }
    if x.shape().is_empty() || x.last_dim() != n_in {
        return shape_err("sgmv", format!("x of shape (…, {n_in})"), x.shape());
    }
    let rows = x.numel() / n_in.max(1);
    if idx.shape() != [rows] {
        return shape_err(
            "sgmv",
            format!("{rows} adapter indices, one per row of x"),
            idx.shape(),
        );
    }
    Ok(Dims {
        rows,
        n_in,
        n_out: b.shape()[1],
        rank,
        n_adapters,
    })
}

/// `y[n] = s[a_n]·B[a_n]·A[a_n]·x[n]` for every row n of x (zero where a_n ≥ n_adapters).
///
/// x: (…, in); `idx`: N adapter indices from [`Tensor::from_u32`] (N = rows of x);
/// A: (n_adapters, r, in); B: (n_adapters, out, r); scales: (n_adapters). Returns (…, out).
pub fn sgmv(x: &Tensor, idx: &Tensor, a: &Tensor, b: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("sgmv");
    let d = dims(x, idx, a, b, scales)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("x has at least one axis") = d.n_out;
    match same_device("sgmv", &[x, idx, a, b, scales])? {
        Device::Cpu(ctx) => {
            let ids: Vec<u32> = idx.cpu_data()?.iter().map(|v| v.to_bits()).collect();
            let y = sgmv_cpu(
                &x.cpu_data()?,
                &ids,
                &a.cpu_data()?,
                &b.cpu_data()?,
                &scales.cpu_data()?,
                d,
            );
            Ok(Tensor::cpu_from(&ctx, y, &out_shape))
        }
        Device::Gpu(ctx) => {
            let y = Tensor::gpu_uninit(&ctx, &out_shape)?;
            if y.numel() > 0 {
                launch(&ctx, x, idx, a, b, scales, &y, d)?;
            }
            Ok(y)
        }
    }
}

/// The CPU path: the kernel's loops, row by row, summing in the same order.
fn sgmv_cpu(x: &[f32], idx: &[u32], a: &[f32], b: &[f32], s: &[f32], d: Dims) -> Vec<f32> {
    let mut y = vec![0.0; d.rows * d.n_out];
    crate::cpu::for_rows(&mut y, d.n_out, |n, y_row| {
        let adapter = idx[n] as usize;
        if adapter >= d.n_adapters {
            return; // no adapter: the row stays zero
        }
        let x_row = &x[n * d.n_in..(n + 1) * d.n_in];
        let a_k = |k: usize| &a[(adapter * d.rank + k) * d.n_in..][..d.n_in];
        let h: Vec<f32> = (0..d.rank)
            .map(|k| {
                let dot = a_k(k)
                    .iter()
                    .zip(x_row)
                    .fold(0.0, |acc, (w, v)| acc + w * v);
                dot * s[adapter]
            })
            .collect();
        for (j, out) in y_row.iter_mut().enumerate() {
            let b_j = &b[(adapter * d.n_out + j) * d.rank..][..d.rank];
            *out = b_j.iter().zip(&h).fold(0.0, |acc, (w, v)| acc + w * v);
        }
    });
    y
}

/// Shrink then expand over row ranges that fit the binding limit.
#[allow(clippy::too_many_arguments)]
fn launch(
    ctx: &Arc<GpuContext>,
    x: &Tensor,
    idx: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scales: &Tensor,
    y: &Tensor,
    d: Dims,
) -> Result<()> {
    let h = Tensor::gpu_uninit(ctx, &[d.rows, d.rank])?;
    let max_groups = ctx.limits.max_compute_workgroups_per_dimension;
    for (n0, rows) in ctx.row_chunks(d.rows, &[d.n_in, d.n_out, d.rank, 1])? {
        if rows == 0 {
            continue;
        }
        // The row range of each per-row operand; the stacks and scales whole.
        let iv = || ctx.view(idx, n0, rows);
        let hv = || ctx.view(&h, n0 * d.rank, rows * d.rank);
        let (xv, yv) = (
            ctx.view(x, n0 * d.n_in, rows * d.n_in)?,
            ctx.view(y, n0 * d.n_out, rows * d.n_out)?,
        );
        let (av, bv, sv) = (ctx.view_all(a)?, ctx.view_all(b)?, ctx.view_all(scales)?);
        let params = Params {
            rows: rows as u32,
            n_in: d.n_in as u32,
            n_out: d.n_out as u32,
            rank: d.rank as u32,
            n_adapters: d.n_adapters as u32,
            off_idx: iv()?.offset,
            off_scales: sv.offset,
            off_x: xv.offset,
            off_a: av.offset,
            off_h: hv()?.offset,
            off_b: bv.offset,
            off_y: yv.offset,
        };
        let params = bytemuck::bytes_of(&params);
        let shrink = [
            (1, iv()?.binding),
            (2, sv.binding),
            (3, xv.binding),
            (4, av.binding),
            (5, hv()?.binding),
        ];
        let groups = grid_2d(rows * d.rank, 64, max_groups);
        ctx.dispatch(kernel("sgmv_shrink"), params, &shrink, groups)?;
        let expand = [
            (1, iv()?.binding),
            (6, hv()?.binding),
            (7, bv.binding),
            (8, yv.binding),
        ];
        let groups = grid_2d(rows * d.n_out, 64, max_groups);
        ctx.dispatch(kernel("sgmv_expand"), params, &expand, groups)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "sgmv_tests.rs"]
mod tests;
