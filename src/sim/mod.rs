//! A simulated LLM server speaking OpenAI's wire format over real HTTP: JSON and SSE
//! responses with `usage`, `stream_options.include_usage`, token-by-token timing and a
//! concurrency cap that queues like a GPU server's batch (and answers 429 past its queue).
//!
//! It speaks OpenAI's own dialect by default, or a self-hosted engine's ([`Dialect`]): that
//! engine's JSON spacing and escapes, its placement of `usage` in streams, its strict
//! headers, and its tokenize endpoints, with a tokenizer and chat template its usage agrees
//! with (`tokenizer`). Whatever the dialect, it also serves Anthropic's Messages API
//! (`anthropic`), with Anthropic's headers, errors, events and prompt caching.
//!
//! It is the upstream of the demo, the tests and the benchmarks, and users can run it
//! (`tollgate simulate`) to try a config. Faults can be switched on at run time through
//! [`Knobs`] to exercise the gateway's error paths.

mod anthropic;
pub mod dialect;
mod stream;
pub mod tokenizer;

pub use dialect::Dialect;

use crate::server::{self, ServeOptions};
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stream::{SimBody, TokenStream};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Model ids served; an empty list accepts any model.
    pub models: Vec<String>,
    /// When set, requests must carry `Authorization: Bearer <api_key>` (Anthropic's Messages
    /// API takes it in `x-api-key` too).
    pub api_key: Option<String>,
    /// Requests generating at once (a GPU server's batch size).
    pub max_concurrency: usize,
    /// Requests waiting for a slot; past it, 429.
    pub max_queue: usize,
    pub time_to_first_token: Duration,
    pub token_interval: Duration,
    /// Tokens generated when the request sets no lower `max_tokens`.
    pub completion_tokens: u32,
    /// Generates `completion_tokens` whatever `max_tokens` says, as a server with a broken
    /// or missing length limit would: what the gateway's stream cut is for.
    pub ignores_max_tokens: bool,
    pub embedding_dims: usize,
    /// Which engine it answers like.
    pub dialect: Dialect,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            api_key: None,
            max_concurrency: 64,
            max_queue: 1024,
            time_to_first_token: Duration::ZERO,
            token_interval: Duration::ZERO,
            completion_tokens: 16,
            ignores_max_tokens: false,
            embedding_dims: 16,
            dialect: Dialect::OpenAi,
        }
    }
}

/// Faults that tests switch on while the simulator runs; zero means off.
#[derive(Debug, Default)]
pub struct Knobs {
    /// Answer every request with this status and an OpenAI error body.
    pub fail_status: AtomicU16,
    /// Wait this long before sending response headers.
    pub headers_delay_ms: AtomicU64,
    /// Break streams after this many tokens: the connection drops, or, on Anthropic's
    /// Messages API, an `overloaded_error` event ends the stream, as Anthropic's do.
    pub break_after_tokens: AtomicU32,
    /// Pause this long before this token index (1-based) of a stream; with `stall_before_token`.
    pub stall_ms: AtomicU64,
    pub stall_before_token: AtomicU32,
    /// How `usage` is reported: [`USAGE_NORMAL`], [`USAGE_OMITTED`] or one of the broken ones.
    pub usage_mode: AtomicU8,
    /// Prompt tokens reported as served from the provider's cache.
    pub cached_tokens: AtomicU32,
    /// `Retry-After` seconds sent with a `fail_status` of 429; 0 sends the default, 2.
    pub retry_after_s: AtomicU32,
    /// Crashed: streams break at their next token and new requests lose their connection.
    pub killed: AtomicBool,
    /// The event of this token (1-based) of a stream is cut in half: not JSON.
    pub malformed_at_token: AtomicU32,
    /// Keep the bytes of each stream in [`Stats::last_stream`].
    pub record_streams: AtomicBool,
    /// Anthropic's load shedding: Messages API requests are answered 529 `overloaded_error`.
    pub overloaded: AtomicBool,
}

pub const USAGE_NORMAL: u8 = 0;
/// Like servers that report no usage (and ignore `include_usage`); llama.cpp's `timings` go too.
pub const USAGE_OMITTED: u8 = 1;
/// A `usage` object with nonsense in it.
pub const USAGE_MALFORMED: u8 = 2;
/// Negative counts.
pub const USAGE_NEGATIVE: u8 = 3;
/// `usage` is not an object (an array of the counts).
pub const USAGE_WRONG_TYPE: u8 = 4;
/// A prompt count no request can have (`u64::MAX`).
pub const USAGE_HUGE: u8 = 5;

/// What the simulator saw, for tests to assert on.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub streams_completed: AtomicU64,
    /// Streams whose client (the gateway) went away before the end.
    pub streams_cancelled: AtomicU64,
    pub tokens_generated: AtomicU64,
    /// Prompt tokens of every request the simulator answered with usage.
    pub prompt_tokens: AtomicU64,
    pub generating: AtomicUsize,
    pub peak_generating: AtomicUsize,
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub last_body: Mutex<Option<Bytes>>,
    /// Calls to the tokenize endpoints (not counted in `requests`).
    pub tokenize_requests: AtomicU64,
    /// Every byte of the last stream sent, with [`Knobs::record_streams`] on.
    pub last_stream: Mutex<Option<Bytes>>,
}

struct State {
    cfg: SimConfig,
    knobs: Arc<Knobs>,
    stats: Arc<Stats>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    next_id: AtomicU64,
    prompt_cache: Mutex<anthropic::PromptCache>,
}

/// A running simulator.
pub struct Sim {
    pub addr: SocketAddr,
    pub knobs: Arc<Knobs>,
    pub stats: Arc<Stats>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sim {
    /// Starts on an ephemeral loopback port.
    pub async fn spawn(cfg: SimConfig) -> std::io::Result<Sim> {
        let listener = server::bind(SocketAddr::from(([127, 0, 0, 1], 0)), 4096)?;
        Ok(Self::start(listener, cfg))
    }

    pub fn start(listener: TcpListener, cfg: SimConfig) -> Sim {
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let knobs = Arc::new(Knobs::default());
        let stats = Arc::new(Stats::default());
        let state = Arc::new(State {
            slots: Arc::new(Semaphore::new(cfg.max_concurrency.max(1))),
            cfg,
            knobs: knobs.clone(),
            stats: stats.clone(),
            waiting: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            prompt_cache: Mutex::default(),
        });
        let (shutdown, mut rx) = watch::channel(false);
        let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
        let opts = ServeOptions {
            shutdown_grace: Duration::from_secs(1),
            ..Default::default()
        };
        // The simulator's own tasks: a test stops it with its server, nothing waits for more.
        let tasks = crate::tasks::Tasks::new();
        let task = tasks.spawn({
            let tasks = tasks.clone();
            async move {
                server::serve(listener, service, opts, &tasks, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
            }
        });
        Sim {
            addr,
            knobs,
            stats,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts on a given address: a restarted server comes back where it was.
    pub async fn spawn_at(addr: SocketAddr, cfg: SimConfig) -> std::io::Result<Sim> {
        Ok(Self::start(server::bind(addr, 4096)?, cfg))
    }

    /// Stops accepting and closes connections (after a one-second grace).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Dies like a crashed server: streams in progress break, requests in progress lose their
    /// connection, and the port refuses connections.
    pub async fn kill(self) {
        self.knobs.killed.store(true, Ordering::Relaxed);
        self.stop().await;
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, std::io::Error> {
    // Inference requests only: health probes and token counts would make counts depend on
    // timing.
    let path = req.uri().path();
    let counting = tokenizer::serves(state.cfg.dialect.spec().tokenize, path)
        || path == anthropic::COUNT_TOKENS;
    if req.method() == Method::POST && !counting {
        state.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut seen = req.headers().clone();
        // What the wire brought: not the note this server's own accept loop adds.
        seen.remove(&crate::server::peer::PEER);
        *state
            .stats
            .last_headers
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(seen);
    }
    let resp = respond(&state, req).await.unwrap_or_else(|e| e);
    if state.knobs.killed.load(Ordering::Relaxed) {
        // An error from the service makes hyper drop the connection without an answer.
        return Err(std::io::Error::other("simulated crash"));
    }
    Ok(resp)
}

type Reply = Result<Response<SimBody>, Response<SimBody>>;

async fn respond(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    if req.method() == Method::POST && anthropic::serves(req.uri().path()) {
        // Anthropic's own key header and checks, not the engine's.
        return anthropic::respond(state, req).await;
    }
    let spec = state.cfg.dialect.spec();
    if spec.uuid_request_id
        && req
            .headers()
            .get("x-request-id")
            .is_some_and(|v| !is_uuid(v.as_bytes()))
    {
        // starlette-context's middleware, before any route or key check: 400, no body.
        let mut resp = Response::new(SimBody::full(Bytes::new()));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return Err(resp);
    }
    if let Some(key) = &state.cfg.api_key {
        let ok = req
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == format!("Bearer {key}").as_bytes());
        if !ok {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            ));
        }
    }
    let kind = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => {
            return Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
        }
        (&Method::GET, "/v1/models") => {
            let data: Vec<Value> = state
                .cfg
                .models
                .iter()
                .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "sim"}))
                .collect();
            return Ok(json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": data}),
            ));
        }
        (&Method::POST, "/v1/chat/completions") => Kind::Chat,
        (&Method::POST, "/v1/completions") => Kind::Completion,
        (&Method::POST, "/v1/embeddings") => Kind::Embedding,
        (&Method::POST, path) if tokenizer::serves(spec.tokenize, path) => {
            let path = path.to_string();
            let (_, v) = read_json(req).await?;
            state
                .stats
                .tokenize_requests
                .fetch_add(1, Ordering::Relaxed);
            return tokenizer::answer(spec.tokenize, &path, &v, &state.cfg.models)
                .map(|answer| json_response(StatusCode::OK, &answer))
                .map_err(|(status, message)| {
                    error(status, &message, "invalid_request_error", None)
                });
        }
        _ => {
            return Err(error(
                StatusCode::NOT_FOUND,
                "Unknown request URL",
                "invalid_request_error",
                Some("unknown_url"),
            ))
        }
    };
    let (body, v) = read_json(req).await?;
    *state
        .stats
        .last_body
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(body);
    let model = v["model"].as_str().unwrap_or_default().to_string();
    if !state.cfg.models.is_empty() && !state.cfg.models.contains(&model) {
        return Err(error(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist or you do not have access to it."),
            "invalid_request_error",
            Some("model_not_found"),
        ));
    }
    let stream = v["stream"].as_bool().unwrap_or(false);
    match v.get("stream_options") {
        Some(Value::Null) if spec.stream_options_not_null => {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Failed to deserialize the JSON body into the target type: stream_options: invalid type: null, expected struct StreamOptions",
                "validation",
                None,
            ))
        }
        Some(o) if !o.is_null() && !stream && spec.stream_options_need_stream => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "Stream options can only be defined when `stream=True`.",
                "BadRequestError",
                None,
            ))
        }
        _ => {}
    }

    if let Some((status, retry_after)) = forced_status(&state.knobs).await {
        let mut resp = error(
            status,
            "The simulated server failed as configured.",
            "server_error",
            None,
        );
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        return Err(resp);
    }
    let Some(slot) = admit(state).await else {
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            "The server is busy.",
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        );
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(resp);
    };

    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let created = (crate::clock::unix_now_us() / 1_000_000) as u64;
    if kind == Kind::Embedding {
        return Ok(embeddings(&state.cfg, &v, &model));
    }
    let prompt_tokens = match (spec.template, kind) {
        (Some(template), _) => tokenizer::prompt_tokens(template, kind, &v),
        (None, Kind::Chat) => chat_prompt_tokens(&v["messages"]),
        (None, _) => text_tokens(&v["prompt"]),
    };
    state
        .stats
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let cap = v["max_completion_tokens"]
        .as_u64()
        .or(v["max_tokens"].as_u64())
        .filter(|_| !state.cfg.ignores_max_tokens);
    let n = match cap {
        Some(c) if c < state.cfg.completion_tokens as u64 => c as u32,
        _ => state.cfg.completion_tokens,
    };
    let options = &v["stream_options"];
    let gen = TokenStream {
        kind,
        spec,
        id: format!(
            "{}-sim{id}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            }
        ),
        created,
        model,
        prompt_tokens,
        completion_tokens: n,
        choices: v["best_of"]
            .as_u64()
            .max(v["n"].as_u64())
            .unwrap_or(1)
            .clamp(1, 1024) as u32,
        finish_reason: if cap.is_some_and(|c| c <= n as u64) {
            "length"
        } else {
            "stop"
        },
        include_usage: options["include_usage"].as_bool().unwrap_or(false),
        continuous_usage: options["continuous_usage_stats"].as_bool().unwrap_or(false),
        usage_mode: state.knobs.usage_mode.load(Ordering::Relaxed),
        cached_tokens: state
            .knobs
            .cached_tokens
            .load(Ordering::Relaxed)
            .min(prompt_tokens),
    };
    if stream {
        let body = SimBody::stream(gen, &state.cfg, &state.knobs, slot);
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        Ok(resp)
    } else {
        let total = state.cfg.time_to_first_token + state.cfg.token_interval * n;
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        state
            .stats
            .tokens_generated
            .fetch_add(u64::from(gen.generated()), Ordering::Relaxed);
        drop(slot);
        Ok(json_with(spec.bodies, StatusCode::OK, &gen.full_response()))
    }
}

/// Waits [`Knobs::headers_delay_ms`], then the status [`Knobs::fail_status`] forces, if any,
/// with the `Retry-After` seconds a 429 carries.
async fn forced_status(knobs: &Knobs) -> Option<(StatusCode, Option<u32>)> {
    let delay = knobs.headers_delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = match knobs.fail_status.load(Ordering::Relaxed) {
        0 => return None,
        code => StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let retry_after = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
        match knobs.retry_after_s.load(Ordering::Relaxed) {
            0 => 2,
            s => s,
        }
    });
    Some((status, retry_after))
}

/// A generation slot, queued for like a batching server's; `None` past the queue.
async fn admit(state: &State) -> Option<stream::Slot> {
    if state.waiting.fetch_add(1, Ordering::Relaxed)
        >= state.cfg.max_queue + state.cfg.max_concurrency
    {
        state.waiting.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let permit = state
        .slots
        .clone()
        .acquire_owned()
        .await
        .expect("semaphore is never closed");
    state.waiting.fetch_sub(1, Ordering::Relaxed);
    Some(stream::Slot::new(permit, state.stats.clone()))
}

/// A request's body and its JSON, or the answer that refuses it.
async fn read_json(req: Request<Incoming>) -> Result<(Bytes, Value), Response<SimBody>> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "could not read body",
                "invalid_request_error",
                None,
            )
        })?
        .to_bytes();
    let v = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request: {e}"),
            "invalid_request_error",
            None,
        )
    })?;
    Ok((body, v))
}

/// What Python's `uuid.UUID(s)` accepts: `urn:uuid:` and braces around, hyphens anywhere,
/// 32 hex digits.
fn is_uuid(v: &[u8]) -> bool {
    let s = String::from_utf8_lossy(v)
        .replace("urn:", "")
        .replace("uuid:", "");
    let hex = s.trim_matches(|c| c == '{' || c == '}').replace('-', "");
    hex.len() == 32 && hex.bytes().all(|c| c.is_ascii_hexdigit())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
    Embedding,
}

/// A rough count (4 bytes a token plus OpenAI's per-message overhead): the simulator only
/// needs to be consistent, the gateway trusts whatever `usage` says.
fn chat_prompt_tokens(messages: &Value) -> u32 {
    let Some(list) = messages.as_array() else {
        return 0;
    };
    3 + list
        .iter()
        .map(|m| 3 + text_tokens(&m["content"]) + if m.get("name").is_some() { 1 } else { 0 })
        .sum::<u32>()
}

fn text_tokens(v: &Value) -> u32 {
    match v {
        Value::String(s) => str_tokens(s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| text_tokens(if p.is_object() { &p["text"] } else { p }))
            .sum(),
        _ => 0,
    }
}

fn str_tokens(s: &str) -> u32 {
    (s.len() as u32).div_ceil(4)
}

fn embeddings(cfg: &SimConfig, v: &Value, model: &str) -> Response<SimBody> {
    let inputs: Vec<&Value> = match &v["input"] {
        Value::Array(items) if items.iter().all(|i| i.is_string()) => items.iter().collect(),
        other => vec![other],
    };
    let base64 = v["encoding_format"].as_str() == Some("base64");
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            prompt_tokens += text_tokens(input).max(1);
            let seed = input
                .to_string()
                .bytes()
                .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
            let vector: Vec<f32> = (0..cfg.embedding_dims)
                .map(|d| {
                    ((seed.wrapping_add((d as u32).wrapping_mul(2654435761)) % 2000) as f32
                        / 1000.0)
                        - 1.0
                })
                .collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(stream::base64(&bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
    )
}

fn json_response(status: StatusCode, v: &Value) -> Response<SimBody> {
    json_with(dialect::Json::Compact, status, v)
}

fn json_with(json: dialect::Json, status: StatusCode, v: &Value) -> Response<SimBody> {
    let mut out = Vec::new();
    json.write(&mut out, v);
    let mut resp = Response::new(SimBody::full(Bytes::from(out)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response<SimBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_checked_as_python_checks_uuids() {
        for ok in [
            "0b9e3c7a-1f2d-4e5f-8a6b-7c8d9e0f1a2b",
            "0b9e3c7a1f2d4e5f8a6b7c8d9e0f1a2b",
            "{0b9e3c7a-1f2d-4e5f-8a6b-7c8d9e0f1a2b}",
            "urn:uuid:0b9e3c7a-1f2d-4e5f-8a6b-7c8d9e0f1a2b",
            "0b9e-3c7a1f2d4e5f8a6b7c8d9e0f1a2b",
        ] {
            assert!(super::is_uuid(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "req_0123456789abcdef0123",
            "",
            "0b9e3c7a-1f2d-4e5f-8a6b-7c8d9e0f1a2",
            "g".repeat(32).as_str(),
        ] {
            assert!(!super::is_uuid(bad.as_bytes()), "{bad}");
        }
    }
}
