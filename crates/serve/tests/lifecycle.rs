//! Adapters come and go while requests run, and the server stops gracefully:
//! 1. loading and unloading under load: requests running on an adapter being unloaded finish;
//!    later ones get 404; a newly loaded adapter serves at once;
//! 2. shutdown: new connections are refused, the running request finishes, the server returns.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_under_load() {
    let (server, url, root) = start_on(&e2e(), 3, |c| c.discover = false); // none loaded
    let adapters = format!("{url}/v1/adapters");
    for name in ["a0", "a1"] {
        let (s, v) = post(&adapters, &json!({"name": name, "path": name})).await;
        assert_eq!(s, 200, "{v}");
    }
    // Long requests on a0 and a1 and the base, running while a0 is unloaded and a2 loaded.
    let running: Vec<_> = ["a0", "a0", "a1", "base"]
        .into_iter()
        .map(|m| {
            let url = url.clone();
            let body = json!({"model": m, "prompt": "abc", "max_tokens": 40, "temperature": 0,
                              "ignore_eos": true});
            tokio::spawn(async move { post(&format!("{url}/v1/completions"), &body).await })
        })
        .collect();
    wait_running(&url).await;
    let unload = {
        let url = adapters.clone();
        tokio::spawn(async move { client().delete(format!("{url}/a0")).send().await.unwrap() })
    };
    let (s, v) = post(&adapters, &json!({"name": "a2", "path": "a2"})).await;
    assert_eq!(s, 200, "{v}");
    let answer = complete(&url, "a2", "hello", 5).await;
    assert_eq!(
        answer,
        offline_on(&e2e(), Some(&root.join("a2")), "hello", 5, &[])
    );
    for t in running {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 40);
    }
    assert_eq!(unload.await.unwrap().status(), 200);
    let (s, v) = post(
        &format!("{url}/v1/completions"),
        &json!({"model": "a0", "prompt": "abc", "max_tokens": 2}),
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let (_, models) = get(&format!("{url}/v1/models")).await;
    assert!(
        models.contains("\"a2\"") && !models.contains("\"a0\""),
        "{models}"
    );
    server.shutdown();
    server.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_running_requests_and_refuses_new_ones() {
    let (server, url, _root) = start_on(&e2e(), 0, |c| c.max_batch = 1);
    let body = json!({"model": "base", "prompt": "abc", "max_tokens": 40, "temperature": 0,
                      "ignore_eos": true});
    let running = {
        let (url, body) = (url.clone(), body.clone());
        tokio::spawn(async move { post(&format!("{url}/v1/completions"), &body).await })
    };
    wait_running(&url).await;
    server.shutdown();
    let (s, v) = running.await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 40);
    tokio::task::spawn_blocking(move || server.wait().unwrap())
        .await
        .unwrap();
    assert!(
        client().get(format!("{url}/health")).send().await.is_err(),
        "the server still accepts connections"
    );
}

/// Waits until the engine runs a sequence.
async fn wait_running(url: &str) {
    let t0 = std::time::Instant::now();
    loop {
        let (_, text) = get(&format!("{url}/metrics")).await;
        if metric(&text, "serve_running_sequences").unwrap_or(0.0) > 0.0 {
            return;
        }
        assert!(t0.elapsed().as_secs() < 20, "nothing runs: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
