//! Layer norm against the CPU and f64: forward, backward, the fused residual form, split
//! bindings, dispatch counts.

use super::*;
use crate::reference;
use crate::testing::{assert_close, assert_close_slices, gpu, random, random_vec, sizes};
use proptest::prelude::*;

const EPS: f32 = 1e-5;

fn params(c: usize, seed: u64, device: &Device) -> (Tensor, Tensor) {
    let gamma = random_vec(c, seed).iter().map(|v| 1.0 + 0.5 * v).collect();
    let gamma = Tensor::from_vec(gamma, &[c], device).unwrap();
    (gamma, random(&[c], seed + 1, device))
}

/// GPU forward and backward against the CPU. Forward: y to 1e-5 absolute, μ to 1e-6 absolute
/// plus 1e-6 relative, rstd to 1e-5 relative. Backward, on the CPU forward's μ and rstd: dx
/// to 1e-5 absolute; dγ, dβ (sums over all rows) to 1e-4 absolute plus 1e-5 relative. (Seen
/// on lavapipe: y and dx within 5e-7, dγ within 8e-6 over 1,000 rows.)
fn check(what: &str, x: &Tensor, g: &Device) {
    let cpu = Device::cpu();
    let c = x.last_dim();
    let (gamma, beta) = params(c, 11, &cpu);
    let dy = random(x.shape(), 12, &cpu);
    let fwd = layernorm(x, &gamma, &beta, EPS).unwrap();
    let up = |t: &Tensor| t.to_device(g).unwrap();
    let got = layernorm(&up(x), &up(&gamma), &up(&beta), EPS).unwrap();
    assert_close(&format!("{what} y"), &got.y, &fwd.y, 1e-5, 0.0);
    assert_close(&format!("{what} mean"), &got.mean, &fwd.mean, 1e-6, 1e-6);
    assert_close(&format!("{what} rstd"), &got.rstd, &fwd.rstd, 0.0, 1e-5);
    let want = layernorm_backward(x, &gamma, &fwd.mean, &fwd.rstd, &dy, true).unwrap();
    let (m, r) = (up(&fwd.mean), up(&fwd.rstd));
    let got = layernorm_backward(&up(x), &up(&gamma), &m, &r, &up(&dy), true).unwrap();
    assert_close(&format!("{what} dx"), &got.dx, &want.dx, 1e-5, 1e-5);
    assert_close(
        &format!("{what} dgamma"),
        got.dgamma.as_ref().unwrap(),
        want.dgamma.as_ref().unwrap(),
        1e-4,
        1e-5,
    );
    assert_close(
        &format!("{what} dbeta"),
        got.dbeta.as_ref().unwrap(),
        want.dbeta.as_ref().unwrap(),
        1e-4,
        1e-5,
    );
    // Without the parameters' gradients: the same dx, no dγ or dβ.
    let dx_only = layernorm_backward(&up(x), &up(&gamma), &m, &r, &up(&dy), false).unwrap();
    assert!(dx_only.dgamma.is_none() && dx_only.dbeta.is_none());
    assert_close(&format!("{what} dx only"), &dx_only.dx, &got.dx, 0.0, 0.0);
    // Added into a gradient summed before: acc + dx, in the same kernel, on both devices.
    let prev = random(x.shape(), 13, &cpu);
    let sum: Vec<f32> = (prev.to_vec().unwrap().iter())
        .zip(want.dx.to_vec().unwrap())
        .map(|(p, d)| p + d)
        .collect();
    let sum = Tensor::from_vec(sum, x.shape(), &cpu).unwrap();
    let into = |d: &Device, x: &Tensor, g: &Tensor, m: &Tensor, r: &Tensor, dy: &Tensor| {
        let acc = prev.copy().unwrap().to_device(d).unwrap();
        layernorm_backward_into(x, g, m, r, dy, false, Some(acc)).unwrap()
    };
    let on_cpu = into(&cpu, x, &gamma, &fwd.mean, &fwd.rstd, &dy);
    assert_close(&format!("{what} cpu acc + dx"), &on_cpu.dx, &sum, 0.0, 0.0);
    let on_gpu = into(g, &up(x), &up(&gamma), &m, &r, &up(&dy));
    assert_close(&format!("{what} acc + dx"), &on_gpu.dx, &sum, 1e-5, 1e-5);
    let cpu_dx = layernorm_backward(x, &gamma, &fwd.mean, &fwd.rstd, &dy, false).unwrap();
    assert!(cpu_dx.dgamma.is_none() && cpu_dx.dbeta.is_none());
    assert_close(
        &format!("{what} cpu dx only"),
        &cpu_dx.dx,
        &want.dx,
        0.0,
        0.0,
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn layernorm_matches_cpu_random(b in 1usize..3, rows in sizes(), cols in sizes(), seed in 0u64..1000) {
        let Some(g) = gpu() else { return Ok(()) };
        let x = random(&[b, rows, cols], seed, &Device::cpu());
        check(&format!("[{b}, {rows}, {cols}]"), &x, &g);
    }
}

/// Σ w·y of the f64 layer norm y of x (rows of C = `gamma.len()`).
fn loss64(x: &[f64], gamma: &[f64], beta: &[f64], w: &[f32]) -> f64 {
    let y = reference::layernorm(x, gamma, beta, EPS as f64);
    y.iter().zip(w).map(|(y, &w)| y * w as f64).sum()
}

#[test]
fn layernorm_cpu_matches_hand_and_finite_differences() {
    let cpu = Device::cpu();
    // x = [1, 2, 3, 4]: μ = 2.5, σ² = 1.25, x̂ = (x − 2.5)/√1.25 (eps 0).
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 4], &cpu).unwrap();
    let (ones, zeros) = (
        Tensor::full(&[4], 1.0, &cpu).unwrap(),
        Tensor::zeros(&[4], &cpu).unwrap(),
    );
    let out = layernorm(&x, &ones, &zeros, 0.0).unwrap();
    let want = [-1.341_640_8, -0.447_213_6, 0.447_213_6, 1.341_640_8];
    assert_close_slices("layernorm hand", &out.y.to_vec().unwrap(), &want, 1e-6, 0.0);
    assert_eq!(out.mean.to_vec().unwrap(), [2.5]);
    assert_close_slices(
        "rstd hand",
        &out.rstd.to_vec().unwrap(),
        &[0.894_427_2],
        1e-7,
        0.0,
    );
    // Backward against central differences of L = Σ w·y in f64, for x, γ and β.
    let (rows, c) = (3, 5);
    let xs: Vec<f64> = random_vec(rows * c, 21)
        .iter()
        .map(|&v| 2.0 * v as f64)
        .collect();
    let (gs, bs): (Vec<f64>, Vec<f64>) = random_vec(c, 22)
        .iter()
        .zip(random_vec(c, 23))
        .map(|(&g, b)| (1.0 + g as f64, b as f64))
        .unzip();
    let w = random_vec(rows * c, 24);
    let fd = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f32> {
        reference::narrow(&reference::numeric_gradient(f, v, 1e-6))
    };
    let fd_x = fd(&xs, &|v| loss64(v, &gs, &bs, &w));
    let fd_g = fd(&gs, &|v| loss64(&xs, v, &bs, &w));
    let fd_b = fd(&bs, &|v| loss64(&xs, &gs, v, &w));
    let t = |v: &[f64], shape: &[usize]| {
        Tensor::from_vec(v.iter().map(|&v| v as f32).collect(), shape, &cpu).unwrap()
    };
    let (x, gamma, beta) = (t(&xs, &[rows, c]), t(&gs, &[c]), t(&bs, &[c]));
    let out = layernorm(&x, &gamma, &beta, EPS).unwrap();
    let dy = Tensor::from_vec(w.clone(), &[rows, c], &cpu).unwrap();
    let grads = layernorm_backward(&x, &gamma, &out.mean, &out.rstd, &dy, true).unwrap();
    let (dgamma, dbeta) = (grads.dgamma.unwrap(), grads.dbeta.unwrap());
    // f32 inputs and saved statistics against f64 differences: 1e-5 absolute.
    assert_close_slices(
        "dx vs finite differences",
        &grads.dx.to_vec().unwrap(),
        &fd_x,
        1e-5,
        0.0,
    );
    assert_close_slices(
        "dgamma vs finite differences",
        &dgamma.to_vec().unwrap(),
        &fd_g,
        1e-5,
        0.0,
    );
    assert_close_slices(
        "dbeta vs finite differences",
        &dbeta.to_vec().unwrap(),
        &fd_b,
        1e-5,
        0.0,
    );
}

#[test]
fn layernorm_matches_cpu_large_offset() {
    // Rows 1e4 + noise in [-1, 1): E[x²] − μ² would lose every digit in f32. The f64 CPU
    // reference, on the same f32 inputs, is exact to f32 rounding; the GPU must match it to
    // 1e-4 absolute on y (|x̂| ≲ 1.7) and closely on μ and rstd.
    let Some(g) = gpu() else { return };
    let (rows, c) = (5, 257);
    let cpu = Device::cpu();
    let xs: Vec<f32> = random_vec(rows * c, 31).iter().map(|v| 1e4 + v).collect();
    let x = Tensor::from_vec(xs, &[rows, c], &cpu).unwrap();
    let (gamma, beta) = params(c, 32, &cpu);
    let want = layernorm(&x, &gamma, &beta, EPS).unwrap();
    let up = |t: &Tensor| t.to_device(&g).unwrap();
    let got = layernorm(&up(&x), &up(&gamma), &up(&beta), EPS).unwrap();
    assert_close("large offset y", &got.y, &want.y, 1e-4, 0.0);
    assert_close("large offset mean", &got.mean, &want.mean, 0.0, 1e-7);
    assert_close("large offset rstd", &got.rstd, &want.rstd, 0.0, 1e-4);
    check("large offset", &x, &g);
}

#[test]
fn layernorm_matches_cpu_2d_grid() {
    // Grids capped at 4 workgroups per dimension: 14 rows make a 4 × 4 grid with 2 spare
    // workgroups, and the per-column kernels (1,100 columns, one row block: 5 workgroups)
    // a 3 × 2 grid. The same indexing serves > 65,535 rows on a real device.
    let Some(g) = gpu() else { return };
    let Device::Gpu(ctx) = &g else { unreachable!() };
    let cpu = Device::cpu();
    let x = random(&[2, 7, 1100], 41, &cpu);
    let (gamma, beta) = params(1100, 42, &cpu);
    let dy = random(x.shape(), 43, &cpu);
    let up = |t: &Tensor| t.to_device(&g).unwrap();
    let want = layernorm(&x, &gamma, &beta, EPS).unwrap();
    let got = forward_gpu(ctx, &up(&x), None, &up(&gamma), &up(&beta), EPS, 4).unwrap();
    assert_close("2-D grid y", &got.y, &want.y, 1e-5, 0.0);
    assert_close("2-D grid rstd", &got.rstd, &want.rstd, 0.0, 1e-5);
    let (m, r) = (up(&want.mean), up(&want.rstd));
    let want = layernorm_backward(&x, &gamma, &want.mean, &want.rstd, &dy, true).unwrap();
    let got = backward_gpu(ctx, &up(&x), &up(&gamma), &m, &r, &up(&dy), true, None, 4).unwrap();
    assert_close("2-D grid dx", &got.dx, &want.dx, 1e-5, 1e-5);
    let (gg, wg) = (got.dgamma.unwrap(), want.dgamma.unwrap());
    assert_close("2-D grid dgamma", &gg, &wg, 1e-4, 1e-5);
    let (gb, wb) = (got.dbeta.unwrap(), want.dbeta.unwrap());
    assert_close("2-D grid dbeta", &gb, &wb, 1e-4, 1e-5);
}

#[test]
fn layernorm_matches_cpu_split_bindings() {
    // 4 KiB bindings hold 137 rows of 7: 8 chunks, dγ and dβ accumulated over them.
    let Some(_) = gpu() else { return };
    let g = crate::testing::gpu_with_binding_limit(4096);
    check("split", &random(&[1000, 7], 51, &Device::cpu()), &g);
}

/// The fused residual addition and layer norm equals `add` then `layernorm` on the same
/// device, to the bit (GPU: one kernel; CPU: the two ops), and the GPU equals the CPU within
/// the forward's tolerances; also across row chunks of small bindings and with views.
fn check_add_layernorm(g: &Device, shape: &[usize], seed: u64) {
    let cpu = Device::cpu();
    let c = shape[shape.len() - 1];
    let (x, res) = (random(shape, seed, &cpu), random(shape, seed + 1, &cpu));
    let (gamma, beta) = params(c, seed + 2, &cpu);
    for d in [&cpu, g] {
        let up = |t: &Tensor| t.to_device(d).unwrap();
        let (x, res, gamma, beta) = (up(&x), up(&res), up(&gamma), up(&beta));
        let (h, out) = add_layernorm(&x, &res, &gamma, &beta, EPS).unwrap();
        let h2 = crate::ops::elementwise::add(&x, &res).unwrap();
        let out2 = layernorm(&h2, &gamma, &beta, EPS).unwrap();
        assert_close("h", &h, &h2, 0.0, 0.0);
        assert_close("y", &out.y, &out2.y, 0.0, 0.0);
        assert_close("mean", &out.mean, &out2.mean, 0.0, 0.0);
        assert_close("rstd", &out.rstd, &out2.rstd, 0.0, 0.0);
    }
    let (h, out) = add_layernorm(&x, &res, &gamma, &beta, EPS).unwrap();
    let up = |t: &Tensor| t.to_device(g).unwrap();
    let (gh, gout) = add_layernorm(&up(&x), &up(&res), &up(&gamma), &up(&beta), EPS).unwrap();
    assert_close("gpu h", &gh, &h, 0.0, 0.0);
    assert_close("gpu y", &gout.y, &out.y, 1e-5, 0.0);
    assert_close("gpu rstd", &gout.rstd, &out.rstd, 0.0, 1e-5);
}

#[test]
fn add_layernorm_is_add_then_layernorm() {
    let Some(g) = gpu() else { return };
    check_add_layernorm(&g, &[3, 5, 300], 71);
    check_add_layernorm(&g, &[1, 1], 72);
    // 4 KiB bindings: 137 rows of 7 per chunk.
    let small = crate::testing::gpu_with_binding_limit(4096);
    check_add_layernorm(&small, &[1000, 7], 73);
}

#[test]
fn add_layernorm_rejects_mismatched_shapes() {
    let cpu = Device::cpu();
    let (gamma, beta) = params(4, 1, &cpu);
    let e = add_layernorm(
        &random(&[2, 4], 1, &cpu),
        &random(&[3, 4], 2, &cpu),
        &gamma,
        &beta,
        EPS,
    );
    let e = e.err().unwrap().to_string();
    assert!(
        e.contains("res of the shape of x") && e.contains("[3, 4]"),
        "{e}"
    );
}

#[test]
fn layernorm_backward_without_params_runs_only_the_dx_kernel() {
    // Frozen γ, β (LoRA): one dispatch per row chunk instead of three. A context of its
    // own, so that no other test's dispatches are counted.
    let Some(_) = gpu() else { return };
    let g = crate::testing::gpu_with_binding_limit(u64::MAX);
    let Device::Gpu(ctx) = &g else { unreachable!() };
    // Count kernels only (poisoning fills each fresh output with one more dispatch).
    ctx.set_poison_outputs(false);
    let cpu = Device::cpu();
    let x = random(&[40, 33], 61, &cpu);
    let (gamma, beta) = params(33, 62, &cpu);
    let fwd = layernorm(&x, &gamma, &beta, EPS).unwrap();
    let up = |t: &Tensor| t.to_device(&g).unwrap();
    let dy = random(x.shape(), 63, &cpu);
    let gpu_in = [up(&x), up(&gamma), up(&fwd.mean), up(&fwd.rstd), up(&dy)];
    let [gx, gg, gm, gr, gdy] = &gpu_in;
    for (with, dispatches) in [(false, 1), (true, 3)] {
        let before = ctx.dispatch_count();
        let got = layernorm_backward(gx, gg, gm, gr, gdy, with).unwrap();
        assert_eq!(ctx.dispatch_count() - before, dispatches, "params {with}");
        assert_eq!(got.dgamma.is_some() && got.dbeta.is_some(), with);
    }
}

#[test]
fn shapes_are_checked() {
    let cpu = Device::cpu();
    let x = Tensor::zeros(&[2, 3], &cpu).unwrap();
    let (g3, g2) = (
        Tensor::zeros(&[3], &cpu).unwrap(),
        Tensor::zeros(&[2], &cpu).unwrap(),
    );
    let e = layernorm(&x, &g2, &g3, EPS).err().unwrap().to_string();
    assert!(
        e.contains("layernorm") && e.contains("gamma of shape [3]") && e.contains("[2]"),
        "{e}"
    );
    let e = layernorm_backward(&x, &g3, &g3, &g2, &x, true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("mean of shape [2]") && e.contains("[3]"), "{e}");
    let dy = Tensor::zeros(&[3, 2], &cpu).unwrap();
    let e = layernorm_backward(&x, &g3, &g2, &g2, &dy, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("dy of the shape of x, [2, 3]") && e.contains("[3, 2]"),
        "{e}"
    );
}
