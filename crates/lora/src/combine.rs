//! Several adapters made into one, as PEFT's `LoraModel.add_weighted_adapter` does it (PEFT
//! 0.21, `tuners/lora/model.py`), for the combination types `linear`, `cat`, `svd` and `ties`.
//!
//! Inputs: adapters i with weights wᵢ, each with A_i (rᵢ, in), B_i (out, rᵢ) and scale sᵢ at
//! every Linear it adapts. Only the adapters present at a Linear take part there. The new
//! adapter's config is the first adapter's with `r` = `lora_alpha` = the new rank R,
//! `target_modules` the union of the inputs' (lists: the set union; regex strings:
//! `(t₁)|(t₂)|…`), and empty `rank_pattern` / `alpha_pattern`: so its scale is R/R = 1
//! (`use_rslora`, copied from the first adapter, makes it R/√R = √R, and PEFT's A and B are
//! then not rescaled for it; this is PEFT's behaviour, kept so both load the same file alike).
//!
//! R is computed from each adapter's configured rank, rᶜ = max(r, rank_pattern values):
//!
//! | type | R | A (R, in) | B (out, R) |
//! |---|---|---|---|
//! | `linear` | the rᶜ, all equal (else an error) | Σ sgn(wᵢsᵢ)·√|wᵢsᵢ|·A_i | Σ √|wᵢsᵢ|·B_i |
//! | `cat` | Σ rᶜ | [w₁s₁A₁; w₂s₂A₂; …], zero rows after | [B₁ B₂ …], zero columns after |
//! | `svd` | `svd_rank`, else max rᶜ | V_Rᵀ (first R rows of Vᵀ) | U_R·diag(S_R) |
//! | `ties` | as `linear` | TIES of the A_i, weights sgn(wᵢsᵢ)·√|wᵢsᵢ| | TIES of the B_i, weights √|wᵢsᵢ| |
//!
//! `cat` is exact: B·A = Σ wᵢsᵢ·B_i·A_i. `linear` is not (its B·A has the cross terms
//! √|wᵢsᵢ wⱼsⱼ|·B_i·A_j); it is PEFT's cheap approximation. `svd` takes ΔW = Σ wᵢsᵢ·B_i·A_i
//! (out, in), its SVD U·diag(S)·Vᵀ, and keeps the R largest singular values: the best rank-R
//! approximation of ΔW (Eckart–Young). With `svd_clamp` q, every entry of U_R·diag(S_R) and
//! V_Rᵀ is clamped to [−h, h], h the q-quantile (linear interpolation, as `torch.quantile`) of
//! all their entries together; SVD's signs are not unique (flipping uₖ and vₖ together gives
//! the same ΔW), so a clamped result may differ from PEFT's where LAPACK chose other signs.
//!
//! TIES (trim, elect sign, disjoint merge) is in [`ties`]. PEFT's `dare_*` types prune at
//! random (`torch.bernoulli`), so no other program can reproduce their result; they are not
//! offered.
//!
//! The arithmetic is in f64, the result rounded to f32 once.

pub mod ties;

use std::collections::BTreeMap;
use std::path::Path;

use nalgebra::DMatrix;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::LoraModel;
use crate::peft_save::{KEY_PREFIX, write_adapter_files};
use crate::target::Module;
pub use ties::MajoritySign;

/// How the adapters are combined (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Combination {
    Linear,
    Cat,
    Svd {
        /// R; the largest input rank when `None`.
        rank: Option<usize>,
        /// The quantile q in (0, 1] of PEFT's `svd_clamp`; no clamping when `None`.
        clamp: Option<f64>,
    },
    Ties {
        /// The fraction of each tensor's entries kept, in [0, 1].
        density: f64,
        majority: MajoritySign,
    },
}

impl Combination {
    /// PEFT's `combination_type`.
    pub fn name(self) -> &'static str {
        match self {
            Combination::Linear => "linear",
            Combination::Cat => "cat",
            Combination::Svd { .. } => "svd",
            Combination::Ties { .. } => "ties",
        }
    }
}

/// One input: a loaded adapter, its `adapter_config.json` as read, and its weight wᵢ.
pub struct CombineInput<'a> {
    pub lora: &'a LoraModel,
    pub config: &'a Value,
    pub weight: f64,
}

/// One adapted Linear of one input: wᵢsᵢ, A (r, in), B (out, r), r.
pub struct Part {
    pub ws: f64,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
}

/// One Linear of the combined adapter: A (r, in), B (out, r).
#[derive(Clone, Debug)]
pub struct CombinedModule {
    pub layer: usize,
    pub module: Module,
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// The combined adapter: its `adapter_config.json` and its Linears.
#[derive(Clone, Debug)]
pub struct Combined {
    pub config: Value,
    pub rank: usize,
    pub modules: Vec<CombinedModule>,
}

/// rᶜ = max(r, rank_pattern values) of an `adapter_config.json`.
fn config_rank(config: &Value) -> Result<usize> {
    let r = config["r"]
        .as_u64()
        .ok_or_else(|| Error::config(format!("`r` is {}, not a rank", config["r"])))?;
    let pattern_max = config["rank_pattern"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(Value::as_u64)
        .max()
        .unwrap_or(0);
    Ok(r.max(pattern_max) as usize)
}

/// The union of the inputs' `target_modules`, as PEFT forms it.
fn union_targets(configs: &[&Value]) -> Result<Value> {
    let all: Vec<&Value> = configs.iter().map(|c| &c["target_modules"]).collect();
    if all.iter().all(|t| t.is_array()) {
        let mut names: Vec<String> = all
            .iter()
            .flat_map(|t| t.as_array().into_iter().flatten())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        Ok(json!(names))
    } else if all.iter().all(|t| t.is_string()) {
        let parts: Vec<String> = all
            .iter()
            .map(|t| format!("({})", t.as_str().unwrap_or_default()))
            .collect();
        Ok(json!(parts.join("|")))
    } else {
        Err(Error::config(format!(
            "target_modules are {all:?}: PEFT combines adapters whose target_modules are all \
             lists or all regular expressions, not a mix"
        )))
    }
}

/// Σ of the parts as PEFT's `linear` does: A = Σ sgn(ws)·√|ws|·A_i, B = Σ √|ws|·B_i.
pub fn linear(
    parts: &[Part],
    n_in: usize,
    n_out: usize,
    rank: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut a = vec![0.0f64; rank * n_in];
    let mut b = vec![0.0f64; n_out * rank];
    for p in parts {
        if p.r != rank {
            return Err(Error::config(format!(
                "combination `linear` adds A and B of equal shapes, but a module has rank {} \
                 where the combined rank is {rank}",
                p.r
            )));
        }
        let root = p.ws.abs().sqrt();
        let sign = if p.ws >= 0.0 { 1.0 } else { -1.0 };
        for (acc, &v) in a.iter_mut().zip(&p.a) {
            *acc += sign * root * v as f64;
        }
        for (acc, &v) in b.iter_mut().zip(&p.b) {
            *acc += root * v as f64;
        }
    }
    Ok((to_f32(&a), to_f32(&b)))
}

/// PEFT's `cat`: A = [w₁s₁A₁; …] (zero rows after), B = [B₁ …] (zero columns after).
pub fn cat(parts: &[Part], n_in: usize, n_out: usize, rank: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let total: usize = parts.iter().map(|p| p.r).sum();
    if total > rank {
        return Err(Error::config(format!(
            "combination `cat`: the module's ranks add up to {total}, more than the combined \
             rank {rank}"
        )));
    }
    let mut a = vec![0.0f32; rank * n_in];
    let mut b = vec![0.0f32; n_out * rank];
    let mut k0 = 0;
    for p in parts {
        for (dst, &v) in a[k0 * n_in..(k0 + p.r) * n_in].iter_mut().zip(&p.a) {
            *dst = (p.ws * v as f64) as f32;
        }
        for row in 0..n_out {
            b[row * rank + k0..row * rank + k0 + p.r]
                .copy_from_slice(&p.b[row * p.r..(row + 1) * p.r]);
        }
        k0 += p.r;
    }
    Ok((a, b))
}

/// PEFT's `ties`: [`ties::ties`] of the A's and of the B's, with `linear`'s weights.
pub fn ties_ab(
    parts: &[Part],
    n_in: usize,
    n_out: usize,
    rank: usize,
    density: f64,
    majority: MajoritySign,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if let Some(p) = parts.iter().find(|p| p.r != rank) {
        return Err(Error::config(format!(
            "combination `ties` merges A and B of equal shapes, but a module has rank {} where \
             the combined rank is {rank}",
            p.r
        )));
    }
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (a, b): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        parts.iter().map(|p| (f64s(&p.a), f64s(&p.b))).unzip();
    let wa: Vec<f64> = parts
        .iter()
        .map(|p| p.ws.signum() * p.ws.abs().sqrt())
        .collect();
    let wb: Vec<f64> = parts.iter().map(|p| p.ws.abs().sqrt()).collect();
    let (a, b) = (
        ties::ties(&a, &wa, density, majority),
        ties::ties(&b, &wb, density, majority),
    );
    debug_assert_eq!((a.len(), b.len()), (rank * n_in, n_out * rank));
    Ok((to_f32(&a), to_f32(&b)))
}

/// ΔW = Σ wᵢsᵢ·B_i·A_i, (out, in).
pub fn delta(parts: &[Part], n_in: usize, n_out: usize) -> DMatrix<f64> {
    let mut d = DMatrix::<f64>::zeros(n_out, n_in);
    for p in parts {
        let a = DMatrix::from_row_slice(p.r, n_in, &p.a).map(|v| v as f64);
        let b = DMatrix::from_row_slice(n_out, p.r, &p.b).map(|v| v as f64);
        d += (b * a) * p.ws;
    }
    d
}

/// The q-quantile of `values` with linear interpolation between order statistics
/// (`torch.quantile`'s default).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// PEFT's `svd`: the best rank-R factors of ΔW, A = V_Rᵀ (R, in), B = U_R·diag(S_R) (out, R),
/// clamped to the q-quantile of their entries when `clamp` is given.
pub fn svd(
    parts: &[Part],
    n_in: usize,
    n_out: usize,
    rank: usize,
    clamp: Option<f64>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if rank > n_in.min(n_out) {
        return Err(Error::config(format!(
            "combination `svd` to rank {rank}: a ({n_out}, {n_in}) update has at most {} \
             singular values",
            n_in.min(n_out)
        )));
    }
    let svd = delta(parts, n_in, n_out).svd(true, true);
    let (u, vt) = match (svd.u, svd.v_t) {
        (Some(u), Some(vt)) => (u, vt),
        _ => return Err(Error::config("the SVD of ΔW did not converge".to_string())),
    };
    // nalgebra does not sort: order the singular values, largest first.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let mut a = vec![0.0f64; rank * n_in];
    let mut b = vec![0.0f64; n_out * rank];
    for (k, &i) in order.iter().take(rank).enumerate() {
        let s = svd.singular_values[i];
        for c in 0..n_in {
            a[k * n_in + c] = vt[(i, c)];
        }
        for row in 0..n_out {
            b[row * rank + k] = u[(row, i)] * s;
        }
    }
    if let Some(q) = clamp {
        let all: Vec<f64> = b.iter().chain(&a).copied().collect();
        let hi = quantile(&all, q);
        for v in a.iter_mut().chain(b.iter_mut()) {
            *v = v.clamp(-hi, hi);
        }
    }
    Ok((to_f32(&a), to_f32(&b)))
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Combines `inputs` as PEFT's `add_weighted_adapter(adapters, weights, combination_type)`
/// does (see the module doc). Every input must be a plain LoRA (no DoRA, trained biases or
/// other extras, which PEFT does not combine either) adapting whole Linears.
pub fn combine(inputs: &[CombineInput], how: Combination) -> Result<Combined> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::config("no adapters to combine".to_string()))?;
    // PEFT: one adapter can only be combined linearly.
    let how = if inputs.len() == 1 {
        Combination::Linear
    } else {
        how
    };
    let mut ranks = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let what = format!("adapter {} of {}", i + 1, inputs.len());
        if input.config["peft_type"] != "LORA" {
            return Err(Error::config(format!(
                "{what}: peft_type is {}; only LoRA adapters are combined",
                input.config["peft_type"]
            )));
        }
        if !input.lora.eval_only().is_empty() || input.lora.config.bias != crate::BiasMode::None {
            return Err(Error::config(format!(
                "{what} holds {}, which add_weighted_adapter does not combine; combine plain \
                 LoRA adapters",
                if input.lora.eval_only().is_empty() {
                    "trained biases".to_string()
                } else {
                    input.lora.eval_only().join(", ")
                }
            )));
        }
        if !input.weight.is_finite() {
            return Err(Error::config(format!("{what}: weight {}", input.weight)));
        }
        ranks.push(config_rank(input.config)?);
    }
    let rank = match how {
        Combination::Linear | Combination::Ties { .. } => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(Error::config(format!(
                    "combination `{}` needs adapters of one rank; their ranks are {ranks:?} \
                     (use `cat` or `svd`)",
                    how.name()
                )));
            }
            ranks[0]
        }
        Combination::Cat => ranks.iter().sum(),
        Combination::Svd { rank, .. } => {
            rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0))
        }
    };
    if rank == 0 {
        return Err(Error::config("the combined rank is 0".to_string()));
    }
    if let Combination::Ties { density, .. } = how
        && !(0.0..=1.0).contains(&density)
    {
        return Err(Error::config(format!(
            "ties density {density}: expected a fraction in [0, 1]"
        )));
    }
    if let Combination::Svd { clamp: Some(q), .. } = how
        && !(q > 0.0 && q <= 1.0)
    {
        return Err(Error::config(format!(
            "svd clamp {q}: expected a quantile in (0, 1]"
        )));
    }
    // Every Linear any input adapts, with the parts of the inputs that adapt it.
    let mut linears: BTreeMap<(usize, Module), (usize, usize, Vec<Part>)> = BTreeMap::new();
    for input in inputs {
        for (site, update) in input.lora.sites() {
            if site.target.is_slice() {
                return Err(Error::config(format!(
                    "a `{}` slice of c_attn: combine adapters loaded from PEFT files (whole \
                     Linears)",
                    site.target.name()
                )));
            }
            let entry = linears
                .entry((site.layer, site.target.module()))
                .or_insert_with(|| (site.in_features, site.width, Vec::new()));
            entry.2.push(Part {
                ws: input.weight * site.scale as f64,
                a: update.a.value().to_vec()?,
                b: update.b.value().to_vec()?,
                r: site.r,
            });
        }
    }
    let mut modules = Vec::with_capacity(linears.len());
    for ((layer, module), (n_in, n_out, parts)) in linears {
        let at = |e: Error| match e {
            Error::Config { message, .. } => {
                Error::config(format!("h.{layer}.{}: {message}", module.path()))
            }
            e => e,
        };
        let (a, b) = match how {
            Combination::Linear => linear(&parts, n_in, n_out, rank),
            Combination::Cat => cat(&parts, n_in, n_out, rank),
            Combination::Svd { clamp, .. } => svd(&parts, n_in, n_out, rank, clamp),
            Combination::Ties { density, majority } => {
                ties_ab(&parts, n_in, n_out, rank, density, majority)
            }
        }
        .map_err(at)?;
        modules.push(CombinedModule {
            layer,
            module,
            r: rank,
            in_features: n_in,
            out_features: n_out,
            a,
            b,
        });
    }
    let configs: Vec<&Value> = inputs.iter().map(|i| i.config).collect();
    let mut config = first.config.clone();
    config["r"] = json!(rank);
    config["lora_alpha"] = json!(rank);
    config["target_modules"] = union_targets(&configs)?;
    config["rank_pattern"] = json!({});
    config["alpha_pattern"] = json!({});
    Ok(Combined {
        config,
        rank,
        modules,
    })
}

impl Combined {
    /// Writes the adapter in PEFT's layout: `adapter_config.json` and
    /// `adapter_model.safetensors` (f32, keys `base_model.model.transformer.h.{i}.….lora_A.weight`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut tensors = Vec::with_capacity(2 * self.modules.len());
        for m in &self.modules {
            let stem = format!("{KEY_PREFIX}h.{}.{}", m.layer, m.module.path());
            tensors.push((
                format!("{stem}.lora_A.weight"),
                vec![m.r, m.in_features],
                &m.a[..],
            ));
            tensors.push((
                format!("{stem}.lora_B.weight"),
                vec![m.out_features, m.r],
                &m.b[..],
            ));
        }
        write_adapter_files(dir, &tensors, &self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(ws: f64, r: usize, n_in: usize, n_out: usize, seed: u32) -> Part {
        let v = |n: usize, k: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((((i as u32).wrapping_mul(2654435761) ^ k) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        Part {
            ws,
            a: v(r * n_in, seed),
            b: v(n_out * r, seed + 7),
            r,
        }
    }

    fn product(a: &[f32], b: &[f32], r: usize, n_in: usize, n_out: usize) -> DMatrix<f64> {
        let a = DMatrix::from_row_slice(r, n_in, a).map(|v| v as f64);
        let b = DMatrix::from_row_slice(n_out, r, b).map(|v| v as f64);
        b * a
    }

    #[test]
    fn cat_is_exact_and_svd_is_the_best_low_rank_fit() {
        let (n_in, n_out) = (6, 5);
        let parts = [part(0.7, 2, n_in, n_out, 1), part(-0.4, 3, n_in, n_out, 2)];
        let want = delta(&parts, n_in, n_out);
        let (a, b) = cat(&parts, n_in, n_out, 6).unwrap();
        let got = product(&a, &b, 6, n_in, n_out);
        assert!((got - &want).abs().max() < 1e-5);
        // Rank 5 = full rank of a 5-row ΔW: exact; rank 2: the error is the dropped σ's.
        let (a, b) = svd(&parts, n_in, n_out, 5, None).unwrap();
        assert!((product(&a, &b, 5, n_in, n_out) - &want).abs().max() < 1e-5);
        let (a, b) = svd(&parts, n_in, n_out, 2, None).unwrap();
        let mut s: Vec<f64> = want
            .clone()
            .svd(false, false)
            .singular_values
            .iter()
            .copied()
            .collect();
        s.sort_by(|x, y| y.total_cmp(x));
        let err = (product(&a, &b, 2, n_in, n_out) - &want).norm();
        let dropped = s[2..].iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((err - dropped).abs() < 1e-5, "{err} vs {dropped}");
        assert!(svd(&parts, n_in, n_out, 6, None).is_err());
    }

    #[test]
    fn linear_weighs_a_and_b_by_roots_with_the_sign_on_a() {
        let (n_in, n_out) = (3, 2);
        let p = part(-0.25, 1, n_in, n_out, 3);
        let (a, b) = linear(std::slice::from_ref(&p), n_in, n_out, 1).unwrap();
        for (x, y) in a.iter().zip(&p.a) {
            assert!((x + 0.5 * y).abs() < 1e-7);
        }
        for (x, y) in b.iter().zip(&p.b) {
            assert!((x - 0.5 * y).abs() < 1e-7);
        }
        // One adapter alone: B·A = ws·B₁·A₁ exactly.
        let got = product(&a, &b, 1, n_in, n_out);
        assert!((got - delta(&[p], n_in, n_out)).abs().max() < 1e-6);
    }

    #[test]
    fn quantile_interpolates_as_torch_does() {
        // torch.quantile(tensor([1., 2., 3., 4.]), 0.5) == 2.5; q = 0.9 → 3.7.
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), 2.5);
        assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.9) - 3.7).abs() < 1e-12);
    }
}
