//! Bad input, overload and refusals get answers, not hangs: each case of the issue with its
//! status and a message naming what is wrong.

mod common;

use common::*;
use serde_json::{Value, json};

/// POST raw bytes; status, Retry-After, JSON body.
async fn raw(url: &str, body: Vec<u8>, key: Option<&str>) -> (u16, Option<String>, Value) {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_answered_with_their_reason() {
    let (server, url, root) = start(1, |c| {
        c.requests.max_body_bytes = 4096;
        c.requests.max_prompt_bytes = 100;
        c.requests.max_prompts = 3;
    });
    let completions = format!("{url}/v1/completions");
    let send = |body: Value| raw(&completions, body.to_string().into_bytes(), None);
    // Malformed JSON, and a field of the wrong type: 400 naming it.
    let (s, _, v) = raw(&completions, b"{\"model\": ".to_vec(), None).await;
    assert_eq!(s, 400);
    assert!(message(&v).contains("JSON"), "{v}");
    let (s, _, v) = send(json!({"model": "base", "prompt": "hi", "max_tokens": "ten"})).await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("max_tokens")),
        "{v}"
    );
    assert!(message(&v).contains("max_tokens"), "{v}");
    // Unknown model: 404 listing the loaded names.
    let (s, _, v) = send(json!({"model": "nope", "prompt": "hi"})).await;
    assert_eq!(s, 404);
    assert!(message(&v).contains("base, a0"), "{v}");
    // Beyond the context (64): 400 with both numbers.
    let (s, _, v) = send(json!({"model": "base", "prompt": "0123456789", "max_tokens": 60})).await;
    assert_eq!(s, 400);
    assert!(
        message(&v).contains("10 tokens") && message(&v).contains("60"),
        "{v}"
    );
    // Sizes: 413 for the body, a prompt and the number of prompts.
    let (s, _, _) = send(json!({"model": "base", "prompt": "x".repeat(5000)})).await;
    assert_eq!(s, 413);
    let (s, _, v) = send(json!({"model": "base", "prompt": "x".repeat(101)})).await;
    assert_eq!(s, 413);
    assert!(message(&v).contains("101 bytes"), "{v}");
    let (s, _, _) = send(json!({"model": "base", "prompt": ["a", "b", "c", "d"]})).await;
    assert_eq!(s, 413);
    // An adapter that fails validation (made for another base: C = 128, not 64): 400 with the
    // loader's message.
    let other = temp_dir("other");
    write_adapters_for(&e2e(), &other, 1);
    std::fs::rename(other.join("a0"), root.join("bad")).unwrap();
    let adapters = format!("{url}/v1/adapters");
    let (s, _, v) = raw(&adapters, br#"{"name":"bad","path":"bad"}"#.to_vec(), None).await;
    assert_eq!(s, 400, "{v}");
    assert!(message(&v).contains("adapter_model.safetensors"), "{v}");
    // A name in use: 409. Unloading what is not loaded: 404.
    let (s, _, _) = raw(&adapters, br#"{"name":"a0","path":"a0"}"#.to_vec(), None).await;
    assert_eq!(s, 409);
    let r = client()
        .delete(format!("{adapters}/zzz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_paths_outside_the_roots_are_refused_alike() {
    let (server, url, root) = start(1, |_| {});
    let outside = temp_dir("outside");
    write_adapters(&outside, 1); // a valid adapter, but not under the root
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.join("a0"), root.join("link")).unwrap();
    let adapters = format!("{url}/v1/adapters");
    let mut refusals = Vec::new();
    let mut paths = vec![
        outside.join("a0").display().to_string(),
        "../".to_string() + outside.file_name().unwrap().to_str().unwrap() + "/a0",
        "/etc".to_string(),
        "/no/such/dir".to_string(),
        "a0/../../x".to_string(),
    ];
    if cfg!(unix) {
        paths.push("link".into());
    }
    for p in &paths {
        let body = json!({"name": "x", "path": p}).to_string().into_bytes();
        let (s, _, v) = raw(&adapters, body, None).await;
        assert_eq!(s, 403, "{p}: {v}");
        refusals.push(message(&v).to_string());
    }
    // The same words whether the path exists or not: nothing is revealed about the file.
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
    // Under the root: loads.
    let (s, _, v) = raw(&adapters, br#"{"name":"again","path":"a0"}"#.to_vec(), None).await;
    assert_eq!(s, 200, "{v}");
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_every_route() {
    let (server, url, _root) = start(0, |c| c.api_key = Some("sesame".into()));
    let body = br#"{"model":"base","prompt":"hi","max_tokens":2}"#.to_vec();
    let completions = format!("{url}/v1/completions");
    assert_eq!(raw(&completions, body.clone(), None).await.0, 401);
    assert_eq!(raw(&completions, body.clone(), Some("wrong")).await.0, 401);
    assert_eq!(raw(&completions, body, Some("sesame")).await.0, 200);
    for path in ["/v1/models", "/health", "/metrics"] {
        let r = client().get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = client()
            .get(format!("{url}{path}"))
            .bearer_auth("sesame")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_the_kv_budget_admits_in_turn() {
    // No queue at all: every request is refused at once, with Retry-After.
    let (server, url, _root) = start(0, |c| c.requests.max_queue = 0);
    let body = br#"{"model":"base","prompt":"hi","max_tokens":2}"#.to_vec();
    let (s, retry, v) = raw(&format!("{url}/v1/completions"), body, None).await;
    assert_eq!((s, retry.as_deref()), (429, Some("1")), "{v}");
    server.shutdown();
    server.wait().unwrap();
    // A KV budget of one sequence (2 layers · 64 wide · 2 · 4 bytes = 1 KiB per position, 40
    // positions): concurrent requests are admitted one at a time and all finish; one that
    // could never fit is refused.
    let (server, url, _root) = start(0, |c| c.kv_cache_mb = 40.0 / 1024.0);
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let url = url.clone();
            let body = json!({"model": "base", "prompt": format!("p{i}"), "max_tokens": 30});
            tokio::spawn(async move { post(&format!("{url}/v1/completions"), &body).await })
        })
        .collect();
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(
            (s, v["usage"]["completion_tokens"].as_u64()),
            (200, Some(30)),
            "{v}"
        );
    }
    let big = json!({"model": "base", "prompt": "hello", "max_tokens": 50});
    let (s, _, v) = raw(
        &format!("{url}/v1/completions"),
        big.to_string().into_bytes(),
        None,
    )
    .await;
    assert_eq!(s, 400);
    assert!(message(&v).contains("KV cache"), "{v}");
    server.shutdown();
    server.wait().unwrap();
}
