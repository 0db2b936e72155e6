//! The ledger as a FinOps Foundation FOCUS export: cost and usage rows in the columns FinOps
//! tools already load for cloud bills, so inference spend sits next to the bills it is
//! compared with.
//!
//! A FOCUS row is a charge, not a request: one per team × backend × served model × UTC hour
//! (the hour the request started), the finest period cloud bills use. Requests refused before
//! any backend was asked, and requests the backend refused (`upstream_error`), billed nothing
//! and appear in no row.
//!
//! ```text
//!  requests in [from, to) ──one pass──► BTreeMap<(hour, team, backend, model), Charge> ──► CSV
//! ```
//!
//! Memory grows with the number of rows, never with the number of requests. The map's key
//! order is the export's order.
//!
//! Money stays in integer nano-dollars until it is printed. `BilledCost` is the ledger's cost;
//! `ListCost` re-prices each request of a commercial backend at the catalog's public price
//! with the metering code's own function, so a backend billed at the catalog price has a list
//! cost equal to its billed cost to the nano-dollar, and a negotiated price shows as the gap.

use crate::config::prices::{Catalog, Price};
use crate::config::{Backend, Config, Hosting};
use crate::meter::{self, format_usd, TokenSource, Usage};
use crate::report::{csv_field, format_time, ReportError};
use rusqlite::Connection;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

const HOUR_US: i64 = 3_600_000_000;

/// The export's header, in order: FOCUS columns, then ours with FOCUS's `x_` prefix.
pub const COLUMNS: [&str; 25] = [
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "BillingCurrency",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "ChargeDescription",
    "ServiceName",
    "ServiceCategory",
    "ProviderName",
    "ResourceId",
    "ResourceName",
    "RegionId",
    "ConsumedQuantity",
    "ConsumedUnit",
    "PricingQuantity",
    "PricingUnit",
    "Tags",
    "x_Team",
    "x_Hosting",
    "x_Requests",
    "x_PromptTokens",
    "x_CompletionTokens",
    "x_CachedTokens",
];

/// What one team spent on one model of one backend in one hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub period_start_us: i64,
    pub team: String,
    pub backend: String,
    pub model: String,
    /// `None`: the backend is no longer in the config.
    pub hosting: Option<Hosting>,
    pub region: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub billed_nusd: i64,
    pub list_nusd: i64,
    /// The tags that have the same value on every request of the charge.
    pub tags: BTreeMap<String, Value>,
}

/// A charge being summed, with what re-pricing its requests needs.
struct Acc {
    charge: Charge,
    /// The catalog price a commercial backend's requests are re-priced at; `None`: the list
    /// cost is the billed cost.
    list_price: Option<Price>,
    egress_usd_per_gb: Option<f64>,
    seen_tags: bool,
}

/// Charges for requests that started in `[from_us, to_us)`, in FOCUS order: by period start,
/// team, backend, model. `config` says each backend's hosting and region.
pub fn query(
    conn: &Connection,
    config: &Config,
    from_us: Option<i64>,
    to_us: Option<i64>,
) -> Result<Vec<Charge>, ReportError> {
    let catalog = Catalog::builtin();
    let backends: HashMap<&str, &Backend> =
        config.backends.iter().map(|b| (&*b.name, &**b)).collect();
    let mut stmt = conn.prepare(
        "SELECT started_at_us, team, backend, COALESCE(served_model, requested_model), tags,
                prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
                cost_nusd, egress_bytes
         FROM requests
         WHERE started_at_us >= ?1 AND started_at_us < ?2
           AND backend IS NOT NULL AND status != 'upstream_error'",
    )?;
    let mut rows = stmt.query([from_us.unwrap_or(i64::MIN), to_us.unwrap_or(i64::MAX)])?;
    let mut charges: BTreeMap<(i64, String, String, String), Acc> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let started: i64 = r.get(0)?;
        let key = (
            started.saturating_sub(started.rem_euclid(HOUR_US)),
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
        );
        // Counts are NULL when unknown; a negative one could only come from a damaged file.
        let count = |i: usize| -> rusqlite::Result<u64> {
            Ok(r.get::<_, Option<i64>>(i)?
                .map_or(0, |n| u64::try_from(n).unwrap_or(0)))
        };
        let usage = Usage {
            prompt: count(5)?,
            completion: count(6)?,
            cached: count(7)?,
            cache_write: count(8)?,
            reasoning: 0,
            source: TokenSource::Upstream,
        };
        let acc = charges
            .entry(key)
            .or_insert_with_key(|key| Acc::new(key, &backends, &catalog));
        acc.add(&usage, r.get(9)?, count(10)?);
        acc.add_tags(r.get_ref(4)?.as_str().unwrap_or("{}"));
    }
    Ok(charges.into_values().map(|a| a.charge).collect())
}

/// The charges as CSV, header first; fields are quoted as RFC 4180 asks.
pub fn render(charges: &[Charge]) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for c in charges {
        let tokens = c.prompt_tokens.saturating_add(c.completion_tokens);
        let (provider, hosting) = match c.hosting {
            Some(Hosting::Commercial) => (c.backend.as_str(), Hosting::Commercial.as_str()),
            Some(Hosting::SelfHosted) => ("self-hosted", Hosting::SelfHosted.as_str()),
            None => ("unknown", "unknown"),
        };
        let fields: [String; COLUMNS.len()] = [
            format_usd(c.billed_nusd),
            format_usd(c.billed_nusd),
            format_usd(c.list_nusd),
            "USD".into(),
            format_time(c.period_start_us),
            format_time(c.period_start_us.saturating_add(HOUR_US)),
            "Usage".into(),
            format!("LLM inference: {} on {}", c.model, c.backend),
            c.backend.clone(),
            "AI and Machine Learning".into(),
            provider.into(),
            format!("{}/{}", c.backend, c.model),
            c.model.clone(),
            c.region.clone().unwrap_or_default(),
            tokens.to_string(),
            "Tokens".into(),
            per_million(tokens),
            "1M Tokens".into(),
            serde_json::to_string(&c.tags).unwrap_or_else(|_| "{}".into()),
            c.team.clone(),
            hosting.into(),
            c.requests.to_string(),
            c.prompt_tokens.to_string(),
            c.completion_tokens.to_string(),
            c.cached_tokens.to_string(),
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&csv_field(f));
        }
        out.push('\n');
    }
    out
}

/// The FOCUS CSV for `[from_us, to_us)`.
pub fn export(
    conn: &Connection,
    config: &Config,
    from_us: Option<i64>,
    to_us: Option<i64>,
) -> Result<String, ReportError> {
    Ok(render(&query(conn, config, from_us, to_us)?))
}

/// `1234` tokens → `0.001234` (millions of tokens), exact.
fn per_million(tokens: u64) -> String {
    format!("{}.{:06}", tokens / 1_000_000, tokens % 1_000_000)
}

// === impl Acc ===

impl Acc {
    fn new(
        (period_start_us, team, backend, model): &(i64, String, String, String),
        backends: &HashMap<&str, &Backend>,
        catalog: &Catalog,
    ) -> Acc {
        let cfg = backends.get(backend.as_str());
        // A self-hosted backend's cost is its own GPUs' rate card: a provider's public price
        // for the same model is not a list price for it. A backend gone from the config has
        // an unknown hosting and egress rate, so nothing to re-price with either.
        let list_price = cfg
            .filter(|b| b.hosting == Hosting::Commercial)
            .and_then(|_| catalog.price(model));
        Acc {
            charge: Charge {
                period_start_us: *period_start_us,
                team: team.clone(),
                backend: backend.clone(),
                model: model.clone(),
                hosting: cfg.map(|b| b.hosting),
                region: cfg.and_then(|b| b.region.as_deref().map(str::to_string)),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
                billed_nusd: 0,
                list_nusd: 0,
                tags: BTreeMap::new(),
            },
            list_price,
            egress_usd_per_gb: cfg.and_then(|b| b.egress_usd_per_gb),
            seen_tags: false,
        }
    }

    fn add(&mut self, usage: &Usage, cost_nusd: i64, egress_bytes: u64) {
        let c = &mut self.charge;
        c.requests += 1;
        c.prompt_tokens = c.prompt_tokens.saturating_add(usage.prompt);
        c.completion_tokens = c.completion_tokens.saturating_add(usage.completion);
        c.cached_tokens = c.cached_tokens.saturating_add(usage.cached);
        c.billed_nusd = c.billed_nusd.saturating_add(cost_nusd);
        // Per request, as metering priced it: one rounding per request, and a long-context
        // tier applies by the request's prompt, not the hour's.
        let list = match &self.list_price {
            Some(p) => meter::cost_nusd(Some(p), usage, egress_bytes, self.egress_usd_per_gb),
            None => cost_nusd,
        };
        c.list_nusd = c.list_nusd.saturating_add(list);
    }

    /// Keeps the tags this request shares with every earlier one of the charge.
    fn add_tags(&mut self, json: &str) {
        if self.seen_tags && self.charge.tags.is_empty() {
            return;
        }
        // Unreadable tags (a damaged record) share nothing with the others.
        let tags: BTreeMap<String, Value> = serde_json::from_str(json).unwrap_or_default();
        if self.seen_tags {
            self.charge.tags.retain(|k, v| tags.get(k) == Some(v));
        } else {
            self.charge.tags = tags;
            self.seen_tags = true;
        }
    }
}

#[cfg(test)]
mod tests;
