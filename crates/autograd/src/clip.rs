//! Gradient clipping on the device: the global L2 norm of every gradient and the factor that
//! brings it to a limit, computed where the gradients are and applied by
//! [`AdamW::step_clipped`](crate::AdamW::step_clipped) as it reads each gradient, so a step
//! needs no readback until someone asks for the norm ([`GradClip::read`]).
//!
//! ```text
//! norm = √(Σ_p Σ g_p²)        over the parameters with a gradient, in id (creation) order
//! clip = max_norm / (norm + 1e-6)   if norm > max_norm and norm is finite, else 1
//! skip = the norm or a checked value (the loss) is not finite
//! ```
//!
//! When the gradients are in the optimizer's gradient arena ([`crate::AdamW::grads`] on a GPU),
//! the norm is taken over the arena as one tensor, in its (the groups') order: one
//! `sum_squares` dispatch while the arena fits one binding.
//!
//! A skipped step is decided on the device: `step_clipped` then writes no parameter or moment,
//! and the host, once it has read the result, takes the step back with
//! [`AdamW::take_back`](crate::AdamW::take_back).
//!
//! The same formula as [`clip_grad_norm`](crate::clip_grad_norm), which reads each tensor's
//! Σ g² back and scales the gradients in place: on the CPU the two give the same bits; on the
//! GPU the slot sums are added in f32 instead of f64 (see
//! [`tensor::ops::grad_norm`]).

use tensor::ops::grad_norm::grad_norm_clip as device_norm_clip;
use tensor::{Result, Tensor};

use crate::grads::Grads;
use crate::param::ParamId;

/// The global gradient norm, clip factor and finite check of one step, on the gradients'
/// device.
#[derive(Clone)]
pub struct GradClip {
    /// `[norm, clip, ok, checked…]`; `None` when there was no gradient (norm 0, nothing to
    /// clip), and then `checked` holds the checked values themselves.
    value: Option<Tensor>,
    checked: Vec<Tensor>,
}

/// What a [`GradClip`] measured, read back.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipReport {
    /// The global norm before clipping.
    pub norm: f32,
    /// The norm or a checked value was not finite: the step was skipped.
    pub skipped: bool,
    /// The checked values (the loss), in the order given.
    pub checked: Vec<f32>,
}

impl GradClip {
    /// The norm, the skip decision and the checked values: one readback from the device (a
    /// wait for the work recorded so far, so read it after the update is recorded).
    pub fn read(&self) -> Result<ClipReport> {
        match &self.value {
            Some(t) => {
                let v = t.to_vec()?;
                Ok(ClipReport {
                    norm: v[0],
                    skipped: v[2] != 1.0,
                    checked: v[3..].to_vec(),
                })
            }
            None => {
                let checked = self
                    .checked
                    .iter()
                    .map(|c| Ok(c.to_vec()?[0]))
                    .collect::<Result<Vec<f32>>>()?;
                let skipped = !checked.iter().all(|c| c.is_finite());
                Ok(ClipReport {
                    norm: 0.0,
                    skipped,
                    checked,
                })
            }
        }
    }

    /// The `[norm, clip factor, ok, checked…]` tensor, if any parameter had a gradient.
    pub fn tensor(&self) -> Option<&Tensor> {
        self.value.as_ref()
    }
}

/// The global norm of `grads`, the factor that clips it to `max_norm` (`f32::INFINITY`:
/// measure only) and whether the step must be skipped (the norm or one of the one-element
/// `checked` tensors, such as the loss, is not finite), on the device; the gradients themselves
/// are left as they are.
pub fn grad_norm_clip(grads: &Grads, max_norm: f32, checked: &[&Tensor]) -> Result<GradClip> {
    let _profile = tensor::profile::scope("optimizer");
    // In id order (creation order), not the map's: the same sum, to the bit, in every process.
    let mut ids: Vec<ParamId> = grads.ids().collect();
    ids.sort_unstable();
    if ids.is_empty() {
        return Ok(GradClip {
            value: None,
            checked: checked.iter().map(|&c| c.clone()).collect(),
        });
    }
    // All the gradients in one arena: one tensor, one `sum_squares` dispatch (per binding).
    let tensors: Vec<&Tensor> = match grads.arena() {
        Some((flat, _)) => vec![flat],
        None => ids.iter().map(|&id| grads.get(id).unwrap()).collect(),
    };
    Ok(GradClip {
        value: Some(device_norm_clip(&tensors, max_norm, checked)?),
        checked: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdamW, ParamGroup, Trainable, clip_grad_norm, param::Param};
    use tensor::Device;
    use tensor::testing::{assert_close_slices, gpu, random};

    const SHAPES: [&[usize]; 4] = [&[8, 6], &[6], &[300], &[2, 2, 5]];

    /// `steps` AdamW steps of four parameters whose gradients are random (seeded by the step),
    /// clipped to `limit` either the old way (`clip_grad_norm`, then `AdamW::step`) or on the
    /// device (`grad_norm_clip`, then `AdamW::step_clipped`). Returns the norms of every step
    /// and each parameter's final value and moments.
    fn run(device: &Device, fused: bool, limit: f32) -> (Vec<f32>, Vec<Vec<f32>>) {
        let params: Vec<Trainable> = SHAPES
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let p = Param::trainable(format!("p{k}"), random(s, k as u64, device));
                p.as_trainable().unwrap().clone()
            })
            .collect();
        let mut opt = AdamW::new(vec![ParamGroup::new(params.clone(), 0.05)]);
        let mut norms = Vec::new();
        for step in 0..4u64 {
            let mut grads = Grads::new();
            for (k, p) in params.iter().enumerate() {
                let g = random(p.value.shape(), 100 * step + k as u64, device);
                grads.accumulate(p.id, g).unwrap();
            }
            if fused {
                let clip = grad_norm_clip(&grads, limit, &[]).unwrap();
                opt.step_clipped(&grads, 1e-2, &clip).unwrap();
                norms.push(clip.read().unwrap().norm);
            } else {
                norms.push(clip_grad_norm(&mut grads, limit).unwrap());
                opt.step(&grads, 1e-2).unwrap();
            }
        }
        let mut out = Vec::new();
        for p in &params {
            let (m, v) = opt.state(p.id).unwrap();
            out.extend([&p.value, m, v].map(|t| t.to_vec().unwrap()));
        }
        (norms, out)
    }

    /// The gradients' norm is about √374 · 0.58 ≈ 11: a limit of 3 clips every step, 1e9 none.
    #[test]
    fn device_clipping_is_the_old_composition_to_the_bit_on_the_cpu() {
        let cpu = Device::cpu();
        for limit in [3.0, 1e9, f32::INFINITY] {
            let (norms, old) = run(&cpu, false, limit);
            assert!(norms.iter().all(|&n| n > 3.0 && n < 1e9), "{norms:?}");
            assert_eq!(run(&cpu, true, limit), (norms, old), "limit {limit}");
        }
        assert_ne!(run(&cpu, true, 3.0).1, run(&cpu, true, 1e9).1);
    }

    #[test]
    fn device_clipping_on_the_gpu_matches_the_old_composition() {
        let Some(gpu) = gpu() else { return };
        for limit in [3.0, 1e9] {
            let (cpu_norms, want) = run(&Device::cpu(), false, limit);
            let (norms, got) = run(&gpu, true, limit);
            // Norms: 4 slot sums added in f32 and GPU reductions, within ~1e-6 relative.
            assert_close_slices("norms", &norms, &cpu_norms, 0.0, 4e-6);
            for (g, w) in got.iter().zip(&want) {
                assert_close_slices("param, m, v", g, w, 1e-6, 1e-5);
            }
        }
    }

    #[test]
    fn no_gradients_give_norm_0() {
        let cpu = Device::cpu();
        let loss = Tensor::from_vec(vec![f32::NAN], &[1], &cpu).unwrap();
        let clip = grad_norm_clip(&Grads::new(), 1.0, &[&loss]).unwrap();
        assert!(clip.tensor().is_none());
        let r = clip.read().unwrap();
        assert!(r.norm == 0.0 && r.skipped && r.checked[0].is_nan(), "{r:?}");
    }

    /// A step skipped on the device (a non-finite loss), taken back on the host, leaves the
    /// optimizer as if it had not been tried: the next step equals a first step.
    #[test]
    fn a_skipped_step_taken_back_leaves_the_optimizer_untouched() {
        let mut devices = vec![Device::cpu()];
        devices.extend(gpu());
        for d in &devices {
            let make = || {
                let p = Param::trainable("p", random(&[5, 3], 9, d));
                let p = p.as_trainable().unwrap().clone();
                let opt = AdamW::new(vec![ParamGroup::new(vec![p.clone()], 0.1)]);
                (p, opt)
            };
            let (p, mut opt) = make();
            let mut grads = Grads::new();
            grads.accumulate(p.id, random(&[5, 3], 10, d)).unwrap();
            let (before, bytes) = (p.value.to_vec().unwrap(), opt.memory().live);
            let inf = Tensor::from_vec(vec![f32::INFINITY], &[1], d).unwrap();
            let clip = grad_norm_clip(&grads, 1.0, &[&inf]).unwrap();
            opt.step_clipped(&grads, 0.1, &clip).unwrap();
            let report = clip.read().unwrap();
            assert!(report.skipped && report.norm > 1.0, "{report:?}");
            opt.take_back();
            assert_eq!(p.value.to_vec().unwrap(), before);
            assert!(opt.step == 0 && opt.state(p.id).is_none() && opt.memory().live == bytes);

            let clip = grad_norm_clip(&grads, 1.0, &[]).unwrap();
            opt.step_clipped(&grads, 0.1, &clip).unwrap();
            let (q, mut fresh) = make();
            let mut g2 = Grads::new();
            g2.accumulate(q.id, grads.get(p.id).unwrap().clone())
                .unwrap();
            let clip = grad_norm_clip(&g2, 1.0, &[]).unwrap();
            fresh.step_clipped(&g2, 0.1, &clip).unwrap();
            assert_eq!(p.value.to_vec().unwrap(), q.value.to_vec().unwrap());
            assert_eq!(opt.step, 1);
        }
    }
}
