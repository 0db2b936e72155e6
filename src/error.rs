//! Every way a request can fail, and the one place that decides its status code and body.
//!
//! Bodies follow OpenAI's `{"error":{"message","type","code","param"}}` so SDKs raise their
//! usual exceptions (`AuthenticationError` on 401, `NotFoundError` on 404, …). Messages about
//! bad input say exactly what was wrong; internal and upstream failures say nothing internal
//! (the real error is logged once, server-side).

use crate::body::GatewayBody;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("missing API key: send `Authorization: Bearer <key>` or `x-api-key`")]
    MissingKey,
    #[error("invalid API key")]
    InvalidKey,
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("could not read the request body")]
    BodyRead,
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{message}")]
    InvalidField {
        param: &'static str,
        message: String,
    },
    #[error("the model `{0}` does not exist or you do not have access to it")]
    UnknownModel(Arc<str>),
    /// Every backend serving the model is out for now (down, busy, full) or out of the
    /// team's regions.
    #[error("`{model}`: {reason}")]
    NoEligibleBackend {
        model: Arc<str>,
        reason: String,
        retry_after: Option<Duration>,
    },
    /// No backend serving the model can take this request as it is (context, features).
    #[error("`{model}` cannot serve this request: {reason}")]
    NotServable {
        model: Arc<str>,
        reason: String,
        code: &'static str,
    },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: http::Method, path: String },
    #[error("unknown path {0}")]
    UnknownPath(String),
    #[error("the gateway is at its in-flight limit; retry shortly")]
    Overloaded,
    #[error("backend `{backend}` could not be reached")]
    UpstreamConnect { backend: Arc<str> },
    #[error("backend `{backend}` did not answer in time")]
    UpstreamTimeout { backend: Arc<str> },
    #[error("backend `{backend}` failed")]
    UpstreamFailed { backend: Arc<str> },
    #[error("the gateway cannot record usage right now, so it serves no billable requests; retry shortly")]
    LedgerUnavailable,
    #[error("{}", over_budget_message(.0))]
    OverBudget(Box<crate::budget::OverBudget>),
    #[error("internal error")]
    Internal,
}

fn over_budget_message(o: &crate::budget::OverBudget) -> String {
    use crate::budget::LimitKind;
    let who = match &o.key_id {
        Some(k) => format!("key {k} of team `{}`", o.team),
        None => format!("team `{}`", o.team),
    };
    let (limit, used) = match o.kind {
        LimitKind::Usd => (
            format!("${}", crate::meter::format_usd(o.limit)),
            format!("${}", crate::meter::format_usd(o.used)),
        ),
        LimitKind::Tokens => (format!("{} tokens", o.limit), format!("{} tokens", o.used)),
    };
    format!(
        "{who} would exceed its {} budget of {limit} ({used} used or reserved); it resets at {}",
        o.window,
        crate::clock::format_time(o.reset_at_us)
    )
}

/// At most `max` characters of caller-chosen text, for messages and records: what a client
/// sends is echoed back or stored only in bounded form.
pub fn prefix_chars(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl GatewayError {
    /// The only place that maps errors to status codes; no `_` arm, so a new variant must decide.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MissingKey | GatewayError::InvalidKey => StatusCode::UNAUTHORIZED,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyRead
            | GatewayError::MalformedJson(_)
            | GatewayError::InvalidField { .. }
            | GatewayError::NotServable { .. } => StatusCode::BAD_REQUEST,
            GatewayError::UnknownModel(_) | GatewayError::UnknownPath(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Overloaded | GatewayError::NoEligibleBackend { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::UpstreamConnect { .. } | GatewayError::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::OverBudget(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::LedgerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A bounded, field-less name for metric labels and logs; error text never becomes a label.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::MissingKey => "missing_key",
            GatewayError::InvalidKey => "invalid_key",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BodyRead => "body_read",
            GatewayError::MalformedJson(_) => "malformed_json",
            GatewayError::InvalidField { .. } => "invalid_field",
            GatewayError::UnknownModel(_) => "unknown_model",
            GatewayError::NoEligibleBackend { .. } => "no_eligible_backend",
            GatewayError::NotServable { .. } => "not_servable",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::UnknownPath(_) => "unknown_path",
            GatewayError::Overloaded => "overloaded",
            GatewayError::UpstreamConnect { .. } => "upstream_connect",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::UpstreamFailed { .. } => "upstream_failed",
            GatewayError::Internal => "internal",
            GatewayError::OverBudget(_) => "over_budget",
            GatewayError::LedgerUnavailable => "ledger_unavailable",
        }
    }

    /// OpenAI's `type` and `code` fields, as its SDKs and clients expect them.
    fn openai_type_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            GatewayError::MissingKey | GatewayError::InvalidKey => {
                ("invalid_request_error", Some("invalid_api_key"))
            }
            GatewayError::UnknownModel(_) => ("invalid_request_error", Some("model_not_found")),
            GatewayError::UnknownPath(_) => ("invalid_request_error", Some("unknown_url")),
            GatewayError::BodyTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"))
            }
            GatewayError::BodyRead
            | GatewayError::MalformedJson(_)
            | GatewayError::InvalidField { .. }
            | GatewayError::MethodNotAllowed { .. } => ("invalid_request_error", None),
            GatewayError::Overloaded => ("server_error", Some("overloaded")),
            GatewayError::NoEligibleBackend { .. } => ("server_error", Some("no_eligible_backend")),
            GatewayError::NotServable { code, .. } => ("invalid_request_error", Some(code)),
            GatewayError::Internal => ("server_error", None),
            GatewayError::OverBudget(_) => ("budget_exceeded", Some("budget_exceeded")),
            GatewayError::LedgerUnavailable => ("server_error", Some("ledger_unavailable")),
            GatewayError::UpstreamConnect { .. }
            | GatewayError::UpstreamFailed { .. }
            | GatewayError::UpstreamTimeout { .. } => ("upstream_error", Some(self.kind())),
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::InvalidField { param, .. } => Some(param),
            GatewayError::UnknownModel(_) => Some("model"),
            GatewayError::NotServable { code, .. } if *code == "context_length_exceeded" => {
                Some("messages")
            }
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::Overloaded | GatewayError::LedgerUnavailable => {
                Some(Duration::from_secs(1))
            }
            GatewayError::OverBudget(o) => Some(o.retry_after),
            GatewayError::NoEligibleBackend { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The OpenAI error body as bytes; also used for the error event that ends a broken stream.
    pub fn body_json(&self) -> Vec<u8> {
        let (kind, code) = self.openai_type_and_code();
        let mut body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "code": code,
                "param": self.param(),
            }
        });
        if let GatewayError::OverBudget(o) = self {
            // The same facts as the message, for programs.
            body["error"]["budget"] = serde_json::json!({
                "team": &*o.team,
                "key_id": o.key_id.as_deref(),
                "window": o.window.as_str(),
                "limit_usd": (o.kind == crate::budget::LimitKind::Usd).then(|| crate::meter::format_usd(o.limit)),
                "used_usd": (o.kind == crate::budget::LimitKind::Usd).then(|| crate::meter::format_usd(o.used)),
                "limit_tokens": (o.kind == crate::budget::LimitKind::Tokens).then_some(o.limit),
                "used_tokens": (o.kind == crate::budget::LimitKind::Tokens).then_some(o.used),
                "resets_at": crate::clock::format_time(o.reset_at_us),
            });
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }

    pub fn into_response(self) -> Response<GatewayBody> {
        let mut resp = Response::new(GatewayBody::full(Bytes::from(self.body_json())));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up: retrying a moment early would only be refused again.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let e = GatewayError::UnknownModel("gpt-9".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_slice(&e.body_json()).unwrap();
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
        let text = String::from_utf8(e.body_json()).unwrap();
        assert!(!text.contains("127.0.0.1"), "{text}");
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn shed_load_says_when_to_retry() {
        let resp = GatewayError::Overloaded.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[RETRY_AFTER], "1");
    }
}
