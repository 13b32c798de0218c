//! The global gradient norm, the clip factor and the step's finite check, computed on the
//! gradients' device with no readback, for
//! [`adamw_step_clipped`](crate::ops::adamw::adamw_step_clipped):
//!
//! ```text
//! sq_k = Σ g_k²                          (per gradient tensor: mul, then sum_all)
//! norm = √(Σ_k sq_k)                     (the tensors in the order given)
//! clip = max_norm / (norm + 1e-6)   if norm > max_norm and norm is finite, else 1
//! ok   = 1 if norm and every checked value c_j are finite, else 0 (the step is skipped)
//! ```
//!
//! The result is the tensor `[norm, clip, ok, c_0, …]` (the checked one-element tensors,
//! e.g. the loss, copied after the three, so one readback brings back all a step reports).
//! This is `torch.nn.utils.clip_grad_norm_` (foreach, eps 1e-6) with the scaling left to the
//! optimizer, which multiplies each gradient by `clip` as it reads it, and leaves everything
//! as it was unless `ok` is 1.
//!
//! On the CPU each `sq_k` is computed by `mul` and `sum_all` (f64 accumulation), the `sq_k` are
//! added in f64 and the square root taken in f64, rounding once: the bits of the old host
//! composition. On the GPU each run of 65,536 elements is summed by one workgroup (strided
//! f32 sums of ≤ 256 elements per invocation, then a tree) and the slots added in f32 in
//! order: the norms agree with the CPU's to a few f32 ulps per addition level (< 1e-5
//! relative in the tests), and the GPU's division may differ from the host's by 2.5 ulp.
//!
//! Kernels (`shaders/grad_norm.wgsl`): per gradient one `sum_squares` dispatch (per
//! binding-sized range of it) whose workgroups each write the Σg² of 65,536 consecutive
//! elements into a slot of one buffer, the checked values copied after the slots (buffer
//! copies, not dispatches), then one `grad_norm_clip` dispatch that adds the slots in order.
//! The optimizer hands over its whole gradient arena (every trainable tensor's gradient in one
//! buffer) as one gradient, so the norm of a step is two dispatches while the arena fits one
//! binding.

use std::sync::Arc;

use crate::gpu::{GpuContext, Kernel, kernel_params};
use crate::ops::elementwise::mul;
use crate::ops::reduce::sum_all;
use crate::tensor::same_device;
use crate::{Device, Error, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `grad_norm.wgsl`.
    struct Params {
        n: u32,
        n_checked: u32,
        off_sq: u32,
        off_out: u32,
        max_norm: f32,
        span: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// The clip factor of `norm` under `max_norm` (1 when the norm is within the limit or not
/// finite), in f32 as the kernel computes it.
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if norm.is_finite() && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

fn finish_gpu(ctx: &Arc<GpuContext>, sq: &Tensor, n: usize, max_norm: f32) -> Result<Tensor> {
    let checked = sq.numel() - n;
    let out = Tensor::gpu_uninit(ctx, &[3 + checked])?;
    let (sv, ov) = (ctx.view_all(sq)?, ctx.view_all(&out)?);
    let params = Params {
        n: n as u32,
        n_checked: checked as u32,
        off_sq: sv.offset,
        off_out: ov.offset,
        max_norm,
        span: 0,
        _pad1: 0,
        _pad2: 0,
    };
    let kernel = Kernel {
        shader: "grad_norm",
        source: shaders::GRAD_NORM,
        entry: "grad_norm_clip",
    };
    let bindings = [(1, sv.binding), (2, ov.binding)];
    ctx.dispatch(kernel, bytemuck::bytes_of(&params), &bindings, [1, 1, 1])?;
    Ok(out)
}

/// `[norm, clip, ok, checked…]` of the gradients `grads` (at least one, all on one device)
/// under `max_norm` (`f32::INFINITY`: never clip), with `checked` one-element tensors (the loss)
/// in the finite check, as a tensor on their device; nothing is read back.
pub fn grad_norm_clip(grads: &[&Tensor], max_norm: f32, checked: &[&Tensor]) -> Result<Tensor> {
    let _profile = crate::profile::scope("optimizer");
    if grads.is_empty() {
        return Err(Error::Invalid(
            "grad_norm_clip: expected at least one gradient, found none".into(),
        ));
    }
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Invalid(format!(
            "grad_norm_clip: expected a positive limit (or +inf), found {max_norm}"
        )));
    }
    if let Some(c) = checked.iter().find(|c| c.numel() != 1) {
        return shape_err("grad_norm_clip", "one-element checked values", c.shape());
    }
    let all: Vec<&Tensor> = grads.iter().chain(checked).copied().collect();
    let device = same_device("grad_norm_clip", &all)?;
    let n = grads.len();
    if let Device::Gpu(ctx) = &device {
        return grad_norm_gpu(ctx, grads, checked, max_norm);
    }
    let mut sums = grads
        .iter()
        .map(|g| sum_all(&mul(g, g)?))
        .collect::<Result<Vec<Tensor>>>()?;
    for c in checked {
        sums.push(c.reshape(&[1])?);
    }
    match device {
        Device::Cpu(ctx) => {
            let mut total = 0.0f64;
            for s in &sums[..n] {
                total += s.cpu_data()?[0] as f64;
            }
            let norm = total.sqrt() as f32;
            let clip = clip_factor(norm, max_norm);
            let values = sums[n..]
                .iter()
                .map(|c| Ok(c.cpu_data()?[0]))
                .collect::<Result<Vec<f32>>>()?;
            let ok = norm.is_finite() && values.iter().all(|v| v.is_finite());
            let mut out = vec![norm, clip, if ok { 1.0 } else { 0.0 }];
            out.extend(values);
            let len = out.len();
            Ok(Tensor::cpu_from(&ctx, out, &[len]))
        }
        Device::Gpu(ctx) => grad_norm_gpu(&ctx, grads, checked, max_norm),
    }
}

/// The GPU path: each gradient's Σg² into slots of one buffer by `sum_squares` (one workgroup
/// per [`SPAN`] elements, one dispatch per binding-sized range: a gradient arena of every
/// trainable tensor is one dispatch while it fits one binding), the checked values copied
/// after the slots (buffer copies, no dispatch), then `grad_norm_clip` adds the slots.
fn grad_norm_gpu(
    ctx: &Arc<GpuContext>,
    grads: &[&Tensor],
    checked: &[&Tensor],
    max_norm: f32,
) -> Result<Tensor> {
    let mut ranges = Vec::new();
    let mut slots = 0usize;
    for g in grads {
        for (start, len) in ctx.row_chunks(g.numel(), &[1])? {
            let groups = len.div_ceil(SPAN).max(1);
            ranges.push((*g, start, len, slots, groups));
            slots += groups;
        }
    }
    if slots + checked.len() > u32::MAX as usize {
        return Err(Error::Limit {
            limit: "gradient sums addressable by a u32 index",
            needed: (slots + checked.len()) as u64,
            available: u32::MAX as u64,
        });
    }
    let sq = Tensor::gpu_uninit(ctx, &[slots + checked.len()])?;
    for (g, start, len, slot, groups) in ranges {
        sum_squares_gpu(ctx, (g, start, len), (&sq, slot, groups))?;
    }
    for (j, c) in checked.iter().enumerate() {
        sq.view(slots + j, &[1])?.copy_from(c)?;
    }
    finish_gpu(ctx, &sq, slots, max_norm)
}

/// Elements one workgroup of `sum_squares` adds (256 per invocation): a gradient up to this
/// size is one slot, as it always was; longer ones one slot per this many elements.
const SPAN: usize = 1 << 16;

/// `sq[slot + w] ← Σ g²` over elements `[start + w·SPAN, …)` of `g`'s range `start .. start +
/// len`, for w < `groups`: one dispatch of `groups` workgroups of `sum_squares`.
fn sum_squares_gpu(
    ctx: &Arc<GpuContext>,
    (g, start, len): (&Tensor, usize, usize),
    (sq, slot, groups): (&Tensor, usize, usize),
) -> Result<()> {
    let (gv, ov) = (ctx.view(g, start, len)?, ctx.view(sq, slot, groups)?);
    let params = Params {
        n: len as u32,
        n_checked: 0,
        off_sq: gv.offset,
        off_out: ov.offset,
        max_norm: 0.0,
        span: SPAN as u32,
        _pad1: 0,
        _pad2: 0,
    };
    let kernel = Kernel {
        shader: "grad_norm",
        source: shaders::GRAD_NORM,
        entry: "sum_squares",
    };
    let bindings = [(1, gv.binding), (2, ov.binding)];
    ctx.dispatch(
        kernel,
        bytemuck::bytes_of(&params),
        &bindings,
        [groups as u32, 1, 1],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gpu, random};

    /// The old composition: each tensor's Σ g² read back and added in f64.
    fn norm_by_readback(grads: &[Tensor]) -> f32 {
        let mut total = 0.0f64;
        for g in grads {
            total += sum_all(&mul(g, g).unwrap()).unwrap().to_vec().unwrap()[0] as f64;
        }
        total.sqrt() as f32
    }

    /// Σ g² over every element in f64: the exact norm, to f64 precision.
    fn norm_f64(grads: &[Tensor]) -> f64 {
        let sq: f64 = grads
            .iter()
            .flat_map(|g| g.to_vec().unwrap())
            .map(|x| (x as f64) * (x as f64))
            .sum();
        sq.sqrt()
    }

    fn grads(device: &Device, seed: u64) -> Vec<Tensor> {
        [vec![7, 5], vec![300], vec![1], vec![64, 33], vec![2, 3, 4]]
            .iter()
            .enumerate()
            .map(|(k, s)| random(s, seed + k as u64, device))
            .collect()
    }

    #[test]
    fn cpu_norm_is_the_readback_norm_to_the_bit_and_clip_follows_the_formula() {
        let cpu = Device::cpu();
        let g = grads(&cpu, 3);
        let refs: Vec<&Tensor> = g.iter().collect();
        let want = norm_by_readback(&g);
        assert!((want as f64 - norm_f64(&g)).abs() < 1e-6 * norm_f64(&g));
        let out = grad_norm_clip(&refs, f32::INFINITY, &[])
            .unwrap()
            .to_vec()
            .unwrap();
        assert_eq!(out, vec![want, 1.0, 1.0]);
        let out = grad_norm_clip(&refs, want / 4.0, &[])
            .unwrap()
            .to_vec()
            .unwrap();
        assert_eq!(out, vec![want, (want / 4.0) / (want + 1e-6), 1.0]);
        // At the limit exactly: no clipping (the old `norm > max_norm`).
        let out = grad_norm_clip(&refs, want, &[]).unwrap().to_vec().unwrap();
        assert_eq!(out, vec![want, 1.0, 1.0]);
    }

    #[test]
    fn non_finite_norms_never_clip() {
        let cpu = Device::cpu();
        let nan = Tensor::from_vec(vec![1.0, f32::NAN], &[2], &cpu).unwrap();
        let inf = Tensor::from_vec(vec![f32::INFINITY], &[1], &cpu).unwrap();
        let mut devices = vec![cpu.clone()];
        devices.extend(gpu());
        for d in &devices {
            let (nan, inf) = (nan.to_device(d).unwrap(), inf.to_device(d).unwrap());
            let out = grad_norm_clip(&[&nan], 1.0, &[]).unwrap().to_vec().unwrap();
            assert!(out[0].is_nan() && out[1..] == [1.0, 0.0], "{out:?}");
            let out = grad_norm_clip(&[&inf], 1.0, &[]).unwrap().to_vec().unwrap();
            assert_eq!(out, vec![f32::INFINITY, 1.0, 0.0]);
            // A finite norm with a non-finite checked value (the loss): skip, and the values
            // come back after the three.
            let g = Tensor::from_vec(vec![3.0, 4.0], &[2], d).unwrap();
            let ok = Tensor::from_vec(vec![2.5], &[1], d).unwrap();
            let bad = Tensor::from_vec(vec![f32::INFINITY], &[1], d).unwrap();
            let out = grad_norm_clip(&[&g], 1.0, &[&ok])
                .unwrap()
                .to_vec()
                .unwrap();
            assert_eq!(out[2..], [1.0, 2.5], "{out:?}");
            assert!(
                (out[0] - 5.0).abs() < 1e-6 && (out[1] - 0.2).abs() < 1e-6,
                "{out:?}"
            );
            let out = grad_norm_clip(&[&g], 1.0, &[&ok, &bad])
                .unwrap()
                .to_vec()
                .unwrap();
            assert_eq!(out[2..], [0.0, 2.5, f32::INFINITY], "{out:?}");
        }
        assert_eq!(clip_factor(f32::NAN, 1.0), 1.0);
        assert_eq!(clip_factor(2.0, 1.0), 1.0 / (2.0 + 1e-6));
    }

    #[test]
    fn gpu_norm_matches_the_cpu_reference() {
        let Some(gpu) = gpu() else { return };
        for seed in [1, 40, 77] {
            let want = grads(&Device::cpu(), seed);
            let got: Vec<Tensor> = want.iter().map(|g| g.to_device(&gpu).unwrap()).collect();
            let (w, g): (Vec<&Tensor>, Vec<&Tensor>) =
                (want.iter().collect(), got.iter().collect());
            let limit = norm_by_readback(&want) / 3.0;
            let w = grad_norm_clip(&w, limit, &[]).unwrap().to_vec().unwrap();
            let g = grad_norm_clip(&g, limit, &[]).unwrap().to_vec().unwrap();
            // 5 slots added in f32 (≤ 2.5 ulp), the GPU reductions (~1e-6), the division.
            for (name, a, b) in [("norm", g[0], w[0]), ("clip", g[1], w[1])] {
                assert!((a - b).abs() <= 4e-6 * b.abs(), "{name}: {a} vs {b}");
            }
            assert!(w[1] < 1.0);
        }
    }

    /// A gradient above `SPAN` elements is summed by several workgroups (3 slots for
    /// 2·SPAN + 5), the others by one; all land in their slots, and each gradient is one
    /// dispatch.
    #[test]
    fn gpu_norm_of_small_and_large_gradients_matches_the_cpu() {
        let Some(_) = gpu() else { return };
        // A device of its own, so that no other test's dispatches are counted.
        let gpu = crate::testing::gpu_with_binding_limit(1 << 27);
        let cpu = Device::cpu();
        let want: Vec<Tensor> = [2 * SPAN + 5, 1, SPAN, 300]
            .iter()
            .enumerate()
            .map(|(k, &n)| random(&[n], 9 + k as u64, &cpu))
            .collect();
        let got: Vec<Tensor> = want.iter().map(|g| g.to_device(&gpu).unwrap()).collect();
        let (w, g): (Vec<&Tensor>, Vec<&Tensor>) = (want.iter().collect(), got.iter().collect());
        let w = grad_norm_clip(&w, 1.0, &[]).unwrap().to_vec().unwrap();
        let Device::Gpu(ctx) = &gpu else {
            unreachable!()
        };
        ctx.set_poison_outputs(false); // poisoning would add a fill per new tensor
        let before = ctx.dispatch_count();
        let g = grad_norm_clip(&g, 1.0, &[]).unwrap();
        assert_eq!(
            ctx.dispatch_count() - before,
            4 + 1,
            "one per gradient, one to finish"
        );
        let g = g.to_vec().unwrap();
        assert!((g[0] - w[0]).abs() <= 4e-6 * w[0], "{g:?} vs {w:?}");
        assert!((g[1] - w[1]).abs() <= 4e-6 * w[1], "{g:?} vs {w:?}");
        assert_eq!(g[2], 1.0);
    }

    /// A gradient larger than one binding (4 KiB here: 960 elements a range) is summed range
    /// by range, one dispatch each, and the checked value still lands after the slots.
    #[test]
    fn gpu_norm_of_a_gradient_over_several_bindings_matches_the_cpu() {
        use crate::testing::gpu_with_binding_limit;
        let Some(_) = gpu() else { return };
        let small = gpu_with_binding_limit(4096);
        let want = random(&[3001], 5, &Device::cpu());
        let loss = Tensor::from_vec(vec![2.5], &[1], &Device::cpu()).unwrap();
        let w = grad_norm_clip(&[&want], 1.0, &[&loss])
            .unwrap()
            .to_vec()
            .unwrap();
        let (got, loss) = (
            want.to_device(&small).unwrap(),
            loss.to_device(&small).unwrap(),
        );
        let g = grad_norm_clip(&[&got], 1.0, &[&loss])
            .unwrap()
            .to_vec()
            .unwrap();
        assert!((g[0] - w[0]).abs() <= 4e-6 * w[0], "{g:?} vs {w:?}");
        assert!((g[1] - w[1]).abs() <= 4e-6 * w[1], "{g:?} vs {w:?}");
        assert_eq!(g[2..], [1.0, 2.5]);
    }

    #[test]
    fn errors_name_what_was_expected() {
        let e = grad_norm_clip(&[], 1.0, &[]).unwrap_err().to_string();
        assert!(e.contains("at least one gradient"), "{e}");
        let x = Tensor::zeros(&[2], &Device::cpu()).unwrap();
        let e = grad_norm_clip(&[&x], 1.0, &[&x]).unwrap_err().to_string();
        assert!(
            e.contains("one-element checked") && e.contains("[2]"),
            "{e}"
        );
        let e = grad_norm_clip(&[&x], 0.0, &[]).unwrap_err().to_string();
        assert!(e.contains("positive limit") && e.contains('0'), "{e}");
    }

    /// Several AdamW steps over three tensors, clipping folded into the update
    /// (`grad_norm_clip` + `adamw_step_clipped`) or the old way (norm read back, gradients
    /// scaled by `scale`, `adamw_step`); returns every param, m and v.
    fn steps(device: &Device, fused: bool, limit: f32) -> Vec<Vec<f32>> {
        use crate::ops::adamw::{AdamWParams, adamw_step, adamw_step_clipped};
        use crate::ops::elementwise::scale;
        let shapes = [vec![4, 9], vec![300], vec![3]];
        let state: Vec<[Tensor; 3]> = shapes
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let z = || Tensor::zeros(s, device).unwrap();
                [random(s, 50 + k as u64, device), z(), z()]
            })
            .collect();
        for step in 1..=4u32 {
            let hp = AdamWParams {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            let g: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(k, s)| random(s, 100 * step as u64 + k as u64, device))
                .collect();
            let refs: Vec<&Tensor> = g.iter().collect();
            if fused {
                let clip = grad_norm_clip(&refs, limit, &[]).unwrap();
                for ([p, m, v], g) in state.iter().zip(&g) {
                    adamw_step_clipped(p, g, m, v, &hp, &clip).unwrap();
                }
            } else {
                let norm = norm_by_readback(&g);
                for ([p, m, v], g) in state.iter().zip(&g) {
                    let g = if norm > limit && norm.is_finite() {
                        scale(g, limit / (norm + 1e-6)).unwrap()
                    } else {
                        g.clone()
                    };
                    adamw_step(p, &g, m, v, &hp).unwrap();
                }
            }
        }
        state
            .iter()
            .flatten()
            .map(|t| t.to_vec().unwrap())
            .collect()
    }

    /// The norms of `steps`' gradients are about 10 (≈ √339 · 0.58): limit 2 clips every step,
    /// 1e9 none.
    #[test]
    fn clipped_adamw_is_scale_then_adamw_to_the_bit_on_the_cpu() {
        let cpu = Device::cpu();
        for limit in [2.0, 1e9, f32::INFINITY] {
            assert_eq!(
                steps(&cpu, true, limit),
                steps(&cpu, false, limit),
                "{limit}"
            );
        }
        assert_ne!(steps(&cpu, true, 2.0), steps(&cpu, true, 1e9));
    }

    #[test]
    fn clipped_adamw_on_the_gpu_matches_the_old_composition() {
        let Some(gpu) = gpu() else { return };
        for limit in [2.0, 1e9] {
            let want = steps(&Device::cpu(), false, limit);
            let old = steps(&gpu, false, limit);
            let got = steps(&gpu, true, limit);
            // The GPU against the CPU within the tolerance of `adamw_step`'s own GPU test, and
            // the fused path no further from the CPU than the old GPU composition allows.
            for ((g, o), w) in got.iter().zip(&old).zip(&want) {
                crate::testing::assert_close_slices("fused vs cpu", g, w, 1e-6, 1e-5);
                crate::testing::assert_close_slices("fused vs old gpu", g, o, 1e-6, 1e-5);
            }
        }
    }

    /// A skipped step (non-finite norm or checked value) changes no param, m or v.
    #[test]
    fn a_skipped_step_writes_nothing() {
        use crate::ops::adamw::{AdamWParams, adamw_step_clipped};
        let mut devices = vec![Device::cpu()];
        devices.extend(gpu());
        for d in &devices {
            let hp = AdamWParams {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                step: 1,
            };
            let (p, m, v) = (
                random(&[40], 1, d),
                random(&[40], 2, d),
                random(&[40], 3, d),
            );
            let before = [&p, &m, &v].map(|t| t.to_vec().unwrap());
            let g = random(&[40], 4, d);
            let nan = Tensor::from_vec(vec![f32::NAN], &[1], d).unwrap();
            let clip = grad_norm_clip(&[&g], 1.0, &[&nan]).unwrap();
            adamw_step_clipped(&p, &g, &m, &v, &hp, &clip).unwrap();
            assert_eq!([&p, &m, &v].map(|t| t.to_vec().unwrap()), before);
            let clip = grad_norm_clip(&[&g], 1.0, &[]).unwrap();
            adamw_step_clipped(&p, &g, &m, &v, &hp, &clip).unwrap();
            assert_ne!(p.to_vec().unwrap(), before[0]);
        }
    }
}
