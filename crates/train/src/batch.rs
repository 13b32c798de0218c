//! Training examples, the right-padded batches a step takes, and the order batches are drawn in:
//! the same for every data set ([`crate::e2e`], [`crate::finetune_data`]).
//!
//! An [`Example`] is a sequence of token ids and the index where the part the loss counts (the
//! completion) starts.
//!
//! **Loss mask** ([`batch`]). Position j predicts token j + 1. Only predictions of completion
//! tokens count (weight 1): the model is taught to write the completion, not to reproduce its
//! context (for E2E, the meaning representation). A batch is right-padded to its longest sequence; pad positions have weight 0, and since attention is
//! causal no real token ever attends to a pad, so no attention mask is needed.
//!
//! **Order.** [`Batches`] deals out batches of example indices forever, epoch after epoch, each
//! epoch a fresh seeded shuffle. With length bucketing on, each chunk of `k` batches' worth of the
//! shuffled order is sorted by length before it is cut into batches (and the batches of the epoch
//! are then shuffled), so that a batch holds sequences of similar length and wastes less on
//! padding, while every epoch still sees each example exactly once and in a random mix. On the
//! E2E training pairs with GPT-2's BPE and batches of 16, padding is 26% of the positions without
//! bucketing and 6% with `k = 8`. The same seed gives the same order (`rand`'s `StdRng`, which may
//! change between `rand` versions).

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// One training sequence: context then completion; the loss counts the completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Context and completion tokens.
    pub ids: Vec<u32>,
    /// Index in `ids` of the first completion token.
    pub completion_start: usize,
}

/// A right-padded batch, row-major `[b, t]`, in the layout [`transformer::Gpt2::loss`] takes.
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
