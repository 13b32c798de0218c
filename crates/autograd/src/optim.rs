//! Optimizers, gradient clipping and learning-rate schedules. They see trainable parameters
//! only: optimizer state exists for nothing else.
//!
//! AdamW (Loshchilov & Hutter; torch.optim.AdamW semantics), per step t and parameter p with
//! gradient g:  p ← p − lr·wd·p;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
//! p ← p − lr·(m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + eps).
//! SGD: p ← p − lr·g.
//!
//! On a GPU, AdamW keeps its parameters, their gradients and its moments in arenas (one buffer
//! each, see [`crate::arena`]): with the gradients from [`AdamW::grads`], a step is one AdamW
//! dispatch per parameter group (per 128 MiB binding), whatever the number of tensors. On the
//! CPU, and whenever the arenas do not hold the whole step, it updates tensor by tensor.

use std::collections::HashMap;
use std::sync::Arc;

use tensor::ops::adamw::{AdamWParams, adamw_step, adamw_step_clipped};
use tensor::ops::elementwise::{axpy, mul, scale};
use tensor::ops::reduce::sum_all;
use tensor::{Error, Result, Tensor};

use crate::arena::Arenas;
use crate::clip::GradClip;
use crate::grads::Grads;
use crate::memory::Counter;
use crate::param::{ParamId, Trainable};

/// Parameters that share a learning-rate multiplier and a weight decay (LoRA+ gives B a larger
/// learning rate than A: two groups).
#[derive(Clone, Debug)]
pub struct ParamGroup {
    pub params: Vec<Trainable>,
    /// Multiplies the scheduled learning rate.
    pub lr_scale: f32,
    pub weight_decay: f32,
}

impl ParamGroup {
    pub fn new(params: Vec<Trainable>, weight_decay: f32) -> ParamGroup {
        ParamGroup {
            params,
            lr_scale: 1.0,
            weight_decay,
        }
    }
}

/// AdamW over parameter groups.
pub struct AdamW {
    pub groups: Vec<ParamGroup>,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Steps taken (the t of the bias correction).
    pub step: u32,
    state: HashMap<ParamId, (Tensor, Tensor)>,
    /// Parameters whose state the last step created (what [`AdamW::take_back`] removes).
    created: Vec<ParamId>,
    bytes: Counter,
    /// The arenas, once packed (`None` also where there are none: CPU, mixed devices).
    arenas: Option<Arenas>,
    packed: bool,
}

impl AdamW {
    /// AdamW with torch's defaults (β1 0.9, β2 0.999, eps 1e-8).
    pub fn new(groups: Vec<ParamGroup>) -> AdamW {
        AdamW {
            groups,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            state: HashMap::new(),
            created: Vec::new(),
            bytes: Counter::default(),
            arenas: None,
            packed: false,
        }
    }

    /// An empty gradient store for a step of this optimizer: on a GPU its gradients go into the
    /// optimizer's gradient arena, so that the norm and the update of the step each take one
    /// dispatch (per group and binding) over all of them. The first call moves the parameters
    /// into their arena. [`Grads::new`] works too, tensor by tensor.
    pub fn grads(&mut self) -> Result<Grads> {
        self.pack()?;
        Ok(match &self.arenas {
            Some(a) => Grads::in_arena(a.layout.clone()),
            None => Grads::new(),
        })
    }

    /// Make the arenas, once (see [`crate::arena`]).
    fn pack(&mut self) -> Result<()> {
        if !self.packed {
            self.packed = true;
            self.arenas = Arenas::pack(&self.groups)?;
        }
        Ok(())
    }

    /// m and v of `p`, made (zeros) if it has none yet: its slots of the moment arenas when
    /// there are arenas, else new tensors.
    fn moments(&mut self, p: &Trainable) -> Result<(Tensor, Tensor)> {
        if let Some(s) = self.state.get(&p.id) {
            return Ok(s.clone());
        }
        let slots = match &self.arenas {
            Some(a) => a.moments(p.id)?,
            None => None,
        };
        let (m, v) = match slots {
            Some(mv) => mv,
            None => {
                let device = p.value.device();
                let m = Tensor::zeros(p.value.shape(), &device)?;
                (m, Tensor::zeros(p.value.shape(), &device)?)
            }
        };
        self.bytes.add(m.bytes() + v.bytes());
        self.state.insert(p.id, (m.clone(), v.clone()));
        self.created.push(p.id);
        Ok((m, v))
    }

    /// The gradient arena when this step can take the fused path: the gradients fill the
    /// arena of this optimizer's layout, the groups are those it was made for, every parameter
    /// still lives at its slot, and every existing m and v is its slot.
    fn fused_gradients<'g>(&self, grads: &'g Grads) -> Option<&'g Tensor> {
        let a = self.arenas.as_ref()?;
        let (flat, layout) = grads.arena()?;
        let params = self.groups.iter().flat_map(|g| &g.params);
        let in_place = params.zip(&layout.slots).all(|(p, slot)| {
            let moments = self.state.get(&p.id).is_none_or(|(m, v)| {
                m.offset_in(&a.m) == Some(slot.offset) && v.offset_in(&a.v) == Some(slot.offset)
            });
            moments && p.value.offset_in(&a.params) == Some(slot.offset)
        });
        (Arc::ptr_eq(layout, &a.layout) && layout.matches(&self.groups) && in_place).then_some(flat)
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn step(&mut self, grads: &Grads, lr: f32) -> Result<()> {
        self.update(grads, lr, None)
    }

    /// [`AdamW::step`] with every gradient multiplied by the clip factor of `clip` as the
    /// update reads it, on the device (no readback, no scaled copies of the gradients): the
    /// same numbers as [`clip_grad_norm`] followed by [`AdamW::step`]. When `clip` says skip
    /// (a non-finite norm or loss, known on the device only), no parameter or moment is
    /// written; the caller learns it from [`GradClip::read`] and then calls
    /// [`AdamW::take_back`].
    pub fn step_clipped(&mut self, grads: &Grads, lr: f32, clip: &GradClip) -> Result<()> {
        self.update(grads, lr, clip.tensor())
    }

    /// Undo the bookkeeping of the last step, which the device skipped ([`AdamW::step_clipped`]
    /// with a skip): the step count goes back and the moments that step created (zeros, never
    /// written) are dropped, so the optimizer is as it was before that step.
    pub fn take_back(&mut self) {
        self.step = self.step.saturating_sub(1);
        for id in std::mem::take(&mut self.created) {
            if let Some((m, v)) = self.state.remove(&id) {
                self.bytes.sub(m.bytes() + v.bytes());
            }
        }
    }

    fn update(&mut self, grads: &Grads, lr: f32, clip: Option<&Tensor>) -> Result<()> {
        let _profile = tensor::profile::scope("optimizer");
        self.pack()?;
        self.step += 1;
        self.created.clear();
        let (beta1, beta2, eps, step) = (self.beta1, self.beta2, self.eps, self.step);
        let hp = |group: &ParamGroup| AdamWParams {
            lr: lr * group.lr_scale,
            beta1,
            beta2,
            eps,
            weight_decay: group.weight_decay,
            step,
        };
        let fused = self.fused_gradients(grads).cloned();
        let groups = self.groups.clone();
        if let Some(flat) = fused {
            // Every parameter has a gradient: state for those without, then one update per
            // group over its range of the four arenas.
            for p in groups.iter().flat_map(|g| &g.params) {
                self.moments(p)?;
            }
            let a = self.arenas.as_ref().expect("the fused path has arenas");
            for (group, &(start, len)) in groups.iter().zip(&a.layout.groups) {
                if len == 0 {
                    continue;
                }
                let range = |t: &Tensor| t.view(start, &[len]);
                let (p, g) = (range(&a.params)?, range(&flat)?);
                let (m, v) = (range(&a.m)?, range(&a.v)?);
                let hp = hp(group);
                match clip {
                    Some(c) => adamw_step_clipped(&p, &g, &m, &v, &hp, c)?,
                    None => adamw_step(&p, &g, &m, &v, &hp)?,
                }
            }
            return Ok(());
        }
        for group in &groups {
            for p in &group.params {
                let Some(g) = grads.get(p.id) else { continue };
                let (m, v) = self.moments(p)?;
                let hp = hp(group);
                match clip {
                    Some(c) => adamw_step_clipped(&p.value, g, &m, &v, &hp, c)?,
                    None => adamw_step(&p.value, g, &m, &v, &hp)?,
                }
            }
        }
        Ok(())
    }

    /// Bytes of m and v (live and peak).
    pub fn memory(&self) -> Counter {
        self.bytes
    }

    /// The state of one parameter (m, v), if it has taken a step.
    pub fn state(&self, id: ParamId) -> Option<&(Tensor, Tensor)> {
        self.state.get(&id)
    }

    /// Every parameter that has state, with its m and v, in the groups' order: what a checkpoint
    /// saves (by the parameter's name, since ids are only valid within one process).
    pub fn state_tensors(&self) -> Vec<(&Trainable, &Tensor, &Tensor)> {
        let params = self.groups.iter().flat_map(|g| &g.params);
        params
            .filter_map(|p| self.state.get(&p.id).map(|(m, v)| (p, m, v)))
            .collect()
    }

    /// Restores a saved state, to resume a run exactly: the step count (the t of the bias
    /// correction) and m and v of the given parameters, which replace any state they had.
    /// Errors if an id is none of the groups' parameters or a shape differs from its parameter's.
    pub fn load_state(
        &mut self,
        step: u32,
        state: impl IntoIterator<Item = (ParamId, Tensor, Tensor)>,
    ) -> Result<()> {
        self.pack()?;
        for (id, m, v) in state {
            let param = self
                .groups
                .iter()
                .flat_map(|g| &g.params)
                .find(|p| p.id == id);
            let Some(param) = param else {
                let message = format!("AdamW state for {id:?}, which is not a parameter it trains");
                return Err(Error::Invalid(message));
            };
            if m.shape() != param.value.shape() || v.shape() != param.value.shape() {
                let message = format!(
                    "AdamW state of `{}`: m {:?} and v {:?} for a parameter of shape {:?}",
                    param.name,
                    m.shape(),
                    v.shape(),
                    param.value.shape()
                );
                return Err(Error::Invalid(message));
            }
            // With arenas, the values are copied into the parameter's slots.
            let slots = match &self.arenas {
                Some(a) => a.moments(id)?,
                None => None,
            };
            let (m, v) = match slots {
                Some((sm, sv)) => {
                    let device = sm.device();
                    sm.copy_from(&m.to_device(&device)?)?;
                    sv.copy_from(&v.to_device(&device)?)?;
                    (sm, sv)
                }
                None => (m, v),
            };
            self.bytes.add(m.bytes() + v.bytes());
            if let Some((old_m, old_v)) = self.state.insert(id, (m, v)) {
                self.bytes.sub(old_m.bytes() + old_v.bytes());
            }
        }
        self.step = step;
        self.created.clear();
        Ok(())
    }
}

/// Plain stochastic gradient descent: p ← p − lr·g.
pub struct Sgd {
    pub params: Vec<Trainable>,
}

impl Sgd {
    pub fn step(&mut self, grads: &Grads, lr: f32) -> Result<()> {
        for p in &self.params {
            if let Some(g) = grads.get(p.id) {
                axpy(&p.value, -lr, g)?;
            }
        }
        Ok(())
    }
}

/// Scale all gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. Reads one number back from the device per gradient tensor, and writes scaled
/// copies of the gradients: [`crate::grad_norm_clip`] with [`AdamW::step_clipped`] does the
/// same on the device without either (this stays as their test oracle and for callers that
/// need clipped gradients).
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f32) -> Result<f32> {
    let _profile = tensor::profile::scope("optimizer");
    // In id order (creation order), not the map's: the same sum, to the bit, in every process.
    let mut ids: Vec<ParamId> = grads.ids().collect();
    ids.sort_unstable();
    let mut total = 0.0f64;
    for &id in &ids {
        let g = grads.get(id).unwrap();
        total += sum_all(&mul(g, g)?)?.to_vec()?[0] as f64;
    }
    let norm = total.sqrt() as f32;
    if norm > max_norm && norm.is_finite() {
        let c = max_norm / (norm + 1e-6);
        for id in ids {
            let scaled = scale(grads.get(id).unwrap(), c)?;
            grads.set(id, scaled);
        }
    }
    Ok(norm)
}

/// How the learning rate changes over training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// Linear warm-up from 0 over `warmup` steps, then linear decay to 0 at `total`.
    WarmupLinear {
        warmup: u32,
        total: u32,
    },
    /// Linear warm-up, then cosine decay to `min_ratio`·lr at `total`.
    WarmupCosine {
        warmup: u32,
        total: u32,
        min_ratio: f32,
    },
}

impl Schedule {
    /// The learning rate for `step` (0-based) given the base rate.
    pub fn lr(&self, base: f32, step: u32) -> f32 {
        let warm = |warmup: u32| {
            if warmup > 0 && step < warmup {
                Some(base * (step + 1) as f32 / warmup as f32)
            } else {
                None
            }
        };
        match *self {
            Schedule::Constant => base,
            Schedule::WarmupLinear { warmup, total } => warm(warmup).unwrap_or_else(|| {
                let span = total.saturating_sub(warmup).max(1) as f32;
                base * (1.0 - (step - warmup) as f32 / span).max(0.0)
            }),
            Schedule::WarmupCosine {
                warmup,
                total,
                min_ratio,
            } => warm(warmup).unwrap_or_else(|| {
                let span = total.saturating_sub(warmup).max(1) as f32;
                let progress = ((step - warmup) as f32 / span).min(1.0);
                let cos = 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
                base * (min_ratio + (1.0 - min_ratio) * cos)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    #[test]
    fn schedules_warm_up_and_decay() {
        let s = Schedule::WarmupLinear {
            warmup: 10,
            total: 110,
        };
        assert!((s.lr(1.0, 0) - 0.1).abs() < 1e-6);
        assert!((s.lr(1.0, 9) - 1.0).abs() < 1e-6);
        assert!((s.lr(1.0, 60) - 0.5).abs() < 1e-6);
        assert_eq!(s.lr(1.0, 200), 0.0);
        let c = Schedule::WarmupCosine {
            warmup: 0,
            total: 100,
            min_ratio: 0.1,
        };
        assert!((c.lr(1.0, 0) - 1.0).abs() < 1e-6);
        assert!((c.lr(1.0, 50) - 0.55).abs() < 1e-5);
        assert!((c.lr(1.0, 100) - 0.1).abs() < 1e-6);
        assert_eq!(Schedule::Constant.lr(0.3, 12345), 0.3);
    }
}
