//! `tollgate report --what-if other.toml`: the ledger's measured traffic re-priced under
//! another placement (another GPU rate card, more or fewer owned GPUs, another price list),
//! side by side with the same traffic priced under the running config, per team and model.
//!
//! ```text
//!  each request ──► its (backend, model) placed in each config ──┬─ per token: the one price function, per request
//!                                                                └─ owned GPUs: tokens counted
//!  owned GPUs of each config: paid = hourly × count × fraction × period, shared by tokens served
//! ```
//!
//! A config's cost is total cost of ownership: what per-token APIs bill for the tokens, plus
//! the hours of every owned GPU over the period whether busy or idle (an owned GPU nobody
//! uses still shows, as idle). Each side is priced by the same code, so a config compared with
//! itself differs by nothing; per-token costs are re-priced request by request, rounded as the
//! bill was, so under the config that wrote the ledger they are the ledger's to the nano-dollar.
//!
//! Placement: a request stays on its backend when the other config has a backend of that
//! name serving its model; otherwise it goes where that config would send the model or one
//! of its aliases: an owned GPU backend first (its hours are paid anyway, as `marginal`
//! routing has it), else the cheapest per-token price. Where no backend serves it, it is
//! counted as unplaced, never priced at zero silently.
//!
//! Rows stream from the store one at a time into a map keyed by team × model (and
//! backend × model placements), as the FOCUS export does: per-request rounding is why the sum
//! cannot be a SQL `SUM`; memory grows with the groups, never with the records.

use crate::config::prices::{self, Catalog, Price};
use crate::config::{Backend, Config, GpuCapex, Hosting};
use crate::finops::report::{csv_field, usd_number, Format, ReportError};
use crate::ledger::read::{Param, ReadError, Reader};
use crate::meter::{self, format_usd, TokenSource, Usage};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

const HOUR_US: f64 = 3_600_000_000.0;

/// Where one backend × model's traffic lands in a config.
#[derive(Debug, Clone)]
enum Target {
    /// An owned GPU backend (index in `config.backends`): paid by the hour, not the token.
    Owned(usize),
    PerToken {
        backend: String,
        price: Option<Price>,
        egress_usd_per_gb: Option<f64>,
    },
    Unplaced,
}

/// One team × model's traffic priced under one config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cost {
    pub per_token_nusd: i64,
    /// Its share of the owned GPUs' hours, by tokens served.
    pub gpu_nusd: i64,
    /// The backends it was placed on.
    pub backends: BTreeSet<String>,
    /// Requests no backend of the config serves: not in the cost.
    pub unplaced_requests: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub team: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    /// What the ledger recorded (owned GPUs at their rate card).
    pub ledger_nusd: i64,
    pub now: Cost,
    pub what_if: Cost,
}

/// An owned GPU backend of one side, over the period.
#[derive(Debug, Clone, PartialEq)]
pub struct Owned {
    pub what_if: bool,
    pub backend: String,
    pub gpus: f64,
    pub usd_per_gpu_hour: f64,
    pub capex: Option<GpuCapex>,
    pub paid_nusd: i64,
    pub tokens: u64,
    /// Tokens placed on it over what it can process in the period at `tokens_per_second`.
    pub load: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WhatIf {
    pub from_us: i64,
    pub to_us: i64,
    pub rows: Vec<Row>,
    pub owned: Vec<Owned>,
}

impl Cost {
    pub fn total(&self) -> i64 {
        self.per_token_nusd + self.gpu_nusd
    }
}

impl WhatIf {
    /// Per token, owned GPUs, and in all, for one side.
    pub fn totals(&self, what_if: bool) -> (i64, i64, i64) {
        fn side(r: &Row, what_if: bool) -> &Cost {
            if what_if {
                &r.what_if
            } else {
                &r.now
            }
        }
        let per_token = self
            .rows
            .iter()
            .map(|r| side(r, what_if).per_token_nusd)
            .sum();
        let gpu = self.rows.iter().map(|r| side(r, what_if).gpu_nusd).sum();
        (per_token, gpu, per_token + gpu)
    }
}

/// One config's placements and owned-GPU tallies while the rows stream by.
struct Side<'a> {
    config: &'a Config,
    catalog: &'a Catalog,
    targets: HashMap<(String, String), Target>,
    /// Per owned backend: tokens per team × model.
    owned_tokens: BTreeMap<usize, BTreeMap<(String, String), u64>>,
}

/// Re-prices `[from_us, to_us)` (the ledger's first record to `now_us` when open) under
/// `now` and `what_if`.
pub fn compare(
    conn: &Reader,
    now: &Config,
    what_if: &Config,
    catalog: &Catalog,
    from_us: Option<i64>,
    to_us: Option<i64>,
    now_us: i64,
) -> Result<WhatIf, ReportError> {
    let from = match from_us {
        Some(f) => f,
        None => match conn
            .rows("SELECT MIN(started_at_us) FROM requests", &[])?
            .first()
        {
            Some(row) => row[0].opt_int(0)?.unwrap_or(now_us),
            None => now_us,
        },
    };
    let to = to_us.unwrap_or(now_us).max(from);
    let mut sides = [Side::new(now, catalog), Side::new(what_if, catalog)];
    let mut cells: BTreeMap<(String, String), Row> = BTreeMap::new();
    // The FOCUS export's filter: requests a backend served or failed mid-way, never refused ones.
    let sql = "SELECT team, backend, COALESCE(served_model, requested_model),
                prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
                cache_write_1h_tokens, egress_bytes, cost_nusd
         FROM requests
         WHERE started_at_us >= ?1 AND started_at_us < ?2
           AND backend IS NOT NULL AND status != 'upstream_error'";
    conn.each(
        sql,
        &[Param::Int(from), Param::Int(to)],
        |r| -> Result<(), ReportError> {
            let count = |i: usize| -> Result<u64, ReadError> {
                Ok(r[i]
                    .opt_int(i)?
                    .map_or(0, |n| u64::try_from(n).unwrap_or(0)))
            };
            let (team, backend, model) = (r[0].text(0)?, r[1].text(1)?, r[2].text(2)?);
            let usage = Usage {
                prompt: count(3)?,
                completion: count(4)?,
                cached: count(5)?,
                cache_write: count(6)?,
                cache_write_1h: count(7)?,
                reasoning: 0,
                source: TokenSource::Upstream,
            };
            let egress = count(8)?;
            let key = (team, model);
            let row = cells.entry(key.clone()).or_insert_with(|| Row {
                team: key.0.clone(),
                model: key.1.clone(),
                requests: 0,
                tokens: 0,
                ledger_nusd: 0,
                now: Cost::default(),
                what_if: Cost::default(),
            });
            row.requests += 1;
            row.tokens += usage.prompt + usage.completion;
            row.ledger_nusd += r[9].int(9)?;
            for (side, cost) in sides.iter_mut().zip([&mut row.now, &mut row.what_if]) {
                side.place(now, &backend, &key, &usage, egress, cost);
            }
            Ok(())
        },
    )?;
    let mut owned = Vec::new();
    for (i, side) in sides.iter().enumerate() {
        side.allocate(i == 1, to - from, &mut cells, &mut owned);
    }
    Ok(WhatIf {
        from_us: from,
        to_us: to,
        rows: cells.into_values().collect(),
        owned,
    })
}

// === impl Side ===

impl<'a> Side<'a> {
    fn new(config: &'a Config, catalog: &'a Catalog) -> Side<'a> {
        Side {
            config,
            catalog,
            targets: HashMap::new(),
            owned_tokens: BTreeMap::new(),
        }
    }

    fn place(
        &mut self,
        origin: &Config,
        backend: &str,
        key: &(String, String),
        usage: &Usage,
        egress_bytes: u64,
        cost: &mut Cost,
    ) {
        let target = self
            .targets
            .entry((backend.to_string(), key.1.clone()))
            .or_insert_with(|| target(self.config, self.catalog, origin, backend, &key.1));
        match target {
            Target::Owned(i) => {
                cost.backends
                    .insert(self.config.backends[*i].name.to_string());
                *self
                    .owned_tokens
                    .entry(*i)
                    .or_default()
                    .entry(key.clone())
                    .or_default() += usage.prompt + usage.completion;
            }
            Target::PerToken {
                backend,
                price,
                egress_usd_per_gb,
            } => {
                if !cost.backends.contains(backend.as_str()) {
                    cost.backends.insert(backend.clone());
                }
                cost.per_token_nusd +=
                    meter::cost_nusd(price.as_ref(), usage, egress_bytes, *egress_usd_per_gb);
            }
            Target::Unplaced => cost.unplaced_requests += 1,
        }
    }

    /// Every owned GPU backend's hours over the period, shared among the team × model cells
    /// by tokens served, largest remainders first so the shares sum to what was paid.
    fn allocate(
        &self,
        what_if: bool,
        period_us: i64,
        cells: &mut BTreeMap<(String, String), Row>,
        owned: &mut Vec<Owned>,
    ) {
        for (i, b) in self.config.backends.iter().enumerate() {
            let Some(gpu) = owned_gpu(b) else { continue };
            let paid = gpu.paid_nusd(period_us);
            let tokens = self.owned_tokens.get(&i);
            let total: u64 = tokens.map_or(0, |t| t.values().sum());
            owned.push(Owned {
                what_if,
                backend: b.name.to_string(),
                gpus: gpu.gpus(),
                usd_per_gpu_hour: gpu.hourly_usd,
                capex: gpu.capex,
                paid_nusd: paid,
                tokens: total,
                load: gpu
                    .tokens_per_second
                    .filter(|_| period_us > 0)
                    .map(|tps| total as f64 / (tps * period_us as f64 / 1e6)),
            });
            let shares: Vec<((String, String), i64)> = match tokens.filter(|_| total > 0) {
                Some(t) => largest_remainder(paid, t, total),
                // Nobody used it: its hours are idle cost, on a row of their own.
                None => vec![(("-".into(), format!("(idle) {}", b.name)), paid)],
            };
            for (key, share) in shares {
                let row = cells.entry(key.clone()).or_insert_with(|| Row {
                    team: key.0.clone(),
                    model: key.1.clone(),
                    requests: 0,
                    tokens: 0,
                    ledger_nusd: 0,
                    now: Cost::default(),
                    what_if: Cost::default(),
                });
                let cost = if what_if {
                    &mut row.what_if
                } else {
                    &mut row.now
                };
                cost.gpu_nusd += share;
                cost.backends.insert(b.name.to_string());
            }
        }
    }
}

fn owned_gpu(b: &Backend) -> Option<&crate::config::GpuCost> {
    b.gpu.as_ref().filter(|_| b.hosting == Hosting::SelfHosted)
}

/// `paid` split in proportion to `tokens`, summing to exactly `paid`.
fn largest_remainder(
    paid: i64,
    tokens: &BTreeMap<(String, String), u64>,
    total: u64,
) -> Vec<((String, String), i64)> {
    let mut shares: Vec<((String, String), i64, i128)> = tokens
        .iter()
        .map(|(k, &t)| {
            let exact = i128::from(paid) * i128::from(t);
            let whole = exact / i128::from(total);
            (k.clone(), whole as i64, exact % i128::from(total))
        })
        .collect();
    let mut left = paid - shares.iter().map(|s| s.1).sum::<i64>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| shares[b].2.cmp(&shares[a].2).then(a.cmp(&b)));
    for i in order {
        if left <= 0 {
            break;
        }
        shares[i].1 += 1;
        left -= 1;
    }
    shares.into_iter().map(|(k, s, _)| (k, s)).collect()
}

/// Where `config` puts the traffic that `origin` served on `backend` as `model`.
fn target(
    config: &Config,
    catalog: &Catalog,
    origin: &Config,
    backend: &str,
    model: &str,
) -> Target {
    let here = |b: &Backend, i: usize| -> Option<Target> {
        let m = b.models.iter().find(|m| *m.name == *model)?;
        Some(if owned_gpu(b).is_some() {
            Target::Owned(i)
        } else {
            Target::PerToken {
                backend: b.name.to_string(),
                price: prices::resolve(b, m, catalog),
                egress_usd_per_gb: b.egress_usd_per_gb,
            }
        })
    };
    if let Some((i, b)) = config
        .backends
        .iter()
        .enumerate()
        .find(|(_, b)| *b.name == *backend)
    {
        if let Some(t) = here(b, i) {
            return t;
        }
    }
    // The names a client could have asked for to get this model where it was served.
    let mut names: BTreeSet<&str> = BTreeSet::from([model]);
    for m in origin
        .backends
        .iter()
        .filter(|b| *b.name == *backend)
        .flat_map(|b| &b.models)
        .filter(|m| *m.name == *model)
    {
        names.extend(m.aliases.iter().map(|a| &**a));
    }
    let serves = |m: &crate::config::BackendModel| {
        names.contains(&*m.name) || m.aliases.iter().any(|a| names.contains(&**a))
    };
    let mut best: Option<(u8, f64, Target)> = None;
    for (i, b) in config.backends.iter().enumerate() {
        for m in b.models.iter().filter(|m| serves(m)) {
            let candidate = if owned_gpu(b).is_some() {
                (0, 0.0, Target::Owned(i))
            } else {
                let price = prices::resolve(b, m, catalog);
                let rank = price
                    .as_ref()
                    .map_or((2, f64::INFINITY), |p| (1, p.input + p.output));
                (
                    rank.0,
                    rank.1,
                    Target::PerToken {
                        backend: b.name.to_string(),
                        price,
                        egress_usd_per_gb: b.egress_usd_per_gb,
                    },
                )
            };
            if best
                .as_ref()
                .is_none_or(|(r, p, _)| (candidate.0, candidate.1) < (*r, *p))
            {
                best = Some(candidate);
            }
        }
    }
    best.map_or(Target::Unplaced, |b| b.2)
}

/// The comparison as a table (with totals and the owned GPUs of each side), CSV or JSON.
/// `labels` name the two configs.
pub fn render(w: &WhatIf, labels: (&str, &str), format: Format) -> String {
    let mut out = String::new();
    let names = |c: &Cost| {
        if c.backends.is_empty() {
            "-".to_string()
        } else {
            c.backends.iter().cloned().collect::<Vec<_>>().join("+")
        }
    };
    match format {
        Format::Json => {
            let cost = |c: &Cost| {
                serde_json::json!({
                    "backends": c.backends,
                    "per_token_usd": usd_number(c.per_token_nusd),
                    "gpu_hours_usd": usd_number(c.gpu_nusd),
                    "total_usd": usd_number(c.total()),
                    "unplaced_requests": c.unplaced_requests,
                })
            };
            let rows: Vec<serde_json::Value> = w
                .rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "team": r.team,
                        "model": r.model,
                        "requests": r.requests,
                        "tokens": r.tokens,
                        "ledger_usd": usd_number(r.ledger_nusd),
                        "now": cost(&r.now),
                        "what_if": cost(&r.what_if),
                        "delta_usd": usd_number(r.what_if.total() - r.now.total()),
                    })
                })
                .collect();
            let owned: Vec<serde_json::Value> = w
                .owned
                .iter()
                .map(|o| {
                    serde_json::json!({
                        "side": if o.what_if { "what_if" } else { "now" },
                        "backend": o.backend,
                        "gpus": o.gpus,
                        "usd_per_gpu_hour": o.usd_per_gpu_hour,
                        "amortized_usd_per_gpu_hour": o.capex.map(|c| c.amortized_usd_per_hour),
                        "power_usd_per_gpu_hour": o.capex.map(|c| c.power_usd_per_hour),
                        "cooling_usd_per_gpu_hour": o.capex.map(|c| c.cooling_usd_per_hour),
                        "paid_usd": usd_number(o.paid_nusd),
                        "tokens": o.tokens,
                        "load": o.load,
                    })
                })
                .collect();
            let totals = |what_if| {
                let (t, g, all) = w.totals(what_if);
                serde_json::json!({
                    "per_token_usd": usd_number(t),
                    "gpu_hours_usd": usd_number(g),
                    "total_usd": usd_number(all),
                })
            };
            let doc = serde_json::json!({
                "from": crate::clock::format_time(w.from_us),
                "to": crate::clock::format_time(w.to_us),
                "now_config": labels.0,
                "what_if_config": labels.1,
                "rows": rows,
                "owned_gpus": owned,
                "now": totals(false),
                "what_if": totals(true),
                "delta_usd": usd_number(w.totals(true).2 - w.totals(false).2),
            });
            out = serde_json::to_string_pretty(&doc).unwrap_or_default();
            out.push('\n');
        }
        Format::Csv => {
            out.push_str("team,model,requests,tokens,ledger_usd,now_backends,now_per_token_usd,now_gpu_hours_usd,now_usd,now_unplaced_requests,what_if_backends,what_if_per_token_usd,what_if_gpu_hours_usd,what_if_usd,what_if_unplaced_requests,delta_usd\n");
            for r in &w.rows {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    csv_field(&r.team),
                    csv_field(&r.model),
                    r.requests,
                    r.tokens,
                    format_usd(r.ledger_nusd),
                    csv_field(&names(&r.now)),
                    format_usd(r.now.per_token_nusd),
                    format_usd(r.now.gpu_nusd),
                    format_usd(r.now.total()),
                    r.now.unplaced_requests,
                    csv_field(&names(&r.what_if)),
                    format_usd(r.what_if.per_token_nusd),
                    format_usd(r.what_if.gpu_nusd),
                    format_usd(r.what_if.total()),
                    r.what_if.unplaced_requests,
                    format_usd(r.what_if.total() - r.now.total()),
                );
            }
        }
        Format::Table => {
            let usd = |n: i64| format!("{:.4}", n as f64 / 1e9);
            let _ = writeln!(
                out,
                "What-if: the ledger's traffic, {} to {} ({:.2} h), priced under {} (now) and {} (what-if)",
                crate::clock::format_time(w.from_us),
                crate::clock::format_time(w.to_us),
                (w.to_us - w.from_us) as f64 / HOUR_US,
                labels.0,
                labels.1
            );
            let tw = w
                .rows
                .iter()
                .map(|r| r.team.len())
                .max()
                .unwrap_or(0)
                .max(4);
            let mw = w
                .rows
                .iter()
                .map(|r| r.model.len())
                .max()
                .unwrap_or(0)
                .max(5);
            let bw = w
                .rows
                .iter()
                .flat_map(|r| [names(&r.now).len(), names(&r.what_if).len()])
                .max()
                .unwrap_or(0)
                .max(7);
            let _ = writeln!(
                out,
                "{:<tw$}  {:<mw$} {:>9} {:>11}  {:<bw$} {:>12}  {:<bw$} {:>12} {:>12}",
                "team",
                "model",
                "requests",
                "tokens",
                "now on",
                "now_usd",
                "what-if on",
                "what_if_usd",
                "delta_usd"
            );
            for r in &w.rows {
                let unplaced = |c: &Cost| {
                    if c.unplaced_requests > 0 {
                        format!(" ({} unplaced)", c.unplaced_requests)
                    } else {
                        String::new()
                    }
                };
                let _ = writeln!(
                    out,
                    "{:<tw$}  {:<mw$} {:>9} {:>11}  {:<bw$} {:>12}  {:<bw$} {:>12} {:>12}{}{}",
                    r.team,
                    r.model,
                    r.requests,
                    r.tokens,
                    names(&r.now),
                    usd(r.now.total()),
                    names(&r.what_if),
                    usd(r.what_if.total()),
                    usd(r.what_if.total() - r.now.total()),
                    unplaced(&r.now),
                    unplaced(&r.what_if),
                );
            }
            let _ = writeln!(
                out,
                "\n{:<9} {:>18} {:>18} {:>18}",
                "", "per-token (opex)", "owned GPUs (capex)", "total"
            );
            for (name, side) in [("now", false), ("what-if", true)] {
                let (t, g, all) = w.totals(side);
                let _ = writeln!(
                    out,
                    "{name:<9} {:>18} {:>18} {:>18}",
                    format_usd(t),
                    format_usd(g),
                    format_usd(all)
                );
            }
            let delta = w.totals(true).2 - w.totals(false).2;
            let _ = writeln!(
                out,
                "{:<9} {:>18} {:>18} {:>18}",
                "delta",
                "",
                "",
                format_usd(delta)
            );
            if !w.owned.is_empty() {
                let _ = writeln!(
                    out,
                    "\nOwned GPUs (paid every hour of the period, busy or idle):"
                );
                for o in &w.owned {
                    let parts = o.capex.map_or(String::new(), |c| {
                        format!(
                            " = {:.4} amortized + {:.4} power + {:.4} cooling",
                            c.amortized_usd_per_hour, c.power_usd_per_hour, c.cooling_usd_per_hour
                        )
                    });
                    let load = o.load.map_or(String::new(), |l| {
                        format!(
                            ", {:.1}% of rated throughput{}",
                            l * 100.0,
                            if l > 1.0 {
                                " (over capacity: the traffic would not fit)"
                            } else {
                                ""
                            }
                        )
                    });
                    let _ = writeln!(
                        out,
                        "  {:<8} {}: {} GPUs x ${:.4}/GPU-h{parts}; paid {}; {} tokens{load}",
                        if o.what_if { "what-if" } else { "now" },
                        o.backend,
                        o.gpus,
                        o.usd_per_gpu_hour,
                        format_usd(o.paid_nusd),
                        o.tokens,
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finops::fixture::{self, DAY, LLAMA, NOV};
    use crate::ledger::testing::TempLedger;

    const NOV_END: i64 = NOV + 30 * DAY;

    fn compare_with(name: &str, other: &str) -> WhatIf {
        let now = fixture::config(&fixture::config_text(fixture::GPU));
        let l = TempLedger::with(name, &fixture::ledger(&now));
        compare(
            &l.conn,
            &now,
            &fixture::config(other),
            &Catalog::builtin(),
            Some(NOV),
            Some(NOV_END),
            0,
        )
        .unwrap()
    }

    #[test]
    fn the_same_config_changes_nothing_and_reproduces_the_ledgers_per_token_bill() {
        let w = compare_with("whatif-same", &fixture::config_text(fixture::GPU));
        assert_eq!(w.totals(true), w.totals(false));
        for r in &w.rows {
            assert_eq!(r.now, r.what_if, "{} {}", r.team, r.model);
        }
        // 720 hours of one $2.40 GPU, to the nano-dollar, shared by the teams that used it.
        let (per_token, gpu, _) = w.totals(false);
        assert_eq!(gpu, 1_728_000_000_000);
        let llama: Vec<&Row> = w.rows.iter().filter(|r| r.model == LLAMA).collect();
        assert_eq!(llama.len(), 3, "one row per team");
        assert!(llama
            .iter()
            .all(|r| r.now.gpu_nusd > 0 && r.now.per_token_nusd == 0));
        // Re-priced request by request, commercial traffic costs what the ledger says it did.
        let ledger_commercial: i64 = w
            .rows
            .iter()
            .filter(|r| r.model != LLAMA)
            .map(|r| r.ledger_nusd)
            .sum();
        assert!(ledger_commercial > 0);
        assert_eq!(per_token, ledger_commercial);
        assert_eq!(
            w.rows.iter().map(|r| r.requests).sum::<u64>(),
            60 + 60 + 30 + 45
        );
    }

    #[test]
    fn doubling_the_gpu_rate_or_the_gpus_doubles_the_self_hosted_cost_exactly() {
        let now = compare_with("whatif-base", &fixture::config_text(fixture::GPU));
        let double_rate = compare_with(
            "whatif-rate",
            &fixture::config_text("hourly_usd = 4.80, count = 1, tokens_per_second = 2500"),
        );
        let double_gpus = compare_with(
            "whatif-count",
            &fixture::config_text("hourly_usd = 2.40, count = 2, tokens_per_second = 2500"),
        );
        let (t, g, _) = now.totals(true);
        for w in [&double_rate, &double_gpus] {
            assert_eq!(w.totals(true).0, t, "per-token traffic is untouched");
            assert_eq!(w.totals(true).1, 2 * g);
            assert_eq!(w.totals(false), now.totals(false));
            let owned: Vec<i64> = w.owned.iter().map(|o| o.paid_nusd).collect();
            assert_eq!(owned, [g, 2 * g], "now, what-if");
        }
        let table = render(&double_rate, ("now.toml", "other.toml"), Format::Table);
        assert!(table.contains(&format!("{:>18}", format_usd(g))), "{table}");
        assert!(
            table.contains(&format!("{:>18}", format_usd(2 * g))),
            "{table}"
        );
    }

    #[test]
    fn capex_fields_price_the_gpu_hours_and_show_their_parts() {
        // $21,024 over 24 months is $1.20/h; 1 kW at $0.80/kWh is $0.80/h, cooled at +50%.
        let w = compare_with(
            "whatif-capex",
            &fixture::config_text(
                "purchase_usd = 21024, amortization_months = 24, power_watts = 1000, usd_per_kwh = 0.80, cooling_overhead = 0.5, tokens_per_second = 2500",
            ),
        );
        let o = w.owned.iter().find(|o| o.what_if).unwrap();
        assert_eq!(o.paid_nusd, 2_400_000_000 * 720, "$2.40/h again, for 720 h");
        let c = o.capex.unwrap();
        assert!((c.amortized_usd_per_hour - 1.2).abs() < 1e-12);
        let table = render(&w, ("a", "b"), Format::Table);
        assert!(
            table.contains("x $2.4000/GPU-h = 1.2000 amortized + 0.8000 power + 0.4000 cooling"),
            "{table}"
        );
    }

    #[test]
    fn without_the_owned_gpus_their_traffic_goes_to_the_cheapest_alias_and_their_hours_stop() {
        let text = fixture::config_text(fixture::GPU);
        let no_llama = &text[text.find("[[backend]]\nname = \"openai\"").unwrap()..];
        let w = compare_with("whatif-cloud", no_llama);
        let (_, gpu, _) = w.totals(true);
        assert_eq!(gpu, 0, "no owned GPUs left to pay for");
        let price = Catalog::builtin().price("gpt-4o-mini").unwrap();
        for r in w.rows.iter().filter(|r| r.model == LLAMA) {
            assert_eq!(r.what_if.backends, BTreeSet::from(["openai".to_string()]));
            assert!(r.what_if.per_token_nusd > 0);
            assert_eq!(r.what_if.unplaced_requests, 0);
            // Fewer than per-request rounding could move: the tokens at gpt-4o-mini's price.
            let all = Usage {
                prompt: r.tokens * 3 / 4,
                completion: r.tokens - r.tokens * 3 / 4,
                cached: 0,
                cache_write: 0,
                cache_write_1h: 0,
                reasoning: 0,
                source: TokenSource::Upstream,
            };
            let approx = meter::cost_nusd(Some(&price), &all, 0, None);
            assert!(
                (r.what_if.per_token_nusd - approx).abs() < approx / 50,
                "{r:?}"
            );
        }
        let json: serde_json::Value =
            serde_json::from_str(&render(&w, ("a", "b"), Format::Json)).unwrap();
        assert_eq!(json["what_if"]["gpu_hours_usd"].as_f64(), Some(0.0));
    }

    #[test]
    fn owned_gpus_nobody_would_use_show_as_idle_and_unserved_models_as_unplaced() {
        let text = fixture::config_text(fixture::GPU);
        // The other config renames the model: nothing in the ledger lands on its GPU.
        let other = text
            .replace(LLAMA, "some/other-model")
            .replace("aliases = [\"chat-small\"] }]", "aliases = [] }]")
            .replace(
                "{ name = \"gpt-4o-mini\", aliases = [\"chat-small\"] },",
                "",
            )
            .replace(
                "[[backend]]\nname = \"anthropic\"",
                "[[backend]]\nname = \"anthropic-gone\"",
            )
            .replace("claude-haiku-4-5", "claude-opus-4-1");
        let w = compare_with("whatif-idle", &other);
        let idle = w
            .rows
            .iter()
            .find(|r| r.model == "(idle) llama" && r.what_if.gpu_nusd > 0)
            .unwrap();
        assert_eq!(idle.what_if.gpu_nusd, 1_728_000_000_000);
        let unplaced: u64 = w.rows.iter().map(|r| r.what_if.unplaced_requests).sum();
        assert_eq!(
            unplaced,
            60 + 60 + 45,
            "llama, gpt-4o-mini and claude traffic"
        );
        let table = render(&w, ("a", "b"), Format::Table);
        assert!(table.contains("unplaced"), "{table}");
    }

    #[test]
    fn shares_of_the_gpu_hours_sum_to_what_was_paid() {
        let tokens = BTreeMap::from([
            (("a".to_string(), "m".to_string()), 1),
            (("b".to_string(), "m".to_string()), 1),
            (("c".to_string(), "m".to_string()), 1),
        ]);
        let shares = largest_remainder(100, &tokens, 3);
        assert_eq!(shares.iter().map(|s| s.1).collect::<Vec<_>>(), [34, 33, 33]);
    }
}
