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
pub const LEDGER_SPOOLED_RECORDS: &str = "tollgate_ledger_spooled_records";
pub const BUDGET_LIMIT_USD: &str = "tollgate_budget_limit_usd";
pub const BUDGET_SPENT_USD: &str = "tollgate_budget_spent_usd";
pub const BUDGET_REJECTIONS_TOTAL: &str = "tollgate_budget_rejections_total";
pub const BUDGET_SOFT_LIMIT_REACHED: &str = "tollgate_budget_soft_limit_reached";
pub const BUDGET_STORE_ERRORS_TOTAL: &str = "tollgate_budget_store_errors_total";
pub const BUDGET_FAIL_OPEN_TOTAL: &str = "tollgate_budget_fail_open_total";
pub const BUDGET_RESEEDS_TOTAL: &str = "tollgate_budget_reseeds_total";
pub const ROUTE_FALLBACKS_TOTAL: &str = "tollgate_route_fallbacks_total";
pub const RESENDS_TOTAL: &str = "tollgate_resends_total";
pub const COST_USD_TOTAL: &str = "tollgate_cost_usd_total";
pub const REQUEST_COST_USD: &str = "tollgate_request_cost_usd";
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "tollgate_time_to_first_token_seconds";
pub const OVERHEAD_SECONDS: &str = "tollgate_overhead_seconds";

/// The gateway's own time per request: microseconds normally, milliseconds when a ledger
/// commit or a local token count is slow.
const OVERHEAD_BUCKETS: &[f64] = &[
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.5,
];

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
                // Full matches win over the `_seconds` suffix.
                .set_buckets_for_metric(Matcher::Full(OVERHEAD_SECONDS.into()), OVERHEAD_BUCKETS)
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
        RESENDS_TOTAL,
        "Fallbacks after a backend that may still be working on the request (timeout, failed): a generation that may be paid twice. Allowed by routing.retry_on, or by default from self-hosted backends."
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
    describe_histogram!(
        OVERHEAD_SECONDS,
        Unit::Seconds,
        "Time spent in the gateway itself per request, by backend: from request received to response head sent, less the time waiting on upstreams (for a JSON answer that includes the ledger commit; relaying a stream's chunks is not counted)."
    );
    describe_counter!(
        LEDGER_ERRORS_TOTAL,
        "Failed ledger commits; while they fail, billable requests get 503."
    );
    describe_gauge!(
        LEDGER_SPOOLED_RECORDS,
        "Records in the local spool waiting for PostgreSQL (fleet ledger); 0 when it keeps up."
    );
    describe_gauge!(
        BUDGET_LIMIT_USD,
        "A team's dollar budget for its window (day, month, ...), as configured."
    );
    describe_gauge!(
        BUDGET_SPENT_USD,
        "What a team has spent in its budget window so far, in USD (reservations of requests in flight excluded)."
    );
    describe_counter!(
        BUDGET_REJECTIONS_TOTAL,
        "Requests refused with 429 because their worst-case cost or tokens did not fit a budget window, by team and window."
    );
    describe_gauge!(
        BUDGET_SOFT_LIMIT_REACHED,
        "1 once a team's spend in a window has passed the budget's soft_ratio."
    );
    describe_counter!(
        BUDGET_STORE_ERRORS_TOTAL,
        "Failed or timed-out calls to the shared (Redis) budget store, by operation (admit, settle, seed, renew, view); while admissions fail, budgets without fail_open refuse with 503."
    );
    describe_counter!(
        BUDGET_FAIL_OPEN_TOTAL,
        "Requests admitted on a replica's local fail_open allowance because the Redis budget store did not answer, by team."
    );
    describe_counter!(
        BUDGET_RESEEDS_TOTAL,
        "Times this replica found a team's budget counters lost by Redis (flushed, evicted or new) and rebuilt them from the ledger, by team."
    );
}

/// The values of the configured tag labels (`metrics.tag_labels`) for one request.
///
/// Keys are bounded by the config; values are the callers', so each key keeps at most
/// `metrics.max_tag_values` distinct values process-wide and counts the rest as `other`.
/// A request without the tag has an empty value, which Prometheus treats as no label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagLabels {
    keys: Option<Arc<[Arc<str>]>>,
    values: Vec<Arc<str>>,
}

/// One tag key's values seen so far, shared by every series that carries them.
type Interned = dashmap::DashMap<Box<str>, Arc<str>>;

/// The value a tag label takes once its key has seen `max_tag_values` others.
pub const OTHER_TAG_VALUE: &str = "other";

impl TagLabels {
    pub fn of(cfg: &crate::config::Metrics, tags: &crate::tags::Tags) -> Self {
        if cfg.tag_labels.is_empty() {
            return Self::default();
        }
        static SEEN: OnceLock<dashmap::DashMap<Arc<str>, Interned>> = OnceLock::new();
        let seen = SEEN.get_or_init(dashmap::DashMap::new);
        let values = cfg
            .tag_labels
            .iter()
            .map(|key| {
                let Some(value) = tags.get(&**key) else {
                    return Arc::from("");
                };
                let per_key = match seen.get(&**key) {
                    Some(m) => m,
                    None => {
                        seen.entry(key.clone()).or_default();
                        seen.get(&**key).expect("just inserted")
                    }
                };
                if let Some(v) = per_key.get(value.as_str()) {
                    return v.clone();
                }
                if per_key.len() >= cfg.max_tag_values {
                    return Arc::from(OTHER_TAG_VALUE);
                }
                let interned = per_key
                    .entry(value.as_str().into())
                    .or_insert_with(|| Arc::from(value.as_str()))
                    .clone();
                interned
            })
            .collect();
        Self {
            keys: Some(cfg.tag_labels.clone()),
            values,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>)> {
        self.keys.iter().flat_map(|k| k.iter()).zip(&self.values)
    }

    /// As `metrics` labels, appended to `labels`.
    pub fn extend(&self, labels: &mut Vec<metrics::Label>) {
        for (k, v) in self.iter() {
            labels.push(metrics::Label::new(k.clone(), v.clone()));
        }
    }
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
    pub tags: TagLabels,
}

/// The per-request series of one label set, registered once and kept: looking a series up
/// in the recorder builds its key (a label vector, hashed and compared) on every call, which
/// cost more than all the rest of a request's settlement. Each handle is made on first use, so
/// the exposition shows the same series as before (none at zero that never happened).
pub struct RequestSeries {
    labels: SpendLabels,
    /// Duration histogram and request counter, by the status's place in [`STATUSES`].
    by_status: [OnceLock<(metrics::Histogram, metrics::Counter)>; STATUSES],
    tokens: OnceLock<[metrics::Counter; 2]>,
    unpriced: OnceLock<metrics::Counter>,
    first_token: OnceLock<metrics::Histogram>,
    cost: OnceLock<metrics::Histogram>,
}

/// How many request statuses there are (the ledger's `status` values).
pub const STATUSES: usize = 8;

impl RequestSeries {
    /// The series of a label set, made on its first request. Bounded like the labels are:
    /// team, model and backend names from the config, tag values capped per key.
    pub fn of(labels: SpendLabels) -> Arc<RequestSeries> {
        static ALL: OnceLock<dashmap::DashMap<SpendLabels, Arc<RequestSeries>>> = OnceLock::new();
        let all = ALL.get_or_init(dashmap::DashMap::new);
        if let Some(s) = all.get(&labels) {
            return s.clone();
        }
        all.entry(labels.clone())
            .or_insert_with(|| {
                // Handles made before the recorder exists would count nothing, for good.
                let _ = install();
                Arc::new(RequestSeries {
                    labels,
                    by_status: Default::default(),
                    tokens: OnceLock::new(),
                    unpriced: OnceLock::new(),
                    first_token: OnceLock::new(),
                    cost: OnceLock::new(),
                })
            })
            .clone()
    }

    pub fn labels(&self) -> &SpendLabels {
        &self.labels
    }

    fn base(&self) -> Vec<metrics::Label> {
        let l = &self.labels;
        vec![
            metrics::Label::new("team", l.team.clone()),
            metrics::Label::new("model", l.model.clone()),
            metrics::Label::new(
                "backend",
                l.backend
                    .clone()
                    .map_or_else(|| metrics::SharedString::from(""), Into::into),
            ),
        ]
    }

    /// The duration histogram and the request counter of a status (`index` < [`STATUSES`]).
    pub fn ended(
        &self,
        index: usize,
        status: &'static str,
    ) -> &(metrics::Histogram, metrics::Counter) {
        self.by_status[index.min(STATUSES - 1)].get_or_init(|| {
            let mut with_status = self.base();
            with_status.push(metrics::Label::new("status", status));
            let duration = metrics::histogram!(REQUEST_DURATION_SECONDS, with_status.clone());
            // Counters carry the configured tag labels; histograms do not (a series per bucket).
            self.labels.tags.extend(&mut with_status);
            (duration, metrics::counter!(REQUESTS_TOTAL, with_status))
        })
    }

    /// Prompt and completion token counters.
    pub fn tokens(&self) -> &[metrics::Counter; 2] {
        self.tokens.get_or_init(|| {
            ["prompt", "completion"].map(|direction| {
                let mut l = self.base();
                l.push(metrics::Label::new("direction", direction));
                self.labels.tags.extend(&mut l);
                metrics::counter!(TOKENS_TOTAL, l)
            })
        })
    }

    pub fn unpriced(&self) -> &metrics::Counter {
        self.unpriced
            .get_or_init(|| metrics::counter!(UNPRICED_REQUESTS_TOTAL, self.base()))
    }

    pub fn first_token(&self) -> &metrics::Histogram {
        self.first_token
            .get_or_init(|| metrics::histogram!(TIME_TO_FIRST_TOKEN_SECONDS, self.base()))
    }

    pub fn cost(&self) -> &metrics::Histogram {
        self.cost
            .get_or_init(|| metrics::histogram!(REQUEST_COST_USD, self.base()))
    }
}

/// The process-wide dollar counters, beside [`install`]'s recorder.
pub fn usd() -> &'static UsdCounters {
    static USD: OnceLock<UsdCounters> = OnceLock::new();
    USD.get_or_init(|| UsdCounters {
        by_labels: dashmap::DashMap::new(),
    })
}

/// Prometheus text for the families the `metrics` crate cannot hold: exact USD sums and
/// figures computed when scraped. The one place that writes the text format by hand.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// `# HELP` and `# TYPE` of a family; its samples follow.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        for line in [("HELP", help), ("TYPE", kind)] {
            self.out.push_str("# ");
            self.out.push_str(line.0);
            self.out.push(' ');
            self.out.push_str(name);
            self.out.push(' ');
            self.out.push_str(line.1);
            self.out.push('\n');
        }
    }

    /// One sample; label values are escaped here.
    pub fn sample<'a>(
        &mut self,
        name: &str,
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
        value: impl std::fmt::Display,
    ) {
        use std::fmt::Write as _;
        self.out.push_str(name);
        let mut first = true;
        for (k, v) in labels {
            self.out.push(if first { '{' } else { ',' });
            first = false;
            self.out.push_str(k);
            self.out.push_str("=\"");
            escape(v, &mut self.out);
            self.out.push('"');
        }
        if !first {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    pub fn finish(self) -> String {
        self.out
    }
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
    pub fn add(&self, labels: &SpendLabels, nusd: i64) {
        let ordering = std::sync::atomic::Ordering::Relaxed;
        if let Some(c) = self.by_labels.get(labels) {
            c.fetch_add(nusd, ordering);
            return;
        }
        self.by_labels
            .entry(labels.clone())
            .or_default()
            .fetch_add(nusd, ordering);
    }

    /// Prometheus text for [`COST_USD_TOTAL`], sorted by labels.
    pub fn render(&self, out: &mut Exposition) {
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
        out.family(
            COST_USD_TOTAL,
            "counter",
            "Spend in USD, by team, model, backend and the configured tag labels (the ledger's costs, summed).",
        );
        for (l, nusd) in rows {
            let fixed = [
                ("team", &*l.team),
                ("model", &*l.model),
                ("backend", l.backend.as_deref().unwrap_or("")),
            ];
            let tags = l.tags.iter().map(|(k, v)| (&**k, &**v));
            out.sample(
                COST_USD_TOTAL,
                fixed.into_iter().chain(tags),
                crate::meter::format_usd(nusd),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_label_values_are_bounded_per_key() {
        let cfg = crate::config::Metrics {
            tag_labels: vec![Arc::from("tl_test_project"), Arc::from("tl_test_env")].into(),
            max_tag_values: 3,
            ..Default::default()
        };
        let tags =
            |p: &str| crate::tags::Tags::from([("tl_test_project".to_string(), p.to_string())]);
        let values = |t: &TagLabels| t.iter().map(|(_, v)| v.to_string()).collect::<Vec<_>>();
        for p in ["a", "b", "c"] {
            assert_eq!(values(&TagLabels::of(&cfg, &tags(p))), [p, ""]);
        }
        assert_eq!(values(&TagLabels::of(&cfg, &tags("d"))), ["other", ""]);
        assert_eq!(
            values(&TagLabels::of(&cfg, &tags("a"))),
            ["a", ""],
            "a value seen before keeps its own series"
        );
        assert_eq!(
            TagLabels::of(&Default::default(), &tags("a")),
            TagLabels::default(),
            "no tag labels configured: nothing to carry"
        );
    }

    #[test]
    fn spend_sums_exactly_and_renders_escaped_usd() {
        let c = UsdCounters {
            by_labels: dashmap::DashMap::new(),
        };
        let labels = SpendLabels {
            team: "a\"b".into(),
            model: "m".into(),
            backend: Some("x".into()),
            tags: TagLabels::default(),
        };
        c.add(&labels, 100_000_001);
        c.add(&labels, 200_000_002);
        let mut e = Exposition::new();
        c.render(&mut e);
        let text = e.finish();
        assert!(
            text.ends_with(
                "tollgate_cost_usd_total{team=\"a\\\"b\",model=\"m\",backend=\"x\"} 0.300000003\n"
            ),
            "{text}"
        );
    }
}
