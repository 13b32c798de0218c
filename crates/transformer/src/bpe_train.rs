//! Training a byte-level BPE vocabulary on a corpus, saved as GPT-2's `vocab.json` +
//! `merges.txt`.
//!
//! GPT-2's 50,257 tokens were learned on web text. A small model trained on one domain pays for
//! every one of them twice: an embedding row each, and a column of the output layer that every
//! position computes (for a 128-wide model, 6.4 M of 7.2 M parameters and most of a step's
//! FLOPs). A vocabulary learned on the model's own corpus is a few thousand tokens and encodes
//! that corpus in fewer tokens than GPT-2's does.
//!
//! **The algorithm** (Sennrich et al., 2016, on bytes as GPT-2 does it): split the text into
//! words with GPT-2's pre-tokenizer regex (a word keeps its leading space), spell every word in
//! the 256 byte symbols (GPT-2's printable stand-ins, so `" the"` is `"Ġthe"`), then repeat until
//! the vocabulary has `vocab_size` entries: count every adjacent symbol pair over all words,
//! weighted by word frequency; merge the most frequent pair into a new symbol, and record the
//! merge. Encoding replays the merges in the order they were learned. The counting and merging
//! is Hugging Face's `tokenizers` trainer, the one `transformers` users train with; the files it
//! writes are read by [`crate::Tokenizer::from_dir`] here and by `transformers`'
//! `GPT2Tokenizer`/`AutoTokenizer` there.
//!
//! `<|endoftext|>` is the vocabulary's first entry (id 0), the document separator and the
//! end-of-text token as in GPT-2.

use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Model, TokenizerBuilder};

use crate::bpe::ENDOFTEXT;
use crate::error::{Error, Result};

/// Learn a byte-level BPE of `vocab_size` tokens (the 256 bytes, `<|endoftext|>`, and the
/// merges) from `texts`, and write `dir/vocab.json` and `dir/merges.txt`. Pairs seen fewer than
/// twice are never merged, so a small corpus can end below `vocab_size`; the size reached is
/// returned.
pub fn train_bpe<S: AsRef<str> + Send>(
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
    dir: &Path,
) -> Result<usize> {
    if vocab_size < 257 {
        return Err(Error::tokenizer(
            Some(dir),
            format!(
                "a byte-level BPE needs at least 257 tokens (256 bytes + {ENDOFTEXT}); asked for {vocab_size}"
            ),
        ));
    }
    let fail = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        Error::tokenizer(Some(dir), format!("{what}: {e}"))
    };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(ENDOFTEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tk = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevel,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level))
    .with_decoder(Some(byte_level))
    .build()
    .map_err(|e| fail("building the BPE trainer", e))?;
    tk.train(&mut trainer, texts)
        .map_err(|e| fail("training the BPE", e))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::tokenizer(Some(dir), e.to_string()))?;
    tk.get_model()
        .save(dir, None)
        .map_err(|e| fail("writing vocab.json and merges.txt", e))?;
    Ok(tk.get_model().get_vocab_size())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tokenizer;

    #[test]
    fn a_trained_vocabulary_round_trips_and_compresses_its_corpus() {
        let text = "name : Aromi | food : Chinese || Aromi is a coffee shop serving Chinese food. \
                    The Wrestlers serves English food near the river. "
            .repeat(50);
        let dir = tempfile::tempdir().unwrap();
        let n = train_bpe(std::iter::once(text.as_str()), 300, dir.path()).unwrap();
        assert!((257..=300).contains(&n), "{n}");
        let tok = Tokenizer::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(tok.vocab_size(), n);
        assert_eq!(tok.eot(), Some(0));
        let ids = tok.encode(&text);
        assert_eq!(tok.decode(&ids), text);
        // Merges learned on this text shorten it well below one token per byte.
        assert!(ids.len() * 2 < text.len(), "{} tokens", ids.len());
        // Text it never saw still encodes (bytes are always in the vocabulary).
        let other = "Ünïcode ✓ and <|endoftext|> as text";
        assert_eq!(tok.decode(&tok.encode(other)), other);
    }

    #[test]
    fn too_small_a_vocabulary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = train_bpe(std::iter::once("abc"), 100, dir.path()).unwrap_err();
        assert!(e.to_string().contains("at least 257"), "{e}");
    }
}
