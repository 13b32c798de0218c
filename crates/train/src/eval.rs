//! `train eval`: how well a model predicts a text file.
//!
//! The text is tokenised whole (no token added) as Hugging Face's `tokenizer(text,
//! add_special_tokens=False)` does: a special token spelled in the text (`<|endoftext|>`, or an
//! added token of the model's tokenizer such as `<|sep|>`) becomes its id, and a note on stderr
//! says how many there were. It is then cut into consecutive windows of the model's context length, and each window is scored on predicting its tokens 2..T from the ones before
//! (a text shorter than the context is one window). The loss is the mean next-token
//! cross-entropy over every predicted token; perplexity = e^loss.

use std::path::PathBuf;

use autograd::Tape;
use clap::Args;
use tensor::Device;
use transformer::{Gpt2, Tokenizer};

/// Options of `train eval`.
///
/// Special tokens in the text: a literal `<|endoftext|>` (or another special or added token of
/// the model's tokenizer, such as `<|sep|>`) is scored as that token's id, exactly as Hugging
/// Face's tokenizer encodes it, and eval prints a note on stderr saying how many it found.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Model directory: config.json + model.safetensors (or model.safetensors.index.json and
    /// its shards) + the model's tokenizer: tokenizer.json, or vocab.json + merges.txt (with
    /// added_tokens.json). Without tokenizer files, GPT-2's built-in tokenizer (or bytes for a
    /// 256-token model); a note on stderr says which is used.
    /// Or a Hugging Face Hub id, `name` or `org/name`, with `@revision` for a branch, tag or
    /// commit (`org/name@v1`): read from the HF cache ($HF_HUB_CACHE, else $HF_HOME/hub), and
    /// downloaded into it unless HF_HUB_OFFLINE=1. A local path that exists always wins.
    #[arg(long, value_parser = crate::hub::model_dir)]
    pub model: PathBuf,
    /// A LoRA adapter directory in PEFT's layout (ours or one PEFT saved), applied unmerged.
    /// Or a Hub id, as for --model.
    #[arg(long, value_parser = crate::hub::adapter_dir)]
    pub adapter: Option<PathBuf>,
    /// A UTF-8 text file to score. A literal `<|endoftext|>` in it is the end-of-text token, as
    /// in Hugging Face's tokenizer (a note on stderr counts them).
    #[arg(long)]
    pub data: PathBuf,
    /// Windows scored together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Print one JSON object (loss, perplexity, tokens, windows) instead of a sentence.
    #[arg(long)]
    pub json: bool,
    /// Also score generation: a file of `context||reference` lines (E2E's layout; several lines
    /// may share a context). Each distinct context is continued greedily (stopped at
    /// end-of-text or a newline) and the outputs get corpus BLEU-4 against all its references.
    #[arg(long)]
    pub references: Option<PathBuf>,
    #[command(flatten)]
    pub quant: crate::quantize::QuantizeArgs,
}

/// Corpus BLEU of greedy continuations of every distinct context of a `context||reference` file.
pub fn bleu_of_file(
    model: &Gpt2,
    tok: &Tokenizer,
    path: &std::path::Path,
) -> crate::Result<crate::bleu::Bleu> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let (ctx, reference) = line.split_once("||").ok_or_else(|| {
            format!(
                "{}:{}: expected `context||reference`",
                path.display(),
                n + 1
            )
        })?;
        let (ctx, reference) = (ctx.trim().to_string(), reference.trim().to_string());
        match groups.iter_mut().find(|(c, _)| *c == ctx) {
            Some((_, refs)) => refs.push(reference),
            None => groups.push((ctx, vec![reference])),
        }
    }
    if groups.is_empty() {
        return Err(format!("{}: no `context||reference` lines", path.display()).into());
    }
    let cfg = transformer::GenerateConfig {
        max_new_tokens: 64,
        stop_strings: vec!["\n".into()],
        ..Default::default()
    };
    let mut hyps = Vec::new();
    for chunk in groups.chunks(32) {
        let prompts: Vec<String> = chunk.iter().map(|(c, _)| format!("{c} ||")).collect();
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        for g in transformer::generate(model, tok, &prompts, &cfg)? {
            hyps.push(g.text.trim().to_string());
        }
    }
    let refs: Vec<&[String]> = groups.iter().map(|(_, r)| r.as_slice()).collect();
    Ok(crate::bleu::corpus_bleu(&hyps, &refs))
}

/// Mean loss and the number of predicted tokens of `ids` under `model`.
pub fn score(model: &Gpt2, ids: &[u32], batch: usize) -> crate::Result<(f64, usize)> {
    let ctx = model.config.n_positions;
    let windows: Vec<&[u32]> = ids.chunks(ctx).filter(|w| w.len() >= 2).collect();
    let (mut total, mut count) = (0.0f64, 0usize);
    for group in windows.chunks(batch.max(1)) {
        // Windows of one group share a length: the full ones go together, a short tail alone.
        let mut start = 0;
        while start < group.len() {
            let t = group[start].len();
            let end = start + group[start..].iter().take_while(|w| w.len() == t).count();
            let seqs = &group[start..end];
            let inputs: Vec<u32> = seqs.iter().flat_map(|w| w.iter().copied()).collect();
            let mut targets = Vec::with_capacity(inputs.len());
            let mut weights = Vec::with_capacity(inputs.len());
            for w in seqs {
                targets.extend_from_slice(&w[1..]);
                targets.push(0);
                weights.extend(std::iter::repeat_n(1.0f32, t - 1));
                weights.push(0.0);
            }
            let tape = Tape::inference();
            let loss = model.loss(&tape, &inputs, &targets, &weights, seqs.len(), t)?;
            let predicted = seqs.len() * (t - 1);
            total += loss.value.to_vec()?[0] as f64 * predicted as f64;
            count += predicted;
            start = end;
        }
    }
    if count == 0 {
        return Err("the text has fewer than 2 tokens: nothing to predict".into());
    }
    Ok((total / count as f64, count))
}

/// What `ids` hold of the tokenizer's special tokens, when any: `"the text spells 2 special
/// tokens (<|endoftext|> ×2); each is scored as its token id, as Hugging Face's tokenizer encodes
/// it"`.
pub fn special_token_note(tokenizer: &Tokenizer, ids: &[u32]) -> Option<String> {
    let mut found = Vec::new();
    let mut total = 0;
    for (name, id) in tokenizer.special_tokens() {
        let n = ids.iter().filter(|&&i| i == id).count();
        if n > 0 {
            found.push(format!("{name} ×{n}"));
            total += n;
        }
    }
    (total > 0).then(|| {
        format!(
            "the text spells {total} special token(s) ({}); each is scored as its token id, as \
             Hugging Face's tokenizer encodes it",
            found.join(", ")
        )
    })
}

/// `train eval`.
pub fn run(args: &EvalArgs, device: &Device) -> crate::Result<()> {
    let (model, _lora) =
        crate::load_with_adapter(&args.model, args.adapter.as_deref(), device, args.quant)?;
    let tokenizer = crate::model_tokenizer(&args.model, &model.config)?;
    let text = std::fs::read(&args.data).map_err(|e| format!("{}: {e}", args.data.display()))?;
    let text = String::from_utf8(text)
        .map_err(|e| format!("{}: not UTF-8 text ({e})", args.data.display()))?;
    let ids = tokenizer.encode_with_special(&text);
    if let Some(note) = special_token_note(&tokenizer, &ids) {
        eprintln!("note: {note}");
    }
    let (loss, tokens) = score(&model, &ids, args.batch)?;
    let windows = ids.len().div_ceil(model.config.n_positions);
    let bleu = match &args.references {
        Some(path) => Some(bleu_of_file(&model, &tokenizer, path)?),
        None => None,
    };
    if args.json {
        let mut v = serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens,
            "windows": windows, "model": args.model, "data": args.data});
        if let Some(b) = &bleu {
            v["bleu"] = b.score.into();
        }
        println!("{v}");
    } else {
        if let Some(b) = &bleu {
            println!("BLEU-4 of greedy outputs: {b}");
        }
        println!(
            "{}: loss {loss:.4}, perplexity {:.2}, over {tokens} predicted tokens in {windows} windows of up to {}",
            args.data.display(),
            loss.exp(),
            model.config.n_positions
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_in_the_text_are_scored_as_ids_and_counted() {
        let tok = Tokenizer::gpt2();
        let ids = tok.encode_with_special("one<|endoftext|>two<|endoftext|>");
        assert_eq!(ids.iter().filter(|&&i| i == 50256).count(), 2);
        let note = special_token_note(&tok, &ids).unwrap();
        assert!(
            note.starts_with("the text spells 2 special token(s) (<|endoftext|> ×2)"),
            "{note}"
        );
        assert_eq!(special_token_note(&tok, &tok.encode("plain text")), None);
    }
}
