//! The CPU path of [`attention`](super::attention) (the math is in its module doc): one task
//! per (sequence, head), spread over the cores by [`crate::cpu::map_units`]; inside a task,
//! query tiles of [`TILE`] rows walk the key tiles up to the diagonal, and the work of each
//! pair of tiles is a few small products ([`sgemm`](crate::sgemm), on the task's own thread)
//! on strided views straight into qkv, y and dy, so no head is ever copied out. Each task
//! returns its head's rows, which are then written into the merged layout.

use crate::fastmath;
use crate::sgemm::{Mat, sgemm};

/// Rows of a query or key tile: the products of a tile pair are 64 × 64 × hs at most, small
/// enough that sgemm keeps to one thread and its operands stay in cache.
const TILE: usize = 64;

/// The shape of an attention: B sequences of T positions, NH heads of hs columns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
}

impl Dims {
    /// C = NH·hs.
    pub fn c(&self) -> usize {
        self.nh * self.hs
    }
}

/// Row `i` of head `h` of sequence `b` of a (B, T, C) tensor.
#[inline]
fn merged_row(x: &[f32], d: Dims, b: usize, h: usize, i: usize) -> &[f32] {
    let start = (b * d.t + i) * d.c() + h * d.hs;
    &x[start..start + d.hs]
}

/// Σ a·b in eight f32 lanes (vectorises), for D_i.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// y (B, T, C) and lse (B, NH, T) of qkv (B, T, 3C).
pub(crate) fn forward(qkv: &[f32], d: Dims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let heads = crate::cpu::map_units(d.b * d.nh, d.t * d.t * d.hs, |u| {
        forward_head(qkv, d, scale, u / d.nh, u % d.nh)
    });
    let (mut y, mut lse) = (
        vec![0.0; d.b * d.t * d.c()],
        Vec::with_capacity(d.b * d.nh * d.t),
    );
    for (u, (out, l)) in heads.into_iter().enumerate() {
        let (b, h) = (u / d.nh, u % d.nh);
        for (i, row) in out.chunks_exact(d.hs).enumerate() {
            let start = (b * d.t + i) * d.c() + h * d.hs;
            y[start..start + d.hs].copy_from_slice(row);
        }
        lse.extend(l);
    }
    (y, lse)
}

/// A strided matrix view: `(slice, row stride, column stride)`, the slice starting at the
/// first element.
type View<'a> = (&'a [f32], usize, usize);

/// C ← α·A·B + β·C, A (m×k), B (k×n), C (m×n, row stride `rsc`) as strided views
/// ([`sgemm`], on the calling thread). Panics when a view does not cover its matrix.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: View,
    b: View,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
) {
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(
        a.0.len() >= extent(m, k, a.1, a.2)
            && b.0.len() >= extent(k, n, b.1, b.2)
            && c.len() >= extent(m, n, rsc, 1),
        "attention gemm: a view is shorter than its matrix"
    );
    // SAFETY: the assert above keeps every element sgemm reads or writes inside its slice, and
    // c, a &mut, aliases neither input.
    unsafe {
        sgemm(
            m,
            k,
            n,
            alpha,
            Mat {
                ptr: a.0.as_ptr(),
                rs: a.1,
                cs: a.2,
            },
            Mat {
                ptr: b.0.as_ptr(),
                rs: b.1,
                cs: b.2,
            },
            beta,
            Mat {
                ptr: c.as_mut_ptr(),
                rs: rsc,
                cs: 1,
            },
            false,
        );
    }
}

/// Rows i0.. of part `which` (0 q, 1 k, 2 v) of head h of sequence b, as a view with rows of
/// stride 3C; `transposed` views it as (hs × rows).
fn part(
    qkv: &[f32],
    d: Dims,
    b: usize,
    h: usize,
    which: usize,
    i0: usize,
    transposed: bool,
) -> View<'_> {
    let start = (b * d.t + i0) * 3 * d.c() + which * d.c() + h * d.hs;
    let (rs, cs) = if transposed {
        (1, 3 * d.c())
    } else {
        (3 * d.c(), 1)
    };
    (&qkv[start..], rs, cs)
}

/// Head h of sequence b: its output rows (T, hs) and lse (T). Per query tile, the scores of a
/// key tile are one product S = s·Q·Kᵀ; the accumulator gains P·V in another.
fn forward_head(qkv: &[f32], d: Dims, scale: f32, b: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
    let (t, hs) = (d.t, d.hs);
    let mut out = vec![0.0f32; t * hs];
    let mut lse = vec![0.0f32; t];
    let mut s = vec![0.0f32; TILE * TILE];
    for i0 in (0..t).step_by(TILE) {
        let i1 = (i0 + TILE).min(t);
        let nq = i1 - i0;
        let mut m = [f32::NEG_INFINITY; TILE];
        let mut l = [0.0f32; TILE];
        // Key tiles up to the one holding the tile's last query; later ones are all masked.
        // Tiles are aligned, so j0 ≤ i0 and every query keeps at least key j0.
        for j0 in (0..i1).step_by(TILE) {
            let nk = (j0 + TILE).min(i1) - j0;
            let q = part(qkv, d, b, h, 0, i0, false);
            let kt = part(qkv, d, b, h, 1, j0, true);
            gemm(nq, hs, nk, scale, q, kt, 0.0, &mut s, TILE);
            for r in 0..nq {
                let row = &mut s[r * TILE..r * TILE + nk];
                let keep = (i0 + r + 1 - j0).min(nk);
                // Keys past the query's own position are masked: probability 0. The kept
                // ones go through the vectorised row kernels.
                let (kept, masked) = row.split_at_mut(keep);
                let m_new = m[r].max(fastmath::max(kept));
                let alpha = fastmath::exp(m[r] - m_new);
                let sum = fastmath::exp_sub_sum(kept, m_new) as f32;
                masked.fill(0.0);
                l[r] = alpha * l[r] + sum;
                m[r] = m_new;
                if alpha != 1.0 {
                    let i = i0 + r;
                    out[i * hs..(i + 1) * hs]
                        .iter_mut()
                        .for_each(|a| *a *= alpha);
                }
            }
            let v = part(qkv, d, b, h, 2, j0, false);
            gemm(
                nq,
                nk,
                hs,
                1.0,
                (&s, TILE, 1),
                v,
                1.0,
                &mut out[i0 * hs..],
                hs,
            );
        }
        for i in i0..i1 {
            let r = i - i0;
            let inv = 1.0 / l[r];
            out[i * hs..(i + 1) * hs].iter_mut().for_each(|a| *a *= inv);
            lse[i] = m[r] + l[r].ln();
        }
    }
    (out, lse)
}

/// d(qkv) (B, T, 3C) from qkv, y and dy (B, T, C) and lse (B, NH, T).
pub(crate) fn backward(
    qkv: &[f32],
    y: &[f32],
    lse: &[f32],
    dy: &[f32],
    d: Dims,
    scale: f32,
) -> Vec<f32> {
    let heads = crate::cpu::map_units(d.b * d.nh, 2 * d.t * d.t * d.hs, |u| {
        let (b, h) = (u / d.nh, u % d.nh);
        let lse = &lse[u * d.t..(u + 1) * d.t];
        backward_head(qkv, y, lse, dy, d, scale, b, h)
    });
    let c = d.c();
    let mut dqkv = vec![0.0; d.b * d.t * 3 * c];
    for (u, grads) in heads.into_iter().enumerate() {
        let (b, h) = (u / d.nh, u % d.nh);
        for (which, g) in grads.iter().enumerate() {
            for (i, row) in g.chunks_exact(d.hs).enumerate() {
                let start = (b * d.t + i) * 3 * c + which * c + h * d.hs;
                dqkv[start..start + d.hs].copy_from_slice(row);
            }
        }
    }
    dqkv
}

fastmath::multiversion! {
    /// One query row of a tile pair's backward, in place: the scores `p` become the
    /// probabilities P = exp(S − lse) (0 past the `keep` unmasked keys), and `ds`, which holds
    /// dP = dY·Vᵀ, becomes dS = s·P∘(dP − D).
    probs_and_dscores => probs_and_dscores_generic(
        p: &mut [f32], ds: &mut [f32], keep: usize, lse: f32, dsum: f32, scale: f32
    ) -> ()
}

#[inline(always)]
fn probs_and_dscores_generic(
    p: &mut [f32],
    ds: &mut [f32],
    keep: usize,
    lse: f32,
    dsum: f32,
    scale: f32,
) {
    let (pk, pm) = p.split_at_mut(keep);
    let (dk, dm) = ds.split_at_mut(keep);
    for (pv, dv) in pk.iter_mut().zip(dk.iter_mut()) {
        let prob = fastmath::exp(*pv - lse);
        *pv = prob;
        *dv = scale * prob * (*dv - dsum);
    }
    pm.fill(0.0);
    dm.fill(0.0);
}

/// [dq, dk, dv], each (T, hs), of head h of sequence b. Key tiles in the outer loop, every later
/// query tile inside; each (query, key) tile pair is five products: S = s·Q·Kᵀ, dV += Pᵀ·dY,
/// dP = dY·Vᵀ, dQ += dS·K and dK += dSᵀ·Q (with dS = s·P∘(dP − D)).
#[allow(clippy::too_many_arguments)]
fn backward_head(
    qkv: &[f32],
    y: &[f32],
    lse: &[f32],
    dy: &[f32],
    d: Dims,
    scale: f32,
    b: usize,
    h: usize,
) -> [Vec<f32>; 3] {
    let (t, hs, c) = (d.t, d.hs, d.c());
    let dsum: Vec<f32> = (0..t)
        .map(|i| dot(merged_row(dy, d, b, h, i), merged_row(y, d, b, h, i)))
        .collect();
    let [mut dq, mut dk, mut dv] = [0; 3].map(|_| vec![0.0f32; t * hs]);
    let (mut p, mut ds) = (vec![0.0f32; TILE * TILE], vec![0.0f32; TILE * TILE]);
    for j0 in (0..t).step_by(TILE) {
        let nk = (j0 + TILE).min(t) - j0;
        for i0 in (j0..t).step_by(TILE) {
            let nq = (i0 + TILE).min(t) - i0;
            let q = part(qkv, d, b, h, 0, i0, false);
            let dyi: View = (&dy[(b * t + i0) * c + h * hs..], c, 1);
            gemm(
                nq,
                hs,
                nk,
                scale,
                q,
                part(qkv, d, b, h, 1, j0, true),
                0.0,
                &mut p,
                TILE,
            );
            gemm(
                nq,
                hs,
                nk,
                1.0,
                dyi,
                part(qkv, d, b, h, 2, j0, true),
                0.0,
                &mut ds,
                TILE,
            );
            for r in 0..nq {
                let i = i0 + r;
                let keep = (i + 1 - j0).min(nk);
                probs_and_dscores(
                    &mut p[r * TILE..r * TILE + nk],
                    &mut ds[r * TILE..r * TILE + nk],
                    keep,
                    lse[i],
                    dsum[i],
                    scale,
                );
            }
            gemm(
                nk,
                nq,
                hs,
                1.0,
                (&p, 1, TILE),
                dyi,
                1.0,
                &mut dv[j0 * hs..],
                hs,
            );
            let k = part(qkv, d, b, h, 1, j0, false);
            gemm(
                nq,
                nk,
                hs,
                1.0,
                (&ds, TILE, 1),
                k,
                1.0,
                &mut dq[i0 * hs..],
                hs,
            );
            gemm(
                nk,
                nq,
                hs,
                1.0,
                (&ds, 1, TILE),
                q,
                1.0,
                &mut dk[j0 * hs..],
                hs,
            );
        }
    }
    [dq, dk, dv]
}
