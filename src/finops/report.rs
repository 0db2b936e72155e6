//! Spend reports from the ledger: requests, tokens, cost and cost per inference, grouped by
//! any of team, model, backend, key, status, endpoint, day, hour, or a tag key.

use crate::ledger::read::{Dialect, Param, ReadError, Reader, Value};
use crate::meter::format_usd;

use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Team,
    /// The model that served the request (the requested one when none did).
    Model,
    RequestedModel,
    Backend,
    Key,
    Status,
    Endpoint,
    Day,
    Hour,
    /// The console's finest step: a short period still draws a curve.
    Minute,
    /// A tag key, e.g. `project`.
    Tag(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot group by `{0}`: use team, model, requested_model, backend, key, status, endpoint, day, hour, minute or a tag key")]
    BadDim(String),
    #[error("cannot read `{0}` as a time: use 2026-11-22, 2026-11-22T10:00:00Z, or an age like 30m, 24h, 7d")]
    BadTime(String),
    #[error("cannot read `{0}` as a month: use YYYY-MM, e.g. 2026-11")]
    BadMonth(String),
    #[error("unknown format `{0}`: use table, csv, json or focus")]
    BadFormat(String),
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl Dim {
    pub fn parse_list(s: &str) -> Result<Vec<Dim>, ReportError> {
        s.split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(Dim::parse)
            .collect()
    }

    fn parse(s: &str) -> Result<Dim, ReportError> {
        Ok(match s {
            "team" => Dim::Team,
            "model" => Dim::Model,
            "requested_model" => Dim::RequestedModel,
            "backend" => Dim::Backend,
            "key" => Dim::Key,
            "status" => Dim::Status,
            "endpoint" => Dim::Endpoint,
            "day" => Dim::Day,
            "hour" => Dim::Hour,
            "minute" => Dim::Minute,
            tag if !tag.is_empty()
                && tag.len() <= 64
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) =>
            {
                Dim::Tag(tag.to_string())
            }
            other => return Err(ReportError::BadDim(other.chars().take(64).collect())),
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Dim::Team => "team",
            Dim::Model => "model",
            Dim::RequestedModel => "requested_model",
            Dim::Backend => "backend",
            Dim::Key => "key",
            Dim::Status => "status",
            Dim::Endpoint => "endpoint",
            Dim::Day => "day",
            Dim::Hour => "hour",
            Dim::Minute => "minute",
            Dim::Tag(t) => t,
        }
    }

    /// The SQL expression; tag keys are restricted to `[A-Za-z0-9_.-]`, so inlining is safe.
    fn sql(&self, dialect: Dialect) -> String {
        let pg = "to_timestamp(started_at_us / 1000000) AT TIME ZONE 'UTC'";
        match (self, dialect) {
            (Dim::Day, Dialect::Postgres) => return format!("to_char({pg}, 'YYYY-MM-DD')"),
            (Dim::Hour, Dialect::Postgres) => {
                return format!("to_char({pg}, 'YYYY-MM-DD\"T\"HH24\":00Z\"')")
            }
            (Dim::Minute, Dialect::Postgres) => {
                return format!("to_char({pg}, 'YYYY-MM-DD\"T\"HH24:MI\"Z\"')")
            }
            (Dim::Tag(t), Dialect::Postgres) => {
                return format!("COALESCE(tags::jsonb ->> '{t}', '-')")
            }
            _ => {}
        }
        match self {
            Dim::Team => "team".into(),
            Dim::Model => "COALESCE(served_model, requested_model)".into(),
            Dim::RequestedModel => "requested_model".into(),
            Dim::Backend => "COALESCE(backend, '-')".into(),
            Dim::Key => "key_id".into(),
            Dim::Status => "status".into(),
            Dim::Endpoint => "endpoint".into(),
            Dim::Day => "strftime('%Y-%m-%d', started_at_us / 1000000, 'unixepoch')".into(),
            Dim::Hour => "strftime('%Y-%m-%dT%H:00Z', started_at_us / 1000000, 'unixepoch')".into(),
            Dim::Minute => {
                "strftime('%Y-%m-%dT%H:%MZ', started_at_us / 1000000, 'unixepoch')".into()
            }
            Dim::Tag(t) => format!("COALESCE(json_extract(tags, '$.\"{t}\"'), '-')"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Row {
    pub keys: Vec<String>,
    pub requests: u64,
    /// Requests that ended `ok`: the inferences a cost per inference divides by.
    pub inferences: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nusd: i64,
    /// Successful requests to models with no price: their cost is unknown, not zero.
    pub unpriced_requests: u64,
    /// Median and 95th percentile (nearest rank) of the cost of the priced inferences.
    pub p50_nusd: Option<i64>,
    pub p95_nusd: Option<i64>,
}

/// Rows for `[from_us, to_us)`, most expensive first. The grouping runs in the store, so
/// memory grows with the number of groups, never with the number of records.
pub fn query(
    conn: &Reader,
    by: &[Dim],
    from_us: Option<i64>,
    to_us: Option<i64>,
) -> Result<Vec<Row>, ReportError> {
    let keys: Vec<String> = by.iter().map(|d| d.sql(conn.dialect())).collect();
    let select_keys = if keys.is_empty() {
        String::new()
    } else {
        format!("{}, ", keys.join(", "))
    };
    let group = if keys.is_empty() {
        String::new()
    } else {
        format!(
            "GROUP BY {}",
            (1..=keys.len())
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // CAST: PostgreSQL sums BIGINTs as NUMERIC. `NOT priced` / `priced`: a boolean there, 0/1 here.
    let sql = format!(
        "SELECT {select_keys} COUNT(*), CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT),
                CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT),
                CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN NOT priced AND status = 'ok' THEN 1 ELSE 0 END), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN status = 'ok' THEN 1 ELSE 0 END), 0) AS BIGINT)
         FROM requests WHERE started_at_us >= ?1 AND started_at_us < ?2 {group}
         ORDER BY {} DESC",
        keys.len() + 4
    );
    let range = [
        Param::Int(from_us.unwrap_or(i64::MIN)),
        Param::Int(to_us.unwrap_or(i64::MAX)),
    ];
    let n = keys.len();
    let count = |v: &Value, i: usize| -> Result<u64, ReadError> { Ok(v.int(i)?.max(0) as u64) };
    let mut rows = Vec::new();
    conn.each(&sql, &range, |r| -> Result<(), ReportError> {
        rows.push(Row {
            keys: group_keys(r, n),
            requests: count(&r[n], n)?,
            prompt_tokens: count(&r[n + 1], n + 1)?,
            completion_tokens: count(&r[n + 2], n + 2)?,
            cost_nusd: r[n + 3].int(n + 3)?,
            unpriced_requests: count(&r[n + 4], n + 4)?,
            inferences: count(&r[n + 5], n + 5)?,
            p50_nusd: None,
            p95_nusd: None,
        });
        Ok(())
    })?;

    // Percentiles by nearest rank, ranked inside the store so memory does not grow with the
    // ledger: rank ⌈p·n⌉ of the group's costs in ascending order.
    let cols: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    let partition = if n == 0 {
        String::new()
    } else {
        // The expressions, not their aliases: a window cannot see its own SELECT's names.
        format!("PARTITION BY {}", keys.join(", "))
    };
    let aliased: String = keys
        .iter()
        .zip(&cols)
        .map(|(k, c)| format!("{k} AS {c}, "))
        .collect();
    let sql = format!(
        "WITH ranked AS (
           SELECT {aliased} cost_nusd,
                  ROW_NUMBER() OVER ({partition} ORDER BY cost_nusd) AS rn,
                  COUNT(*) OVER ({partition}) AS n
           FROM requests
           WHERE started_at_us >= ?1 AND started_at_us < ?2 AND status = 'ok' AND priced)
         SELECT {select} MAX(CASE WHEN rn = (n * 50 + 99) / 100 THEN cost_nusd END),
                MAX(CASE WHEN rn = (n * 95 + 99) / 100 THEN cost_nusd END)
         FROM ranked {group}",
        select = cols.iter().map(|c| format!("{c}, ")).collect::<String>(),
    );
    let mut percentiles: std::collections::HashMap<Vec<String>, (Option<i64>, Option<i64>)> =
        std::collections::HashMap::new();
    conn.each(&sql, &range, |r| -> Result<(), ReportError> {
        percentiles.insert(
            group_keys(r, n),
            (r[n].opt_int(n)?, r[n + 1].opt_int(n + 1)?),
        );
        Ok(())
    })?;
    for row in &mut rows {
        if let Some(&(p50, p95)) = percentiles.get(&row.keys) {
            row.p50_nusd = p50;
            row.p95_nusd = p95;
        }
    }
    Ok(rows)
}

fn group_keys(r: &[Value], n: usize) -> Vec<String> {
    r[..n]
        .iter()
        .map(|v| v.opt_text().unwrap_or_else(|| "-".into()))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// `focus` is not among these: the FOCUS export (`crate::finops::focus`) has its own rows and
/// columns, so callers choose it before parsing a report format.
impl std::str::FromStr for Format {
    type Err = ReportError;
    fn from_str(s: &str) -> Result<Self, ReportError> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(ReportError::BadFormat(other.into())),
        }
    }
}

/// Cost per successful inference in nano-dollars, rounded: everything the group spent
/// (partial answers and broken streams included) over the answers it got.
fn per_inference(r: &Row) -> i64 {
    if r.inferences == 0 {
        0
    } else {
        (r.cost_nusd as f64 / r.inferences as f64).round() as i64
    }
}

/// Tokens (prompt and completion) bought per dollar; `None` when nothing was spent.
fn tokens_per_usd(r: &Row) -> Option<f64> {
    (r.cost_nusd > 0)
        .then(|| (r.prompt_tokens + r.completion_tokens) as f64 / (r.cost_nusd as f64 / 1e9))
}

pub fn render(by: &[Dim], rows: &[Row], format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Json => {
            let items: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    let mut o = serde_json::Map::new();
                    for (d, k) in by.iter().zip(&r.keys) {
                        o.insert(d.name().into(), k.clone().into());
                    }
                    o.insert("requests".into(), r.requests.into());
                    o.insert("prompt_tokens".into(), r.prompt_tokens.into());
                    o.insert("completion_tokens".into(), r.completion_tokens.into());
                    o.insert("cost_usd".into(), usd_number(r.cost_nusd));
                    o.insert("inferences".into(), r.inferences.into());
                    o.insert(
                        "cost_per_inference_usd".into(),
                        usd_number(per_inference(r)),
                    );
                    o.insert(
                        "cost_per_inference_p50_usd".into(),
                        r.p50_nusd.map_or(serde_json::Value::Null, usd_number),
                    );
                    o.insert(
                        "cost_per_inference_p95_usd".into(),
                        r.p95_nusd.map_or(serde_json::Value::Null, usd_number),
                    );
                    o.insert(
                        "tokens_per_usd".into(),
                        tokens_per_usd(r)
                            .map(|t| serde_json::Value::from((t * 100.0).round() / 100.0))
                            .unwrap_or(serde_json::Value::Null),
                    );
                    o.insert("unpriced_requests".into(), r.unpriced_requests.into());
                    serde_json::Value::Object(o)
                })
                .collect();
            out = serde_json::to_string_pretty(&items).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            for d in by {
                let _ = write!(out, "{},", d.name());
            }
            out.push_str("requests,inferences,prompt_tokens,completion_tokens,cost_usd,cost_per_inference_usd,cost_per_inference_p50_usd,cost_per_inference_p95_usd,tokens_per_usd,unpriced_requests\n");
            for r in rows {
                for k in &r.keys {
                    let _ = write!(out, "{},", csv_field(k));
                }
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{}",
                    r.requests,
                    r.inferences,
                    r.prompt_tokens,
                    r.completion_tokens,
                    format_usd(r.cost_nusd),
                    format_usd(per_inference(r)),
                    r.p50_nusd.map(format_usd).unwrap_or_default(),
                    r.p95_nusd.map(format_usd).unwrap_or_default(),
                    tokens_per_usd(r).map_or(String::new(), |t| format!("{t:.2}")),
                    r.unpriced_requests
                );
            }
        }
        Format::Table => {
            let widths: Vec<usize> = by
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    rows.iter()
                        .map(|r| r.keys[i].len())
                        .chain([d.name().len()])
                        .max()
                        .unwrap_or(4)
                })
                .collect();
            for (d, w) in by.iter().zip(&widths) {
                let _ = write!(out, "{:<w$}  ", d.name());
            }
            let _ = writeln!(
                out,
                "{:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}",
                "requests", "prompt", "completion", "cost_usd", "usd/inf", "p50", "p95", "tok/usd"
            );
            let mut total = Row {
                keys: vec![],
                requests: 0,
                inferences: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_nusd: 0,
                unpriced_requests: 0,
                p50_nusd: None,
                p95_nusd: None,
            };
            let usd = |nusd: Option<i64>| {
                nusd.map_or("-".to_string(), |n| format!("{:.6}", n as f64 / 1e9))
            };
            let tok = |r: &Row| tokens_per_usd(r).map_or("-".to_string(), |t| format!("{t:.0}"));
            for r in rows {
                for (k, w) in r.keys.iter().zip(&widths) {
                    let _ = write!(out, "{k:<w$}  ");
                }
                let _ = writeln!(
                    out,
                    "{:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}{}",
                    r.requests,
                    r.prompt_tokens,
                    r.completion_tokens,
                    usd(Some(r.cost_nusd)),
                    usd((r.inferences > 0).then(|| per_inference(r))),
                    usd(r.p50_nusd),
                    usd(r.p95_nusd),
                    tok(r),
                    if r.unpriced_requests > 0 {
                        format!("  ({} unpriced)", r.unpriced_requests)
                    } else {
                        String::new()
                    }
                );
                total.requests += r.requests;
                total.inferences += r.inferences;
                total.prompt_tokens += r.prompt_tokens;
                total.completion_tokens += r.completion_tokens;
                total.cost_nusd += r.cost_nusd;
            }
            let pad: usize = widths.iter().map(|w| w + 2).sum();
            let _ = writeln!(
                out,
                "{:<pad$}{:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}",
                "total",
                total.requests,
                total.prompt_tokens,
                total.completion_tokens,
                usd(Some(total.cost_nusd)),
                usd((total.inferences > 0).then(|| per_inference(&total))),
                "",
                "",
                tok(&total)
            );
        }
    }
    out
}

/// An exact decimal JSON number from nano-dollars.
pub(crate) fn usd_number(nusd: i64) -> serde_json::Value {
    serde_json::from_str(&format_usd(nusd)).unwrap_or(serde_json::Value::Null)
}

/// One CSV field, quoted as RFC 4180 asks when it holds a separator, a quote or a line break.
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `2026-11-22`, `2026-11-22T10:00:00Z`, or an age (`30m`, `24h`, `7d`) before `now_us`.
pub fn parse_time(s: &str, now_us: i64) -> Result<i64, ReportError> {
    let bad = || ReportError::BadTime(s.chars().take(40).collect());
    if let Some(n) = s.strip_suffix('m').and_then(|n| n.parse::<i64>().ok()) {
        return Ok(now_us - n * 60_000_000);
    }
    if let Some(n) = s.strip_suffix('h').and_then(|n| n.parse::<i64>().ok()) {
        return Ok(now_us - n * 3_600_000_000);
    }
    if let Some(n) = s.strip_suffix('d').and_then(|n| n.parse::<i64>().ok()) {
        return Ok(now_us - n * 86_400_000_000);
    }
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00Z"));
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>());
    let (Some(Ok(y)), Some(Ok(mo)), Some(Ok(day))) = (d.next(), d.next(), d.next()) else {
        return Err(bad());
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let mut t = time.splitn(3, ':').map(|p| p.parse::<i64>());
    let (Some(Ok(h)), Some(Ok(mi))) = (t.next(), t.next()) else {
        return Err(bad());
    };
    let sec = match t.next() {
        Some(Ok(s)) => s,
        None => 0,
        Some(Err(_)) => return Err(bad()),
    };
    Ok(
        ((crate::clock::days_from_civil(y, mo, day) * 24 + h) * 60 + mi) * 60_000_000
            + sec * 1_000_000,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_dates_instants_and_ages() {
        assert_eq!(parse_time("1970-01-02", 0).unwrap(), 86_400_000_000);
        assert_eq!(
            parse_time("2026-11-22T10:30:00Z", 0).unwrap(),
            1_795_343_400_000_000
        );
        assert_eq!(
            parse_time("2h", 10_000_000_000).unwrap(),
            10_000_000_000 - 7_200_000_000
        );
        assert!(parse_time("yesterday", 0).is_err());
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("plain text"), "plain text");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("line\r\nbreak"), "\"line\r\nbreak\"");
    }

    #[test]
    fn groups_carry_cost_per_inference_percentiles_and_tokens_per_dollar() {
        use crate::ledger::testing::{rec, tokens, TempLedger};
        let at = |i: i64| 1_795_341_600_000_000 + i;
        let mut records = vec![];
        for (i, cost) in [(1, 1_000_000_000), (2, 2_000_000_000), (3, 10_000_000_000)] {
            records.push(tokens(
                rec(at(i), "a", Some("b"), "m", "{}"),
                1_000,
                1_000,
                cost,
            ));
        }
        // A broken stream still cost money: in the mean, not in the percentiles of answers.
        records.push(crate::ledger::Record {
            status: "upstream_broken",
            ..tokens(rec(at(4), "a", Some("b"), "m", "{}"), 0, 0, 3_000_000_000)
        });
        records.push(tokens(rec(at(5), "z", Some("b"), "m", "{}"), 10, 0, 0));
        let l = TempLedger::with("report-percentiles", &records);
        let rows = query(&l.conn, &[Dim::Team], None, None).unwrap();
        let a = rows.iter().find(|r| r.keys == ["a"]).unwrap();
        assert_eq!((a.requests, a.inferences), (4, 3));
        assert_eq!(
            per_inference(a),
            5_333_333_333,
            "$16 over 3 answers, rounded"
        );
        assert_eq!(
            (a.p50_nusd, a.p95_nusd),
            (Some(2_000_000_000), Some(10_000_000_000))
        );
        assert_eq!(tokens_per_usd(a), Some(6_000.0 / 16.0));
        let z = rows.iter().find(|r| r.keys == ["z"]).unwrap();
        assert_eq!(
            (z.p50_nusd, tokens_per_usd(z)),
            (Some(0), None),
            "free: no tokens per dollar"
        );
        let csv = render(&[Dim::Team], &rows, Format::Csv);
        assert!(
            csv.contains(
                "a,4,3,3000,3000,16.000000000,5.333333333,2.000000000,10.000000000,375.00,0"
            ),
            "{csv}"
        );
    }

    #[test]
    fn dims_refuse_anything_that_is_not_a_plain_name() {
        assert_eq!(Dim::parse_list("team, model,project").unwrap().len(), 3);
        assert!(Dim::parse_list("team,x')--").is_err());
    }
}
