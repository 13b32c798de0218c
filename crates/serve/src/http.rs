//! The routes, and what every request passes first: the API key (when one is set) and the body
//! size limit.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/completions` | [`crate::completions`] |
//! | `GET /v1/models` | the base model and every loaded adapter |
//! | `POST /v1/adapters` `{"name", "path"}` | loads a PEFT adapter from under an adapter root |
//! | `DELETE /v1/adapters/{name}` | unloads it once the requests on it have finished |
//! | `GET /health` | `{"status": "ok"}` |
//! | `GET /metrics` | Prometheus' text format ([`crate::metrics`]) |

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;
use tokio::sync::oneshot;
use transformer::Tokenizer;

use crate::api::parse_adapter;
use crate::engine::reader::Reader;
use crate::engine::{Command, Engine, Refusal, Shared};
use crate::error::ApiError;
use crate::paths::Roots;

/// Size limits of requests.
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Largest request body (413 beyond).
    pub max_body_bytes: usize,
    /// Longest prompt, in bytes of text (413 beyond).
    pub max_prompt_bytes: usize,
    /// Most prompts in one request (413 beyond).
    pub max_prompts: usize,
    /// Most prompts waiting for admission, over all requests (429 beyond).
    pub max_queue: usize,
}

pub struct App {
    pub shared: Arc<Shared>,
    pub commands: Mutex<Sender<Command>>,
    pub tokenizer: Arc<Tokenizer>,
    pub limits: RequestLimits,
    pub n_ctx: usize,
    pub kv_bytes_per_position: u64,
    pub kv_budget_bytes: u64,
    pub api_key: Option<String>,
    pub roots: Roots,
    /// Reads and checks adapters for `POST /v1/adapters` off the engine's thread.
    pub reader: Reader,
}

pub type AppState = Arc<App>;

/// The engine thread has stopped and takes no more commands.
#[derive(Clone, Copy, Debug)]
pub struct EngineStopped;

impl App {
    /// Sends a command to the engine; an error when it has stopped.
    pub fn send(&self, c: Command) -> Result<(), EngineStopped> {
        let commands = self.commands.lock().expect("no panic holding it");
        commands.send(c).map_err(|_| EngineStopped)
    }
}

pub fn router(app: AppState) -> Router {
    let max_body = app.limits.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(crate::completions::completions))
        .route("/v1/models", get(models))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

/// Equal strings, in a time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn authenticate(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.trim().as_bytes(), key.as_bytes())) {
            app.shared.metrics.refuse(401);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this server needs an API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {}: the routes are POST /v1/completions, GET /v1/models, \
             POST /v1/adapters, DELETE /v1/adapters/NAME, GET /health, GET /metrics",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.shared.metrics.render(),
    )
}

async fn models(State(app): State<AppState>) -> impl IntoResponse {
    let base = &app.shared.base_name;
    let mut data = vec![json!({"id": base, "object": "model", "created": 0,
                               "owned_by": "serve", "root": base, "parent": null})];
    let adapters = app
        .shared
        .adapters
        .read()
        .expect("no panic holding it")
        .clone();
    for a in adapters {
        data.push(
            json!({"id": a.name, "object": "model", "created": a.created,
                         "owned_by": "serve", "root": a.name, "parent": base,
                         "adapter_bytes": a.bytes}),
        );
    }
    axum::Json(json!({"object": "list", "data": data}))
}

async fn load_adapter(
    State(app): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let result = async {
        let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let (name, path) = parse_adapter(&body)?;
        let dir = app.roots.resolve(&path)?;
        Engine::name_free(&app.shared, &name).map_err(refusal)?;
        // Files are read and checked here, on a blocking task, while the engine decodes; the
        // engine only writes the ready weights into the bank.
        let (reader, n, d) = (app.reader.clone(), name.clone(), dir.clone());
        let ready = tokio::task::spawn_blocking(move || reader.read(&n, &d))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading the adapter failed: {e}"),
                )
            })?
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        let (reply, answer) = oneshot::channel();
        app.send(Command::Load {
            name,
            dir,
            ready,
            reply,
        })
        .map_err(|EngineStopped| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
        let info = answer
            .await
            .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?
            .map_err(refusal)?;
        Ok::<_, ApiError>(axum::Json(json!({"id": info.name, "object": "model",
                             "created": info.created, "adapter_bytes": info.bytes})))
    }
    .await;
    if let Err(e) = &result {
        app.shared.metrics.refuse(e.status.as_u16());
    }
    result
}

/// The engine's refusal as an answer.
fn refusal((status, message): Refusal) -> ApiError {
    ApiError::new(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        message,
    )
}

async fn unload_adapter(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (reply, answer) = oneshot::channel();
    let gone = || ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    app.send(Command::Unload {
        name: name.clone(),
        reply,
    })
    .map_err(|EngineStopped| gone())?;
    answer
        .await
        .map_err(|_| gone())?
        .map_err(|(status, message)| {
            app.shared.metrics.refuse(status);
            ApiError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                message,
            )
        })?;
    Ok(axum::Json(
        json!({"id": name, "object": "model", "deleted": true}),
    ))
}
