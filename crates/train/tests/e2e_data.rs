//! The shipped E2E data: the split's counts, the example lengths, and BLEU of the trivial
//! baselines on the held-out MRs against the numbers sacrebleu 2.6.0 gives for them.

use std::path::PathBuf;

use train::batch::{Batches, batch};
use train::bleu::corpus_bleu;
use train::e2e::{E2eData, examples};
use transformer::Tokenizer;

fn data() -> E2eData {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/e2e");
    E2eData::load(dir).expect("data/e2e loads")
}

#[test]
fn the_split_has_the_shared_counts() {
    let d = data();
    let held_refs: usize = d.heldout().iter().map(|(_, r)| r.len()).sum();
    assert_eq!((d.heldout().len(), held_refs), (118, 972));
    let mut train_mrs: Vec<&str> = d.train_pairs().iter().map(|(m, _)| m.as_str()).collect();
    train_mrs.sort();
    train_mrs.dedup();
    assert_eq!((train_mrs.len(), d.train_pairs().len()), (1059, 8393));
    assert_eq!(d.train_references().len(), 8095);
    let (first, refs) = &d.heldout()[0];
    assert_eq!(
        (first.as_str(), refs.len()),
        (
            "name : Alimentum | area : city centre | family friendly : no",
            6
        )
    );
    assert!(
        train_mrs
            .iter()
            .all(|m| d.heldout().iter().all(|(h, _)| h != m))
    );
}

/// How many examples fit a 128-token context with GPT-2's tokenizer (and 512 with bytes), and
/// padding over an epoch with and without length bucketing (printed with `--nocapture`).
#[test]
fn gpt2_examples_fit_and_bucketing_cuts_padding() {
    let d = data();
    let tok = Tokenizer::gpt2();
    let (ex, dropped) = examples(&tok, d.train_pairs(), 128);
    assert_eq!((ex.len(), dropped), (8392, 1)); // one reference of 84 words: 133 tokens
    let longest = ex.iter().map(|e| e.ids.len()).max().unwrap();
    let lengths: Vec<usize> = ex.iter().map(|e| e.ids.len()).collect();
    let tokens: usize = lengths.iter().sum();
    let pad_fraction = |k| {
        let mut order = Batches::new(lengths.clone(), 16, 0).with_buckets(k);
        let mut padding = 0;
        for _ in 0..ex.len().div_ceil(16) {
            let chosen: Vec<_> = order.next_batch().iter().map(|&i| &ex[i]).collect();
            padding += batch(&chosen, 50256).padding();
        }
        assert_eq!(order.epoch(), 1);
        padding as f64 / (tokens + padding) as f64
    };
    let (plain, bucketed) = (pad_fraction(1), pad_fraction(8));
    println!(
        "{} examples, {tokens} tokens, longest {longest}; padding {:.1}% plain, {:.1}% bucketed (8 batches)",
        ex.len(),
        100.0 * plain,
        100.0 * bucketed
    );
    assert!(longest <= 128 && bucketed < plain / 2.0);

    let (_, dropped_bytes) = examples(&Tokenizer::bytes(), d.train_pairs(), 512);
    assert_eq!(dropped_bytes, 2);
}

/// sacrebleu 2.6.0 on the same 118 MRs, as the PyTorch recipe's `baselines` command scores them.
#[test]
fn baseline_bleu_matches_sacrebleu() {
    let d = data();
    let refs: Vec<&[String]> = d.heldout().iter().map(|(_, r)| r.as_slice()).collect();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;

    // The first reference of the training MR with the most references, for every MR.
    let mut counts = std::collections::HashMap::new();
    let mut most = ("", 0);
    for (mr, _) in d.train_pairs() {
        let c = counts.entry(mr.as_str()).or_insert(0);
        *c += 1;
        if *c > most.1 {
            most = (mr.as_str(), *c);
        }
    }
    let constant = &d.train_pairs().iter().find(|(m, _)| m == most.0).unwrap().1;
    let b = corpus_bleu(&vec![constant; refs.len()], &refs);
    assert_eq!(
        (b.correct, b.total),
        ([1305, 504, 183, 88], [2478, 2360, 2242, 2124])
    );
    assert_eq!((b.sys_len, b.ref_len), (2478, 2770));
    assert!(close(b.score, 12.412718381965764), "{b}");

    // The MR's values joined by spaces.
    let values: Vec<String> = d
        .heldout()
        .iter()
        .map(|(mr, _)| {
            let v: Vec<&str> = mr
                .split(" | ")
                .map(|kv| kv.split_once(" : ").unwrap().1)
                .collect();
            v.join(" ")
        })
        .collect();
    let b = corpus_bleu(&values, &refs);
    assert_eq!((b.sys_len, b.ref_len), (1367, 2525));
    assert!(close(b.score, 13.54695304970005), "{b}");

    // One human reference against the others, for MRs with at least two.
    let (hyps, rest): (Vec<&String>, Vec<&[String]>) = refs
        .iter()
        .filter(|r| r.len() >= 2)
        .map(|r| (&r[0], &r[1..]))
        .unzip();
    let b = corpus_bleu(&hyps, &rest);
    assert_eq!((hyps.len(), b.sys_len, b.ref_len), (117, 3202, 3132));
    assert!(close(b.score, 56.82899681779071), "{b}");
}
