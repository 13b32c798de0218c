//! The E2E NLG data: the split and the training examples.
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
//! **Too long.** A pair longer than the model's context (`max_len` tokens) is dropped, not
//! truncated, and counted: cutting the left of the context would cut the restaurant's name, and
//! the model would learn to write sentences about facts it was not given. The reference recipe
//! drops them too. With GPT-2's BPE and 128 positions one training pair of 8,393 is dropped (133
//! tokens; the median is 64); with bytes and 512 positions, two.
//!
//! The examples are batched and ordered as every training set is: see [`crate::batch`].

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

use transformer::Tokenizer;

use crate::batch::Example;

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

    /// Drop the training pairs whose reference leaves out a slot value the MR gives and a
    /// sentence states word for word: the name, the food, the `near` landmark (matched ignoring
    /// case, as [`crate::slots`] scores outputs). Returns how many were dropped.
    ///
    /// The E2E references were crowd-sourced and about one in seven omits the food or the
    /// landmark; a model trained on them learns to omit it as often, and greedy decoding then
    /// leaves the food out of about one output in ten. Training only on the references that
    /// state these values is the E2E authors' own remedy (Dušek, Howcroft and Rieser, "Semantic
    /// Noise Matters for Neural Natural Language Generation", INLG 2019, cleaned the set the
    /// same way). Held-out MRs keep every reference.
    pub fn keep_faithful(&mut self) -> usize {
        const CHECKED: [&str; 3] = ["name", "food", "near"];
        let before = self.train.len();
        self.train.retain(|(mr, r)| {
            let r = r.to_lowercase();
            crate::slots::slots(mr)
                .filter(|(k, _)| CHECKED.contains(k))
                .all(|(_, v)| r.contains(&v.to_lowercase()))
        });
        before - self.train.len()
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

    /// The same distinct references grouped by their MR (groups in order of the MR's first
    /// appearance, references in file order within a group). Text in which several sentences in a
    /// row describe one restaurant: a model pretrained on it learns to repeat the name and the
    /// food it read a sentence earlier, the copying that fine-tuning then points at the MR.
    pub fn train_references_by_mr(&self) -> Vec<Vec<&str>> {
        let mut seen = HashSet::new();
        let mut group: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<Vec<&str>> = Vec::new();
        for (mr, r) in &self.train {
            if !seen.insert(r.as_str()) {
                continue;
            }
            let g = *group.entry(mr.as_str()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(r.as_str());
        }
        groups
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
    fn keep_faithful_drops_references_that_omit_a_value() {
        let p = |m: &str, r: &str| (m.to_string(), r.to_string());
        let mut data = E2eData::split(vec![
            p("name : H", "held out"),
            p("name : A | food : Fast food", "A serves fast food ."),
            p("name : A | food : Fast food", "A is cheap ."),
            p("name : B | near : C | area : riverside", "B is near C ."),
        ]);
        assert_eq!(data.keep_faithful(), 1);
        assert_eq!(data.train_pairs().len(), 2);
        assert_eq!(data.heldout().len(), 1);
    }

    #[test]
    fn references_group_by_their_mr() {
        let p = |m: &str, r: &str| (m.to_string(), r.to_string());
        // "h" is MR 0, held out; "a" has two distinct references, one of them twice.
        let data = E2eData::split(vec![
            p("h", "0"),
            p("a", "x"),
            p("b", "y"),
            p("a", "z"),
            p("a", "x"),
        ]);
        assert_eq!(data.train_references_by_mr(), [vec!["x", "z"], vec!["y"]]);
    }

    #[test]
    fn read_errors_name_the_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
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
    }

    #[test]
    fn example_layout_with_bytes_ends_in_newline() {
        let e = example(&Tokenizer::bytes(), "a : b", "Hi .");
        assert_eq!(e.ids, b"a : b || Hi .\n".map(u32::from));
        assert_eq!(e.completion_start, "a : b ||".len());
    }

    #[test]
    fn too_long_examples_are_dropped_and_counted() {
        let tok = Tokenizer::bytes();
        let p = vec![("ab".to_string(), "c".to_string()); 2];
        let (kept, dropped) = examples(&tok, &p, 7); // "ab || c\n" is 8 bytes
        assert_eq!((kept.len(), dropped), (0, 2));
        assert_eq!(examples(&tok, &p, 8).0.len(), 2);
    }
}
