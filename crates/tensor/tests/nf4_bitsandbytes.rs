//! NF4 quantization against bitsandbytes 0.50 itself: codes, scales and dequantized weights bit
//! for bit. The fixture and the script that made it: tests/fixtures/nf4/.

use std::collections::HashMap;

use safetensors::SafeTensors;
use tensor::quant::{Blockwise8, DYNAMIC_BLOCK, Nf4Weight, Scales, dynamic_map};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nf4/nf4.safetensors"
);

struct Case {
    shape: Vec<usize>,
    blocksize: usize,
    double_quant: bool,
}

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Fixture {
        Fixture {
            bytes: std::fs::read(FIXTURE).unwrap(),
        }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn cases(&self) -> HashMap<String, Case> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        meta.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "bitsandbytes" | "torch"))
            .map(|(name, v)| {
                let parts: Vec<&str> = v.split(';').collect();
                let shape = parts[0]
                    .trim_matches(['[', ']'])
                    .split(',')
                    .map(|d| d.trim().parse().unwrap())
                    .collect();
                let case = Case {
                    shape,
                    blocksize: parts[1].parse().unwrap(),
                    double_quant: parts[2] == "1",
                };
                (name.clone(), case)
            })
            .collect()
    }

    fn bytes_of(&self, name: &str) -> Vec<u8> {
        self.tensors().tensor(name).unwrap().data().to_vec()
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(self.tensors().tensor(name).unwrap().data())
    }

    fn has(&self, name: &str) -> bool {
        self.tensors().tensor(name).is_ok()
    }
}

/// The input of `c_proj_dq`, rebuilt as make.py's `pseudo_normal(768·768, seed 1, 0.035)`.
fn pseudo_normal(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let splitmix = |i: u64| {
        let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..n as u64)
        .map(|j| {
            let s: i64 = (0..4)
                .map(|k| (splitmix((seed << 32) + 4 * j + k) >> 42) as i64)
                .sum();
            (s - (1 << 23)) as f32 * 2f32.powi(-22) * scale
        })
        .collect()
}

fn input(fx: &Fixture, name: &str, case: &Case) -> Vec<f32> {
    if fx.has(&format!("{name}.input")) {
        fx.f32s(&format!("{name}.input"))
    } else {
        let n = case.shape.iter().product();
        let w = pseudo_normal(n, 1, 0.035);
        let sum: f64 = w.iter().map(|&x| x as f64).sum();
        assert!(
            (sum - 2.928_858_817_282_830_7).abs() < 1e-9,
            "generated input differs: sum {sum}"
        );
        w
    }
}

#[test]
fn the_dynamic_map_is_bitsandbytes_within_one_ulp() {
    let fx = Fixture::load();
    let theirs = fx.f32s("normal_dq.nested_quant_map");
    for (i, (a, b)) in dynamic_map().iter().zip(&theirs).enumerate() {
        let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
        assert!(ulps <= 1, "entry {i}: ours {a}, bitsandbytes {b}");
    }
}

#[test]
fn codes_scales_and_dequantized_weights_equal_bitsandbytes_bit_for_bit() {
    let fx = Fixture::load();
    let cases = fx.cases();
    assert_eq!(cases.len(), 7, "fixture cases");
    for (name, case) in &cases {
        let w = input(&fx, name, case);
        let plain = Nf4Weight::quantize(&w, &case.shape, case.blocksize, false).unwrap();
        same(
            name,
            "codes",
            plain.bytes(),
            &fx.bytes_of(&format!("{name}.codes")),
        );
        let Scales::F32(absmax) = plain.scales() else {
            unreachable!()
        };
        if case.double_quant {
            // The offset: the exact mean rounded once, against PyTorch's f32 sum (see quant's doc).
            let offset = fx.f32s(&format!("{name}.offset"))[0];
            let ours = Nf4Weight::quantize(&w, &case.shape, case.blocksize, true).unwrap();
            let Scales::Double {
                offset: our_offset, ..
            } = ours.scales()
            else {
                unreachable!()
            };
            let ulps = (our_offset.to_bits() as i64 - offset.to_bits() as i64).abs();
            assert!(ulps <= 1, "{name}: offset {our_offset} vs {offset}");
            // Given bitsandbytes' offset and map: the same nested scales, and the same codes up
            // to bitsandbytes' near-tie slips (see `nearest_or_equal`).
            let map: [f32; 256] = fx
                .f32s(&format!("{name}.nested_quant_map"))
                .try_into()
                .unwrap();
            let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let nested = Blockwise8::quantize(&centred, map, DYNAMIC_BLOCK).unwrap();
            nearest_or_equal(
                name,
                &nested,
                &centred,
                &fx.bytes_of(&format!("{name}.absmax")),
            );
            same(
                name,
                "nested absmax",
                &bits(&nested.absmax),
                &bits(&fx.f32s(&format!("{name}.nested_absmax"))),
            );
            // With our own offset and map, each block scale is within one level of the nested
            // map (its widest gap is 0.9/64 of the nested absmax) of bitsandbytes'.
            let nested_absmax = fx.f32s(&format!("{name}.nested_absmax"));
            let theirs = their_weight(&fx, name, case).scales().absmax();
            for (i, (a, b)) in ours.scales().absmax().iter().zip(&theirs).enumerate() {
                let level = 0.9 / 64.0 * nested_absmax[i / DYNAMIC_BLOCK];
                assert!(
                    (a - b).abs() <= level * 1.001,
                    "{name}: block {i} scale {a} vs {b}"
                );
            }
        } else {
            same(
                name,
                "absmax",
                &bits(absmax),
                &bits(&fx.f32s(&format!("{name}.absmax"))),
            );
        }
        // Dequantizing bitsandbytes' own tensors gives bitsandbytes' weights.
        if fx.has(&format!("{name}.dequantized")) {
            let theirs = their_weight(&fx, name, case);
            same(
                name,
                "dequantized",
                &bits(&theirs.dequantize()),
                &bits(&fx.f32s(&format!("{name}.dequantized"))),
            );
        }
    }
}

/// Our nested codes against bitsandbytes': equal, except where bitsandbytes' CPU kernel (its
/// bucketed binary search) resolves a near-tie to the farther of two neighbouring levels; there
/// ours must be the neighbour, and strictly nearer.
fn nearest_or_equal(case: &str, ours: &Blockwise8, values: &[f32], theirs: &[u8]) {
    assert_eq!(
        ours.codes.len(),
        theirs.len(),
        "{case}: nested codes: lengths"
    );
    let mut differ = 0;
    for (i, (&a, &b)) in ours.codes.iter().zip(theirs).enumerate() {
        if a == b {
            continue;
        }
        differ += 1;
        let x = values[i] / ours.absmax[i / ours.blocksize];
        let (da, db) = (
            (x - ours.map[a as usize]).abs(),
            (x - ours.map[b as usize]).abs(),
        );
        assert!(
            a.abs_diff(b) == 1 && da < db,
            "{case}: nested code {i}: ours {a} (distance {da}), bitsandbytes {b} (distance {db})"
        );
    }
    // Near-ties only: a few per thousand.
    assert!(
        differ * 200 <= theirs.len(),
        "{case}: {differ} of {} nested codes differ",
        theirs.len()
    );
}

/// Equal slices, or a panic naming how many entries differ and the first few.
fn same<T: PartialEq + std::fmt::Debug>(case: &str, what: &str, ours: &[T], theirs: &[T]) {
    assert_eq!(ours.len(), theirs.len(), "{case}: {what}: lengths");
    let diff: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    let first: Vec<String> = diff
        .iter()
        .take(5)
        .map(|&i| format!("[{i}] {:?} vs {:?}", ours[i], theirs[i]))
        .collect();
    assert!(
        diff.is_empty(),
        "{case}: {what}: {} of {} differ (ours vs bitsandbytes): {}",
        diff.len(),
        ours.len(),
        first.join(", ")
    );
}

/// bitsandbytes' quantized tensors of a case, read into an [`Nf4Weight`].
fn their_weight(fx: &Fixture, name: &str, case: &Case) -> Nf4Weight {
    let scales = if case.double_quant {
        let map: [f32; 256] = fx
            .f32s(&format!("{name}.nested_quant_map"))
            .try_into()
            .unwrap();
        Scales::Double {
            nested: Box::new(Blockwise8 {
                codes: fx.bytes_of(&format!("{name}.absmax")),
                absmax: fx.f32s(&format!("{name}.nested_absmax")),
                map,
                blocksize: DYNAMIC_BLOCK,
            }),
            offset: fx.f32s(&format!("{name}.offset"))[0],
        }
    } else {
        Scales::F32(fx.f32s(&format!("{name}.absmax")))
    };
    Nf4Weight::from_parts(
        &case.shape,
        case.blocksize,
        &fx.bytes_of(&format!("{name}.codes")),
        scales,
    )
    .unwrap()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}
