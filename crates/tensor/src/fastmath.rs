//! Vectorised row kernels of the CPU backend: max, `exp` and sums over long rows.
//!
//! A softmax over GPT-2's 50,257-token vocabulary costs one `exp` per logit, tens of millions
//! per training step. glibc's `expf` is a scalar call of ~15 cycles; the loops here evaluate
//! `exp` eight lanes at a time (AVX2 + FMA when the CPU has them, chosen at run time, plain
//! SSE2 code otherwise), which makes the softmax part of a step several times cheaper.
//!
//! `exp(x)`, range reduction (Cody–Waite): write x = n·ln2 + r with n = round(x/ln2) and
//! |r| ≤ ln2/2, so exp(x) = 2ⁿ·exp(r). exp(r) is its Taylor polynomial of degree 7 (the first
//! omitted term, r⁸/8! ≤ 5.6e-9, is below half an f32 ulp of exp(r) ≥ 0.7), and 2ⁿ is built
//! by writing n + 127 into the exponent bits. ln2 is split into a high part with trailing zero
//! bits (n·LN2_HI is exact for |n| < 2⁹) and a low part, so r keeps its precision. Inputs below
//! −87.3 (where exp underflows to subnormals) give 0, inputs above 88.7 give +inf; NaN stays
//! NaN. Measured error: ≤ 2 ulp against f64 (see the tests).
//!
//! Sums run in eight f32 lanes over blocks of 256 elements, and the blocks' sums are added in
//! f64: the rounding error of a 50,257-term sum stays at the level of a few ulp.

/// ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 trailing zero bits, so n·LN2_HI is exact for |n| ≤ 2⁹.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1 / ln 2.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// 1.5·2²³: adding and subtracting it rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND: f32 = 12_582_912.0;
/// Below this, exp(x) < 2⁻¹²⁶ (the smallest normal f32): the result is flushed to 0.
const EXP_LO: f32 = -87.336_54;
/// Above this, exp(x) overflows f32.
const EXP_HI: f32 = 88.722_83;
/// Lanes of the vectorised loops (one AVX register of f32).
const LANES: usize = 8;
/// Elements per block of a sum: each lane adds 32 terms in f32 before the block goes to f64.
const BLOCK: usize = 256;

/// exp(x) by range reduction and a polynomial (module doc); branch-free, so loops over it
/// vectorise.
#[inline(always)]
// max/min map to one vector instruction each; clamp's NaN propagation is not needed here
// (NaN is handled at the end).
#[allow(clippy::manual_clamp)]
pub fn exp(x: f32) -> f32 {
    let xc = x.max(EXP_LO).min(EXP_HI);
    // k = ROUND + n, whose bits hold n as an integer: its ulp is 1 at that magnitude.
    let k = xc * LOG2_E + ROUND;
    let n = k - ROUND;
    let ni = k.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Horner form of 1 + r + r²/2! + … + r⁷/7!.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2ⁿ as 2^h·2^(n−h) with h = ⌊n/2⌋, each written as an exponent field (h + 127): n spans
    // [−126, 128] after the clamp, which a single field could not hold at either end.
    let h = ni >> 1;
    let two_h = f32::from_bits(((h + 127) as u32) << 23);
    let two_rest = f32::from_bits(((ni - h + 127) as u32) << 23);
    let y = p * two_h * two_rest;
    let y = if x < EXP_LO { 0.0 } else { y };
    let y = if x > EXP_HI { f32::INFINITY } else { y };
    if x.is_nan() { x } else { y }
}

/// Defines `pub fn $name` that runs `$generic` compiled for AVX-512F when the CPU has it, else
/// for AVX2 + FMA when it has those (checked at run time; std caches the answer), else as plain
/// code. `$generic` is
/// `#[inline(always)]`, so both copies come from the same source.
macro_rules! multiversion {
    ($(#[$doc:meta])* $vis:vis $name:ident => $generic:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, and with it AVX2 and FMA (checked here).
                    if std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                    {
                        return unsafe { avx512($($arg),*) };
                    }
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// The largest element of `row` (`f32::MIN` for an empty row; NaNs are skipped).
    pub max => max_generic(row: &[f32]) -> f32
}

#[inline(always)]
fn max_generic(row: &[f32]) -> f32 {
    let mut lanes = [f32::MIN; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let tail = chunks.remainder().iter().copied().fold(f32::MIN, f32::max);
    lanes.into_iter().fold(tail, f32::max)
}

multiversion! {
    /// Replace every x of `row` by exp(x − m) and return the sum of the new values (in f64).
    pub exp_sub_sum => exp_sub_sum_generic(row: &mut [f32], m: f32) -> f64
}

#[inline(always)]
fn exp_sub_sum_generic(row: &mut [f32], m: f32) -> f64 {
    let mut total = 0.0f64;
    for block in row.chunks_mut(BLOCK) {
        let mut lanes = [0.0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                let e = exp(c[l] - m);
                c[l] = e;
                lanes[l] += e;
            }
        }
        let mut s = 0.0f32;
        for x in chunks.into_remainder() {
            *x = exp(*x - m);
            s += *x;
        }
        total += (lanes.iter().sum::<f32>() + s) as f64;
    }
    total
}

multiversion! {
    /// The sum of exp(x − m) over `row`, in f64, without writing anything.
    pub sum_exp_sub => sum_exp_sub_generic(row: &[f32], m: f32) -> f64
}

#[inline(always)]
fn sum_exp_sub_generic(row: &[f32], m: f32) -> f64 {
    let mut total = 0.0f64;
    for block in row.chunks(BLOCK) {
        let mut lanes = [0.0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                lanes[l] += exp(c[l] - m);
            }
        }
        let s: f32 = chunks.remainder().iter().map(|&x| exp(x - m)).sum();
        total += (lanes.iter().sum::<f32>() + s) as f64;
    }
    total
}

multiversion! {
    /// Σ a_i·b_i over equal-length slices, in f32 lanes per block and f64 across blocks.
    pub dot => dot_generic(a: &[f32], b: &[f32]) -> f64
}

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for (ba, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut lanes = [0.0f32; LANES];
        let (ca, cb) = (ba.chunks_exact(LANES), bb.chunks_exact(LANES));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..LANES {
                lanes[l] += x[l] * y[l];
            }
        }
        let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
        total += (lanes.iter().sum::<f32>() + tail) as f64;
    }
    total
}

multiversion! {
    /// Multiply every element of `row` by `k`.
    pub scale => scale_generic(row: &mut [f32], k: f32) -> ()
}

#[inline(always)]
fn scale_generic(row: &mut [f32], k: f32) {
    for x in row {
        *x *= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Distance in units in the last place between an f32 and the f64 truth.
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_its_range() {
        let mut worst = (0.0f64, 0.0f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = EXP_LO + (EXP_HI - EXP_LO) * i as f32 / n as f32;
            let u = ulps(exp(x), (x as f64).exp());
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2.0, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn exp_limits() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // Just inside the range: finite, close to the truth.
        assert!(ulps(exp(88.7), (88.7f32 as f64).exp()) <= 2.0);
        assert!(ulps(exp(-87.3), (-87.3f32 as f64).exp()) <= 2.0);
    }

    proptest! {
        #[test]
        fn row_kernels_match_plain_loops(
            row in proptest::collection::vec(-30.0f32..30.0, 0..2000),
            k in -3.0f32..3.0,
        ) {
            let m = max(&row);
            prop_assert_eq!(m, row.iter().copied().fold(f32::MIN, f32::max));
            let want: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
            let got = sum_exp_sub(&row, m);
            prop_assert!((got - want).abs() <= 1e-6 * want.max(1.0), "{got} vs {want}");
            let mut e = row.clone();
            let s = exp_sub_sum(&mut e, m);
            prop_assert_eq!(s, got);
            for (y, x) in e.iter().zip(&row) {
                prop_assert!(ulps(*y, ((x - m) as f64).exp()) <= 2.0);
            }
            let other: Vec<f32> = row.iter().map(|x| x * 0.5 - 1.0).collect();
            let want_dot: f64 = row.iter().zip(&other).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got_dot = dot(&row, &other);
            let size: f64 = row.iter().zip(&other).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum();
            prop_assert!((got_dot - want_dot).abs() <= 1e-6 * size.max(1.0), "{got_dot} vs {want_dot}");
            let mut scaled = row.clone();
            scale(&mut scaled, k);
            for (y, x) in scaled.iter().zip(&row) {
                prop_assert_eq!(*y, x * k);
            }
        }
    }
}
