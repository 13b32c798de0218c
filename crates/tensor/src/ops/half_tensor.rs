//! A tensor stored in IEEE half precision on its device: how `--precision f16` keeps the
//! activations a training step saves for backward at half their bytes.
//!
//! # Why, and what it costs
//! Between the forward pass and the backward pass a step keeps, per GPT-2 block, the layer
//! norms' inputs, the fused q, k, v, the attention output, the MLP's pre-activation and the
//! LoRA input: about 11 values per token and channel, most of a step's device memory (the
//! weights of a LoRA run are frozen and the trainable part is tiny). [`HalfTensor::pack`] rounds
//! such a tensor to f16 when it is saved (the f32 original is then dropped) and
//! [`HalfTensor::unpack`] widens it back when its backward rule runs: one pass over the tensor
//! each way, and half the bytes held in between. The forward values themselves stay f32, and
//! every sum stays f32; what changes is that a backward rule sees its saved input rounded to
//! the nearest f16.
//!
//! # Rounding
//! To nearest, ties to even: a relative error of at most 2⁻¹¹ ≈ 4.9·10⁻⁴ for |x| ≥ 2⁻¹⁴
//! ≈ 6.1·10⁻⁵, an absolute error of at most 2⁻²⁵ ≈ 3·10⁻⁸ below (f16 subnormals). |x| ≥ 65,520
//! becomes ±∞ and NaN stays NaN, as IEEE rounding has it: a saved activation that large makes
//! the step's gradients non-finite, which the trainer reports as such (it never applies them).
//! Widening is exact, so `unpack(pack(x))` is x rounded to f16, on both backends alike.
//!
//! # Layout
//! Two halves to a u32 word, element e in the low 16 bits of word e/2 when e is even and in the
//! high 16 bits when odd (the layout of the frozen f16 weights,
//! [`F16Tensor`](super::matmul_f16::F16Tensor)); an odd count leaves the last high half 0.
//!
//! # Backends
//! CPU: the `half` crate's slice conversions (F16C where the CPU has it), on every core for
//! large tensors. GPU: `shaders/half_tensor.wgsl`, one invocation per word, converting with integer
//! operations (`f32_to_half`, `half_to_f32` of `common.wgsl`), so no adapter needs the
//! `shader-f16` feature. The two are tested against each other bit for bit.

use std::sync::Arc;

use bytemuck::Zeroable;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::gpu::{GpuContext, Kernel, grid_2d, kernel_params};
use crate::{Device, Result, Tensor, shaders};

kernel_params! {
    /// The `Params` struct of `half_tensor.wgsl`.
    struct Params {
        n: u32,
        off_x: u32,
        off_words: u32,
        off_out: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel {
        shader: "half_tensor",
        source: shaders::HALF_TENSOR,
        entry,
    }
}

/// An f32 tensor of any shape stored as f16 halves (module doc).
#[derive(Clone)]
pub struct HalfTensor {
    /// ⌈numel/2⌉ packed words, as the bit patterns of a 1-D tensor.
    words: Tensor,
    shape: Vec<usize>,
}

impl HalfTensor {
    /// `x` rounded to f16 (to nearest, ties to even), on `x`'s device.
    pub fn pack(x: &Tensor) -> Result<HalfTensor> {
        let _profile = crate::profile::scope("elementwise");
        let n = x.numel();
        let n_words = n.div_ceil(2);
        let words = match x.device() {
            Device::Cpu(ctx) => {
                let xd = x.cpu_data()?;
                let mut words = vec![0.0f32; n_words];
                let bits: &mut [u16] = bytemuck::cast_slice_mut(&mut words);
                let row = 2 * crate::cpu::even_rows(n_words);
                crate::cpu::for_rows(bits, row, |r, out| {
                    let start = r * row;
                    let len = out.len().min(n.saturating_sub(start));
                    narrow(&xd[start..start + len], &mut out[..len]);
                });
                Tensor::cpu_from(&ctx, words, &[n_words])
            }
            Device::Gpu(ctx) => {
                let words = Tensor::gpu_uninit(&ctx, &[n_words])?;
                launch(&ctx, "pack_f16", n, x, &words, None)?;
                words
            }
        };
        Ok(HalfTensor {
            words,
            shape: x.shape().to_vec(),
        })
    }

    /// The stored values widened back to an f32 tensor of the packed shape (exactly).
    pub fn unpack(&self) -> Result<Tensor> {
        let _profile = crate::profile::scope("elementwise");
        let n = self.numel();
        match self.words.device() {
            Device::Cpu(ctx) => {
                let wd = self.words.cpu_data()?;
                let bits: &[u16] = bytemuck::cast_slice(&wd);
                let mut out = vec![0.0f32; n];
                let row = crate::cpu::even_rows(n);
                crate::cpu::for_rows(&mut out, row, |r, o| widen(bits, r * row, o));
                Ok(Tensor::cpu_from(&ctx, out, &self.shape))
            }
            Device::Gpu(ctx) => {
                let out = Tensor::gpu_uninit(&ctx, &self.shape)?;
                launch(&ctx, "unpack_f16", n, &out, &self.words, Some(&out))?;
                Ok(out)
            }
        }
    }

    /// The shape of the tensor it holds.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Device bytes: two per element (four for the last one when the count is odd).
    pub fn bytes(&self) -> u64 {
        self.words.bytes()
    }

    pub fn device(&self) -> Device {
        self.words.device()
    }
}

/// `out[i]` = the bits of `x[i]` rounded to f16, `out` as long as `x`: element e is the u16 at e
/// of the words in memory on a little-endian machine.
fn narrow(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if f16c::available() {
        // SAFETY: the CPU has AVX and F16C (checked just above).
        return unsafe { f16c::narrow(x, out) };
    }
    #[cfg(target_endian = "little")]
    out.reinterpret_cast_mut::<f16>().convert_from_f32_slice(x);
    #[cfg(target_endian = "big")]
    for (i, &v) in x.iter().enumerate() {
        // Element e is the low half of word e/2 when even: the second u16 in memory here.
        out[i ^ 1] = f16::from_f32(v).to_bits();
    }
}

/// `out` = elements `e0..e0 + out.len()` of the halves whose words are `bits`, widened.
pub(crate) fn widen(bits: &[u16], e0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if f16c::available() {
        // SAFETY: the CPU has AVX and F16C (checked just above).
        return unsafe { f16c::widen(&bits[e0..e0 + out.len()], out) };
    }
    #[cfg(target_endian = "little")]
    bits[e0..e0 + out.len()]
        .reinterpret_cast::<f16>()
        .convert_to_f32_slice(out);
    #[cfg(target_endian = "big")]
    for (i, v) in out.iter_mut().enumerate() {
        *v = f16::from_bits(bits[(e0 + i) ^ 1]).to_f32();
    }
}

/// Eight conversions an instruction (`vcvtps2ph`, `vcvtph2ps`) where the CPU has F16C: the
/// `half` crate's slice conversions take four at a time, which made saving a step's activations
/// cost a third of the tiny model's CPU step. The same IEEE rounding (to nearest, ties to even;
/// a NaN stays a NaN), so both paths give the same halves.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c")
    }

    /// # Safety
    /// The CPU must have AVX and F16C; `out` at least as long as `x`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn narrow(x: &[f32], out: &mut [u16]) {
        let n8 = x.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ x.len() ≤ out.len(); unaligned loads and stores.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), h);
            }
        }
        for i in n8..x.len() {
            out[i] = half::f16::from_f32(x[i]).to_bits();
        }
    }

    /// # Safety
    /// The CPU must have AVX and F16C; `out` as long as `bits`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn widen(bits: &[u16], out: &mut [f32]) {
        let n8 = out.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ out.len() = bits.len(); unaligned loads and stores.
            unsafe {
                let h = _mm_loadu_si128(bits.as_ptr().add(i).cast());
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for i in n8..out.len() {
            out[i] = half::f16::from_bits(bits[i]).to_f32();
        }
    }
}

/// Launch `entry` over the `n` elements: `x` is pack's input (unpack passes its output, which
/// the entry point does not read), `out` unpack's output. Split over bindings when large, each
/// chunk starting at an even element so it starts at a word.
fn launch(
    ctx: &Arc<GpuContext>,
    entry: &'static str,
    n: usize,
    x: &Tensor,
    words: &Tensor,
    out: Option<&Tensor>,
) -> Result<()> {
    let n_words = n.div_ceil(2);
    for (w0, wl) in ctx.row_chunks(n_words, &[2])? {
        if wl == 0 {
            continue;
        }
        let (e0, el) = (2 * w0, (2 * wl).min(n - 2 * w0));
        let wv = ctx.view(words, w0, wl)?;
        let mut params = Params {
            n: el as u32,
            off_words: wv.offset,
            ..Zeroable::zeroed()
        };
        let mut bindings = vec![(2, wv.binding)];
        match out {
            Some(out) => {
                let ov = ctx.view(out, e0, el)?;
                params.off_out = ov.offset;
                bindings.push((3, ov.binding));
            }
            None => {
                let xv = ctx.view(x, e0, el)?;
                params.off_x = xv.offset;
                bindings.push((1, xv.binding));
            }
        }
        let groups = grid_2d(wl, 256, ctx.limits.max_compute_workgroups_per_dimension);
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
    use crate::testing::gpu;

    /// f32 values that exercise every branch of the rounding: zeros, the subnormal range and its
    /// floor (2⁻²⁵ ties to 0, just above it rounds up), ties to even at several exponents, the
    /// largest half and the overflow threshold 65,520, infinities and a NaN; then a sweep of bit
    /// patterns across the whole f32 range.
    fn values() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.1,
            1.0 / 3.0,
            2f32.powi(-14),
            2f32.powi(-15),
            2f32.powi(-24),
            2f32.powi(-25),
            f32::from_bits(2f32.powi(-25).to_bits() + 1),
            2f32.powi(-26),
            1.5 * 2f32.powi(-24),
            2.5 * 2f32.powi(-24),
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            f32::from_bits((1.0f32 + 2f32.powi(-11)).to_bits() + 1),
            2048.0 + 1.0,
            2048.0 + 3.0,
            65504.0,
            65519.0,
            65520.0,
            -65520.0,
            1e6,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            f32::MAX,
        ];
        let mut bits = 0u32;
        while let Some(next) = bits.checked_add(0x0001_3579) {
            v.push(f32::from_bits(bits));
            bits = next;
        }
        v
    }

    fn expected(v: &[f32]) -> Vec<u32> {
        v.iter()
            .map(|&x| {
                let h = f16::from_f32(x);
                if h.is_nan() {
                    0x7e00
                } else {
                    u32::from(h.to_bits())
                }
            })
            .collect()
    }

    fn halves_of(h: &HalfTensor) -> Vec<u32> {
        let words = h.words.to_u32().unwrap();
        (0..h.numel())
            .map(|e| (words[e / 2] >> (16 * (e % 2))) & 0xffff)
            .map(|b| {
                if b & 0x7c00 == 0x7c00 && b & 0x3ff != 0 {
                    0x7e00
                } else {
                    b
                }
            })
            .collect()
    }

    fn check(device: &Device, v: &[f32], shape: &[usize]) {
        let x = Tensor::from_vec(v.to_vec(), shape, device).unwrap();
        let h = HalfTensor::pack(&x).unwrap();
        assert_eq!(h.shape(), shape);
        assert_eq!(h.bytes(), 4 * v.len().div_ceil(2) as u64);
        let want = expected(v);
        let got = halves_of(&h);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "element {i}: {} ({:#010x})", v[i], v[i].to_bits());
        }
        let back = h.unpack().unwrap();
        assert_eq!(back.shape(), shape);
        for (i, (b, &x)) in back.to_vec().unwrap().iter().zip(v).enumerate() {
            let r = f16::from_f32(x).to_f32();
            assert!(
                b.to_bits() == r.to_bits() || (b.is_nan() && r.is_nan()),
                "element {i}: {x} widened to {b}, want {r}"
            );
        }
    }

    #[test]
    fn cpu_rounds_to_nearest_even_and_widens_exactly() {
        let v = values();
        check(&Device::cpu(), &v, &[v.len()]);
        // An odd count, and a shape the packing keeps.
        check(&Device::cpu(), &v[..7], &[7]);
        check(&Device::cpu(), &v[..12], &[2, 3, 2]);
    }

    #[test]
    fn gpu_rounds_bit_for_bit_as_the_cpu() {
        let Some(gpu) = gpu() else { return };
        let v = values();
        check(&gpu, &v, &[v.len()]);
        check(&gpu, &v[..7], &[7]);
        check(&gpu, &v[..12], &[2, 3, 2]);
        check(&gpu, &v[..1], &[1]);
    }

    /// A tensor larger than one binding is packed and widened in chunks, each starting at a word.
    #[test]
    fn gpu_splits_a_large_tensor_at_words() {
        if gpu().is_none() {
            return;
        }
        let small = crate::testing::gpu_with_binding_limit(4096);
        let v: Vec<f32> = crate::testing::random_vec(5001, 3)
            .iter()
            .map(|x| x * 300.0)
            .collect();
        check(&small, &v, &[5001]);
    }

    #[test]
    fn an_empty_tensor_packs_to_nothing() {
        let x = Tensor::from_vec(vec![], &[0, 4], &Device::cpu()).unwrap();
        let h = HalfTensor::pack(&x).unwrap();
        assert_eq!((h.numel(), h.bytes()), (0, 0));
        assert_eq!(h.unpack().unwrap().shape(), &[0, 4]);
    }
}
