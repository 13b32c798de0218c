//! Our byte-level BPE (`Tokenizer::from_files`) against tiktoken's GPT-2 (`Tokenizer::gpt2`).
//!
//! GPT-2's `vocab.json` + `merges.txt` are generated here from tiktoken's ranks, the way
//! the PyTorch reference tooling's `tiktoken_to_hf.py` does it (that script checks the result is byte-identical to
//! OpenAI's files): token bytes by id give `vocab.json`; a token's merge is the pair that BPE,
//! restricted to lower ranks, leaves it as. Then both tokenizers must agree token for token.
//!
//! `cargo test -p transformer --test tokenizer`

use std::collections::HashMap;

use integration_tests::{Scratch, scratch};
use transformer::{GptConfig, Tokenizer, bytes_to_unicode};

/// Splits `token` with BPE using only merges of rank < `max_rank` (tiktoken's rule: a pair
/// merges if its concatenation is a token; the lowest-ranked such pair first).
fn bpe_split(ranks: &HashMap<Vec<u8>, u32>, token: &[u8], max_rank: u32) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = token.iter().map(|&b| vec![b]).collect();
    loop {
        let best = (0..parts.len().saturating_sub(1))
            .filter_map(|i| {
                let rank = *ranks.get(&[parts[i].clone(), parts[i + 1].clone()].concat())?;
                (rank < max_rank).then_some((rank, i))
            })
            .min();
        let Some((_, i)) = best else { return parts };
        let right = parts.remove(i + 1);
        parts[i].extend(right);
    }
}

/// Writes GPT-2's vocab.json and merges.txt, made from tiktoken's ranks, into a fresh directory.
fn write_gpt2_files(tok: &Tokenizer) -> Scratch {
    let table = bytes_to_unicode();
    let spell = |bytes: &[u8]| bytes.iter().map(|&b| table[b as usize]).collect::<String>();
    let eot = tok.eot().unwrap();
    let tokens: Vec<Vec<u8>> = (0..eot).map(|id| tok.decode_bytes(&[id])).collect();
    let ranks: HashMap<Vec<u8>, u32> = tokens.iter().cloned().zip(0..).collect();

    let mut vocab = serde_json::Map::new();
    for (id, bytes) in tokens.iter().enumerate() {
        vocab.insert(spell(bytes), id.into());
    }
    vocab.insert("<|endoftext|>".into(), eot.into());
    let mut merges = String::from("#version: 0.2\n");
    for (rank, token) in tokens.iter().enumerate().filter(|(_, t)| t.len() > 1) {
        let parts = bpe_split(&ranks, token, rank as u32);
        assert_eq!(
            parts.len(),
            2,
            "token {rank} is not one merge of lower-ranked tokens"
        );
        merges.push_str(&format!("{} {}\n", spell(&parts[0]), spell(&parts[1])));
    }
    let dir = scratch("transformer-gpt2-files");
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
    dir
}

#[test]
fn from_files_agrees_with_tiktoken_gpt2() {
    let gpt2 = Tokenizer::gpt2();
    let dir = write_gpt2_files(&gpt2);
    let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    assert_eq!(merges.lines().count(), 1 + 50000, "GPT-2 has 50,000 merges");
    // Our generated files give OpenAI's ids for known symbols (`Ġ` is a space).
    let vocab: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vocab.json")).unwrap()).unwrap();
    assert_eq!(
        (vocab["Hello"].as_u64(), vocab["Ġthe"].as_u64()),
        (Some(15496), Some(262))
    );

    let ours = Tokenizer::from_files(dir.join("vocab.json"), dir.join("merges.txt")).unwrap();
    assert_eq!((ours.vocab_size(), ours.eot()), (50257, Some(50256)));
    let sentences = [
        "Hello world",
        "The Eagle is a coffee shop near Burger King; it's family-friendly, rated 5 out of 5.",
        "I'm sure they'll've DONE it... won't they?  Yes!!!",
        "  leading spaces,\ttabs\t\tand\n\nnewlines   \r\n  trailing   ",
        "Unicode: naïve café, Grüße, 日本語のテキスト, emoji 🦀🚀, math ∑ x² ≤ ∞",
        "numbers 3.14159 and 1,000,000 and 2024-01-01T12:00",
        "code: fn main() { println!(\"{}\", x + 1); } // done",
        "<|endoftext|> is plain text here",
    ];
    for text in sentences {
        let ids = gpt2.encode(text);
        assert_eq!(ours.encode(text), ids, "{text:?}");
        assert_eq!(ours.decode(&ids), text);
    }
    let text = "one<|endoftext|>two";
    assert_eq!(
        ours.encode_with_special(text),
        gpt2.encode_with_special(text)
    );

    // A model directory with these files uses them, through Hugging Face's `tokenizers`, which
    // agrees with tiktoken; `<|endoftext|>` is special as in `GPT2Tokenizer`'s defaults.
    let cfg = GptConfig::gpt2_small();
    let hf = Tokenizer::for_model(&dir, &cfg).unwrap();
    for text in sentences.iter().chain([&text]) {
        assert_eq!(hf.encode(text), gpt2.encode(text), "{text:?}");
        let ids = gpt2.encode_with_special(text);
        assert_eq!(hf.encode_with_special(text), ids, "{text:?}");
        assert_eq!(hf.decode(&ids), *text);
    }
    assert_eq!(hf.eot(), Some(50256));
    let small_vocab = GptConfig {
        vocab_size: 50000,
        ..cfg
    };
    let e = Tokenizer::for_model(&dir, &small_vocab)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("produces ids up to 50256, but config.json's vocab_size is 50000"),
        "{e}"
    );
}
