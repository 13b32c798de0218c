//! Inits that start A and B from the base weight and take that part out of it (PEFT's
//! `init_lora_weights="pissa"` and `"olora"`), so the adapted model still starts at W0:
//! W_res + s·B0·A0 = W0 (in the paper's layout, W: (out, in) = Wᵀ of our Conv1D (in, out)).
//!
//! **PiSSA** (Meng et al. 2024, PEFT's `pissa_init`): the SVD Wᵀ = U·S·Vᵀ, its top r triplets
//! scaled so that s·B0·A0 is the rank-r truncation:
//! ```text
//! A0 = diag(√(S_r/s))·V_rᵀ  (r, in)      B0 = U_r·diag(√(S_r/s))  (width, r)
//! W_resᵀ = Wᵀ − s·B0·A0
//! ```
//! **OLoRA** (Büyükakyüz 2024, PEFT's `olora_init`): the QR decomposition Wᵀ = Q·R, and
//! ```text
//! A0 = R[:r, :]  (r, in)      B0 = Q[:, :r]  (width, r)      W_resᵀ = Wᵀ − s·B0·A0
//! ```
//! (PEFT's `olora_init` takes the QR of the stored weight without transposing it for Conv1D,
//! which for GPT-2's (in, out) weights gives A and B of the wrong shapes; here the QR is of
//! Wᵀ (out, in), the form PEFT uses for `nn.Linear`.)
//!
//! Both are computed in f64 from the f32 weight; A0 and B0 are rounded to f32 first and the
//! residual is computed from the rounded factors, so W_res + s·B0·A0 = W0 up to the rounding
//! of the residual itself.
//!
//! **Saving.** The trained A, B only make sense with W_res, but a saved adapter must work on
//! the original base. As PEFT's `save_pretrained(path_initial_model_for_weight_conversion=…)`
//! does, the update s·(B·A − B0·A0) is saved as a plain LoRA of rank 2r:
//! ```text
//! A' = [A; A0]  (2r, in)      B' = [B, −B0]  (width, 2r)      s·B'·A' = s·(B·A − B0·A0)
//! ```
//! with α' = 2α (α' = √2·α with rsLoRA), so that s' = s.

use nalgebra::DMatrix;

use crate::error::{Error, Result};

/// A0 (r, in), B0 (width, r) and the residual W_res (in, width), row-major, in our layout.
#[derive(Clone, Debug)]
pub struct BaseInit {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub residual: Vec<f32>,
}

/// Wᵀ (width, in) in f64 from W (in, width) row-major.
fn transposed(w: &[f32], n_in: usize, width: usize) -> DMatrix<f64> {
    DMatrix::from_fn(width, n_in, |i, j| f64::from(w[j * width + i]))
}

fn check(what: &str, n_in: usize, width: usize, r: usize, w: &[f32]) -> Result<()> {
    if w.len() != n_in * width {
        return Err(Error::mismatch(
            None,
            format!("{what} init: W has {} values, not {n_in}·{width}", w.len()),
        ));
    }
    if r == 0 || r > n_in.min(width) {
        return Err(Error::config(format!(
            "{what} init: rank {r} for a weight of {n_in} × {width}; it must be 1 to {}",
            n_in.min(width)
        )));
    }
    Ok(())
}

/// The residual W_res (in, width) = W − s·(B0·A0)ᵀ from the rounded factors.
fn residual(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    n_in: usize,
    width: usize,
    r: usize,
    s: f32,
) -> Vec<f32> {
    let mut out = vec![0.0f32; n_in * width];
    for i in 0..n_in {
        for j in 0..width {
            let ba: f64 = (0..r)
                .map(|k| f64::from(b[j * r + k]) * f64::from(a[k * n_in + i]))
                .sum();
            out[i * width + j] = (f64::from(w[i * width + j]) - f64::from(s) * ba) as f32;
        }
    }
    out
}

/// PiSSA's A0, B0 and residual for W (in, width) at rank r and scale s.
pub fn pissa(w: &[f32], n_in: usize, width: usize, r: usize, s: f32) -> Result<BaseInit> {
    check("PiSSA", n_in, width, r, w)?;
    let svd = transposed(w, n_in, width).svd(true, true); // sorted, largest first
    let (u, v_t) = (svd.u.expect("asked for U"), svd.v_t.expect("asked for Vᵀ"));
    let root: Vec<f64> = (0..r)
        .map(|k| (svd.singular_values[k] / f64::from(s)).sqrt())
        .collect();
    let a: Vec<f32> = (0..r * n_in)
        .map(|x| (root[x / n_in] * v_t[(x / n_in, x % n_in)]) as f32)
        .collect();
    let b: Vec<f32> = (0..width * r)
        .map(|x| (u[(x / r, x % r)] * root[x % r]) as f32)
        .collect();
    let residual = residual(w, &a, &b, n_in, width, r, s);
    Ok(BaseInit { a, b, residual })
}

/// OLoRA's A0, B0 and residual for W (in, width) at rank r and scale s.
pub fn olora(w: &[f32], n_in: usize, width: usize, r: usize, s: f32) -> Result<BaseInit> {
    check("OLoRA", n_in, width, r, w)?;
    let qr = transposed(w, n_in, width).qr();
    let (q, rr) = (qr.q(), qr.r());
    let a: Vec<f32> = (0..r * n_in)
        .map(|x| rr[(x / n_in, x % n_in)] as f32)
        .collect();
    let b: Vec<f32> = (0..width * r).map(|x| q[(x / r, x % r)] as f32).collect();
    let residual = residual(w, &a, &b, n_in, width, r, s);
    Ok(BaseInit { a, b, residual })
}

/// A' = [A; A0] (2r, in) and B' = [B, −B0] (width, 2r): s·B'·A' = s·(B·A − B0·A0).
pub fn converted(
    a: &[f32],
    b: &[f32],
    a0: &[f32],
    b0: &[f32],
    width: usize,
    r: usize,
) -> (Vec<f32>, Vec<f32>) {
    let a2 = a.iter().chain(a0).copied().collect();
    let mut b2 = Vec::with_capacity(width * 2 * r);
    for j in 0..width {
        b2.extend_from_slice(&b[j * r..(j + 1) * r]);
        b2.extend(b0[j * r..(j + 1) * r].iter().map(|v| -v));
    }
    (a2, b2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn weight(n_in: usize, width: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n_in * width)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect()
    }

    /// (in, width): W_res + s·(B0·A0)ᵀ, in f64.
    fn rebuilt(init: &BaseInit, n_in: usize, width: usize, r: usize, s: f32) -> Vec<f64> {
        let mut out = vec![0.0; n_in * width];
        for i in 0..n_in {
            for j in 0..width {
                let ba: f64 = (0..r)
                    .map(|k| f64::from(init.b[j * r + k]) * f64::from(init.a[k * n_in + i]))
                    .sum();
                out[i * width + j] = f64::from(init.residual[i * width + j]) + f64::from(s) * ba;
            }
        }
        out
    }

    fn worst(a: &[f64], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - f64::from(*y)).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn pissa_and_olora_rebuild_w0() {
        for (n_in, width, r, s) in [(12, 20, 3, 2.0f32), (16, 8, 4, 0.5), (10, 10, 10, 1.0)] {
            let w = weight(n_in, width, 3);
            for init in [
                pissa(&w, n_in, width, r, s).unwrap(),
                olora(&w, n_in, width, r, s).unwrap(),
            ] {
                assert_eq!((init.a.len(), init.b.len()), (r * n_in, width * r));
                let err = worst(&rebuilt(&init, n_in, width, r, s), &w);
                assert!(err < 1e-6, "W_res + s·B0·A0 differs from W0 by {err}");
            }
        }
    }

    #[test]
    fn pissa_takes_the_top_singular_directions() {
        // W = 3·e0·f0ᵀ + 1·e1·f1ᵀ (rank 2): rank-1 PiSSA takes the 3 part, the residual keeps
        // the 1 part, and s·B0·A0 has the top singular value 3.
        let (n_in, width) = (4, 5);
        let mut w = vec![0.0f32; n_in * width];
        w[0] = 3.0; // (in 0, out 0)
        w[width + 1] = 1.0; // (in 1, out 1)
        let init = pissa(&w, n_in, width, 1, 2.0).unwrap();
        let sb: Vec<f32> = init.b.iter().map(|v| v.abs()).collect();
        let sa: Vec<f32> = init.a.iter().map(|v| v.abs()).collect();
        assert!((2.0 * sb[0] * sa[0] - 3.0).abs() < 1e-6, "{sb:?} {sa:?}");
        assert!(init.residual[0].abs() < 1e-6 && (init.residual[width + 1] - 1.0).abs() < 1e-6);
        // OLoRA's B0 has orthonormal columns.
        let o = olora(&weight(6, 9, 1), 6, 9, 3, 1.0).unwrap();
        for k in 0..3 {
            for l in 0..3 {
                let dot: f32 = (0..9).map(|j| o.b[j * 3 + k] * o.b[j * 3 + l]).sum();
                assert!((dot - f32::from(u8::from(k == l))).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn the_converted_adapter_carries_the_trained_delta() {
        let (n_in, width, r) = (7, 5, 2);
        let (a0, b0) = (weight(r, n_in, 1), weight(width, r, 2));
        let (a, b) = (weight(r, n_in, 3), weight(width, r, 4));
        let (a2, b2) = converted(&a, &b, &a0, &b0, width, r);
        let ba = |a: &[f32], b: &[f32], r: usize, i: usize, j: usize| -> f64 {
            (0..r)
                .map(|k| f64::from(b[j * r + k]) * f64::from(a[k * n_in + i]))
                .sum()
        };
        for i in 0..n_in {
            for j in 0..width {
                let want = ba(&a, &b, r, i, j) - ba(&a0, &b0, r, i, j);
                assert!((ba(&a2, &b2, 2 * r, i, j) - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn ranks_beyond_the_weight_are_refused() {
        let w = weight(4, 6, 0);
        let e = pissa(&w, 4, 6, 5, 1.0).unwrap_err().to_string();
        assert!(
            e.contains("rank 5 for a weight of 4 × 6; it must be 1 to 4"),
            "{e}"
        );
    }
}
