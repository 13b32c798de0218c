//! The plain reference of each op: straightforward loops in f64 over slices, written from the
//! math in the op's doc comment and nothing else (no blocking, no SIMD, no threads).
//!
//! They are the oracle the kernels and the fast CPU path (the ops' own CPU code, vectorised with
//! [`fastmath`](crate::fastmath) and threaded) are tested against, and the forward passes whose
//! finite differences ([`numeric_gradient`]) check the autograd backward rules. They are slow
//! by design: use them on test-sized inputs (the matmul bench times [`matmul_tensors`] as the
//! naive baseline).
//!
//! Layouts are those of the ops: row-major, the last axis contiguous; N rows of C (or V)
//! columns. Weighted losses follow [`cross_entropy`](crate::ops::cross_entropy): rows of
//! weight 0 contribute 0.

use crate::ops::matmul::MatmulOpts;
use crate::{Device, Result, Tensor};

/// f32 values widened to f64.
pub fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// f64 values rounded to f32.
pub fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Central differences `∂f/∂x_i ≈ (f(x + h·e_i) − f(x − h·e_i)) / 2h` for every i.
pub fn numeric_gradient(mut f: impl FnMut(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            xs[i] = x[i] + h;
            let up = f(&xs);
            xs[i] = x[i] - h;
            let down = f(&xs);
            xs[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `C = op(A)·op(B) [+ bias]` (see [`matmul`](crate::ops::matmul)) for
/// `dims = [batch, m, k, n]`: A holds `batch` matrices of (m, k) (each stored (k, m) with
/// `trans_a`); B holds `batch` matrices of (k, n) (each stored (n, k) with `trans_b`), or one
/// shared by every batch entry; C is (batch, m, n).
pub fn matmul(
    a: &[f64],
    b: &[f64],
    bias: Option<&[f64]>,
    [batch, m, k, n]: [usize; 4],
    opts: MatmulOpts,
) -> Vec<f64> {
    let b_stride = if b.len() == batch * k * n { k * n } else { 0 };
    let mut c = vec![0.0; batch * m * n];
    for z in 0..batch {
        let (az, bz) = (&a[z * m * k..], &b[z * b_stride..]);
        for i in 0..m {
            for j in 0..n {
                let mut s = bias.map_or(0.0, |b| b[j]);
                for p in 0..k {
                    let av = if opts.trans_a {
                        az[p * m + i]
                    } else {
                        az[i * k + p]
                    };
                    let bv = if opts.trans_b {
                        bz[j * k + p]
                    } else {
                        bz[p * n + j]
                    };
                    s += av * bv;
                }
                c[(z * m + i) * n + j] = s;
            }
        }
    }
    c
}

/// [`matmul`] on tensors of any device, with the shapes and checks of
/// [`ops::matmul::matmul`](crate::ops::matmul::matmul); the result, rounded to f32, is on the
/// CPU.
pub fn matmul_tensors(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    opts: MatmulOpts,
) -> Result<Tensor> {
    let (dims, out_shape) =
        crate::ops::matmul::problem("reference::matmul_tensors", a, b, bias, opts)?;
    let bias = bias.map(|t| t.to_vec().map(|v| widen(&v))).transpose()?;
    let (a, b) = (widen(&a.to_vec()?), widen(&b.to_vec()?));
    let c = matmul(&a, &b, bias.as_deref(), dims, opts);
    Tensor::from_vec(narrow(&c), &out_shape, &Device::cpu())
}

/// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu(x: &[f64]) -> Vec<f64> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    x.iter()
        .map(|&v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh()))
        .collect()
}

/// erf(x) from its Taylor series, 2/√π · Σ (−1)ⁿ x²ⁿ⁺¹ / (n! (2n+1)), summed until the terms
/// vanish at f64 precision; |x| > 4.5 gives ±1 (erf(4.5) = 1 − 2e-10).
pub fn erf(x: f64) -> f64 {
    if x.abs() > 4.5 {
        return x.signum();
    }
    let (mut sum, mut term, mut n) = (0.0f64, x, 0.0f64);
    while term.abs() > 1e-18 * sum.abs().max(1e-300) || n < 5.0 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
        if n > 200.0 {
            break;
        }
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

/// The activations of [`activation`](crate::ops::activation), by their config name:
/// `gelu` x·Φ(x) (Φ(x) = (1 + erf(x/√2))/2), `relu` max(x, 0), `silu` x·σ(x), `quick_gelu`
/// x·σ(1.702·x).
pub fn activation(name: &str, x: &[f64]) -> Vec<f64> {
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    x.iter()
        .map(|&x| match name {
            "gelu" => 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
            "relu" => x.max(0.0),
            "silu" => x * sig(x),
            "quick_gelu" => x * sig(1.702 * x),
            other => panic!("no reference for activation {other}"),
        })
        .collect()
}

/// Softmax over rows of `cols`; consecutive groups of `rows` rows form (rows, cols) matrices,
/// and `causal` keeps columns c ≤ r + (cols − rows) of row r of its matrix (the rest are 0).
pub fn softmax(x: &[f64], rows: usize, cols: usize, causal: bool) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (g, (row, out)) in x.chunks(cols).zip(y.chunks_mut(cols)).enumerate() {
        let kept = if causal {
            (g % rows + cols - rows + 1).min(cols)
        } else {
            cols
        };
        let max = row[..kept].iter().copied().fold(f64::MIN, f64::max);
        let sum: f64 = row[..kept].iter().map(|v| (v - max).exp()).sum();
        for (c, o) in out.iter_mut().enumerate().take(kept) {
            *o = (row[c] - max).exp() / sum;
        }
    }
    y
}

/// Layer norm over rows of C = `gamma.len()`: `(x − μ)/√(σ² + eps)·γ + β`, σ² the biased variance.
pub fn layernorm(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let c = gamma.len();
    let mut y = vec![0.0; x.len()];
    for (row, out) in x.chunks(c).zip(y.chunks_mut(c)) {
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for j in 0..c {
            out[j] = (row[j] - mean) * rstd * gamma[j] + beta[j];
        }
    }
    y
}

/// `log Σ_v e^{x[n, v]}` of each row of `v` logits (the max taken out first).
pub fn logsumexp(x: &[f64], v: usize) -> Vec<f64> {
    x.chunks(v)
        .map(|row| {
            let max = row.iter().copied().fold(f64::MIN, f64::max);
            max + row.iter().map(|a| (a - max).exp()).sum::<f64>().ln()
        })
        .collect()
}

/// Per-row cross-entropy `losses[n] = w_n·(logsumexp(x_n) − x[n, t_n])` of rows of `v` logits.
pub fn cross_entropy_losses(x: &[f64], v: usize, targets: &[u32], w: &[f64]) -> Vec<f64> {
    logsumexp(x, v)
        .iter()
        .enumerate()
        .map(|(n, lse)| w[n] * (lse - x[n * v + targets[n] as usize]))
        .collect()
}

/// The weighted mean cross-entropy `Σ_n losses[n] / Σ_n w_n`.
pub fn cross_entropy(x: &[f64], v: usize, targets: &[u32], w: &[f64]) -> f64 {
    cross_entropy_losses(x, v, targets, w).iter().sum::<f64>() / w.iter().sum::<f64>()
}

/// `∂losses[n]/∂x[n, v] = w_n·(softmax(x_n)[v] − [v = t_n])`, shaped like `x`.
pub fn cross_entropy_dlogits(x: &[f64], v: usize, targets: &[u32], w: &[f64]) -> Vec<f64> {
    let p = softmax(x, 1, v, false);
    p.iter()
        .enumerate()
        .map(|(i, &p)| {
            let n = i / v;
            let hot = if i % v == targets[n] as usize {
                1.0
            } else {
                0.0
            };
            w[n] * (p - hot)
        })
        .collect()
}

/// Rows of `table` (rows of `cols`) picked by `ids`.
pub fn embedding(table: &[f64], ids: &[u32], cols: usize) -> Vec<f64> {
    ids.iter()
        .flat_map(|&i| table[i as usize * cols..][..cols].iter().copied())
        .collect()
}

/// `dtable[v] = Σ_{n: ids[n] = v} dout[n]`, for a table of `vocab` rows of `cols`.
pub fn embedding_backward(ids: &[u32], dout: &[f64], vocab: usize, cols: usize) -> Vec<f64> {
    let mut dt = vec![0.0; vocab * cols];
    for (n, &v) in ids.iter().enumerate() {
        for c in 0..cols {
            dt[v as usize * cols + c] += dout[n * cols + c];
        }
    }
    dt
}

/// One step of torch.optim.AdamW at step `t` (from 1), in place:
/// `p ← p·(1 − lr·wd)`, `m ← β1·m + (1 − β1)·g`, `v ← β2·v + (1 − β2)·g²`,
/// `p ← p − lr·m̂/(√v̂ + eps)` with `m̂ = m/(1 − β1^t)`, `v̂ = v/(1 − β2^t)`.
/// `hp = [lr, beta1, beta2, eps, weight_decay]`.
pub fn adamw(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], hp: [f64; 5], t: i32) {
    let [lr, b1, b2, eps, wd] = hp;
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
        p[i] -= lr * mh / (vh.sqrt() + eps);
    }
}

/// Segmented LoRA product (see [`sgmv`](crate::ops::sgmv)): row n of y (N, out) is
/// `s[i]·B[i]·(A[i]·x_n)` with i = `indices[n]`, or 0 when i is not an adapter (≥ the count).
/// A: (adapters, r, in), B: (adapters, out, r), `dims = [in, r, out]`.
pub fn sgmv(
    x: &[f64],
    indices: &[u32],
    a: &[f64],
    b: &[f64],
    scales: &[f64],
    [n_in, rank, n_out]: [usize; 3],
) -> Vec<f64> {
    let mut y = vec![0.0; indices.len() * n_out];
    for (n, &ad) in indices.iter().enumerate() {
        let ad = ad as usize;
        if ad >= scales.len() {
            continue;
        }
        let x_n = &x[n * n_in..][..n_in];
        let h: Vec<f64> = (0..rank)
            .map(|r| {
                let a_r = &a[(ad * rank + r) * n_in..][..n_in];
                scales[ad] * a_r.iter().zip(x_n).map(|(w, v)| w * v).sum::<f64>()
            })
            .collect();
        for j in 0..n_out {
            let b_j = &b[(ad * n_out + j) * rank..][..rank];
            y[n * n_out + j] = b_j.iter().zip(&h).map(|(w, v)| w * v).sum();
        }
    }
    y
}

/// Unfused causal attention of `nh` heads over qkv (B, T, 3C) (q, k, v in column thirds, head
/// h at h·hs of each): per (b, h) the full score rows S_ij = scale·q_i·k_j, j ≤ i, their
/// softmax P and y_i = Σ_j P_ij·v_j. Returns y (B, T, C) and lse_i = log Σ_j exp(S_ij)
/// (B, NH, T).
pub fn attention(qkv: &[f64], b: usize, t: usize, nh: usize, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let c = qkv.len() / (b * t * 3).max(1);
    let hs = c / nh;
    let at = |bi: usize, i: usize, part: usize, h: usize| (bi * t + i) * 3 * c + part * c + h * hs;
    let mut y = vec![0.0; b * t * c];
    let mut lse = vec![0.0; b * nh * t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let (q, k) = (at(bi, i, 0, h), at(bi, j, 1, h));
                        scale * (0..hs).map(|d| qkv[q + d] * qkv[k + d]).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                lse[(bi * nh + h) * t + i] = m + z.ln();
                for (j, sj) in s.iter().enumerate() {
                    let pij = (sj - m).exp() / z;
                    let v = at(bi, j, 2, h);
                    for d in 0..hs {
                        y[(bi * t + i) * c + h * hs + d] += pij * qkv[v + d];
                    }
                }
            }
        }
    }
    (y, lse)
}

/// The gradient of qkv of [`attention`] for dy = ∂L/∂y (B, T, C), through the full P of each
/// row: dv_j = Σ_i P_ij·dy_i, dP_ij = dy_i·v_j, dS_ij = P_ij·(dP_ij − Σ_k P_ik·dP_ik),
/// dq_i = scale·Σ_j dS_ij·k_j, dk_j = scale·Σ_i dS_ij·q_i.
pub fn attention_backward(
    qkv: &[f64],
    dy: &[f64],
    b: usize,
    t: usize,
    nh: usize,
    scale: f64,
) -> Vec<f64> {
    let c = qkv.len() / (b * t * 3).max(1);
    let hs = c / nh;
    let at = |bi: usize, i: usize, part: usize, h: usize| (bi * t + i) * 3 * c + part * c + h * hs;
    let dot = |x: usize, xs: &[f64], y: usize, ys: &[f64]| {
        (0..hs).map(|d| xs[x + d] * ys[y + d]).sum::<f64>()
    };
    let mut g = vec![0.0; qkv.len()];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let (q, dyi) = (at(bi, i, 0, h), (bi * t + i) * c + h * hs);
                let s: Vec<f64> = (0..=i)
                    .map(|j| scale * dot(q, qkv, at(bi, j, 1, h), qkv))
                    .collect();
                let m = s.iter().copied().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                let pr: Vec<f64> = s.iter().map(|v| (v - m).exp() / z).collect();
                let dp: Vec<f64> = (0..=i)
                    .map(|j| dot(dyi, dy, at(bi, j, 2, h), qkv))
                    .collect();
                let row: f64 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..=i {
                    let ds = pr[j] * (dp[j] - row);
                    let (k, v) = (at(bi, j, 1, h), at(bi, j, 2, h));
                    for d in 0..hs {
                        g[v + d] += pr[j] * dy[dyi + d];
                        g[q + d] += scale * ds * qkv[k + d];
                        g[k + d] += scale * ds * qkv[q + d];
                    }
                }
            }
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_values() {
        // [[1, 2], [3, 4]]·[[5, 6], [7, 8]] + [1, 1]
        let (a, b) = ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]);
        let c = matmul(
            &a,
            &b,
            Some(&[1.0, 1.0]),
            [1, 2, 2, 2],
            MatmulOpts::default(),
        );
        assert_eq!(c, [20.0, 23.0, 44.0, 51.0]);
        // Aᵀ·Bᵀ of A and B stored transposed: the same product; and B shared by a batch of 2.
        let t = MatmulOpts {
            trans_a: true,
            trans_b: true,
        };
        let c = matmul(
            &[1.0, 3.0, 2.0, 4.0],
            &[5.0, 7.0, 6.0, 8.0],
            None,
            [1, 2, 2, 2],
            t,
        );
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        let aa = [a, a].concat();
        let c = matmul(&aa, &b, None, [2, 2, 2, 2], MatmulOpts::default());
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0, 19.0, 22.0, 43.0, 50.0]);
        // Causal softmax of two rows of 2: row 0 keeps one column, row 1 both.
        let y = softmax(&[0.0, 7.0, 0.0, 0.0], 2, 2, true);
        assert_eq!(y, [1.0, 0.0, 0.5, 0.5]);
        let g = numeric_gradient(|x| x[0] * x[0] + 3.0 * x[1], &[2.0, 1.0], 1e-5);
        assert!(
            (g[0] - 4.0).abs() < 1e-8 && (g[1] - 3.0).abs() < 1e-8,
            "{g:?}"
        );
        let l = cross_entropy(&[0.0, 0.0, 0.0, 0.0], 2, &[0, 1], &[1.0, 1.0]);
        assert!((l - 2f64.ln()).abs() < 1e-15);
        let d = cross_entropy_dlogits(&[0.0, 0.0], 2, &[1], &[2.0]);
        assert_eq!(d, [1.0, -1.0]);
    }
}
