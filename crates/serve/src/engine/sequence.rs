//! One prompt being served: its tokens, its cache, its sampler, and what of its text has been
//! sent. Picking a token and stopping follow [`transformer::generate()`] exactly (same sampler,
//! same per-prompt seed `seed + i`, same stop rules), so a request's output is the one
//! `train generate` gives for the same prompt, whatever else shares the batch.
//!
//! # Sending text while it is generated
//!
//! Tokens are byte strings; a character may span two tokens. And a stop string may begin in
//! text already generated. So the text sent so far is always a prefix of the final text:
//! - only bytes that decode completely are sent (an incomplete character at the end waits);
//! - with stop strings, the last (longest stop − 1) bytes wait, since a stop string completed
//!   later could begin there (and the final text is cut before it).

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::sync::mpsc::UnboundedSender;
use transformer::Tokenizer;
use transformer::generate::{argmax, sampling_distribution};

use super::forward::SeqCache;
use crate::api::Sampling;

/// Why a completion ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The end-of-text token or a stop string.
    Stop,
    /// `max_tokens`, or the model's context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One generated token with its log-probability and the most likely alternatives (raw model
/// distribution, temperature 1).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the engine tells the handler of a request.
#[derive(Debug)]
pub enum Event {
    /// More text of prompt `index` (and the tokens generated since the last event, when
    /// log-probabilities were asked for).
    Delta {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Prompt `index` is done; `text` is its last piece.
    Done {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request cannot be served (nothing was sent before): an HTTP status and why.
    Rejected { status: u16, message: String },
    /// The engine failed or stopped while serving it.
    Failed { message: String },
}

/// A prompt in the engine, waiting or running.
pub struct Sequence {
    pub index: usize,
    /// The adapter serving it; `None`: the base model.
    pub adapter: Option<String>,
    /// The model name the request gave (a metrics label).
    pub model: String,
    pub prompt: Vec<u32>,
    pub out: Vec<u32>,
    /// Ids to feed at the next step: the prompt at first, then the last sampled token.
    pub feed: Vec<u32>,
    pub cache: Option<SeqCache>,
    /// Positions its cache holds at most: prompt + max_tokens (within the context).
    pub capacity: usize,
    pub sampling: Arc<Sampling>,
    rng: StdRng,
    sent: usize,
    pending_logprobs: Vec<TokenLogprob>,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
    pub first_token: Option<Instant>,
}

impl Sequence {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        adapter: Option<String>,
        model: String,
        prompt: Vec<u32>,
        capacity: usize,
        sampling: Arc<Sampling>,
        events: UnboundedSender<Event>,
        received: Instant,
    ) -> Sequence {
        let rng = StdRng::seed_from_u64(sampling.seed.wrapping_add(index as u64));
        Sequence {
            index,
            adapter,
            model,
            feed: prompt.clone(),
            prompt,
            out: Vec::new(),
            cache: None,
            capacity,
            sampling,
            rng,
            sent: 0,
            pending_logprobs: Vec::new(),
            events,
            received,
            first_token: None,
        }
    }

    /// Whether its client has gone (the handler dropped its receiver).
    pub fn abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// Takes the next token from this sequence's logits; returns how it finished, if it did.
    /// `n_ctx`: the model's context.
    pub fn advance(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
        n_ctx: usize,
    ) -> Option<Finish> {
        let token = pick(logits, &self.sampling, &mut self.rng);
        if let Some(k) = self.sampling.logprobs {
            self.pending_logprobs
                .push(token_logprob(logits, token, k, tokenizer));
        }
        self.out.push(token);
        self.first_token.get_or_insert_with(Instant::now);
        self.feed = vec![token];
        let eot = tokenizer.eot().filter(|_| !self.sampling.ignore_eos);
        if Some(token) == eot {
            return Some(Finish::Stop);
        }
        if !self.sampling.stop.is_empty() {
            let text = tokenizer.decode(&self.out);
            if self.sampling.stop.iter().any(|s| text.contains(s.as_str())) {
                return Some(Finish::Stop);
            }
        }
        if self.out.len() == self.sampling.max_tokens || self.prompt.len() + self.out.len() == n_ctx
        {
            return Some(Finish::Length);
        }
        None
    }

    /// Sends the text that can no longer change (see the module doc), if any.
    pub fn send_progress(&mut self, tokenizer: &Tokenizer) {
        let bytes = tokenizer.decode_bytes(&self.out);
        let hold = self
            .sampling
            .stop
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(1)
            - 1;
        let end = complete_prefix(&bytes[..bytes.len().saturating_sub(hold)]);
        let text = String::from_utf8_lossy(&bytes[..end]);
        if text.len() > self.sent || !self.pending_logprobs.is_empty() {
            let delta = text.get(self.sent..).unwrap_or("").to_string();
            self.sent = self.sent.max(text.len());
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            let _ = self.events.send(Event::Delta {
                index: self.index,
                text: delta,
                logprobs,
            });
        }
    }

    /// The final text: without the end-of-text token, cut before the first stop string (as
    /// [`transformer::generate()`] returns it). Sends the rest of it and the end.
    pub fn send_done(&mut self, finish: Finish, tokenizer: &Tokenizer) {
        let eot = tokenizer.eot().filter(|_| !self.sampling.ignore_eos);
        let body = match self.out.split_last() {
            Some((&last, body)) if Some(last) == eot => body,
            _ => &self.out[..],
        };
        let mut text = tokenizer.decode(body);
        let cut = self
            .sampling
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min();
        text.truncate(cut.unwrap_or(text.len()));
        let rest = text.get(self.sent..).unwrap_or("").to_string();
        self.sent = text.len();
        let _ = self.events.send(Event::Done {
            index: self.index,
            text: rest,
            logprobs: std::mem::take(&mut self.pending_logprobs),
            finish,
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.out.len(),
        });
    }
}

/// The length of the longest prefix of `bytes` that decodes without an incomplete character at
/// its end (invalid bytes inside count as decoded: they become U+FFFD either way).
fn complete_prefix(bytes: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        match std::str::from_utf8(&bytes[pos..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                Some(n) => pos += e.valid_up_to() + n,
                None => return pos + e.valid_up_to(),
            },
        }
    }
}

/// The next token, as `transformer::generate` picks it: greedy at τ = 0, else a draw u ~ U[0,1)
/// from the sequence's generator over [`sampling_distribution`].
fn pick(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if s.temperature == 0.0 {
        return argmax(logits);
    }
    let dist = sampling_distribution(logits, s.temperature, None, s.top_p);
    let u: f64 = rng.random();
    let mut cumulative = 0.0;
    for &(id, p) in &dist {
        cumulative += p;
        if u < cumulative {
            return id;
        }
    }
    dist[dist.len() - 1].0
}

/// log softmax(z)[token] and the k largest, each with its text.
fn token_logprob(logits: &[f32], token: u32, k: usize, tokenizer: &Tokenizer) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits
        .iter()
        .map(|&z| f64::from(z - max).exp())
        .sum::<f64>()
        .ln() as f32;
    let lp = |i: usize| logits[i] - max - log_sum;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(order.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    }
    let mut top: Vec<usize> = order[..k].to_vec();
    top.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    TokenLogprob {
        token: tokenizer.decode(&[token]),
        logprob: lp(token as usize),
        top: top
            .into_iter()
            .map(|i| (tokenizer.decode(&[i as u32]), lp(i)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_prefix_waits_for_split_characters() {
        let s = "aé€".as_bytes(); // 1 + 2 + 3 bytes
        assert_eq!(complete_prefix(s), 6);
        assert_eq!(complete_prefix(&s[..5]), 3);
        assert_eq!(complete_prefix(&s[..2]), 1);
        assert_eq!(complete_prefix(&[b'a', 0xff, b'b']), 3); // invalid inside: decoded
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let tok = Tokenizer::bytes();
        let z = [1.0f32, 3.0, 2.0, 0.0];
        let lp = token_logprob(&z, 2, 2, &tok);
        let total: f32 = z.iter().map(|v| v.exp()).sum();
        assert!((lp.logprob - (2.0f32.exp() / total).ln()).abs() < 1e-6);
        let ids: Vec<&str> = lp.top.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(ids, ["\u{1}", "\u{2}"]);
        assert!(lp.top[0].1 > lp.top[1].1);
    }
}
