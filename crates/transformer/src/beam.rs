//! Beam search with Hugging Face's semantics (`generate(num_beams=…, length_penalty=…,
//! no_repeat_ngram_size=…)`, early stopping off). LoRA's paper decodes E2E with 10 beams,
//! length penalty 0.8 and no-repeat n-gram 4: [`BeamConfig::default`].
//!
//! # The search
//!
//! Keep `beams` live sequences (one to start), each with s = Σ log p of its new tokens. A step
//! runs them as one batch through the model with a KV cache and scores every continuation,
//! ```text
//! s' = s + log softmax(z)_token         (z: the beam's last logits; log-softmax on the host)
//! ```
//! where a token that would repeat an n-gram already in the sequence (prompt included) gets
//! log p = −∞ ([`banned_tokens`]). Of the 2·beams best continuations, taken in order:
//! - one that ends — it is end-of-text, or the last token allowed — becomes a finished
//!   hypothesis, if it ranks among the first `beams`, with the score
//!   ```text
//!   score = s' / len^length_penalty      (len: new tokens, the end-of-text included)
//!   ```
//!   and the `beams` best finished hypotheses are kept;
//! - the others fill the next step's `beams` live sequences.
//!
//! The search is done when `beams` hypotheses have finished and the best live sequence, scored
//! at its current length, does not beat the worst of them (HF's heuristic: with
//! length_penalty > 0 a longer continuation could still beat it, but rarely does), or when the
//! last token allowed is placed. The answer is the best finished hypothesis.
//!
//! Reordering beams reorders their cache rows: the next step's row r continues the sequence of
//! row `rows[r]` of this one ([`select_rows`]); at the first step it copies the prompt's one row
//! to all beams.

use crate::error::{Error, Result};
use crate::generate::{check_prompt, last_logits, select_rows};
use crate::model::{Gpt2, KvCache};

/// Settings of [`beam_search`].
#[derive(Clone, Debug, PartialEq)]
pub struct BeamConfig {
    /// Live sequences and finished hypotheses kept (num_beams); 1 is greedy.
    pub beams: usize,
    /// Most new tokens (fewer when the context fills first).
    pub max_new_tokens: usize,
    /// The exponent of the length in the score; > 0 favours longer hypotheses.
    pub length_penalty: f32,
    /// No n-gram of this size appears twice in the sequence; 0 = off.
    pub no_repeat_ngram: usize,
    /// The end-of-text token, which ends a hypothesis; `None` = only the length ends them.
    pub eot: Option<u32>,
}

impl Default for BeamConfig {
    /// The LoRA paper's E2E decoding, 64 new tokens, no end-of-text token set.
    fn default() -> Self {
        BeamConfig {
            beams: 10,
            max_new_tokens: 64,
            length_penalty: 0.8,
            no_repeat_ngram: 4,
            eot: None,
        }
    }
}

/// A live sequence: its new tokens and s, the sum of their log-probabilities.
#[derive(Clone)]
struct Beam {
    tokens: Vec<u32>,
    logp: f64,
}

/// The new tokens of the best hypothesis (its end-of-text token last, if it ended with one).
pub fn beam_search(model: &Gpt2, prompt_ids: &[u32], cfg: &BeamConfig) -> Result<Vec<u32>> {
    check_prompt(model, prompt_ids)?;
    if cfg.beams == 0 {
        return Err(Error::Invalid(
            "BeamConfig: beams must be at least 1".into(),
        ));
    }
    let (n_ctx, v) = (model.config.n_positions, model.config.vocab_size);
    let max_new = cfg.max_new_tokens.min(n_ctx - prompt_ids.len());
    let device = model.wte.value().device();
    let mut cache = KvCache::new(&model.config, 1, &device)?;
    let mut live = vec![Beam {
        tokens: Vec::new(),
        logp: 0.0,
    }];
    let mut finished: Vec<(f64, Vec<u32>)> = Vec::new(); // (score, tokens), best first
    let (mut feed, mut t) = (prompt_ids.to_vec(), prompt_ids.len());
    for len in 1..=max_new {
        let logits = last_logits(model, &mut cache, &feed, live.len(), t)?;
        // Every continuation (s', beam, token), the best 2·beams of them first.
        let mut cands: Vec<(f64, usize, u32)> = Vec::with_capacity(live.len() * v);
        for (b, beam) in live.iter().enumerate() {
            let mut logp = log_softmax(&logits[b * v..(b + 1) * v]);
            let seq: Vec<u32> = prompt_ids.iter().chain(&beam.tokens).copied().collect();
            for token in banned_tokens(&seq, cfg.no_repeat_ngram) {
                logp[token as usize] = f64::NEG_INFINITY;
            }
            let scored = logp
                .iter()
                .enumerate()
                .map(|(i, lp)| (beam.logp + lp, b, i as u32));
            cands.extend(scored.filter(|c| c.0.is_finite()));
        }
        best_first(&mut cands, 2 * cfg.beams);
        let (mut next, mut rows) = (Vec::new(), Vec::new());
        for (rank, &(logp, b, token)) in cands.iter().enumerate() {
            let mut tokens = live[b].tokens.clone();
            tokens.push(token);
            if Some(token) == cfg.eot || len == max_new {
                if rank < cfg.beams {
                    finished.push((beam_score(logp, len, cfg.length_penalty), tokens));
                    finished.sort_by(|x, y| y.0.total_cmp(&x.0));
                    finished.truncate(cfg.beams);
                }
            } else if next.len() < cfg.beams {
                next.push(Beam { tokens, logp });
                rows.push(b);
            }
        }
        let Some(best_live) = next.first() else { break };
        if finished.len() == cfg.beams {
            let worst = finished[cfg.beams - 1].0;
            if beam_score(best_live.logp, len, cfg.length_penalty) <= worst {
                break;
            }
        }
        select_rows(&mut cache, &rows)?;
        feed = next.iter().map(|beam| beam.tokens[len - 1]).collect();
        t = 1;
        live = next;
    }
    Ok(finished
        .into_iter()
        .next()
        .map(|(_, t)| t)
        .unwrap_or_default())
}

/// Hugging Face's beam score: the summed log-probabilities over len^length_penalty.
pub fn beam_score(sum_logp: f64, len: usize, length_penalty: f32) -> f64 {
    sum_logp / (len as f64).powf(f64::from(length_penalty))
}

/// log softmax(z)_i = z_i − m − ln Σ_j exp(z_j − m), m = max z; in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&z| (f64::from(z) - m).exp()).sum();
    let lse = m + sum.ln();
    logits.iter().map(|&z| f64::from(z) - lse).collect()
}

/// The tokens that would complete an n-gram `seq` already holds: for each earlier occurrence of
/// its last n−1 tokens, the token that followed it. Empty when n = 0 or `seq` is shorter than
/// n−1.
pub fn banned_tokens(seq: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || seq.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &seq[seq.len() + 1 - n..];
    seq.windows(n)
        .filter(|w| &w[..n - 1] == prefix)
        .map(|w| w[n - 1])
        .collect()
}

/// Sort the `k` best candidates first (higher s'; ties to the lower beam, then the lower token,
/// so that one beam picks what greedy's argmax picks) and drop the rest.
fn best_first(cands: &mut Vec<(f64, usize, u32)>, k: usize) {
    let order = |x: &(f64, usize, u32), y: &(f64, usize, u32)| {
        y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2))
    };
    if cands.len() > k {
        cands.select_nth_unstable_by(k, order);
        cands.truncate(k);
    }
    cands.sort_unstable_by(order);
}
