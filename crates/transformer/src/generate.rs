//! Text generation: run the model left to right with a KV cache and pick each next token on the
//! host from the last position's logits, for several prompts at once.
//!
//! # One step
//!
//! The model gives logits z (V values) for the next token. With temperature τ > 0 they become
//! probabilities by a softmax,
//! ```text
//! p_i = exp(z_i / τ) / Σ_j exp(z_j / τ)
//! ```
//! τ < 1 sharpens the distribution, τ > 1 flattens it; as τ → 0 all the mass goes to the largest
//! logit, so τ = 0 means greedy: take argmax_i z_i (the smallest id among ties). Then, in this
//! order (as Hugging Face's `generate`):
//! - top-k keeps the k largest logits (and any tied with the k-th), the rest get p = 0;
//! - top-p, the nucleus: sort what is left by p, descending, and keep the smallest prefix whose
//!   probabilities sum to at least p (always at least one token);
//!
//! and the kept probabilities are renormalised to sum to 1 ([`sampling_distribution`]). A draw
//! u ~ U[0, 1) from a seeded `StdRng` picks the first token whose cumulative probability exceeds
//! u. Sequence i draws from its own generator, seeded with `seed + i`, so its sample does not
//! depend on the other prompts of the batch.
//!
//! # A batch of prompts of different lengths
//!
//! The cache holds one length for all B rows (attention's causal mask assumes it), so every row
//! sits at the same position t. Like Meta's reference Llama `generate`, we prefill all rows with
//! their first t0 = (shortest prompt) tokens in one pass, then step one position at a time; a
//! row whose prompt is longer than t is fed its own next prompt token (its logits are thrown
//! away) instead of a sampled one. That is exact — each row's computation is the one it would
//! have alone — and costs one step per prompt token beyond t0. A row that stops leaves the batch:
//! its cache rows are dropped with [`select_rows`], the gather beam search uses to reorder beams.
//!
//! # Stopping
//!
//! A sequence stops at the first of: the end-of-text token (kept as its last token), a stop
//! string in its decoded text ([`generate`] only; the text is cut before it), `max_new_tokens`,
//! or when prompt plus output fill the context (`n_positions`). A prompt must hold at least one
//! token (GPT-2 has no start token; to sample from nothing, pass `[eot]` to [`generate_tokens`])
//! and at most `n_positions`.

use autograd::Tape;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tensor::Tensor;
use tensor::ops::slice::{slice_axis, write_axis};

use crate::error::{Error, Result};
use crate::model::{Gpt2, KvCache};
use crate::tokenizer::Tokenizer;

/// How to pick tokens and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    /// Most tokens to add to each prompt.
    pub max_new_tokens: usize,
    /// τ of the softmax; 0 = greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (k ≥ 1).
    pub top_k: Option<usize>,
    /// Keep only the nucleus of probability p, 0 < p ≤ 1.
    pub top_p: Option<f32>,
    /// Sequence i samples with `StdRng::seed_from_u64(seed + i)`.
    pub seed: u64,
    /// Stop at the tokenizer's end-of-text token ([`generate`]; [`generate_tokens`] takes it).
    pub stop_at_eot: bool,
    /// Stop when the decoded output contains one of these ([`generate`] only); none may be empty.
    pub stop_strings: Vec<String>,
}

impl Default for GenerateConfig {
    /// Greedy, 64 tokens, stopping at end-of-text.
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_at_eot: true,
            stop_strings: Vec::new(),
        }
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// It produced the end-of-text token.
    Eot,
    /// Its text contained a stop string.
    StopString,
    /// It reached `max_new_tokens`.
    MaxTokens,
    /// Prompt plus output filled the model's context.
    Context,
}

/// The output for one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new text, without the end-of-text token and cut before the first stop string.
    pub text: String,
    /// The new token ids (prompt excluded), the end-of-text token or the one that completed a
    /// stop string included.
    pub tokens: Vec<u32>,
    pub stopped: StopReason,
}

/// Continue each prompt; one [`Generation`] per prompt, in order.
pub fn generate(
    model: &Gpt2,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    cfg: &GenerateConfig,
) -> Result<Vec<Generation>> {
    if cfg.stop_strings.iter().any(String::is_empty) {
        return Err(Error::Invalid("a stop string is empty".into()));
    }
    let eot = if cfg.stop_at_eot {
        tokenizer.eot()
    } else {
        None
    };
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer.encode(p)).collect();
    let text_of = |tokens: &[u32]| {
        let body = match tokens.split_last() {
            Some((&last, body)) if Some(last) == eot => body,
            _ => tokens,
        };
        tokenizer.decode(body)
    };
    let stops = &cfg.stop_strings;
    let has_stop = |tokens: &[u32]| {
        let text = text_of(tokens);
        stops.iter().any(|s| text.contains(s.as_str()))
    };
    let out = run(model, &ids, cfg, eot, |tokens| {
        !stops.is_empty() && has_stop(tokens)
    })?;
    Ok(out
        .into_iter()
        .map(|(tokens, stopped)| {
            let mut text = text_of(&tokens);
            let cut = stops.iter().filter_map(|s| text.find(s.as_str())).min();
            text.truncate(cut.unwrap_or(text.len()));
            Generation {
                text,
                tokens,
                stopped,
            }
        })
        .collect())
}

/// Continue each prompt of token ids; the new ids of each (stopping at `eot` when given, which
/// is then the last id; `cfg.stop_at_eot` and `cfg.stop_strings` are not used here).
pub fn generate_tokens(
    model: &Gpt2,
    prompt_ids: &[Vec<u32>],
    cfg: &GenerateConfig,
    eot: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    let out = run(model, prompt_ids, cfg, eot, |_| false)?;
    Ok(out.into_iter().map(|(tokens, _)| tokens).collect())
}

/// One prompt's sequence while decoding.
struct Row<'a> {
    prompt: &'a [u32],
    out: Vec<u32>,
    stopped: Option<StopReason>,
    rng: StdRng,
}

/// The decoding loop of the module docs; `stop(tokens)` tells whether a row's output so far
/// ends it (a stop string).
fn run(
    model: &Gpt2,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    eot: Option<u32>,
    mut stop: impl FnMut(&[u32]) -> bool,
) -> Result<Vec<(Vec<u32>, StopReason)>> {
    check_config(cfg)?;
    let (n_ctx, v) = (model.config.n_positions, model.config.vocab_size);
    let mut rows = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        check_prompt(model, prompt)?;
        let stopped = if cfg.max_new_tokens == 0 {
            Some(StopReason::MaxTokens)
        } else if prompt.len() == n_ctx {
            Some(StopReason::Context)
        } else {
            None
        };
        let rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(i as u64));
        rows.push(Row {
            prompt,
            out: Vec::new(),
            stopped,
            rng,
        });
    }
    // `live[r]` is the row whose sequence is row r of the cache.
    let mut live: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].stopped.is_none())
        .collect();
    let Some(t0) = live.iter().map(|&i| rows[i].prompt.len()).min() else {
        return Ok(finished(rows)); // nothing to run
    };
    let mut feed: Vec<u32> = live
        .iter()
        .flat_map(|&i| &rows[i].prompt[..t0])
        .copied()
        .collect();
    let mut cache = KvCache::new(&model.config, live.len(), &model.wte.value().device())?;
    let mut t = t0;
    while !live.is_empty() {
        let logits = last_logits(model, &mut cache, &feed, live.len(), t)?;
        let pos = cache.len; // every live sequence holds `pos` tokens; this one is the next
        let (mut keep, mut next) = (Vec::new(), Vec::new());
        for (r, &i) in live.iter().enumerate() {
            let row = &mut rows[i];
            let token = match row.prompt.get(pos) {
                Some(&forced) => forced,
                None => {
                    let token = pick(&logits[r * v..(r + 1) * v], cfg, &mut row.rng);
                    row.out.push(token);
                    row.stopped = if Some(token) == eot {
                        Some(StopReason::Eot)
                    } else if stop(&row.out) {
                        Some(StopReason::StopString)
                    } else if row.out.len() == cfg.max_new_tokens {
                        Some(StopReason::MaxTokens)
                    } else if pos + 1 == n_ctx {
                        Some(StopReason::Context)
                    } else {
                        None
                    };
                    token
                }
            };
            if row.stopped.is_none() {
                keep.push(r);
                next.push(token);
            }
        }
        if !keep.is_empty() {
            select_rows(&mut cache, &keep)?;
        }
        live = keep.iter().map(|&r| live[r]).collect();
        (feed, t) = (next, 1);
    }
    Ok(finished(rows))
}

fn finished(rows: Vec<Row>) -> Vec<(Vec<u32>, StopReason)> {
    let out = |row: Row| (row.out, row.stopped.expect("every sequence stops"));
    rows.into_iter().map(out).collect()
}

fn check_config(cfg: &GenerateConfig) -> Result<()> {
    let bad = |what: String| Err(Error::Invalid(format!("GenerateConfig: {what}")));
    if !(cfg.temperature >= 0.0 && cfg.temperature.is_finite()) {
        return bad(format!("temperature {} is not ≥ 0", cfg.temperature));
    }
    if cfg.top_k == Some(0) {
        return bad("top_k must be at least 1".into());
    }
    if let Some(p) = cfg.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return bad(format!("top_p {p} is not in (0, 1]"));
    }
    Ok(())
}

/// A prompt must hold 1 to `n_positions` tokens, each below `vocab_size`.
pub(crate) fn check_prompt(model: &Gpt2, ids: &[u32]) -> Result<()> {
    let cfg = &model.config;
    if ids.is_empty() {
        return Err(Error::Invalid(
            "empty prompt: GPT-2 has no start token; begin with at least one token (e.g. end-of-text)"
                .into(),
        ));
    }
    if ids.len() > cfg.n_positions {
        return Err(Error::Invalid(format!(
            "prompt of {} tokens is longer than the model's context of {}",
            ids.len(),
            cfg.n_positions
        )));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(Error::Invalid(format!(
            "token id {id} is not below vocab_size {}",
            cfg.vocab_size
        )));
    }
    Ok(())
}

/// Feed `t` more tokens of each of the `b` sequences in `cache` (ids row-major) and read back the
/// logits of each sequence's last position: b × V values on the host.
pub fn last_logits(
    model: &Gpt2,
    cache: &mut KvCache,
    ids: &[u32],
    b: usize,
    t: usize,
) -> Result<Vec<f32>> {
    let tape = Tape::inference();
    let logits = model.logits_cached(&tape, ids, b, t, cache)?.value; // (B·T, V)
    let v = model.config.vocab_size;
    let last = match t {
        1 => logits,
        _ => slice_axis(&logits.reshape(&[b, t, v])?, 1, t - 1, 1)?, // (B, 1, V)
    };
    let host = last.to_vec()?;
    if host.iter().any(|z| z.is_nan()) {
        return Err(Error::Invalid("the model produced NaN logits".into()));
    }
    Ok(host)
}

/// Keep rows `rows` of every cache tensor, in that order (a row may repeat): row r of the result
/// is row `rows[r]` of before. Beam search reorders its beams with it, generation drops
/// finished rows. Each run of consecutive source rows moves with one slice and one write.
pub fn select_rows(cache: &mut KvCache, rows: &[usize]) -> Result<()> {
    if rows.iter().copied().eq(0..cache.batch()) {
        return Ok(());
    }
    for x in cache.k.iter_mut().chain(cache.v.iter_mut()) {
        let mut shape = x.shape().to_vec();
        shape[0] = rows.len();
        let gathered = Tensor::zeros(&shape, &x.device())?;
        let mut r = 0;
        while r < rows.len() {
            let n = (1..rows.len() - r)
                .find(|&n| rows[r + n] != rows[r] + n)
                .unwrap_or(rows.len() - r);
            write_axis(&gathered, 0, r, &slice_axis(x, 0, rows[r], n)?, false)?;
            r += n;
        }
        *x = gathered;
    }
    Ok(())
}

/// The index of the largest logit (the smallest among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The distribution a token is drawn from: softmax(z / τ) after top-k, cut to the top-p
/// nucleus and renormalised; (id, probability) pairs, most likely first (τ > 0).
pub fn sampling_distribution(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
) -> Vec<(u32, f64)> {
    let tau = f64::from(temperature);
    let mut kept: Vec<(u32, f64)> = (0..logits.len() as u32)
        .map(|i| (i, f64::from(logits[i as usize]) / tau))
        .collect();
    kept.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = top_k {
        let kth = kept[k.clamp(1, kept.len()) - 1].1;
        kept.retain(|&(_, z)| z >= kth);
    }
    let max = kept[0].1; // subtracting it keeps every exp(·) ≤ 1
    kept.iter_mut().for_each(|e| e.1 = (e.1 - max).exp());
    normalise(&mut kept);
    if let Some(p) = top_p {
        let mut sum = 0.0;
        let n = kept.iter().position(|e| {
            sum += e.1;
            sum >= f64::from(p)
        });
        kept.truncate(n.map_or(kept.len(), |n| n + 1));
        normalise(&mut kept);
    }
    kept
}

fn normalise(dist: &mut [(u32, f64)]) {
    let total: f64 = dist.iter().map(|e| e.1).sum();
    dist.iter_mut().for_each(|e| e.1 /= total);
}

/// The next token: greedy at τ = 0 or top-k = 1, else a draw from [`sampling_distribution`].
fn pick(logits: &[f32], cfg: &GenerateConfig, rng: &mut StdRng) -> u32 {
    if cfg.temperature == 0.0 || cfg.top_k == Some(1) {
        return argmax(logits);
    }
    let dist = sampling_distribution(logits, cfg.temperature, cfg.top_k, cfg.top_p);
    let u: f64 = rng.random();
    let mut cumulative = 0.0;
    for &(id, p) in &dist {
        cumulative += p;
        if u < cumulative {
            return id;
        }
    }
    dist[dist.len() - 1].0 // u just below 1 and rounding in the sum
}
