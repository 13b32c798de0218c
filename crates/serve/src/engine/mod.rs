//! The engine: one thread that owns the model, its adapters and every sequence, and decodes.
//! HTTP handlers talk to it only through channels (commands in, [`Event`]s out, unbounded: the
//! engine never waits for a client, so a slow client never stalls a batch).
//!
//! # A step (continuous batching)
//!
//! 1. Take every command that has arrived: new requests join the waiting queue; adapters read
//!    and checked by the HTTP side ([`reader`]) are written into the bank; an adapter to unload stops accepting requests and is removed once no sequence of
//!    it is waiting or running (requests already on it finish first).
//! 2. Drop every sequence whose client has gone (its receiver was dropped).
//! 3. Admit waiting sequences in arrival order while the batch has room (`max_batch`
//!    sequences, `max_batch_tokens` new tokens) and the KV cache budget covers each one's whole
//!    capacity, prompt + max_tokens positions, reserved at admission so that an admitted
//!    sequence never runs out of cache.
//! 4. Run one ragged step ([`forward::step`]): new sequences feed their whole prompt (prefill),
//!    running ones their last token, in one forward, each row served by its own adapter (the
//!    metric `serve_step_adapters` counts the distinct adapters of each step).
//! 5. Each sequence takes its next token; finished sequences leave at once, freeing their cache.

pub mod adapters;
pub mod forward;
pub mod reader;
pub mod sequence;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use transformer::{Gpt2, Tokenizer};

use crate::Result;
use crate::api::Sampling;
use crate::metrics::Metrics;
pub use adapters::Mode;
use adapters::Store;
use forward::{Part, SeqCache};
use reader::Ready;
pub use sequence::{Event, Finish, Sequence, TokenLogprob};

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct EngineLimits {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most new tokens in one step (prompts being prefilled count whole; a prompt longer than
    /// this still runs, alone with the decoding sequences).
    pub max_batch_tokens: usize,
    /// Bytes of KV cache all admitted sequences may reserve together.
    pub kv_budget_bytes: u64,
    pub mode: Mode,
}

/// A loaded adapter as `GET /v1/models` lists it.
#[derive(Clone, Debug)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// Unix seconds.
    pub created: u64,
}

/// What handlers read without asking the engine.
pub struct Shared {
    pub base_name: String,
    /// Loaded adapters accepting requests (one being unloaded is no longer listed).
    pub adapters: RwLock<Vec<AdapterInfo>>,
    /// Sequences waiting for admission (handlers add theirs before sending, for the 429 check).
    pub queued: AtomicUsize,
    pub metrics: Metrics,
}

impl Shared {
    /// Whether `model` names the base or a servable adapter; the adapter, or `None` for the base.
    pub fn resolve(&self, model: &str) -> Option<Option<String>> {
        if model == self.base_name {
            return Some(None);
        }
        let adapters = self.adapters.read().expect("no thread panicked holding it");
        adapters
            .iter()
            .any(|a| a.name == model)
            .then(|| Some(model.to_string()))
    }

    /// Every servable name, the base first.
    pub fn names(&self) -> Vec<String> {
        let adapters = self.adapters.read().expect("no thread panicked holding it");
        std::iter::once(self.base_name.clone())
            .chain(adapters.iter().map(|a| a.name.clone()))
            .collect()
    }
}

/// A completion request, tokenized and checked by its handler.
pub struct Submission {
    pub model: String,
    pub adapter: Option<String>,
    pub prompts: Vec<Vec<u32>>,
    pub sampling: Arc<Sampling>,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub received: Instant,
}

/// Why an adapter could not be loaded or unloaded: an HTTP status and the message.
pub type Refusal = (u16, String);

pub enum Command {
    Submit(Submission),
    /// Insert an adapter read and checked by a [`reader::Reader`] off the engine's thread.
    Load {
        name: String,
        dir: PathBuf,
        ready: Ready,
        reply: oneshot::Sender<std::result::Result<AdapterInfo, Refusal>>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<std::result::Result<(), Refusal>>,
    },
    /// Stop now: whatever still runs is told so.
    Stop,
}

pub struct Engine {
    model: Gpt2,
    store: Store,
    tokenizer: Arc<Tokenizer>,
    limits: EngineLimits,
    shared: Arc<Shared>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    reserved: u64,
    /// Adapters being unloaded, with the replies owed once they are gone.
    unloading: Vec<(String, oneshot::Sender<std::result::Result<(), Refusal>>)>,
    window: (Instant, u64),
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Engine {
    /// An engine over `model` (frozen, no adapter attached).
    pub fn new(
        mut model: Gpt2,
        tokenizer: Arc<Tokenizer>,
        limits: EngineLimits,
        shared: Arc<Shared>,
    ) -> Result<Engine> {
        let store = Store::new(limits.mode, &mut model)?;
        Ok(Engine {
            model,
            store,
            tokenizer,
            limits,
            shared,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            unloading: Vec::new(),
            window: (Instant::now(), 0),
        })
    }

    /// Whether `name` is free for a new adapter (409 otherwise).
    pub fn name_free(shared: &Shared, name: &str) -> std::result::Result<(), Refusal> {
        if name == shared.base_name || shared.resolve(name).is_some() {
            return Err((409, format!("the name `{name}` is already in use")));
        }
        Ok(())
    }

    /// Reads adapter `name` from `dir` on this thread, as `POST /v1/adapters` does on its own,
    /// and inserts it (at start).
    pub fn load(&mut self, name: &str, dir: PathBuf) -> std::result::Result<AdapterInfo, Refusal> {
        Engine::name_free(&self.shared, name)?;
        let reader = reader::Reader {
            config: self.model.config.clone(),
            mode: self.limits.mode,
        };
        let ready = reader.read(name, &dir).map_err(|e| (400, e.to_string()))?;
        self.insert(name, dir, ready)
    }

    /// Inserts adapter `name` read from `dir`; listed in `shared` once inserted.
    pub fn insert(
        &mut self,
        name: &str,
        dir: PathBuf,
        ready: Ready,
    ) -> std::result::Result<AdapterInfo, Refusal> {
        Engine::name_free(&self.shared, name)?;
        if self.unloading.iter().any(|(n, _)| n == name) {
            return Err((409, format!("the name `{name}` is already in use")));
        }
        for w in &ready.warnings {
            eprintln!("adapter {name}: warning: {w}");
        }
        let bytes = ready.bytes;
        self.store
            .insert(name, &dir, ready, &self.model)
            .map_err(|e| (400, e.to_string()))?;
        let info = AdapterInfo {
            name: name.to_string(),
            path: dir,
            bytes,
            created: unix_now(),
        };
        let mut adapters = self.shared.adapters.write().expect("no panic holding it");
        adapters.push(info.clone());
        self.shared.metrics.adapters.set(adapters.len() as i64);
        let bytes = self.store.bytes();
        self.shared.metrics.adapter_bytes.set(bytes as i64);
        Ok(info)
    }

    /// Serves commands until `Stop` or until every sender is gone.
    pub fn run(mut self, commands: Receiver<Command>) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let first = if idle {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            } else {
                None
            };
            let mut stop = false;
            let mut batch: Vec<Command> = first.into_iter().collect();
            loop {
                match commands.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stop = self.running.is_empty() && self.waiting.is_empty();
                        break;
                    }
                }
            }
            for c in batch {
                match c {
                    Command::Stop => stop = true,
                    c => self.command(c),
                }
            }
            if stop {
                break;
            }
            if let Err(e) = self.step() {
                let message = format!("the engine failed: {e}");
                eprintln!("{message}");
                self.fail_all(&message);
            }
        }
        self.fail_all("the server stopped before this request finished");
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Submit(s) => self.submit(s),
            Command::Load {
                name,
                dir,
                ready,
                reply,
            } => {
                let _ = reply.send(self.insert(&name, dir, ready));
            }
            Command::Unload { name, reply } => {
                let mut adapters = self.shared.adapters.write().expect("no panic holding it");
                let Some(i) = adapters.iter().position(|a| a.name == name) else {
                    let _ = reply.send(Err((404, format!("no adapter `{name}` is loaded"))));
                    return;
                };
                adapters.remove(i);
                drop(adapters);
                self.unloading.push((name, reply));
            }
            Command::Stop => {}
        }
    }

    fn submit(&mut self, s: Submission) {
        let n = s.prompts.len();
        if let Some(a) = &s.adapter
            && self.shared.resolve(a).is_none()
        {
            self.shared.queued.fetch_sub(n, Ordering::Relaxed);
            let names = self.shared.names().join(", ");
            let _ = s.events.send(Event::Rejected {
                status: 404,
                message: format!("no model `{a}`: the models are {names}"),
            });
            return;
        }
        let n_ctx = self.model.config.n_positions;
        let label = self.shared.metrics.model(&s.model);
        self.shared.metrics.requests.get_or_create(&label).inc();
        for (index, prompt) in s.prompts.into_iter().enumerate() {
            self.shared
                .metrics
                .prompt_tokens
                .get_or_create(&label)
                .inc_by(prompt.len() as u64);
            let capacity = (prompt.len() + s.sampling.max_tokens).min(n_ctx);
            self.waiting.push_back(Sequence::new(
                index,
                s.adapter.clone(),
                s.model.clone(),
                prompt,
                capacity,
                s.sampling.clone(),
                s.events.clone(),
                s.received,
            ));
        }
    }

    fn bytes_of(&self, seq: &Sequence) -> u64 {
        seq.capacity as u64 * SeqCache::bytes_per_position(&self.model.config)
    }

    /// Steps 2 to 5 of the module doc.
    fn step(&mut self) -> Result<()> {
        self.drop_abandoned();
        self.finish_unloads()?;
        self.admit()?;
        self.publish();
        let metrics = &self.shared.metrics;
        if self.running.is_empty() {
            if !self.waiting.is_empty() {
                // Nothing runs and nothing fits: wait for commands rather than spin.
                std::thread::sleep(Duration::from_millis(1));
            }
            return Ok(());
        }
        let rows: Vec<Option<&str>> = self
            .running
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.adapter.as_deref(), s.feed.len()))
            .collect();
        self.store.route(&rows, &self.model)?;
        metrics.batch_size.observe(self.running.len() as f64);
        let mut adapters: Vec<&str> = rows.iter().flatten().copied().collect();
        adapters.sort_unstable();
        adapters.dedup();
        metrics.step_adapters.observe(adapters.len() as f64);
        let logits = {
            let feeds: Vec<Vec<u32>> = self
                .running
                .iter_mut()
                .map(|s| std::mem::take(&mut s.feed))
                .collect();
            let mut parts: Vec<Part> = self
                .running
                .iter_mut()
                .zip(&feeds)
                .map(|(s, ids)| Part {
                    ids,
                    cache: s.cache.as_mut().expect("admitted sequences have a cache"),
                })
                .collect();
            forward::step(&self.model, &mut parts)?
        };
        let v = self.model.config.vocab_size;
        let n_ctx = self.model.config.n_positions;
        let mut finished = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            let was_first = seq.first_token.is_none();
            let done = seq.advance(&logits[i * v..(i + 1) * v], &self.tokenizer, n_ctx);
            if was_first {
                let ttft = seq.first_token.expect("a token was taken") - seq.received;
                metrics.time_to_first_token.observe(ttft.as_secs_f64());
            }
            let label = metrics.model(&seq.model);
            metrics.generated_tokens.get_or_create(&label).inc();
            match done {
                Some(f) => {
                    seq.send_done(f, &self.tokenizer);
                    finished.push(i);
                }
                None => seq.send_progress(&self.tokenizer),
            }
        }
        self.window.1 += self.running.len() as u64;
        let elapsed = self.window.0.elapsed().as_secs_f64();
        if elapsed >= 2.0 {
            metrics
                .tokens_per_second
                .set(self.window.1 as f64 / elapsed);
            self.window = (Instant::now(), 0);
        }
        for &i in finished.iter().rev() {
            let seq = self.running.remove(i);
            self.reserved -= self.bytes_of(&seq);
        }
        self.publish();
        // An adapter whose last sequence just finished goes now, not at the next command.
        self.finish_unloads()
    }

    /// The gauges of the queue, the batch and the KV cache.
    fn publish(&self) {
        let metrics = &self.shared.metrics;
        metrics.queue_depth.set(self.waiting.len() as i64);
        metrics.running.set(self.running.len() as i64);
        metrics.kv_reserved_bytes.set(self.reserved as i64);
    }

    fn drop_abandoned(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.abandoned());
        let gone = before - self.waiting.len();
        self.shared.queued.fetch_sub(gone, Ordering::Relaxed);
        let mut freed = 0;
        let per_position = SeqCache::bytes_per_position(&self.model.config);
        self.running.retain(|s| {
            let keep = !s.abandoned();
            if !keep {
                freed += s.capacity as u64 * per_position;
            }
            keep
        });
        self.reserved -= freed;
    }

    /// Removes the adapters being unloaded that no sequence uses any more.
    fn finish_unloads(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.unloading.len() {
            let name = Some(self.unloading[i].0.clone());
            let used = self
                .running
                .iter()
                .chain(&self.waiting)
                .any(|s| s.adapter == name);
            if used {
                i += 1;
                continue;
            }
            let (name, reply) = self.unloading.remove(i);
            let result = self.store.remove(&name, &self.model);
            let n = self.shared.adapters.read().expect("no panic").len();
            self.shared.metrics.adapters.set(n as i64);
            self.shared
                .metrics
                .adapter_bytes
                .set(self.store.bytes() as i64);
            let _ = reply.send(result.map_err(|e| (500, e.to_string())));
        }
        Ok(())
    }

    fn admit(&mut self) -> Result<()> {
        let mut tokens: usize = self.running.iter().map(|s| s.feed.len()).sum();
        while let Some(next) = self.waiting.front() {
            let bytes = self.bytes_of(next);
            let running: Vec<&Option<String>> = self.running.iter().map(|s| &s.adapter).collect();
            let fits = self.running.len() < self.limits.max_batch
                && (tokens == 0 || tokens + next.feed.len() <= self.limits.max_batch_tokens)
                && self.reserved + bytes <= self.limits.kv_budget_bytes
                && self.store.joins(&running, &next.adapter);
            if !fits {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            seq.cache = Some(SeqCache::new(
                &self.model.config,
                seq.capacity,
                &self.model.wte.value().device(),
            )?);
            self.reserved += bytes;
            tokens += seq.feed.len();
            self.running.push(seq);
        }
        Ok(())
    }

    fn fail_all(&mut self, message: &str) {
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = s.events.send(Event::Failed {
                message: message.to_string(),
            });
        }
        self.shared.queued.store(0, Ordering::Relaxed);
        self.reserved = 0;
        for (name, reply) in self.unloading.drain(..) {
            let _ = self.store.remove(&name, &self.model);
            let _ = reply.send(Ok(()));
        }
    }
}
