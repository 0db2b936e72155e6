//! Metric names, their help text and buckets, set up once at start.
//!
//! Labels come only from bounded sets: configured team, backend and model names, status codes
//! and error kinds. Caller-chosen strings (an unknown model name, a tag value) never become a
//! label, so a misbehaving client cannot blow up the exposition.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

pub const REQUESTS_TOTAL: &str = "tollgate_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "tollgate_request_duration_seconds";
pub const BACKEND_IN_FLIGHT: &str = "tollgate_backend_in_flight";
pub const BACKEND_UP: &str = "tollgate_backend_up";
pub const UPSTREAM_ERRORS_TOTAL: &str = "tollgate_upstream_errors_total";
pub const REJECTED_TOTAL: &str = "tollgate_rejected_total";
pub const IN_FLIGHT: &str = "tollgate_in_flight";
pub const TOKENS_TOTAL: &str = "tollgate_tokens_total";
pub const UNPRICED_REQUESTS_TOTAL: &str = "tollgate_unpriced_requests_total";
pub const LEDGER_ERRORS_TOTAL: &str = "tollgate_ledger_errors_total";
pub const BUDGET_LIMIT_USD: &str = "tollgate_budget_limit_usd";
pub const BUDGET_SPENT_USD: &str = "tollgate_budget_spent_usd";
pub const BUDGET_REJECTIONS_TOTAL: &str = "tollgate_budget_rejections_total";
pub const BUDGET_SOFT_LIMIT_REACHED: &str = "tollgate_budget_soft_limit_reached";
pub const ROUTE_FALLBACKS_TOTAL: &str = "tollgate_route_fallbacks_total";

/// Latency buckets from 5 ms (a cached answer) to 10 minutes (a long generation).
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The process-wide recorder. `metrics` allows one global recorder, and tests start many
/// gateways in one process, so every gateway shares this handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), DURATION_BUCKETS)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours stays unused
            // and /metrics shows what this handle saw.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Histogram upkeep drains buckets that would otherwise grow until the next scrape.
pub async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Client requests finished, by team, model, backend and status."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from request received to last response byte sent."
    );
    describe_gauge!(BACKEND_IN_FLIGHT, "Requests in flight to each backend.");
    describe_gauge!(
        BACKEND_UP,
        "1 while a backend takes requests, 0 while its circuit is open (failures or failed health probes)."
    );
    describe_counter!(
        ROUTE_FALLBACKS_TOTAL,
        "Requests moved to the next candidate before any byte reached the client, by the backend that failed (from) and why (connect, timeout, failed, 429, 5xx)."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Upstream failures by backend and kind."
    );
    describe_counter!(
        REJECTED_TOTAL,
        "Requests refused before reaching a backend, by error kind."
    );
    describe_gauge!(IN_FLIGHT, "Client requests in flight in the gateway.");
    describe_counter!(
        TOKENS_TOTAL,
        "Tokens metered, by team, model, backend and direction (prompt, completion)."
    );
    describe_counter!(
        UNPRICED_REQUESTS_TOTAL,
        "Successful requests to a model with no price anywhere (config or catalog): cost unknown, not zero."
    );
    describe_counter!(
        LEDGER_ERRORS_TOTAL,
        "Failed ledger commits; while they fail, billable requests get 503."
    );
}
