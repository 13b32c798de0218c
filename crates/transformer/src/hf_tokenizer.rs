//! A model directory's own tokenizer, run by Hugging Face's `tokenizers` crate, the library
//! `transformers` itself runs, so the ids are the ones the model was trained on.
//!
//! Two layouts, in the order `transformers` prefers them:
//! 1. `tokenizer.json` (how `transformers` 5 saves every tokenizer, and what "fast" tokenizers
//!    always wrote): the whole pipeline, its added and special tokens included.
//! 2. `vocab.json` + `merges.txt` (GPT-2's "slow" files, `transformers` 4): a byte-level BPE built
//!    as `transformers`' `GPT2Converter` builds it (byte-level pre-tokenizer without a prefix
//!    space, byte-level decoder), plus the added tokens that file set names:
//!    `added_tokens.json` (`{"<|sep|>": 50257}`), `special_tokens_map.json` and
//!    `tokenizer_config.json`'s `added_tokens_decoder`. An added token must get the id its file
//!    gives it; if the files disagree the directory is refused, naming the token.
//!
//! Two encodings: [`HfTokenizer::encode`] treats special tokens in the text as ordinary
//! characters (as `split_special_tokens=True` does), [`HfTokenizer::encode_with_special`] maps
//! them to their ids, as `tokenizer(text, add_special_tokens=False)` does. Neither adds tokens
//! (no BOS/EOS from a post-processor).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::bpe::{BytePairEncoder, ENDOFTEXT, MAX_TOKENIZER_FILE_BYTES, bytes_to_unicode};
use crate::error::{Error, Result};
use crate::tensor_file::read_text;

/// A directory's tokenizer: the `tokenizers` pipeline twice, one copy recognising special tokens
/// in the text and one reading them as text.
#[derive(Clone)]
pub(crate) struct HfTokenizer {
    special: Tokenizer,
    plain: Tokenizer,
    /// One past the largest id (model vocabulary and added tokens).
    vocab_size: usize,
    /// The end-of-text id: the `eos_token` the files name, else `<|endoftext|>` if present.
    eot: Option<u32>,
    /// Byte-level decoding: token characters map back to bytes through GPT-2's table.
    byte_level: bool,
    /// Which files it was read from, for messages.
    pub(crate) source: String,
    /// Added tokens, id → content.
    added: BTreeMap<u32, String>,
}

impl HfTokenizer {
    /// `dir/tokenizer.json`.
    pub(crate) fn from_tokenizer_json(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = read_text(&path, MAX_TOKENIZER_FILE_BYTES)?;
        let tk = Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| Error::tokenizer(Some(&path), format!("not a tokenizer.json: {e}")))?;
        Self::finish(tk, dir, "tokenizer.json".into(), &path)
    }

    /// `dir/vocab.json` + `dir/merges.txt` and the added-token files beside them.
    pub(crate) fn from_vocab_merges(dir: &Path) -> Result<Self> {
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        // Our own reader first: it bounds the files' sizes and names the file, entry or line of
        // any defect, which the `tokenizers` reader below would report less precisely.
        BytePairEncoder::from_files(&vocab, &merges)?;
        let utf8 = |p: &Path| -> Result<String> {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| Error::tokenizer(Some(p), "path is not UTF-8"))
        };
        let bpe = BPE::from_file(&utf8(&vocab)?, &utf8(&merges)?)
            .build()
            .map_err(|e| Error::tokenizer(Some(&vocab), format!("with merges.txt: {e}")))?;
        let mut tk = Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tk.with_decoder(Some(ByteLevel::default()));
        let mut added = added_token_files(dir)?;
        // `GPT2Tokenizer`'s defaults: `<|endoftext|>` is its bos, eos and unk token, special
        // whether or not a file says so.
        if tk.token_to_id(ENDOFTEXT).is_some()
            && !added.iter().any(|(_, t, _)| t.content == ENDOFTEXT)
        {
            let token = AddedToken::from(ENDOFTEXT, true);
            added.push((None, token, "vocab.json".into()));
        }
        let mut names = vec!["vocab.json".to_string(), "merges.txt".to_string()];
        for (id, token, file) in &added {
            tk.add_special_tokens(std::slice::from_ref(token));
            let got = tk.token_to_id(&token.content);
            if let Some(id) = id
                && got != Some(*id)
            {
                let message = format!(
                    "added token `{}` is id {id} in {file}, but it lands on id {}: the ids of \
                     added tokens must follow the vocabulary's, in order",
                    token.content,
                    got.map_or("none".into(), |g| g.to_string())
                );
                return Err(Error::tokenizer(Some(&dir.join(file)), message));
            }
            if !names.contains(file) {
                names.push(file.clone());
            }
        }
        Self::finish(tk, dir, names.join(" + "), &vocab)
    }

    fn finish(special: Tokenizer, dir: &Path, source: String, path: &Path) -> Result<Self> {
        let mut plain = special.clone();
        plain.set_encode_special_tokens(true);
        let vocab = special.get_vocab(true);
        let vocab_size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        if vocab_size == 0 {
            return Err(Error::tokenizer(Some(path), "the vocabulary is empty"));
        }
        let eot = match eos_token(dir)? {
            Some(name) => Some(special.token_to_id(&name).ok_or_else(|| {
                Error::tokenizer(
                    Some(path),
                    format!("the eos_token `{name}` has no id in the vocabulary"),
                )
            })?),
            None => special.token_to_id(ENDOFTEXT),
        };
        let byte_level = matches!(special.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let added = special
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        Ok(HfTokenizer {
            special,
            plain,
            vocab_size,
            eot,
            byte_level,
            source,
            added,
        })
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub(crate) fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// The added tokens (special or not), id → content.
    pub(crate) fn added(&self) -> &BTreeMap<u32, String> {
        &self.added
    }

    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        encode_with(&self.plain, text)
    }

    pub(crate) fn encode_with_special(&self, text: &str) -> Vec<u32> {
        encode_with(&self.special, text)
    }

    /// The bytes of one id; `None` for an id the tokenizer lacks.
    pub(crate) fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.special.id_to_token(id)?;
        if let Some(content) = self.added.get(&id) {
            return Some(content.as_bytes().to_vec());
        }
        if !self.byte_level {
            return self
                .special
                .decode(&[id], false)
                .ok()
                .map(String::into_bytes);
        }
        // GPT-2's table backwards; a character outside it stands for its own UTF-8 bytes, as
        // the `tokenizers` byte-level decoder does.
        let table = bytes_to_unicode();
        let mut bytes = Vec::new();
        for c in token.chars() {
            match table.iter().position(|&t| t == c) {
                Some(b) => bytes.push(b as u8),
                None => bytes.extend_from_slice(c.to_string().as_bytes()),
            }
        }
        Some(bytes)
    }
}

/// Encoding cannot fail for a byte-level BPE; for other models an error (say, no `unk` token for
/// a character) becomes no ids for that text, which `eval` then reports as too short.
fn encode_with(tk: &Tokenizer, text: &str) -> Vec<u32> {
    tk.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .unwrap_or_default()
}

/// The added tokens of a `vocab.json` + `merges.txt` directory, lowest id first, each with the id
/// its file gives it (`None`: a special token to be looked up or appended) and the file's name.
fn added_token_files(dir: &Path) -> Result<Vec<(Option<u32>, AddedToken, String)>> {
    let mut out: BTreeMap<String, (Option<u32>, AddedToken, String)> = BTreeMap::new();
    let read = |name: &str| -> Result<Option<(PathBuf, Value)>> {
        let path = dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        let text = read_text(&path, MAX_TOKENIZER_FILE_BYTES)?;
        let v = serde_json::from_str(&text)
            .map_err(|e| Error::tokenizer(Some(&path), format!("not valid JSON: {e}")))?;
        Ok(Some((path, v)))
    };
    if let Some((_, v)) = read("special_tokens_map.json")? {
        for content in special_token_names(&v) {
            let token = AddedToken::from(content.clone(), true);
            out.insert(content, (None, token, "special_tokens_map.json".into()));
        }
    }
    if let Some((path, v)) = read("added_tokens.json")? {
        let map = v.as_object().ok_or_else(|| {
            Error::tokenizer(Some(&path), "expected an object {\"token\": id, ...}")
        })?;
        for (content, id) in map {
            let id = id
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| {
                    Error::tokenizer(
                        Some(&path),
                        format!("token `{content}`: expected an id, found {id}"),
                    )
                })?;
            let token = AddedToken::from(content.clone(), true);
            out.insert(
                content.clone(),
                (Some(id), token, "added_tokens.json".into()),
            );
        }
    }
    if let Some((path, v)) = read("tokenizer_config.json")?
        && let Some(map) = v.get("added_tokens_decoder").and_then(Value::as_object)
    {
        for (id, spec) in map {
            let bad = || {
                Error::tokenizer(
                    Some(&path),
                    format!("added_tokens_decoder entry `{id}`: expected an id and a content"),
                )
            };
            let id: u32 = id.parse().map_err(|_| bad())?;
            let content = spec
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            let flag =
                |k: &str, default: bool| spec.get(k).and_then(Value::as_bool).unwrap_or(default);
            let token = AddedToken::from(content, flag("special", true))
                .lstrip(flag("lstrip", false))
                .rstrip(flag("rstrip", false))
                .single_word(flag("single_word", false))
                .normalized(flag("normalized", false));
            out.insert(
                content.to_string(),
                (Some(id), token, "tokenizer_config.json".into()),
            );
        }
    }
    let mut list: Vec<_> = out.into_values().collect();
    // Tokens with an id first, in id order, so each lands on its id; then the ones to look up.
    list.sort_by_key(|(id, _, _)| (id.is_none(), *id));
    Ok(list)
}

/// Every token string a `special_tokens_map.json` names (`"eos_token": "<|endoftext|>"`, or
/// `{"content": ...}`, or a list under `additional_special_tokens`).
fn special_token_names(v: &Value) -> Vec<String> {
    let mut names = Vec::new();
    let mut push = |t: &Value| {
        let s = t
            .as_str()
            .or_else(|| t.get("content").and_then(Value::as_str));
        if let Some(s) = s {
            names.push(s.to_string());
        }
    };
    if let Some(map) = v.as_object() {
        for value in map.values() {
            match value.as_array() {
                Some(list) => list.iter().for_each(&mut push),
                None => push(value),
            }
        }
    }
    names
}

/// The `eos_token` that `tokenizer_config.json` or `special_tokens_map.json` names, if any.
fn eos_token(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let text = read_text(&path, MAX_TOKENIZER_FILE_BYTES)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::tokenizer(Some(&path), format!("not valid JSON: {e}")))?;
        let eos = v.get("eos_token");
        let s = eos
            .and_then(Value::as_str)
            .or_else(|| eos.and_then(|e| e.get("content")).and_then(Value::as_str));
        if let Some(s) = s {
            return Ok(Some(s.to_string()));
        }
    }
    Ok(None)
}
