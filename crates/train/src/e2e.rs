//! The E2E NLG data: the split, the training examples, the batches and their order.
//!
//! **Data.** `data/e2e/valid.txt` and `test.txt`, one `MR||reference` pair a line, e.g.
//! `name : Alimentum | area : city centre | family friendly : no||Alimentum is not family - friendly …`.
//! The meaning representation (MR) lists a restaurant's attributes; the reference is a sentence a
//! person wrote for it. An MR has several references (1 to 45 here).
//!
//! **Split** (shared by every implementation, so held-out sets are identical): pool `valid.txt`
//! then `test.txt`, list the distinct MRs in order of first appearance, and hold out every tenth
//! one (positions 0, 10, 20, …). That gives 118 held-out MRs with 972 references, scored with
//! BLEU, and 1,059 training MRs with 8,393 (MR, reference) pairs. (`valid.txt` alone only has coffee
//! shops serving Chinese or English food, which is why the two files are pooled.)
//!
//! **Example layout.** One sequence per pair, context then completion:
//!
//! ```text
//! enc(MR + " ||")   enc(" " + reference)   eot
//! └── context ──┘   └──────── completion ────┘
//!                   ↑ completion_start
//! ```
//!
//! `eot` is the tokenizer's end-of-text (50256 for GPT-2); a tokenizer without one (bytes) ends
//! the completion with "\n" (byte 10) instead, so in both cases generation stops on a token the
//! references never contain.
//!
//! **Loss mask.** Position j predicts token j + 1. Only predictions of completion tokens count
//! (weight 1): the model is taught to write the sentence, not to reproduce MRs. A batch is
//! right-padded to its longest sequence; pad positions have weight 0, and since attention is
//! causal no real token ever attends to a pad, so no attention mask is needed.
//!
//! **Too long.** A pair longer than the model's context (`max_len` tokens) is dropped, not
//! truncated, and counted: cutting the left of the context would cut the restaurant's name, and
//! the model would learn to write sentences about facts it was not given. The reference recipe
//! drops them too. With GPT-2's BPE and 128 positions one training pair of 8,393 is dropped (133
//! tokens; the median is 64); with bytes and 512 positions, two.
//!
//! **Order.** [`Batches`] deals out batches of example indices forever, epoch after epoch, each
//! epoch a fresh seeded shuffle. With length bucketing on, each chunk of `k` batches' worth of the
//! shuffled order is sorted by length before it is cut into batches (and the batches of the epoch
//! are then shuffled), so that a batch holds sequences of similar length and wastes less on
//! padding, while every epoch still sees each example exactly once and in a random mix. On the
//! training pairs with GPT-2's BPE and batches of 16, padding is 26% of the positions without
//! bucketing and 6% with `k = 8`. The same seed gives the same order (`rand`'s `StdRng`, which may
//! change between `rand` versions).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use transformer::Tokenizer;

/// The E2E pairs split into training pairs and held-out MRs (see the module docs).
#[derive(Debug, Clone)]
pub struct E2eData {
    train: Vec<(String, String)>,
    heldout: Vec<(String, Vec<String>)>,
}

impl E2eData {
    /// Read `valid.txt` then `test.txt` of `dir` (normally `data/e2e`) and split them.
    pub fn load(dir: impl AsRef<Path>) -> crate::Result<Self> {
        let mut pairs = read_pairs(&dir.as_ref().join("valid.txt"))?;
        pairs.extend(read_pairs(&dir.as_ref().join("test.txt"))?);
        Ok(Self::split(pairs))
    }

    /// Split pooled (MR, reference) pairs: every tenth distinct MR, from the first, is held out.
    /// Pairs keep their order; held-out MRs keep the order of first appearance.
    pub fn split(pairs: Vec<(String, String)>) -> Self {
        // Each distinct MR's position in order of first appearance.
        let mut position: HashMap<&str, usize> = HashMap::new();
        for (mr, _) in &pairs {
            let next = position.len();
            position.entry(mr).or_insert(next);
        }
        let mut train = Vec::new();
        let mut heldout: Vec<(String, Vec<String>)> = Vec::new();
        let mut slot: HashMap<&str, usize> = HashMap::new(); // MR → its index in `heldout`
        for (mr, reference) in &pairs {
            let held_out = position[mr.as_str()].is_multiple_of(10);
            if !held_out {
                train.push((mr.clone(), reference.clone()));
                continue;
            }
            let i = *slot.entry(mr).or_insert_with(|| {
                heldout.push((mr.clone(), Vec::new()));
                heldout.len() - 1
            });
            heldout[i].1.push(reference.clone());
        }
        E2eData { train, heldout }
    }

    /// The (MR, reference) pairs to fine-tune on, in file order.
    pub fn train_pairs(&self) -> &[(String, String)] {
        &self.train
    }

    /// The held-out MRs, each with all its references, in order of first appearance.
    /// Keep only the first `n` held-out MRs (a quicker evaluation; the split is unchanged).
    pub fn limit_heldout(&mut self, n: usize) {
        self.heldout.truncate(n);
    }

    pub fn heldout(&self) -> &[(String, Vec<String>)] {
        &self.heldout
    }

    /// The distinct reference sentences of the training pairs, in order of first appearance:
    /// in-domain text without MRs, for pretraining. Nothing from the held-out MRs.
    pub fn train_references(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.train
            .iter()
            .map(|(_, r)| r.as_str())
            .filter(|r| seen.insert(*r))
            .collect()
    }
}

/// The (MR, reference) pairs of one file, both trimmed; blank lines are skipped.
fn read_pairs(path: &Path) -> crate::Result<Vec<(String, String)>> {
    let name = path.display();
    let bytes = fs::read(path).map_err(|e| format!("{name}: {e}"))?;
    let mut pairs = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(line)
            .map_err(|e| format!("{name} line {}: not UTF-8 ({e})", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let Some((mr, reference)) = line.split_once("||") else {
            return Err(format!("{name} line {}: no `||` between MR and reference", i + 1).into());
        };
        if reference.contains("||") {
            return Err(format!("{name} line {}: more than one `||`", i + 1).into());
        }
        pairs.push((mr.trim().to_string(), reference.trim().to_string()));
    }
    if pairs.is_empty() {
        return Err(format!("{name}: no MR||reference line").into());
    }
    Ok(pairs)
}

/// The token that ends a completion: the tokenizer's end-of-text, or "\n" if it has none.
pub fn end_of_text(tok: &Tokenizer) -> u32 {
    tok.eot().unwrap_or_else(|| match tok.encode("\n")[..] {
        [nl] => nl,
        ref ids => panic!("\"\\n\" should be one token, not {ids:?}"),
    })
}

/// One training sequence: context then completion (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Context and completion tokens.
    pub ids: Vec<u32>,
    /// Index in `ids` of the first completion token.
    pub completion_start: usize,
}

/// The example of one pair: `enc(MR + " ||")`, then `enc(" " + reference)` and end-of-text.
pub fn example(tok: &Tokenizer, mr: &str, reference: &str) -> Example {
    let mut ids = tok.encode(&format!("{mr} ||"));
    let completion_start = ids.len();
    ids.extend(tok.encode(&format!(" {reference}")));
    ids.push(end_of_text(tok));
    Example {
        ids,
        completion_start,
    }
}

/// The examples of `pairs` that fit in `max_len` tokens, and how many were dropped for not fitting.
pub fn examples(
    tok: &Tokenizer,
    pairs: &[(String, String)],
    max_len: usize,
) -> (Vec<Example>, usize) {
    let (kept, dropped): (Vec<Example>, Vec<Example>) = pairs
        .iter()
        .map(|(mr, reference)| example(tok, mr, reference))
        .partition(|e| e.ids.len() <= max_len);
    (kept, dropped.len())
}

/// A right-padded batch, row-major `[b, t]`, in the layout `Gpt2::loss` takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Input tokens.
    pub ids: Vec<u32>,
    /// `targets[j] = ids[j + 1]` within a sequence; `pad` past its end.
    pub targets: Vec<u32>,
    /// 1 where the target is a completion token, else 0.
    pub weights: Vec<f32>,
    /// Sequences.
    pub b: usize,
    /// Positions per sequence: the longest sequence's length.
    pub t: usize,
    /// Each sequence's length before padding.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// The number of targets the loss counts (completion tokens).
    pub fn completion_tokens(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }

    /// The number of pad positions: work spent on nothing.
    pub fn padding(&self) -> usize {
        self.b * self.t - self.lengths.iter().sum::<usize>()
    }
}

/// Right-pad `examples` with `pad` to the longest and mask the loss to completion tokens.
pub fn batch(examples: &[&Example], pad: u32) -> Batch {
    assert!(!examples.is_empty(), "a batch needs an example");
    let b = examples.len();
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad; b * t];
    let mut targets = vec![pad; b * t];
    let mut weights = vec![0.0f32; b * t];
    for (row, e) in examples.iter().enumerate() {
        let n = e.ids.len();
        let at = row * t;
        ids[at..at + n].copy_from_slice(&e.ids);
        targets[at..at + n - 1].copy_from_slice(&e.ids[1..]);
        // Position j predicts token j + 1, so the completion is predicted from the last
        // context token (completion_start - 1) to the last but one token (n - 2).
        let first = e.completion_start.saturating_sub(1);
        for w in &mut weights[at + first..at + n - 1] {
            *w = 1.0;
        }
    }
    Batch {
        ids,
        targets,
        weights,
        b,
        t,
        lengths: examples.iter().map(|e| e.ids.len()).collect(),
    }
}

/// Batches of example indices, epoch after epoch, in a seeded random order (module docs).
#[derive(Debug, Clone)]
pub struct Batches {
    lengths: Vec<usize>,
    batch_size: usize,
    bucket: usize,
    rng: StdRng,
    epoch: usize,
    queue: Vec<Vec<usize>>,
}

impl Batches {
    /// Batches of `batch_size` over examples of the given lengths, shuffled with `seed`.
    pub fn new(lengths: Vec<usize>, batch_size: usize, seed: u64) -> Self {
        assert!(
            !lengths.is_empty() && batch_size > 0,
            "need examples and a batch size"
        );
        Batches {
            lengths,
            batch_size,
            bucket: 1,
            rng: StdRng::seed_from_u64(seed),
            epoch: 0,
            queue: Vec::new(),
        }
    }

    /// Sort by length within chunks of `k` batches of the shuffled order (`k = 1`: no bucketing).
    pub fn with_buckets(mut self, k: usize) -> Self {
        self.bucket = k.max(1);
        self
    }

    /// Epochs started so far (1 during the first).
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// The next batch's example indices. The last batch of an epoch may be smaller.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.queue.is_empty() {
            self.queue = self.epoch_batches();
            self.queue.reverse(); // popped from the back
            self.epoch += 1;
        }
        self.queue.pop().expect("an epoch has a batch")
    }

    /// One epoch: a shuffle, optionally sorted by length within chunks, cut into batches.
    fn epoch_batches(&mut self) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        order.shuffle(&mut self.rng);
        if self.bucket == 1 {
            return order
                .chunks(self.batch_size)
                .map(<[usize]>::to_vec)
                .collect();
        }
        for chunk in order.chunks_mut(self.bucket * self.batch_size) {
            chunk.sort_by_key(|&i| self.lengths[i]); // stable: ties keep the shuffled order
        }
        let mut batches: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        batches.shuffle(&mut self.rng);
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(mrs: &[&str]) -> Vec<(String, String)> {
        mrs.iter()
            .map(|m| (m.to_string(), format!("about {m}")))
            .collect()
    }

    #[test]
    fn every_tenth_distinct_mr_is_held_out() {
        // 25 distinct MRs, the first one three times: MRs 0, 10 and 20 are held out.
        let names: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
        let mut mrs: Vec<&str> = names.iter().map(String::as_str).collect();
        mrs.extend(["m0", "m0", "m11"]);
        let data = E2eData::split(pairs(&mrs));
        let held: Vec<&str> = data.heldout().iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(held, ["m0", "m10", "m20"]);
        assert_eq!(data.heldout()[0].1.len(), 3);
        assert_eq!(data.train_pairs().len(), 28 - 5);
        assert_eq!(data.train_references().len(), 22); // "about m11" twice
    }

    #[test]
    fn read_errors_name_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("e2e-read-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let check = |content: &[u8], want: &str| {
            let path = dir.join("x.txt");
            fs::write(&path, content).unwrap();
            let err = read_pairs(&path).unwrap_err().to_string();
            assert!(err.contains("x.txt") && err.contains(want), "{err}");
        };
        check(b"a||b\nno separator\n", "line 2: no `||`");
        check(b"a||b\n\xff||c\n", "line 2: not UTF-8");
        check(b"a||b||c\n", "line 1: more than one");
        check(b"\n \n", "no MR||reference line");
        fs::write(dir.join("x.txt"), "  a : 1 | b : 2 || A is 1 . \r\n\n").unwrap();
        let got = read_pairs(&dir.join("x.txt")).unwrap();
        assert_eq!(got, [("a : 1 | b : 2".into(), "A is 1 .".into())]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn example_layout_with_bytes_ends_in_newline() {
        let e = example(&Tokenizer::bytes(), "a : b", "Hi .");
        assert_eq!(e.ids, b"a : b || Hi .\n".map(u32::from));
        assert_eq!(e.completion_start, "a : b ||".len());
    }

    #[test]
    fn batch_pads_right_and_weights_only_completion_targets() {
        let a = Example {
            ids: vec![1, 2, 3, 4, 5],
            completion_start: 3,
        };
        let b = Example {
            ids: vec![6, 7, 8],
            completion_start: 2,
        };
        let got = batch(&[&a, &b], 0);
        assert_eq!((got.b, got.t), (2, 5));
        assert_eq!(got.ids, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0]);
        assert_eq!(got.targets, [2, 3, 4, 5, 0, 7, 8, 0, 0, 0]);
        // a: targets 4, 5 (from positions 2, 3); b: target 8 (from position 1).
        assert_eq!(got.weights, [0., 0., 1., 1., 0., 0., 1., 0., 0., 0.]);
        assert_eq!((got.completion_tokens(), got.padding()), (3, 2));
    }

    #[test]
    fn too_long_examples_are_dropped_and_counted() {
        let tok = Tokenizer::bytes();
        let p = vec![("ab".to_string(), "c".to_string()); 2];
        let (kept, dropped) = examples(&tok, &p, 7); // "ab || c\n" is 8 bytes
        assert_eq!((kept.len(), dropped), (0, 2));
        assert_eq!(examples(&tok, &p, 8).0.len(), 2);
    }

    #[test]
    fn batches_cover_each_epoch_once_and_repeat_with_the_seed() {
        let lengths: Vec<usize> = (0..50).map(|i| (i * 37) % 23).collect();
        for k in [1, 3] {
            let mut a = Batches::new(lengths.clone(), 8, 5).with_buckets(k);
            let mut b = Batches::new(lengths.clone(), 8, 5).with_buckets(k);
            for epoch in 1..=3 {
                let mut seen: Vec<usize> = Vec::new();
                for _ in 0..7 {
                    let x = a.next_batch();
                    assert_eq!(x, b.next_batch());
                    seen.extend(x);
                }
                assert_eq!(a.epoch(), epoch);
                seen.sort();
                assert_eq!(seen, (0..50).collect::<Vec<_>>());
            }
        }
        let first = |seed| Batches::new(lengths.clone(), 8, seed).next_batch();
        assert_ne!(first(5), first(6));
    }

    #[test]
    fn bucketing_sorts_within_a_chunk() {
        let lengths: Vec<usize> = (0..64).rev().collect();
        let mut bucketed = Batches::new(lengths.clone(), 4, 1).with_buckets(16);
        for _ in 0..16 {
            // One chunk is the whole epoch: batches are the length-sorted runs of 4.
            let batch = bucketed.next_batch();
            let mut lens: Vec<usize> = batch.iter().map(|&i| lengths[i]).collect();
            lens.sort();
            assert_eq!(lens[3] - lens[0], 3, "{lens:?}");
        }
    }
}
