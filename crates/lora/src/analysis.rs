//! What the learned updates look like: the analysis of the LoRA paper's section 7, on the host
//! in f64 (SVDs by `nalgebra`).
//!
//! **The spectrum of ΔW.** Per site, ΔW = s·B·A (width, in) has rank ≤ r. Its singular values
//! say how many directions the update really uses: the paper finds a few dominant ones even at
//! r = 64. They come cheaply from two thin QR factorisations, never forming the (width × in)
//! matrix: with Aᵀ = Q_A·R_A and B = Q_B·R_B (Q with orthonormal columns, R: r × r),
//!
//! ```text
//! B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ   so   σ(s·B·A) = |s|·σ(R_B·R_Aᵀ)      an r × r SVD
//! ```
//!
//! since multiplying by a matrix with orthonormal columns keeps singular values.
//!
//! **Subspace similarity** (the paper's eq. in 7.2). Let U_{A,i} (in × i) hold the top-i
//! right-singular vectors of A (r × in): the i input directions A reads most. For two adapters
//! of ranks r1 and r2 (two ranks, or two seeds) at the same site,
//!
//! ```text
//! φ(A1, A2, i, j) = ‖U_{A1,i}ᵀ·U_{A2,j}‖_F² / min(i, j)  ∈ [0, 1]
//! ```
//!
//! is 1 when the smaller of the two subspaces lies inside the larger, and 0 when they are
//! orthogonal. With M = V1ᵀ·V2 (r1 × r2, the cosines between all singular directions), the
//! numerator is the sum of M² over the top-left i × j block, so one SVD per adapter and one
//! product give the whole grid (i ≤ r1, j ≤ r2). [`write_heatmap_svg`] draws it as the paper's
//! figure 3 does.
//!
//! Tables print with `Display`; `to_json` gives the same numbers for scripts.

use std::collections::BTreeMap;

use nalgebra::DMatrix;
use serde_json::{Value, json};
use tensor::Tensor;

use crate::error::{Error, Result};
use crate::model::LoraModel;
use crate::target::Target;

mod heatmap;
mod tables;
pub use heatmap::write_heatmap_svg;

/// A (rows, cols) tensor as an f64 matrix.
fn matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let &[rows, cols] = t.shape() else {
        return Err(Error::mismatch(
            None,
            format!("expected a matrix, got shape {:?}", t.shape()),
        ));
    };
    let values = t.to_vec()?.into_iter().map(f64::from);
    Ok(DMatrix::from_row_iterator(rows, cols, values))
}

/// The singular values of ΔW = s·B·A, descending (min(r, width, in) of them), from A: (r, in)
/// and B: (width, r) by the QR route of the module doc.
pub fn delta_singular_values(a: &Tensor, b: &Tensor, scale: f32) -> Result<Vec<f64>> {
    let (a, b) = (matrix(a)?, matrix(b)?);
    if a.nrows() != b.ncols() {
        return Err(Error::mismatch(
            None,
            format!(
                "A is {:?} and B {:?}: B's columns must be A's rows",
                a.shape(),
                b.shape()
            ),
        ));
    }
    let r_a = a.transpose().qr().r(); // Aᵀ = Q_A·R_A
    let r_b = b.qr().r(); // B = Q_B·R_B
    let core = r_b * r_a.transpose();
    let s = f64::from(scale).abs();
    Ok(core.singular_values().iter().map(|v| s * v).collect())
}

/// φ(A1, A2, i, j) for every i ≤ r1, j ≤ r2, as `phi[i - 1][j - 1]`; A1: (r1, in), A2: (r2, in).
pub fn subspace_similarity(a1: &Tensor, a2: &Tensor) -> Result<Vec<Vec<f64>>> {
    let (a1, a2) = (matrix(a1)?, matrix(a2)?);
    if a1.ncols() != a2.ncols() {
        return Err(Error::mismatch(
            None,
            format!(
                "A1 is {:?} and A2 {:?}: they must read the same inputs",
                a1.shape(),
                a2.shape()
            ),
        ));
    }
    // Vᵀ: (min(r, in), in), rows = right-singular vectors by descending singular value.
    let v_t = |a: DMatrix<f64>| a.svd(false, true).v_t.expect("asked for V");
    let m = v_t(a1) * v_t(a2).transpose(); // cosines: (r1, r2)
    // Running 2-D sums of M²: block[i][j] = Σ_{a ≤ i, b ≤ j} M[a, b]².
    let (r1, r2) = m.shape();
    let mut block = vec![vec![0.0; r2]; r1];
    for i in 0..r1 {
        let mut row = 0.0;
        for j in 0..r2 {
            row += m[(i, j)].powi(2);
            block[i][j] = row + if i > 0 { block[i - 1][j] } else { 0.0 };
        }
    }
    for (i, row) in block.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v /= (i.min(j) + 1) as f64;
        }
    }
    Ok(block)
}

/// The singular values of one site's ΔW.
#[derive(Clone, Debug)]
pub struct SiteSpectrum {
    pub layer: usize,
    pub target: Target,
    pub r: usize,
    /// s = α/r (or α/√r).
    pub scale: f32,
    /// Descending.
    pub singular_values: Vec<f64>,
}

impl SiteSpectrum {
    /// ‖ΔW‖_F = √Σσ².
    pub fn norm(&self) -> f64 {
        self.singular_values
            .iter()
            .map(|s| s * s)
            .sum::<f64>()
            .sqrt()
    }

    /// σ1²/Σσ²: the share of ‖ΔW‖_F² in the top direction (1 for a rank-1 update).
    pub fn top_share(&self) -> f64 {
        let total: f64 = self.singular_values.iter().map(|s| s * s).sum();
        self.singular_values
            .first()
            .map_or(0.0, |s| s * s / total.max(f64::MIN_POSITIVE))
    }
}

/// The spectra of every site of one adapter.
#[derive(Clone, Debug)]
pub struct Spectra {
    pub sites: Vec<SiteSpectrum>,
}

impl Spectra {
    /// The singular values of ΔW at every site of `lora`.
    pub fn of(lora: &LoraModel) -> Result<Spectra> {
        let sites = lora
            .sites()
            .map(|(site, l)| {
                Ok(SiteSpectrum {
                    layer: site.layer,
                    target: site.target,
                    r: l.r(),
                    scale: l.scale,
                    singular_values: delta_singular_values(l.a.value(), l.b.value(), l.scale)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Spectra { sites })
    }

    pub fn to_json(&self) -> Value {
        let sites: Vec<Value> = self
            .sites
            .iter()
            .map(|s| {
                json!({"layer": s.layer, "target": s.target.name(), "r": s.r, "scale": s.scale,
                       "frobenius": s.norm(), "top_share": s.top_share(),
                       "singular_values": s.singular_values})
            })
            .collect();
        json!({ "delta_w_singular_values": sites })
    }
}

/// φ(A1, A2, i, j) at one site.
#[derive(Clone, Debug)]
pub struct SiteSimilarity {
    pub layer: usize,
    pub target: Target,
    /// `phi[i - 1][j - 1]` = φ(A1, A2, i, j), i ≤ r1, j ≤ r2.
    pub phi: Vec<Vec<f64>>,
}

impl SiteSimilarity {
    pub fn r1(&self) -> usize {
        self.phi.len()
    }

    pub fn r2(&self) -> usize {
        self.phi.first().map_or(0, Vec::len)
    }

    /// φ(A1, A2, i, j), 1-based as in the paper.
    pub fn phi(&self, i: usize, j: usize) -> f64 {
        self.phi[i - 1][j - 1]
    }
}

/// φ at every site two adapters share.
#[derive(Clone, Debug)]
pub struct Similarities {
    pub sites: Vec<SiteSimilarity>,
}

impl Similarities {
    /// φ(A1, A2, ·, ·) at every (layer, target) both adapters adapt.
    pub fn between(first: &LoraModel, second: &LoraModel) -> Result<Similarities> {
        let a2: BTreeMap<(usize, Target), &Tensor> = second
            .sites()
            .map(|(s, l)| ((s.layer, s.target), l.a.value()))
            .collect();
        let mut sites = Vec::new();
        for (site, l) in first.sites() {
            if let Some(a2) = a2.get(&(site.layer, site.target)) {
                sites.push(SiteSimilarity {
                    layer: site.layer,
                    target: site.target,
                    phi: subspace_similarity(l.a.value(), a2)?,
                });
            }
        }
        if sites.is_empty() {
            return Err(Error::mismatch(
                None,
                "the two adapters share no (layer, target) site",
            ));
        }
        Ok(Similarities { sites })
    }

    pub fn to_json(&self) -> Value {
        let sites: Vec<Value> = self
            .sites
            .iter()
            .map(|s| {
                json!({"layer": s.layer, "target": s.target.name(),
                       "r1": s.r1(), "r2": s.r2(), "phi": s.phi})
            })
            .collect();
        json!({ "subspace_similarity": sites })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor::Device;
    use tensor::testing::random;

    fn tensor(rows: usize, cols: usize, v: Vec<f32>) -> Tensor {
        Tensor::from_vec(v, &[rows, cols], &Device::cpu()).unwrap()
    }

    #[test]
    fn phi_of_an_adapter_with_itself_is_one_on_the_diagonal() {
        let a = random(&[8, 64], 1, &Device::cpu());
        let phi = subspace_similarity(&a, &a).unwrap();
        assert_eq!(phi.len(), 8);
        for (i, row) in phi.iter().enumerate() {
            let v = row[i];
            assert!((v - 1.0).abs() < 1e-12, "φ(A, A, {0}, {0}) = {v}", i + 1);
        }
    }

    #[test]
    fn phi_of_orthogonal_subspaces_is_zero() {
        // A1 reads input coordinates 0..4 only, A2 coordinates 4..10 only.
        let mut a1 = vec![0.0; 4 * 16];
        let mut a2 = vec![0.0; 6 * 16];
        for (k, v) in random(&[4, 4], 2, &Device::cpu())
            .to_vec()
            .unwrap()
            .into_iter()
            .enumerate()
        {
            a1[(k / 4) * 16 + k % 4] = v;
        }
        for (k, v) in random(&[6, 6], 3, &Device::cpu())
            .to_vec()
            .unwrap()
            .into_iter()
            .enumerate()
        {
            a2[(k / 6) * 16 + 4 + k % 6] = v;
        }
        let phi = subspace_similarity(&tensor(4, 16, a1), &tensor(6, 16, a2)).unwrap();
        assert_eq!((phi.len(), phi[0].len()), (4, 6));
        assert!(phi.iter().flatten().all(|&v| v.abs() < 1e-12), "{phi:?}");
    }

    #[test]
    fn rank_one_delta_has_one_singular_value() {
        // A's 3 rows are multiples c_k·u of one vector, so s·B·A = s·(Σ_k c_k·B[:, k])·uᵀ:
        // σ1 = s·‖Σ_k c_k·B[:, k]‖·‖u‖, σ2 = σ3 = 0.
        let u = [1.0f32, -2.0, 2.0, 0.0, 4.0]; // ‖u‖ = 5
        let c = [1.0f32, 0.5, -2.0];
        let a: Vec<f32> = c
            .iter()
            .flat_map(|&ck| u.iter().map(move |&ui| ck * ui))
            .collect();
        let b = random(&[6, 3], 4, &Device::cpu());
        let bv = b.to_vec().unwrap();
        let col: Vec<f64> = (0..6)
            .map(|j| (0..3).map(|k| (c[k] * bv[j * 3 + k]) as f64).sum())
            .collect();
        let want = 0.5 * col.iter().map(|v| v * v).sum::<f64>().sqrt() * 5.0;
        let sv = delta_singular_values(&tensor(3, 5, a), &b, 0.5).unwrap();
        assert_eq!(sv.len(), 3);
        assert!(
            (sv[0] - want).abs() < 1e-6 * want,
            "σ1 = {}, want {want}",
            sv[0]
        );
        assert!(sv[1] < 1e-6 * want && sv[2] < 1e-6 * want, "{sv:?}");
    }

    #[test]
    fn qr_route_matches_the_full_svd() {
        let (a, b) = (
            random(&[4, 30], 5, &Device::cpu()),
            random(&[20, 4], 6, &Device::cpu()),
        );
        let full = (matrix(&b).unwrap() * matrix(&a).unwrap() * 1.5).singular_values();
        let sv = delta_singular_values(&a, &b, 1.5).unwrap();
        for (k, (got, want)) in sv.iter().zip(full.iter()).enumerate() {
            assert!(
                (got - want).abs() < 1e-10 * full[0],
                "σ{}: {got} vs {want}",
                k + 1
            );
        }
    }
}
