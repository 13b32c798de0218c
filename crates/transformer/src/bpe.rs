//! GPT-2's byte-level BPE, built from Hugging Face's `vocab.json` + `merges.txt` (the same files
//! OpenAI published as `encoder.json` + `vocab.bpe`). Encoding a text takes four steps:
//!
//! 1. Pre-tokenise with GPT-2's regex ([`GPT2_PATTERN`]): words with their leading space,
//!    number runs, punctuation runs, whitespace, and the English contractions `'s 't 're ...`.
//!    Merges never cross these pieces.
//! 2. Each piece becomes its UTF-8 bytes, each byte one symbol. The files spell byte `b` as the
//!    printable character [`bytes_to_unicode`]`()[b]` (a space is `Ġ`, a newline `Ċ`), so every
//!    symbol is a readable JSON string.
//! 3. Repeatedly find the adjacent pair whose merge comes first in `merges.txt` (its rank is
//!    its line number) and fuse every occurrence of it, until no adjacent pair has a merge.
//!    This is OpenAI's `encoder.py`; `tiktoken` gets the same tokens for GPT-2.
//! 4. Each final symbol's id is its entry in `vocab.json`.
//!
//! We work with ids from step 2 on: a merge is `(left id, right id) -> (rank, merged id)`, and
//! loading checks that every byte and every merge result has an id, so encoding cannot fail.
//! Malformed files (not JSON, not an object, ids that are not u32, a merge line that is not two
//! symbols, a symbol missing from the vocabulary, a file over [`MAX_TOKENIZER_FILE_BYTES`]) are
//! errors naming the file and, for `merges.txt`, the line.

use std::collections::HashMap;
use std::path::Path;

use fancy_regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor_file::read_text;

/// The largest `vocab.json` or `merges.txt` read (64 MiB; GPT-2's are 1.0 MB and 0.5 MB).
pub const MAX_TOKENIZER_FILE_BYTES: u64 = 64 << 20;

/// GPT-2's pre-tokenisation regex, from OpenAI's `encoder.py`. `(?!\S)` keeps the last space of
/// a whitespace run for the next word, so `"a   b"` splits as `"a"`, `"  "`, `" b"`.
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The special token GPT-2 puts between documents.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// GPT-2's reversible byte → character table. The 188 printable bytes (`!`..`~`, `¡`..`¬`,
/// `®`..`ÿ`) stand for themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen) are
/// moved to U+0100 upwards, in byte order, so no symbol is whitespace or invisible.
pub fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next = 0x100;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// Symbol (as spelled in `vocab.json`) → id.
type Ids = HashMap<String, u32>;
/// Id → the raw bytes it stands for.
type TokenBytes = HashMap<u32, Vec<u8>>;
/// `(left id, right id)` → `(rank, merged id)`: lower rank merges first.
type Merges = HashMap<(u32, u32), (u32, u32)>;

/// A byte-level BPE tokenizer loaded from Hugging Face files.
#[derive(Clone, Debug)]
pub(crate) struct BytePairEncoder {
    /// The id of the one-byte symbol of each byte.
    byte_ids: [u32; 256],
    merges: Merges,
    token_bytes: TokenBytes,
    /// One past the largest id.
    vocab_size: usize,
    /// The id of `<|endoftext|>`, if the vocabulary has it.
    eot: Option<u32>,
    pattern: Regex,
}

impl BytePairEncoder {
    pub(crate) fn from_files(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let read = |p: &Path| read_text(p, MAX_TOKENIZER_FILE_BYTES);
        Self::from_strs(
            &read(vocab_path)?,
            vocab_path,
            &read(merges_path)?,
            merges_path,
        )
    }

    /// Parses the two files' contents; the paths are only used in error messages.
    pub(crate) fn from_strs(
        vocab: &str,
        vocab_path: &Path,
        merges: &str,
        merges_path: &Path,
    ) -> Result<Self> {
        let (ids, token_bytes) = parse_vocab(vocab, vocab_path)?;
        let mut byte_ids = [0u32; 256];
        for (b, c) in bytes_to_unicode().iter().enumerate() {
            byte_ids[b] = *ids.get(&c.to_string()).ok_or_else(|| {
                let m = format!(
                    "byte 0x{b:02x} (spelled `{c}`) has no id; byte-level BPE needs all 256"
                );
                Error::tokenizer(Some(vocab_path), m)
            })?;
        }
        let merges = parse_merges(merges, merges_path, &ids)?;
        let pattern = Regex::new(GPT2_PATTERN)
            .map_err(|e| Error::tokenizer(None, format!("GPT-2 regex: {e}")))?;
        Ok(BytePairEncoder {
            byte_ids,
            merges,
            vocab_size: token_bytes.keys().max().map_or(0, |&m| m as usize + 1),
            eot: ids.get(ENDOFTEXT).copied(),
            token_bytes,
            pattern,
        })
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub(crate) fn eot(&self) -> Option<u32> {
        self.eot
    }

    pub(crate) fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(&id).map(Vec::as_slice)
    }

    /// Encodes `text`, treating `<|endoftext|>` as ordinary characters.
    pub(crate) fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        // The pattern matches every character (each is whitespace, a letter, a digit or
        // "other"), so the pieces tile the text. fancy-regex may give up after too much
        // backtracking (GPT-2's pattern should never get there); then the rest of the text is
        // one piece: still an encoding that decodes to the same text, only split differently.
        let mut start = 0;
        for piece in self.pattern.find_iter(text) {
            let Ok(m) = piece else { break };
            self.encode_piece(&text.as_bytes()[start..m.start()], &mut ids); // empty: no gaps
            self.encode_piece(m.as_str().as_bytes(), &mut ids);
            start = m.end();
        }
        self.encode_piece(&text.as_bytes()[start..], &mut ids);
        ids
    }

    /// Steps 2 to 4 of the module docs on one pre-tokenised piece.
    fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        let mut word: Vec<u32> = piece.iter().map(|&b| self.byte_ids[b as usize]).collect();
        while word.len() > 1 {
            // The adjacent pair with the lowest rank, if any pair merges at all.
            let best = word
                .windows(2)
                .filter_map(|p| {
                    self.merges
                        .get(&(p[0], p[1]))
                        .map(|&(rank, _)| (rank, (p[0], p[1])))
                })
                .min();
            let Some((_, pair)) = best else { break };
            let merged = self.merges[&pair].1;
            // Fuse every occurrence of that pair, left to right.
            let mut fused = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
                    fused.push(merged);
                    i += 2;
                } else {
                    fused.push(word[i]);
                    i += 1;
                }
            }
            word = fused;
        }
        out.extend(word);
    }
}

/// `vocab.json`: `{"symbol": id, ...}` → (symbol → id, id → the bytes it stands for).
fn parse_vocab(text: &str, path: &Path) -> Result<(Ids, TokenBytes)> {
    let err = |m: String| Error::tokenizer(Some(path), m);
    let value: Value =
        serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let entries = value
        .as_object()
        .ok_or_else(|| err("expected a JSON object {\"symbol\": id, ...}".to_string()))?;
    let to_byte: HashMap<char, u8> = bytes_to_unicode().into_iter().zip(0..=255).collect();
    let mut ids = HashMap::with_capacity(entries.len());
    let mut token_bytes = HashMap::with_capacity(entries.len());
    for (symbol, id) in entries {
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| err(format!("entry `{symbol}`: expected a token id, found {id}")))?;
        // Each character through the byte table; a character outside it (possible only in
        // added tokens) stands for its own UTF-8.
        let mut bytes = Vec::with_capacity(symbol.len());
        for c in symbol.chars() {
            match to_byte.get(&c) {
                Some(&b) => bytes.push(b),
                None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        if token_bytes.insert(id, bytes).is_some() {
            return Err(err(format!(
                "id {id} is given to `{symbol}` and to another symbol"
            )));
        }
        ids.insert(symbol.clone(), id);
    }
    Ok((ids, token_bytes))
}

/// `merges.txt`: one merge `left right` a line, in rank order, after an optional
/// `#version` line → `(left id, right id) -> (rank, merged id)`.
fn parse_merges(text: &str, path: &Path, ids: &Ids) -> Result<Merges> {
    let mut merges = HashMap::new();
    let mut rank = 0u32;
    for (line_no, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || (line_no == 0 && line.starts_with("#version")) {
            continue;
        }
        let err = |m: &str| {
            let m = format!("line {}: `{line}`: {m}", line_no + 1);
            Error::tokenizer(Some(path), m)
        };
        let (left, right) = match line.split_once(' ') {
            Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => (l, r),
            _ => return Err(err("expected two symbols separated by one space")),
        };
        let id_of = |s: &str| {
            let m = format!("symbol `{s}` is not in vocab.json");
            ids.get(s).copied().ok_or_else(|| err(&m))
        };
        let pair = (id_of(left)?, id_of(right)?);
        let merged = id_of(&format!("{left}{right}"))?;
        merges.entry(pair).or_insert((rank, merged)); // a repeated merge keeps its first rank
        rank += 1;
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!((t[b'A' as usize], t[b'!' as usize]), ('A', '!'));
        assert_eq!((t[b' ' as usize], t[b'\n' as usize], t[0]), ('Ġ', 'Ċ', 'Ā'));
        let mut sorted = t.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256, "the table is reversible");
    }

    /// A vocabulary of the 256 bytes (ids 0..256 in byte order) plus `extra` symbols.
    fn tiny(extra: &[&str], merges: &str) -> Result<BytePairEncoder> {
        let mut vocab: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        vocab.extend(extra.iter().map(|s| s.to_string()));
        let json: serde_json::Map<String, Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, Value::from(i)))
            .collect();
        let text = Value::Object(json).to_string();
        BytePairEncoder::from_strs(
            &text,
            Path::new("vocab.json"),
            merges,
            Path::new("merges.txt"),
        )
    }

    #[test]
    fn merges_apply_by_rank_within_pieces() {
        // ids: 256 = "Ġt", 257 = "Ġth", 258 = "he", 259 = "Ġthe"; rank order as listed.
        let merges = "#version: 0.2\nĠ t\nĠt h\nh e\nĠth e\n";
        let bpe = tiny(&["Ġt", "Ġth", "he", "Ġthe", ENDOFTEXT], merges).unwrap();
        // " the": Ġ t → Ġt (rank 0), then Ġt h (rank 1), then Ġth e (rank 3).
        assert_eq!(bpe.encode_ordinary(" the"), vec![259]);
        // "he the": the piece "he" merges (rank 2); " the" as above.
        assert_eq!(bpe.encode_ordinary("he the"), vec![258, 259]);
        // "the" has no leading space: "t" stays alone, "he" merges.
        assert_eq!(bpe.encode_ordinary("the"), vec![b't' as u32, 258]);
        assert_eq!(bpe.eot(), Some(260));
        assert_eq!(bpe.vocab_size(), 261);
        assert_eq!(bpe.token_bytes(259), Some(&b" the"[..]));
    }

    #[test]
    fn bad_files_are_errors_naming_file_and_line() {
        let e = tiny(&["ab"], "#version: 0.2\na b\nb c\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "merges.txt: line 3: `b c`: symbol `bc` is not in vocab.json"
        );
        let e = tiny(&[], "a b c\n").unwrap_err().to_string();
        assert!(e.contains("line 1: `a b c`: expected two symbols"), "{e}");
        let no_newline = r#"{"a": 0}"#;
        let e = BytePairEncoder::from_strs(no_newline, Path::new("v.json"), "", Path::new("m.txt"));
        assert!(
            e.unwrap_err()
                .to_string()
                .starts_with("v.json: byte 0x00 (spelled `Ā`) has no id")
        );
        let e =
            BytePairEncoder::from_strs(r#"{"a": -1}"#, Path::new("v.json"), "", Path::new("m.txt"));
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("entry `a`: expected a token id, found -1")
        );
    }
}
