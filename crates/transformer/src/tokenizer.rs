//! Text ↔ token ids: one byte per token, GPT-2's byte-level BPE, or the tokenizer a model
//! directory ships.
//!
//! Four ways to get a [`Tokenizer`]:
//! - [`Tokenizer::bytes`]: V = 256, token = byte of the UTF-8 text. What our small models
//!   pretrained from scratch use: nothing to learn, nothing to ship.
//! - [`Tokenizer::gpt2`]: GPT-2's BPE, offline, from the `r50k_base` rank file that `tiktoken-rs`
//!   carries inside the crate (the same 50,257 tokens as OpenAI's `encoder.json`).
//! - [`Tokenizer::from_dir`]: the tokenizer files of a model directory (`tokenizer.json`, or
//!   `vocab.json` + `merges.txt` with their added tokens), run by Hugging Face's `tokenizers`
//!   crate, so added and special tokens are what `transformers` makes of them (`hf_tokenizer.rs`).
//! - [`Tokenizer::from_files`]: a byte-level BPE from `vocab.json` + `merges.txt` alone, run by
//!   our own implementation in `bpe.rs` (read it to see how BPE works; it knows no added tokens,
//!   so model directories go through [`Tokenizer::from_dir`]).
//!
//! [`Tokenizer::for_model`] picks for a model directory and says which in
//! [`Tokenizer::describe`]. `encode` treats special tokens in the text (`<|endoftext|>`, added
//! ones such as `<|sep|>`) as plain text, so text from users can never forge a document boundary;
//! [`Tokenizer::encode_with_special`] maps them to their ids, as Hugging Face's tokenizer does.
//! `decode` never fails: ids the vocabulary lacks, and byte sequences that are not valid UTF-8 (a
//! multi-byte character split across tokens), become U+FFFD `�`.

use std::fmt;
use std::path::Path;

use tiktoken_rs::CoreBPE;

use crate::bpe::{BytePairEncoder, ENDOFTEXT};
use crate::config::{GptConfig, TokenizerKind};
use crate::error::{Error, Result};
use crate::hf_tokenizer::HfTokenizer;

/// Turns text into token ids and back.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Bytes,
    Tiktoken(&'static CoreBPE),
    Files(Box<BytePairEncoder>),
    Hf(Box<HfTokenizer>),
}

/// The UTF-8 bytes of U+FFFD, what an unknown id decodes to.
const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

impl Tokenizer {
    /// One token per byte: `encode("hé") == [104, 195, 169]`. V = 256, no end-of-text token
    /// (every id is a byte, so none is free to mean "end"; [`Tokenizer::eot`] is `None`).
    pub fn bytes() -> Self {
        Tokenizer {
            inner: Inner::Bytes,
        }
    }

    /// GPT-2's tokenizer from the rank file bundled in `tiktoken-rs`; needs no network and no
    /// files. Built once per process and shared. (It can only fail if that bundled file is
    /// corrupt, which is a broken build, not bad input; `tiktoken-rs` then panics.)
    pub fn gpt2() -> Self {
        Tokenizer {
            inner: Inner::Tiktoken(tiktoken_rs::r50k_base_singleton()),
        }
    }

    /// A byte-level BPE from Hugging Face's `vocab.json` and `merges.txt`.
    pub fn from_files(vocab_json: impl AsRef<Path>, merges_txt: impl AsRef<Path>) -> Result<Self> {
        let bpe = BytePairEncoder::from_files(vocab_json.as_ref(), merges_txt.as_ref())?;
        Ok(Tokenizer {
            inner: Inner::Files(Box::new(bpe)),
        })
    }

    /// The tokenizer files of `dir`, read as `transformers` reads them: `tokenizer.json` if
    /// present, else `vocab.json` + `merges.txt` with `added_tokens.json`,
    /// `special_tokens_map.json` and `tokenizer_config.json`'s added tokens. `Ok(None)` when the
    /// directory has none of these; an error when it has only one of `vocab.json`/`merges.txt`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let hf = |t: HfTokenizer| {
            Some(Tokenizer {
                inner: Inner::Hf(Box::new(t)),
            })
        };
        if dir.join("tokenizer.json").exists() {
            return Ok(hf(HfTokenizer::from_tokenizer_json(dir)?));
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        match (vocab.exists(), merges.exists()) {
            (true, true) => Ok(hf(HfTokenizer::from_vocab_merges(dir)?)),
            (false, false) => Ok(None),
            (true, false) => Err(Error::tokenizer(
                Some(&vocab),
                "found without its merges.txt",
            )),
            (false, true) => Err(Error::tokenizer(
                Some(&merges),
                "found without its vocab.json",
            )),
        }
    }

    /// The tokenizer of the model in `dir`: its own files ([`Tokenizer::from_dir`]) if it has
    /// any, else the one `config.tokenizer` names. Refused, by name:
    /// - a tokenizer whose ids reach past the model's `vocab_size` (its embedding has no row
    ///   for them);
    /// - a built-in tokenizer (no files) whose size is not exactly `vocab_size`: a model with
    ///   50,258 rows was trained with a token GPT-2's tokenizer does not know, so its own
    ///   tokenizer files are needed to score text the way it was trained.
    pub fn for_model(dir: impl AsRef<Path>, config: &GptConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let (tokenizer, built_in) = match Self::from_dir(dir)? {
            Some(t) => (t, false),
            None => match config.tokenizer {
                TokenizerKind::Bytes => (Self::bytes(), true),
                TokenizerKind::Gpt2 => (Self::gpt2(), true),
            },
        };
        let (n, v) = (tokenizer.vocab_size(), config.vocab_size);
        if built_in && n != v {
            let message = format!(
                "the directory ships no tokenizer files (tokenizer.json, or vocab.json + \
                 merges.txt), and {} has {n} ids where config.json's vocab_size is \
                 {v}: the model was trained with another tokenizer. Put that tokenizer's files \
                 beside config.json",
                tokenizer.describe(),
            );
            return Err(Error::tokenizer(Some(dir), message));
        }
        if n > v {
            let message = format!(
                "{} produces ids up to {}, but config.json's vocab_size is {v}",
                tokenizer.describe(),
                n - 1,
            );
            return Err(Error::tokenizer(Some(dir), message));
        }
        Ok(tokenizer)
    }

    /// Which tokenizer this is, for a note to the user: `"GPT-2's built-in tokenizer
    /// (tiktoken r50k_base, 50257 ids)"`, `"tokenizer.json (Hugging Face tokenizers, 301 ids,
    /// added tokens: <|sep|>)"`, ...
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Bytes => "the byte tokenizer (256 ids, one per byte)".to_string(),
            Inner::Tiktoken(_) => {
                "GPT-2's built-in tokenizer (tiktoken r50k_base, 50257 ids)".to_string()
            }
            Inner::Files(bpe) => format!(
                "our byte-level BPE from vocab.json + merges.txt ({} ids)",
                bpe.vocab_size()
            ),
            Inner::Hf(t) => {
                let mut text = format!(
                    "{} (Hugging Face tokenizers, {} ids",
                    t.source,
                    t.vocab_size()
                );
                if !t.added().is_empty() {
                    let names: Vec<&str> = t.added().values().map(String::as_str).collect();
                    text.push_str(&format!(", added tokens: {}", names.join(" ")));
                }
                text.push(')');
                text
            }
        }
    }

    /// The special tokens the text could spell, with their ids: `<|endoftext|>` for GPT-2,
    /// the added tokens of a directory's tokenizer, none for bytes.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        match &self.inner {
            Inner::Bytes => Vec::new(),
            Inner::Tiktoken(_) => vec![(ENDOFTEXT.to_string(), 50256)],
            Inner::Files(bpe) => bpe
                .eot()
                .map(|id| (ENDOFTEXT.to_string(), id))
                .into_iter()
                .collect(),
            Inner::Hf(t) => t.added().iter().map(|(&id, s)| (s.clone(), id)).collect(),
        }
    }

    /// Number of distinct ids: 256 for bytes, 50257 for GPT-2 (the largest id plus one).
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Bytes => 256,
            Inner::Tiktoken(_) => 50257,
            Inner::Files(bpe) => bpe.vocab_size(),
            Inner::Hf(t) => t.vocab_size(),
        }
    }

    /// The end-of-text id (`<|endoftext|>`, 50256 for GPT-2); `None` for bytes.
    pub fn eot(&self) -> Option<u32> {
        match &self.inner {
            Inner::Bytes => None,
            Inner::Tiktoken(_) => Some(50256),
            Inner::Files(bpe) => bpe.eot(),
            Inner::Hf(t) => t.eot(),
        }
    }

    /// Token ids of `text`; special tokens in the text (`<|endoftext|>`, added tokens) are
    /// encoded as ordinary characters.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match &self.inner {
            Inner::Bytes => text.bytes().map(u32::from).collect(),
            Inner::Tiktoken(bpe) => bpe.encode_ordinary(text),
            Inner::Files(bpe) => bpe.encode_ordinary(text),
            Inner::Hf(t) => t.encode(text),
        }
    }

    /// As [`Tokenizer::encode`], but each special token spelled in the text becomes its id, as
    /// Hugging Face's `tokenizer(text, add_special_tokens=False)` does: `<|endoftext|>` → 50256
    /// for GPT-2, and a directory's added tokens. For trusted text such as a training corpus.
    pub fn encode_with_special(&self, text: &str) -> Vec<u32> {
        if let Inner::Hf(t) = &self.inner {
            return t.encode_with_special(text);
        }
        let Some(eot) = self.eot() else {
            return self.encode(text);
        };
        let mut ids = Vec::new();
        for (i, part) in text.split(ENDOFTEXT).enumerate() {
            if i > 0 {
                ids.push(eot);
            }
            ids.extend(self.encode(part));
        }
        ids
    }

    /// The bytes the ids stand for, concatenated; an unknown id gives the bytes of U+FFFD.
    /// Use this (not `decode`) to stream text token by token without breaking characters.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            match &self.inner {
                Inner::Bytes => match u8::try_from(id) {
                    Ok(b) => bytes.push(b),
                    Err(_) => bytes.extend_from_slice(REPLACEMENT),
                },
                Inner::Tiktoken(bpe) => match bpe.decode_bytes(&[id]) {
                    Ok(b) => bytes.extend(b),
                    Err(_) => bytes.extend_from_slice(REPLACEMENT),
                },
                Inner::Files(bpe) => {
                    bytes.extend_from_slice(bpe.token_bytes(id).unwrap_or(REPLACEMENT))
                }
                Inner::Hf(t) => match t.token_bytes(id) {
                    Some(b) => bytes.extend(b),
                    None => bytes.extend_from_slice(REPLACEMENT),
                },
            }
        }
        bytes
    }

    /// The text the ids stand for; invalid UTF-8 and unknown ids become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            Inner::Bytes => "bytes",
            Inner::Tiktoken(_) => "gpt2 (tiktoken r50k_base)",
            Inner::Files(_) => "byte-level BPE (vocab.json + merges.txt)",
            Inner::Hf(t) => t.source.as_str(),
        };
        write!(f, "Tokenizer({kind}, V={})", self.vocab_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HARD: &str = "  Héllo,\n\n\tworld!  It's 2024... 🦀 日本語   end   \r\n";

    #[test]
    fn gpt2_encodes_hello_world_as_gpt2_does() {
        let tok = Tokenizer::gpt2();
        assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
        assert_eq!(tok.encode(" the"), vec![262]);
        assert_eq!(tok.decode(&[15496, 995]), "Hello world");
        assert_eq!((tok.vocab_size(), tok.eot()), (50257, Some(50256)));
    }

    #[test]
    fn gpt2_round_trips_unicode_and_whitespace_runs() {
        let tok = Tokenizer::gpt2();
        let ids = tok.encode(HARD);
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids), HARD);
    }

    #[test]
    fn endoftext_is_special_only_when_asked() {
        let tok = Tokenizer::gpt2();
        let text = "a<|endoftext|>b";
        assert!(!tok.encode(text).contains(&50256));
        let ids = tok.encode_with_special(text);
        assert_eq!(
            ids,
            [tok.encode("a"), vec![50256], tok.encode("b")].concat()
        );
        assert_eq!(tok.decode(&ids), text);
        // Bytes has no special token: the marker stays text.
        assert_eq!(
            Tokenizer::bytes().encode_with_special(text).len(),
            text.len()
        );
    }

    #[test]
    fn bytes_round_trip_any_bytes() {
        let tok = Tokenizer::bytes();
        assert_eq!(tok.encode("hé"), vec![104, 195, 169]);
        assert_eq!(tok.decode(&tok.encode(HARD)), HARD);
        let all: Vec<u32> = (0..256).collect();
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(tok.decode_bytes(&all), bytes);
        assert_eq!((tok.vocab_size(), tok.eot()), (256, None));
    }

    #[test]
    fn decode_is_lossy_not_fallible() {
        let tok = Tokenizer::gpt2();
        let crab = tok.encode("🦀");
        assert!(
            crab.len() > 1,
            "the crab takes several byte-level tokens: {crab:?}"
        );
        assert!(tok.decode(&crab[..1]).contains('\u{FFFD}'));
        assert_eq!(tok.decode(&[15496, 99999]), "Hello\u{FFFD}");
        assert_eq!(Tokenizer::bytes().decode(&[104, 300]), "h\u{FFFD}");
        assert_eq!(Tokenizer::bytes().decode(&[0xC3]), "\u{FFFD}");
    }

    #[test]
    fn for_model_follows_the_config_when_the_directory_has_no_files() {
        let dir =
            std::env::temp_dir().join(format!("transformer-for-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = GptConfig::gpt2_small();
        assert_eq!(Tokenizer::for_model(&dir, &cfg).unwrap().eot(), Some(50256));
        cfg.tokenizer = TokenizerKind::Bytes;
        let e = Tokenizer::for_model(&dir, &cfg).unwrap_err().to_string();
        assert!(
            e.contains("256 ids where config.json's vocab_size is 50257"),
            "{e}"
        );
        cfg.vocab_size = 256;
        assert_eq!(Tokenizer::for_model(&dir, &cfg).unwrap().vocab_size(), 256);
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        let e = Tokenizer::for_model(&dir, &cfg).unwrap_err().to_string();
        assert!(
            e.ends_with("merges.txt: found without its vocab.json"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            format!("{:?}", Tokenizer::bytes()),
            "Tokenizer(bytes, V=256)"
        );
    }
}
