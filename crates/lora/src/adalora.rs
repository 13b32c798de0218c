//! AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
//! Fine-Tuning"): each update in SVD form, with its rank moved between matrices by importance.
//!
//! As PEFT 0.21's `tuners/adalora` computes it, per adapted Linear (x: (…, in), W0 in Conv1D's
//! (in, out) layout), with Q = `lora_A` (r, in), Λ = `lora_E` (r, 1), P = `lora_B` (out, r):
//! ```text
//! ΔW = P·diag(Λ)·Q · α/(ranknum + 1e-5)        (out, in)
//! y  = x·W0 + b + x·(Q ⊙ Λ)ᵀ·Pᵀ · α/(ranknum + 1e-5)
//! ```
//! where Q ⊙ Λ scales row i of Q by Λ_i, α is `lora_alpha` and ranknum is `init_r` for every
//! module, pruned or not (PEFT keeps the scaling fixed). Init: Q, P ~ N(0, 0.02), Λ = 0.
//!
//! The training loss adds PEFT's orthogonal regularizer (`AdaLoraModel.forward`):
//! ```text
//! R = orth_reg_weight · (1/n) · Σ_modules ( ‖Q·Qᵀ − I‖_F + ‖Pᵀ·P − I‖_F ),   n = 2·modules
//! ∂‖M‖_F/∂Q = 2·M·Q/‖M‖_F  (M = Q·Qᵀ − I),   ∂‖M‖_F/∂P = 2·P·M/‖M‖_F  (M = Pᵀ·P − I)
//! ```
//! recorded on the tape ([`orth_norm`]) so its gradient joins the cross-entropy's.
//! Which singular values survive is the [`allocator`]'s business.

pub mod allocator;
pub mod ranks;
mod save;

use autograd::{Param, Tape, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tensor::ops::matmul::MatmulOpts;
use tensor::{Device, Tensor};
use transformer::Gpt2;
use transformer::model::Adapter;

use crate::error::{Error, Result};
use crate::target::Module;

pub use allocator::{AdaLoraSchedule, RankAllocator};
pub use ranks::{AdaLoraRanks, KeptRank};

/// `x·Mᵀ` for M stored (rows, cols).
const TRANS_B: MatmulOpts = MatmulOpts {
    trans_a: false,
    trans_b: true,
};

/// One SVD-form update (PEFT's `SVDLinear`): Q = `lora_A`, Λ = `lora_E`, P = `lora_B`.
///
/// Clones share the parameters (the copy on the model's Linear and the one in [`AdaLora`]
/// are one update).
#[derive(Clone, Debug)]
pub struct SvdUpdate {
    /// Q: (r, in), the right singular vectors.
    pub a: Param,
    /// Λ: (r, 1), the singular values (pruned ones are 0).
    pub e: Param,
    /// P: (out, r), the left singular vectors.
    pub b: Param,
    /// α (`lora_alpha`).
    pub alpha: f32,
    /// PEFT's ranknum: `init_r`, fixed for the adapter's life.
    pub ranknum: f32,
}

impl SvdUpdate {
    /// s = α/(ranknum + 1e-5), PEFT's scaling in f32.
    pub fn scale(&self) -> f32 {
        self.alpha / (self.ranknum + 1e-5)
    }

    pub fn r(&self) -> usize {
        self.a.value().shape()[0]
    }

    /// Δy = (x·(Q ⊙ Λ)ᵀ)·Pᵀ·s, with Q ⊙ Λ = Q ⊙ (Λ·1ᵀ) formed first as PEFT does
    /// (Λ·1ᵀ is a product with a constant row of ones, so ∂/∂Λ is the row sums of ∂/∂(Λ·1ᵀ)).
    pub fn delta(&self, tape: &Tape, x: &Var) -> tensor::Result<Var> {
        let a = tape.param(&self.a);
        let n_in = a.shape()[1];
        let ones = tape.constant(Tensor::full(&[1, n_in], 1.0, &a.value.device())?);
        let e_wide = tape.matmul(&tape.param(&self.e), &ones, None, MatmulOpts::default())?;
        let ae = tape.mul(&a, &e_wide)?; // (r, in)
        let h = tape.matmul(x, &ae, None, TRANS_B)?; // (…, r)
        let d = tape.matmul(&h, &tape.param(&self.b), None, TRANS_B)?; // (…, out)
        tape.scale(&d, self.scale())
    }

    /// ΔW in W's Conv1D layout (in, out): ((P·(Q ⊙ Λ))ᵀ)·s, computed on the host.
    pub fn delta_weight(&self) -> tensor::Result<Tensor> {
        let (a, e, b) = (
            self.a.value().to_vec()?,
            self.e.value().to_vec()?,
            self.b.value().to_vec()?,
        );
        let (r, n_in) = (self.a.value().shape()[0], self.a.value().shape()[1]);
        let out = self.b.value().shape()[0];
        let s = self.scale();
        let mut w = vec![0.0f32; n_in * out];
        for i in 0..n_in {
            for o in 0..out {
                let mut acc = 0.0f32;
                for k in 0..r {
                    acc += b[o * r + k] * a[k * n_in + i] * e[k];
                }
                w[i * out + o] = acc * s;
            }
        }
        Tensor::from_vec(w, &[n_in, out], &self.a.value().device())
    }
}

impl Adapter for SvdUpdate {
    fn apply(&self, tape: &Tape, x: &Var, y: Var) -> transformer::Result<Var> {
        let d = self.delta(tape, x)?;
        Ok(tape.add(&y, &d)?)
    }

    fn params(&self) -> Vec<&Param> {
        vec![&self.a, &self.e, &self.b]
    }
}

/// Which Gram matrix [`orth_norm`] measures: Q·Qᵀ for `lora_A`, Pᵀ·P for `lora_B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gram {
    /// M = X·Xᵀ − I for X (r, n): rows orthonormal.
    Rows,
    /// M = Xᵀ·X − I for X (n, r): columns orthonormal.
    Cols,
}

/// M = (X·Xᵀ or Xᵀ·X) − I, (r, r), in f64 from X's values (rows, cols).
fn gram_minus_identity(x: &[f32], rows: usize, cols: usize, gram: Gram) -> Vec<f64> {
    let r = match gram {
        Gram::Rows => rows,
        Gram::Cols => cols,
    };
    let mut m = vec![0.0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            let mut acc = 0.0f64;
            match gram {
                Gram::Rows => {
                    for k in 0..cols {
                        acc += f64::from(x[i * cols + k]) * f64::from(x[j * cols + k]);
                    }
                }
                Gram::Cols => {
                    for k in 0..rows {
                        acc += f64::from(x[k * cols + i]) * f64::from(x[k * cols + j]);
                    }
                }
            }
            m[i * r + j] = acc - if i == j { 1.0 } else { 0.0 };
        }
    }
    m
}

/// ‖M‖_F with M = X·Xᵀ − I (`Rows`) or Xᵀ·X − I (`Cols`), a (1) value on the tape.
/// Backward: dX = dy·2·M·X/‖M‖_F (`Rows`) or dy·2·X·M/‖M‖_F (`Cols`); 0 where ‖M‖_F = 0.
pub fn orth_norm(tape: &Tape, x: &Var, gram: Gram) -> tensor::Result<Var> {
    let (rows, cols) = (x.shape()[0], x.shape()[1]);
    let xv = x.value.to_vec()?;
    let m = gram_minus_identity(&xv, rows, cols, gram);
    let norm = m.iter().map(|v| v * v).sum::<f64>().sqrt();
    let device = x.value.device();
    let value = Tensor::from_vec(vec![norm as f32], &[1], &device)?;
    tape.record("orth_norm", value, &[x], 0, move |dy| {
        let dy = f64::from(dy.to_vec()?[0]);
        let k = if norm > 0.0 { 2.0 * dy / norm } else { 0.0 };
        let r = match gram {
            Gram::Rows => rows,
            Gram::Cols => cols,
        };
        let mut g = vec![0.0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let mut acc = 0.0f64;
                match gram {
                    // (M·X)_ij = Σ_k M_ik X_kj
                    Gram::Rows => {
                        for t in 0..r {
                            acc += m[i * r + t] * f64::from(xv[t * cols + j]);
                        }
                    }
                    // (X·M)_ij = Σ_k X_ik M_kj
                    Gram::Cols => {
                        for t in 0..r {
                            acc += f64::from(xv[i * cols + t]) * m[t * r + j];
                        }
                    }
                }
                g[i * cols + j] = (k * acc) as f32;
            }
        }
        Ok(vec![Some(Tensor::from_vec(g, &[rows, cols], &device)?)])
    })
}

/// AdaLoRA's training-time settings (PEFT's `AdaLoraConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraConfig {
    pub init_r: usize,
    pub target_r: usize,
    pub lora_alpha: f32,
    /// The adapted modules of every block.
    pub modules: Vec<Module>,
    pub orth_reg_weight: f32,
    pub schedule: AdaLoraSchedule,
}

/// The SVD-form updates on a model, in PEFT's parameter order (block by block, modules in
/// the model's order), each with its PEFT module name (`transformer.h.0.attn.c_attn`).
pub struct AdaLora {
    pub config: AdaLoraConfig,
    pub updates: Vec<(String, SvdUpdate)>,
}

impl AdaLora {
    /// Attach updates with PEFT's init (Q, P ~ N(0, 0.02) from `seed`, Λ = 0) to every
    /// block's `config.modules`; refused on a Linear that already has an adapter.
    pub fn inject(model: &mut Gpt2, config: &AdaLoraConfig, seed: u64) -> Result<AdaLora> {
        let normal = Normal::new(0.0f32, 0.02).expect("0.02 is a valid std");
        let mut rng = StdRng::seed_from_u64(seed);
        Self::inject_with(model, config, |name, shape, device| {
            let n: usize = shape.iter().product();
            let v = if name.ends_with("lora_E") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            Ok(Tensor::from_vec(v, shape, device)?)
        })
    }

    /// Attach updates whose A, E, B `init(name, shape, device)` gives, `name` being PEFT's
    /// `transformer.h.{l}.{module}.lora_{A,E,B}`.
    pub fn inject_with(
        model: &mut Gpt2,
        config: &AdaLoraConfig,
        mut init: impl FnMut(&str, &[usize], &Device) -> Result<Tensor>,
    ) -> Result<AdaLora> {
        if config.init_r == 0 || config.target_r > config.init_r {
            return Err(Error::config(format!(
                "AdaLoRA needs 0 < target_r <= init_r; found init_r {}, target_r {}",
                config.init_r, config.target_r
            )));
        }
        config.schedule.check()?;
        let device = model.wte.value().device();
        let gpt = model.config.clone();
        let r = config.init_r;
        let mut modules = config.modules.clone();
        modules.sort();
        modules.dedup();
        let mut updates = Vec::new();
        for (l, block) in model.h.iter_mut().enumerate() {
            for &module in &modules {
                let (n_in, n_out) = module.shape(&gpt);
                let name = format!("transformer.h.{l}.{}", module.path());
                let mut make = |part: &str, shape: &[usize]| -> Result<Param> {
                    let full = format!("{name}.{part}");
                    let t = init(&full, shape, &device)?;
                    if t.shape() != shape {
                        return Err(Error::mismatch(
                            None,
                            format!("{full}: expected shape {shape:?}, found {:?}", t.shape()),
                        ));
                    }
                    Ok(Param::trainable(full, t))
                };
                let update = SvdUpdate {
                    a: make("lora_A", &[r, n_in])?,
                    e: make("lora_E", &[r, 1])?,
                    b: make("lora_B", &[n_out, r])?,
                    alpha: config.lora_alpha,
                    ranknum: r as f32,
                };
                let linear = module.linear_mut(block);
                if linear.adapter.is_some() {
                    return Err(Error::State(format!("{name} already has an adapter")));
                }
                linear.adapter = Some(Box::new(update.clone()));
                updates.push((name, update));
            }
        }
        Ok(AdaLora {
            config: config.clone(),
            updates,
        })
    }

    /// Q, Λ, P of every update, in order.
    pub fn trainable_params(&self) -> Vec<&Param> {
        self.updates.iter().flat_map(|(_, u)| u.params()).collect()
    }

    /// orth_reg_weight · mean over the 2·modules matrices of ‖Q·Qᵀ − I‖_F and ‖Pᵀ·P − I‖_F.
    pub fn orth_regularizer(&self, tape: &Tape) -> tensor::Result<Var> {
        let mut total: Option<Var> = None;
        for (_, u) in &self.updates {
            for (p, gram) in [(&u.a, Gram::Rows), (&u.b, Gram::Cols)] {
                let n = orth_norm(tape, &tape.param(p), gram)?;
                total = Some(match total {
                    Some(t) => tape.add(&t, &n)?,
                    None => n,
                });
            }
        }
        let total =
            total.ok_or_else(|| tensor::Error::Invalid("AdaLoRA without updates".into()))?;
        let n = 2 * self.updates.len();
        tape.scale(&total, self.config.orth_reg_weight / n as f32)
    }

    /// The training loss: `loss` plus [`AdaLora::orth_regularizer`] (PEFT adds it whenever the
    /// model computes a loss).
    pub fn regularized(&self, tape: &Tape, loss: &Var) -> tensor::Result<Var> {
        if self.config.orth_reg_weight == 0.0 {
            return Ok(loss.clone());
        }
        tape.add(loss, &self.orth_regularizer(tape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use autograd::Grads;

    fn fd_check(gram: Gram, rows: usize, cols: usize) {
        let cpu = Device::cpu();
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.13)
            .collect();
        let p = Param::trainable(
            "x",
            Tensor::from_vec(v.clone(), &[rows, cols], &cpu).unwrap(),
        );
        let tape = Tape::new();
        let y = orth_norm(&tape, &tape.param(&p), gram).unwrap();
        let mut grads = Grads::new();
        tape.backward(&y, &mut grads).unwrap();
        let g = grads
            .get(p.as_trainable().unwrap().id)
            .unwrap()
            .to_vec()
            .unwrap();
        let f = |v: &[f32]| {
            let m = gram_minus_identity(v, rows, cols, gram);
            m.iter().map(|x| x * x).sum::<f64>().sqrt()
        };
        for j in 0..v.len() {
            let h = 1e-3f32;
            let (mut up, mut down) = (v.clone(), v.clone());
            up[j] += h;
            down[j] -= h;
            let fd = (f(&up) - f(&down)) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(g[j])).abs() < 1e-3 * fd.abs().max(1.0),
                "{gram:?} d/dx[{j}]: backward {}, finite differences {fd}",
                g[j]
            );
        }
    }

    #[test]
    fn orth_norm_gradient_matches_finite_differences() {
        fd_check(Gram::Rows, 3, 5);
        fd_check(Gram::Cols, 5, 3);
    }

    #[test]
    fn orth_norm_is_zero_for_orthonormal_rows() {
        let cpu = Device::cpu();
        let x = Tensor::from_vec(vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0], &[2, 3], &cpu).unwrap();
        let tape = Tape::inference();
        let y = orth_norm(&tape, &tape.constant(x), Gram::Rows).unwrap();
        assert_eq!(y.value.to_vec().unwrap(), vec![0.0]);
    }
}
