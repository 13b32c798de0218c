//! Matrix product with a frozen weight stored in f16: `Y = X·W [+ b]` or `Y = X·Wᵀ [+ b]`, W in
//! IEEE half precision (two elements per 32-bit word), X, b and Y in f32, every sum in f32.
//! This is `--precision f16`: the frozen base at half its bytes, the trainable parameters (and
//! their gradients and Adam's moments) in f32.
//!
//! # Math and shapes
//! X: `(M, K)`; W stored row-major `(rows, cols)`:
//! - `trans_w = false`: W stored `(K, N)` (GPT-2's Conv1D, `y = x·W`), `Y[i, j] = b[j] + Σ_p X[i, p]·W[p, j]`;
//! - `trans_w = true`: W stored `(N, K)`, `Y[i, j] = b[j] + Σ_p X[i, p]·W[j, p]`.
//!
//! # Rounding
//! Each weight is rounded once, on upload, to the nearest f16 (ties to even, the `half` crate):
//! a relative error of at most 2⁻¹¹ ≈ 4.9·10⁻⁴ for normal values (|w| ≥ 6.1·10⁻⁵; smaller ones
//! keep an absolute error of at most 2⁻²⁵ ≈ 3·10⁻⁸ as f16 subnormals). The product is then the
//! f32 product with the rounded weight, up to the order of the sums: both backends read each
//! half exactly as f32. A weight no f16 can hold (|w| > 65,504, NaN) is refused by its place,
//! never saturated to infinity.
//!
//! # Backward
//! W is frozen: it is not a variable, has no gradient and no optimizer state. For
//! `Y = X·op(W)`, `dX = dY·op(W)ᵀ`: this op again with the flag flipped, on the same halves.
//!
//! # Backends
//! CPU: panels of W's stored rows widened to f32 one at a time, each multiplied by
//! [`sgemm`](crate::sgemm) (`ops/weight_panels.rs`, shared with NF4). GPU: the
//! two matrix-product kernels of [`matmul`](super::matmul) with their `B_F16` pipeline constant,
//! which binds B as u32 words and widens each half exactly with integer operations
//! (`half_to_f32` in `shaders/common.wgsl`: no `shader-f16` feature and no capability needed, so
//! every adapter runs it); the choice between the kernels, the autotuning and the split into row
//! chunks are the f32 product's. Both are tested against the f32 product with the rounded
//! weight.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::ops::elementwise::add_bias;
use crate::tensor::same_device;
use crate::{Device, Error, Result, Tensor, shape_err};

/// A frozen weight in f16 on a device: its halves packed two to a u32 word (element `e` in the
/// low 16 bits of word `e/2` when `e` is even, the high 16 bits when odd), the words padded with zeros to a multiple of 4 so the tiled kernel reads them as
/// whole `vec4<u32>`s.
#[derive(Clone)]
pub struct F16Tensor {
    pub(crate) words: Tensor,
    rows: usize,
    cols: usize,
}

impl F16Tensor {
    /// Rounds `values`, stored `(rows, cols)` row-major, to f16 and uploads them to `device`.
    /// `name` names the weight in the error for a value f16 cannot hold.
    pub fn from_f32(
        name: &str,
        values: &[f32],
        shape: &[usize],
        device: &Device,
    ) -> Result<F16Tensor> {
        let &[rows, cols] = shape else {
            return shape_err("F16Tensor::from_f32", "a 2-D weight (rows, cols)", shape);
        };
        if values.len() != rows * cols {
            return shape_err(
                "F16Tensor::from_f32",
                format!("{} values for shape {shape:?}", rows * cols),
                [values.len()],
            );
        }
        let mut halves = vec![f16::ZERO; values.len().div_ceil(8) * 8];
        halves[..values.len()].convert_from_f32_slice(values);
        if let Some(e) = (0..values.len()).find(|&e| !halves[e].is_finite()) {
            return Err(Error::Invalid(format!(
                "`{name}`: element {e} (row {}, column {}) is {}, which f16 cannot hold \
                 (its largest finite value is 65504): keep this model in f32",
                e / cols.max(1),
                e % cols.max(1),
                values[e]
            )));
        }
        let words: Vec<u32> = halves
            .chunks_exact(2)
            .map(|p| u32::from(p[0].to_bits()) | (u32::from(p[1].to_bits()) << 16))
            .collect();
        Ok(F16Tensor {
            words: Tensor::from_u32(&words, device)?,
            rows,
            cols,
        })
    }

    /// The stored values widened back to f32 (exactly the halves the products read).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let numel = self.rows * self.cols;
        let mut out = vec![0.0; numel];
        widen(&self.words.to_u32()?, 0, &mut out);
        Ok(out)
    }

    /// The stored shape `(rows, cols)`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Device bytes: two per element (and up to 14 of padding).
    pub fn bytes(&self) -> u64 {
        self.words.bytes()
    }

    pub fn device(&self) -> Device {
        self.words.device()
    }
}

/// Elements `e0..e0 + out.len()` of the packed halves in `words`, as f32 (the activations'
/// widening: the same layout).
fn widen(words: &[u32], e0: usize, out: &mut [f32]) {
    super::half_tensor::widen(bytemuck::cast_slice(words), e0, out);
}

/// `Y = X·op(W) [+ bias]`: X `(M, K)`, W stored `(K, N)` (`trans_w` false) or `(N, K)`; bias `(N)`.
pub fn matmul_f16(
    x: &Tensor,
    w: &F16Tensor,
    bias: Option<&Tensor>,
    trans_w: bool,
) -> Result<Tensor> {
    let _profile = crate::profile::scope("matmul");
    let [m, k, n] = super::weight_panels::dims("matmul_f16", x, w.shape(), trans_w)?;
    if let Some(b) = bias
        && b.shape() != [n]
    {
        return shape_err("matmul_f16", format!("bias of shape [{n}] (N)"), b.shape());
    }
    let mut all = vec![x, &w.words];
    all.extend(bias);
    crate::counts::matmul(1, m, n, k, false, trans_w);
    match same_device("matmul_f16", &all)? {
        Device::Cpu(ctx) => {
            // The words' bits, read in place (no copy of the weight).
            let words = w.words.cpu_data()?;
            let bits: &[u16] = bytemuck::cast_slice(words.as_slice());
            let y = super::weight_panels::product(
                &x.cpu_data()?,
                [m, k, n],
                w.shape(),
                trans_w,
                |e0, out| super::half_tensor::widen(bits, e0, out),
            );
            let y = Tensor::cpu_from(&ctx, y, &[m, n]);
            match bias {
                Some(b) => add_bias(&y, b),
                None => Ok(y),
            }
        }
        Device::Gpu(ctx) => {
            let y = Tensor::gpu_uninit(&ctx, &[m, n])?;
            super::matmul::launch_f16(&ctx, &y, x, &w.words, bias, [m, k, n], trans_w, false)?;
            Ok(y)
        }
    }
}

/// In place: `C += X·op(W)`, C `(M, N)` (the backward's `dX` summed into the gradient already
/// pending for X). C must not share storage with X.
pub fn matmul_f16_accumulate(c: &Tensor, x: &Tensor, w: &F16Tensor, trans_w: bool) -> Result<()> {
    let n = if trans_w { w.rows } else { w.cols };
    let m = x.shape().first().copied().unwrap_or(0);
    if c.shape() != [m, n] {
        return shape_err(
            "matmul_f16_accumulate",
            format!("C of the product's shape [{m}, {n}]"),
            c.shape(),
        );
    }
    if c.same_storage(x) {
        return Err(Error::Invalid(
            "matmul_f16_accumulate: C must not share storage with X".into(),
        ));
    }
    match same_device("matmul_f16_accumulate", &[c, x, &w.words])? {
        Device::Cpu(_) => {
            let y = matmul_f16(x, w, None, trans_w)?;
            let y = y.cpu_data()?;
            for (c, y) in c.cpu_data_mut()?.iter_mut().zip(y.iter()) {
                *c += y;
            }
            Ok(())
        }
        Device::Gpu(ctx) => {
            let [_, k, _] =
                super::weight_panels::dims("matmul_f16_accumulate", x, w.shape(), trans_w)?;
            crate::counts::matmul(1, m, n, k, false, trans_w);
            super::matmul::launch_f16(&ctx, c, x, &w.words, None, [m, k, n], trans_w, true)
        }
    }
}

#[cfg(test)]
#[path = "matmul_f16_tests.rs"]
mod tests;
