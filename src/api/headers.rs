//! The `x-tollgate-*` headers every proxied answer carries: where it went, why, what it cost.

use crate::budget::Remaining;
use crate::meter::{format_usd, Settled};
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub static X_TOLLGATE_BACKEND: HeaderName = HeaderName::from_static("x-tollgate-backend");
pub static X_TOLLGATE_MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
pub static X_TOLLGATE_PROMPT_TOKENS: HeaderName =
    HeaderName::from_static("x-tollgate-prompt-tokens");
pub static X_TOLLGATE_COMPLETION_TOKENS: HeaderName =
    HeaderName::from_static("x-tollgate-completion-tokens");
pub static X_TOLLGATE_TOKEN_SOURCE: HeaderName = HeaderName::from_static("x-tollgate-token-source");
pub static X_TOLLGATE_ROUTE: HeaderName = HeaderName::from_static("x-tollgate-route");
pub static X_TOLLGATE_COST_USD: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");
pub static X_TOLLGATE_BUDGET_REMAINING_USD: HeaderName =
    HeaderName::from_static("x-tollgate-budget-remaining-usd");
pub static X_TOLLGATE_BUDGET_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-tollgate-budget-remaining-tokens");

/// The room left in the team's tightest budgets after this request's reservation.
pub fn set_budget(h: &mut HeaderMap, r: &Remaining) {
    if let Some(nusd) = r.nusd {
        if let Ok(v) = HeaderValue::from_str(&format_usd(nusd.max(0))) {
            h.insert(X_TOLLGATE_BUDGET_REMAINING_USD.clone(), v);
        }
    }
    if let Some(tokens) = r.tokens {
        h.insert(
            X_TOLLGATE_BUDGET_REMAINING_TOKENS.clone(),
            HeaderValue::from(tokens.max(0)),
        );
    }
}

/// A whole answer's tokens and cost (a stream carries them in its closing comment instead).
pub fn set_usage(h: &mut HeaderMap, s: &Settled) {
    if let Some(u) = s.usage {
        h.insert(
            X_TOLLGATE_PROMPT_TOKENS.clone(),
            HeaderValue::from(u.prompt),
        );
        h.insert(
            X_TOLLGATE_COMPLETION_TOKENS.clone(),
            HeaderValue::from(u.completion),
        );
        h.insert(
            X_TOLLGATE_TOKEN_SOURCE.clone(),
            HeaderValue::from_static(u.source.as_str()),
        );
    }
    if s.priced {
        if let Ok(v) = HeaderValue::from_str(&format_usd(s.cost_nusd)) {
            h.insert(X_TOLLGATE_COST_USD.clone(), v);
        }
    }
}
