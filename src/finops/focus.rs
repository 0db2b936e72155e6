//! The ledger as a FinOps Foundation FOCUS export: cost and usage rows in the columns FinOps
//! tools already load for cloud bills, so inference spend sits next to the bills it is
//! compared with. The Foundation's own validator finds no failure in it (FOCUS 1.2 rules,
//! `focus-validator` 2.2.1, as `scripts/focus-validator.sh` runs and reads it), and it
//! carries the FOCUS 1.3 provider columns beside the ones 1.3 deprecates.
//!
//! A FOCUS row is a charge, not a request: one per team × key × backend × served model × UTC
//! hour (the hour the request started), the finest period cloud bills use. The key is part of
//! the row because `x_CredentialId` (FOCUS 1.5's CredentialId) must name the one credential
//! the charge's requests presented; a team has the few keys its config lists, so this adds a
//! row per key a team used in that hour, never one per request. Requests refused before any
//! backend was asked, and requests the backend refused (`upstream_error`), billed nothing and
//! appear in no row.
//!
//! ```text
//!  requests in [from, to) ──one pass──► BTreeMap<(hour, team, backend, model, key), Charge> ──► CSV
//! ```
//!
//! Memory grows with the number of rows, never with the number of requests. The map's key
//! order is the export's order.
//!
//! Who is who: the gateway's operator (`[focus] provider_name`) is the service provider its
//! teams buy inference from and the invoice issuer that charges them back: it picks the
//! backend, sets the price a team pays and bills it. The backend is the host that ran the
//! inference (a commercial API, or the operator's own GPUs) and, in FOCUS 1.2's terms, the
//! publisher that produced it.
//!
//! Money stays in integer nano-dollars until it is printed. `BilledCost` is the ledger's cost;
//! `ListCost` re-prices each request of a commercial backend at the catalog's public price
//! with the metering code's own function, so a backend billed at the catalog price has a list
//! cost equal to its billed cost to the nano-dollar, and a negotiated price shows as the gap.

use crate::budget::window;
use crate::clock::format_time;
use crate::config::prices::{Catalog, Price};
use crate::config::{Backend, Config, Focus, Hosting, Window};
use crate::finops::report::{csv_field, ReportError};
use crate::meter::{self, format_usd, TokenSource, Usage};
use rusqlite::Connection;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

const HOUR_US: i64 = 3_600_000_000;

/// The export's header, in order: FOCUS columns, then ours with FOCUS's `x_` prefix.
pub const COLUMNS: [&str; 42] = [
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "BillingCurrency",
    "BillingAccountId",
    "BillingAccountName",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "ChargeClass",
    "ChargeFrequency",
    "ChargeDescription",
    "InvoiceId",
    "InvoiceIssuerName",
    "ServiceProviderName",
    "HostProviderName",
    "ProviderName",
    "PublisherName",
    "ServiceName",
    "ServiceCategory",
    "ServiceSubcategory",
    "ResourceId",
    "ResourceName",
    "RegionId",
    "SkuId",
    "SkuPriceId",
    "ConsumedQuantity",
    "ConsumedUnit",
    "PricingQuantity",
    "PricingUnit",
    "Tags",
    "x_Team",
    "x_PrincipalId",
    "x_CredentialId",
    "x_Hosting",
    "x_Requests",
    "x_PromptTokens",
    "x_CompletionTokens",
    "x_CachedTokens",
];

/// What one key of one team spent on one model of one backend in one hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub period_start_us: i64,
    pub team: String,
    pub backend: String,
    pub model: String,
    /// The key's id (`k-` and the start of its hash), never the key.
    pub key_id: String,
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

/// Period start, team, backend, model, key id: a row of the export, in its order.
type ChargeKey = (i64, String, String, String, String);

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
/// team, backend, model, key. `config` says each backend's hosting and region.
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
                cost_nusd, egress_bytes, key_id, cache_write_1h_tokens
         FROM requests
         WHERE started_at_us >= ?1 AND started_at_us < ?2
           AND backend IS NOT NULL AND status != 'upstream_error'",
    )?;
    let mut rows = stmt.query([from_us.unwrap_or(i64::MIN), to_us.unwrap_or(i64::MAX)])?;
    let mut charges: BTreeMap<ChargeKey, Acc> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let started: i64 = r.get(0)?;
        let key = (
            started.saturating_sub(started.rem_euclid(HOUR_US)),
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(11)?,
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
            cache_write_1h: count(12)?,
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

/// The charges as CSV, header first; fields are quoted as RFC 4180 asks. `focus` names the
/// billing account, the provider and the invoice issuer.
pub fn render(focus: &Focus, charges: &[Charge]) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for c in charges {
        for (i, f) in fields(focus, c).iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&csv_field(f));
        }
        out.push('\n');
    }
    out
}

/// One charge's row, in [`COLUMNS`] order; an empty field is FOCUS's null.
fn fields(focus: &Focus, c: &Charge) -> [String; COLUMNS.len()] {
    let tokens = c.prompt_tokens.saturating_add(c.completion_tokens);
    let billed = format_usd(c.billed_nusd);
    let (billing_start, billing_end) = window::bounds(Window::Month, c.period_start_us);
    // Who ran the inference: a commercial backend is its own host and produced what was sold;
    // a self-hosted one ran on GPUs the operator runs (or rents: `host_provider_name`). A
    // backend gone from the config has no known host: FOCUS 1.3's "Not Applicable" is its
    // value for a host that cannot be determined.
    let (host, publisher, hosting) = match c.hosting {
        Some(Hosting::Commercial) => (&*c.backend, &*c.backend, Hosting::Commercial.as_str()),
        Some(Hosting::SelfHosted) => (
            &*focus.host_provider_name,
            &*focus.provider_name,
            Hosting::SelfHosted.as_str(),
        ),
        None => ("Not Applicable", "unknown", "unknown"),
    };
    [
        billed.clone(),
        // No commitment discount is amortized into a charge: effective = billed.
        billed.clone(),
        format_usd(c.list_nusd),
        // Tokens at the price the gateway has for this backend (its contract, or the catalog),
        // before any commitment discount, of which there are none: what it billed.
        billed,
        "USD".into(),
        focus.billing_account_id.clone(),
        focus.billing_account_name.clone(),
        // The calendar month (UTC) of the charge: an hour never straddles two.
        format_time(billing_start),
        format_time(billing_end),
        format_time(c.period_start_us),
        format_time(c.period_start_us.saturating_add(HOUR_US)),
        "Usage".into(),
        // Null: a correction of an invoiced period is the only other class, and the ledger
        // never corrects a charge.
        String::new(),
        "Usage-Based".into(),
        format!("LLM inference: {} on {}", c.model, c.backend),
        // Null: the gateway issues no invoice with an id; its charges are not on one.
        String::new(),
        // The operator both sells and bills: with the backend as provider, FOCUS would read
        // the charge as collected by a third party and require a BilledCost of 0.
        focus.invoice_issuer_name.clone(),
        focus.provider_name.clone(),
        host.into(),
        focus.provider_name.clone(),
        publisher.into(),
        c.backend.clone(),
        "AI and Machine Learning".into(),
        "Generative AI".into(),
        format!("{}/{}", c.backend, c.model),
        c.model.clone(),
        c.region.clone().unwrap_or_default(),
        // The product is the model, the same whichever backend serves it; its price is the
        // backend's (config/prices.toml or the backend's own), so one SkuPriceId per backend
        // and model, with one parent SkuId.
        c.model.clone(),
        format!("{}/{}", c.backend, c.model),
        tokens.to_string(),
        "Tokens".into(),
        per_million(tokens),
        // FOCUS's UnitFormat: a count and a unit, as prices per million tokens are quoted.
        "1000000 Tokens".into(),
        serde_json::to_string(&c.tags).unwrap_or_else(|_| "{}".into()),
        c.team.clone(),
        // FOCUS 1.5's PrincipalId: the team is who a key authenticates.
        c.team.clone(),
        // FOCUS 1.5's CredentialId: an identifier of the key, never the key itself.
        c.key_id.clone(),
        hosting.into(),
        c.requests.to_string(),
        c.prompt_tokens.to_string(),
        c.completion_tokens.to_string(),
        c.cached_tokens.to_string(),
    ]
}

/// The FOCUS CSV for `[from_us, to_us)`.
pub fn export(
    conn: &Connection,
    config: &Config,
    from_us: Option<i64>,
    to_us: Option<i64>,
) -> Result<String, ReportError> {
    Ok(render(&config.focus, &query(conn, config, from_us, to_us)?))
}

/// `1234` tokens → `0.001234` (millions of tokens), exact.
fn per_million(tokens: u64) -> String {
    format!("{}.{:06}", tokens / 1_000_000, tokens % 1_000_000)
}

// === impl Acc ===

impl Acc {
    fn new(
        (period_start_us, team, backend, model, key_id): &ChargeKey,
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
                key_id: key_id.clone(),
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
