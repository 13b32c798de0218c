//! `POST /v1/completions`: checks the request (the model, the prompts' sizes, the context, the
//! KV cache budget, the queue), hands it to the engine, and answers in OpenAI's format, whole
//! or as server-sent events (one `text_completion` chunk per piece of text, a chunk with the
//! `finish_reason` per prompt, an optional usage chunk, then `data: [DONE]`).
//!
//! The answer waits for the engine's first event, so a request the engine refuses (an adapter
//! unloaded in between) still gets its HTTP status. A client that goes away drops the event
//! receiver, and the engine frees its sequences at the next step.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::api::{CompletionRequest, parse_completion};
use crate::engine::{Command, Event, Submission, TokenLogprob};
use crate::error::ApiError;
use crate::http::AppState;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The parts of every chunk and response that do not change.
struct Meta {
    id: String,
    created: u64,
    model: String,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
}

pub async fn completions(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match start(&app, body).await {
        Ok(r) => r,
        Err(e) => {
            app.shared.metrics.refuse(e.status.as_u16());
            e.into_response()
        }
    }
}

/// Everything up to the first event; then the answer.
async fn start(app: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let received = Instant::now();
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let req = parse_completion(&body)?;
    let adapter = app.shared.resolve(&req.model).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no model `{}`: the models are {}",
                req.model,
                app.shared.names().join(", ")
            ),
        )
    })?;
    let prompts = tokenize(app, &req)?;
    let n = prompts.len();
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let queued = app.shared.queued.fetch_add(n, Ordering::Relaxed);
    if queued + n > app.limits.max_queue {
        app.shared.queued.fetch_sub(n, Ordering::Relaxed);
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({queued} prompts waiting, at most {}): retry later",
                    app.limits.max_queue
                ),
            )
        });
    }
    let (tx, mut rx) = unbounded_channel();
    let submission = Submission {
        model: req.model.clone(),
        adapter,
        prompts,
        sampling: Arc::new(req.sampling.clone()),
        events: tx,
        received,
    };
    if app.send(Command::Submit(submission)).is_err() {
        app.shared.queued.fetch_sub(n, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    let first = rx.recv().await;
    let first = match first {
        Some(Event::Rejected { status, message }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
            return Err(ApiError::new(status, message));
        }
        Some(Event::Failed { message }) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message));
        }
        None => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server stopped before this request finished",
            ));
        }
        Some(e) => e,
    };
    let meta = Meta {
        id: format!("cmpl-{:016x}", rand::random::<u64>()),
        created: unix_now(),
        model: req.model.clone(),
        n,
        prompt_tokens,
        include_usage: req.include_usage,
    };
    if req.stream {
        Ok(Sse::new(sse(meta, first, rx)).into_response())
    } else {
        whole(meta, first, rx)
            .await
            .map(IntoResponse::into_response)
    }
}

/// The prompts as token ids, each checked against the limits and the context.
fn tokenize(app: &AppState, req: &CompletionRequest) -> Result<Vec<Vec<u32>>, ApiError> {
    let limits = &app.limits;
    if req.prompts.len() > limits.max_prompts {
        return Err(ApiError::too_large(format!(
            "`prompt` holds {} prompts, at most {} are served per request",
            req.prompts.len(),
            limits.max_prompts
        )));
    }
    let max_tokens = req.sampling.max_tokens;
    let mut out = Vec::with_capacity(req.prompts.len());
    for (i, p) in req.prompts.iter().enumerate() {
        if p.len() > limits.max_prompt_bytes {
            return Err(ApiError::too_large(format!(
                "prompt {i} is {} bytes long, the limit is {}",
                p.len(),
                limits.max_prompt_bytes
            )));
        }
        let ids = app.tokenizer.encode(p);
        if ids.is_empty() {
            return Err(ApiError::field(
                "prompt",
                format!("prompt {i} is empty: the model needs at least one token to continue"),
            ));
        }
        if ids.len() + max_tokens > app.n_ctx {
            return Err(ApiError::field(
                "max_tokens",
                format!(
                    "prompt {i} of {} tokens plus max_tokens {max_tokens} exceeds the model's \
                     context of {} tokens",
                    ids.len(),
                    app.n_ctx
                ),
            ));
        }
        let bytes = (ids.len() + max_tokens) as u64 * app.kv_bytes_per_position;
        if bytes > app.kv_budget_bytes {
            return Err(ApiError::field(
                "max_tokens",
                format!(
                    "prompt {i} of {} tokens plus max_tokens {max_tokens} needs {bytes} bytes of \
                     KV cache, more than the server's whole budget of {} (--kv-cache-mb)",
                    ids.len(),
                    app.kv_budget_bytes
                ),
            ));
        }
        out.push(ids);
    }
    Ok(out)
}

/// OpenAI's `logprobs` object for some tokens; `offset`: where their text starts.
fn logprobs_json(items: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut text_offset = Vec::with_capacity(items.len());
    for t in items {
        text_offset.push(*offset);
        *offset += t.token.len();
    }
    json!({
        "tokens": items.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": items.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": items.iter().map(|t| {
            t.top.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

/// Per prompt: text, log-probabilities (when asked), finish reason, tokens generated.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    wants_logprobs: bool,
    finish: Option<&'static str>,
    completion_tokens: usize,
}

/// The non-streamed answer: every event until each prompt is done.
async fn whole(
    meta: Meta,
    first: Event,
    mut rx: UnboundedReceiver<Event>,
) -> Result<axum::Json<Value>, ApiError> {
    let mut choices: Vec<Choice> = (0..meta.n).map(|_| Choice::default()).collect();
    let mut done = 0;
    let mut next = Some(first);
    while done < meta.n {
        let event = match next.take() {
            Some(e) => e,
            None => rx.recv().await.ok_or_else(|| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server stopped")
            })?,
        };
        match event {
            Event::Delta {
                index,
                text,
                logprobs,
            } => {
                let c = &mut choices[index];
                c.text.push_str(&text);
                c.wants_logprobs |= !logprobs.is_empty();
                c.logprobs.extend(logprobs);
            }
            Event::Done {
                index,
                text,
                logprobs,
                finish,
                completion_tokens,
                ..
            } => {
                let c = &mut choices[index];
                c.text.push_str(&text);
                c.wants_logprobs |= !logprobs.is_empty();
                c.logprobs.extend(logprobs);
                c.finish = Some(finish.as_str());
                c.completion_tokens = completion_tokens;
                done += 1;
            }
            Event::Rejected { message, .. } | Event::Failed { message } => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message));
            }
        }
    }
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = c.wants_logprobs.then(|| logprobs_json(&c.logprobs, &mut 0));
            json!({"text": c.text, "index": i, "logprobs": lp, "finish_reason": c.finish})
        })
        .collect();
    Ok(axum::Json(json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(meta.prompt_tokens, completion),
    })))
}

/// State of a stream of chunks.
struct Streaming {
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    next: Option<Event>,
    done: usize,
    completion_tokens: usize,
    offsets: Vec<usize>,
    /// What remains to send after the last prompt is done: usage, then `[DONE]`.
    tail: Vec<SseEvent>,
    ended: bool,
}

impl Streaming {
    fn chunk(&self, index: usize, text: &str, lp: Option<Value>, finish: Option<&str>) -> SseEvent {
        let body = json!({
            "id": self.meta.id,
            "object": "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": finish}],
        });
        SseEvent::default().data(body.to_string())
    }

    /// The next SSE event, or `None` at the end.
    async fn next_event(&mut self) -> Option<SseEvent> {
        if !self.tail.is_empty() {
            return Some(self.tail.remove(0));
        }
        if self.ended {
            return None;
        }
        let event = match self.next.take() {
            Some(e) => e,
            None => match self.rx.recv().await {
                Some(e) => e,
                None => Event::Failed {
                    message: "the server stopped".into(),
                },
            },
        };
        match event {
            Event::Delta {
                index,
                text,
                logprobs,
            } => {
                let lp = (!logprobs.is_empty())
                    .then(|| logprobs_json(&logprobs, &mut self.offsets[index]));
                Some(self.chunk(index, &text, lp, None))
            }
            Event::Done {
                index,
                text,
                logprobs,
                finish,
                completion_tokens,
                ..
            } => {
                let lp = (!logprobs.is_empty())
                    .then(|| logprobs_json(&logprobs, &mut self.offsets[index]));
                self.completion_tokens += completion_tokens;
                self.done += 1;
                if self.done == self.meta.n {
                    self.ended = true;
                    if self.meta.include_usage {
                        let body = json!({
                            "id": self.meta.id,
                            "object": "text_completion",
                            "created": self.meta.created,
                            "model": self.meta.model,
                            "choices": [],
                            "usage": usage(self.meta.prompt_tokens, self.completion_tokens),
                        });
                        self.tail.push(SseEvent::default().data(body.to_string()));
                    }
                    self.tail.push(SseEvent::default().data("[DONE]"));
                }
                Some(self.chunk(index, &text, lp, Some(finish.as_str())))
            }
            Event::Rejected { message, .. } | Event::Failed { message } => {
                self.ended = true;
                let e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message);
                Some(SseEvent::default().data(e.body().to_string()))
            }
        }
    }
}

fn sse(
    meta: Meta,
    first: Event,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    let n = meta.n;
    let state = Streaming {
        meta,
        rx,
        next: Some(first),
        done: 0,
        completion_tokens: 0,
        offsets: vec![0; n],
        tail: Vec::new(),
        ended: false,
    };
    stream::unfold(state, |mut s| async move {
        let e = s.next_event().await?;
        Some((Ok(e), s))
    })
}
