//! A [`GatewayError`] as the client's protocol shows it: the one place an error becomes a body.
//!
//! OpenAI's `{"error":{"message","type","code","param"}}`, so SDKs raise their usual exceptions
//! (`AuthenticationError` on 401, `NotFoundError` on 404, `RateLimitError` on 429, …), with
//! `Retry-After` when waiting will help. The same body is the error event that ends a stream.

use crate::config::Protocol;
use crate::error::GatewayError;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::Response;

/// OpenAI's error body.
pub fn openai_json(e: &GatewayError) -> Vec<u8> {
    let (kind, code) = e.openai_type_and_code();
    let mut body = serde_json::json!({
        "error": {
            "message": e.to_string(),
            "type": kind,
            "code": code,
            "param": e.param(),
        }
    });
    if let Some(o) = e.over_budget() {
        use crate::budget::LimitKind;
        // The same facts as the message, for programs.
        let usd = o.kind == LimitKind::Usd;
        body["error"]["budget"] = serde_json::json!({
            "team": &*o.team,
            "key_id": o.key_id.as_deref(),
            "window": o.window.as_str(),
            "limit_usd": usd.then(|| crate::meter::format_usd(o.limit)),
            "used_usd": usd.then(|| crate::meter::format_usd(o.used)),
            "limit_tokens": (!usd).then_some(o.limit),
            "used_tokens": (!usd).then_some(o.used),
            "resets_at": crate::clock::format_time(o.reset_at_us),
        });
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Anthropic's error body, `{"type":"error","error":{"type","message"}}`, its type chosen by
/// status as Anthropic's API chooses it (so its SDK raises the matching exception).
pub fn anthropic_json(e: &GatewayError) -> Vec<u8> {
    let status = e.status().as_u16();
    crate::api::anthropic::error_body(
        crate::api::anthropic::error_type_for_status(status),
        &e.to_string(),
    )
}

/// The error body of a client protocol.
pub fn json_for(protocol: Protocol, e: &GatewayError) -> Vec<u8> {
    match protocol {
        Protocol::OpenAi => openai_json(e),
        Protocol::Anthropic => anthropic_json(e),
    }
}

/// The whole response for an error: status, body, `Retry-After`; `body` wraps the bytes in
/// the response body type of the caller.
pub fn response<B>(e: &GatewayError, body: impl FnOnce(Bytes) -> B) -> Response<B> {
    response_for(Protocol::OpenAi, e, body)
}

/// [`response`] in the client's protocol.
pub fn response_for<B>(
    protocol: Protocol,
    e: &GatewayError,
    body: impl FnOnce(Bytes) -> B,
) -> Response<B> {
    let mut resp = Response::new(body(Bytes::from(json_for(protocol, e))));
    *resp.status_mut() = e.status();
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(after) = e.retry_after() {
        // Whole seconds, rounded up: retrying a moment early would only be refused again.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn bodies_are_openai_shaped() {
        let e = GatewayError::UnknownModel("gpt-9".into());
        let v: serde_json::Value = serde_json::from_slice(&openai_json(&e)).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
    }

    #[test]
    fn upstream_errors_say_nothing_internal() {
        let e = GatewayError::UpstreamConnect {
            backend: "llama".into(),
        };
        let text = String::from_utf8(openai_json(&e)).unwrap();
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert_eq!(response(&e, |b| b).status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn shed_load_says_when_to_retry() {
        let resp = response(&GatewayError::Overloaded, |b| b);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
    }
}
