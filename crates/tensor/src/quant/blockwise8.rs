//! 8-bit blockwise quantization on bitsandbytes' dynamic map: how double quantization stores
//! the NF4 block scales.
//!
//! Each block of [`DYNAMIC_BLOCK`] values x stores its absolute maximum m and, per value, the
//! index of the nearest entry of the 256-entry map:
//!
//! ```text
//! q = argmin_i | x/m − DYN[i] |   (ties to the lower index)      x ≈ DYN[q] · m
//! ```

use crate::{Error, Result};

/// Values per block of the nested (double) quantization, as bitsandbytes fixes it.
pub const DYNAMIC_BLOCK: usize = 256;

/// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`, 7 exponent bits): for
/// each decade 10^(e−6), e = 0..6, the midpoints of 2^e + 1 evenly spaced points in [0.1, 1],
/// scaled by the decade, with both signs; plus 0 and 1. Sorted ascending, 256 values:
///
/// ```text
/// ±10^(e−6) · (0.1 + 0.9·(k + ½)/2^e),   e = 0..6, k = 0..2^e − 1;   0;   1
/// ```
///
/// Each value here is the exact one rounded once to f32. bitsandbytes builds the map at run time
/// with PyTorch's f32 `linspace`, whose last bit depends on the CPU's vector width: 72 of its
/// 256 entries differ from these by one ulp on an AVX2 machine. Files carry the map they were
/// quantized with (`nested_quant_map`), and dequantization uses that, so both stay exact.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for e in 0..7i32 {
        let points = 1u32 << e;
        let decade = 10f64.powi(e - 6);
        for k in 0..points {
            let mean = decade * (0.1 + 0.9 * (k as f64 + 0.5) / points as f64);
            data.push(mean as f32);
            data.push(-mean as f32);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into()
        .expect("the dynamic map has 2·127 + 2 = 256 entries")
}

/// Values quantized to 8 bits blockwise: one code per value, one f32 absmax per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Blockwise8 {
    /// One index into `map` per value.
    pub codes: Vec<u8>,
    /// One absolute maximum per block of `blocksize` values (the last block may be shorter).
    pub absmax: Vec<f32>,
    /// The 256 levels the codes index.
    pub map: [f32; 256],
    pub blocksize: usize,
}

impl Blockwise8 {
    /// Quantizes `values` blockwise on `map`, as bitsandbytes' CPU `quantize_blockwise` does:
    /// per block m = max |x| (f32), x/m by f32 division, the nearest level by distance with ties
    /// to the lower one. A block of zeros has m = 0, and every code rebuilds it exactly
    /// (`map[q]·0 = 0`): it gets the code of the level 0 (bitsandbytes divides 0 by 0 there, so its
    /// code for such a block is arbitrary; the dequantized values agree).
    pub fn quantize(values: &[f32], map: [f32; 256], blocksize: usize) -> Result<Blockwise8> {
        if blocksize == 0 {
            return Err(Error::Invalid(
                "8-bit blockwise quantization: blocksize 0".into(),
            ));
        }
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "8-bit blockwise quantization: value {i} is {}; expected finite values",
                values[i]
            )));
        }
        let zero = nearest(&map, 0.0);
        let mut codes = Vec::with_capacity(values.len());
        let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
        for block in values.chunks(blocksize) {
            let m = block.iter().fold(f32::MIN, |m, x| m.max(x.abs()));
            absmax.push(m);
            if m == 0.0 {
                codes.extend(std::iter::repeat_n(zero, block.len()));
            } else {
                codes.extend(block.iter().map(|&x| nearest(&map, x / m)));
            }
        }
        Ok(Blockwise8 {
            codes,
            absmax,
            map,
            blocksize,
        })
    }

    /// `x = map[q] · absmax[block]`, in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| self.map[q as usize] * self.absmax[i / self.blocksize])
            .collect()
    }
}

/// The index of the level of `map` (ascending) nearest to `x`: the last level ≤ x or the one
/// after it, whichever is strictly nearer (so ties go to the lower index).
fn nearest(map: &[f32; 256], x: f32) -> u8 {
    let left = map.partition_point(|&level| level <= x).saturating_sub(1);
    let pick = if left < 255 && (x - map[left + 1]).abs() < (x - map[left]).abs() {
        left + 1
    } else {
        left
    };
    pick as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_map_is_sorted_signed_and_ends_at_one() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(map[255], 1.0);
        assert!(map.contains(&0.0));
        // 127 negative and 127 positive levels besides 0 and 1.
        assert_eq!(map.iter().filter(|&&v| v < 0.0).count(), 127);
        // The smallest magnitude is the first midpoint of the 1e-6 decade: 1e-6 · 0.55.
        let smallest = map
            .iter()
            .filter(|&&v| v > 0.0)
            .fold(1.0f32, |a, &b| a.min(b));
        assert!((smallest - 0.55e-6).abs() < 1e-12, "{smallest}");
    }

    #[test]
    fn nearest_is_the_argmin_of_the_distance_with_ties_to_the_lower_index() {
        let map = dynamic_map();
        let brute = |x: f32| {
            (0..256)
                .min_by(|&a, &b| {
                    let (da, db) = ((x - map[a]).abs(), (x - map[b]).abs());
                    da.total_cmp(&db).then(a.cmp(&b))
                })
                .unwrap() as u8
        };
        let mids = map.windows(2).map(|w| (w[0] + w[1]) / 2.0);
        let probes = map
            .iter()
            .copied()
            .chain(mids)
            .chain((0..=2000).map(|i| i as f32 / 1000.0 - 1.0));
        for x in probes {
            assert_eq!(nearest(&map, x), brute(x), "x = {x}");
        }
    }

    #[test]
    fn round_trip_error_is_within_half_a_level_gap() {
        let values: Vec<f32> = (0..700)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let q = Blockwise8::quantize(&values, dynamic_map(), DYNAMIC_BLOCK).unwrap();
        assert_eq!(q.absmax.len(), 3);
        let back = q.dequantize();
        for (i, (&x, &y)) in values.iter().zip(&back).enumerate() {
            let m = q.absmax[i / DYNAMIC_BLOCK];
            // At most half the widest gap between levels (0.9/64, in the top decade).
            assert!((x - y).abs() <= 0.0071 * m, "{i}: {x} vs {y}");
        }
    }

    #[test]
    fn a_block_of_zeros_comes_back_as_zeros() {
        let mut values = vec![1.0f32; 300];
        values[256..].fill(0.0);
        let q = Blockwise8::quantize(&values, dynamic_map(), 256).unwrap();
        assert_eq!(q.absmax, vec![1.0, 0.0]);
        assert_eq!(q.dequantize(), values);
    }

    #[test]
    fn non_finite_values_are_refused_by_position() {
        let err = Blockwise8::quantize(&[1.0, f32::NAN], dynamic_map(), 256).unwrap_err();
        assert!(err.to_string().contains("value 1 is NaN"), "{err}");
    }
}
