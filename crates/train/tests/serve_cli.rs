//! `train serve` as a process: it listens on 127.0.0.1, takes its API key from the environment,
//! and on SIGTERM or Ctrl-C stops accepting, lets the running request finish and exits 0.
//! `train bench serve` runs end to end with the tiniest settings (no time is asserted).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};

use common::{root, scratch, train_command};

/// Starts `train serve` on port 0 with `extra` arguments and `key` in the environment; the
/// child and the address it printed.
fn serve(extra: &[&str], key: Option<&str>) -> (Child, String) {
    let model = root().join("models/base");
    let mut cmd = train_command();
    cmd.args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("SERVE_API_KEY");
    if let Some(k) = key {
        cmd.env("SERVE_API_KEY", k);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("train serve ended before listening")
            .unwrap();
        if let Some(rest) = line.split("http://").nth(1) {
            break rest
                .trim_end_matches("/v1 (Ctrl-C or SIGTERM to stop)")
                .to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop)); // keep draining stderr
    (child, addr)
}

/// One HTTP/1.1 exchange on a fresh connection: the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[cfg(unix)]
fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) only sends a signal; `pid` is our own child, not yet waited for.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

#[cfg(unix)]
#[test]
fn sigterm_drains_and_exits_0() {
    let (mut child, addr) = serve(&["--drain-timeout", "300"], Some("k3y"));
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(http(&addr, "GET", "/health", "", None).0, 401);
    assert_eq!(http(&addr, "GET", "/health", "", Some("k3y")).0, 200);
    let body = r#"{"model":"base","prompt":"name : Aromi ||","max_tokens":60,"ignore_eos":true,"temperature":0}"#;
    let a = addr.clone();
    let running =
        std::thread::spawn(move || http(&a, "POST", "/v1/completions", body, Some("k3y")));
    // Signal once the request runs.
    let t0 = std::time::Instant::now();
    while !http(&addr, "GET", "/metrics", "", Some("k3y"))
        .1
        .contains("serve_running_sequences 1")
    {
        assert!(t0.elapsed().as_secs() < 30, "the request never ran");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    signal(&child, libc::SIGTERM);
    let (status, answer) = running.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"completion_tokens\":60"), "{answer}");
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(TcpStream::connect(&addr).is_err(), "still listening");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_an_idle_server() {
    let (mut child, addr) = serve(&[], None);
    assert_eq!(http(&addr, "GET", "/v1/models", "", None).0, 200);
    signal(&child, libc::SIGINT);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn bench_serve_runs_with_tiny_settings() {
    let work = scratch("bench-serve");
    let out = train_command()
        .args([
            "bench",
            "serve",
            "--adapters",
            "2",
            "--switch",
            "2",
            "--concurrency",
            "2",
        ])
        .args([
            "--requests",
            "4",
            "--max-tokens",
            "3",
            "--rank",
            "2",
            "--soak",
            "1",
        ])
        .args(["--work-dir", work.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cases: Vec<&str> = rows.iter().filter_map(|r| r["case"].as_str()).collect();
    assert_eq!(cases, ["base", "mixed 2", "merged", "switch 2"]);
    for r in rows.iter().filter(|r| r["case"].is_string()) {
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["requests"], 4, "{r}");
    }
    assert!(
        rows.iter()
            .any(|r| r["soak_seconds"] == 1.0 && r["failed"] == 0)
    );
    assert!(rows.iter().any(|r| r["rss_per_adapter_bytes"].is_number()));
    // The bank holds each adapter once: its stack bytes per adapter are the adapter's own
    // weights plus one scale per site and slot (2 adapters in 2 slots: no free slot).
    let memory = rows
        .iter()
        .find(|r| r["bank_bytes_per_adapter"].is_number())
        .expect("a memory note");
    let ratio = memory["bank_bytes_per_adapter"].as_f64().unwrap()
        / memory["adapter_bytes"].as_f64().unwrap();
    assert!((1.0..1.01).contains(&ratio), "{memory}");
    assert!(rows.iter().any(|r| {
        r["adapter_load_idle_ms_median"]
            .as_f64()
            .is_some_and(|v| v > 0.0)
    }));
    let _ = std::fs::remove_dir_all(work);
}

/// `--quantize nf4` serves QLoRA's 4-bit base: at temperature 0 the server completes a prompt
/// as `train generate --quantize nf4` does, and, over a long completion, not as the f32 base.
#[cfg(unix)]
#[test]
fn serve_quantize_nf4_serves_the_4bit_base() {
    let prompt = "name : Aromi | food : Chinese ||";
    let model = root().join("models/base");
    let out = train_command()
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
        ])
        .args(["--max-new-tokens", "12", "--quantize", "nf4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    let generated = generated
        .trim_end_matches('\n')
        .strip_prefix(prompt)
        .unwrap();
    let complete = |extra: &[&str]| -> serde_json::Value {
        let (mut child, addr) = serve(extra, None);
        let body = serde_json::json!({"model": "base", "prompt": prompt, "max_tokens": 12,
            "temperature": 0, "logprobs": 1})
        .to_string();
        let (status, answer) = http(&addr, "POST", "/v1/completions", &body, None);
        assert_eq!(status, 200, "{answer}");
        signal(&child, libc::SIGINT);
        assert_eq!(child.wait().unwrap().code(), Some(0));
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        answer["choices"][0].clone()
    };
    let (nf4, f32) = (complete(&["--quantize", "nf4"]), complete(&[]));
    assert_eq!(nf4["text"], generated, "served vs generated, NF4 base");
    let logprobs = |c: &serde_json::Value| c["logprobs"]["token_logprobs"].clone();
    assert!(
        logprobs(&nf4).as_array().is_some_and(|a| !a.is_empty()),
        "{nf4}"
    );
    assert_ne!(
        logprobs(&nf4),
        logprobs(&f32),
        "NF4 changes the base's probabilities"
    );
}
