//! The server end to end on the fixture model, over HTTP on 127.0.0.1:
//! 1. plain and streamed completions agree, with usage and finish reasons;
//! 2. greedy answers equal offline generation (`train generate`'s path) for several adapters
//!    and the base in concurrent requests, i.e. sharing batches;
//! 3. one decoding step serves several adapters at once (the engine's per-step count);
//! 4. models listing, health and metrics;
//! 5. a client that goes away mid-stream frees its sequence.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_streamed_completions() {
    let (server, url, _root) = start(1, |_| {});
    let body = json!({"model": "a0", "prompt": ["Hello", "Bye now"], "max_tokens": 7,
                      "temperature": 0, "logprobs": 2});
    let (status, whole) = post(&format!("{url}/v1/completions"), &body).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["usage"]["prompt_tokens"], 5 + 7);
    assert_eq!(whole["usage"]["completion_tokens"], 14);
    assert_eq!(whole["usage"]["total_tokens"], 26);
    for c in whole["choices"].as_array().unwrap() {
        assert_eq!(c["finish_reason"], "length");
        let lp = &c["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), 7);
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
        assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = client()
        .post(format!("{url}/v1/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut texts = [String::new(), String::new()];
    let mut finishes = 0;
    let mut usage = Value::Null;
    for e in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        assert_eq!(chunk["object"], "text_completion");
        if let Some(c) = chunk["choices"].as_array().unwrap().first() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["text"].as_str().unwrap());
            finishes += usize::from(c["finish_reason"] == "length");
        } else {
            usage = chunk["usage"].clone();
        }
    }
    assert_eq!(finishes, 2);
    assert_eq!(usage, whole["usage"]);
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, whole["choices"][i]["text"].as_str().unwrap());
    }
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batches_answer_as_offline_generation() {
    let (server, url, root) = start(3, |_| {});
    // Base and three adapters, two prompts each, different lengths, all at once; one with a
    // stop string.
    let prompts = ["The cat", "A much longer prompt here", "x", "Once upon"];
    let models = ["base", "a0", "a1", "a2"];
    let mut cases = Vec::new();
    for (i, m) in models.iter().enumerate() {
        for (j, p) in prompts.iter().enumerate().filter(|(j, _)| (i + j) % 2 == 0) {
            let max_tokens = 5 + 3 * j;
            cases.push((m.to_string(), p.to_string(), max_tokens));
        }
    }
    let tasks: Vec<_> = cases
        .iter()
        .cloned()
        .map(|(m, p, n)| {
            let url = url.clone();
            tokio::spawn(async move { complete(&url, &m, &p, n).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for ((m, p, n), got) in cases.iter().zip(&answers) {
        let dir = (m != "base").then(|| root.join(m));
        let want = offline(dir.as_deref(), p, *n, &[]);
        assert_eq!(got, &want, "model {m}, prompt {p:?}");
    }
    // The adapters change the answers (else the test would prove nothing).
    let base = offline(None, prompts[0], 11, &[]);
    let adapted = offline(Some(&root.join("a0")), prompts[0], 11, &[]);
    assert_ne!(base, adapted);
    // A stop string cuts the text before it, as offline.
    let full = offline(Some(&root.join("a1")), "Once upon", 12, &[]);
    let stop: String = full.chars().skip(4).take(2).collect();
    let (status, body) = post(
        &format!("{url}/v1/completions"),
        &json!({"model": "a1", "prompt": "Once upon", "max_tokens": 12, "temperature": 0,
                "stop": stop}),
    )
    .await;
    assert_eq!(status, 200);
    let want = offline(Some(&root.join("a1")), "Once upon", 12, &[&stop]);
    assert_eq!(body["choices"][0]["text"], want.as_str());
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_decoding_step_serves_several_adapters() {
    // Three adapters and the base, 40 tokens each, all at once: their sequences overlap, and
    // the engine's per-step count of distinct adapters shows steps serving two or more of them
    // in one forward, while each answer stays the offline one.
    let (server, url, root) = start(3, |_| {});
    let models = ["a0", "a1", "a2", "base"];
    let tasks: Vec<_> = models
        .iter()
        .map(|m| {
            let (url, m) = (url.clone(), m.to_string());
            tokio::spawn(async move { complete(&url, &m, "Hello", 40).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for (m, got) in models.iter().zip(&answers) {
        let dir = (*m != "base").then(|| root.join(m));
        assert_eq!(got, &offline(dir.as_deref(), "Hello", 40, &[]), "model {m}");
    }
    let (_, text) = get(&format!("{url}/metrics")).await;
    let steps = metric(&text, "serve_step_adapters_count").unwrap();
    let at_most_one = metric(&text, r#"serve_step_adapters_bucket{le="1.0"}"#).unwrap();
    assert!(
        steps - at_most_one >= 1.0,
        "no step served two adapters at once ({steps} steps)\n{text}"
    );
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let (server, url, _root) = start(2, |_| {});
    let (status, text) = get(&format!("{url}/v1/models")).await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "a0", "a1"]);
    assert_eq!(get(&format!("{url}/health")).await.0, 200);
    complete(&url, "a1", "hi", 3).await;
    let (status, text) = get(&format!("{url}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, r#"serve_requests_total{model="a1"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, r#"serve_generated_tokens_total{model="a1"}"#),
        Some(3.0)
    );
    assert_eq!(metric(&text, "serve_adapters_loaded"), Some(2.0));
    // The bank's stacks hold each adapter once: 2 slots (r 4) at q and v of both layers
    // (64 → 64; PEFT's file holds them as one c_attn LoRA of rank 8, which the bank splits
    // back), and at c_fc (64 → 256) of both layers, where a0's slot is zero; A, B, scales.
    let qv = 2 * (4 * 64 + 64 * 4 + 1) * 4;
    let fc = 2 * (4 * 64 + 256 * 4 + 1) * 4;
    assert_eq!(
        metric(&text, "serve_adapter_memory_bytes"),
        Some((4 * qv + 2 * fc) as f64)
    );
    assert_eq!(
        metric(&text, "serve_time_to_first_token_seconds_count"),
        Some(1.0)
    );
    assert!(text.contains("serve_batch_size_bucket"), "{text}");
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_its_sequence() {
    let (server, url, _root) = start_on(&e2e(), 0, |c| c.max_batch = 1);
    let mut resp = client()
        .post(format!("{url}/v1/completions"))
        .json(
            &json!({"model": "base", "prompt": "go", "max_tokens": 100, "stream": true,
                      "ignore_eos": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    // With one sequence per step, the next request runs only once the first is gone; and the
    // metrics show nothing left running.
    let t0 = std::time::Instant::now();
    complete(&url, "base", "next", 2).await;
    loop {
        let (_, text) = get(&format!("{url}/metrics")).await;
        let tokens = metric(&text, r#"serve_generated_tokens_total{model="base"}"#).unwrap();
        if metric(&text, "serve_running_sequences") == Some(0.0) {
            assert!(
                tokens < 102.0,
                "the abandoned sequence ran to its end: {tokens}"
            );
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 20,
            "a sequence is still running: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.shutdown();
    server.wait().unwrap();
}
