//! The monthly statement per team: what each team spent on each model of each backend in one
//! UTC calendar month, as showback (for information) or chargeback (what the team is billed).
//!
//! Its money is the ledger's, summed in the store: each line is one grouped query's row, and
//! it covers exactly the requests the FOCUS export bills (those a backend was asked to serve
//! and did not refuse), so the statement, the ledger and `--format focus` for the same month
//! agree to the nano-dollar. The ledger's total over every record of the month is carried
//! beside it, so a difference (a refused request that cost something) would show, not hide.

use crate::config::{Config, Hosting};
use crate::finops::report::{csv_field, usd_number, Format, ReportError};
use crate::ledger::read::{Param, Reader};
use crate::meter::format_usd;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A UTC calendar month, `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    pub year: i64,
    pub month: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Showback,
    Chargeback,
}

/// What one team spent on one model of one backend in the month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub backend: String,
    pub model: String,
    /// `None`: the backend is no longer in the config.
    pub hosting: Option<Hosting>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nusd: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamStatement {
    pub team: String,
    /// The team's tags from the config (`cost_center`, `department`…): where the bill goes.
    pub tags: BTreeMap<String, String>,
    pub lines: Vec<Line>,
    pub total_nusd: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub month: Month,
    pub mode: Mode,
    pub teams: Vec<TeamStatement>,
    pub total_nusd: i64,
    /// Every record of the month, billed or not.
    pub ledger_total_nusd: i64,
    /// What the owned GPUs cost over the month (so far) beyond what their rate cards charged
    /// the teams: paid by the operator, on no team's statement. `None`: no owned GPUs.
    pub owned_gpu_idle_nusd: Option<i64>,
}

// === impl Month ===

impl std::str::FromStr for Month {
    type Err = ReportError;
    fn from_str(s: &str) -> Result<Month, ReportError> {
        let bad = || ReportError::BadMonth(s.chars().take(40).collect());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(bad());
        }
        let year: i64 = y.parse().map_err(|_| bad())?;
        let month: i64 = m.parse().map_err(|_| bad())?;
        if !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Month { year, month })
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl Month {
    /// `[first instant, first instant of the next month)` in microseconds since the epoch.
    pub fn range_us(&self) -> (i64, i64) {
        const DAY_US: i64 = 86_400_000_000;
        let start = crate::clock::days_from_civil(self.year, self.month, 1);
        let (ny, nm) = if self.month == 12 {
            (self.year + 1, 1)
        } else {
            (self.year, self.month + 1)
        };
        let end = crate::clock::days_from_civil(ny, nm, 1);
        (start * DAY_US, end * DAY_US)
    }
}

/// The month's statement, teams by name and lines by backend and model.
pub fn query(
    conn: &Reader,
    config: &Config,
    month: Month,
    mode: Mode,
) -> Result<Statement, ReportError> {
    let (from, to) = month.range_us();
    let range = [Param::Int(from), Param::Int(to)];
    // The FOCUS export's filter: see the module docs.
    let sql = "SELECT team, backend, COALESCE(served_model, requested_model), COUNT(*),
                CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT),
                CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT),
                CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT),
                CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT)
         FROM requests
         WHERE started_at_us >= ?1 AND started_at_us < ?2
           AND backend IS NOT NULL AND status != 'upstream_error'
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3";
    let mut teams: Vec<TeamStatement> = Vec::new();
    let count = |v: &crate::ledger::read::Value, i| -> Result<u64, ReportError> {
        Ok(v.int(i)?.max(0) as u64)
    };
    conn.each(sql, &range, |r| -> Result<(), ReportError> {
        let team = r[0].text(0)?;
        let backend = r[1].text(1)?;
        let line = Line {
            hosting: config
                .backends
                .iter()
                .find(|b| *b.name == *backend)
                .map(|b| b.hosting),
            backend,
            model: r[2].text(2)?,
            requests: count(&r[3], 3)?,
            prompt_tokens: count(&r[4], 4)?,
            cached_tokens: count(&r[5], 5)?,
            completion_tokens: count(&r[6], 6)?,
            cost_nusd: r[7].int(7)?,
        };
        if teams.last().is_none_or(|t| t.team != team) {
            let tags = config
                .teams
                .iter()
                .find(|t| *t.name == *team)
                .map(|t| t.tags.clone())
                .unwrap_or_default();
            teams.push(TeamStatement {
                team,
                tags,
                lines: Vec::new(),
                total_nusd: 0,
            });
        }
        if let Some(t) = teams.last_mut() {
            t.total_nusd += line.cost_nusd;
            t.lines.push(line);
        }
        Ok(())
    })?;
    let ledger_total_nusd = match conn
        .rows(
            "SELECT CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT) FROM requests
             WHERE started_at_us >= ?1 AND started_at_us < ?2",
            &range,
        )?
        .first()
    {
        Some(r) => r[0].int(0)?,
        None => 0,
    };
    Ok(Statement {
        month,
        mode,
        total_nusd: teams.iter().map(|t| t.total_nusd).sum(),
        teams,
        ledger_total_nusd,
        owned_gpu_idle_nusd: None,
    })
}

/// Fills in [`Statement::owned_gpu_idle_nusd`] from the GPU economics of the month up to
/// `now_us` (hours still to come are not paid yet).
pub fn add_owned_gpu_idle(
    s: &mut Statement,
    conn: &Reader,
    config: &Config,
    now_us: i64,
) -> Result<(), ReportError> {
    let (from, to) = s.month.range_us();
    let rows = crate::finops::backends::economics(
        conn,
        config,
        &crate::config::prices::Catalog::builtin(),
        Some(from),
        Some(to.min(now_us)),
        now_us,
    )?;
    s.owned_gpu_idle_nusd = (!rows.is_empty()).then(|| rows.iter().map(|r| r.idle_nusd).sum());
    Ok(())
}

fn hosting(l: &Line) -> &'static str {
    l.hosting.map_or("unknown", |h| h.as_str())
}

pub fn render(s: &Statement, format: Format) -> String {
    let mut out = String::new();
    let mode = match s.mode {
        Mode::Showback => "showback",
        Mode::Chargeback => "chargeback",
    };
    match format {
        Format::Json => {
            let teams: Vec<serde_json::Value> = s
                .teams
                .iter()
                .map(|t| {
                    let lines: Vec<serde_json::Value> = t
                        .lines
                        .iter()
                        .map(|l| {
                            serde_json::json!({
                                "backend": l.backend,
                                "model": l.model,
                                "hosting": hosting(l),
                                "requests": l.requests,
                                "prompt_tokens": l.prompt_tokens,
                                "cached_tokens": l.cached_tokens,
                                "completion_tokens": l.completion_tokens,
                                "cost_usd": usd_number(l.cost_nusd),
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "team": t.team,
                        "tags": t.tags,
                        "lines": lines,
                        "total_usd": usd_number(t.total_nusd),
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "month": s.month.to_string(),
                "mode": mode,
                "teams": teams,
                "total_usd": usd_number(s.total_nusd),
                "ledger_total_usd": usd_number(s.ledger_total_nusd),
                "owned_gpu_idle_usd": s.owned_gpu_idle_nusd.map(usd_number),
            });
            out = serde_json::to_string_pretty(&doc).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            out.push_str("month,mode,team,backend,model,hosting,requests,prompt_tokens,cached_tokens,completion_tokens,cost_usd\n");
            for t in &s.teams {
                for l in &t.lines {
                    let _ = writeln!(
                        out,
                        "{},{mode},{},{},{},{},{},{},{},{},{}",
                        s.month,
                        csv_field(&t.team),
                        csv_field(&l.backend),
                        csv_field(&l.model),
                        hosting(l),
                        l.requests,
                        l.prompt_tokens,
                        l.cached_tokens,
                        l.completion_tokens,
                        format_usd(l.cost_nusd)
                    );
                }
            }
        }
        Format::Table => {
            let title = match s.mode {
                Mode::Showback => "Showback (for information; nothing is billed)",
                Mode::Chargeback => "Chargeback statement",
            };
            let (from, to) = s.month.range_us();
            let _ = writeln!(
                out,
                "{title}, {} ({} to {})",
                s.month,
                crate::clock::format_time(from),
                crate::clock::format_time(to)
            );
            let w = s
                .teams
                .iter()
                .flat_map(|t| &t.lines)
                .map(|l| l.backend.len() + 1 + l.model.len())
                .max()
                .unwrap_or(0)
                .max(14);
            for t in &s.teams {
                let tags: Vec<String> = t.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let _ = writeln!(
                    out,
                    "\nteam {}{}",
                    t.team,
                    if tags.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", tags.join(", "))
                    }
                );
                let _ = writeln!(
                    out,
                    "  {:<w$}  {:<11} {:>9} {:>12} {:>12} {:>12} {:>14}",
                    "backend/model",
                    "hosting",
                    "requests",
                    "prompt",
                    "cached",
                    "completion",
                    "cost_usd"
                );
                for l in &t.lines {
                    let _ = writeln!(
                        out,
                        "  {:<w$}  {:<11} {:>9} {:>12} {:>12} {:>12} {:>14}",
                        format!("{}/{}", l.backend, l.model),
                        hosting(l),
                        l.requests,
                        l.prompt_tokens,
                        l.cached_tokens,
                        l.completion_tokens,
                        format_usd(l.cost_nusd)
                    );
                }
                let _ = writeln!(
                    out,
                    "  {:<w$}  {:>75}",
                    format!("total {}", t.team),
                    format_usd(t.total_nusd)
                );
            }
            let _ = writeln!(
                out,
                "\n{:<w$}    {:>75}",
                "total, all teams",
                format_usd(s.total_nusd)
            );
            if let Some(idle) = s.owned_gpu_idle_nusd {
                let _ = writeln!(
                    out,
                    "owned GPU hours paid beyond what their rate cards charged (idle cost, on no team; see --backends): {}",
                    format_usd(idle)
                );
            }
            if s.ledger_total_nusd != s.total_nusd {
                let _ = writeln!(
                    out,
                    "the ledger holds {} for the month: {} on requests no backend served, not charged",
                    format_usd(s.ledger_total_nusd),
                    format_usd(s.ledger_total_nusd - s.total_nusd)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finops::fixture::{self, DAY, NOV};
    use crate::ledger::testing::TempLedger;

    #[test]
    fn months_parse_strictly_and_cover_the_calendar_month() {
        let nov: Month = "2026-11".parse().unwrap();
        assert_eq!(nov.range_us(), (NOV, NOV + 30 * DAY));
        let dec: Month = "2026-12".parse().unwrap();
        assert_eq!(
            dec.range_us().1 - dec.range_us().0,
            31 * DAY,
            "into January"
        );
        for bad in [
            "2026-13",
            "2026-1",
            "26-11",
            "2026/11",
            "november",
            "2026-11-01",
            "",
        ] {
            assert!(
                matches!(bad.parse::<Month>(), Err(ReportError::BadMonth(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_statement_the_ledger_and_the_focus_export_agree_to_the_nano_dollar() {
        let cfg = fixture::config(&fixture::config_text(fixture::GPU));
        let l = TempLedger::with("statement", &fixture::ledger(&cfg));
        let month: Month = "2026-11".parse().unwrap();
        let s = query(&l.conn, &cfg, month, Mode::Chargeback).unwrap();
        let (from, to) = month.range_us();

        let charges = crate::finops::focus::query(&l.conn, &cfg, Some(from), Some(to)).unwrap();
        let focus_total: i64 = charges.iter().map(|c| c.billed_nusd).sum();
        let ledger: i64 = l
            .conn
            .rows(
                "SELECT SUM(cost_nusd) FROM requests WHERE started_at_us >= ?1 AND started_at_us < ?2",
                &[Param::Int(from), Param::Int(to)],
            )
            .unwrap()[0][0]
            .int(0)
            .unwrap();
        assert!(s.total_nusd > 0);
        assert_eq!(s.total_nusd, ledger);
        assert_eq!(s.ledger_total_nusd, ledger);
        assert_eq!(s.total_nusd, focus_total);

        let names: Vec<&str> = s.teams.iter().map(|t| t.team.as_str()).collect();
        assert_eq!(names, ["ads", "legal", "search"]);
        for t in &s.teams {
            let focus: i64 = charges
                .iter()
                .filter(|c| c.team == t.team)
                .map(|c| c.billed_nusd)
                .sum();
            assert_eq!(t.total_nusd, focus, "team {}", t.team);
            assert_eq!(
                t.total_nusd,
                t.lines.iter().map(|l| l.cost_nusd).sum::<i64>()
            );
            assert_eq!(t.lines.len(), 4, "llama, gpt-4o-mini, gpt-4o, claude");
        }
        let search = s.teams.iter().find(|t| t.team == "search").unwrap();
        assert_eq!(
            search.tags.get("cost_center").map(String::as_str),
            Some("cc-42")
        );
        let claude = search
            .lines
            .iter()
            .find(|l| l.model == "claude-haiku-4-5")
            .unwrap();
        assert!(claude.cached_tokens > 0);
        assert_eq!(claude.hosting, Some(Hosting::Commercial));

        // The owned GPU's 720 hours at $2.40, less what its rate card charged the teams.
        let mut s = s;
        add_owned_gpu_idle(&mut s, &l.conn, &cfg, to).unwrap();
        let charged: i64 = s
            .teams
            .iter()
            .flat_map(|t| &t.lines)
            .filter(|l| l.backend == "llama")
            .map(|l| l.cost_nusd)
            .sum();
        assert!(charged > 0);
        assert_eq!(s.owned_gpu_idle_nusd, Some(1_728_000_000_000 - charged));

        // Every rendering carries the same total, exactly.
        let total = format_usd(s.total_nusd);
        let table = render(&s, Format::Table);
        assert!(
            table.starts_with("Chargeback statement, 2026-11"),
            "{table}"
        );
        assert!(table.contains(&total), "{table}");
        assert!(!table.contains("not charged"), "{table}");
        assert!(
            table.contains(&format_usd(1_728_000_000_000 - charged)),
            "{table}"
        );
        let json: serde_json::Value = serde_json::from_str(&render(&s, Format::Json)).unwrap();
        assert_eq!(json["total_usd"].to_string(), total);
        assert_eq!(json["ledger_total_usd"].to_string(), total);
        let csv = render(&s, Format::Csv);
        let csv_total: i64 = csv
            .lines()
            .skip(1)
            .map(|l| {
                let usd = l.rsplit(',').next().unwrap();
                let (whole, frac) = usd.split_once('.').unwrap();
                whole.parse::<i64>().unwrap() * 1_000_000_000 + frac.parse::<i64>().unwrap()
            })
            .sum();
        assert_eq!(csv_total, s.total_nusd);
    }
}
