//! Quantized storage for frozen weights: QLoRA's 4-bit NormalFloat (NF4), exactly as
//! bitsandbytes writes it.
//!
//! QLoRA (Dettmers et al. 2023) keeps the frozen base in 4 bits per weight and trains LoRA on top
//! in full precision: only the product W0·x needs W0, and it can rebuild each weight on the fly.
//! A weight matrix is cut into blocks of `blocksize` consecutive values (64 by default, in
//! row-major order); each block stores its absolute maximum `absmax` as an f32 and each value
//! as the index of the nearest of 16 levels in [-1, 1]:
//!
//! ```text
//! code(w) = argmin_i | w / absmax − NF4[i] |        w ≈ NF4[code(w)] · absmax
//! ```
//!
//! The levels ([`NF4_LEVELS`]) are quantiles of the standard normal distribution, so that a
//! normally distributed block uses each level about equally often, with an exact 0.
//!
//! **Double quantization** (bitsandbytes' `compress_statistics`) saves another 0.37 bit per weight:
//! the f32 absmax values are centred on their mean and quantized again to 8 bits, blockwise
//! (blocks of 256), on bitsandbytes' dynamic map ([`dynamic_map`]):
//!
//! ```text
//! absmax ≈ DYN[qabsmax] · nested_absmax + offset
//! ```
//!
//! Storage: two 4-bit codes per byte, element 2k in the high nibble of byte k (bitsandbytes'
//! layout, kept so that files are shared), and the bytes packed in `u32` words, because WGSL has
//! no byte type: a kernel reads word e/8, byte (e/2) mod 4 of it, and the nibble of e's parity.
//!
//! Agreement with bitsandbytes 0.50 (tests/nf4_bitsandbytes.rs, fixture made by bitsandbytes):
//! - the 4-bit codes and the f32 block scales of [`Nf4Weight::quantize`], bit for bit;
//! - [`Nf4Weight::dequantize`] of bitsandbytes' own tensors, bit for bit, with or without double
//!   quantization (so its files load exactly);
//! - double quantization, given bitsandbytes' offset and map: the same nested scales, and the
//!   same nested codes except where bitsandbytes' CPU kernel, whose bucketed binary search is
//!   approximate, resolves a near-tie to the farther of two neighbouring levels (a few per
//!   thousand; ours is the nearest level, as the math says);
//! - the offset (the mean of the block scales) and the dynamic map are computed here exactly and
//!   rounded once; bitsandbytes computes both with PyTorch in f32, in an order that depends on
//!   the CPU's vector width, and they agree with ours to one ulp.

mod blockwise8;
mod nf4;

pub use blockwise8::{Blockwise8, DYNAMIC_BLOCK, dynamic_map};
pub use nf4::{BLOCK_SIZES, DEFAULT_BLOCK, NF4_LEVELS, Nf4Weight, Scales};
