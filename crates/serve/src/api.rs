//! The body of `POST /v1/completions`, read field by field from JSON so that every refusal names
//! the field at fault (serde's derive would say "invalid type at line 1 column 40").
//!
//! Fields, as OpenAI's completions API has them: `model` (required), `prompt` (a string or a
//! list of strings), `max_tokens` (default 16), `temperature` (default 1, 0 = greedy, at most 2),
//! `top_p` (default 1), `stop` (a string or up to 4), `seed`, `stream`, `stream_options`
//! (`include_usage`), `logprobs` (0 to 5 most likely tokens per position), `n` and `best_of`
//! (only 1), `echo` (only false), `user` (ignored), and vLLM's
//! `ignore_eos` (go on past the end-of-text token, for benchmarks). Other fields are ignored, as vLLM does.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most stop strings in one request (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// Most alternatives per position that `logprobs` may ask for (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 5;

/// How to pick tokens and when to stop, for every prompt of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: Option<f32>,
    /// Prompt i of the request samples with `seed + i` (as `train generate` does).
    pub seed: u64,
    pub stop: Vec<String>,
    /// Report the log-probability of each token and of this many alternatives.
    pub logprobs: Option<usize>,
    /// Go on past the end-of-text token (vLLM's extension, for benchmarks).
    pub ignore_eos: bool,
}

/// A parsed completion request.
#[derive(Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompts: Vec<String>,
    pub sampling: Sampling,
    pub stream: bool,
    pub include_usage: bool,
}

fn expected(field: &str, what: &str, found: &Value) -> ApiError {
    let kind = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    ApiError::field(field, format!("`{field}`: expected {what}, found {kind}"))
}

/// A field that may be absent or null.
fn opt<'a>(body: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    body.get(field).filter(|v| !v.is_null())
}

fn opt_f32(body: &Map<String, Value>, field: &str) -> Result<Option<f32>, ApiError> {
    opt(body, field)
        .map(|v| {
            v.as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| expected(field, "a number", v))
        })
        .transpose()
}

fn opt_u64(body: &Map<String, Value>, field: &str) -> Result<Option<u64>, ApiError> {
    opt(body, field)
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| expected(field, "a non-negative integer", v))
        })
        .transpose()
}

fn opt_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    opt(body, field)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| expected(field, "true or false", v))
        })
        .transpose()
}

/// A string, or a list of strings.
fn strings(field: &str, v: &Value) -> Result<Vec<String>, ApiError> {
    let what = "a string or a list of strings";
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(expected(field, what, other)),
            })
            .collect(),
        other => Err(expected(field, what, other)),
    }
}

/// Reads a completion request from the raw body.
pub fn parse_completion(bytes: &[u8]) -> Result<CompletionRequest, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object with at least `model` and `prompt`",
        ));
    };
    let model = match body.get("model") {
        Some(Value::String(s)) => s.clone(),
        None => return Err(ApiError::field("model", "`model` is required")),
        Some(other) => return Err(expected("model", "a string", other)),
    };
    let prompts = match body.get("prompt") {
        None => return Err(ApiError::field("prompt", "`prompt` is required")),
        Some(v) => strings("prompt", v)?,
    };
    if prompts.is_empty() {
        return Err(ApiError::field("prompt", "`prompt` is an empty list"));
    }
    let max_tokens = opt_u64(&body, "max_tokens")?.unwrap_or(16);
    if max_tokens == 0 {
        return Err(ApiError::field(
            "max_tokens",
            "`max_tokens` must be at least 1",
        ));
    }
    let temperature = opt_f32(&body, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field(
            "temperature",
            format!("`temperature` must be between 0 and 2, found {temperature}"),
        ));
    }
    let top_p = opt_f32(&body, "top_p")?;
    if let Some(p) = top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(ApiError::field(
            "top_p",
            format!("`top_p` must be in (0, 1], found {p}"),
        ));
    }
    let stop = match opt(&body, "stop") {
        None => Vec::new(),
        Some(v) => strings("stop", v)?,
    };
    if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
        return Err(ApiError::field(
            "stop",
            format!(
                "`stop`: expected at most {MAX_STOPS} non-empty strings, found {} ({} empty)",
                stop.len(),
                stop.iter().filter(|s| s.is_empty()).count()
            ),
        ));
    }
    let logprobs = opt_u64(&body, "logprobs")?.map(|n| n as usize);
    if let Some(n) = logprobs.filter(|&n| n > MAX_LOGPROBS) {
        return Err(ApiError::field(
            "logprobs",
            format!("`logprobs` must be at most {MAX_LOGPROBS}, found {n}"),
        ));
    }
    for field in ["n", "best_of"] {
        if let Some(n) = opt_u64(&body, field)?.filter(|&n| n != 1) {
            return Err(ApiError::field(
                field,
                format!("`{field}`: only 1 completion per prompt is served, found {n}"),
            ));
        }
    }
    if opt_bool(&body, "echo")? == Some(true) {
        return Err(ApiError::field(
            "echo",
            "`echo`: echoing the prompt is not served",
        ));
    }
    let include_usage = match opt(&body, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|e| ApiError::field("stream_options", e.message))?
            .unwrap_or(false),
        Some(other) => return Err(expected("stream_options", "an object", other)),
    };
    let seed = opt_u64(&body, "seed")?.unwrap_or_else(rand::random);
    Ok(CompletionRequest {
        model,
        prompts,
        sampling: Sampling {
            max_tokens: max_tokens as usize,
            temperature,
            top_p,
            seed,
            stop,
            logprobs,
            ignore_eos: opt_bool(&body, "ignore_eos")?.unwrap_or(false),
        },
        stream: opt_bool(&body, "stream")?.unwrap_or(false),
        include_usage,
    })
}

/// The body of `POST /v1/adapters`: `{"name": ..., "path": ...}`.
pub fn parse_adapter(bytes: &[u8]) -> Result<(String, String), ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object {\"name\": ..., \"path\": ...}",
        ));
    };
    let field = |f: &str| match body.get(f) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None => Err(ApiError::field(f, format!("`{f}` is required"))),
        Some(other) => Err(expected(f, "a non-empty string", other)),
    };
    let name = field("name")?;
    check_name(&name)?;
    Ok((name, field("path")?))
}

/// Adapter names appear in URLs and metrics labels: letters, digits, `-`, `_`, `.`, at most 64.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            "name",
            format!("`name` {name:?}: expected 1 to 64 letters, digits, `-`, `_` or `.`"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_full_request() {
        let r = parse_completion(
            br#"{"model":"m","prompt":["a","b"],"max_tokens":5,"temperature":0,
                "top_p":0.5,"stop":"x","seed":3,"stream":true,"logprobs":2,
                "stream_options":{"include_usage":true},"user":"u"}"#,
        )
        .unwrap();
        assert_eq!(r.prompts, ["a", "b"]);
        assert_eq!(r.sampling.max_tokens, 5);
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_p, Some(0.5));
        assert_eq!(r.sampling.stop, ["x"]);
        assert_eq!(r.sampling.seed, 3);
        assert_eq!(r.sampling.logprobs, Some(2));
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: [(&[u8], &str); 10] = [
            (br#"{"prompt":"a"}"#, "model"),
            (br#"{"model":1,"prompt":"a"}"#, "model"),
            (br#"{"model":"m"}"#, "prompt"),
            (br#"{"model":"m","prompt":[1]}"#, "prompt"),
            (
                br#"{"model":"m","prompt":"a","max_tokens":-1}"#,
                "max_tokens",
            ),
            (
                br#"{"model":"m","prompt":"a","temperature":"hot"}"#,
                "temperature",
            ),
            (br#"{"model":"m","prompt":"a","top_p":0}"#, "top_p"),
            (
                br#"{"model":"m","prompt":"a","stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
            (br#"{"model":"m","prompt":"a","logprobs":9}"#, "logprobs"),
            (br#"{"model":"m","prompt":"a","n":2}"#, "n"),
        ];
        for (body, field) in cases {
            let e = parse_completion(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
            assert!(e.message.contains(field), "{}", e.message);
        }
        assert!(
            parse_completion(b"{nope")
                .unwrap_err()
                .message
                .contains("JSON")
        );
    }

    #[test]
    fn adapter_names_are_checked() {
        assert!(parse_adapter(br#"{"name":"a-1.x","path":"p"}"#).is_ok());
        for body in [&br#"{"name":"../x","path":"p"}"#[..], br#"{"name":"a"}"#] {
            assert!(parse_adapter(body).is_err());
        }
    }
}
