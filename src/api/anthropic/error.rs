//! Error bodies, both ways. The caller keeps the status: SDKs of both protocols choose their
//! exception by status, and read the body for the message.

use serde_json::{json, Value};

/// Anthropic's error type for an HTTP status, from its errors reference; 402, 504 and 503 are
/// not in its table, so:
/// - 402 `billing_error` and 504 `timeout_error`: types Anthropic's SDKs already define.
/// - 503 `overloaded_error`: a 503 says "busy, retry later", which is what Anthropic's 529
///   says; `api_error` would read as a fault in the request's handling.
/// - other 4xx `invalid_request_error`, as the reference says it does itself; other 5xx (and
///   anything else) `api_error`.
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        // 400 itself, and the rest of 4xx as the reference says Anthropic does.
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Anthropic's error body: {"type":"error","error":{"type":..,"message":..}}
pub fn error_body(kind: &str, message: &str) -> Vec<u8> {
    super::to_bytes(&json!({ "type": "error", "error": { "type": kind, "message": message } }))
}

/// OpenAI's error body.
pub(super) fn openai_error(kind: &str, message: &str) -> Value {
    json!({ "error": { "message": message, "type": kind, "code": null, "param": null } })
}

/// An Anthropic error body as OpenAI's `{"error":{"message","type","code","param"}}`. The
/// Anthropic `type` is kept: it says more than OpenAI's few types, and OpenAI SDKs pass it on
/// without branching on it.
pub fn error_to_openai(status: u16, body: &[u8]) -> Vec<u8> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let kind = error
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| error_type_for_status(status));
    let message = error
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
        .map_or_else(|| fallback_message(status), str::to_owned);
    super::to_bytes(&openai_error(kind, &message))
}

/// An OpenAI-style error body as Anthropic's. Self-hosted engines vary: besides OpenAI's
/// `{"error":{"message"}}` this reads `{"error":"text"}`, `{"message"}` and `{"detail"}`.
pub fn error_to_anthropic(status: u16, body: &[u8]) -> Vec<u8> {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| openai_message(&v))
        .unwrap_or_else(|| fallback_message(status));
    error_body(error_type_for_status(status), &message)
}

pub(super) fn openai_message(v: &Value) -> Option<String> {
    let text = match v.get("error") {
        Some(Value::String(s)) => Some(s.as_str()),
        Some(e) => e.get("message").and_then(Value::as_str),
        None => None,
    };
    text.or_else(|| v.get("message").and_then(Value::as_str))
        .or_else(|| v.get("detail").and_then(Value::as_str))
        .map(str::to_owned)
}

/// For a body that says nothing readable (HTML from a proxy, say): it is not relayed.
fn fallback_message(status: u16) -> String {
    format!("the upstream answered with HTTP status {status}")
}
