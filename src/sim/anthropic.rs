//! Anthropic's Messages API: `POST /v1/messages` (JSON and SSE) and
//! `POST /v1/messages/count_tokens`, with Anthropic's key header, checks, error bodies,
//! events and usage. Generation, timing and faults are the simulator's own (see
//! [`Knobs`](super::Knobs)), rendered as Anthropic renders them.
//!
//! Prompt caching is deterministic: the prefix up to each `cache_control` breakpoint is
//! remembered by its hash when first written, and a later request with the same prefix reads
//! it. Anthropic's minimum cacheable length and its TTL expiry are left out, so that tests
//! need neither long prompts nor waits.

use super::stream::{Events, SimBody};
use super::{str_tokens, text_tokens, Reply, State};
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Map, Value};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) const MESSAGES: &str = "/v1/messages";
pub(super) const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

/// Cached prefixes remembered; past it the oldest is forgotten.
const CACHE_CAPACITY: usize = 4096;
/// Anthropic's limit on `cache_control` blocks in one request.
const MAX_BREAKPOINTS: usize = 4;
/// The OpenAI path's chat overheads, so that one conversation costs the same on both.
const PER_MESSAGE: u32 = 3;
const REPLY_PRIMING: u32 = 3;
/// Bytes of a tool input's JSON that a stream sends per token.
const JSON_PIECE: usize = 4;
/// How deep a tool's input is built from its schema; deeper objects are left empty.
const SCHEMA_DEPTH: u32 = 8;

pub(super) fn serves(path: &str) -> bool {
    path == MESSAGES || path == COUNT_TOKENS
}

type Refusal = (StatusCode, &'static str, String);

fn invalid(message: impl Into<String>) -> Refusal {
    let kind = "invalid_request_error";
    (StatusCode::BAD_REQUEST, kind, message.into())
}

pub(super) async fn respond(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let request_id = format!("req_sim{n:017}");
    let refuse = |(status, kind, message): Refusal| error(status, kind, &message, &request_id);
    check_headers(state.cfg.api_key.as_deref(), req.headers()).map_err(refuse)?;
    let counting = req.uri().path() == COUNT_TOKENS;
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(refuse(invalid("The request body could not be read."))),
    };
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| refuse(invalid(format!("The request body is not valid JSON: {e}"))))?;
    if !counting {
        *state
            .stats
            .last_body
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(body);
    }
    validate(&v, !counting).map_err(refuse)?;
    let model = v["model"].as_str().unwrap_or_default().to_string();
    if !state.cfg.models.is_empty() && !state.cfg.models.contains(&model) {
        let message = format!("model: {model}");
        return Err(refuse((StatusCode::NOT_FOUND, "not_found_error", message)));
    }
    let prompt = Prompt::of(&v).map_err(refuse)?;
    let tool = forced_tool(&v).map_err(refuse)?;
    if counting {
        let answer = json!({"input_tokens": prompt.total});
        return Ok(with_request_id(
            super::json_response(StatusCode::OK, &answer),
            &request_id,
        ));
    }

    let overloaded = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let shed = state.knobs.overloaded.load(Ordering::Relaxed);
    if let Some((status, retry_after)) = super::forced_status(&state.knobs)
        .await
        .or(shed.then_some((overloaded, None)))
    {
        return Err(failure(status, retry_after, &request_id));
    }
    let Some(slot) = super::admit(state).await else {
        return Err(failure(StatusCode::TOO_MANY_REQUESTS, Some(1), &request_id));
    };
    // Settled once admitted: a refused request writes nothing to the cache.
    let usage = state
        .prompt_cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .settle(&prompt);
    let stats = &state.stats;
    stats
        .prompt_tokens
        .fetch_add(u64::from(prompt.total), Ordering::Relaxed);
    let answer = Answer::new(state, &v, model, n, tool, usage);
    let resp = if v["stream"].as_bool().unwrap_or(false) {
        let mut resp = Response::new(SimBody::stream(answer, &state.cfg, &state.knobs, slot));
        let h = resp.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        resp
    } else {
        let total = state.cfg.time_to_first_token + state.cfg.token_interval * answer.tokens;
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
        stats
            .tokens_generated
            .fetch_add(u64::from(answer.tokens), Ordering::Relaxed);
        drop(slot);
        super::json_response(StatusCode::OK, &answer.message(true))
    };
    Ok(with_request_id(resp, &request_id))
}

/// The key goes in `x-api-key`, or as a bearer token: Anthropic's own Python SDK (2.x) sends
/// it so.
fn check_headers(key: Option<&str>, h: &HeaderMap) -> Result<(), Refusal> {
    let unauthorized = |m: &str| Err((StatusCode::UNAUTHORIZED, "authentication_error", m.into()));
    let bearer = h
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b""));
    if let Some(key) = key {
        match h.get("x-api-key").map(HeaderValue::as_bytes).or(bearer) {
            Some(sent) if sent == key.as_bytes() => {}
            Some(_) => return unauthorized("invalid x-api-key"),
            None => return unauthorized("x-api-key header is required"),
        }
    }
    if !h.contains_key("anthropic-version") {
        return Err(invalid("anthropic-version: header is required"));
    }
    Ok(())
}

/// The body's shape, checked in the words of Anthropic's validation. Consecutive turns of
/// one role pass: Anthropic merges them into one turn.
fn validate(v: &Value, needs_max_tokens: bool) -> Result<(), Refusal> {
    let field = |name: &str, ok: fn(&Value) -> bool, should: &str| match v.get(name) {
        None => Err(invalid(format!("{name}: Field required"))),
        Some(x) if !ok(x) => Err(invalid(format!("{name}: Input should be {should}"))),
        Some(_) => Ok(()),
    };
    field("model", Value::is_string, "a valid string")?;
    if needs_max_tokens {
        let positive = |m: &Value| m.as_u64().is_some_and(|n| n >= 1);
        field(
            "max_tokens",
            positive,
            "an integer greater than or equal to 1",
        )?;
    }
    field("messages", Value::is_array, "a valid list")?;
    let messages = v["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let Some(first) = messages.first() else {
        return Err(invalid("messages: at least one message is required"));
    };
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m["role"].as_str(), Some("user" | "assistant")) {
            let message = format!("messages.{i}.role: Input should be 'user' or 'assistant'");
            return Err(invalid(message));
        }
        if !(m["content"].is_string() || m["content"].is_array()) {
            let message = format!("messages.{i}.content: Input should be a valid string or list");
            return Err(invalid(message));
        }
    }
    if first["role"] != "user" {
        return Err(invalid(
            r#"messages: first message must use the "user" role"#,
        ));
    }
    Ok(())
}

/// The tool that `tool_choice` forces (`tool` names it; `any` leaves the choice to the
/// model, which takes the first), or `None` when the model may answer in text.
fn forced_tool(v: &Value) -> Result<Option<Value>, Refusal> {
    let tools = v["tools"].as_array().map_or(&[][..], Vec::as_slice);
    let choice = &v["tool_choice"];
    let tool = match choice["type"].as_str() {
        Some("any") => tools.first(),
        Some("tool") => tools.iter().find(|t| t["name"] == choice["name"]),
        _ => return Ok(None),
    };
    match tool {
        Some(t) => Ok(Some(t.clone())),
        None if tools.is_empty() => Err(invalid(
            "tool_choice may only be specified while providing tools.",
        )),
        None => Err(invalid(format!(
            "tool_choice.name: no tool named {}",
            choice["name"]
        ))),
    }
}

/// What a request asks the model to read, and where its cacheable prefixes end.
#[derive(Debug, Default)]
struct Prompt {
    total: u32,
    breakpoints: Vec<Breakpoint>,
    hasher: DefaultHasher,
}

#[derive(Debug, Clone, Copy)]
struct Breakpoint {
    /// Tokens up to and including the marked block.
    tokens: u32,
    /// Of the prefix's content without its markers: moving a breakpoint keeps what it covers.
    hash: u64,
    /// `"ttl": "1h"`.
    long: bool,
}

impl Prompt {
    /// In the order Anthropic caches a prompt: tools, system, messages.
    fn of(v: &Value) -> Result<Prompt, Refusal> {
        let mut p = Prompt::default();
        v["model"].as_str().hash(&mut p.hasher);
        for tool in v["tools"].as_array().map_or(&[][..], Vec::as_slice) {
            p.block(tool, str_tokens(&unmarked(tool)));
        }
        p.content(&v["system"]);
        for m in v["messages"].as_array().map_or(&[][..], Vec::as_slice) {
            p.total = p.total.saturating_add(PER_MESSAGE);
            m["role"].as_str().hash(&mut p.hasher);
            p.content(&m["content"]);
        }
        p.total = p.total.saturating_add(REPLY_PRIMING);
        match p.breakpoints.len() {
            n if n > MAX_BREAKPOINTS => Err(invalid(format!(
                "A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {n}."
            ))),
            _ => Ok(p),
        }
    }

    /// A string, or an array of blocks.
    fn content(&mut self, content: &Value) {
        let Some(blocks) = content.as_array() else {
            return self.block(content, text_tokens(content));
        };
        for b in blocks {
            let tokens = match b["type"].as_str() {
                Some("tool_use") => {
                    text_tokens(&b["name"]).saturating_add(str_tokens(&b["input"].to_string()))
                }
                Some("tool_result") => text_tokens(&b["content"]),
                _ => text_tokens(&b["text"]),
            };
            self.block(b, tokens);
        }
    }

    /// Adds a block of `tokens`; a `cache_control` on it ends a cacheable prefix.
    fn block(&mut self, b: &Value, tokens: u32) {
        self.total = self.total.saturating_add(tokens);
        unmarked(b).hash(&mut self.hasher);
        let mark = &b["cache_control"];
        if mark["type"] == "ephemeral" {
            let (tokens, hash) = (self.total, self.hasher.finish());
            let long = mark["ttl"] == "1h";
            self.breakpoints.push(Breakpoint { tokens, hash, long });
        }
    }
}

/// A block's JSON without its `cache_control`.
fn unmarked(b: &Value) -> String {
    match b.as_object() {
        Some(o) if o.contains_key("cache_control") => {
            let mut o = o.clone();
            o.remove("cache_control");
            Value::Object(o).to_string()
        }
        _ => b.to_string(),
    }
}

/// Prefixes written to the simulated prompt cache, by hash.
#[derive(Debug, Default)]
pub(super) struct PromptCache {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
}

/// A request's input tokens, as Anthropic splits them.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    /// Neither read from the cache nor written to it.
    input: u32,
    read: u32,
    write_5m: u32,
    write_1h: u32,
}

impl PromptCache {
    /// Reads the longest prefix cached and writes the rest up to the last breakpoint, each
    /// part at the TTL of the breakpoint that ends it.
    fn settle(&mut self, p: &Prompt) -> Usage {
        let hit = p
            .breakpoints
            .iter()
            .rposition(|b| self.seen.contains(&b.hash));
        let read = hit.map_or(0, |i| p.breakpoints[i].tokens);
        let mut u = Usage {
            read,
            ..Usage::default()
        };
        let mut end = read;
        for b in &p.breakpoints[hit.map_or(0, |i| i + 1)..] {
            let written = b.tokens.saturating_sub(end);
            *if b.long {
                &mut u.write_1h
            } else {
                &mut u.write_5m
            } += written;
            end = b.tokens;
            if self.seen.insert(b.hash) {
                self.order.push_back(b.hash);
            }
        }
        while self.order.len() > CACHE_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        u.input = p.total.saturating_sub(end);
        u
    }
}

/// One answer of the Messages API, JSON or streamed: text, or a forced tool call.
pub(super) struct Answer {
    id: String,
    model: String,
    /// The call's id, tool name and input.
    tool: Option<(String, String, Value)>,
    /// The tool input's JSON in the pieces a stream sends, one token each.
    json: Vec<String>,
    words: &'static [&'static str],
    /// Output tokens: words of text, or pieces of JSON.
    tokens: u32,
    stop_reason: &'static str,
    usage: Usage,
}

impl Answer {
    fn new(
        state: &State,
        v: &Value,
        model: String,
        n: u64,
        tool: Option<Value>,
        usage: Usage,
    ) -> Self {
        let mut answer = Answer {
            id: format!("msg_sim{n:017}"),
            model,
            tool: None,
            json: Vec::new(),
            words: state.cfg.dialect.spec().words,
            tokens: state.cfg.completion_tokens,
            stop_reason: "end_turn",
            usage,
        };
        if let Some(tool) = tool {
            // A forced call is short: `max_tokens` does not cut it.
            let input = object_example(&tool["input_schema"], 0);
            answer.json = pieces(&input.to_string());
            answer.tokens = answer.json.len() as u32;
            let name = tool["name"].as_str().unwrap_or_default().to_string();
            answer.tool = Some((format!("toolu_sim{n:017}"), name, input));
            answer.stop_reason = "tool_use";
        } else if let Some(cap) = v["max_tokens"]
            .as_u64()
            .filter(|_| !state.cfg.ignores_max_tokens)
        {
            if cap <= u64::from(answer.tokens) {
                answer.tokens = cap as u32;
                answer.stop_reason = "max_tokens";
            }
        }
        answer
    }

    fn piece(&self, i: u32) -> String {
        if self.tool.is_some() {
            return self.json.get(i as usize).cloned().unwrap_or_default();
        }
        let w = self.words[i as usize % self.words.len()];
        if i == 0 {
            w.to_string()
        } else {
            format!(" {w}")
        }
    }

    /// The content block; a stream starts it empty.
    fn block(&self, whole: bool) -> Value {
        match &self.tool {
            Some((id, name, input)) => {
                let input = if whole { input.clone() } else { json!({}) };
                json!({"type": "tool_use", "id": id, "name": name, "input": input})
            }
            None => {
                let text: String = match whole {
                    true => (0..self.tokens).map(|i| self.piece(i)).collect(),
                    false => String::new(),
                };
                json!({"type": "text", "text": text})
            }
        }
    }

    /// `usage` after `output` tokens; a stream's `message_delta` repeats the input counts
    /// without their breakdown.
    fn usage(&self, output: u32, in_delta: bool) -> Value {
        let u = self.usage;
        let mut v = json!({
            "input_tokens": u.input, "cache_creation_input_tokens": u.write_5m + u.write_1h,
            "cache_read_input_tokens": u.read, "output_tokens": output,
        });
        if !in_delta {
            v["cache_creation"] = json!({
                "ephemeral_5m_input_tokens": u.write_5m, "ephemeral_1h_input_tokens": u.write_1h,
            });
            v["service_tier"] = json!("standard");
        }
        v
    }

    /// The message; a stream's `message_start` has it before anything is generated, with
    /// the first output token already counted, as Anthropic's has.
    fn message(&self, whole: bool) -> Value {
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": if whole { vec![self.block(true)] } else { vec![] },
            "stop_reason": whole.then_some(self.stop_reason), "stop_sequence": null,
            "usage": self.usage(if whole { self.tokens } else { 1 }, false),
        })
    }
}

impl Events for Answer {
    fn opening(&self) -> Option<Bytes> {
        let start =
            json!({"type": "content_block_start", "index": 0, "content_block": self.block(false)});
        let events = [
            event(&json!({"type": "message_start", "message": self.message(false)})),
            event(&start),
            event(&json!({"type": "ping"})),
        ];
        Some(Bytes::from(events.concat()))
    }

    fn tokens(&self) -> u32 {
        self.tokens
    }

    fn token(&self, i: u32) -> Bytes {
        let delta = match self.tool {
            Some(_) => json!({"type": "input_json_delta", "partial_json": self.piece(i)}),
            None => json!({"type": "text_delta", "text": self.piece(i)}),
        };
        Bytes::from(event(
            &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        ))
    }

    fn finish(&self) -> Bytes {
        let delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": null},
            "usage": self.usage(self.tokens, true),
        });
        let stop = json!({"type": "content_block_stop", "index": 0});
        Bytes::from([event(&stop), event(&delta)].concat())
    }

    fn trailer(&self) -> Option<Bytes> {
        None
    }

    fn end(&self) -> Bytes {
        Bytes::from(event(&json!({"type": "message_stop"})))
    }

    fn fault(&self) -> Option<Bytes> {
        let e = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        Some(Bytes::from(event(&e)))
    }
}

/// An event named by its data's `type`, as Anthropic names them.
fn event(v: &Value) -> Vec<u8> {
    format!(
        "event: {}\ndata: {v}\n\n",
        v["type"].as_str().unwrap_or_default()
    )
    .into_bytes()
}

/// An input that fits a JSON schema's required properties, with simple values.
fn object_example(schema: &Value, depth: u32) -> Value {
    let mut o = Map::new();
    let required = schema["required"].as_array().map_or(&[][..], Vec::as_slice);
    for name in required
        .iter()
        .filter_map(Value::as_str)
        .filter(|_| depth < SCHEMA_DEPTH)
    {
        o.insert(
            name.to_string(),
            example(&schema["properties"][name], depth + 1),
        );
    }
    Value::Object(o)
}

fn example(schema: &Value, depth: u32) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    // `"type": ["string", "null"]` takes its first type that is not null.
    let ty = match &schema["type"] {
        Value::Array(types) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null"),
        t => t.as_str(),
    };
    match ty {
        Some("string") => json!("sim"),
        Some("integer" | "number") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        Some("null") => Value::Null,
        _ => object_example(schema, depth),
    }
}

/// `json` in pieces of at most [`JSON_PIECE`] bytes, characters kept whole.
fn pieces(json: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in json.chars() {
        match out.last_mut() {
            Some(p) if p.len() + c.len_utf8() <= JSON_PIECE => p.push(c),
            _ => out.push(c.to_string()),
        }
    }
    out
}

/// A forced failure, or a refusal past the queue, in Anthropic's words.
fn failure(status: StatusCode, retry_after: Option<u32>, request_id: &str) -> Response<SimBody> {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    let message = match status.as_u16() {
        429 => "Number of concurrent requests has exceeded your rate limit.",
        500 => "Internal server error",
        529 => "Overloaded",
        _ => "The simulated server failed as configured.",
    };
    let mut resp = error(status, kind, message, request_id);
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn error(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Response<SimBody> {
    let body = json!({
        "type": "error", "error": {"type": kind, "message": message}, "request_id": request_id,
    });
    with_request_id(super::json_response(status, &body), request_id)
}

fn with_request_id(mut resp: Response<SimBody>, request_id: &str) -> Response<SimBody> {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::super::{Sim, SimConfig};
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use std::time::Duration;

    const KEY: &str = "sk-ant-sim";
    const VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");
    const HEADERS: &[(&str, &str)] = &[("x-api-key", KEY), VERSION];
    const BEARER: (&str, &str) = ("authorization", "Bearer sk-ant-sim");
    /// The question's 7 tokens, 3 around its message and 3 to prime the answer.
    const HELLO_PROMPT: u32 = 13;

    struct Got {
        status: u16,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Got {
        /// The body, its ids cut to their prefixes (`msg_`, `toolu_`).
        fn json(&self) -> Value {
            let mut v = serde_json::from_slice(&self.body).expect("a JSON body");
            cut_ids(&mut v);
            v
        }

        /// Each event's data, its name checked against its `type`.
        fn events(&self) -> Vec<Value> {
            let text = std::str::from_utf8(&self.body).unwrap();
            let event = |e: &str| {
                let (name, data) = e.split_once("\ndata: ").expect("an event and its data");
                let mut data: Value = serde_json::from_str(data).unwrap();
                assert_eq!(name.strip_prefix("event: "), data["type"].as_str());
                cut_ids(&mut data);
                data
            };
            text.split_terminator("\n\n").map(event).collect()
        }

        /// "status type: message" of an Anthropic error body.
        fn error(&self) -> String {
            let v = self.json();
            assert_eq!(v["type"], "error");
            assert_eq!(
                v["request_id"],
                self.headers["request-id"].to_str().unwrap()
            );
            let e = &v["error"];
            format!(
                "{} {}: {}",
                self.status,
                e["type"].as_str().unwrap(),
                e["message"]
            )
        }
    }

    fn cut_ids(v: &mut Value) {
        match v {
            Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    let cut = x.as_str().and_then(|s| s.split_once('_'));
                    match cut.map(|(prefix, rest)| (format!("{prefix}_"), rest.len())) {
                        Some((prefix, n)) if k == "id" && n > 0 => *x = json!(prefix),
                        _ => cut_ids(x),
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(cut_ids),
            _ => {}
        }
    }

    async fn open(
        sim: &Sim,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response<Incoming> {
        let mut req = Request::post(format!("{}{path}", sim.url()));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        client.request(req).await.expect("the simulator answers")
    }

    async fn send(sim: &Sim, path: &str, headers: &[(&str, &str)], body: &str) -> Got {
        let (parts, body) = open(sim, path, headers, body).await.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let status = parts.status.as_u16();
        Got {
            status,
            headers: parts.headers,
            body,
        }
    }

    async fn messages(sim: &Sim, body: &Value) -> Got {
        send(sim, MESSAGES, HEADERS, &body.to_string()).await
    }

    async fn count(sim: &Sim, body: &Value) -> u32 {
        let v = send(sim, COUNT_TOKENS, HEADERS, &body.to_string())
            .await
            .json();
        assert_eq!(v.as_object().map(Map::len), Some(1), "{v}");
        v["input_tokens"].as_u64().unwrap() as u32
    }

    async fn sim_with(f: impl FnOnce(&mut SimConfig)) -> Sim {
        let mut cfg = SimConfig {
            models: vec!["claude-sim".into()],
            api_key: Some(KEY.into()),
            completion_tokens: 5,
            ..Default::default()
        };
        f(&mut cfg);
        Sim::spawn(cfg).await.unwrap()
    }

    fn hello(stream: bool) -> Value {
        json!({
            "model": "claude-sim", "max_tokens": 100, "stream": stream,
            "messages": [{"role": "user", "content": "What does a gateway meter?"}],
        })
    }

    fn message(content: Value, stop_reason: Value, usage: Value) -> Value {
        json!({
            "id": "msg_", "type": "message", "role": "assistant", "model": "claude-sim",
            "content": content, "stop_reason": stop_reason, "stop_sequence": null, "usage": usage,
        })
    }

    fn usage(input: u32, write_5m: u32, write_1h: u32, read: u32, output: u32) -> Value {
        let mut u = delta_usage(input, write_5m + write_1h, read, output);
        u["cache_creation"] = json!({
            "ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h,
        });
        u["service_tier"] = json!("standard");
        u
    }

    fn delta_usage(input: u32, write: u32, read: u32, output: u32) -> Value {
        json!({
            "input_tokens": input, "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read, "output_tokens": output,
        })
    }

    fn deltas(events: &[Value]) -> Vec<&Value> {
        let deltas = events.iter().filter(|e| e["type"] == "content_block_delta");
        deltas.map(|e| &e["delta"]).collect()
    }

    #[tokio::test]
    async fn a_message_and_its_stream_are_anthropics_and_count_alike() {
        let sim = sim_with(|_| {}).await;
        let got = messages(&sim, &hello(false)).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.headers["content-type"], "application/json");
        assert!(got.headers["request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_"));
        let text = json!([{"type": "text", "text": "The gateway counts every token"}]);
        let whole = usage(HELLO_PROMPT, 0, 0, 0, 5);
        assert_eq!(got.json(), message(text, json!("end_turn"), whole));

        let got = messages(&sim, &hello(true)).await;
        assert_eq!(
            got.headers["content-type"],
            "text/event-stream; charset=utf-8"
        );
        assert!(got.headers.contains_key("request-id"));
        let first = usage(HELLO_PROMPT, 0, 0, 0, 1);
        let mut want = vec![
            json!({"type": "message_start", "message": message(json!([]), Value::Null, first)}),
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
        ];
        for text in ["The", " gateway", " counts", " every", " token"] {
            let delta = json!({"type": "text_delta", "text": text});
            want.push(json!({"type": "content_block_delta", "index": 0, "delta": delta}));
        }
        want.extend([
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta",
                   "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                   "usage": delta_usage(HELLO_PROMPT, 0, 0, 5)}),
            json!({"type": "message_stop"}),
        ]);
        assert_eq!(got.events(), want);

        let mut capped = hello(false);
        capped["max_tokens"] = json!(2);
        let v = messages(&sim, &capped).await.json();
        let text = json!([{"type": "text", "text": "The gateway"}]);
        assert_eq!(
            v,
            message(text, json!("max_tokens"), usage(HELLO_PROMPT, 0, 0, 0, 2))
        );
        capped["stream"] = json!(true);
        let events = messages(&sim, &capped).await.events();
        assert_eq!(deltas(&events).len(), 2);
        assert_eq!(events[6]["delta"]["stop_reason"], "max_tokens");
        assert_eq!(events[6]["usage"], delta_usage(HELLO_PROMPT, 0, 0, 2));

        let stats = &sim.stats;
        assert_eq!(stats.tokens_generated.load(Ordering::Relaxed), 14);
        assert_eq!(stats.prompt_tokens.load(Ordering::Relaxed), 4 * 13);
        assert_eq!(stats.streams_completed.load(Ordering::Relaxed), 2);
        sim.stop().await;
    }

    #[tokio::test]
    async fn cache_control_writes_a_prefix_once_then_reads_it() {
        let sim = sim_with(|_| {}).await;
        let hour = json!({"type": "ephemeral", "ttl": "1h"});
        let body = |user: &str, stream: bool| {
            json!({
                "model": "claude-sim", "max_tokens": 100, "stream": stream,
                // 100 tokens, cached for an hour.
                "system": [{"type": "text", "text": "s".repeat(400), "cache_control": hour}],
                "messages": [{"role": "user", "content": [
                    // 3 + 20 tokens, cached for five minutes.
                    {"type": "text", "text": user.repeat(80),
                     "cache_control": {"type": "ephemeral"}},
                    // 3 tokens, and 3 to prime the answer: never cached.
                    {"type": "text", "text": "What now?"},
                ]}],
            })
        };
        let sent = |user: &'static str| {
            let sim = &sim;
            async move { messages(sim, &body(user, false)).await.json()["usage"].clone() }
        };
        assert_eq!(sent("x").await, usage(6, 23, 100, 0, 5));
        assert_eq!(sent("x").await, usage(6, 0, 0, 123, 5));
        // The system prompt's prefix is read; the new user block is written.
        assert_eq!(sent("y").await, usage(6, 23, 0, 100, 5));
        let events = messages(&sim, &body("y", true)).await.events();
        assert_eq!(events[0]["message"]["usage"], usage(6, 0, 0, 123, 1));
        assert_eq!(events[9]["usage"], delta_usage(6, 0, 123, 5));
        // Counting tells the total, and neither reads nor writes the cache.
        assert_eq!(count(&sim, &body("z", false)).await, 129);
        assert_eq!(sent("z").await, usage(6, 23, 0, 100, 5));
        assert_eq!(
            sim.stats.requests.load(Ordering::Relaxed),
            5,
            "counting is no request"
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn a_forced_tool_is_called_with_an_input_that_fits_its_schema() {
        let sim = sim_with(|_| {}).await;
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "detail": {"type": "object", "required": ["hourly"],
                           "properties": {"hourly": {"type": ["boolean", "null"]}}},
                "note": {"type": "string"},
            },
            "required": ["city", "unit", "days", "detail"],
        });
        let input =
            json!({"city": "sim", "unit": "celsius", "days": 1, "detail": {"hourly": true}});
        let body = |choice: Value, stream: bool| {
            let mut b = hello(stream);
            b["tools"] = json!([
                {"name": "get_time", "input_schema": {"type": "object"}},
                {"name": "get_weather", "description": "The weather.", "input_schema": schema},
            ]);
            b["tool_choice"] = choice;
            b
        };
        let forced = json!({"type": "tool", "name": "get_weather"});
        let prompt = count(&sim, &body(forced.clone(), false)).await;
        let output = input.to_string().len().div_ceil(JSON_PIECE) as u32;
        let call =
            json!([{"type": "tool_use", "id": "toolu_", "name": "get_weather", "input": input}]);
        let want = message(call, json!("tool_use"), usage(prompt, 0, 0, 0, output));
        assert_eq!(
            messages(&sim, &body(forced.clone(), false)).await.json(),
            want
        );

        let events = messages(&sim, &body(forced, true)).await.events();
        let start = json!({"type": "tool_use", "id": "toolu_", "name": "get_weather", "input": {}});
        assert_eq!(events[1]["content_block"], start);
        let deltas = deltas(&events);
        assert!(deltas.iter().all(|d| d["type"] == "input_json_delta"));
        let json: String = deltas
            .iter()
            .map(|d| d["partial_json"].as_str().unwrap())
            .collect();
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), input);
        let end = &events[events.len() - 2];
        assert_eq!(end["delta"]["stop_reason"], "tool_use");
        assert_eq!(end["usage"], delta_usage(prompt, 0, 0, deltas.len() as u32));
        assert_eq!(deltas.len() as u32, output);

        let any = messages(&sim, &body(json!({"type": "any"}), false))
            .await
            .json();
        assert_eq!(any["content"][0]["name"], "get_time");
        assert_eq!(any["content"][0]["input"], json!({}));
        let auto = messages(&sim, &body(json!({"type": "auto"}), false))
            .await
            .json();
        assert_eq!(auto["content"][0]["type"], "text");
        sim.stop().await;
    }

    #[tokio::test]
    async fn requests_are_refused_as_anthropic_refuses_them() {
        let sim = sim_with(|_| {}).await;
        let ok = hello(false).to_string();
        let unauthorized = "401 authentication_error: ";
        for (headers, want) in [
            (
                &[VERSION][..],
                format!("{unauthorized}\"x-api-key header is required\""),
            ),
            (
                &[("x-api-key", "sk-wrong"), VERSION],
                format!("{unauthorized}\"invalid x-api-key\""),
            ),
            (
                &[("authorization", "Bearer sk-wrong"), VERSION],
                format!("{unauthorized}\"invalid x-api-key\""),
            ),
            (
                &[HEADERS[0]],
                "400 invalid_request_error: \"anthropic-version: header is required\"".into(),
            ),
        ] {
            assert_eq!(send(&sim, MESSAGES, headers, &ok).await.error(), want);
        }
        let got = send(&sim, MESSAGES, HEADERS, "{not json").await.error();
        assert!(
            got.starts_with("400 invalid_request_error: \"The request body is not"),
            "{got}"
        );

        let marked = json!({"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}});
        let assistant = json!([{"role": "assistant", "content": "Hi."}]);
        // Each changes the good request's fields; null removes one.
        for (change, message) in [
            (json!({"max_tokens": null}), "max_tokens: Field required"),
            (
                json!({"max_tokens": 0}),
                "max_tokens: Input should be an integer greater than or equal to 1",
            ),
            (json!({"model": 7}), "model: Input should be a valid string"),
            (
                json!({"messages": {}}),
                "messages: Input should be a valid list",
            ),
            (
                json!({"messages": []}),
                "messages: at least one message is required",
            ),
            (
                json!({"messages": [{"role": "system", "content": "Hi."}]}),
                "messages.0.role: Input should be 'user' or 'assistant'",
            ),
            (
                json!({"messages": assistant}),
                r#"messages: first message must use the "user" role"#,
            ),
            (
                json!({"system": vec![marked; 5]}),
                "A maximum of 4 blocks with cache_control may be provided. Found 5.",
            ),
            (
                json!({"tool_choice": {"type": "any"}}),
                "tool_choice may only be specified while providing tools.",
            ),
            (json!({"model": "claude-nope"}), "model: claude-nope"),
        ] {
            let mut body = hello(false);
            for (k, v) in change.as_object().unwrap() {
                body[k] = v.clone();
            }
            body.as_object_mut().unwrap().retain(|_, v| !v.is_null());
            let kind = match message.starts_with("model: claude") {
                true => "404 not_found_error",
                false => "400 invalid_request_error",
            };
            let want = format!("{kind}: {}", json!(message));
            assert_eq!(messages(&sim, &body).await.error(), want);
        }
        assert_eq!(sim.stats.tokens_generated.load(Ordering::Relaxed), 0);

        // Anthropic's SDK sends the key as a bearer token.
        assert_eq!(
            send(&sim, MESSAGES, &[BEARER, VERSION], &ok).await.status,
            200
        );
        // Anthropic merges consecutive turns of one role rather than refusing them.
        let mut twice = hello(false);
        twice["messages"] =
            json!([{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"}]);
        assert_eq!(messages(&sim, &twice).await.status, 200);
        // The OpenAI paths keep their bearer key.
        let chat = json!({"model": "claude-sim", "messages": [{"role": "user", "content": "Hi."}]});
        let chat = chat.to_string();
        assert_eq!(
            send(&sim, "/v1/chat/completions", &[BEARER], &chat)
                .await
                .status,
            200
        );
        assert_eq!(
            send(&sim, "/v1/chat/completions", HEADERS, &chat)
                .await
                .status,
            401
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn the_simulators_faults_are_answered_the_anthropic_way() {
        let sim = sim_with(|_| {}).await;
        let knobs = &sim.knobs;
        knobs.retry_after_s.store(7, Ordering::Relaxed);
        for (status, want) in [
            (
                429,
                "rate_limit_error: \"Number of concurrent requests has exceeded your rate limit.\"",
            ),
            (500, "api_error: \"Internal server error\""),
            (529, "overloaded_error: \"Overloaded\""),
            (
                403,
                "permission_error: \"The simulated server failed as configured.\"",
            ),
        ] {
            knobs.fail_status.store(status, Ordering::Relaxed);
            let got = messages(&sim, &hello(false)).await;
            assert_eq!(got.error(), format!("{status} {want}"));
            let retry_after = got.headers.get("retry-after").map(|h| h.to_str().unwrap());
            assert_eq!(retry_after, (status == 429).then_some("7"));
        }
        knobs.fail_status.store(0, Ordering::Relaxed);

        knobs.overloaded.store(true, Ordering::Relaxed);
        for stream in [false, true] {
            let got = messages(&sim, &hello(stream)).await.error();
            assert_eq!(got, "529 overloaded_error: \"Overloaded\"");
        }
        let chat = json!({"model": "claude-sim", "messages": [{"role": "user", "content": "Hi."}]});
        let got = send(&sim, "/v1/chat/completions", &[BEARER], &chat.to_string()).await;
        assert_eq!(got.status, 200, "the OpenAI paths do not shed load");
        knobs.overloaded.store(false, Ordering::Relaxed);

        knobs.break_after_tokens.store(2, Ordering::Relaxed);
        let got = messages(&sim, &hello(true)).await;
        assert_eq!(got.status, 200);
        let events = got.events();
        let names: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let mut want = vec!["message_start", "content_block_start", "ping"];
        want.extend(["content_block_delta", "content_block_delta", "error"]);
        assert_eq!(names, want);
        let overloaded = json!({"type": "overloaded_error", "message": "Overloaded"});
        assert_eq!(events[5], json!({"type": "error", "error": overloaded}));
        sim.stop().await;
    }

    #[tokio::test]
    async fn past_its_queue_it_answers_429_rate_limit_error() {
        let sim = sim_with(|c| {
            c.max_concurrency = 1;
            c.max_queue = 0;
            c.token_interval = Duration::from_millis(200);
        })
        .await;
        // One generating, one waiting (the queue counts it against the slots), one refused.
        let held = open(&sim, MESSAGES, HEADERS, &hello(true).to_string()).await;
        let refused = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            messages(&sim, &hello(false)).await
        };
        let body = hello(false);
        let (queued, refused) = tokio::join!(messages(&sim, &body), refused);
        assert_eq!((held.status().as_u16(), queued.status), (200, 200));
        assert!(refused.error().starts_with("429 rate_limit_error"));
        assert_eq!(refused.headers["retry-after"], "1");
        drop(held);
        sim.stop().await;
    }

    #[test]
    fn the_cache_forgets_its_oldest_prefix_past_its_capacity() {
        let mut cache = PromptCache::default();
        for hash in 0..=CACHE_CAPACITY as u64 {
            let b = Breakpoint {
                tokens: 1,
                hash,
                long: false,
            };
            cache.settle(&Prompt {
                total: 1,
                breakpoints: vec![b],
                ..Prompt::default()
            });
        }
        assert_eq!(cache.seen.len(), CACHE_CAPACITY);
        assert!(!cache.seen.contains(&0) && cache.seen.contains(&(CACHE_CAPACITY as u64)));
    }

    #[test]
    fn json_pieces_keep_characters_whole() {
        assert_eq!(
            pieces(r#"{"a":"é😀b"}"#),
            [r#"{"a""#, r#":"é"#, "😀", r#"b"}"#]
        );
    }
}
