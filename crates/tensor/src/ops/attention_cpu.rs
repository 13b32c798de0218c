//! The CPU path of [`attention`](super::attention) (the math is in its module doc): one task
//! per (sequence, head), spread over the cores by [`crate::cpu::map_units`]; inside a task,
//! query tiles of [`TILE`] rows walk the key tiles up to the diagonal, so a key tile's rows stay
//! in cache while every query of the tile uses them. q, k and v are read in place from qkv;
//! each task returns its head's rows, which are then written into the merged layout.

use crate::fastmath;

/// Rows of a query or key tile: 32 rows of k and v at hs = 64 are 16 KiB, half an L1 cache.
const TILE: usize = 32;

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

/// q, k or v (`which` = 0, 1, 2) of position `i` of head `h` of sequence `b`.
#[inline]
fn head_row(qkv: &[f32], d: Dims, b: usize, h: usize, which: usize, i: usize) -> &[f32] {
    let start = (b * d.t + i) * 3 * d.c() + which * d.c() + h * d.hs;
    &qkv[start..start + d.hs]
}

/// Row `i` of head `h` of sequence `b` of a (B, T, C) tensor.
#[inline]
fn merged_row(x: &[f32], d: Dims, b: usize, h: usize, i: usize) -> &[f32] {
    let start = (b * d.t + i) * d.c() + h * d.hs;
    &x[start..start + d.hs]
}

/// Σ a·b in eight f32 lanes (vectorises).
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

/// acc += w·x.
#[inline]
fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
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

/// Head h of sequence b: its output rows (T, hs) and lse (T).
fn forward_head(qkv: &[f32], d: Dims, scale: f32, b: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
    let (t, hs) = (d.t, d.hs);
    let mut out = vec![0.0f32; t * hs];
    let mut lse = vec![0.0f32; t];
    let mut s = [0.0f32; TILE];
    for i0 in (0..t).step_by(TILE) {
        let i1 = (i0 + TILE).min(t);
        let mut m = [f32::NEG_INFINITY; TILE];
        let mut l = [0.0f32; TILE];
        // Key tiles up to the one holding the tile's last query; later ones are all masked.
        for j0 in (0..i1).step_by(TILE) {
            for i in i0..i1 {
                let r = i - i0;
                let j1 = (j0 + TILE).min(i + 1);
                if j1 <= j0 {
                    continue;
                }
                let q = head_row(qkv, d, b, h, 0, i);
                let mut tile_max = f32::NEG_INFINITY;
                for j in j0..j1 {
                    let v = scale * dot(q, head_row(qkv, d, b, h, 1, j));
                    s[j - j0] = v;
                    tile_max = tile_max.max(v);
                }
                let m_new = m[r].max(tile_max);
                let alpha = fastmath::exp(m[r] - m_new);
                let acc = &mut out[i * hs..(i + 1) * hs];
                if alpha != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= alpha);
                }
                let mut sum = 0.0f32;
                for j in j0..j1 {
                    let p = fastmath::exp(s[j - j0] - m_new);
                    sum += p;
                    axpy(acc, p, head_row(qkv, d, b, h, 2, j));
                }
                l[r] = alpha * l[r] + sum;
                m[r] = m_new;
            }
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

/// [dq, dk, dv], each (T, hs), of head h of sequence b. Key tiles in the outer loop, every later
/// query inside: the tile's rows of k, v, dk and dv stay in cache.
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
    let (t, hs) = (d.t, d.hs);
    let dsum: Vec<f32> = (0..t)
        .map(|i| dot(merged_row(dy, d, b, h, i), merged_row(y, d, b, h, i)))
        .collect();
    let [mut dq, mut dk, mut dv] = [0; 3].map(|_| vec![0.0f32; t * hs]);
    for j0 in (0..t).step_by(TILE) {
        let j1 = (j0 + TILE).min(t);
        for i in j0..t {
            let q = head_row(qkv, d, b, h, 0, i);
            let g = merged_row(dy, d, b, h, i);
            let dq_i = &mut dq[i * hs..(i + 1) * hs];
            for j in j0..j1.min(i + 1) {
                let k = head_row(qkv, d, b, h, 1, j);
                let p = fastmath::exp(scale * dot(q, k) - lse[i]);
                axpy(&mut dv[j * hs..(j + 1) * hs], p, g);
                let dp = dot(g, head_row(qkv, d, b, h, 2, j));
                let ds = scale * p * (dp - dsum[i]);
                axpy(dq_i, ds, k);
                axpy(&mut dk[j * hs..(j + 1) * hs], ds, q);
            }
        }
    }
    [dq, dk, dv]
}
