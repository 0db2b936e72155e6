//! Metric names, their help text and buckets, set up once at start.
//!
//! Labels come only from bounded sets: configured team, backend and model names, status codes
//! and error kinds. Caller-chosen strings (an unknown model name, a tag value) never become a
//! label, so a misbehaving client cannot blow up the exposition.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
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
pub const COST_USD_TOTAL: &str = "tollgate_cost_usd_total";
pub const REQUEST_COST_USD: &str = "tollgate_request_cost_usd";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tollgate_time_to_first_token_seconds";

/// Cost of one inference, from a fraction of a cent's hundredth (a small self-hosted answer)
/// to dollars (a long-context call to a large model).
const COST_BUCKETS: &[f64] = &[
    1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
];

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
                .set_buckets_for_metric(Matcher::Full(REQUEST_COST_USD.into()), COST_BUCKETS)
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
    describe_histogram!(
        REQUEST_COST_USD,
        "Cost of each priced inference in USD, by team, model and backend."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from request received to the first generated token of a stream."
    );
    describe_counter!(
        LEDGER_ERRORS_TOTAL,
        "Failed ledger commits; while they fail, billable requests get 503."
    );
}

/// Dollar counters. The `metrics` crate's counters count whole units, so spend is summed here
/// in integer nano-dollars (exact, like the ledger) and exported as USD.
pub struct UsdCounters {
    by_labels: dashmap::DashMap<SpendLabels, std::sync::atomic::AtomicI64>,
}

/// The labels of a spend counter: names from the config, so bounded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpendLabels {
    pub team: Arc<str>,
    pub model: Arc<str>,
    /// `None` for a request refused before a backend was chosen.
    pub backend: Option<Arc<str>>,
}

/// The process-wide dollar counters, beside [`install`]'s recorder.
pub fn usd() -> &'static UsdCounters {
    static USD: OnceLock<UsdCounters> = OnceLock::new();
    USD.get_or_init(|| UsdCounters {
        by_labels: dashmap::DashMap::new(),
    })
}

/// A label value as the text format wants it.
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl UsdCounters {
    /// Adds `nusd` to the counter of these labels; no allocation once the counter exists.
    pub fn add(&self, labels: SpendLabels, nusd: i64) {
        let ordering = std::sync::atomic::Ordering::Relaxed;
        if let Some(c) = self.by_labels.get(&labels) {
            c.fetch_add(nusd, ordering);
            return;
        }
        self.by_labels
            .entry(labels)
            .or_default()
            .fetch_add(nusd, ordering);
    }

    /// Prometheus text for [`COST_USD_TOTAL`], sorted by labels.
    pub fn render(&self) -> String {
        let mut rows: Vec<(SpendLabels, i64)> = self
            .by_labels
            .iter()
            .map(|e| {
                (
                    e.key().clone(),
                    e.value().load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect();
        rows.sort();
        let mut out = format!(
            "# HELP {COST_USD_TOTAL} Spend in USD, by team, model and backend (the ledger's costs, summed).\n# TYPE {COST_USD_TOTAL} counter\n"
        );
        for (l, nusd) in rows {
            out.push_str(COST_USD_TOTAL);
            out.push_str("{team=\"");
            escape(&l.team, &mut out);
            out.push_str("\",model=\"");
            escape(&l.model, &mut out);
            out.push_str("\",backend=\"");
            escape(l.backend.as_deref().unwrap_or(""), &mut out);
            out.push_str("\"} ");
            out.push_str(&crate::meter::format_usd(nusd));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spend_sums_exactly_and_renders_escaped_usd() {
        let c = UsdCounters {
            by_labels: dashmap::DashMap::new(),
        };
        let labels = SpendLabels {
            team: "a\"b".into(),
            model: "m".into(),
            backend: Some("x".into()),
        };
        c.add(labels.clone(), 100_000_001);
        c.add(labels, 200_000_002);
        assert!(
            c.render().ends_with(
                "tollgate_cost_usd_total{team=\"a\\\"b\",model=\"m\",backend=\"x\"} 0.300000003\n"
            ),
            "{}",
            c.render()
        );
    }
}
