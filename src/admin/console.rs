//! `GET /admin/console?from=…&to=…&tag=…`: every figure the dashboard draws, in one JSON
//! document, for one period.
//!
//! Nothing here computes a figure of its own: each panel is the output of the function that
//! makes the same figure for `tollgate report` (`finops::report::query`,
//! `finops::backends::economics`, rendered by their own JSON renderers), of the budget
//! counters `GET /admin/budgets` shows, or of the live occupancy counters `/metrics` exports.
//! The page only sums, splits and draws; each panel carries a `source` saying where its
//! numbers come from, so a reader can check them against the report.

use crate::config::prices::Catalog;
use crate::config::{Config, Hosting};
use crate::finops::backends;
use crate::finops::report::{self, Dim, Format, ReportError, Row};
use crate::ledger::read::Reader;
use std::collections::HashSet;

/// Slices of the period the GPU busy ratio is drawn over.
const BUSY_SLICES: i64 = 24;

/// One console request, checked.
#[derive(Debug, Clone)]
pub struct Query {
    /// `None`: from the ledger's first record, as `tollgate report` without `--since`.
    pub from_us: Option<i64>,
    pub to_us: i64,
    /// The tag key of the "by project" chart.
    pub tag: String,
}

/// A period with both ends known.
#[derive(Debug, Clone)]
struct Period {
    from_us: i64,
    to_us: i64,
    /// The time dimension of the spend charts: minute, hour or day, from the period's length.
    step: Dim,
}

impl Query {
    /// `from` (`all`, the default: the ledger's first record) and `to` (default now) as the
    /// report reads them, and `tag` (default the first of `metrics.tag_labels`, else `project`).
    pub fn parse(query: &str, config: &Config, now_us: i64) -> Result<Query, ReportError> {
        let param = |name| super::param(query, name);
        let from_us = match param("from").as_deref() {
            None | Some("all") => None,
            Some(f) => Some(report::parse_time(f, now_us)?),
        };
        let to_us = match param("to") {
            Some(t) => report::parse_time(&t, now_us)?,
            None => now_us,
        };
        if from_us.is_some_and(|f| to_us <= f) {
            return Err(ReportError::BadTime(format!(
                "{}: `to` must be after `from`",
                crate::clock::format_time(to_us)
            )));
        }
        let tag = param("tag")
            .or_else(|| config.metrics.tag_labels.first().map(|t| t.to_string()))
            .unwrap_or_else(|| "project".into());
        // A tag key must be one the report can group by, not a time or column name.
        let tag = match Dim::parse_list(&tag)?.as_slice() {
            [Dim::Tag(t)] => t.clone(),
            _ => return Err(ReportError::BadDim(tag.chars().take(64).collect())),
        };
        Ok(Query {
            from_us,
            to_us,
            tag,
        })
    }

    /// Both ends: an open start is the ledger's first record (the last hour of an empty one).
    fn period(&self, conn: &Reader) -> Result<Period, ReportError> {
        let from_us = match self.from_us {
            Some(f) => f,
            None => conn
                .rows("SELECT MIN(started_at_us) FROM requests", &[])?
                .first()
                .map(|r| r[0].opt_int(0))
                .transpose()?
                .flatten()
                .filter(|f| *f < self.to_us)
                .unwrap_or(self.to_us - 3_600_000_000),
        };
        let span = self.to_us - from_us;
        let step = if span <= 3 * 3_600_000_000 {
            Dim::Minute
        } else if span <= 3 * 86_400_000_000 {
            Dim::Hour
        } else {
            Dim::Day
        };
        Ok(Period {
            from_us,
            to_us: self.to_us,
            step,
        })
    }
}

/// The ledger's part of the console (everything but budgets and live counters, which the
/// caller adds). Blocks: run it off the runtime.
pub fn ledger_panels(
    conn: &Reader,
    config: &Config,
    catalog: &Catalog,
    query: &Query,
    now_us: i64,
) -> Result<serde_json::Value, ReportError> {
    let q = &query.period(conn)?;
    let (from, to) = (Some(q.from_us), Some(q.to_us));
    let cli = |by: &str| {
        format!(
            "ledger: tollgate report --by {by} --since {} --until {} --format json",
            crate::clock::format_time(q.from_us),
            crate::clock::format_time(q.to_us)
        )
    };
    let grouped = |by: Vec<Dim>| -> Result<(Vec<Row>, serde_json::Value), ReportError> {
        let rows = report::query(conn, &by, from, to)?;
        let json = serde_json::from_str(&report::render(&by, &rows, Format::Json))
            .unwrap_or(serde_json::Value::Null);
        Ok((rows, json))
    };
    let step = q.step.name().to_string();
    let spend = |by: Dim| -> Result<serde_json::Value, ReportError> {
        let name = by.name().to_string();
        let (_, rows) = grouped(vec![q.step.clone(), by])?;
        Ok(serde_json::json!({
            "dimension": name,
            "rows": rows,
            "source": cli(&format!("{step},{name}")),
        }))
    };
    let by_team = spend(Dim::Team)?;
    let by_tag = spend(Dim::Tag(query.tag.clone()))?;
    let by_model = spend(Dim::Model)?;
    let (_, unit) = grouped(vec![Dim::Model, Dim::Backend])?;

    let gpus = backends::economics(conn, config, catalog, from, to, now_us)?;
    let verdicts: Vec<serde_json::Value> = gpus
        .iter()
        .map(|r| serde_json::json!({"backend": r.backend, "verdict": backends::verdict(r)}))
        .collect();
    let economics: serde_json::Value = serde_json::from_str(&backends::render(&gpus, Format::Json))
        .unwrap_or(serde_json::Value::Null);
    let busy = busy_over_time(conn, config, catalog, q, now_us)?;

    let (by_backend, _) = grouped(vec![Dim::Backend])?;
    let (by_requested, _) = grouped(vec![Dim::RequestedModel, Dim::Backend])?;
    let routing = routing(config, &by_backend, &by_requested);

    Ok(serde_json::json!({
        "period": {
            "from": crate::clock::format_time(q.from_us),
            "to": crate::clock::format_time(q.to_us),
            "step": step,
            "tag": query.tag,
            "open_start": query.from_us.is_none(),
        },
        "spend": {
            "step": step,
            "by_team": by_team,
            "by_tag": by_tag,
            "by_model": by_model,
        },
        "unit_economics": {
            "rows": unit,
            "source": cli("model,backend"),
        },
        "gpus": {
            "economics": economics,
            "verdicts": verdicts,
            "busy_over_time": busy,
            "source": format!(
                "ledger and config: tollgate report --backends --since {} --until {} --format json",
                crate::clock::format_time(q.from_us),
                crate::clock::format_time(q.to_us)
            ),
        },
        "routing": routing,
    }))
}

/// The busy ratio of each self-hosted backend in equal slices of the period: the report's
/// own economics, once per slice.
fn busy_over_time(
    conn: &Reader,
    config: &Config,
    catalog: &Catalog,
    q: &Period,
    now_us: i64,
) -> Result<Vec<serde_json::Value>, ReportError> {
    let slice = ((q.to_us - q.from_us) / BUSY_SLICES).max(1);
    let mut out = Vec::new();
    let mut start = q.from_us;
    while start < q.to_us {
        let end = (start + slice).min(q.to_us);
        let rows = backends::economics(conn, config, catalog, Some(start), Some(end), now_us)?;
        let ratios: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| (r.backend.clone(), r.busy_ratio.into()))
            .collect();
        out.push(serde_json::json!({
            "from": crate::clock::format_time(start),
            "to": crate::clock::format_time(end),
            "busy_ratio": ratios,
        }));
        start = end;
    }
    Ok(out)
}

/// Requests and dollars on owned GPUs against commercial APIs, and the spill-over: requests
/// for a model or alias that a self-hosted backend serves, which a commercial one served.
/// With `routing.self_hosted_cost = "marginal"` owned capacity costs nothing until it is
/// full, so these are the requests that found it saturated (or down, or unfit).
fn routing(config: &Config, by_backend: &[Row], by_requested: &[Row]) -> serde_json::Value {
    let hosting = |name: &str| {
        config
            .backends
            .iter()
            .find(|b| *b.name == *name)
            .map(|b| b.hosting)
    };
    let owned_names: HashSet<&str> = config
        .backends
        .iter()
        .filter(|b| b.hosting == Hosting::SelfHosted)
        .flat_map(|b| b.models.iter())
        .flat_map(|m| std::iter::once(&*m.name).chain(m.aliases.iter().map(|a| &**a)))
        .collect();
    let mut classes = [(0u64, 0i64); 3];
    for r in by_backend {
        let i = match hosting(&r.keys[0]) {
            Some(Hosting::SelfHosted) => 0,
            Some(Hosting::Commercial) => 1,
            None => 2,
        };
        classes[i].0 += r.requests;
        classes[i].1 += r.cost_nusd;
    }
    let (mut spill_requests, mut spill_nusd) = (0u64, 0i64);
    let mut spill_rows = Vec::new();
    for r in by_requested {
        let (requested, backend) = (&r.keys[0], &r.keys[1]);
        if hosting(backend) == Some(Hosting::Commercial) && owned_names.contains(&**requested) {
            spill_requests += r.requests;
            spill_nusd += r.cost_nusd;
            spill_rows.push(serde_json::json!({
                "requested_model": requested,
                "backend": backend,
                "requests": r.requests,
                "cost_usd": report::usd_number(r.cost_nusd),
            }));
        }
    }
    let class = |(requests, nusd): (u64, i64)| serde_json::json!({"requests": requests, "cost_usd": report::usd_number(nusd)});
    serde_json::json!({
        "self_hosted": class(classes[0]),
        "commercial": class(classes[1]),
        "no_backend": class(classes[2]),
        "spill": {
            "requests": spill_requests,
            "cost_usd": report::usd_number(spill_nusd),
            "rows": spill_rows,
        },
        "source": "ledger: tollgate report --by backend and --by requested_model,backend; \
                   hosting from the config; spill-over = requests for a model or alias a \
                   self-hosted backend serves that a commercial backend served",
    })
}
