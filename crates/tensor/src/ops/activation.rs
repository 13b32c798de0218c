//! The MLP activations of GPT-2 variants besides GELU's tanh form (`gelu.rs`), and their
//! backward: exact GELU, ReLU, SiLU and QuickGELU, as `transformers`' `gelu`, `relu`, `silu`
//! and `quick_gelu`.
//!
//! Forward and derivative, element by element ([`Activation`]):
//! ```text
//! GeluErf    y = x·Φ(x)          y' = Φ(x) + x·φ(x)          Φ normal CDF, φ its density
//! Relu       y = max(x, 0)       y' = [x > 0]                 (0 at x = 0, as PyTorch)
//! Silu       y = x·σ(x)          y' = σ(x)·(1 + x·(1 − σ(x)))
//! QuickGelu  y = x·σ(a·x)        y' = σ(a·x) + a·x·σ(a·x)·(1 − σ(a·x)),   a = 1.702
//! ```
//! Φ(x) = 0.5·erfc(−x/√2) with Numerical Recipes' erfc (fractional error < 1.2e-7 for every
//! argument; WGSL has no erf); σ from e = exp(−|z|) so no exp overflows. The CPU reference and
//! the kernel (`shaders/activation.wgsl`) compute the same formulas in the same order. Nothing is
//! saved by the forward: the backward takes x.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

/// Which function; the discriminant is the kernel's `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    GeluErf = 0,
    Relu = 1,
    Silu = 2,
    QuickGelu = 3,
}

const QUICK: f32 = 1.702;
const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

kernel_params! {
    /// The `Params` struct of `activation.wgsl`.
    struct Params {
        n: u32,
        kind: u32,
        off_x: u32,
        off_dy: u32,
        off_out: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// erfc(z) for z ≥ 0 (Numerical Recipes' `erfcc`).
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * (-z * z + poly).exp()
}

/// Φ(v), the standard normal CDF.
fn normal_cdf(v: f32) -> f32 {
    let z = v * INV_SQRT2;
    if z >= 0.0 {
        1.0 - 0.5 * erfc_pos(z)
    } else {
        0.5 * erfc_pos(-z)
    }
}

fn sigmoid(z: f32) -> f32 {
    let e = (-z.abs()).exp();
    if z >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

impl Activation {
    /// y of one value (CPU reference).
    pub fn forward_scalar(self, v: f32) -> f32 {
        match self {
            Activation::GeluErf => v * normal_cdf(v),
            Activation::Relu => v.max(0.0),
            Activation::Silu => v * sigmoid(v),
            Activation::QuickGelu => v * sigmoid(QUICK * v),
        }
    }

    /// y' of one value (CPU reference).
    pub fn derivative_scalar(self, v: f32) -> f32 {
        match self {
            Activation::GeluErf => normal_cdf(v) + v * INV_SQRT_2PI * (-0.5 * v * v).exp(),
            Activation::Relu => {
                if v > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Silu => {
                let s = sigmoid(v);
                s * (1.0 + v * (1.0 - s))
            }
            Activation::QuickGelu => {
                let s = sigmoid(QUICK * v);
                s + QUICK * v * s * (1.0 - s)
            }
        }
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "activation",
        source: shaders::ACTIVATION,
        entry,
    }
}

/// Launch `entry` over every element of `out`, split over bindings when large.
fn launch(
    ctx: &Arc<GpuContext>,
    entry: &'static str,
    kind: Activation,
    x: &Tensor,
    dy: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    for (start, len) in ctx.row_chunks(out.numel(), &[1])? {
        if len == 0 {
            continue;
        }
        let (xv, ov) = (ctx.view(x, start, len)?, ctx.view(out, start, len)?);
        let mut params = Params {
            n: len as u32,
            kind: kind as u32,
            off_x: xv.offset,
            off_out: ov.offset,
            ..Zeroable::zeroed()
        };
        let mut bindings = vec![(1, xv.binding), (3, ov.binding)];
        if let Some(dy) = dy {
            let dv = ctx.view(dy, start, len)?;
            params.off_dy = dv.offset;
            bindings.push((2, dv.binding));
        }
        let groups = grid_2d(len, 256, ctx.limits.max_compute_workgroups_per_dimension);
        ctx.dispatch(
            kernel(entry),
            bytemuck::bytes_of(&params),
            &bindings,
            groups,
        )?;
    }
    Ok(())
}

/// `y = f(x)` element by element, any shape (the module doc's table).
pub fn activation(kind: Activation, x: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    match x.device() {
        Device::Cpu(ctx) => {
            let out = x
                .cpu_data()?
                .iter()
                .map(|&v| kind.forward_scalar(v))
                .collect();
            Ok(Tensor::cpu_from(&ctx, out, x.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, x.shape())?;
            launch(&ctx, "activation_forward", kind, x, None, &out)?;
            Ok(out)
        }
    }
}

/// `dx = dy · f'(x)`; `x` is the forward's input, shapes equal.
pub fn activation_backward(kind: Activation, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::scope("elementwise");
    if x.shape() != dy.shape() {
        return shape_err(
            "activation_backward",
            format!("dy of the shape of x, {:?}", x.shape()),
            dy.shape(),
        );
    }
    match same_device("activation_backward", &[x, dy])? {
        Device::Cpu(ctx) => {
            let (xd, dyd) = (x.cpu_data()?, dy.cpu_data()?);
            let out = xd
                .iter()
                .zip(dyd.iter())
                .map(|(&v, &d)| d * kind.derivative_scalar(v))
                .collect();
            Ok(Tensor::cpu_from(&ctx, out, x.shape()))
        }
        Device::Gpu(ctx) => {
            let out = Tensor::gpu_uninit(&ctx, x.shape())?;
            launch(&ctx, "activation_backward", kind, x, Some(dy), &out)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, assert_close_slices, gpu, random_vec, sizes};
    use proptest::prelude::*;

    const ALL: [Activation; 4] = [
        Activation::GeluErf,
        Activation::Relu,
        Activation::Silu,
        Activation::QuickGelu,
    ];

    /// Values in [-6, 6): both tails and the middle.
    fn inputs(shape: &[usize], seed: u64, device: &Device) -> Tensor {
        let v = random_vec(shape.iter().product(), seed)
            .iter()
            .map(|v| 6.0 * v)
            .collect();
        Tensor::from_vec(v, shape, device).unwrap()
    }

    /// The f64 reference of one activation at one value.
    fn forward64(kind: Activation, x: f64) -> f64 {
        let name = match kind {
            Activation::GeluErf => "gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::QuickGelu => "quick_gelu",
        };
        crate::reference::activation(name, &[x])[0]
    }

    #[test]
    fn cpu_matches_f64_and_finite_differences() {
        let xs: Vec<f32> = (0..49).map(|i| -6.0 + 0.25 * i as f32 + 0.01).collect();
        let cpu = Device::cpu();
        let x = Tensor::from_vec(xs.clone(), &[49], &cpu).unwrap();
        let dys = random_vec(49, 3);
        let dy = Tensor::from_vec(dys.clone(), &[49], &cpu).unwrap();
        for kind in ALL {
            let want: Vec<f32> = xs
                .iter()
                .map(|&v| forward64(kind, v as f64) as f32)
                .collect();
            let got = activation(kind, &x).unwrap().to_vec().unwrap();
            assert_close_slices(&format!("{kind:?}"), &got, &want, 1e-6, 1e-6);
            let h = 1e-5;
            let fd: Vec<f32> = xs
                .iter()
                .zip(&dys)
                .map(|(&v, &d)| {
                    let v = v as f64;
                    (d as f64 * (forward64(kind, v + h) - forward64(kind, v - h)) / (2.0 * h))
                        as f32
                })
                .collect();
            let got = activation_backward(kind, &x, &dy)
                .unwrap()
                .to_vec()
                .unwrap();
            assert_close_slices(&format!("{kind:?}'"), &got, &fd, 1e-5, 1e-5);
        }
        // PyTorch's hand values: F.gelu(1.0) = 0.8413447, F.silu(-1.0) = -0.2689414.
        assert!((Activation::GeluErf.forward_scalar(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((Activation::Silu.forward_scalar(-1.0) + 0.268_941_4).abs() < 1e-6);
        assert_eq!(Activation::Relu.derivative_scalar(0.0), 0.0);
    }

    #[test]
    fn extreme_inputs_give_no_nan() {
        let xs = [-1e30f32, -1e13, -100.0, -30.0, 30.0, 100.0, 1e13, 1e30];
        for kind in ALL {
            for &v in &xs {
                let (y, d) = (kind.forward_scalar(v), kind.derivative_scalar(v));
                assert!(y.is_finite() && d.is_finite(), "{kind:?}({v}) = {y}, {d}");
                if v >= 30.0 {
                    assert_eq!((y, d), (v, 1.0), "{kind:?}({v})");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        #[test]
        fn gpu_matches_cpu_random(rows in sizes(), cols in sizes(), seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            let cpu = Device::cpu();
            let (x, dy) = (inputs(&[rows, cols], seed, &cpu), inputs(&[rows, cols], seed + 1, &cpu));
            let (gx, gdy) = (x.to_device(&g).unwrap(), dy.to_device(&g).unwrap());
            for kind in ALL {
                // The GPU's exp and division are not the CPU's to the last bit.
                let name = format!("{kind:?}");
                assert_close(&name, &activation(kind, &gx).unwrap(), &activation(kind, &x).unwrap(), 1e-6, 1e-5);
                let (got, want) = (
                    activation_backward(kind, &gx, &gdy).unwrap(),
                    activation_backward(kind, &x, &dy).unwrap(),
                );
                assert_close(&format!("{name}'"), &got, &want, 1e-6, 1e-5);
            }
        }
    }

    #[test]
    fn gpu_matches_cpu_split_bindings() {
        let Some(_) = gpu() else { return };
        let g = crate::testing::gpu_with_binding_limit(4096);
        let cpu = Device::cpu();
        let (x, dy) = (inputs(&[1000, 3], 1, &cpu), inputs(&[1000, 3], 2, &cpu));
        let (gx, gdy) = (x.to_device(&g).unwrap(), dy.to_device(&g).unwrap());
        for kind in ALL {
            let got = activation_backward(kind, &gx, &gdy).unwrap();
            let want = activation_backward(kind, &x, &dy).unwrap();
            assert_close(&format!("{kind:?} split"), &got, &want, 1e-6, 1e-5);
        }
    }

    #[test]
    fn shapes_are_checked() {
        let cpu = Device::cpu();
        let x = Tensor::zeros(&[2, 3], &cpu).unwrap();
        let dy = Tensor::zeros(&[3, 2], &cpu).unwrap();
        let e = activation_backward(Activation::Relu, &x, &dy)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("activation_backward") && e.contains("[3, 2]"),
            "{e}"
        );
    }
}
