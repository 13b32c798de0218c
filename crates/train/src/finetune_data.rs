//! The data of `train finetune`: a file in one of three formats, read into training examples
//! ([`crate::batch::Example`]: token ids and where the counted part starts).
//!
//! | format | an example | the loss counts |
//! |---|---|---|
//! | `text` | a window of up to `seq_len` tokens of the whole file | every token but the window's first |
//! | `jsonl` | a line `{"context": "…", "completion": "…"}` | the completion and the end-of-text after it |
//! | `e2e` | a line `context||completion` (E2E NLG's files) | the completion and the end-of-text after it |
//!
//! **Choosing the format** (`--format auto`, the default): a `.jsonl` extension means JSONL;
//! otherwise the first non-blank line decides: starting with `{`, JSONL; containing `||`, E2E;
//! anything else, plain text. `--format text|jsonl|e2e` overrides the guess.
//!
//! **Text** is tokenised whole (no token added) and cut into windows of `seq_len` tokens, each
//! starting on the last token of the one before, so that every token of the file but the first
//! is predicted exactly once; the last window may be shorter.
//!
//! **JSONL**: `enc(context) enc(completion) eot`, both strings taken as they are (put the space
//! between them where the tokenizer wants it). **E2E**: [`crate::e2e::example`]'s layout,
//! `enc(context + " ||") enc(" " + completion) eot`, both sides trimmed. In both, blank lines
//! are skipped and an example longer than `seq_len` is dropped (and counted), not truncated:
//! cutting the context would teach completions of facts the model was not given (see `e2e`).
//! `eot` is the tokenizer's end-of-text, or "\n" for a tokenizer without one.
//!
//! **Held out** (`--eval-every`): every twentieth example (0, 20, 40, …), 5 %, is kept out of
//! training and scored. Without evaluation every example trains.

use std::path::Path;

use transformer::Tokenizer;

use crate::batch::Example;
use crate::e2e::{end_of_text, example};

/// How to read the data file (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// By extension, then by the first non-blank line.
    Auto,
    /// Windows of the whole text, every token counted.
    Text,
    /// One `{"context": …, "completion": …}` a line, the completion counted.
    Jsonl,
    /// One `context||completion` a line, the completion counted.
    E2e,
}

impl Format {
    /// The name `--format` takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Text => "text",
            Format::Jsonl => "jsonl",
            Format::E2e => "e2e",
        }
    }
}

/// The examples of a data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The format the file was read as (never `Auto`).
    pub format: Format,
    pub examples: Vec<Example>,
    /// Examples dropped for being longer than `seq_len`.
    pub dropped: usize,
    /// FNV-1a hash of the file's bytes: a resumed run checks that it trains on the same data.
    pub fingerprint: u64,
}

/// Reads `path` as `format` into examples of at most `seq_len` tokens.
pub fn load(
    path: &Path,
    format: Format,
    tok: &Tokenizer,
    seq_len: usize,
) -> crate::Result<Dataset> {
    let name = path.display();
    let bytes = std::fs::read(path).map_err(|e| format!("{name}: {e}"))?;
    let fingerprint = fnv1a(&bytes);
    let text = utf8(path, bytes)?;
    if text.trim().is_empty() {
        return Err(format!("{name}: the file is empty: nothing to train on").into());
    }
    let format = match format {
        Format::Auto => detect(path, &text),
        chosen => chosen,
    };
    let (examples, dropped) = match format {
        Format::Text => (windows(&tok.encode(&text), seq_len), 0),
        Format::Jsonl | Format::E2e => {
            let eot = end_of_text(tok);
            let mut examples = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let at = |message: String| format!("{name} line {}: {message}", i + 1);
                let e = if format == Format::Jsonl {
                    let (context, completion) = jsonl_fields(line).map_err(at)?;
                    let mut ids = tok.encode(&context);
                    let completion_start = ids.len();
                    ids.extend(tok.encode(&completion));
                    ids.push(eot);
                    Example {
                        ids,
                        completion_start,
                    }
                } else {
                    let (context, completion) = e2e_fields(line).map_err(at)?;
                    example(tok, context.trim(), completion.trim())
                };
                examples.push(e);
            }
            let before = examples.len();
            examples.retain(|e| e.ids.len() <= seq_len);
            let dropped = before - examples.len();
            (examples, dropped)
        }
        Format::Auto => unreachable!("the format was resolved above"),
    };
    if examples.is_empty() {
        let why = if dropped > 0 {
            format!("each of its {dropped} examples is longer than {seq_len} tokens (--seq-len)")
        } else {
            "it holds fewer than 2 tokens: nothing to predict".to_string()
        };
        return Err(format!("{name}: no training example: {why}").into());
    }
    Ok(Dataset {
        format,
        examples,
        dropped,
        fingerprint,
    })
}

/// Splits off the held-out examples: every twentieth, from the first (5 %).
pub fn split_heldout(examples: Vec<Example>) -> (Vec<Example>, Vec<Example>) {
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if i % 20 == 0 {
            heldout.push(e);
        } else {
            train.push(e);
        }
    }
    (train, heldout)
}

/// The format `auto` picks for a file (see the module docs).
fn detect(path: &Path, text: &str) -> Format {
    if path.extension().is_some_and(|e| e == "jsonl") {
        return Format::Jsonl;
    }
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    match first {
        Some(l) if l.starts_with('{') => Format::Jsonl,
        Some(l) if l.contains("||") => Format::E2e,
        _ => Format::Text,
    }
}

/// Windows of `len` tokens, each starting on the last token of the one before; every counted.
fn windows(ids: &[u32], len: usize) -> Vec<Example> {
    let mut out = Vec::new();
    let mut start = 0;
    while start + 1 < ids.len() {
        let end = (start + len).min(ids.len());
        out.push(Example {
            ids: ids[start..end].to_vec(),
            completion_start: 0,
        });
        start = end - 1;
    }
    out
}

/// The `context` and `completion` strings of a JSONL line.
fn jsonl_fields(line: &str) -> Result<(String, String), String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let serde_json::Value::Object(object) = value else {
        let kind = json_kind(&value);
        return Err(format!(
            "expected a JSON object with string fields `context` and `completion`, found {kind}"
        ));
    };
    let field = |key: &str| match object.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("`{key}` is {}, not a string", json_kind(other))),
        None => Err(format!(
            "no `{key}` field (a line needs `context` and `completion`)"
        )),
    };
    Ok((field("context")?, field("completion")?))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The two sides of an E2E line `context||completion`.
fn e2e_fields(line: &str) -> Result<(&str, &str), String> {
    let Some((context, completion)) = line.split_once("||") else {
        return Err(
            "no `||` between context and completion (every line of an E2E file needs \
                    one; for plain text pass --format text)"
                .into(),
        );
    };
    if completion.contains("||") {
        return Err("more than one `||`".into());
    }
    Ok((context, completion))
}

/// The file as text, or an error naming the line of the first byte that is not UTF-8.
fn utf8(path: &Path, bytes: Vec<u8>) -> crate::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        format!(
            "{}: not UTF-8 text (line {line}, byte {at} is not valid UTF-8)",
            path.display()
        )
        .into()
    })
}

/// 64-bit FNV-1a: a quick fingerprint of the data, not a cryptographic hash.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(name: &str, content: &[u8], format: Format, seq_len: usize) -> crate::Result<Dataset> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        load(&path, format, &Tokenizer::bytes(), seq_len)
    }

    #[test]
    fn text_windows_predict_every_token_once() {
        let d = read("a.txt", b"abcdefghij", Format::Auto, 4).unwrap();
        assert_eq!(d.format, Format::Text);
        let got: Vec<&[u32]> = d.examples.iter().map(|e| &e.ids[..]).collect();
        let b = |s: &[u8]| s.iter().map(|&c| u32::from(c)).collect::<Vec<_>>();
        assert_eq!(got, [b(b"abcd"), b(b"defg"), b(b"ghij")]);
        let predicted: usize = d.examples.iter().map(|e| e.ids.len() - 1).sum();
        assert_eq!(predicted, 10 - 1);
    }

    #[test]
    fn formats_are_detected_and_long_examples_dropped() {
        let jsonl = br#"{"context": "Q: 1+1?", "completion": " 2"}

{"context": "Q: a long question?", "completion": " yes"}
"#;
        let d = read("x.txt", jsonl, Format::Auto, 12).unwrap();
        assert_eq!(
            (d.format, d.examples.len(), d.dropped),
            (Format::Jsonl, 1, 1)
        );
        assert_eq!(d.examples[0].completion_start, "Q: 1+1?".len());
        assert_eq!(d.examples[0].ids.len(), "Q: 1+1? 2\n".len());
        let d = read("x.txt", b"a : b||Hi .\nc : d || Yo .\n", Format::Auto, 64).unwrap();
        assert_eq!((d.format, d.examples.len()), (Format::E2e, 2));
        assert_eq!(d.examples[0], example(&Tokenizer::bytes(), "a : b", "Hi ."));
        let e = read("y.jsonl", b"{}", Format::Auto, 8).unwrap_err();
        assert!(e.to_string().contains("no `context` field"), "{e}");
        let forced = read("z.txt", b"a||b\n", Format::Text, 64).unwrap();
        assert_eq!(
            (forced.format, forced.examples[0].ids.len()),
            (Format::Text, 5)
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong_and_where() {
        let check = |name: &str, content: &[u8], want: &str| {
            let e = read(name, content, Format::Auto, 64)
                .unwrap_err()
                .to_string();
            assert!(e.contains(name) && e.contains(want), "{e}");
        };
        check("empty.txt", b"", "the file is empty");
        check("blank.txt", b" \n\n", "the file is empty");
        check("bin.txt", b"ok\nfine\n\xff\xfe", "not UTF-8 text (line 3");
        check("e2e.txt", b"a||b\nno bar here\n", "line 2: no `||`");
        check("arr.jsonl", b"[1, 2]\n", "line 1: expected a JSON object");
        check(
            "num.jsonl",
            b"{\"context\": 1, \"completion\": \"x\"}",
            "`context` is a number",
        );
        check("bad.jsonl", b"{\"context\": \"a\",\n", "line 1: not JSON");
        check("one.txt", b"a", "fewer than 2 tokens");
        check("long.jsonl", b"{\"context\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\", \"completion\": \"b\"}", "each of its 1 examples is longer than 64 tokens");
    }

    #[test]
    fn every_twentieth_example_is_held_out() {
        let examples: Vec<Example> = (0..41)
            .map(|i| Example {
                ids: vec![i, i],
                completion_start: 0,
            })
            .collect();
        let (train, heldout) = split_heldout(examples);
        let ids: Vec<u32> = heldout.iter().map(|e| e.ids[0]).collect();
        assert_eq!((train.len(), ids), (38, vec![0, 20, 40]));
    }
}
