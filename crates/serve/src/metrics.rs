//! `GET /metrics` in Prometheus' text format (prometheus-client): requests and tokens by model
//! (the base's name or an adapter's), refusals by status, queue depth, running sequences, batch
//! size and distinct adapters per step, time to first token, generated tokens per second,
//! loaded adapters and their bytes, and the KV cache reserved.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// Every metric the server exports; cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<ModelLabel, Counter>,
    pub prompt_tokens: Family<ModelLabel, Counter>,
    pub generated_tokens: Family<ModelLabel, Counter>,
    pub refused: Family<StatusLabel, Counter>,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub adapters: Gauge,
    /// Bytes the adapters take where they are served (the bank's stacks).
    pub adapter_bytes: Gauge,
    pub kv_reserved_bytes: Gauge,
    pub batch_size: Histogram,
    /// Distinct adapters (the base not counted) among a step's sequences.
    pub step_adapters: Histogram,
    pub time_to_first_token: Histogram,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("serve");
        let m = Metrics {
            requests: Family::default(),
            prompt_tokens: Family::default(),
            generated_tokens: Family::default(),
            refused: Family::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            adapters: Gauge::default(),
            adapter_bytes: Gauge::default(),
            kv_reserved_bytes: Gauge::default(),
            batch_size: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            step_adapters: Histogram::new([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            time_to_first_token: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            tokens_per_second: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "Completion requests served, by model",
            m.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens, by model",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Generated tokens, by model",
            m.generated_tokens.clone(),
        );
        r.register(
            "refused_requests",
            "Requests answered with an error, by status",
            m.refused.clone(),
        );
        r.register(
            "queue_depth",
            "Sequences waiting for admission",
            m.queue_depth.clone(),
        );
        r.register(
            "running_sequences",
            "Sequences being decoded",
            m.running.clone(),
        );
        r.register("adapters_loaded", "Adapters loaded", m.adapters.clone());
        r.register(
            "adapter_memory_bytes",
            "Bytes of the loaded adapters where they are served (the bank's stacks: weights, \
             rank padding, free slots)",
            m.adapter_bytes.clone(),
        );
        r.register(
            "kv_cache_reserved_bytes",
            "KV cache reserved by admitted sequences",
            m.kv_reserved_bytes.clone(),
        );
        r.register(
            "batch_size",
            "Sequences per decoding step",
            m.batch_size.clone(),
        );
        r.register(
            "step_adapters",
            "Distinct adapters per decoding step (the base not counted)",
            m.step_adapters.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "From request to its first generated token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "generated_tokens_per_second",
            "Generated tokens per second over the last few seconds",
            m.tokens_per_second.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn model(&self, model: &str) -> ModelLabel {
        ModelLabel {
            model: model.to_string(),
        }
    }

    pub fn refuse(&self, status: u16) {
        self.refused.get_or_create(&StatusLabel { status }).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
