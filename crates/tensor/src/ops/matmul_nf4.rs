//! Matrix product with an NF4-quantized weight: `Y = X·W` or `Y = X·Wᵀ`, W dequantized on the
//! fly ([`crate::quant`]); QLoRA's frozen base.
//!
//! # Math and shapes
//! X: `(M, K)`. W is stored row-major, quantized in blocks of `blocksize` consecutive elements:
//! `W[e] = NF4[code(e)] · absmax[e / blocksize]`.
//! - `trans_w = false`: W stored `(K, N)` (GPT-2's Conv1D: `y = x·W`), `Y[i, j] = Σ_p X[i, p]·W[p, j]`;
//! - `trans_w = true`: W stored `(N, K)`, `Y[i, j] = Σ_p X[i, p]·W[j, p]`.
//!
//! # Backward
//! W is frozen, so only dX is ever needed: for `Y = X·W`, `dX = dY·Wᵀ` = this op with the flag
//! flipped on the same stored weight (and the other way round). No gradient, no optimizer state
//! and no f32 copy of W exist.
//!
//! # Backends
//! CPU: W is dequantized one panel of stored rows at a time (about 256 KB, cache-sized), each
//! panel multiplied by [`sgemm`](crate::sgemm). GPU: `shaders/matmul_nf4.wgsl`, the tiled product
//! of `matmul.wgsl` with W's tile dequantized while it is staged in workgroup memory. Both are
//! tested against the f32 product with the dequantized weight.

use std::sync::Arc;

use bytemuck::Zeroable;

use crate::gpu::{GpuContext, Kernel, kernel_params};
use crate::quant::{NF4_LEVELS, Nf4Weight};
use crate::tensor::same_device;
use crate::{Device, Result, Tensor, shaders, shape_err};

kernel_params! {
    /// The `Params` struct of `matmul_nf4.wgsl`.
    struct Params {
        m: u32,
        n: u32,
        k: u32,
        trans_w: u32,
        blocksize: u32,
        off_x: u32,
        off_w: u32,
        off_s: u32,
        off_y: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
}

/// An NF4 weight on a device: its packed codes (u32 words, see [`Tensor::from_u32`]) and one f32
/// scale per block (double-quantized scales are expanded on upload: 4 bytes per block).
#[derive(Clone)]
pub struct Nf4Tensor {
    words: Tensor,
    scales: Tensor,
    rows: usize,
    cols: usize,
    blocksize: usize,
}

impl Nf4Tensor {
    /// Uploads a 2-D quantized weight of shape `(rows, cols)` to `device`.
    pub fn upload(w: &Nf4Weight, device: &Device) -> Result<Nf4Tensor> {
        let &[rows, cols] = w.shape() else {
            return shape_err("nf4 upload", "a 2-D weight", w.shape());
        };
        let scales = w.scales().absmax();
        Ok(Nf4Tensor {
            words: Tensor::from_u32(w.words(), device)?,
            scales: Tensor::from_vec(scales.clone(), &[scales.len()], device)?,
            rows,
            cols,
            blocksize: w.blocksize(),
        })
    }

    /// The stored shape `(rows, cols)`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Device bytes: codes and scales.
    pub fn bytes(&self) -> u64 {
        self.words.bytes() + self.scales.bytes()
    }

    pub fn device(&self) -> Device {
        self.words.device()
    }
}

/// `Y = X·W` (`trans_w` false, W stored `(K, N)`) or `Y = X·Wᵀ` (W stored `(N, K)`); X `(M, K)`.
pub fn matmul_nf4(x: &Tensor, w: &Nf4Tensor, trans_w: bool) -> Result<Tensor> {
    let _profile = crate::profile::scope("matmul");
    let [m, k, n] = super::weight_panels::dims("matmul_nf4", x, w.shape(), trans_w)?;
    crate::counts::matmul(1, m, n, k, false, trans_w);
    match same_device("matmul_nf4", &[x, &w.words, &w.scales])? {
        Device::Cpu(ctx) => {
            let out = cpu(&x.cpu_data()?, w, m, k, n, trans_w)?;
            Ok(Tensor::cpu_from(&ctx, out, &[m, n]))
        }
        Device::Gpu(ctx) => {
            let y = Tensor::gpu_uninit(&ctx, &[m, n])?;
            launch(&ctx, x, w, &y, [m, k, n], trans_w)?;
            Ok(y)
        }
    }
}

/// The CPU path: panels of W's stored rows, dequantized, then one `sgemm` each
/// (`ops/weight_panels.rs`).
fn cpu(x: &[f32], w: &Nf4Tensor, m: usize, k: usize, n: usize, trans_w: bool) -> Result<Vec<f32>> {
    let words: Vec<u32> = w.words.cpu_data()?.iter().map(|v| v.to_bits()).collect();
    let scales = w.scales.cpu_data()?;
    let dequantize = |e0: usize, out: &mut [f32]| {
        for (i, v) in out.iter_mut().enumerate() {
            let e = e0 + i;
            let byte = (words[e / 8] >> (8 * ((e / 2) % 4))) as u8;
            let code = if e.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0xF
            };
            *v = NF4_LEVELS[code as usize] * scales[e / w.blocksize];
        }
    };
    Ok(super::weight_panels::product(
        x,
        [m, k, n],
        [w.rows, w.cols],
        trans_w,
        dequantize,
    ))
}

fn launch(
    ctx: &Arc<GpuContext>,
    x: &Tensor,
    w: &Nf4Tensor,
    y: &Tensor,
    [m, k, n]: [usize; 3],
    trans_w: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (xv, wv) = (ctx.view_all(x)?, ctx.view_all(&w.words)?);
    let (sv, yv) = (ctx.view_all(&w.scales)?, ctx.view_all(y)?);
    let params = Params {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        trans_w: trans_w as u32,
        blocksize: w.blocksize as u32,
        off_x: xv.offset,
        off_w: wv.offset,
        off_s: sv.offset,
        off_y: yv.offset,
        ..Zeroable::zeroed()
    };
    let groups = [n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1];
    ctx.dispatch(
        Kernel {
            shader: "matmul_nf4",
            source: shaders::MATMUL_NF4,
            entry: "matmul_nf4",
        },
        bytemuck::bytes_of(&params),
        &[
            (1, xv.binding),
            (2, wv.binding),
            (3, sv.binding),
            (4, yv.binding),
        ],
        groups,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::{MatmulOpts, matmul};
    use crate::testing::{assert_close, random_vec};

    /// X·W (or X·Wᵀ) against the f32 product with the dequantized weight.
    fn check(device: &Device, m: usize, k: usize, n: usize, trans_w: bool, double_quant: bool) {
        let stored = if trans_w { [n, k] } else { [k, n] };
        let values: Vec<f32> = random_vec(k * n, 7).iter().map(|v| v * 0.05).collect();
        let q = Nf4Weight::quantize(&values, &stored, 64, double_quant).unwrap();
        let w = Nf4Tensor::upload(&q, device).unwrap();
        let x = Tensor::from_vec(random_vec(m * k, 8), &[m, k], device).unwrap();
        let got = matmul_nf4(&x, &w, trans_w).unwrap();
        let dense = Tensor::from_vec(q.dequantize(), &stored, device).unwrap();
        let opts = MatmulOpts {
            trans_b: trans_w,
            ..Default::default()
        };
        let want = matmul(&x, &dense, None, opts).unwrap();
        let what = format!("{m}x{k}x{n} trans_w {trans_w} dq {double_quant}");
        assert_close(&what, &got, &want, 1e-5, 1e-4);
    }

    fn shapes(device: &Device) {
        for trans_w in [false, true] {
            check(device, 5, 70, 100, trans_w, false);
            // K·N odd (a spare nibble), tiles cut on every side, a tall X.
            check(device, 130, 9, 7, trans_w, true);
            check(device, 3, 300, 65, trans_w, false);
        }
    }
    crate::on_devices!(shapes, shapes_cpu, shapes_gpu);

    /// More stored rows than one CPU panel holds: panels stitch together.
    #[test]
    fn panels_stitch_together_on_the_cpu() {
        check(&Device::cpu(), 4, 2100, 40, false, false);
        check(&Device::cpu(), 4, 40, 2100, true, false);
    }

    #[test]
    fn mismatched_shapes_are_refused_naming_both() {
        let device = Device::cpu();
        let q = Nf4Weight::quantize(&[0.5; 12], &[3, 4], 64, false).unwrap();
        let w = Nf4Tensor::upload(&q, &device).unwrap();
        let x = Tensor::from_vec(vec![1.0; 8], &[2, 4], &device).unwrap();
        let err = matmul_nf4(&x, &w, false).unwrap_err().to_string();
        assert!(err.contains("X (M, 3)") && err.contains("[2, 4]"), "{err}");
        assert!(matmul_nf4(&x, &w, true).is_ok());
    }
}
