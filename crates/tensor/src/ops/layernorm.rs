//! Layer norm over the last axis, with learned scale γ and shift β, and its backward.
//!
//! x: (…, C) is viewed as rows of length C; γ, β: (C). Per row, with biased variance:
//!   μ = (1/C)·Σ_c x_c,   σ² = (1/C)·Σ_c (x_c − μ)²,   rstd = 1/√(σ² + eps)   (GPT-2: eps = 1e-5)
//!   x̂_c = (x_c − μ)·rstd,   y_c = γ_c·x̂_c + β_c
//! σ² is the mean of squared deviations from μ (two passes over the row), never `E[x²] − μ²`, which
//! cancels catastrophically when |μ| ≫ σ.
//!
//! Saved for the backward: μ and rstd per row ([`LayerNormOut::mean`], [`LayerNormOut::rstd`],
//! shape (rows)); x̂ is recomputed from x, μ and rstd rather than stored (it is as big as x).
//!
//! Backward, with g = dy ⊙ γ (the gradient reaching x̂) and means over the row's C columns:
//!   dx = rstd·(g − mean(g) − x̂·mean(g·x̂))
//! (x̂ depends on x directly and through μ and rstd: ∂x̂_k/∂x_c = rstd·(δ_ck − 1/C − x̂_k·x̂_c/C)),
//!   dγ = Σ_rows dy ⊙ x̂,   dβ = Σ_rows dy.
//! dγ and dβ are computed only when asked (`params`): with γ and β frozen (LoRA) the backward is
//! dx alone, one kernel on the GPU instead of three.
//!
//! The CPU path computes the row statistics and the sums of the backward in f64 and the
//! elementwise parts in f32 (as the kernels do). The kernels
//! (`shaders/layernorm.wgsl`) run one workgroup of 256 per row with workgroup-memory tree
//! reductions, shifting each row by its first element before summing (so rows like 1e4 + noise
//! stay accurate in f32); dγ and dβ are summed over rows deterministically, per block of
//! `BLOCK_ROWS` (32) rows and then per column, in a fixed order.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

/// Rows per partial sum of dγ, dβ in the GPU backward.
const BLOCK_ROWS: usize = 32;

kernel_params! {
    /// The `Params` struct of `layernorm.wgsl`.
    struct Params {
        rows: u32,
        cols: u32,
        off_x: u32,
        off_dy: u32,
        off_out: u32,
        off_mean: u32,
        off_rstd: u32,
        off_gamma: u32,
        off_beta: u32,
        eps: f32,
        block_rows: u32,
        nblocks: u32,
        accumulate: u32,
        add_dx: u32,
        off_res: u32,
        off_h: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "layernorm",
        source: shaders::LAYERNORM,
        entry,
    }
}

/// What the forward returns: the output and the per-row statistics the backward needs.
pub struct LayerNormOut {
    /// γ ⊙ x̂ + β, the shape of x.
    pub y: Tensor,
    /// μ per row: (rows), rows = numel / C.
    pub mean: Tensor,
    /// 1/√(σ² + eps) per row: (rows).
    pub rstd: Tensor,
}

/// Gradients of the loss with respect to the three inputs.
pub struct LayerNormGrads {
    /// The shape of x.
    pub dx: Tensor,
    /// (C); `None` unless the backward was asked for the parameters' gradients.
    pub dgamma: Option<Tensor>,
    /// (C); as `dgamma`.
    pub dbeta: Option<Tensor>,
}

fn check_param(op: &'static str, what: &str, t: &Tensor, c: usize) -> Result<()> {
    if t.shape() != [c] {
        return shape_err(
            op,
            format!("{what} of shape [{c}] (the last axis of x)"),
            t.shape(),
        );
    }
    Ok(())
}

/// μ and σ² of one row, in f64, two passes.
fn row_stats(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mu = xs.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = xs.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n;
    (mu, var)
}

/// Layer norm of x: (…, C) over its last axis with γ, β: (C); see the module doc.
pub fn layernorm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<LayerNormOut> {
    let _profile = crate::profile::scope("layernorm");
    let c = x.last_dim();
    if x.shape().is_empty() || c == 0 {
        return shape_err("layernorm", "x of shape (…, C) with C ≥ 1", x.shape());
    }
    check_param("layernorm", "gamma", gamma, c)?;
    check_param("layernorm", "beta", beta, c)?;
    let rows = x.numel() / c;
    match same_device("layernorm", &[x, gamma, beta])? {
        Device::Cpu(ctx) => {
            let (xd, gd, bd) = (x.cpu_data()?, gamma.cpu_data()?, beta.cpu_data()?);
            let eps = eps as f64;
            let mut y = vec![0.0; xd.len()];
            let mut stats = vec![0.0; 2 * rows];
            crate::cpu::for_row_pairs(&mut y, c, &mut stats, 2, |r, row, st| {
                let xs = &xd[r * c..(r + 1) * c];
                let (mu, var) = row_stats(xs);
                let rs = (1.0 / (var + eps).sqrt()) as f32;
                // x − μ in f64: μ rounded to f32 would cost rows like 1e4 + noise their digits.
                for ((o, &x), (&g, &b)) in row.iter_mut().zip(xs).zip(gd.iter().zip(bd.iter())) {
                    *o = ((x as f64 - mu) as f32) * rs * g + b;
                }
                st[0] = mu as f32;
                st[1] = rs;
            });
            let (mean, rstd) = stats.chunks(2).map(|s| (s[0], s[1])).unzip();
            Ok(LayerNormOut {
                y: Tensor::cpu_from(&ctx, y, x.shape()),
                mean: Tensor::cpu_from(&ctx, mean, &[rows]),
                rstd: Tensor::cpu_from(&ctx, rstd, &[rows]),
            })
        }
        Device::Gpu(ctx) => {
            let max = ctx.limits.max_compute_workgroups_per_dimension;
            forward_gpu(&ctx, x, None, gamma, beta, eps, max)
        }
    }
}

/// A residual addition and the layer norm of its sum: `h = x + res`, then [`layernorm`] of h,
/// both returned (the residual stream h goes on; the normalised y feeds the next sublayer).
/// On the GPU one kernel reads x and res once and writes h and y (an addition kernel and a
/// layer-norm kernel would read h again); the numbers are those of the two ops, to the bit.
pub fn add_layernorm(
    x: &Tensor,
    res: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Tensor, LayerNormOut)> {
    let op = "add_layernorm";
    if res.shape() != x.shape() {
        return shape_err(
            op,
            format!("res of the shape of x, {:?}", x.shape()),
            res.shape(),
        );
    }
    match same_device(op, &[x, res, gamma, beta])? {
        Device::Cpu(_) => {
            let h = crate::ops::elementwise::add(x, res)?;
            let out = layernorm(&h, gamma, beta, eps)?;
            Ok((h, out))
        }
        Device::Gpu(ctx) => {
            let _profile = crate::profile::scope("layernorm");
            let c = x.last_dim();
            if x.shape().is_empty() || c == 0 {
                return shape_err(op, "x of shape (…, C) with C ≥ 1", x.shape());
            }
            check_param(op, "gamma", gamma, c)?;
            check_param(op, "beta", beta, c)?;
            let h = Tensor::gpu_uninit(&ctx, x.shape())?;
            let max = ctx.limits.max_compute_workgroups_per_dimension;
            let out = forward_gpu(&ctx, x, Some((res, &h)), gamma, beta, eps, max)?;
            Ok((h, out))
        }
    }
}

/// The GPU forward, on grids of at most `max_groups` workgroups per dimension.
/// With `residual = Some((res, h))` the kernel normalises h = x + res and writes h too.
fn forward_gpu(
    ctx: &Arc<GpuContext>,
    x: &Tensor,
    residual: Option<(&Tensor, &Tensor)>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    max_groups: u32,
) -> Result<LayerNormOut> {
    let c = x.last_dim();
    let rows = x.numel() / c;
    let out = LayerNormOut {
        y: Tensor::gpu_uninit(ctx, x.shape())?,
        mean: Tensor::gpu_uninit(ctx, &[rows])?,
        rstd: Tensor::gpu_uninit(ctx, &[rows])?,
    };
    for (start, len) in ctx.row_chunks(rows, &[c])? {
        if len == 0 {
            continue;
        }
        let (xv, yv) = (
            ctx.view(x, start * c, len * c)?,
            ctx.view(&out.y, start * c, len * c)?,
        );
        let (mv, rv) = (
            ctx.view(&out.mean, start, len)?,
            ctx.view(&out.rstd, start, len)?,
        );
        let (gv, bv) = (ctx.view_all(gamma)?, ctx.view_all(beta)?);
        let mut params = Params {
            rows: len as u32,
            cols: c as u32,
            off_x: xv.offset,
            off_out: yv.offset,
            off_mean: mv.offset,
            off_rstd: rv.offset,
            off_gamma: gv.offset,
            off_beta: bv.offset,
            eps,
            ..Zeroable::zeroed()
        };
        let mut bindings = vec![
            (1, xv.binding),
            (2, gv.binding),
            (3, bv.binding),
            (5, mv.binding),
            (6, rv.binding),
            (7, yv.binding),
        ];
        let mut entry = "layernorm_forward";
        if let Some((res, h)) = residual {
            let (resv, hv) = (
                ctx.view(res, start * c, len * c)?,
                ctx.view(h, start * c, len * c)?,
            );
            params.off_res = resv.offset;
            params.off_h = hv.offset;
            bindings.extend([(12, resv.binding), (13, hv.binding)]);
            entry = "add_layernorm_forward";
        }
        let groups = grid_2d(len, 1, max_groups);
        ctx.dispatch(
            kernel(entry),
            bytemuck::bytes_of(&params),
            &bindings,
            groups,
        )?;
    }
    Ok(out)
}

/// Gradients of layer norm from the forward's input x, γ, its saved `mean` and `rstd`, and dy
/// (the shape of x); see the module doc. dγ and dβ are computed only when `params` is set.
pub fn layernorm_backward(
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    params: bool,
) -> Result<LayerNormGrads> {
    layernorm_backward_into(x, gamma, mean, rstd, dy, params, None)
}

/// [`layernorm_backward`] with dx added into `acc` (the shape of x) in the same pass, `acc += dx`,
/// when given: the returned `dx` is then `acc` itself. For a value whose gradient is a sum (the
/// residual stream feeds both a layer norm and the next residual addition), this replaces an
/// addition kernel. `acc` must not share storage with x, dy or γ.
pub fn layernorm_backward_into(
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    params: bool,
    acc: Option<Tensor>,
) -> Result<LayerNormGrads> {
    let _profile = crate::profile::scope("layernorm");
    let op = "layernorm_backward";
    let c = x.last_dim();
    if x.shape().is_empty() || c == 0 {
        return shape_err(op, "x of shape (…, C) with C ≥ 1", x.shape());
    }
    check_param(op, "gamma", gamma, c)?;
    let rows = x.numel() / c;
    for (what, t) in [("mean", mean), ("rstd", rstd)] {
        if t.shape() != [rows] {
            return shape_err(
                op,
                format!("{what} of shape [{rows}] (one per row of x)"),
                t.shape(),
            );
        }
    }
    if dy.shape() != x.shape() {
        return shape_err(
            op,
            format!("dy of the shape of x, {:?}", x.shape()),
            dy.shape(),
        );
    }
    if let Some(acc) = &acc {
        if acc.shape() != x.shape() {
            return shape_err(
                op,
                format!("a gradient to add into of the shape of x, {:?}", x.shape()),
                acc.shape(),
            );
        }
        if [x, dy, gamma].iter().any(|t| acc.same_storage(t)) {
            return Err(crate::Error::Invalid(format!(
                "{op}: the gradient to add into must not share storage with x, dy or gamma"
            )));
        }
        same_device(op, &[acc, x])?;
    }
    match same_device(op, &[x, gamma, mean, rstd, dy])? {
        Device::Cpu(ctx) => {
            let (xd, gd, dyd) = (x.cpu_data()?, gamma.cpu_data()?, dy.cpu_data()?);
            let (md, rd) = (mean.cpu_data()?, rstd.cpu_data()?);
            let mut fresh = Vec::new();
            let mut acc_data = acc.as_ref().map(|t| t.cpu_data_mut()).transpose()?;
            let add = acc_data.is_some();
            let dx: &mut Vec<f32> = match &mut acc_data {
                Some(d) => d,
                None => {
                    fresh.resize(xd.len(), 0.0);
                    &mut fresh
                }
            };
            crate::cpu::for_rows(dx, c, |r, row| {
                let (xs, dys) = (&xd[r * c..(r + 1) * c], &dyd[r * c..(r + 1) * c]);
                let (m, rs) = (md[r] as f64, rd[r]);
                let xhat = |x: f32| ((x as f64 - m) as f32) * rs;
                // Σ g and Σ g·x̂ over the row, g = dy·γ, in f64.
                let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                for ((&x, &d), &ga) in xs.iter().zip(dys).zip(gd.iter()) {
                    let g = d * ga;
                    sg += g as f64;
                    sgx += (g * xhat(x)) as f64;
                }
                let (mg, mgx) = ((sg / c as f64) as f32, (sgx / c as f64) as f32);
                for (((o, &x), &d), &ga) in row.iter_mut().zip(xs).zip(dys).zip(gd.iter()) {
                    let v = rs * (d * ga - mg - xhat(x) * mgx);
                    *o = if add { *o + v } else { v };
                }
            });
            drop(acc_data);
            let dx = match acc {
                Some(acc) => acc,
                None => Tensor::cpu_from(&ctx, fresh, x.shape()),
            };
            if !params {
                return Ok(LayerNormGrads {
                    dx,
                    dgamma: None,
                    dbeta: None,
                });
            }
            let (mut dg, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
            for r in 0..rows {
                let (xs, dys) = (&xd[r * c..(r + 1) * c], &dyd[r * c..(r + 1) * c]);
                let (m, rs) = (md[r] as f64, rd[r]);
                for (((g, b), &x), &d) in dg.iter_mut().zip(db.iter_mut()).zip(xs).zip(dys) {
                    *g += (d * (((x as f64 - m) as f32) * rs)) as f64;
                    *b += d as f64;
                }
            }
            let f32s = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
            Ok(LayerNormGrads {
                dx,
                dgamma: Some(Tensor::cpu_from(&ctx, f32s(dg), &[c])),
                dbeta: Some(Tensor::cpu_from(&ctx, f32s(db), &[c])),
            })
        }
        Device::Gpu(ctx) => {
            let max = ctx.limits.max_compute_workgroups_per_dimension;
            backward_gpu(&ctx, x, gamma, mean, rstd, dy, params, acc, max)
        }
    }
}

/// The GPU backward, on grids of at most `max` workgroups per dimension: per row chunk, the dx
/// kernel, then (with `with_params`) the partial sums of dγ, dβ and their per-column totals.
#[allow(clippy::too_many_arguments)]
fn backward_gpu(
    ctx: &Arc<GpuContext>,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    with_params: bool,
    acc: Option<Tensor>,
    max: u32,
) -> Result<LayerNormGrads> {
    let c = x.last_dim();
    let rows = x.numel() / c;
    let device = Device::Gpu(ctx.clone());
    let add_dx = acc.is_some();
    if rows == 0 {
        let zeros = |shape: &[usize]| Tensor::zeros(shape, &device);
        return Ok(LayerNormGrads {
            dx: acc.map_or_else(|| zeros(x.shape()), Ok)?,
            dgamma: with_params.then(|| zeros(&[c])).transpose()?,
            dbeta: with_params.then(|| zeros(&[c])).transpose()?,
        });
    }
    let uninit = |shape: &[usize]| Tensor::gpu_uninit(ctx, shape);
    let grads = LayerNormGrads {
        dx: acc.map_or_else(|| uninit(x.shape()), Ok)?,
        dgamma: with_params.then(|| uninit(&[c])).transpose()?,
        dbeta: with_params.then(|| uninit(&[c])).transpose()?,
    };
    let chunks = ctx.row_chunks(rows, &[c])?;
    // Partial sums, one per (block of BLOCK_ROWS rows, column) of a chunk; no larger than the
    // chunk's slice of x, so they fit one binding.
    let most = chunks
        .iter()
        .map(|&(_, len)| len.div_ceil(BLOCK_ROWS))
        .max()
        .unwrap_or(1)
        * c;
    let parts = match (&grads.dgamma, &grads.dbeta) {
        (Some(dg), Some(db)) => Some((uninit(&[most])?, uninit(&[most])?, dg, db)),
        _ => None,
    };
    for (k, &(start, len)) in chunks.iter().enumerate() {
        // Views cannot be copied, so each dispatch takes fresh ones (same ranges, same offsets).
        let wide = |t| ctx.view(t, start * c, len * c);
        let narrow = |t| ctx.view(t, start, len);
        let nblocks = len.div_ceil(BLOCK_ROWS);
        let blocks = |t| ctx.view(t, 0, nblocks * c);
        let (xv, dyv, dxv) = (wide(x)?, wide(dy)?, wide(&grads.dx)?);
        let (mv, rv, gv) = (narrow(mean)?, narrow(rstd)?, ctx.view_all(gamma)?);
        let params = Params {
            rows: len as u32,
            cols: c as u32,
            off_x: xv.offset,
            off_dy: dyv.offset,
            off_out: dxv.offset,
            off_mean: mv.offset,
            off_rstd: rv.offset,
            off_gamma: gv.offset,
            block_rows: BLOCK_ROWS as u32,
            nblocks: nblocks as u32,
            accumulate: (k > 0) as u32,
            add_dx: add_dx.into(),
            ..Zeroable::zeroed()
        };
        let params = bytemuck::bytes_of(&params);
        let (xb, gb, dyb) = (xv.binding, gv.binding, dyv.binding);
        let bindings = [
            (1, xb),
            (2, gb),
            (4, dyb),
            (5, mv.binding),
            (6, rv.binding),
            (7, dxv.binding),
        ];
        ctx.dispatch(
            kernel("layernorm_backward"),
            params,
            &bindings,
            grid_2d(len, 1, max),
        )?;
        let Some((part_g, part_b, dgamma, dbeta)) = &parts else {
            continue;
        };
        let (xb, dyb, mb, rb) = (
            wide(x)?.binding,
            wide(dy)?.binding,
            narrow(mean)?.binding,
            narrow(rstd)?.binding,
        );
        let bindings = [
            (1, xb),
            (4, dyb),
            (5, mb),
            (6, rb),
            (8, blocks(part_g)?.binding),
            (9, blocks(part_b)?.binding),
        ];
        let groups = grid_2d(nblocks * c, 256, max);
        ctx.dispatch(
            kernel("layernorm_backward_partials"),
            params,
            &bindings,
            groups,
        )?;
        let (dgb, dbb) = (ctx.view_all(dgamma)?.binding, ctx.view_all(dbeta)?.binding);
        let bindings = [
            (8, blocks(part_g)?.binding),
            (9, blocks(part_b)?.binding),
            (10, dgb),
            (11, dbb),
        ];
        ctx.dispatch(
            kernel("layernorm_backward_params"),
            params,
            &bindings,
            grid_2d(c, 256, max),
        )?;
    }
    Ok(grads)
}

#[cfg(test)]
#[path = "layernorm_tests.rs"]
mod tests;
