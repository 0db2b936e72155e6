//! Unit economics of each self-hosted backend over a report's period, from the ledger and the
//! config: what its GPUs cost, how busy they were, what its requests were charged, the idle
//! rest, and whether owning them beats the cheapest commercial model serving the same names.
//!
//! ```text
//! paid        = hourly_usd × count × fraction × period        (owned GPUs are paid all along)
//! idle cost   = paid − charged                                 (negative: the rate card over-recovered)
//! busy        = union of its requests' [start, end) ÷ period
//! concurrency = Σ request durations ÷ (period × max_concurrency)
//! effective   = paid ÷ tokens served × 1M                      (what a million tokens really cost)
//! commercial  = the same tokens at the cheapest commercial model serving that model or alias
//! break-even  = tokens per hour at which the hours cost what those tokens would
//! ```
//!
//! The period is the report's `--since`/`--until`, or from the ledger's first record to now.

use crate::config::prices::{self, Catalog, Price};
use crate::config::{Backend, Config, Hosting};
use crate::finops::report::{Format, ReportError};
use crate::meter::{self, TokenSource, Usage};
use rusqlite::Connection;

const HOUR_US: f64 = 3_600_000_000.0;

#[derive(Debug, Clone, PartialEq)]
pub struct BackendEconomics {
    pub backend: String,
    pub from_us: i64,
    pub to_us: i64,
    pub gpu_hours: f64,
    pub paid_nusd: i64,
    pub charged_nusd: i64,
    /// `paid − charged`; negative when requests were charged more than the hours cost.
    pub idle_nusd: i64,
    pub inferences: u64,
    pub tokens: u64,
    pub busy_ratio: f64,
    pub concurrency_ratio: Option<f64>,
    /// Paid per million tokens served; `None` when none were.
    pub effective_nusd_per_mtok: Option<i64>,
    pub tokens_per_hour: f64,
    /// At the rated `tokens_per_second`, when the config gives one.
    pub capacity_tokens_per_hour: Option<f64>,
    pub commercial: Option<Commercial>,
}

/// The cheapest commercial way to serve the same tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Commercial {
    /// `backend/model`, one per model the self-hosted backend served, joined with `+`.
    pub serving: String,
    pub cost_nusd: i64,
    /// `(commercial − paid) ÷ commercial`: 0.4 means owning was 40% cheaper, −0.4 dearer.
    pub owning_saves: f64,
    /// Tokens per hour at which the paid hours cost what the same tokens would commercially.
    pub break_even_tokens_per_hour: f64,
}

/// One row per self-hosted backend with a `gpu` cost in the config.
pub fn economics(
    conn: &Connection,
    config: &Config,
    catalog: &Catalog,
    from_us: Option<i64>,
    to_us: Option<i64>,
    now_us: i64,
) -> Result<Vec<BackendEconomics>, ReportError> {
    let from = match from_us {
        Some(f) => f,
        None => {
            let first: Option<i64> =
                conn.query_row("SELECT MIN(started_at_us) FROM requests", [], |r| r.get(0))?;
            match first {
                Some(f) => f,
                None => return Ok(Vec::new()),
            }
        }
    };
    let to = to_us.unwrap_or(now_us);
    if to <= from {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for b in &config.backends {
        let Some(gpu) = b.gpu.as_ref().filter(|_| b.hosting == Hosting::SelfHosted) else {
            continue;
        };
        let period_us = (to - from) as f64;
        let gpus = gpu.gpus();
        let rate_nusd_per_hour = gpu.nusd_per_hour() as f64;
        let paid_nusd = gpu.paid_nusd(to - from);
        let (busy_us, in_flight_us) = occupancy(conn, &b.name, from, to)?;
        let served = served_models(conn, &b.name, from, to)?;
        let tokens: u64 = served.iter().map(|s| s.prompt + s.completion).sum();
        let (charged_nusd, inferences): (i64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(cost_nusd), 0), COALESCE(SUM(status = 'ok'), 0) FROM requests
             WHERE backend = ?1 AND started_at_us >= ?2 AND started_at_us < ?3",
            rusqlite::params![&*b.name, from, to],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let hours = period_us / HOUR_US;
        let commercial =
            cheapest_commercial(config, catalog, b, &served).map(|(serving, cost_nusd)| {
                let cost = cost_nusd as f64;
                Commercial {
                    serving,
                    cost_nusd,
                    owning_saves: if cost > 0.0 {
                        (cost - paid_nusd as f64) / cost
                    } else {
                        f64::NEG_INFINITY
                    },
                    break_even_tokens_per_hour: if cost > 0.0 {
                        rate_nusd_per_hour / (cost / tokens as f64)
                    } else {
                        f64::INFINITY
                    },
                }
            });
        out.push(BackendEconomics {
            backend: b.name.to_string(),
            from_us: from,
            to_us: to,
            gpu_hours: gpus * hours,
            paid_nusd,
            charged_nusd,
            idle_nusd: paid_nusd - charged_nusd,
            inferences: inferences as u64,
            tokens,
            busy_ratio: busy_us as f64 / period_us,
            concurrency_ratio: b
                .max_concurrency
                .map(|cap| in_flight_us as f64 / period_us / cap.max(1) as f64),
            effective_nusd_per_mtok: (tokens > 0)
                .then(|| (paid_nusd as f64 / tokens as f64 * 1e6).round() as i64),
            tokens_per_hour: tokens as f64 / hours,
            capacity_tokens_per_hour: gpu.tokens_per_second.map(|t| t * 3600.0),
            commercial,
        });
    }
    Ok(out)
}

/// Time with at least one request in flight, and request-time in flight, within the period.
fn occupancy(
    conn: &Connection,
    backend: &str,
    from: i64,
    to: i64,
) -> Result<(i64, i64), ReportError> {
    let mut stmt = conn.prepare_cached(
        "SELECT started_at_us, ended_at_us FROM requests
         WHERE backend = ?1 AND ended_at_us > ?2 AND started_at_us < ?3
         ORDER BY started_at_us",
    )?;
    let mut rows = stmt.query(rusqlite::params![backend, from, to])?;
    let (mut busy, mut area) = (0i64, 0i64);
    // The union of intervals sorted by start: extend the current run or close it.
    let mut run: Option<(i64, i64)> = None;
    while let Some(r) = rows.next()? {
        let start = r.get::<_, i64>(0)?.max(from);
        let end = r.get::<_, i64>(1)?.min(to);
        if end <= start {
            continue;
        }
        area += end - start;
        run = match run {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                busy += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((s, e)) = run {
        busy += e - s;
    }
    Ok((busy, area))
}

/// Tokens a backend served, per model; refused requests (nothing generated) left out.
#[derive(Debug)]
struct Served {
    model: String,
    prompt: u64,
    completion: u64,
    cached: u64,
}

fn served_models(
    conn: &Connection,
    backend: &str,
    from: i64,
    to: i64,
) -> Result<Vec<Served>, ReportError> {
    let mut stmt = conn.prepare_cached(
        "SELECT served_model, COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),
                COALESCE(SUM(cached_tokens), 0)
         FROM requests
         WHERE backend = ?1 AND started_at_us >= ?2 AND started_at_us < ?3
           AND served_model IS NOT NULL AND status != 'upstream_error'
         GROUP BY served_model ORDER BY served_model",
    )?;
    let rows = stmt.query_map(rusqlite::params![backend, from, to], |r| {
        Ok(Served {
            model: r.get(0)?,
            prompt: r.get::<_, i64>(1)? as u64,
            completion: r.get::<_, i64>(2)? as u64,
            cached: r.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// For each model served, the cheapest commercial model sharing its name or an alias, and
/// the summed cost in nano-dollars; `None` when some served model has no commercial twin.
fn cheapest_commercial(
    config: &Config,
    catalog: &Catalog,
    owned: &Backend,
    served: &[Served],
) -> Option<(String, i64)> {
    let mut names = Vec::new();
    let mut total = 0;
    for s in served.iter().filter(|s| s.prompt + s.completion > 0) {
        let own = owned.models.iter().find(|m| *m.name == *s.model);
        let same = |name: &str| {
            name == s.model || own.is_some_and(|m| m.aliases.iter().any(|a| **a == *name))
        };
        let best = config
            .backends
            .iter()
            .filter(|b| b.hosting == Hosting::Commercial)
            .flat_map(|b| b.models.iter().map(move |m| (b, m)))
            .filter(|(_, m)| same(&m.name) || m.aliases.iter().any(|a| same(a)))
            .filter_map(|(b, m)| {
                let price = prices::resolve(b, m, catalog)?;
                Some((format!("{}/{}", b.name, m.name), cost_nusd(&price, s)))
            })
            .min_by_key(|c| c.1)?;
        names.push(best.0);
        total += best.1;
    }
    (!names.is_empty()).then(|| (names.join("+"), total))
}

/// The metering's own pricing, at base-tier prices: the sums no longer say which request
/// crossed a long-context threshold.
fn cost_nusd(p: &Price, s: &Served) -> i64 {
    let base = Price {
        long_context: None,
        ..p.clone()
    };
    let usage = Usage {
        prompt: s.prompt,
        completion: s.completion,
        cached: s.cached,
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: 0,
        source: TokenSource::Upstream,
    };
    meter::cost_nusd(Some(&base), &usage, 0, None)
}

/// The rows as a table (with a sentence per backend on owning vs renting), CSV or JSON.
pub fn render(rows: &[BackendEconomics], format: Format) -> String {
    use crate::clock::format_time;
    use crate::finops::report::{csv_field, usd_number};
    use crate::meter::format_usd;
    use std::fmt::Write as _;
    let mut out = String::new();
    let pct = |r: f64| format!("{:.1}%", r * 100.0);
    match format {
        Format::Json => {
            let items: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "backend": r.backend,
                        "from": format_time(r.from_us),
                        "to": format_time(r.to_us),
                        "gpu_hours": r.gpu_hours,
                        "paid_usd": usd_number(r.paid_nusd),
                        "charged_usd": usd_number(r.charged_nusd),
                        "idle_cost_usd": usd_number(r.idle_nusd),
                        "inferences": r.inferences,
                        "tokens": r.tokens,
                        "busy_ratio": r.busy_ratio,
                        "concurrency_ratio": r.concurrency_ratio,
                        "effective_usd_per_mtok": r.effective_nusd_per_mtok.map(usd_number),
                        "tokens_per_hour": r.tokens_per_hour,
                        "capacity_tokens_per_hour": r.capacity_tokens_per_hour,
                        "commercial": r.commercial.as_ref().map(|c| serde_json::json!({
                            "serving": c.serving,
                            "cost_usd": usd_number(c.cost_nusd),
                            "owning_saves": finite(c.owning_saves),
                            "break_even_tokens_per_hour": finite(c.break_even_tokens_per_hour),
                        })),
                    })
                })
                .collect();
            out = serde_json::to_string_pretty(&items).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            out.push_str("backend,from,to,gpu_hours,paid_usd,charged_usd,idle_cost_usd,inferences,tokens,busy_ratio,concurrency_ratio,effective_usd_per_mtok,tokens_per_hour,capacity_tokens_per_hour,commercial,commercial_usd,owning_saves,break_even_tokens_per_hour\n");
            for r in rows {
                let c = r.commercial.as_ref();
                let _ = writeln!(
                    out,
                    "{},{},{},{:.6},{},{},{},{},{},{:.6},{},{},{:.2},{},{},{},{},{}",
                    csv_field(&r.backend),
                    format_time(r.from_us),
                    format_time(r.to_us),
                    r.gpu_hours,
                    format_usd(r.paid_nusd),
                    format_usd(r.charged_nusd),
                    format_usd(r.idle_nusd),
                    r.inferences,
                    r.tokens,
                    r.busy_ratio,
                    r.concurrency_ratio
                        .map_or(String::new(), |c| format!("{c:.6}")),
                    r.effective_nusd_per_mtok.map_or(String::new(), format_usd),
                    r.tokens_per_hour,
                    r.capacity_tokens_per_hour
                        .map_or(String::new(), |c| format!("{c:.0}")),
                    c.map_or(String::new(), |c| csv_field(&c.serving)),
                    c.map_or(String::new(), |c| format_usd(c.cost_nusd)),
                    c.and_then(|c| finite(c.owning_saves))
                        .map_or(String::new(), |s| format!("{s:.6}")),
                    c.and_then(|c| finite(c.break_even_tokens_per_hour))
                        .map_or(String::new(), |t| format!("{t:.0}")),
                );
            }
        }
        Format::Table => {
            let Some(first) = rows.first() else {
                return out;
            };
            let _ = writeln!(
                out,
                "Self-hosted backends, {} to {} ({:.2} h):",
                format_time(first.from_us),
                format_time(first.to_us),
                (first.to_us - first.from_us) as f64 / HOUR_US
            );
            let w = rows
                .iter()
                .map(|r| r.backend.len())
                .max()
                .unwrap_or(7)
                .max(7);
            let _ = writeln!(
                out,
                "{:<w$}  {:>8} {:>11} {:>11} {:>11} {:>6} {:>6} {:>11} {:>11}",
                "backend",
                "gpu_h",
                "paid_usd",
                "charged",
                "idle_usd",
                "busy",
                "conc",
                "tokens",
                "usd/1M"
            );
            for r in rows {
                let _ = writeln!(
                    out,
                    "{:<w$}  {:>8.2} {:>11.4} {:>11.4} {:>11.4} {:>6} {:>6} {:>11} {:>11}",
                    r.backend,
                    r.gpu_hours,
                    r.paid_nusd as f64 / 1e9,
                    r.charged_nusd as f64 / 1e9,
                    r.idle_nusd as f64 / 1e9,
                    pct(r.busy_ratio),
                    r.concurrency_ratio.map_or("-".into(), pct),
                    r.tokens,
                    r.effective_nusd_per_mtok
                        .map_or("-".into(), |n| format!("{:.4}", n as f64 / 1e9)),
                );
            }
            for r in rows {
                let _ = writeln!(out, "  {}", verdict(r));
            }
        }
    }
    out
}

/// One sentence: owning vs the cheapest commercial twin, at this volume and where they meet.
pub fn verdict(r: &BackendEconomics) -> String {
    let Some(c) = &r.commercial else {
        return format!(
            "{}: no commercial model in the config serves the same models or aliases; no break-even to compute.",
            r.backend
        );
    };
    let at = format!("{:.0} tokens/h", r.tokens_per_hour);
    let owning = match finite(c.owning_saves) {
        Some(s) if s >= 0.0 => format!("owning was {:.0}% cheaper", s * 100.0),
        Some(s) => format!("owning was {:.0}% dearer", -s * 100.0),
        None => "the commercial cost is zero, so owning cannot be cheaper".into(),
    };
    let meet = match finite(c.break_even_tokens_per_hour) {
        Some(t) => {
            let beyond = r
                .capacity_tokens_per_hour
                .filter(|cap| t > *cap)
                .map_or(String::new(), |cap| {
                    format!(", beyond its rated {cap:.0} tokens/h, so renting stays cheaper")
                });
            format!("they meet at {t:.0} tokens/h{beyond}")
        }
        None => "they never meet".into(),
    };
    format!(
        "{}: at {at}, {owning} than {} (${} for the same tokens); {meet}.",
        r.backend,
        c.serving,
        crate::meter::format_usd(c.cost_nusd)
    )
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::testing::{rec, tokens, TempLedger};
    use crate::ledger::Record;

    /// 2026-11-22T10:00:00Z
    const H0: i64 = 1_795_341_600_000_000;
    const MIN: i64 = 60_000_000;
    const LLAMA: &str = "meta-llama/Llama-3.1-8B-Instruct";

    fn config(with_twins: bool) -> Config {
        let twins = r#"
[[backend]]
name = "openai"
url = "http://127.0.0.1:9/"
hosting = "commercial"
models = [{ name = "gpt-4o-mini", aliases = ["chat-small"], input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.60 }]

[[backend]]
name = "mistral"
url = "http://127.0.0.1:9/"
hosting = "commercial"
models = [{ name = "mistral-small", aliases = ["chat-small"], input_usd_per_mtok = 0.40, output_usd_per_mtok = 2.00 }]
"#;
        let text = format!(
            r#"
[[backend]]
name = "llama"
url = "http://127.0.0.1:8001/"
hosting = "self_hosted"
max_concurrency = 2
gpu = {{ hourly_usd = 2.0, count = 1, tokens_per_second = 1000 }}
models = [{{ name = "{LLAMA}", aliases = ["chat-small"] }}]
{}"#,
            if with_twins { twins } else { "" }
        );
        crate::config::parse(&text, "t.toml", &|_| None).unwrap()
    }

    fn on_llama(start: i64, end: i64, prompt: u64, completion: u64, cost: i64) -> Record {
        Record {
            id: format!("l{start}-{end}"),
            ended_at_us: end,
            ..tokens(
                rec(start, "search", Some("llama"), LLAMA, "{}"),
                prompt,
                completion,
                cost,
            )
        }
    }

    /// Two overlapping requests keep the GPU busy for half of the hour and were charged $1
    /// of the $2 it cost; others on another backend, refused, or outside the hour count not.
    fn ledger() -> Vec<Record> {
        vec![
            on_llama(H0, H0 + 20 * MIN, 1_000_000, 500_000, 600_000_000),
            on_llama(H0 + 10 * MIN, H0 + 30 * MIN, 500_000, 0, 400_000_000),
            on_llama(H0 - 30 * MIN, H0 - 20 * MIN, 9_000, 9_000, 9_000),
            Record {
                id: "other".into(),
                ..tokens(
                    rec(H0 + 40 * MIN, "search", Some("openai"), "gpt-4o-mini", "{}"),
                    5,
                    5,
                    5,
                )
            },
            Record {
                id: "refused".into(),
                status: "rejected",
                ..rec(H0 + 50 * MIN, "search", None, "chat-small", "{}")
            },
        ]
    }

    #[test]
    fn a_gpu_busy_half_the_hour_splits_its_two_dollars_into_charged_and_idle() {
        let l = TempLedger::with("gpu-economics", &ledger());
        let rows = economics(
            &l.conn,
            &config(true),
            &Catalog::builtin(),
            Some(H0),
            Some(H0 + 60 * MIN),
            0,
        )
        .unwrap();
        assert_eq!(
            rows.len(),
            1,
            "only the self-hosted backend with a GPU cost"
        );
        let r = &rows[0];
        assert_eq!(r.paid_nusd, 2_000_000_000);
        assert_eq!(r.charged_nusd, 1_000_000_000);
        assert_eq!(r.idle_nusd, 1_000_000_000);
        assert_eq!(r.gpu_hours, 1.0);
        assert_eq!(r.busy_ratio, 0.5, "the union of 0-20 and 10-30 min");
        let conc = r.concurrency_ratio.unwrap();
        assert!(
            (conc - 40.0 / 120.0).abs() < 1e-12,
            "40 request-minutes of 2 x 60: {conc}"
        );
        assert_eq!((r.inferences, r.tokens), (2, 2_000_000));
        assert_eq!(
            r.effective_nusd_per_mtok,
            Some(1_000_000_000),
            "$2 for 2M tokens"
        );
        assert_eq!(r.capacity_tokens_per_hour, Some(3_600_000.0));

        let c = r.commercial.as_ref().unwrap();
        assert_eq!(
            c.serving, "openai/gpt-4o-mini",
            "the cheaper of the two twins"
        );
        // 1.5M prompt x $0.15 + 0.5M completion x $0.60 per million.
        assert_eq!(c.cost_nusd, 525_000_000);
        assert!((c.owning_saves - (0.525 - 2.0) / 0.525).abs() < 1e-12);
        // $2/h buys 2M / $0.525 x $2 tokens an hour from the commercial model.
        assert!((c.break_even_tokens_per_hour - 2.0 * 2_000_000.0 / 0.525).abs() < 1e-3);
        let v = verdict(r);
        assert!(
            v.contains("owning was 281% dearer than openai/gpt-4o-mini"),
            "{v}"
        );
        assert!(
            v.contains("they meet at 7619048 tokens/h, beyond its rated 3600000"),
            "{v}"
        );

        let csv = render(&rows, Format::Csv);
        assert!(
            csv.contains(",2.000000000,1.000000000,1.000000000,2,2000000,0.500000,"),
            "{csv}"
        );
        let json: serde_json::Value = serde_json::from_str(&render(&rows, Format::Json)).unwrap();
        assert_eq!(json[0]["idle_cost_usd"].as_f64(), Some(1.0));
    }

    #[test]
    fn without_a_commercial_twin_there_is_no_break_even_and_no_period_no_rows() {
        let l = TempLedger::with("gpu-no-twin", &ledger());
        let rows = economics(
            &l.conn,
            &config(false),
            &Catalog::builtin(),
            Some(H0),
            Some(H0 + 60 * MIN),
            0,
        )
        .unwrap();
        assert_eq!(rows[0].commercial, None);
        assert!(verdict(&rows[0]).contains("no commercial model"));
        let empty = TempLedger::with("gpu-empty", &[]);
        let rows = economics(
            &empty.conn,
            &config(true),
            &Catalog::builtin(),
            None,
            None,
            H0,
        )
        .unwrap();
        assert!(
            rows.is_empty(),
            "no --since and an empty ledger: no period to pay for"
        );
    }
}
