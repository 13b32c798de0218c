//! The GELU epilogue of the matrix product: GPT-2's MLP, `c_proj(gelu(c_fc(x)))`, with no GELU
//! kernel of its own, forward or backward.
//!
//! # Math
//! GELU in its tanh form (GPT-2's, Hugging Face's `gelu_new`), with
//! `v = K·(u + A·u³)`, `K = √(2/π) ≈ 0.7978845608`, `A = 0.044715`:
//!
//! ```text
//! gelu(u)  = 0.5·u·(1 + tanh v)
//! gelu'(u) = 0.5·(1 + tanh v) + 0.5·u·(1 − tanh² v)·K·(1 + 3A·u²)
//! ```
//! (product rule, `d tanh v / du = (1 − tanh² v)·K·(1 + 3A·u²)`), evaluated as
//! [`ops::gelu`](crate::ops::gelu) evaluates it (the logistic form, tails saturated), by the same
//! WGSL functions on the GPU (`gelu_value`, `gelu_grad` of `shaders/common.wgsl`).
//!
//! Forward, [`matmul_gelu`]: x `(…, M, K)`, a weight W `(K, N)` (`(N, K)` with `trans_b`), bias
//! `(N)`:
//! ```text
//! u = x·op(W) + b      (…, M, N)   the pre-activation, which the backward needs
//! g = gelu(u)          (…, M, N)   the activation
//! ```
//! both written by one dispatch: the product's epilogue stores u and gelu(u) for each output
//! element once its sum is complete.
//!
//! Backward, [`matmul_gelu_backward`]: for the layer after the activation, `y = g·W2 + b2`,
//! ```text
//! dG = dY·W2ᵀ          (…, M, N)   that layer's dx
//! dU = dG ⊙ gelu'(u)   (…, M, N)
//! ```
//! is one product whose epilogue multiplies each output element by gelu'(u), read from the saved
//! u: `matmul_gelu_backward(dY, W2, u, trans_b) = (dY·op(W2)) ⊙ gelu'(u)`. That is dU only when
//! this product is the whole of dG, i.e. g feeds nothing but that layer (the tape's
//! `gelu_linear` is where the condition is kept). The rest of the chain is the plain product's:
//! `dx = dU·op(W)ᵀ`, `dW = xᵀ·dU`, `db = Σ_rows dU` ([`matmul`](super::matmul)'s table).
//!
//! # Backends
//! GPU: one more entry point per kernel and epilogue, chosen with the kernel
//! ([`Epilogue::kernel`]): `matmul_gelu` / `matmul_gelu_backward` in `shaders/matmul.wgsl` and
//! `matmul_tiled_gelu` / `matmul_tiled_gelu_backward` in `shaders/matmul_tiled.wgsl` (each with
//! the four transpose pipelines). The plain entry points bind nothing extra. The epilogue's
//! tensor (g written, or u read) is bound in C's layout wherever C is; where K is split over
//! dispatches (operands larger than one binding) the epilogue runs with the last K chunk, on
//! the whole sum. CPU, the reference the kernels are tested against: the product by `sgemm`,
//! then one pass over its rows (gelu of u into g, or the product times gelu'(u) in place).

use super::{Dims, MatmulOpts, check_bias, dims, launch, matmul};
use crate::gpu::Kernel;
use crate::ops::gelu::{gelu, gelu_grad_mul_cpu};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shape_err};

/// What a product's kernel does with each output element once its sum v is complete (module
/// doc); the plain product (`C = v`) has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `C = u = v` and `aux = gelu(u)` (aux written: binding 5, `gelu_out`).
    Gelu,
    /// `C = v · gelu'(aux)` (aux the saved u, read: binding 6, `gelu_in`).
    GeluBackward,
}

impl Epilogue {
    /// The binding number of the epilogue's tensor.
    pub(crate) fn binding(self) -> u32 {
        match self {
            Epilogue::Gelu => 5,
            Epilogue::GeluBackward => 6,
        }
    }

    /// The entry point of `plain`'s shader that runs the product with epilogue `e` (`plain`
    /// itself without one).
    pub(crate) fn kernel(e: Option<Epilogue>, plain: Kernel) -> Kernel {
        let entry = match (plain.entry, e) {
            (entry, None) => entry,
            ("matmul", Some(Epilogue::Gelu)) => "matmul_gelu",
            ("matmul", Some(Epilogue::GeluBackward)) => "matmul_gelu_backward",
            ("matmul_tiled", Some(Epilogue::Gelu)) => "matmul_tiled_gelu",
            ("matmul_tiled", Some(Epilogue::GeluBackward)) => "matmul_tiled_gelu_backward",
            ("matmul_coop", Some(Epilogue::Gelu)) => "matmul_coop_gelu",
            ("matmul_coop", Some(Epilogue::GeluBackward)) => "matmul_coop_gelu_backward",
            (entry, Some(e)) => panic!(
                "{}::{entry} has no {e:?} epilogue: a matmul kernel the launcher picks for a \
                 product with an epilogue needs an entry point for it",
                plain.shader
            ),
        };
        Kernel { entry, ..plain }
    }
}

/// The checks both ops share: x `(…, M, K)` not transposed and W 2-D (a linear layer's weight),
/// as [`matmul`] checks them otherwise. The batch is then folded into M (one 2-D product).
fn gelu_dims(op: &'static str, x: &Tensor, w: &Tensor, opts: MatmulOpts) -> Result<Dims> {
    if opts.trans_a {
        return shape_err(op, "x (…, M, K) without trans_a".to_string(), x.shape());
    }
    if w.shape().len() != 2 {
        let form = if opts.trans_b { "(N, K)" } else { "(K, N)" };
        return shape_err(op, format!("a 2-D weight {form}"), w.shape());
    }
    let d = dims(op, x, w, opts)?;
    debug_assert_eq!(d.batch, 1, "a 2-D weight folds the batch into M");
    Ok(d)
}

/// `u = x·op(W) + b` and `g = gelu(u)` in one pass (module doc). x: `(…, M, K)`; W: `(K, N)`, or
/// `(N, K)` with `trans_b` (`trans_a` is refused); bias: `(N)`. Returns `(u, g)`, both
/// `(…, M, N)`.
pub fn matmul_gelu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    opts: MatmulOpts,
) -> Result<(Tensor, Tensor)> {
    let d = gelu_dims("matmul_gelu", x, w, opts)?;
    check_bias("matmul_gelu", bias, d.n)?;
    let mut all = vec![x, w];
    all.extend(bias);
    match same_device("matmul_gelu", &all)? {
        Device::Cpu(_) => {
            let u = matmul(x, w, bias, opts)?;
            let g = gelu(&u)?;
            Ok((u, g))
        }
        Device::Gpu(ctx) => {
            let _profile = crate::profile::scope("matmul");
            crate::counts::matmul(d.batch, d.m, d.n, d.k, false, opts.trans_b);
            let device = Device::Gpu(ctx.clone());
            let (u, g) = (
                Tensor::uninit(&d.out_shape, &device)?,
                Tensor::uninit(&d.out_shape, &device)?,
            );
            let max_z = ctx.limits.max_compute_workgroups_per_dimension as usize;
            let epilogue = Some((Epilogue::Gelu, &g));
            launch(&ctx, &u, x, w, bias, &d, opts, false, max_z, epilogue)?;
            Ok((u, g))
        }
    }
}

/// `dU = (dy·op(W)) ⊙ gelu'(u)` in one pass (module doc): with dy `(…, M, K)` the gradient of
/// the layer after the activation and W `(K, N)` (`(N, K)` with `trans_b`; that layer's weight
/// with the flag its dx takes), and u `(…, M, N)` the pre-activation [`matmul_gelu`] returned.
/// Returns dU, u's shape.
pub fn matmul_gelu_backward(
    dy: &Tensor,
    w: &Tensor,
    u: &Tensor,
    opts: MatmulOpts,
) -> Result<Tensor> {
    let d = gelu_dims("matmul_gelu_backward", dy, w, opts)?;
    if u.shape() != d.out_shape {
        return shape_err(
            "matmul_gelu_backward",
            format!("u of the product's shape {:?}", d.out_shape),
            u.shape(),
        );
    }
    match same_device("matmul_gelu_backward", &[dy, w, u])? {
        Device::Cpu(_) => {
            let du = matmul(dy, w, None, opts)?;
            gelu_grad_mul_cpu(&u.cpu_data()?, &mut du.cpu_data_mut()?);
            Ok(du)
        }
        Device::Gpu(ctx) => {
            let _profile = crate::profile::scope("matmul");
            crate::counts::matmul(d.batch, d.m, d.n, d.k, false, opts.trans_b);
            let du = Tensor::uninit(&d.out_shape, &Device::Gpu(ctx.clone()))?;
            let max_z = ctx.limits.max_compute_workgroups_per_dimension as usize;
            let epilogue = Some((Epilogue::GeluBackward, u));
            launch(&ctx, &du, dy, w, None, &d, opts, false, max_z, epilogue)?;
            Ok(du)
        }
    }
}

#[cfg(test)]
#[path = "matmul_gelu_tests.rs"]
mod tests;
