//! NF4: 4-bit NormalFloat codes with per-block f32 (or double-quantized) scales.

use super::blockwise8::{Blockwise8, DYNAMIC_BLOCK, dynamic_map};
use crate::{Error, Result};

/// The 16 NF4 levels, ascending: quantiles of N(0, 1) normalised to [−1, 1] with an exact 0
/// (QLoRA's appendix; the f32 values bitsandbytes uses).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per NF4 block unless asked otherwise (QLoRA's and bitsandbytes' default).
pub const DEFAULT_BLOCK: usize = 64;

/// The block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The scale of each NF4 block: plain f32, or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    /// One f32 absmax per block (bitsandbytes' `weight.absmax` without `compress_statistics`).
    F32(Vec<f32>),
    /// absmax − offset quantized to 8 bits in blocks of 256 (`weight.absmax` as u8 codes,
    /// `weight.nested_absmax`, `weight.nested_quant_map`, and the offset).
    Double {
        nested: Box<Blockwise8>,
        offset: f32,
    },
}

impl Scales {
    /// The f32 absmax of every block: `absmax = DYN[q]·nested_absmax + offset` for double
    /// quantization, in f32 as bitsandbytes computes it.
    pub fn absmax(&self) -> Vec<f32> {
        match self {
            Scales::F32(absmax) => absmax.clone(),
            Scales::Double { nested, offset } => nested
                .dequantize()
                .into_iter()
                .map(|a| a + offset)
                .collect(),
        }
    }
}

/// A weight stored in NF4: packed 4-bit codes and the scales of its blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    shape: Vec<usize>,
    blocksize: usize,
    /// ceil(n/2) bytes in bitsandbytes' order, packed little-endian into words (the last word
    /// zero-padded).
    words: Vec<u32>,
    scales: Scales,
}

impl Nf4Weight {
    /// Quantizes a row-major weight of `shape` to NF4, as bitsandbytes'
    /// `quantize_4bit(w, blocksize, quant_type="nf4", compress_statistics=double_quant)`.
    ///
    /// Per block of `blocksize` values: m = max |w|; s = clamp(w · (1/m), −1, 1) in f32 (the
    /// last, shorter block divides by m instead, as bitsandbytes does); the code is the number
    /// of midpoints `(NF4[i] + NF4[i+1])/2` strictly below s, i.e. the nearest level with a tie
    /// going to the lower one. With `double_quant`, the absmax values minus their mean are
    /// quantized with [`Blockwise8`] in blocks of 256 on [`dynamic_map`].
    pub fn quantize(
        values: &[f32],
        shape: &[usize],
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Nf4Weight> {
        let n: usize = shape.iter().product();
        if values.len() != n || n == 0 {
            return Err(Error::Shape {
                op: "nf4 quantize",
                expected: format!("{n} values for shape {shape:?} (at least one)"),
                found: format!("{} values", values.len()),
            });
        }
        if !BLOCK_SIZES.contains(&blocksize) {
            return Err(Error::Invalid(format!(
                "nf4 quantize: blocksize {blocksize}; expected one of {BLOCK_SIZES:?}"
            )));
        }
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "nf4 quantize: value {i} is {}; expected finite weights",
                values[i]
            )));
        }
        let bounds: Vec<f32> = NF4_LEVELS.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let code = |s: f32| bounds.partition_point(|&b| b < s) as u8;
        let full = n - n % blocksize;
        let mut codes = Vec::with_capacity(n);
        let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
        for (b, block) in values.chunks(blocksize).enumerate() {
            let m = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let safe = m.max(1e-38);
            if b * blocksize < full {
                let inv = 1.0 / safe;
                codes.extend(block.iter().map(|&w| code((w * inv).clamp(-1.0, 1.0))));
                absmax.push(m);
            } else {
                codes.extend(block.iter().map(|&w| code((w / safe).clamp(-1.0, 1.0))));
                absmax.push(safe);
            }
        }
        let scales = if double_quant {
            let offset = mean_f32(&absmax);
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let nested = Box::new(Blockwise8::quantize(
                &centred,
                dynamic_map(),
                DYNAMIC_BLOCK,
            )?);
            Scales::Double { nested, offset }
        } else {
            Scales::F32(absmax)
        };
        Ok(Nf4Weight {
            shape: shape.to_vec(),
            blocksize,
            words: pack(&codes),
            scales,
        })
    }

    /// Rebuilds a weight from bitsandbytes' tensors: `bytes` the packed codes (element 2k in
    /// the high nibble of byte k), `scales` its absmax (or double-quantized absmax).
    pub fn from_parts(
        shape: &[usize],
        blocksize: usize,
        bytes: &[u8],
        scales: Scales,
    ) -> Result<Nf4Weight> {
        let n: usize = shape.iter().product();
        let blocks = n.div_ceil(blocksize.max(1));
        if !BLOCK_SIZES.contains(&blocksize) {
            return Err(Error::Invalid(format!(
                "nf4 weight: blocksize {blocksize}; expected one of {BLOCK_SIZES:?}"
            )));
        }
        if bytes.len() != n.div_ceil(2) {
            return Err(Error::Shape {
                op: "nf4 weight",
                expected: format!("{} bytes of codes for shape {shape:?}", n.div_ceil(2)),
                found: format!("{} bytes", bytes.len()),
            });
        }
        let found = match &scales {
            Scales::F32(a) => a.len(),
            Scales::Double { nested, .. } => nested.codes.len(),
        };
        if found != blocks {
            return Err(Error::Shape {
                op: "nf4 weight",
                expected: format!("{blocks} block scales ({n} values in blocks of {blocksize})"),
                found: format!("{found}"),
            });
        }
        if let Scales::Double { nested, .. } = &scales {
            let nested_blocks = blocks.div_ceil(nested.blocksize.max(1));
            if nested.absmax.len() != nested_blocks {
                return Err(Error::Shape {
                    op: "nf4 weight",
                    expected: format!(
                        "{nested_blocks} nested absmax values ({blocks} scales in blocks of {})",
                        nested.blocksize
                    ),
                    found: format!("{}", nested.absmax.len()),
                });
            }
        }
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        Ok(Nf4Weight {
            shape: shape.to_vec(),
            blocksize,
            words: bytemuck::cast_slice::<u8, u32>(&padded).to_vec(),
            scales,
        })
    }

    /// `w = NF4[code] · absmax[block]`, in f32 (bitsandbytes' `dequantize_4bit`).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.scales.absmax();
        (0..self.len())
            .map(|i| NF4_LEVELS[self.code(i) as usize] * absmax[i / self.blocksize])
            .collect()
    }

    /// The 4-bit code of element `i` (row-major).
    pub fn code(&self, i: usize) -> u8 {
        let byte = (self.words[i / 8] >> (8 * ((i / 2) % 4))) as u8;
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0xF
        }
    }

    /// The codes as bitsandbytes stores them: ceil(n/2) bytes, high nibble first.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len().div_ceil(2)]
    }

    /// The codes packed in u32 words, as a WGSL kernel reads them.
    pub fn words(&self) -> &[u32] {
        &self.words
    }

    pub fn scales(&self) -> &Scales {
        &self.scales
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this weight occupies: codes, scales and the nested map.
    pub fn storage_bytes(&self) -> usize {
        let scales = match &self.scales {
            Scales::F32(a) => 4 * a.len(),
            Scales::Double { nested, .. } => {
                nested.codes.len() + 4 * nested.absmax.len() + 4 * 256 + 4
            }
        };
        self.len().div_ceil(2) + scales
    }
}

/// The code of the level 0: what bitsandbytes puts in the spare low nibble of an odd count.
const ZERO_CODE: u8 = 7;

/// Two codes per byte (element 2k high), four bytes per little-endian word.
fn pack(codes: &[u8]) -> Vec<u32> {
    let bytes: Vec<u8> = codes
        .chunks(2)
        .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(ZERO_CODE))
        .collect();
    bytes
        .chunks(4)
        .map(|w| {
            let mut word = [0u8; 4];
            word[..w.len()].copy_from_slice(w);
            u32::from_le_bytes(word)
        })
        .collect()
}

/// The mean of `values`, summed exactly in f64 (f32 values of one tensor add up without loss
/// for any realistic count) and rounded once to f32.
fn mean_f32(values: &[f32]) -> f32 {
    (values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ascending_with_an_exact_zero_and_both_ends() {
        assert!(NF4_LEVELS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            (NF4_LEVELS[0], NF4_LEVELS[7], NF4_LEVELS[15]),
            (-1.0, 0.0, 1.0)
        );
    }

    #[test]
    fn each_level_times_absmax_comes_back_exactly() {
        // A block holding every level scaled by a power of two (exact products) and 48 zeros.
        let mut w: Vec<f32> = NF4_LEVELS.iter().map(|l| l * 4.0).collect();
        w.resize(64, 0.0);
        let q = Nf4Weight::quantize(&w, &[8, 8], 64, false).unwrap();
        assert_eq!(q.dequantize(), w);
        assert_eq!(q.scales(), &Scales::F32(vec![4.0]));
    }

    #[test]
    fn codes_pack_high_nibble_first_and_unpack_to_the_same() {
        let codes: Vec<u8> = (0..13).map(|i| (i * 7 % 16) as u8).collect();
        let w = Nf4Weight {
            shape: vec![13],
            blocksize: 64,
            words: pack(&codes),
            scales: Scales::F32(vec![1.0]),
        };
        assert_eq!(w.bytes()[0], (codes[0] << 4) | codes[1]);
        assert_eq!(w.bytes().len(), 7);
        assert_eq!(w.bytes()[6], (codes[12] << 4) | ZERO_CODE);
        assert_eq!((0..13).map(|i| w.code(i)).collect::<Vec<_>>(), codes);
        let back = Nf4Weight::from_parts(&[13], 64, w.bytes(), Scales::F32(vec![1.0])).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn error_is_at_most_half_the_widest_level_gap_times_absmax() {
        let w: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect();
        for dq in [false, true] {
            let q = Nf4Weight::quantize(&w, &[10, 100], 64, dq).unwrap();
            let absmax = q.scales().absmax();
            for (i, (&a, &b)) in w.iter().zip(&q.dequantize()).enumerate() {
                // Widest gap: −1 to −0.6962; double quantization adds its own small error.
                let bound = 0.152 * absmax[i / 64] + if dq { 0.01 } else { 0.0 };
                assert!((a - b).abs() <= bound, "{i} (dq {dq}): {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_input_is_refused_naming_what_was_expected() {
        let err = Nf4Weight::quantize(&[1.0; 10], &[3, 4], 64, false).unwrap_err();
        assert!(err.to_string().contains("12 values"), "{err}");
        let err = Nf4Weight::quantize(&[1.0; 12], &[3, 4], 48, false).unwrap_err();
        assert!(err.to_string().contains("blocksize 48"), "{err}");
        let err = Nf4Weight::quantize(&[1.0, f32::INFINITY], &[2], 64, false).unwrap_err();
        assert!(err.to_string().contains("value 1 is inf"), "{err}");
        let err = Nf4Weight::from_parts(&[3, 4], 64, &[0; 5], Scales::F32(vec![1.0])).unwrap_err();
        assert!(err.to_string().contains("6 bytes"), "{err}");
    }
}
