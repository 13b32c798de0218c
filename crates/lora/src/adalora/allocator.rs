//! AdaLoRA's rank allocator (PEFT 0.21's `RankAllocator` and `AdaLoraModel.update_and_allocate`).
//!
//! Called after each optimizer step, before the gradients are cleared, with the step's index
//! t = 0, 1, …, `total_step` − 1 and the gradients that step used. For every entry θ of every
//! Q (`lora_A`), Λ (`lora_E`), P (`lora_B`), with θ its value after the step and ∇θ its gradient:
//! ```text
//! I   = |θ·∇θ|                         sensitivity
//! Ī  ← β1·Ī + (1 − β1)·I              smoothed sensitivity
//! Ū  ← β2·Ū + (1 − β2)·|I − Ī|        uncertainty (Ī already updated)
//! s(θ) = Ī·Ū
//! S_i = s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)     triplet i of a module
//! ```
//! The budget (kept triplets over all modules), b(0) = init_r·n, b_T = target_r·n:
//! ```text
//! t ≤ tinit:                       b = b(0), no masking
//! tinit < t ≤ T − tfinal:          b = ⌊(b(0) − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³ + b_T⌋,
//!                                  masking when t mod deltaT = 0
//! ```
//! Masking sets Λ_i = 0 for every triplet with S_i ≤ the k-th smallest score, k = b(0) − b
//! (ties are all pruned, as PEFT's `<=` does); the kept flags are the rank pattern.
//! Scores are updated only while t < T − tfinal; at t = T − tfinal the final mask is taken with
//! b = b_T whatever deltaT says, the rank pattern recorded and the scores dropped; after it,
//! every step re-applies that rank pattern to Λ (the optimizer may have revived pruned values).

use autograd::{Grads, Param};
use tensor::Tensor;

use super::SvdUpdate;
use crate::error::{Error, Result};

/// PEFT's schedule fields of `AdaLoraConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraSchedule {
    pub tinit: usize,
    pub tfinal: usize,
    pub delta_t: usize,
    pub beta1: f32,
    pub beta2: f32,
    pub total_step: usize,
}

impl AdaLoraSchedule {
    /// PEFT's checks: total_step > 0, a budgeting phase (tinit < total_step − tfinal),
    /// 0 < beta < 1, deltaT > 0.
    pub fn check(&self) -> Result<()> {
        if self.total_step == 0 {
            return Err(Error::config("AdaLoRA needs total_step > 0"));
        }
        if self.tinit + self.tfinal >= self.total_step {
            return Err(Error::config(format!(
                "AdaLoRA's schedule has no budgeting phase: tinit {} + tfinal {} >= total_step {}",
                self.tinit, self.tfinal, self.total_step
            )));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(Error::config(format!(
                    "AdaLoRA needs 0 < {name} < 1, found {b}"
                )));
            }
        }
        if self.delta_t == 0 {
            return Err(Error::config("AdaLoRA needs deltaT > 0"));
        }
        Ok(())
    }
}

/// Ī and Ū of one parameter.
#[derive(Clone, Debug, Default)]
struct Ema {
    ipt: Vec<f32>,
    unc: Vec<f32>,
}

impl Ema {
    fn update(&mut self, theta: &[f32], grad: &[f32], beta1: f32, beta2: f32) {
        if self.ipt.len() != theta.len() {
            self.ipt = vec![0.0; theta.len()];
            self.unc = vec![0.0; theta.len()];
        }
        for i in 0..theta.len() {
            let sens = (theta[i] * grad[i]).abs();
            self.ipt[i] = beta1 * self.ipt[i] + (1.0 - beta1) * sens;
            self.unc[i] = beta2 * self.unc[i] + (1.0 - beta2) * (sens - self.ipt[i]).abs();
        }
    }

    fn score(&self, i: usize) -> f32 {
        self.ipt[i] * self.unc[i]
    }
}

/// The allocator's state: smoothed scores per module (Q, Λ, P) and the last rank pattern.
#[derive(Clone, Debug)]
pub struct RankAllocator {
    pub schedule: AdaLoraSchedule,
    init_bgt: usize,
    target_bgt: usize,
    emas: Vec<[Ema; 3]>,
    /// Kept triplets per module (true = kept), from the last allocation.
    pub rank_pattern: Option<Vec<Vec<bool>>>,
}

fn values(p: &Param) -> Result<Vec<f32>> {
    Ok(p.value().to_vec()?)
}

fn grad_of(p: &Param, grads: &Grads) -> Result<Vec<f32>> {
    let id = p
        .as_trainable()
        .ok_or_else(|| Error::State(format!("{} is not trainable", p.name())))?
        .id;
    let g = grads
        .get(id)
        .ok_or_else(|| Error::State(format!("AdaLoRA: no gradient for {}", p.name())))?;
    Ok(g.to_vec()?)
}

impl RankAllocator {
    /// For `modules` updates of rank `init_r`, aiming at `target_r` each on average.
    pub fn new(schedule: AdaLoraSchedule, init_r: usize, target_r: usize, modules: usize) -> Self {
        RankAllocator {
            schedule,
            init_bgt: init_r * modules,
            target_bgt: target_r * modules,
            emas: vec![Default::default(); modules],
            rank_pattern: None,
        }
    }

    /// (budget, whether to mask) at step t, PEFT's `budget_schedule`.
    pub fn budget(&self, t: usize) -> (usize, bool) {
        let s = &self.schedule;
        if t <= s.tinit {
            (self.init_bgt, false)
        } else if t + s.tfinal > s.total_step {
            (self.target_bgt, true)
        } else {
            let span = (s.total_step - s.tfinal - s.tinit) as f64;
            let mul = 1.0 - (t - s.tinit) as f64 / span;
            let spread = (self.init_bgt - self.target_bgt) as f64;
            let b = (spread * mul.powi(3) + self.target_bgt as f64) as usize;
            (b, t.is_multiple_of(s.delta_t))
        }
    }

    fn update_scores(&mut self, updates: &[&SvdUpdate], grads: &Grads) -> Result<()> {
        let (b1, b2) = (self.schedule.beta1, self.schedule.beta2);
        for (u, emas) in updates.iter().zip(self.emas.iter_mut()) {
            for (p, ema) in [&u.a, &u.e, &u.b].into_iter().zip(emas.iter_mut()) {
                ema.update(&values(p)?, &grad_of(p, grads)?, b1, b2);
            }
        }
        Ok(())
    }

    /// S_i of every triplet of every module.
    fn triplet_scores(&self, updates: &[&SvdUpdate]) -> Vec<Vec<f32>> {
        updates
            .iter()
            .zip(&self.emas)
            .map(|(u, [a, e, b])| {
                let (r, n_in) = (u.a.value().shape()[0], u.a.value().shape()[1]);
                let out = u.b.value().shape()[0];
                (0..r)
                    .map(|i| {
                        let sa: f32 = (0..n_in).map(|j| a.score(i * n_in + j)).sum::<f32>();
                        let sb: f32 = (0..out).map(|j| b.score(j * r + i)).sum::<f32>();
                        e.score(i) + (sa / n_in as f32 + sb / out as f32)
                    })
                    .collect()
            })
            .collect()
    }

    fn mask_to_budget(&mut self, updates: &[&SvdUpdate], budget: usize) -> Result<()> {
        let scores = self.triplet_scores(updates);
        let k = self
            .init_bgt
            .checked_sub(budget)
            .filter(|&k| k > 0)
            .ok_or_else(|| {
                Error::State(format!(
                    "AdaLoRA: budget {budget} leaves nothing to prune of {}",
                    self.init_bgt
                ))
            })?;
        let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
        all.sort_by(f32::total_cmp);
        let threshold = all[k - 1];
        let pattern: Vec<Vec<bool>> = scores
            .iter()
            .map(|s| s.iter().map(|&v| v > threshold).collect())
            .collect();
        apply_pattern(updates, &pattern)?;
        self.rank_pattern = Some(pattern);
        Ok(())
    }

    /// PEFT's `update_and_allocate(t)`: see the module doc. Returns whether Λ was masked.
    pub fn update_and_allocate(
        &mut self,
        t: usize,
        updates: &[&SvdUpdate],
        grads: &Grads,
    ) -> Result<bool> {
        if updates.len() != self.emas.len() {
            return Err(Error::State(format!(
                "AdaLoRA allocator made for {} modules, given {}",
                self.emas.len(),
                updates.len()
            )));
        }
        let end = self.schedule.total_step - self.schedule.tfinal;
        if t < end {
            self.update_scores(updates, grads)?;
            let (budget, mask) = self.budget(t);
            if mask {
                self.mask_to_budget(updates, budget)?;
            }
            Ok(mask)
        } else if t == end {
            let (budget, _) = self.budget(t);
            self.mask_to_budget(updates, budget)?;
            self.emas = vec![Default::default(); self.emas.len()];
            Ok(true)
        } else {
            let pattern = self.rank_pattern.as_ref().ok_or_else(|| {
                Error::State("AdaLoRA: past the final allocation without a rank pattern".into())
            })?;
            apply_pattern(updates, pattern)?;
            Ok(true)
        }
    }
}

/// Λ_i = 0 wherever the pattern says pruned.
pub fn apply_pattern(updates: &[&SvdUpdate], pattern: &[Vec<bool>]) -> Result<()> {
    for (u, keep) in updates.iter().zip(pattern) {
        let mut e = values(&u.e)?;
        if e.len() != keep.len() {
            return Err(Error::mismatch(
                None,
                format!(
                    "{}: rank pattern of {} for {} singular values",
                    u.e.name(),
                    keep.len(),
                    e.len()
                ),
            ));
        }
        for (v, &k) in e.iter_mut().zip(keep) {
            if !k {
                *v = 0.0;
            }
        }
        let t = Tensor::from_vec(e, u.e.value().shape(), &u.e.value().device())?;
        tensor::ops::slice::write_axis(u.e.value(), 0, 0, &t, false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> AdaLoraSchedule {
        AdaLoraSchedule {
            tinit: 2,
            tfinal: 2,
            delta_t: 2,
            beta1: 0.85,
            beta2: 0.85,
            total_step: 12,
        }
    }

    #[test]
    fn budget_follows_peft_cubic_schedule() {
        // PEFT's budget_schedule for init_r 12, target_r 8, 4 modules (48 → 32).
        let a = RankAllocator::new(schedule(), 12, 8, 4);
        let got: Vec<usize> = (0..12).map(|t| a.budget(t).0).collect();
        assert_eq!(got, [48, 48, 48, 42, 38, 35, 34, 32, 32, 32, 32, 32]);
        let masks: Vec<usize> = (0..12).filter(|&t| a.budget(t).1).collect();
        assert_eq!(masks, [4, 6, 8, 10, 11]);
    }

    #[test]
    fn schedule_without_budgeting_phase_is_refused() {
        let mut s = schedule();
        s.tinit = 10;
        assert!(
            s.check()
                .unwrap_err()
                .to_string()
                .contains("no budgeting phase")
        );
    }
}
