//! The optimizer's arenas: on a GPU, every trainable parameter, its gradient, and Adam's m and v
//! each live in one buffer, at the same element offsets, so that the global gradient norm is one
//! `sum_squares` dispatch over the gradient arena and AdamW one dispatch per parameter group
//! (per 128 MiB binding) over all of a group's elements, instead of a few dispatches per tensor.
//! (WGSL cannot index an array of buffers portably: one buffer per operand is what makes one
//! dispatch over many tensors possible.)
//!
//! ```text
//! slot k: elements [offset_k, offset_k + numel_k) of each arena, in the groups' order;
//!         offset_k rounded up to the device's binding alignment (64 f32 = 256 bytes)
//! group j: elements [first offset of j, last end of j): one AdamW dispatch with j's lr and
//!          weight decay (the gaps between slots are zeros in every arena and stay zeros)
//! ```
//!
//! - **Parameters** move into the parameter arena once, when the optimizer first needs it
//!   ([`tensor::Tensor::move_into`]: copied there, their own buffers given back): the model's
//!   handles then read and write the arena, so the parameters are stored once, never copied per
//!   step. A second optimizer over parameters already packed in the same order adopts their
//!   arena.
//! - **Gradients** come out of the tape as separate tensors; [`crate::Grads`] made by
//!   [`crate::AdamW::grads`] copies each first gradient into its slot of a gradient arena (a
//!   buffer copy per tensor, recorded as a copy, not a dispatch; later micro-batches add into
//!   the slot). Making every backward rule write into its slot would save those copies, but
//!   would thread an output location through each op; the copies are ~1 MB for LoRA.
//! - **m and v** are zeros at creation; a slot is written only once its parameter has state.
//!
//! The fused path needs every parameter of the layout to have its gradient in its slot and to
//! still live at its offset; otherwise (a parameter without a gradient, gradients replaced by
//! [`crate::clip_grad_norm`], groups changed after packing) the optimizer updates tensor by
//! tensor, with the same numbers. The CPU backend has no arenas: its per-tensor loops cost no
//! dispatch.

use std::collections::HashMap;
use std::sync::Arc;

use tensor::{Device, Result, Tensor};

use crate::optim::ParamGroup;
use crate::param::ParamId;

/// One parameter's place in the arenas.
pub(crate) struct Slot {
    pub id: ParamId,
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl Slot {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where each trainable parameter of the optimizer's groups sits in the arenas.
pub(crate) struct Layout {
    pub slots: Vec<Slot>,
    /// Per group, the element range `(start, len)` its slots cover (`len` 0: an empty group).
    pub groups: Vec<(usize, usize)>,
    /// Elements of each arena.
    pub numel: usize,
    /// Whether alignment left elements between slots (the gradient arena is then zeroed).
    pub gaps: bool,
    pub device: Device,
    index: HashMap<ParamId, usize>,
}

impl Layout {
    /// The layout of `groups`, or `None` when they cannot share arenas: no parameters, a
    /// parameter on the CPU or on another device than the first, or one id twice.
    pub fn of(groups: &[ParamGroup]) -> Option<Layout> {
        let first = groups.iter().flat_map(|g| &g.params).next()?;
        let device = first.value.device();
        if !device.is_gpu() {
            return None;
        }
        let align = Tensor::view_alignment(&device);
        let (mut slots, mut ranges, mut index) = (Vec::new(), Vec::new(), HashMap::new());
        let (mut end, mut gaps) = (0usize, false);
        for group in groups {
            let start = end.next_multiple_of(align);
            for p in &group.params {
                if !p.value.device().same(&device) || index.insert(p.id, slots.len()).is_some() {
                    return None;
                }
                let offset = end.next_multiple_of(align);
                gaps |= offset != end;
                slots.push(Slot {
                    id: p.id,
                    offset,
                    shape: p.value.shape().to_vec(),
                });
                end = offset + p.value.numel();
            }
            ranges.push(if group.params.is_empty() {
                (0, 0)
            } else {
                (start, end - start)
            });
        }
        Some(Layout {
            slots,
            groups: ranges,
            numel: end,
            gaps,
            device,
            index,
        })
    }

    pub fn slot(&self, id: ParamId) -> Option<&Slot> {
        self.index.get(&id).map(|&k| &self.slots[k])
    }

    /// Whether `groups` still hold exactly the parameters this layout was made for, in order.
    pub fn matches(&self, groups: &[ParamGroup]) -> bool {
        let ids = groups.iter().flat_map(|g| &g.params).map(|p| p.id);
        groups.len() == self.groups.len() && ids.eq(self.slots.iter().map(|s| s.id))
    }
}

/// The parameter arena (the parameters live in it) and the zero-initialised m and v arenas.
pub(crate) struct Arenas {
    pub layout: Arc<Layout>,
    pub params: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

impl Arenas {
    /// Arenas for `groups`, their parameters moved into (or found in) the parameter arena;
    /// `None` when the groups cannot share arenas ([`Layout::of`]) or some parameter already
    /// lives in another arena at other offsets (a tensor moves once): the optimizer then works
    /// tensor by tensor.
    pub fn pack(groups: &[ParamGroup]) -> Result<Option<Arenas>> {
        let Some(layout) = Layout::of(groups) else {
            return Ok(None);
        };
        let params: Vec<_> = groups.iter().flat_map(|g| &g.params).collect();
        let homes: Vec<Option<(Tensor, usize)>> = params.iter().map(|p| p.value.arena()).collect();
        let arena = if homes.iter().all(Option::is_none) {
            let arena = Tensor::zeros(&[layout.numel], &layout.device)?;
            for (p, slot) in params.iter().zip(&layout.slots) {
                p.value.move_into(&arena, slot.offset)?;
            }
            arena
        } else {
            // Packed already (an optimizer before this one, over the same parameters)?
            let Some((arena, _)) = homes[0].clone() else {
                return Ok(None);
            };
            let same = params
                .iter()
                .zip(&layout.slots)
                .all(|(p, s)| p.value.offset_in(&arena) == Some(s.offset));
            if !same || arena.numel() != layout.numel {
                return Ok(None);
            }
            arena
        };
        Ok(Some(Arenas {
            m: Tensor::zeros(&[layout.numel], &layout.device)?,
            v: Tensor::zeros(&[layout.numel], &layout.device)?,
            params: arena,
            layout: Arc::new(layout),
        }))
    }

    /// m and v of one parameter: its slots of the moment arenas.
    pub fn moments(&self, id: ParamId) -> Result<Option<(Tensor, Tensor)>> {
        let Some(slot) = self.layout.slot(id) else {
            return Ok(None);
        };
        let m = self.m.view(slot.offset, &slot.shape)?;
        let v = self.v.view(slot.offset, &slot.shape)?;
        Ok(Some((m, v)))
    }
}

#[cfg(test)]
mod tests {
    use crate::{AdamW, Grads, ParamGroup, Trainable, grad_norm_clip, param::Param};
    use tensor::testing::{assert_close_slices, gpu, gpu_with_binding_limit, random};
    use tensor::{Device, Tensor};

    /// Two groups of unequal weight decay and learning rate; [7, 5] and [6] leave gaps after
    /// them (35 and 6 are not multiples of 64).
    const SHAPES: [&[usize]; 5] = [&[7, 5], &[6], &[300], &[2, 2, 5], &[64]];

    fn optimizer(device: &Device) -> (Vec<Trainable>, AdamW) {
        let params: Vec<Trainable> = SHAPES
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let p = Param::trainable(format!("p{k}"), random(s, k as u64, device));
                p.as_trainable().unwrap().clone()
            })
            .collect();
        let mut decayed = ParamGroup::new(params[..3].to_vec(), 0.1);
        decayed.lr_scale = 0.5;
        let plain = ParamGroup::new(params[3..].to_vec(), 0.0);
        (params, AdamW::new(vec![decayed, plain]))
    }

    /// `grads` filled with step `step`'s random gradients.
    fn fill(grads: &mut Grads, params: &[Trainable], step: u64, device: &Device) {
        for (k, p) in params.iter().enumerate() {
            let g = random(p.value.shape(), 100 * step + k as u64, device);
            grads.accumulate(p.id, g).unwrap();
        }
    }

    /// Four clipped steps; returns the norms, then each parameter's value, m and v, and the
    /// dispatches each step's norm and update took.
    fn run(device: &Device, limit: f32) -> (Vec<f32>, Vec<Vec<f32>>, Vec<u64>) {
        let (params, mut opt) = optimizer(device);
        let (mut norms, mut dispatches) = (Vec::new(), Vec::new());
        let count = || match device {
            Device::Gpu(ctx) => ctx.dispatch_count(),
            Device::Cpu(_) => 0,
        };
        for step in 0..4 {
            let mut grads = opt.grads().unwrap();
            fill(&mut grads, &params, step, device);
            let before = count();
            let clip = grad_norm_clip(&grads, limit, &[]).unwrap();
            opt.step_clipped(&grads, 1e-2, &clip).unwrap();
            dispatches.push(count() - before);
            norms.push(clip.read().unwrap().norm);
        }
        let mut out = Vec::new();
        for p in &params {
            let (m, v) = opt.state(p.id).unwrap();
            out.extend([&p.value, m, v].map(|t| t.to_vec().unwrap()));
        }
        (norms, out, dispatches)
    }

    /// On a GPU the whole step is one `sum_squares`, one `grad_norm_clip` and one AdamW per
    /// group, and gives the CPU's per-tensor numbers; the parameters live in the arena.
    #[test]
    fn the_fused_gpu_step_is_four_dispatches_and_matches_the_cpu() {
        let Some(_) = gpu() else { return };
        // A device of its own (no other test's dispatches counted), without poisoning (which
        // adds a fill per new tensor).
        let d = gpu_with_binding_limit(1 << 27);
        let Device::Gpu(ctx) = &d else { unreachable!() };
        ctx.set_poison_outputs(false);
        // The gradients' norm is about √407 · 0.58 ≈ 12: 3 clips, 1e9 does not.
        for limit in [3.0, 1e9] {
            let (cpu_norms, want, _) = run(&Device::cpu(), limit);
            let (norms, got, dispatches) = run(&d, limit);
            assert_eq!(dispatches, [4; 4], "limit {limit}");
            assert_close_slices("norms", &norms, &cpu_norms, 0.0, 4e-6);
            for (g, w) in got.iter().zip(&want) {
                assert_close_slices("param, m, v", g, w, 1e-6, 1e-5);
            }
        }
        let (params, mut opt) = optimizer(&d);
        opt.grads().unwrap();
        let homes: Vec<_> = params.iter().map(|p| p.value.arena().unwrap()).collect();
        assert!(homes.iter().all(|(a, _)| a.same_storage(&homes[0].0)));
        // Each slot at the next aligned offset after the one before (the groups in order).
        let align = Tensor::view_alignment(&d);
        let mut end = 0usize;
        for ((_, offset), p) in homes.iter().zip(&params) {
            assert_eq!(*offset, end.next_multiple_of(align), "{homes:?}");
            end = offset + p.value.numel();
        }
    }

    /// Without a gradient for every parameter, or with gradients not in the arena, the update
    /// goes tensor by tensor, with the same numbers as the CPU.
    #[test]
    fn incomplete_gradients_take_the_per_tensor_path() {
        let Some(d) = gpu() else { return };
        let mut results = Vec::new();
        for device in [Device::cpu(), d] {
            let (params, mut opt) = optimizer(&device);
            for step in 0..3 {
                let mut grads = match step {
                    0 => opt.grads().unwrap(),
                    _ => Grads::new(),
                };
                // Step 2 leaves out the second parameter.
                let given: Vec<Trainable> = (0..params.len())
                    .filter(|&k| step != 2 || k != 1)
                    .map(|k| params[k].clone())
                    .collect();
                for p in &given {
                    let k = params.iter().position(|q| q.id == p.id).unwrap();
                    let g = random(p.value.shape(), 100 * step + k as u64, &device);
                    grads.accumulate(p.id, g).unwrap();
                }
                opt.step(&grads, 1e-2).unwrap();
            }
            results.push(
                params
                    .iter()
                    .map(|p| p.value.to_vec().unwrap())
                    .collect::<Vec<_>>(),
            );
        }
        for (g, w) in results[1].iter().zip(&results[0]) {
            assert_close_slices("param", g, w, 1e-6, 1e-5);
        }
    }

    /// A skipped step taken back, a saved state loaded into another optimizer, and a second
    /// optimizer over parameters already in an arena: each continues exactly as the original.
    #[test]
    fn take_back_load_state_and_a_second_optimizer_keep_the_arena_exact() {
        let Some(d) = gpu() else { return };
        let (params, mut opt) = optimizer(&d);
        let before: Vec<Vec<f32>> = params.iter().map(|p| p.value.to_vec().unwrap()).collect();
        let mut grads = opt.grads().unwrap();
        fill(&mut grads, &params, 0, &d);
        let inf = Tensor::from_vec(vec![f32::INFINITY], &[1], &d).unwrap();
        let clip = grad_norm_clip(&grads, 1.0, &[&inf]).unwrap();
        opt.step_clipped(&grads, 1e-2, &clip).unwrap();
        assert!(clip.read().unwrap().skipped);
        opt.take_back();
        let after: Vec<Vec<f32>> = params.iter().map(|p| p.value.to_vec().unwrap()).collect();
        assert_eq!(after, before);
        assert!(opt.step == 0 && opt.state_tensors().is_empty());

        let step = |opt: &mut AdamW, params: &[Trainable], s: u64| {
            let mut grads = opt.grads().unwrap();
            fill(&mut grads, params, s, &d);
            let clip = grad_norm_clip(&grads, 1.0, &[]).unwrap();
            opt.step_clipped(&grads, 1e-2, &clip).unwrap();
        };
        step(&mut opt, &params, 1);
        step(&mut opt, &params, 2);
        // A fresh model at the same values with the saved moments.
        let saved: Vec<(Vec<f32>, Vec<f32>)> = opt
            .state_tensors()
            .iter()
            .map(|(_, m, v)| (m.to_vec().unwrap(), v.to_vec().unwrap()))
            .collect();
        let (copies, mut resumed) = optimizer(&d);
        for (p, q) in params.iter().zip(&copies) {
            q.value.copy_from(&p.value).unwrap();
        }
        let state = copies.iter().zip(&saved).map(|(q, (m, v))| {
            let t = |x: &Vec<f32>| Tensor::from_vec(x.clone(), q.value.shape(), &d).unwrap();
            (q.id, t(m), t(v))
        });
        resumed.load_state(opt.step, state).unwrap();
        // A second optimizer over the original parameters, with the same state.
        let mut second = AdamW::new(opt.groups.clone());
        let state = params.iter().map(|p| {
            let (m, v) = opt.state(p.id).unwrap();
            (p.id, m.copy().unwrap(), v.copy().unwrap())
        });
        second.load_state(opt.step, state).unwrap();
        let (twin, _) = optimizer(&d);
        for (p, q) in params.iter().zip(&twin) {
            q.value.copy_from(&p.value).unwrap();
        }
        step(&mut opt, &params, 3);
        step(&mut resumed, &copies, 3);
        for (p, q) in params.iter().zip(&copies) {
            assert_eq!(p.value.to_vec().unwrap(), q.value.to_vec().unwrap());
        }
        // `second` steps the original parameters (already in `opt`'s arena) from where `opt`
        // was before its last step: restore those values first.
        for (p, q) in params.iter().zip(&twin) {
            p.value.copy_from(&q.value).unwrap();
        }
        step(&mut second, &params, 3);
        for (p, q) in params.iter().zip(&copies) {
            assert_eq!(p.value.to_vec().unwrap(), q.value.to_vec().unwrap());
        }
        let home = |p: &Trainable| p.value.arena();
        let (a, _) = home(&params[0]).unwrap();
        assert!(params.iter().all(|p| home(p).unwrap().0.same_storage(&a)));
    }
}
