//! Fused cross-entropy: log-softmax + negative log-likelihood with a per-token weight, forward
//! (`cross_entropy`) and backward (`cross_entropy_backward`).
//!
//! Math, for logits x: (N, V) (or (…, V) with N the product of the leading axes), targets
//! t_n < V and weights w_n (0 = the token does not count, e.g. padding or a prompt token):
//! - `m_n = max_v x[n, v]`, `s_n = Σ_v exp(x[n, v] − m_n)` (numerically stable: every term ≤ 1);
//! - `lse[n] = m_n + log s_n = logsumexp(x_n)`, saved for the backward;
//! - `losses[n] = w_n · (lse_n − x[n, t_n])`, computed as `w_n · ((m_n − x[n, t_n]) + log s_n)`
//!   so that logits of ~1e4 do not lose the loss to the cancellation of two large numbers;
//! - backward: `dlogits[n, v] = scale · w_n · (softmax(x_n)[v] − [v = t_n])`, with the softmax
//!   recomputed as `exp(x[n, v] − lse[n])`.
//!
//! Rows with `w_n = 0` give a loss and a gradient of exactly 0 (even when their logits are not
//! finite); their target must still be < V.
//!
//! **The mean is the caller's reduction.** The training loss is `L = Σ_n w_n·l_n / Σ_n w_n`:
//! the caller (autograd) sums `losses` and divides by `Σ w`; its backward calls
//! `cross_entropy_backward` with `scale = upstream_grad / Σ w` (1/Σw for the loss itself), since
//! `∂L/∂x[n, v] = (w_n / Σw) · (softmax(x_n)[v] − [v = t_n])`.
//!
//! Kernel: `shaders/cross_entropy.wgsl`: the forward runs one 256-invocation workgroup per row
//! with two workgroup tree reductions (max, then the sum of exponentials), striding over V; the
//! backward one invocation per element. Rows are laid out on a 2-D grid (more than 65,535 rows)
//! and cut into row ranges that each fit one storage binding.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::ops::embedding::check_ids;
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `cross_entropy.wgsl`.
    struct Params {
        rows: u32,
        cols: u32,
        n: u32,
        scale: f32,
        off_logits: u32,
        off_targets: u32,
        off_weights: u32,
        off_losses: u32,
        off_lse_out: u32,
        off_lse: u32,
        off_dlogits: u32,
        _pad: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "cross_entropy",
        source: shaders::CROSS_ENTROPY,
        entry,
    }
}

/// The outputs of [`cross_entropy`].
#[derive(Clone, Debug)]
pub struct CrossEntropyOut {
    /// (N): `w_n · (logsumexp(x_n) − x_n[t_n])`.
    pub losses: Tensor,
    /// (N): `logsumexp(x_n)`, saved for [`cross_entropy_backward`].
    pub lse: Tensor,
}

/// Check logits, targets and weights; returns (N, V).
pub(crate) fn check(
    op: &'static str,
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
) -> Result<(usize, usize)> {
    let v = logits.last_dim();
    if logits.shape().len() < 2 || v == 0 {
        return shape_err(op, "logits of shape (N, V) with V ≥ 1", logits.shape());
    }
    let n = logits.numel() / v;
    if targets.len() != n {
        return shape_err(
            op,
            format!("{n} targets, one per row of logits"),
            format_args!("{} targets", targets.len()),
        );
    }
    if weights.len() != n {
        return shape_err(
            op,
            format!("{n} weights, one per row of logits"),
            format_args!("{} weights", weights.len()),
        );
    }
    check_ids(op, "target", targets, v)?;
    Ok((n, v))
}

/// `(m, log s)` of one row: its max and the log of Σ exp(x − m).
fn row_stats(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::MIN, f32::max);
    let s: f64 = row.iter().map(|&x| (x - m).exp() as f64).sum();
    (m, (s as f32).ln())
}

/// Run `f(row, out_row)` over the `row_len`-wide rows of `out` on all threads when the rows
/// stand for a lot of work (`cost` elements read in all), even if `out` itself is small.
fn par_rows(out: &mut [f32], row_len: usize, cost: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let t = crate::cpu::threads();
    if t == 1 || cost < 1 << 15 || rows < 2 {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(r, o)| f(r, o));
        return;
    }
    let per = rows.div_ceil(t);
    rayon::in_place_scope(|s| {
        for (c, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move |_| {
                chunk
                    .chunks_mut(row_len)
                    .enumerate()
                    .for_each(|(r, o)| f(c * per + r, o))
            });
        }
    });
}

/// Per-row losses and logsumexps of logits (N, V) (or (…, V)); see the module doc.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<CrossEntropyOut> {
    let _profile = crate::profile::scope("loss");
    let (n, v) = check("cross_entropy", logits, targets, weights)?;
    match logits.device() {
        Device::Cpu(ctx) => {
            let x = logits.cpu_data()?;
            let mut both = vec![0.0; 2 * n];
            par_rows(&mut both, 2, n * v, |r, o| {
                let row = &x[r * v..(r + 1) * v];
                let (m, log_s) = row_stats(row);
                let w = weights[r];
                o[0] = if w != 0.0 {
                    w * ((m - row[targets[r] as usize]) + log_s)
                } else {
                    0.0
                };
                o[1] = m + log_s;
            });
            let (losses, lse) = both.chunks(2).map(|o| (o[0], o[1])).unzip();
            Ok(CrossEntropyOut {
                losses: Tensor::cpu_from(&ctx, losses, &[n]),
                lse: Tensor::cpu_from(&ctx, lse, &[n]),
            })
        }
        Device::Gpu(ctx) => {
            let losses = Tensor::gpu_uninit(&ctx, &[n])?;
            let lse = Tensor::gpu_uninit(&ctx, &[n])?;
            launch(
                &ctx,
                None,
                logits,
                targets,
                weights,
                &[(4, &losses), (5, &lse)],
            )?;
            Ok(CrossEntropyOut { losses, lse })
        }
    }
}

/// `dlogits[n, v] = scale · w_n · (softmax(x_n)[v] − [v = t_n])`, shaped like logits, with the
/// softmax recomputed from `lse` (the forward's). For the mean loss `Σ w·l / Σ w` pass
/// `scale = 1/Σw` (times the upstream gradient).
pub fn cross_entropy_backward(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
    lse: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let _profile = crate::profile::scope("loss");
    let (n, v) = check("cross_entropy_backward", logits, targets, weights)?;
    if lse.shape() != [n] {
        return shape_err(
            "cross_entropy_backward",
            format!("lse of shape [{n}]"),
            lse.shape(),
        );
    }
    match same_device("cross_entropy_backward", &[logits, lse])? {
        Device::Cpu(ctx) => {
            let (x, l) = (logits.cpu_data()?, lse.cpu_data()?);
            let mut out = vec![0.0; n * v];
            crate::cpu::for_rows(&mut out, v, |r, o| {
                let (w, t) = (weights[r], targets[r] as usize);
                if w == 0.0 {
                    return o.fill(0.0);
                }
                for (j, g) in o.iter_mut().enumerate() {
                    let hot = if j == t { 1.0 } else { 0.0 };
                    *g = (scale * w) * ((x[r * v + j] - l[r]).exp() - hot);
                }
            });
            Ok(Tensor::cpu_from(&ctx, out, logits.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, logits.shape())?;
            launch(
                &ctx,
                Some((lse, scale)),
                logits,
                targets,
                weights,
                &[(7, &out)],
            )?;
            Ok(out)
        }
    }
}

/// Launch the forward (`backward` None; outputs losses at 4, lse at 5) or the backward
/// (`backward` = (lse, scale); output dlogits at 7) over row ranges that fit one binding.
fn launch(
    ctx: &Arc<GpuContext>,
    backward: Option<(&Tensor, f32)>,
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
    outputs: &[(u32, &Tensor)],
) -> Result<()> {
    let v = logits.last_dim();
    let n = logits.numel() / v;
    if n == 0 {
        return Ok(());
    }
    let device = Device::Gpu(ctx.clone());
    let tg = Tensor::from_u32(targets, &device)?;
    let wt = Tensor::from_vec(weights.to_vec(), &[n], &device)?;
    let max = ctx.limits.max_compute_workgroups_per_dimension;
    for (r0, rows) in ctx.row_chunks(n, &[v, 1])? {
        let (x, t, w) = (
            ctx.view(logits, r0 * v, rows * v)?,
            ctx.view(&tg, r0, rows)?,
            ctx.view(&wt, r0, rows)?,
        );
        let mut params = Params {
            rows: rows as u32,
            cols: v as u32,
            n: (rows * v) as u32,
            off_logits: x.offset,
            off_targets: t.offset,
            off_weights: w.offset,
            ..Zeroable::zeroed()
        };
        let mut bindings = vec![(1, x.binding), (2, t.binding), (3, w.binding)];
        for &(no, out) in outputs {
            let (len, start) = if no == 7 {
                (rows * v, r0 * v)
            } else {
                (rows, r0)
            };
            let o = ctx.view(out, start, len)?;
            match no {
                4 => params.off_losses = o.offset,
                5 => params.off_lse_out = o.offset,
                _ => params.off_dlogits = o.offset,
            }
            bindings.push((no, o.binding));
        }
        let (entry, groups) = match backward {
            None => ("cross_entropy_forward", grid_2d(rows, 1, max)),
            Some((lse, scale)) => {
                let l = ctx.view(lse, r0, rows)?;
                params.off_lse = l.offset;
                params.scale = scale;
                bindings.push((6, l.binding));
                ("cross_entropy_backward", grid_2d(rows * v, 256, max))
            }
        };
        ctx.dispatch(
            kernel(entry),
            bytemuck::bytes_of(&params),
            &bindings,
            groups,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::reference;
    use crate::testing::{
        assert_close, assert_close_slices, gpu, gpu_with_binding_limit, random_vec, sizes,
    };
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Logits uniform in [-4·amp, 4·amp) (+ `shift`), random targets, weights with zeros.
    struct Case {
        n: usize,
        v: usize,
        x: Vec<f32>,
        targets: Vec<u32>,
        weights: Vec<f32>,
    }

    fn case(n: usize, v: usize, seed: u64, shift: f32, amp: f32) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = random_vec(n * v, seed)
            .into_iter()
            .map(|e| shift + 4.0 * amp * e)
            .collect();
        let targets = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let weights = (0..n)
            .map(|_| {
                if rng.random_range(0..3) == 0 {
                    0.0
                } else {
                    rng.random_range(0.5f32..1.5)
                }
            })
            .collect();
        Case {
            n,
            v,
            x,
            targets,
            weights,
        }
    }

    impl Case {
        fn logits(&self, d: &Device) -> Tensor {
            Tensor::from_vec(self.x.clone(), &[self.n, self.v], d).unwrap()
        }
        /// 1/Σw, the scale of the mean loss (1 when every weight is 0).
        fn scale(&self) -> f32 {
            let s: f32 = self.weights.iter().sum();
            if s > 0.0 { 1.0 / s } else { 1.0 }
        }
        /// The f64 reference: (losses, lse).
        fn f64_forward(&self) -> (Vec<f32>, Vec<f32>) {
            let (x, w) = (reference::widen(&self.x), reference::widen(&self.weights));
            let losses = reference::cross_entropy_losses(&x, self.v, &self.targets, &w);
            (
                reference::narrow(&losses),
                reference::narrow(&reference::logsumexp(&x, self.v)),
            )
        }
        /// Central finite differences, in f64, of `scale · Σ_n losses[n]`, row by row (x[n, v]
        /// changes only row n's term).
        fn f64_fd_grad(&self, scale: f32) -> Vec<f32> {
            let x = reference::widen(&self.x);
            let g: Vec<f64> = x
                .chunks(self.v)
                .enumerate()
                .flat_map(|(r, row)| {
                    let (t, w) = ([self.targets[r]], [self.weights[r] as f64]);
                    let loss = |row: &[f64]| {
                        scale as f64 * reference::cross_entropy_losses(row, self.v, &t, &w)[0]
                    };
                    reference::numeric_gradient(loss, row, 1e-4)
                })
                .collect();
            reference::narrow(&g)
        }
        /// GPU (on `g`) against CPU, forward and backward.
        fn check_gpu(&self, g: &Device, atol_loss: f32, atol_grad: f32) {
            let (cpu, gl) = (self.logits(&Device::cpu()), self.logits(g));
            let want = cross_entropy(&cpu, &self.targets, &self.weights).unwrap();
            let got = cross_entropy(&gl, &self.targets, &self.weights).unwrap();
            assert_close("losses", &got.losses, &want.losses, atol_loss, 1e-5);
            assert_close("lse", &got.lse, &want.lse, atol_loss, 1e-5);
            let s = self.scale();
            let want =
                cross_entropy_backward(&cpu, &self.targets, &self.weights, &want.lse, s).unwrap();
            let got =
                cross_entropy_backward(&gl, &self.targets, &self.weights, &got.lse, s).unwrap();
            assert_close("dlogits", &got, &want, atol_grad, 1e-4);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn cross_entropy_matches_cpu_random(n in sizes(), v in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            // Tolerances: losses and lse (|·| ≲ 10) differ by the order of the sums of V
            // exponentials (tree on the GPU, sequential f64 on the CPU) and exp/log ulps: 1e-5
            // absolute + 1e-5 relative. dlogits (|·| ≤ scale·w ≤ 1.5): 1e-6 + 1e-4 relative.
            case(n, v, seed, 0.0, 1.0).check_gpu(&g, 1e-5, 1e-6);
        }

        #[test]
        fn cross_entropy_cpu_matches_f64(n in sizes(), v in sizes(), seed in 0u64..1000) {
            let c = case(n, v, seed, 0.0, 1.0);
            let cpu = c.logits(&Device::cpu());
            let out = cross_entropy(&cpu, &c.targets, &c.weights).unwrap();
            let (losses, lse) = c.f64_forward();
            // f32 against f64 of values ≲ 10: a few ulps.
            assert_close_slices("losses", &out.losses.to_vec().unwrap(), &losses, 1e-5, 1e-5);
            assert_close_slices("lse", &out.lse.to_vec().unwrap(), &lse, 1e-5, 1e-5);
            let s = c.scale();
            let grad = cross_entropy_backward(&cpu, &c.targets, &c.weights, &out.lse, s).unwrap();
            // Central differences with h = 1e-4 have an error ~h²·|∂³l| ≲ 1e-8; the f32 gradient
            // has ~1e-7 relative error in the softmax (lse is rounded to f32).
            assert_close_slices("dlogits vs finite differences", &grad.to_vec().unwrap(), &c.f64_fd_grad(s), 2e-6, 1e-5);
        }
    }

    #[test]
    fn cross_entropy_matches_cpu_hand_worked() {
        // Row 0: [0, 0], t = 0: loss = ln 2. Row 1: [1, 2, 3]-like with V = 2 → [1, 3], t = 1:
        // lse = 3 + ln(1 + e⁻²), loss = 2·ln(1 + e⁻²) (w = 2). Row 2: w = 0 → loss 0.
        let cpu = Device::cpu();
        let x = Tensor::from_vec(vec![0.0, 0.0, 1.0, 3.0, 5.0, -5.0], &[3, 2], &cpu).unwrap();
        let out = cross_entropy(&x, &[0, 1, 1], &[1.0, 2.0, 0.0]).unwrap();
        let l1 = (1.0f64 + (-2.0f64).exp()).ln();
        let want = [2f64.ln(), 2.0 * l1, 0.0].map(|e| e as f32);
        assert_close_slices("losses", &out.losses.to_vec().unwrap(), &want, 1e-6, 0.0);
        let want = [2f64.ln(), 3.0 + l1, 5.0 + (1.0 + (-10f64).exp()).ln()].map(|e| e as f32);
        assert_close_slices("lse", &out.lse.to_vec().unwrap(), &want, 1e-6, 0.0);
        // Row 0: softmax = [½, ½], target 0 → [−½, ½]; scale 0.5.
        let d = cross_entropy_backward(&x, &[0, 1, 1], &[1.0, 2.0, 0.0], &out.lse, 0.5).unwrap();
        let p = 1.0 / (1.0 + 2f64.exp()); // softmax([1, 3])[0]
        let want = [-0.25, 0.25, p, -p, 0.0, 0.0].map(|e| e as f32);
        assert_close_slices("dlogits", &d.to_vec().unwrap(), &want, 1e-6, 0.0);
    }

    #[test]
    fn cross_entropy_matches_cpu_masked_non_finite_rows() {
        // A row of weight 0 counts for nothing, even with NaN or infinite logits (row 1).
        let x = vec![0.5, -1.0, 2.0, f32::NAN, f32::INFINITY, 1.0];
        let (t, w) = ([2, 0], [1.0, 0.0]);
        let mut devices = vec![Device::cpu()];
        devices.extend(gpu());
        for d in &devices {
            let logits = Tensor::from_vec(x.clone(), &[2, 3], d).unwrap();
            let out = cross_entropy(&logits, &t, &w).unwrap();
            let losses = out.losses.to_vec().unwrap();
            assert!(losses[0].is_finite() && losses[1] == 0.0, "{losses:?}");
            let g = cross_entropy_backward(&logits, &t, &w, &out.lse, 1.0)
                .unwrap()
                .to_vec()
                .unwrap();
            assert!(
                g[..3].iter().all(|e| e.is_finite()) && g[3..] == [0.0; 3],
                "{g:?}"
            );
        }
    }

    #[test]
    fn cross_entropy_matches_cpu_large_logits() {
        // Logits around ±1e4 (and gaps of 2e4 inside a row): exp would overflow without the
        // max subtraction. Losses are exact to ~1e-5 thanks to (m − x_t) + log s; lse (~1e4)
        // has f32 ulps of ~1e-3, so the recomputed softmax exp(x − lse) is good to ~1e-3 relative.
        let mut c = case(37, 29, 7, 1e4, 2.0);
        for r in (0..c.n).step_by(3) {
            c.x[r * c.v] = -1e4;
        }
        let cpu = c.logits(&Device::cpu());
        let out = cross_entropy(&cpu, &c.targets, &c.weights).unwrap();
        let (losses, lse) = c.f64_forward();
        assert!(out.losses.to_vec().unwrap().iter().all(|l| l.is_finite()));
        assert_close_slices("losses", &out.losses.to_vec().unwrap(), &losses, 1e-5, 1e-5);
        assert_close_slices("lse", &out.lse.to_vec().unwrap(), &lse, 0.0, 1e-7);
        let s = c.scale();
        let grad = cross_entropy_backward(&cpu, &c.targets, &c.weights, &out.lse, s).unwrap();
        assert_close_slices(
            "dlogits vs finite differences",
            &grad.to_vec().unwrap(),
            &c.f64_fd_grad(s),
            1e-3 * s,
            0.0,
        );
        let Some(g) = gpu() else { return };
        c.check_gpu(&g, 1e-5, 1e-3 * s);
    }

    #[test]
    fn cross_entropy_matches_cpu_split_bindings() {
        // Bindings of at most 4 KiB: 100 × 37 logits (14.8 KB) and 9 × 300 (10.8 KB, 3 rows per
        // binding) are cut into row ranges.
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        case(100, 37, 1, 0.0, 1.0).check_gpu(&g, 1e-5, 1e-6);
        case(9, 300, 2, 0.0, 1.0).check_gpu(&g, 1e-5, 1e-6);
    }

    #[test]
    fn cross_entropy_matches_cpu_many_rows() {
        // 70,000 rows: more workgroups than one grid dimension holds (65,535).
        let Some(g) = gpu() else { return };
        case(70_000, 3, 3, 0.0, 1.0).check_gpu(&g, 1e-5, 1e-6);
    }

    #[test]
    fn cross_entropy_rejects_bad_inputs() {
        let cpu = Device::cpu();
        let x = Tensor::zeros(&[3, 4], &cpu).unwrap();
        let e = cross_entropy(&x, &[0, 4, 1], &[1.0; 3]).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("target 4") && e.contains("position 1") && e.contains("vocabulary of 4"),
            "{e}"
        );
        let e = cross_entropy(&x, &[0, 1], &[1.0; 3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 targets") && e.contains("2 targets"), "{e}");
        let e = cross_entropy(&x, &[0, 1, 2], &[1.0; 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 weights") && e.contains("4 weights"), "{e}");
        let e = cross_entropy(&Tensor::zeros(&[4], &cpu).unwrap(), &[0], &[1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(N, V)") && e.contains("[4]"), "{e}");
        let lse = Tensor::zeros(&[2], &cpu).unwrap();
        let e = cross_entropy_backward(&x, &[0, 1, 2], &[1.0; 3], &lse, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lse of shape [3]") && e.contains("[2]"), "{e}");
        let e = cross_entropy_backward(&x, &[0, 9, 2], &[1.0; 3], &lse, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target 9") && e.contains("position 1"), "{e}");
    }
}
