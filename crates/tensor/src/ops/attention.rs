//! Fused causal self-attention (flash-attention's algorithm), forward and backward, reading q, k
//! and v straight from the fused projection and never forming the (B, NH, T, T) score matrix.
//!
//! Layout: qkv (B, T, 3C) is the output of GPT-2's `c_attn`; for head h of NH (hs = C / NH),
//!   q_i = qkv[b, i, h·hs .. (h+1)·hs],  k_j = qkv[b, j, C + h·hs ..],  v_j = qkv[b, j, 2C + h·hs ..].
//! The output y (B, T, C) is already in merged-head layout: y[b, i, h·hs + d]. Beside it the
//! forward returns lse (B, NH, T), the log-sum-exp of each row of scaled, masked scores, which is
//! all the backward keeps of the softmax.
//!
//! Forward, per (b, h) and query i (the scale s is folded into the scores):
//!   S_ij = s·q_i·k_j for j ≤ i (the causal mask drops j > i)
//!   lse_i = log Σ_{j≤i} exp(S_ij),  P_ij = exp(S_ij − lse_i),  y_i = Σ_{j≤i} P_ij·v_j
//! Online softmax: keys are visited in tiles; each row keeps a running max m, a running sum
//! l = Σ exp(S − m) and an unnormalised accumulator a = Σ exp(S − m)·v. A new tile with scores
//! S_t rescales what came before by α = exp(m − m'), m' = max(m, max S_t):
//!   l ← α·l + Σ exp(S_t − m'),  a ← α·a + Σ exp(S_t − m')·v,  m ← m'
//! and at the end y_i = a / l, lse_i = m + log l. Every exponent is ≤ 0, so nothing overflows.
//! Key tiles that lie wholly above the diagonal (every key after every query of the tile) are
//! skipped, never computed and masked.
//!
//! Backward (flash-attention 2), given dy = ∂L/∂y:
//!   D_i = Σ_d dy_id·y_id                       (= Σ_j P_ij·dP_ij)
//!   P_ij = exp(s·q_i·k_j − lse_i)               (recomputed tile by tile)
//!   dv_j = Σ_i P_ij·dy_i,   dP_ij = dy_i·v_j,   dS_ij = P_ij·(dP_ij − D_i)
//!   dq_i = s·Σ_j dS_ij·k_j,  dk_j = s·Σ_i dS_ij·q_i
//! (dS is the softmax backward, dP ∘ P − P·Σ_j P·dP, with D in place of the row sum.) The three
//! gradients are written into one (B, T, 3C) tensor, in the column ranges of q, k and v.
//!
//! CPU (`ops/attention_cpu.rs`): one task per (b, h) spread over the cores, query and key
//! tiles of 64 rows, each pair of tiles a few small sgemm products on strided views, f32
//! arithmetic. Kernel: `shaders/attention.wgsl`,
//! one workgroup of 16 × 16 invocations per (query or key tile of 16, b·h, 64-column chunk of
//! hs), tiles of the operands in workgroup memory; the backward runs one pass per key tile (dk,
//! dv) and one per query tile (dq), so no two workgroups write the same element and no float
//! atomics are needed.

use std::sync::Arc;

use bytemuck::Zeroable;

use super::attention_cpu::{self as cpu, Dims};
use crate::gpu::bind::View;
use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `attention.wgsl`.
    struct Params {
        t: u32,
        nh: u32,
        hs: u32,
        c: u32,
        scale: f32,
        tiles: u32,
        chunks: u32,
        groups: u32,
        off_qkv: u32,
        off_y: u32,
        off_dy: u32,
        off_lse: u32,
        off_dsum: u32,
        off_out: u32,
        off_lse_out: u32,
        rows: u32,
    }
}

/// Rows of a tile of the WGSL kernels (queries and keys).
const GPU_TILE: usize = 16;
/// Columns of hs one workgroup accumulates.
const GPU_CHUNK: usize = 64;

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "attention",
        source: shaders::ATTENTION,
        entry,
    }
}

/// (B, T, C, NH, hs) of qkv (B, T, 3C) with NH heads, or an error naming `op`.
fn dims(op: &'static str, qkv: &Tensor, nh: usize) -> Result<Dims> {
    let s = qkv.shape();
    if s.len() != 3 || !s[2].is_multiple_of(3) || nh == 0 || !(s[2] / 3).is_multiple_of(nh) {
        return shape_err(
            op,
            format!("qkv of shape (B, T, 3C) with C divisible by NH = {nh}"),
            s,
        );
    }
    Ok(Dims {
        b: s[0],
        t: s[1],
        nh,
        hs: s[2] / 3 / nh,
    })
}

/// Records attention's products for the step accounting ([`crate::counts`]): each a
/// (B·NH) × T×T×hs (`square`: a T×T result) or T×hs×T product, of which only the causal
/// pairs (T(T+1)/2 of T²) are computed.
fn count_products(d: Dims, square: &[bool]) {
    let (batch, t, hs) = (d.b * d.nh, d.t, d.hs);
    let flops = (batch * hs * t * (t + 1)) as u64; // 2 · hs · T(T+1)/2 per head
    for &square in square {
        let (m, n, k) = if square { (t, t, hs) } else { (t, hs, t) };
        crate::counts::product(batch, m, n, k, false, square, flops);
    }
}

/// Causal attention of `nh` heads over qkv (B, T, 3C) with scores scaled by `scale`:
/// returns y (B, T, C) (heads merged) and lse (B, NH, T). See the module doc.
pub fn causal_attention(qkv: &Tensor, nh: usize, scale: f32) -> Result<(Tensor, Tensor)> {
    let _profile = crate::profile::scope("attention");
    let d = dims("causal_attention", qkv, nh)?;
    // S = s·Q·Kᵀ and Y = P·V, over the causal half only.
    count_products(d, &[true, false]);
    let device = qkv.device();
    let (y_shape, lse_shape) = ([d.b, d.t, d.c()], [d.b, nh, d.t]);
    if qkv.numel() == 0 {
        return Ok((
            Tensor::uninit(&y_shape, &device)?,
            Tensor::uninit(&lse_shape, &device)?,
        ));
    }
    match device {
        Device::Cpu(ctx) => {
            let (y, lse) = cpu::forward(&qkv.cpu_data()?, d, scale);
            Ok((
                Tensor::cpu_from(&ctx, y, &y_shape),
                Tensor::cpu_from(&ctx, lse, &lse_shape),
            ))
        }
        Device::Gpu(ctx) => {
            let y = Tensor::gpu_uninit(&ctx, &y_shape)?;
            let lse = Tensor::gpu_uninit(&ctx, &lse_shape)?;
            let ops = Operands {
                qkv,
                y: &y,
                dy: None,
                lse: &lse,
                dsum: None,
                out: &y,
            };
            launch(&ctx, &ops, d, scale)?;
            Ok((y, lse))
        }
    }
}

/// The gradient of qkv (B, T, 3C) from the forward's qkv, y, lse and dy = ∂L/∂y (B, T, C).
pub fn causal_attention_backward(
    qkv: &Tensor,
    y: &Tensor,
    lse: &Tensor,
    dy: &Tensor,
    nh: usize,
    scale: f32,
) -> Result<Tensor> {
    let _profile = crate::profile::scope("attention");
    let op = "causal_attention_backward";
    let d = dims(op, qkv, nh)?;
    for (name, t, want) in [
        ("y", y, vec![d.b, d.t, d.c()]),
        ("dy", dy, vec![d.b, d.t, d.c()]),
        ("lse", lse, vec![d.b, nh, d.t]),
    ] {
        if t.shape() != want.as_slice() {
            return shape_err(op, format!("{name} of shape {want:?}"), t.shape());
        }
    }
    let device = same_device(op, &[qkv, y, lse, dy])?;
    // S recomputed, dV = Pᵀ·dY, dP = dY·Vᵀ, dQ = dS·K, dK = dSᵀ·Q, over the causal half only
    // (the GPU kernel recomputes S and dP in its dQ pass too; counted once, as the math needs).
    count_products(d, &[true, false, true, false, false]);
    if qkv.numel() == 0 {
        return Tensor::zeros(qkv.shape(), &device);
    }
    match device {
        Device::Cpu(ctx) => {
            let dqkv = cpu::backward(
                &qkv.cpu_data()?,
                &y.cpu_data()?,
                &lse.cpu_data()?,
                &dy.cpu_data()?,
                d,
                scale,
            );
            Ok(Tensor::cpu_from(&ctx, dqkv, qkv.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, qkv.shape())?;
            let dsum = Tensor::gpu_uninit(&ctx, lse.shape())?;
            let ops = Operands {
                qkv,
                y,
                dy: Some(dy),
                lse,
                dsum: Some(&dsum),
                out: &out,
            };
            launch(&ctx, &ops, d, scale)?;
            Ok(out)
        }
    }
}

/// The tensors of one launch: the forward writes `out` (= y) and `lse`; the backward (`dy`
/// given) reads y and lse, writes D into `dsum` and the gradient into `out`.
struct Operands<'a> {
    qkv: &'a Tensor,
    y: &'a Tensor,
    dy: Option<&'a Tensor>,
    lse: &'a Tensor,
    dsum: Option<&'a Tensor>,
    out: &'a Tensor,
}

/// Sequences b0 .. b0 + nb of `x`, which holds `per` elements per sequence, bound.
fn sequences<'a>(
    ctx: &GpuContext,
    x: &'a Tensor,
    b0: usize,
    nb: usize,
    per: usize,
) -> Result<View<'a>> {
    ctx.view(x, b0 * per, nb * per)
}

/// Launch the forward (one pass) or the backward (D, then dk and dv, then dq) over chunks of
/// whole sequences that fit in one binding each.
fn launch(ctx: &Arc<GpuContext>, ops: &Operands, d: Dims, scale: f32) -> Result<()> {
    let (t, c) = (d.t, d.c());
    let tiles = t.div_ceil(GPU_TILE);
    let chunks = d.hs.div_ceil(GPU_CHUNK);
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    // Elements per sequence of qkv and out, (B, T, C) tensors, and (B, NH, T) ones.
    let (wide, narrow, rows) = (t * 3 * c, t * c, d.nh * t);
    for (b0, nb) in ctx.row_chunks(d.b, &[wide])? {
        if nb == 0 {
            continue;
        }
        let bind = |x, per| sequences(ctx, x, b0, nb, per);
        let out_per = ops.out.numel() / d.b;
        let groups = nb * d.nh * tiles * chunks;
        let (qkv, out, lse) = (
            bind(ops.qkv, wide)?,
            bind(ops.out, out_per)?,
            bind(ops.lse, rows)?,
        );
        let mut params = Params {
            t: t as u32,
            nh: d.nh as u32,
            hs: d.hs as u32,
            c: c as u32,
            scale,
            tiles: tiles as u32,
            chunks: chunks as u32,
            groups: groups as u32,
            off_qkv: qkv.offset,
            off_out: out.offset,
            rows: (nb * rows) as u32,
            ..Zeroable::zeroed()
        };
        let grid = grid_2d(groups, 1, max);
        let (Some(dy), Some(dsum)) = (ops.dy, ops.dsum) else {
            params.off_lse_out = lse.offset;
            let bindings = [(1, qkv.binding), (6, out.binding), (7, lse.binding)];
            let params = bytemuck::bytes_of(&params);
            ctx.dispatch(kernel("attention_forward"), params, &bindings, grid)?;
            continue;
        };
        let (y, dy, dsum) = (bind(ops.y, narrow)?, bind(dy, narrow)?, bind(dsum, rows)?);
        params.off_y = y.offset;
        params.off_dy = dy.offset;
        params.off_lse = lse.offset;
        params.off_dsum = dsum.offset;
        let params = bytemuck::bytes_of(&params);
        ctx.dispatch(
            kernel("attention_backward_dsum"),
            params,
            &[(2, y.binding), (3, dy.binding), (8, dsum.binding)],
            grid_2d(nb * rows, 256, max),
        )?;
        for entry in ["attention_backward_dkdv", "attention_backward_dq"] {
            let bindings = [
                (1, bind(ops.qkv, wide)?.binding),
                (3, bind(ops.dy.unwrap_or(ops.y), narrow)?.binding),
                (4, bind(ops.lse, rows)?.binding),
                (5, bind(ops.dsum.unwrap_or(ops.lse), rows)?.binding),
                (6, bind(ops.out, out_per)?.binding),
            ];
            ctx.dispatch(kernel(entry), params, &bindings, grid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
