//! Split-K: the GPU path for products with a small output and a long reduction
//! (`shaders/matmul_splitk.wgsl`), [`GpuMatmul::SplitK`] in the kernel choice.
//!
//! # Why
//! LoRA's weight gradients are such products. For GPT-2 124M with r = 8 at B·T = 8 × 1024,
//! `dA_z = dp_zᵀ·x` is an r × 768 output and `dB_z = d_zᵀ·h_z` a 768 × r one, both with
//! K = B·T = 8,192. The 64 × 64 tiles of `matmul.wgsl` give each ⌈8/64⌉·⌈768/64⌉ = 12
//! workgroups (24 for q and v as one grouped dispatch), and each of them walks all 8,192 of K
//! alone: on a GPU with 100+ compute units, four in five units idle for the whole product.
//! Cutting K into S slices gives S times the workgroups, each walking K/S.
//!
//! # Math
//! For batch entry z, output element (i, j) and slices of KS elements of K (slice s covers
//! `[s·KS, min(K, (s + 1)·KS))`, s < S = ⌈K / KS⌉):
//!
//! ```text
//! P[z, s, i, j] = Σ_{s·KS ≤ p < min(K, (s+1)·KS)} op(A)[z, i, p] · op(B)[z, p, j]     (partial pass)
//! C[z, i, j]    = [C[z, i, j]] + [bias[j]] + α · Σ_{s<S} P[z, s, i, j]                 (reduce pass)
//! ```
//!
//! The slices partition `[0, K)`, so `Σ_s P[z, s, i, j] = Σ_{p<K} op(A)[z, i, p]·op(B)[z, p, j]`:
//! the product of [`matmul`](super::matmul) with its epilogue (α, the bias, accumulation into
//! C) applied once, in the reduce, and the same leading dimensions, offsets and batch strides
//! (views, groups, the sub-blocks of `launch_2d`). Only the order of the f32 additions differs.
//! P is a dense `(batch, S, M, N)` scratch buffer from the context's pool, held for the two
//! dispatches: for GPT-2's `dA` of q and v, 2 · 10 · 8 · 768 floats = 480 KiB.
//!
//! # How many slices
//! With `tiles = ⌈M/64⌉·⌈N/64⌉·batch` workgroups unsplit, [`rule_slices`] takes
//! `S = min(⌊TARGET_GROUPS / tiles⌋, ⌊K / MIN_SLICE⌋)`: enough workgroups to fill a large GPU
//! ([`TARGET_GROUPS`] = 256, two per compute unit of a 128-unit GPU), each slice still at least
//! [`MIN_SLICE`] = 256 long (16 of the kernel's K steps of 16, so the staging loop is not all
//! prologue). The slice length is then rounded up to a multiple of the K step,
//! `KS = 16·⌈⌈K/S⌉/16⌉`, and `S = ⌈K/KS⌉`. GPT-2's dA and dB of q and v (24 tiles, K = 8,192):
//! S = min(10, 32) = 10, KS = 832, 240 workgroups. The rule splits only when S ≥ 2, so only
//! outputs of at most 128 tiles with K ≥ 512. In a step of GPT-2 124M at 8 × 1024 that is,
//! with LoRA (r = 8 on q and v), the 24 grouped dA and dB products, and in both LoRA and full
//! fine-tuning the loss's last row chunk `dx = dlogits·W` (224 × 768, 48 tiles; K = 50,257,
//! cut in two K chunks by the binding limit): one reduce dispatch more each, 372 → 398
//! dispatches for LoRA, 528 → 530 for full (`train bench plan`). Full fine-tuning's weight
//! gradients are not split: the smallest, 768 × 768, has 144 tiles.
//!
//! Forced by name (`--matmul-kernel splitk`), every product takes this path with at least 2
//! slices where K allows; either way S is capped so that `batch·S` fits the grid's z dimension
//! and the scratch one storage binding (with no room for even one slice, the product runs
//! unsplit on `matmul.wgsl`).

use bytemuck::Zeroable;

use super::Params as ProductParams;
use crate::gpu::{Binding, GpuContext, Kernel, grid_2d, kernel_params};
use crate::ops::matmul_tiled::{Dispatch, GpuMatmul};
use crate::{Result, shaders};

kernel_params! {
    /// The `Params` struct of `matmul_splitk.wgsl`: `matmul.wgsl`'s, then the split.
    struct Params {
        m: u32,
        n: u32,
        k: u32,
        trans_a: u32,
        trans_b: u32,
        lda: u32,
        ldb: u32,
        ldc: u32,
        off_a: u32,
        off_b: u32,
        off_c: u32,
        off_bias: u32,
        stride_a: u32,
        stride_b: u32,
        stride_c: u32,
        has_bias: u32,
        accumulate: u32,
        alpha: f32,
        slices: u32,
        slice_k: u32,
        batch: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// Workgroups a split aims at: two per compute unit of a 128-unit GPU.
pub(crate) const TARGET_GROUPS: u32 = 256;
/// Shortest K slice the rule makes: 16 of the partial kernel's K steps.
pub(crate) const MIN_SLICE: u32 = 256;
/// The partial kernel's K step (`BK`) and output tile (`TM = TN`).
const BK: u32 = 16;
const TILE: u32 = 64;

/// `matmul_splitk.wgsl`'s partial pass: one workgroup per (64 × 64 tile, slice, batch entry).
const PARTIAL: Kernel = Kernel {
    shader: "matmul_splitk",
    source: shaders::MATMUL_SPLITK,
    entry: "matmul_splitk_partial",
};

/// `matmul_splitk.wgsl`'s reduce pass: one invocation per element of C.
const REDUCE: Kernel = Kernel {
    shader: "matmul_splitk",
    source: shaders::MATMUL_SPLITK,
    entry: "matmul_splitk_reduce",
};

/// How one dispatch's K is cut: `slices` slices of `slice_k` (the last one shorter when
/// `slice_k` does not divide K).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    pub slices: u32,
    pub slice_k: u32,
}

impl Split {
    /// K in about `s` slices: KS = ⌈K/s⌉ rounded up to a multiple of the K step, S = ⌈K/KS⌉
    /// (≤ s). K = 0 is one empty slice.
    pub(crate) fn of(k: u32, s: u32) -> Split {
        if k == 0 {
            return Split {
                slices: 1,
                slice_k: 0,
            };
        }
        let slice_k = k.div_ceil(s.max(1)).div_ceil(BK) * BK;
        Split {
            slices: k.div_ceil(slice_k),
            slice_k,
        }
    }
}

/// The slices the rule gives `d` over `nz` batch entries (module doc): 1 when splitting does
/// not pay.
pub(crate) fn rule_slices(d: &Dispatch, nz: usize) -> u32 {
    let tiles = (d.m.div_ceil(TILE) as u64 * d.n.div_ceil(TILE) as u64 * nz as u64).max(1);
    let by_grid = (TARGET_GROUPS as u64 / tiles) as u32;
    by_grid.min(d.k / MIN_SLICE).max(1)
}

/// The split `choice` gives the dispatch `d` of `nz` batch entries, `None` to run it unsplit:
/// `Auto` and `Tune` (where no measurement decides) split where [`rule_slices`] gives ≥ 2,
/// `SplitK` always (at least 2 slices where K has two K steps), the others never. `max_z` is
/// the grid's z limit, `room` the floats one binding holds.
pub(crate) fn plan(
    choice: GpuMatmul,
    d: &Dispatch,
    nz: usize,
    max_z: usize,
    room: usize,
) -> Option<Split> {
    let rule = rule_slices(d, nz);
    let want = match choice {
        #[cfg(test)]
        GpuMatmul::SplitK if tests::SLICES.with(|s| s.get()).is_some() => {
            tests::SLICES.with(|s| s.get()).unwrap_or(1)
        }
        GpuMatmul::SplitK => rule.max(2),
        GpuMatmul::Auto | GpuMatmul::Tune if rule >= 2 => rule,
        _ => return None,
    };
    let block = (nz as u64 * d.m as u64 * d.n as u64).max(1);
    let cap = ((max_z / nz.max(1)) as u64).min(room as u64 / block);
    if cap == 0 {
        return None;
    }
    Some(Split::of(d.k, want.min(cap.min(u32::MAX as u64) as u32)))
}

/// Record the product of `p` (over `nz` batch entries, A, B, C and the bias bound as
/// `bindings` 1–4 give them to `matmul.wgsl`) as the two passes of `split`: the partials into a
/// pooled scratch buffer, then their sum into C. `b_f16`: B's words hold f16 pairs.
pub(super) fn record(
    ctx: &GpuContext,
    p: &ProductParams,
    bindings: &[(u32, Binding<'_>); 4],
    nz: usize,
    split: Split,
    b_f16: bool,
) -> Result<()> {
    let [(_, a), (_, b), (_, c), (_, bias)] = *bindings;
    let elems = nz as u64 * split.slices as u64 * p.m as u64 * p.n as u64;
    let params = Params {
        m: p.m,
        n: p.n,
        k: p.k,
        trans_a: p.trans_a,
        trans_b: p.trans_b,
        lda: p.lda,
        ldb: p.ldb,
        ldc: p.ldc,
        off_a: p.off_a,
        off_b: p.off_b,
        off_c: p.off_c,
        off_bias: p.off_bias,
        stride_a: p.stride_a,
        stride_b: p.stride_b,
        stride_c: p.stride_c,
        has_bias: p.has_bias,
        accumulate: p.accumulate,
        alpha: p.alpha,
        slices: split.slices,
        slice_k: split.slice_k,
        batch: nz as u32,
        ..Zeroable::zeroed()
    };
    let bytes = bytemuck::bytes_of(&params);
    // The scratch P: (nz, S, M, N), written whole by the partial pass before the reduce reads it.
    let scratch = ctx.alloc(elems * 4)?;
    let part = Binding {
        buffer: &scratch,
        offset: 0,
        size: elems.max(1) * 4,
    };
    let tiles = [
        p.n.div_ceil(TILE),
        p.m.div_ceil(TILE),
        nz as u32 * split.slices,
    ];
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    let recorded = ctx
        .dispatch_with(
            PARTIAL,
            crate::shaders::MATMUL_SPLITK_VARIANTS[usize::from(b_f16)],
            bytes,
            &[(1, a), (2, b), (3, part)],
            tiles,
        )
        .and_then(|()| {
            let groups = grid_2d(elems as usize / split.slices as usize, 256, max);
            ctx.dispatch(REDUCE, bytes, &[(4, bias), (5, part), (6, c)], groups)
        });
    // Back to the pool now: a later dispatch that gets it is ordered after these two.
    ctx.release(scratch);
    #[cfg(test)]
    tests::SPLIT.with(|n| n.set(n.get() + u64::from(recorded.is_ok())));
    recorded
}

#[cfg(test)]
#[path = "matmul_splitk_tests.rs"]
pub(crate) mod tests;
