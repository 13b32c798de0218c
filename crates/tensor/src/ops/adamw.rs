//! The AdamW optimizer step, in place (decoupled weight decay, Loshchilov & Hutter 2019), with
//! the semantics of `torch.optim.AdamW` (non-amsgrad, non-fused):
//!
//! ```text
//! p ← p − lr·wd·p                                  (decay, decoupled from the gradient)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t)          (bias correction, t = step, 1-based)
//! p ← p − lr·m̂ / (√v̂ + eps)
//! ```
//!
//! As torch does, the bias corrections are computed on the host in f64 and the last line is
//! evaluated as `p − step_size · (m / (√v / √bc2 + eps))` with `step_size = lr / bc1`,
//! `bc1 = 1 − β1^t`, `bc2 = 1 − β2^t`. There is no backward: this is the update itself.
//!
//! [`adamw_step_clipped`] first multiplies each gradient element by the clip factor `c` of a
//! `[norm, c]` tensor from [`grad_norm_clip`](crate::ops::grad_norm::grad_norm_clip)
//! (g ← c·g, gradient clipping) as it reads it, on the device: the same numbers as scaling the
//! gradient by `c` first and then calling [`adamw_step`] (c = 1 multiplies exactly). When that
//! tensor's ok flag is not 1 (a non-finite norm or loss), it writes nothing.
//!
//! Kernel: `shaders/adamw.wgsl`, one invocation per element; tensors larger than one binding are
//! updated in several dispatches over ranges of elements.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Error, Result, Tensor, shaders, shape_err};

/// Hyperparameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The step number, 1-based (the first update is step 1), for the bias corrections.
    pub step: u32,
}

kernel_params! {
    /// The `Params` struct of `adamw.wgsl`; the CPU path uses the same constants.
    struct Params {
        n: u32,
        off_g: u32,
        off_p: u32,
        off_m: u32,
        off_v: u32,
        beta1: f32,
        beta2: f32,
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        eps: f32,
        decay: f32,
        step_size: f32,
        bc2_sqrt: f32,
        off_c: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

impl Params {
    /// The step's constants, computed in f64 and rounded once to f32.
    fn new(hp: &AdamWParams) -> Params {
        let (b1, b2, lr) = (hp.beta1 as f64, hp.beta2 as f64, hp.lr as f64);
        let t = hp.step as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        Params {
            beta1: hp.beta1,
            beta2: hp.beta2,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: hp.eps,
            decay: (1.0 - lr * hp.weight_decay as f64) as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            ..Zeroable::zeroed()
        }
    }

    /// One element's update; the same expression, operation by operation, as the WGSL kernel.
    #[inline]
    fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        *m = self.beta1 * *m + self.one_minus_beta1 * g;
        *v = self.beta2 * *v + self.one_minus_beta2 * (g * g);
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *p = *p * self.decay - self.step_size * (*m / denom);
    }
}

/// `c`: the clip factor every gradient element is multiplied by (1: exactly the gradient).
fn adamw_cpu(
    param: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    k: &Params,
    c: f32,
) -> Result<()> {
    let g = grad.cpu_data()?;
    let (mut p, mut m, mut v) = (param.cpu_data_mut()?, m.cpu_data_mut()?, v.cpu_data_mut()?);
    let n = p.len();
    let chunk = if n < 1 << 15 {
        n.max(1)
    } else {
        n.div_ceil(crate::cpu::threads())
    };
    let run = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for i in 0..p.len() {
            k.update(&mut p[i], g[i] * c, &mut m[i], &mut v[i]);
        }
    };
    if chunk >= n {
        run(&mut p, &g, &mut m, &mut v);
        return Ok(());
    }
    rayon::in_place_scope(|s| {
        let parts = p
            .chunks_mut(chunk)
            .zip(g.chunks(chunk))
            .zip(m.chunks_mut(chunk))
            .zip(v.chunks_mut(chunk));
        for (((p, g), m), v) in parts {
            s.spawn(move |_| run(p, g, m, v));
        }
    });
    Ok(())
}

fn adamw_gpu(
    ctx: &Arc<GpuContext>,
    param: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    k: &Params,
    clip: Option<&Tensor>,
) -> Result<()> {
    let kernel = Kernel {
        shader: "adamw",
        source: shaders::ADAMW,
        entry: if clip.is_some() {
            "adamw_step_clipped"
        } else {
            "adamw_step"
        },
    };
    for (start, len) in ctx.row_chunks(param.numel(), &[1])? {
        if len == 0 {
            continue;
        }
        let (gv, pv) = (ctx.view(grad, start, len)?, ctx.view(param, start, len)?);
        let (mv, vv) = (ctx.view(m, start, len)?, ctx.view(v, start, len)?);
        let cv = clip.map(|c| ctx.view_all(c)).transpose()?;
        let params = Params {
            n: len as u32,
            off_g: gv.offset,
            off_p: pv.offset,
            off_m: mv.offset,
            off_v: vv.offset,
            off_c: cv.as_ref().map_or(0, |c| c.offset),
            ..*k
        };
        let mut bindings = vec![
            (1, gv.binding),
            (2, pv.binding),
            (3, mv.binding),
            (4, vv.binding),
        ];
        if let Some(c) = cv {
            bindings.push((5, c.binding));
        }
        let groups = grid_2d(len, 256, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.dispatch(kernel, bytemuck::bytes_of(&params), &bindings, groups)?;
    }
    Ok(())
}

/// One AdamW step, in place: updates `param`, `m` (first moment) and `v` (second moment) from
/// `grad`. All four have one shape; param, m and v are distinct storages; `hp.step` ≥ 1.
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hp: &AdamWParams,
) -> Result<()> {
    adamw(param, grad, (m, v), hp, None)
}

/// [`adamw_step`] with the gradient clipped on the device: `grad` is multiplied by `clip[1]`,
/// where `clip` is the `[norm, clip factor, ok, …]` tensor of
/// [`grad_norm_clip`](crate::ops::grad_norm::grad_norm_clip), on the same device; unless
/// `clip[2]` (ok) is 1, nothing is written.
pub fn adamw_step_clipped(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hp: &AdamWParams,
    clip: &Tensor,
) -> Result<()> {
    if clip.shape().len() != 1 || clip.numel() < 3 {
        return shape_err(
            "adamw_step_clipped",
            "a [norm, clip factor, ok, …] tensor of shape [3 + checked values]",
            clip.shape(),
        );
    }
    adamw(param, grad, (m, v), hp, Some(clip))
}

fn adamw(
    param: &Tensor,
    grad: &Tensor,
    (m, v): (&Tensor, &Tensor),
    hp: &AdamWParams,
    clip: Option<&Tensor>,
) -> Result<()> {
    let _profile = crate::profile::scope("optimizer");
    for (name, t) in [("grad", grad), ("m", m), ("v", v)] {
        if t.shape() != param.shape() {
            return shape_err(
                "adamw_step",
                format!("{name} of the param's shape {:?}", param.shape()),
                t.shape(),
            );
        }
    }
    if hp.step == 0 {
        return Err(Error::Invalid(
            "adamw_step: step is 1-based, found step 0".into(),
        ));
    }
    let all = [param, grad, m, v];
    if (0..4).any(|i| (i + 1..4).any(|j| all[i].same_storage(all[j]))) {
        return Err(Error::Invalid(
            "adamw_step: param, grad, m and v must be distinct tensors".into(),
        ));
    }
    let k = Params::new(hp);
    let mut operands = all.to_vec();
    operands.extend(clip);
    match same_device("adamw_step", &operands)? {
        Device::Cpu(_) => {
            let c = match clip {
                Some(c) => {
                    let c = c.cpu_data()?;
                    if c[2] != 1.0 {
                        return Ok(());
                    }
                    c[1]
                }
                None => 1.0,
            };
            adamw_cpu(param, grad, (m, v), &k, c)
        }
        Device::Gpu(ctx) => adamw_gpu(&ctx, param, grad, (m, v), &k, clip),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        assert_close, assert_close_slices, gpu, gpu_with_binding_limit, random, random_vec, sizes,
    };
    use proptest::prelude::*;

    const HP: AdamWParams = AdamWParams {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
    };

    /// Run `steps` steps on `device` from the same start; returns (param, m, v).
    fn run(device: &Device, n: usize, steps: u32, seed: u64) -> [Tensor; 3] {
        let p = random(&[n], seed, device);
        let m = Tensor::zeros(&[n], device).unwrap();
        let v = Tensor::zeros(&[n], device).unwrap();
        for step in 1..=steps {
            let g = random(&[n], seed + 100 * step as u64, device);
            adamw_step(&p, &g, &m, &v, &AdamWParams { step, ..HP }).unwrap();
        }
        [p, m, v]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10))]

        #[test]
        fn adamw_matches_cpu_several_steps(n in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let want = run(&Device::cpu(), n, 4, seed);
            let got = run(&g, n, 4, seed);
            // Same f32 operations; the GPU may fuse multiply-adds and divides within 2.5 ulp.
            for (name, (g, w)) in ["param", "m", "v"].iter().zip(got.iter().zip(&want)) {
                assert_close(name, g, w, 1e-6, 1e-5);
            }
        }
    }

    /// torch.optim.AdamW in f64 (`tensor::reference`), element by element.
    fn adamw_f64(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], hp: &AdamWParams) {
        let h = [hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay].map(f64::from);
        crate::reference::adamw(p, g, m, v, h, hp.step as i32);
    }

    #[test]
    fn adamw_cpu_matches_hand_worked_step_and_f64() {
        // Step 1 from m = v = 0: m̂ = g, v̂ = g², so p ← p·(1 − lr·wd) − lr·g/(|g| + eps).
        // lr = 0.1, wd = 0.01: p = 1, g = 0.5  → 0.999 − 0.05/0.50000001 = 0.899000002
        //                      p = −2, g = −0.25 → −1.998 + 0.025/0.25000001 = −1.898000004
        //                      p = 3, g = 0     → 2.997 (decay only)
        let cpu = Device::cpu();
        let hp = AdamWParams {
            lr: 0.1,
            weight_decay: 0.01,
            ..HP
        };
        let p = Tensor::from_vec(vec![1.0, -2.0, 3.0], &[3], &cpu).unwrap();
        let g = Tensor::from_vec(vec![0.5, -0.25, 0.0], &[3], &cpu).unwrap();
        let (m, v) = (
            Tensor::zeros(&[3], &cpu).unwrap(),
            Tensor::zeros(&[3], &cpu).unwrap(),
        );
        adamw_step(&p, &g, &m, &v, &hp).unwrap();
        let f32s = |x: [f64; 3]| x.map(|y| y as f32);
        let p_want = f32s([0.899000002, -1.898000004, 2.997]);
        assert_close_slices("p", &p.to_vec().unwrap(), &p_want, 1e-6, 0.0);
        assert_close_slices("m", &m.to_vec().unwrap(), &[0.05, -0.025, 0.0], 1e-8, 1e-6);
        // β2 = 0.999 rounded to f32 is 0.99900001287, so 1 − β2 = 0.000999987125 (not 0.001).
        let v_want = f32s([0.25 * 0.000999987125, 0.0625 * 0.000999987125, 0.0]);
        assert_close_slices("v", &v.to_vec().unwrap(), &v_want, 1e-12, 1e-6);

        // Five steps against f64.
        let n = 300;
        let (p, m, v) = (
            random(&[n], 1, &cpu),
            Tensor::zeros(&[n], &cpu).unwrap(),
            Tensor::zeros(&[n], &cpu).unwrap(),
        );
        let mut p64: Vec<f64> = p.to_vec().unwrap().iter().map(|&x| x as f64).collect();
        let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
        for step in 1..=5 {
            let gv = random_vec(n, 10 + step as u64);
            let g64: Vec<f64> = gv.iter().map(|&x| x as f64).collect();
            let hp = AdamWParams { step, ..HP };
            adamw_step(&p, &Tensor::from_vec(gv, &[n], &cpu).unwrap(), &m, &v, &hp).unwrap();
            adamw_f64(&mut p64, &g64, &mut m64, &mut v64, &hp);
        }
        let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
        assert_close_slices("p vs f64", &p.to_vec().unwrap(), &f(&p64), 1e-6, 1e-6);
        assert_close_slices("m vs f64", &m.to_vec().unwrap(), &f(&m64), 1e-7, 1e-5);
        assert_close_slices("v vs f64", &v.to_vec().unwrap(), &f(&v64), 1e-9, 1e-5);
    }

    #[test]
    fn adamw_large_tensors_are_split_over_bindings() {
        // 4 KiB bindings hold 960 elements: 3001 elements take 4 dispatches.
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        let want = run(&Device::cpu(), 3001, 3, 7);
        let got = run(&g, 3001, 3, 7);
        for (name, (g, w)) in ["param", "m", "v"].iter().zip(got.iter().zip(&want)) {
            assert_close(name, g, w, 1e-6, 1e-5);
        }
    }

    #[test]
    fn adamw_shapes_are_checked() {
        let cpu = Device::cpu();
        let z = |s: &[usize]| Tensor::zeros(s, &cpu).unwrap();
        let (p, m, v) = (z(&[2, 3]), z(&[2, 3]), z(&[2, 3]));
        let e = adamw_step(&p, &z(&[3, 2]), &m, &v, &HP)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("grad of the param's shape [2, 3]") && e.contains("[3, 2]"),
            "{e}"
        );
        let e = adamw_step(&p, &z(&[2, 3]), &m, &z(&[6]), &HP)
            .unwrap_err()
            .to_string();
        assert!(e.contains("v of the param's shape"), "{e}");
        let e = adamw_step(&p, &z(&[2, 3]), &m, &v, &AdamWParams { step: 0, ..HP }).unwrap_err();
        assert!(e.to_string().contains("step 0"), "{e}");
        let e = adamw_step(&p, &z(&[2, 3]), &m, &m, &HP).unwrap_err();
        assert!(e.to_string().contains("distinct"), "{e}");
    }
}
