//! Gradient clipping on the device: the global L2 norm of every gradient and the factor that
//! brings it to a limit, computed where the gradients are and applied by
//! [`AdamW::step_clipped`](crate::AdamW::step_clipped) as it reads each gradient, so a step
//! needs no readback until someone asks for the norm ([`GradClip::norm`]).
//!
//! ```text
//! norm = √(Σ_p Σ g_p²)        over the parameters with a gradient, in id (creation) order
//! clip = max_norm / (norm + 1e-6)   if norm > max_norm and norm is finite, else 1
//! ```
//!
//! The same formula as [`clip_grad_norm`](crate::clip_grad_norm), which reads each tensor's
//! Σ g² back and scales the gradients in place: on the CPU the two give the same bits; on the
//! GPU the slot sums are added in f32 instead of f64 (see
//! [`tensor::ops::grad_norm`]).

use tensor::ops::grad_norm::grad_norm_clip as device_norm_clip;
use tensor::{Result, Tensor};

use crate::grads::Grads;
use crate::param::ParamId;

/// The global gradient norm and clip factor of one step, on the gradients' device.
#[derive(Clone)]
pub struct GradClip {
    /// `[norm, clip]`; `None` when there was no gradient (norm 0, nothing to clip).
    value: Option<Tensor>,
}

impl GradClip {
    /// The norm before clipping. Reads one number back from the device (a wait for the work
    /// recorded so far).
    pub fn norm(&self) -> Result<f32> {
        match &self.value {
            Some(t) => Ok(t.to_vec()?[0]),
            None => Ok(0.0),
        }
    }

    /// The `[norm, clip factor]` tensor, if any parameter had a gradient.
    pub fn tensor(&self) -> Option<&Tensor> {
        self.value.as_ref()
    }
}

/// The global norm of `grads` and the factor that clips it to `max_norm` (`f32::INFINITY`:
/// measure only), on the device; the gradients themselves are left as they are.
pub fn grad_norm_clip(grads: &Grads, max_norm: f32) -> Result<GradClip> {
    let _profile = tensor::profile::scope("optimizer");
    // In id order (creation order), not the map's: the same sum, to the bit, in every process.
    let mut ids: Vec<ParamId> = grads.ids().collect();
    ids.sort_unstable();
    if ids.is_empty() {
        return Ok(GradClip { value: None });
    }
    let tensors: Vec<&Tensor> = ids.iter().map(|&id| grads.get(id).unwrap()).collect();
    Ok(GradClip {
        value: Some(device_norm_clip(&tensors, max_norm)?),
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
                let clip = grad_norm_clip(&grads, limit).unwrap();
                opt.step_clipped(&grads, 1e-2, &clip).unwrap();
                norms.push(clip.norm().unwrap());
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

    /// The gradients' norm is about √362 · 0.58 ≈ 11: a limit of 3 clips every step, 1e9 none.
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
        let clip = grad_norm_clip(&Grads::new(), 1.0).unwrap();
        assert_eq!(clip.norm().unwrap(), 0.0);
        assert!(clip.tensor().is_none());
    }
}
