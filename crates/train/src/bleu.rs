//! Corpus BLEU-4 with several references per hypothesis, as `sacrebleu` computes it.
//!
//! This is `sacrebleu.corpus_bleu(hyps, ref_streams, tokenize='none')` with its defaults
//! (sacrebleu 2.x: 4-gram, `smooth_method='exp'`, `effective_order=False`, closest reference
//! length, case-sensitive), written out so the number we print is the number the literature prints.
//!
//! **Tokens.** Each sentence is split on whitespace, nothing else (`tokenize='none'`; the E2E data
//! is already space-tokenised: `family - friendly .`).
//!
//! **Counts, summed over the corpus.** For each order n = 1..4 and each hypothesis,
//! `total_n` gains the hypothesis' number of n-grams and `correct_n` its *clipped* matches: an
//! n-gram that occurs k times in the hypothesis counts min(k, m) times, where m is the largest
//! number of times it occurs in any *one* reference. `c` (sys_len) adds the hypothesis lengths and
//! `r` (ref_len) the length of the reference closest in length to each hypothesis (a tie goes to
//! the shorter one).
//!
//! **Score.**
//!
//! ```text
//! p_n  = correct_n / total_n
//! BP   = min(1, e^{1 − r/c})                 (0 when c = 0)
//! BLEU = 100 · BP · exp(Σ_{n=1..4} ¼ · log p_n)
//! ```
//!
//! Three edge rules, all sacrebleu's: no match of any order gives 0; an order the corpus has no
//! n-gram of at all (every hypothesis shorter than n words) gives 0; and an order with n-grams but
//! no match is *smoothed* ("exp", the NIST rule): the k-th such order counts as
//! p_n = 1 / (2^k · total_n) instead of 0. Precisions are reported ×100, as sacrebleu does.
//!
//! Adding a reference can only add matches (each precision rises or stays), but it can *lower*
//! the score: a new reference closer in length to a hypothesis can make r exceed c, so the
//! brevity penalty drops (see the test `a_longer_reference_can_lower_the_score`).

use std::collections::HashMap;
use std::fmt;

/// The largest n-gram order counted.
pub const MAX_ORDER: usize = 4;

/// A corpus BLEU score and the statistics it is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    /// BLEU on a 0–100 scale.
    pub score: f64,
    /// p_1..p_4 ×100, smoothed where `correct` is 0 (and 0 from the first order with no n-gram).
    pub precisions: [f64; MAX_ORDER],
    /// The brevity penalty, in (0, 1].
    pub bp: f64,
    /// c: the number of hypothesis words.
    pub sys_len: usize,
    /// r: the summed length of the reference closest to each hypothesis.
    pub ref_len: usize,
    /// Clipped n-gram matches, n = 1..4.
    pub correct: [usize; MAX_ORDER],
    /// Hypothesis n-grams, n = 1..4.
    pub total: [usize; MAX_ORDER],
}

impl fmt::Display for Bleu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [p1, p2, p3, p4] = self.precisions;
        write!(
            f,
            "BLEU {:.2} ({p1:.1}/{p2:.1}/{p3:.1}/{p4:.1}, BP {:.3}, {}/{} words)",
            self.score, self.bp, self.sys_len, self.ref_len
        )
    }
}

/// Corpus BLEU-4 of `hyps[i]` against the references `refs[i]` (any number, at least one each).
///
/// # Panics
/// If the two slices differ in length or a hypothesis has no reference: both are caller bugs
/// (sacrebleu raises on them too).
pub fn corpus_bleu<H, V, R>(hyps: &[H], refs: &[V]) -> Bleu
where
    H: AsRef<str>,
    V: AsRef<[R]>,
    R: AsRef<str>,
{
    assert_eq!(
        hyps.len(),
        refs.len(),
        "one list of references per hypothesis"
    );
    let mut correct = [0; MAX_ORDER];
    let mut total = [0; MAX_ORDER];
    let (mut sys_len, mut ref_len) = (0, 0);
    for (i, (hyp, refs)) in hyps.iter().zip(refs).enumerate() {
        let refs: Vec<Vec<&str>> = refs.as_ref().iter().map(|r| words(r.as_ref())).collect();
        assert!(!refs.is_empty(), "hypothesis {i} has no reference");
        let hyp = words(hyp.as_ref());
        sys_len += hyp.len();
        ref_len += closest_length(hyp.len(), &refs);
        for n in 1..=MAX_ORDER {
            let best = max_reference_counts(&refs, n);
            for (gram, count) in ngram_counts(&hyp, n) {
                total[n - 1] += count;
                correct[n - 1] += count.min(best.get(gram).copied().unwrap_or(0));
            }
        }
    }
    from_counts(correct, total, sys_len, ref_len)
}

/// The score from summed counts: BP, smoothed precisions and their geometric mean.
fn from_counts(
    correct: [usize; MAX_ORDER],
    total: [usize; MAX_ORDER],
    sys_len: usize,
    ref_len: usize,
) -> Bleu {
    let bp = match (sys_len, ref_len) {
        (0, _) => 0.0,
        (c, r) if c < r => (1.0 - r as f64 / c as f64).exp(),
        _ => 1.0,
    };
    let mut precisions = [0.0; MAX_ORDER];
    let mut smooth = 1.0;
    if correct.iter().any(|&c| c > 0) {
        for n in 0..MAX_ORDER {
            if total[n] == 0 {
                break; // this order and the ones above stay 0, so the score is 0
            }
            precisions[n] = if correct[n] == 0 {
                smooth *= 2.0;
                100.0 / (smooth * total[n] as f64)
            } else {
                100.0 * correct[n] as f64 / total[n] as f64
            };
        }
    }
    // sacrebleu takes log 0 as -9999999999, whose exp is exactly 0.
    let score = if precisions.contains(&0.0) {
        0.0
    } else {
        let mean_log = precisions.iter().map(|p| p.ln()).sum::<f64>() / MAX_ORDER as f64;
        bp * mean_log.exp()
    };
    Bleu {
        score,
        precisions,
        bp,
        sys_len,
        ref_len,
        correct,
        total,
    }
}

/// Whitespace-separated words, as Python's `str.split()` finds them (which also splits on the
/// ASCII separators U+001C..U+001F, which Rust does not count as whitespace).
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .filter(|w| !w.is_empty())
        .collect()
}

/// How often each n-gram of `words` occurs.
fn ngram_counts<'a>(words: &'a [&'a str], n: usize) -> HashMap<&'a [&'a str], usize> {
    let mut counts = HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

/// For each n-gram, the most times it occurs in any one reference (the clipping limit).
fn max_reference_counts<'a>(refs: &'a [Vec<&'a str>], n: usize) -> HashMap<&'a [&'a str], usize> {
    let mut best: HashMap<&[&str], usize> = HashMap::new();
    for r in refs {
        for (gram, count) in ngram_counts(r, n) {
            let m = best.entry(gram).or_insert(0);
            *m = (*m).max(count);
        }
    }
    best
}

/// The length of the reference closest to `hyp_len`; on a tie, the shorter.
fn closest_length(hyp_len: usize, refs: &[Vec<&str>]) -> usize {
    refs.iter()
        .map(|r| r.len())
        .min_by_key(|&len| (len.abs_diff(hyp_len), len))
        .expect("at least one reference")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn identical_hypothesis_scores_100() {
        let b = corpus_bleu(
            &["the cat sat on the mat ."],
            &[["the cat sat on the mat ."]],
        );
        assert_eq!((b.bp, b.precisions), (1.0, [100.0; 4]));
        assert!(close(b.score, 100.0), "{b}"); // 100.00000000000004 here, as in sacrebleu
    }

    #[test]
    fn no_overlap_scores_0() {
        let b = corpus_bleu(&["a b c d e"], &[["v w x y z"]]);
        assert_eq!((b.score, b.correct, b.total), (0.0, [0; 4], [5, 4, 3, 2]));
    }

    #[test]
    fn worked_example_with_two_references() {
        // hyp  "the cat sat on the mat"        (6 words)
        // ref1 "the cat is on the mat"         (6 words)
        // ref2 "there is a cat on the mat"     (7 words)
        // 1-grams: the ×2 (ref1 has 2 → 2), cat, on, mat match; sat does not       → 5/6
        // 2-grams: the cat, on the, the mat match; cat sat, sat on do not           → 3/5
        // 3-grams: only "on the mat"                                                → 1/4
        // 4-grams: none of 3; the first zero order is smoothed to 1/(2·3)           → 1/6
        // r = 6 (closest to c = 6), BP = 1.
        // BLEU = 100 · (5/6 · 3/5 · 1/4 · 1/6)^¼ = 100 · (1/48)^¼ ≈ 37.99
        let b = corpus_bleu(
            &["the cat sat on the mat"],
            &[["the cat is on the mat", "there is a cat on the mat"]],
        );
        assert_eq!((b.correct, b.total), ([5, 3, 1, 0], [6, 5, 4, 3]));
        assert_eq!((b.sys_len, b.ref_len, b.bp), (6, 6, 1.0));
        let want = [500.0 / 6.0, 60.0, 25.0, 100.0 / 6.0];
        assert!(b.precisions.iter().zip(want).all(|(&p, w)| close(p, w)));
        assert!(close(b.score, 100.0 * 48f64.powf(-0.25)), "{b}");
    }

    #[test]
    fn brevity_penalty_and_closest_length_tie_goes_to_the_shorter() {
        // c = 4; references of 2 and 6 words are both 2 away: r = 2 ≤ c, so BP = 1.
        let b = corpus_bleu(&["a b c d"], &[["a b", "a b c d e f"]]);
        assert_eq!((b.ref_len, b.bp), (2, 1.0));
        // Only the 6-word reference: r = 6 > c = 4, BP = e^{1 − 6/4}.
        let b = corpus_bleu(&["a b c d"], &[["a b c d e f"]]);
        assert_eq!((b.correct, b.total), ([4, 3, 2, 1], [4, 3, 2, 1]));
        assert!(close(b.bp, (-0.5f64).exp()) && close(b.score, 100.0 * (-0.5f64).exp()));
    }

    #[test]
    fn an_order_without_any_ngram_scores_0() {
        // Three words have no 4-gram: total_4 = 0, so BLEU is 0 despite perfect matches.
        let b = corpus_bleu(&["a b c"], &[["a b c"]]);
        assert_eq!((b.score, b.total), (0.0, [3, 2, 1, 0]));
    }

    #[test]
    fn clipping_counts_the_best_single_reference() {
        // "the" ×3 in the hypothesis; ref1 has it twice, ref2 once: 2 matches, not 3.
        let b = corpus_bleu(&["the the the"], &[["the the cat", "the dog"]]);
        assert_eq!(b.correct[0], 2);
    }

    /// Values printed by sacrebleu 2.6.0, `corpus_bleu(hyps, streams, tokenize='none')`, streams
    /// padded with None, on this three-sentence corpus (BP < 1, a tab and a U+001F between words).
    #[test]
    fn matches_sacrebleu_on_a_small_corpus() {
        let hyps = [
            "the quick brown fox jumps over the lazy dog",
            "a\tfast brown fox\u{1f}leaps",
            "hello there general kenobi",
        ];
        let refs = [
            vec![
                "the quick brown fox jumped over the lazy dog",
                "a quick brown fox jumps over a lazy dog today",
            ],
            vec!["a quick brown fox leaps over the dog"],
            vec![
                "hello there",
                "general kenobi , hello there",
                "well hello there",
            ],
        ];
        let b = corpus_bleu(&hyps, &refs);
        assert_eq!((b.sys_len, b.ref_len), (18, 20));
        assert_eq!((b.correct, b.total), ([17, 12, 7, 4], [18, 15, 12, 9]));
        assert!(close(b.bp, 0.8948393168143697), "{b}");
        assert!(close(b.score, 59.53128093185688), "{b}");
    }

    #[test]
    fn a_longer_reference_can_lower_the_score() {
        // c = 10, r = 5: BP = 1. An 11-word reference with no shared word is now the closest:
        // r = 11 > c, BP = e^{−0.1}, and the score falls although no precision did.
        let hyp = ["a b c d e f g h i j"];
        let one = corpus_bleu(&hyp, &[vec!["a b c d e"]]);
        let two = corpus_bleu(&hyp, &[vec!["a b c d e", "x x x x x x x x x x x"]]);
        assert_eq!(one.precisions, two.precisions);
        assert!(close(two.score, one.score * (-0.1f64).exp()));
    }

    /// Adding a reference never lowers a precision, and never lowers the score when the new
    /// reference is as long as one already there (so r, and BP, cannot change).
    #[test]
    fn adding_a_reference_never_lowers_precisions_or_a_same_length_score() {
        let mut rng = StdRng::seed_from_u64(7);
        let vocab = ["a", "b", "c", "d", "e"];
        let sentence = |rng: &mut StdRng, len: usize| -> String {
            let w: Vec<&str> = (0..len).map(|_| vocab[rng.random_range(0..5)]).collect();
            w.join(" ")
        };
        for _ in 0..300 {
            let n = rng.random_range(1..4);
            let hyps: Vec<String> = (0..n)
                .map(|_| {
                    let len = rng.random_range(4..12);
                    sentence(&mut rng, len)
                })
                .collect();
            let refs: Vec<Vec<String>> = (0..n)
                .map(|_| {
                    let len = rng.random_range(4..12);
                    vec![sentence(&mut rng, len)]
                })
                .collect();
            let before = corpus_bleu(&hyps, &refs);
            let (mut any, mut same) = (refs.clone(), refs.clone());
            let i = rng.random_range(0..n);
            let any_len = rng.random_range(1..14);
            any[i].push(sentence(&mut rng, any_len));
            let same_len = words(&refs[i][0]).len();
            same[i].push(sentence(&mut rng, same_len));
            let any = corpus_bleu(&hyps, &any);
            let same = corpus_bleu(&hyps, &same);
            for b in [&any, &same] {
                assert!(b.correct.iter().zip(before.correct).all(|(&a, b)| a >= b));
            }
            assert_eq!(same.ref_len, before.ref_len);
            assert!(same.score >= before.score, "{before} → {same}");
        }
    }
}
