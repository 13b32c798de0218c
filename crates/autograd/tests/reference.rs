//! Plain f64 forward passes of every op, the ground truth of the finite-difference checks.
#![allow(dead_code)]

/// C = op(A)·op(B) (+ bias) for 2-D A, B; shapes (m, k) / (k, n) before the transposes.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f64],
    b: &[f64],
    bias: Option<&[f64]>,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| b[j]);
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = s;
        }
    }
    c
}

pub fn gelu(x: &[f64]) -> Vec<f64> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    x.iter()
        .map(|&v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh()))
        .collect()
}

/// Softmax over rows of length `cols`; causal masks c > r + (cols − rows) within each
/// (rows, cols) matrix.
pub fn softmax(x: &[f64], rows: usize, cols: usize, causal: bool) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (ri, (row, out)) in x.chunks(cols).zip(y.chunks_mut(cols)).enumerate() {
        let r = ri % rows;
        let limit = if causal {
            (r + cols - rows).min(cols - 1)
        } else {
            cols - 1
        };
        let max = row[..=limit].iter().cloned().fold(f64::MIN, f64::max);
        let sum: f64 = row[..=limit].iter().map(|v| (v - max).exp()).sum();
        for c in 0..cols {
            out[c] = if c <= limit {
                (row[c] - max).exp() / sum
            } else {
                0.0
            };
        }
    }
    y
}

pub fn layernorm(x: &[f64], g: &[f64], b: &[f64], c: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (row, out) in x.chunks(c).zip(y.chunks_mut(c)) {
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for j in 0..c {
            out[j] = (row[j] - mean) * rstd * g[j] + b[j];
        }
    }
    y
}

pub fn cross_entropy(x: &[f64], v: usize, targets: &[u32], w: &[f64]) -> f64 {
    let mut total = 0.0;
    for (n, row) in x.chunks(v).enumerate() {
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = max + row.iter().map(|a| (a - max).exp()).sum::<f64>().ln();
        total += w[n] * (lse - row[targets[n] as usize]);
    }
    total / w.iter().sum::<f64>()
}
