//! Every way a request can fail, as data: its status, its kind, the type, code and param a
//! client branches on, when to retry. It knows no response body: the edge renders it once,
//! in the client's protocol (`api::error`).
//!
//! Messages about bad input say exactly what was wrong; internal and upstream failures say
//! nothing internal (the real error is logged once, server-side).

use http::StatusCode;
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
    #[error("the request body did not arrive within {}s", .after.as_secs_f64())]
    BodyTimeout { after: Duration },
    #[error("request headers over the limit: {0}")]
    HeadersTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// One API key holds its whole share of the gateway's in-flight slots.
    #[error("this API key already has {limit} requests in flight, its share of the gateway; retry when one ends")]
    KeyInFlight { limit: usize },
    #[error("the gateway is shutting down; retry on another replica")]
    ShuttingDown,
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
    /// The admin port: no key, or the wrong one.
    #[error("admin key required")]
    AdminKey,
    /// The admin port: a reload found the config file invalid; the running config stays.
    #[error("{0}")]
    InvalidConfig(String),
    /// The admin port: a report could not read the ledger.
    #[error("the ledger could not be read")]
    LedgerRead,
    #[error("{}", over_budget_message(.0))]
    OverBudget(Box<crate::budget::OverBudget>),
    #[error("the budget store cannot be reached, so budgets cannot be checked; retry shortly")]
    BudgetStoreUnavailable,
    #[error("internal error")]
    Internal,
}

impl From<crate::tags::TagError> for GatewayError {
    fn from(e: crate::tags::TagError) -> Self {
        GatewayError::InvalidField {
            param: e.param,
            message: e.message,
        }
    }
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
            GatewayError::MissingKey | GatewayError::InvalidKey | GatewayError::AdminKey => {
                StatusCode::UNAUTHORIZED
            }
            GatewayError::InvalidConfig(_) => StatusCode::BAD_REQUEST,
            GatewayError::LedgerRead => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::KeyInFlight { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
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
            GatewayError::LedgerUnavailable | GatewayError::BudgetStoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// A bounded, field-less name for metric labels and logs; error text never becomes a label.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::MissingKey => "missing_key",
            GatewayError::InvalidKey => "invalid_key",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BodyRead => "body_read",
            GatewayError::BodyTimeout { .. } => "body_timeout",
            GatewayError::HeadersTooLarge(_) => "headers_too_large",
            GatewayError::UnsupportedMediaType(_) => "unsupported_media_type",
            GatewayError::KeyInFlight { .. } => "key_in_flight",
            GatewayError::ShuttingDown => "shutting_down",
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
            GatewayError::BudgetStoreUnavailable => "budget_store_unavailable",
            GatewayError::AdminKey => "admin_key",
            GatewayError::InvalidConfig(_) => "invalid_config",
            GatewayError::LedgerRead => "ledger_read",
        }
    }

    /// OpenAI's `type` and `code` fields, as its SDKs and clients expect them.
    pub fn openai_type_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            GatewayError::MissingKey | GatewayError::InvalidKey | GatewayError::AdminKey => {
                ("invalid_request_error", Some("invalid_api_key"))
            }
            GatewayError::InvalidConfig(_) => ("invalid_request_error", Some("invalid_config")),
            GatewayError::LedgerRead => ("server_error", None),
            GatewayError::UnknownModel(_) => ("invalid_request_error", Some("model_not_found")),
            GatewayError::UnknownPath(_) => ("invalid_request_error", Some("unknown_url")),
            GatewayError::BodyTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"))
            }
            GatewayError::BodyRead
            | GatewayError::MalformedJson(_)
            | GatewayError::InvalidField { .. }
            | GatewayError::MethodNotAllowed { .. } => ("invalid_request_error", None),
            GatewayError::BodyTimeout { .. } => ("invalid_request_error", Some("request_timeout")),
            GatewayError::HeadersTooLarge(_) => (
                "invalid_request_error",
                Some("request_header_fields_too_large"),
            ),
            GatewayError::UnsupportedMediaType(_) => {
                ("invalid_request_error", Some("unsupported_media_type"))
            }
            // OpenAI's own rate-limit refusal, which its SDKs retry with backoff.
            GatewayError::KeyInFlight { .. } => ("requests", Some("rate_limit_exceeded")),
            GatewayError::ShuttingDown => ("server_error", Some("shutting_down")),
            GatewayError::Overloaded => ("server_error", Some("overloaded")),
            GatewayError::NoEligibleBackend { .. } => ("server_error", Some("no_eligible_backend")),
            GatewayError::NotServable { code, .. } => ("invalid_request_error", Some(code)),
            GatewayError::Internal => ("server_error", None),
            GatewayError::OverBudget(_) => ("budget_exceeded", Some("budget_exceeded")),
            GatewayError::LedgerUnavailable => ("server_error", Some("ledger_unavailable")),
            GatewayError::BudgetStoreUnavailable => {
                ("server_error", Some("budget_store_unavailable"))
            }
            GatewayError::UpstreamConnect { .. }
            | GatewayError::UpstreamFailed { .. }
            | GatewayError::UpstreamTimeout { .. } => ("upstream_error", Some(self.kind())),
        }
    }

    /// The request field a bad-input error is about.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::InvalidField { param, .. } => Some(param),
            GatewayError::UnknownModel(_) => Some("model"),
            GatewayError::NotServable { code, .. } if *code == "context_length_exceeded" => {
                Some("messages")
            }
            _ => None,
        }
    }

    /// When a client may try again, for the `Retry-After` header.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::Overloaded
            | GatewayError::LedgerUnavailable
            | GatewayError::BudgetStoreUnavailable
            | GatewayError::KeyInFlight { .. }
            | GatewayError::ShuttingDown => Some(Duration::from_secs(1)),
            GatewayError::OverBudget(o) => Some(o.retry_after),
            GatewayError::NoEligibleBackend { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The budget a refusal is about, for the body's machine-readable details.
    pub fn over_budget(&self) -> Option<&crate::budget::OverBudget> {
        match self {
            GatewayError::OverBudget(o) => Some(o),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_can_branch_on_status_type_and_code() {
        let e = GatewayError::UnknownModel("gpt-9".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.openai_type_and_code(),
            ("invalid_request_error", Some("model_not_found"))
        );
        assert_eq!(e.param(), Some("model"));
        assert_eq!(
            GatewayError::Overloaded.retry_after(),
            Some(Duration::from_secs(1))
        );
    }
}
