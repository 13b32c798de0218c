//! TIES-merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
//! Models") as PEFT 0.21 applies it in `add_weighted_adapter(combination_type="ties")`
//! (`utils/merge_utils.py`), to the A's and, separately, the B's of the adapters:
//!
//! 1. **trim**: each tensor tᵢ keeps its k = ⌊density·n⌋ entries of largest |value| (n its
//!    size), the others become 0 (density ≥ 1: nothing is trimmed);
//! 2. **elect**: per entry, the majority sign is that of Σᵢ tᵢ (`total`) or of Σᵢ sgn(tᵢ)
//!    (`frequency`), + when the sum is ≥ 0; computed from the trimmed tensors *before* the
//!    weights, as PEFT does;
//! 3. **disjoint merge**: the mean of the weighted entries wᵢ·tᵢ whose sign is the majority's
//!    (a trimmed 0 has sign 0 and never counts), over their count (at least 1).
//!
//! The weights are PEFT's `linear` ones: sgn(wᵢsᵢ)·√|wᵢsᵢ| for A, √|wᵢsᵢ| for B.

/// How the majority sign of an entry is elected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MajoritySign {
    /// The sign of the sum of the values.
    Total,
    /// The sign that most tensors have there.
    Frequency,
}

impl MajoritySign {
    /// PEFT's `majority_sign_method`.
    pub fn name(self) -> &'static str {
        match self {
            MajoritySign::Total => "total",
            MajoritySign::Frequency => "frequency",
        }
    }
}

/// Step 1: `t` with all but its ⌊density·n⌋ largest-magnitude entries set to 0.
pub fn trim(t: &[f64], density: f64) -> Vec<f64> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0.0; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Steps 1–3 on tensors of one shape with their weights.
pub fn ties(
    tensors: &[Vec<f64>],
    weights: &[f64],
    density: f64,
    majority: MajoritySign,
) -> Vec<f64> {
    let trimmed: Vec<Vec<f64>> = tensors.iter().map(|t| trim(t, density)).collect();
    let n = tensors.first().map_or(0, Vec::len);
    (0..n)
        .map(|e| {
            let elect: f64 = trimmed
                .iter()
                .map(|t| match majority {
                    MajoritySign::Total => t[e],
                    MajoritySign::Frequency => sign(t[e]),
                })
                .sum();
            let want = if elect >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0.0, 0.0);
            for (t, w) in trimmed.iter().zip(weights) {
                if sign(t[e]) == want {
                    sum += w * t[e];
                    count += 1.0;
                }
            }
            sum / f64::max(count, 1.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_keeps_the_largest_magnitudes() {
        assert_eq!(trim(&[0.1, -3.0, 2.0, -0.5], 0.5), [0.0, -3.0, 2.0, 0.0]);
        assert_eq!(trim(&[0.1, -3.0], 1.0), [0.1, -3.0]);
        assert_eq!(trim(&[0.1, -3.0, 2.0], 0.5), [0.0, -3.0, 0.0]); // ⌊1.5⌋ = 1
    }

    #[test]
    fn entries_against_the_majority_are_dropped_and_the_rest_averaged() {
        let t = [
            vec![1.0, -2.0, 0.0],
            vec![3.0, 1.0, 0.0],
            vec![-1.0, 4.0, 0.0],
        ];
        let w = [1.0, 0.5, 2.0];
        // Entry 0: total 3 → +; the + entries are 1·1 and 0.5·3: mean 1.25.
        // Entry 1: total 3 → +; 0.5·1 and 2·4: mean 4.25. Entry 2: all 0 → 0.
        assert_eq!(ties(&t, &w, 1.0, MajoritySign::Total), [1.25, 4.25, 0.0]);
        // Frequency, entry 1: signs −, +, + → +, the same; entry 0: +, +, − → +.
        assert_eq!(
            ties(&t, &w, 1.0, MajoritySign::Frequency),
            [1.25, 4.25, 0.0]
        );
        let t = [vec![1.0], vec![1.0], vec![-5.0]];
        assert_eq!(ties(&t, &[1.0; 3], 1.0, MajoritySign::Total), [-5.0]);
        assert_eq!(ties(&t, &[1.0; 3], 1.0, MajoritySign::Frequency), [1.0]);
    }
}
