//! Inverted dropout with a counter-based mask: nothing is stored between forward and backward.
//!
//! Math, over the flat elements i of x:
//! - `dropout(x, p, seed)[i] = x[i] · mask[i] / (1 − p)`, `mask[i] ∈ {0, 1}`, `P(mask[i] = 1) = 1 − p`;
//! - backward: `dx[i] = dy[i] · mask[i] / (1 − p)` — `dropout_backward(dy, p, seed)` recomputes the
//!   same mask from the same seed.
//!
//! The mask is `bits(seed, i) ≥ threshold` with `threshold = round(p · 2^32)` and
//! `bits = fmix32(pcg_hash(i) ^ fmix32(seed_lo ^ fmix32(seed_hi ^ 0x9e3779b9)))` (MurmurHash3's
//! finalizer and the PCG hash, in wrapping u32 arithmetic), written identically here and in
//! `shaders/dropout.wgsl`, so the CPU and the GPU draw bit-identical masks, independent of how a
//! tensor is split into dispatches. `p = 0` is the identity; p must be in [0, 1). Dropped
//! elements are +0 (also when x is not finite).
//!
//! Kernel: `shaders/dropout.wgsl`, one invocation per element.

use bytemuck::Zeroable;

use crate::gpu::{Kernel, grid_2d, kernel_params};
use crate::{Device, Error, Result, Tensor, shaders};

kernel_params! {
    /// The `Params` struct of `dropout.wgsl`.
    struct Params {
        n: u32,
        start: u32,
        seed_lo: u32,
        seed_hi: u32,
        threshold: u32,
        off_x: u32,
        off_out: u32,
        scale: f32,
    }
}

/// MurmurHash3's 32-bit finalizer (Appleby); 0x85ebca6b and 0xc2b2ae35 are its multipliers.
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// PCG hash (Jarzynski & Olano 2020): 747796405 is the PCG LCG multiplier, 2891336453 its
/// increment, 277803737 the RXS-M-XS output multiplier.
fn pcg_hash(v: u32) -> u32 {
    let state = v.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// The uniform u32 that decides element `i`'s mask; 0x9e3779b9 = floor(2^32 / φ).
fn dropout_bits(seed_lo: u32, seed_hi: u32, i: u32) -> u32 {
    let key = fmix32(seed_lo ^ fmix32(seed_hi ^ 0x9e37_79b9));
    fmix32(pcg_hash(i) ^ key)
}

/// Check p and build the launch constants (n, offsets and start left for the launcher).
fn params(op: &str, x: &Tensor, p: f32, seed: u64) -> Result<Params> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid(format!(
            "{op}: the drop probability p must be in [0, 1), found {p}"
        )));
    }
    if x.numel() > u32::MAX as usize {
        return Err(Error::Limit {
            limit: "elements addressable by a u32 index",
            needed: x.numel() as u64,
            available: u32::MAX as u64,
        });
    }
    let threshold = (p as f64 * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
    Ok(Params {
        seed_lo: seed as u32,
        seed_hi: (seed >> 32) as u32,
        threshold,
        scale: (1.0 / (1.0 - p as f64)) as f32,
        ..Zeroable::zeroed()
    })
}

fn apply(op: &'static str, x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let k = params(op, x, p, seed)?;
    match x.device() {
        Device::Cpu(ctx) => {
            let xd = x.cpu_data()?;
            let mut out = vec![0.0; xd.len()];
            crate::cpu::for_each(&mut out, |i, o| {
                let keep = dropout_bits(k.seed_lo, k.seed_hi, i as u32) >= k.threshold;
                *o = if keep { xd[i] * k.scale } else { 0.0 };
            });
            Ok(Tensor::cpu_from(&ctx, out, x.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, x.shape())?;
            let kernel = Kernel {
                shader: "dropout",
                source: shaders::DROPOUT,
                entry: "dropout",
            };
            for (start, len) in ctx.row_chunks(x.numel(), &[1])? {
                if len == 0 {
                    continue;
                }
                let (xv, ov) = (ctx.view(x, start, len)?, ctx.view(&out, start, len)?);
                let params = Params {
                    n: len as u32,
                    start: start as u32,
                    off_x: xv.offset,
                    off_out: ov.offset,
                    ..k
                };
                let groups = grid_2d(len, 256, ctx.limits.max_compute_workgroups_per_dimension);
                ctx.dispatch(
                    kernel,
                    bytemuck::bytes_of(&params),
                    &[(1, xv.binding), (2, ov.binding)],
                    groups,
                )?;
            }
            Ok(out)
        }
    }
}

/// `x · mask / (1 − p)` with mask ~ Bernoulli(1 − p) drawn from `seed` and the element index.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    apply("dropout", x, p, seed)
}

/// The gradient of [`dropout`]: `dy · mask / (1 − p)` with the mask of the same `p` and `seed`.
pub fn dropout_backward(dy: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    apply("dropout_backward", dy, p, seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gpu, gpu_with_binding_limit, random, sizes};
    use proptest::prelude::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_vec().unwrap().into_iter().map(f32::to_bits).collect()
    }

    fn kept(t: &Tensor) -> Vec<bool> {
        t.to_vec().unwrap().into_iter().map(|v| v != 0.0).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn dropout_matches_cpu_exactly(rows in sizes(), cols in sizes(), pi in 0usize..4, seed in any::<u64>()) {
            let Some(g) = gpu() else { return Ok(()) };
            let p = [0.0, 0.1, 0.5, 0.9][pi];
            let x = random(&[rows, cols], seed % 1000, &Device::cpu());
            let gx = x.to_device(&g).unwrap();
            // Tolerance 0: the same mask bits and one f32 multiply by the same scale.
            prop_assert_eq!(bits(&dropout(&gx, p, seed).unwrap()), bits(&dropout(&x, p, seed).unwrap()));
            prop_assert_eq!(bits(&dropout_backward(&gx, p, seed).unwrap()), bits(&dropout(&x, p, seed).unwrap()));
        }
    }

    #[test]
    fn dropout_keeps_one_minus_p() {
        let dev = gpu().unwrap_or_else(Device::cpu);
        let n = 100_000;
        let x = random(&[n], 1, &dev);
        let xs = x.to_vec().unwrap();
        assert_eq!(
            bits(&dropout(&x, 0.0, 9).unwrap()),
            bits(&x),
            "p = 0 is the identity"
        );
        for p in [0.1f32, 0.5, 0.9] {
            let y = dropout(&x, p, 42).unwrap().to_vec().unwrap();
            let k = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            // Binomial standard deviation ≤ 0.0016 at n = 100k; allow 6σ ≈ 0.01.
            assert!((k - (1.0 - p as f64)).abs() < 0.01, "p = {p}: kept {k}");
            for (&yv, &xv) in y.iter().zip(&xs) {
                assert!(yv == 0.0 || yv == xv * (1.0 / (1.0 - p)), "{yv} vs {xv}");
            }
        }
    }

    #[test]
    fn dropout_seed_decides_the_mask() {
        let dev = gpu().unwrap_or_else(Device::cpu);
        let x = Tensor::full(&[50_000], 1.0, &dev).unwrap();
        let a = kept(&dropout(&x, 0.5, 7).unwrap());
        assert_eq!(
            a,
            kept(&dropout(&x, 0.5, 7).unwrap()),
            "same seed, same mask"
        );
        assert_eq!(
            a,
            kept(&dropout_backward(&x, 0.5, 7).unwrap()),
            "backward recomputes the mask"
        );
        // Independent masks of p = 0.5 disagree on half the elements (σ ≈ 0.0022).
        for other in [8, 7 + (1 << 32)] {
            let b = kept(&dropout(&x, 0.5, other).unwrap());
            let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64;
            assert!(
                (differ - 0.5).abs() < 0.015,
                "seed {other}: {differ} of the mask differs"
            );
        }
        // The hash is part of the checkpoint format: pin a few values.
        assert_eq!(
            [
                dropout_bits(0, 0, 0),
                dropout_bits(1, 0, 1),
                dropout_bits(0, 1, 12345)
            ],
            PINNED
        );
    }

    // Also computed by an independent Python transcription of the formula in the module doc.
    const PINNED: [u32; 3] = [438_083_481, 471_303_232, 2_075_795_997];

    #[test]
    fn dropout_large_tensors_are_split_over_bindings() {
        // 4 KiB bindings hold 960 elements: the mask must follow the absolute index.
        let Some(_) = gpu() else { return };
        let g = gpu_with_binding_limit(4096);
        let x = random(&[3001], 2, &Device::cpu());
        let want = dropout(&x, 0.3, 11).unwrap();
        assert_eq!(
            bits(&dropout(&x.to_device(&g).unwrap(), 0.3, 11).unwrap()),
            bits(&want)
        );
    }

    #[test]
    fn dropout_arguments_are_checked() {
        let x = Tensor::zeros(&[4], &Device::cpu()).unwrap();
        for p in [1.0, -0.1, f32::NAN, 2.0] {
            let e = dropout(&x, p, 0).unwrap_err().to_string();
            assert!(e.contains("dropout") && e.contains("[0, 1)"), "{e}");
        }
        assert!(
            dropout_backward(&x, 1.0, 0)
                .unwrap_err()
                .to_string()
                .contains("dropout_backward")
        );
    }
}
