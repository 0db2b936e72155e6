//! Which backend serves a request: the cheapest one that can.
//!
//! Candidates are every (backend, model) serving the requested name or alias. Each is kept
//! or removed by filters, in this order, and the first filter that removes it is its reason:
//! the team's regions, the request's features, the context window, health (circuit breaker,
//! 429 back-off) and capacity. The rest are ranked by expected cost (prompt at the input
//! price, expected output at the output price, plus egress); under `self_hosted_cost =
//! "marginal"` a self-hosted backend with capacity costs only its egress, so owned GPUs take
//! the baseline and only the overflow pays a provider. Ties go to the lower load, then the
//! lower latency, then config order.
//!
//! The plan is only a ranking of a snapshot: slots are claimed atomically when a request is
//! sent (see [`Candidate::claim`]), and later candidates are the fallbacks.

pub mod claim;
pub mod explain;
pub mod health;
pub mod occupancy;

use crate::api::endpoint::Endpoint;
use crate::auth::Principal;
use crate::config::prices::{self, Catalog, Price};
use crate::config::{Backend, Features, Hosting, Protocol, Routing, SelfHostedCost};
use crate::error::GatewayError;
use crate::meter::price;
use crate::tokens::{Counter, Encoding};
use crate::upstream::client::UpstreamClient;
use crate::upstream::h1::H1Pool;
use health::{Availability, BackendState, Failure, InFlight};
use http::HeaderValue;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// A configured backend with what it needs at run time.
#[derive(Debug)]
pub struct RouteBackend {
    pub cfg: Arc<Backend>,
    pub client: UpstreamClient,
    /// Task-driven HTTP/1.1 connections, for plain-`http://` backends (see `upstream::h1`).
    pub h1: Option<Arc<H1Pool>>,
    /// Outlives config reloads (carried over by name), so health and load are not forgotten.
    pub state: Arc<BackendState>,
    /// `x-tollgate-backend`, made once rather than per response.
    pub name_header: HeaderValue,
}

impl RouteBackend {
    pub fn new(cfg: Arc<Backend>, client: UpstreamClient, state: Arc<BackendState>) -> Self {
        let name_header = header_value(&cfg.name);
        let h1 = H1Pool::for_base_url(
            &cfg.base_url,
            cfg.connect_timeout,
            cfg.hosting == crate::config::Hosting::SelfHosted,
        );
        Self {
            cfg,
            client,
            h1,
            state,
            name_header,
        }
    }
}

#[derive(Debug)]
pub struct Candidate {
    pub backend: Arc<RouteBackend>,
    /// The name the backend knows the model by (the request may have used an alias).
    pub model: Arc<str>,
    pub model_header: HeaderValue,
    /// `None`: served, but unpriced (counted and flagged, never priced at 0).
    pub price: Option<Arc<Price>>,
    pub counter: Counter,
    /// The model's output cap (config, else catalog): what a request without `max_tokens`
    /// reserves against budgets.
    pub max_output_tokens: Option<u64>,
    /// Prompt plus output tokens the model accepts (config, else catalog); `None`: unknown.
    pub context_window: Option<u64>,
    pub features: Features,
}

/// A slot on a backend, held from sending until the response ends.
#[derive(Debug)]
pub struct Claim {
    pub in_flight: InFlight,
}

impl Candidate {
    /// Takes a slot: under the backend's `max_concurrency` (unless `queue`: then it waits in
    /// the backend's own queue), and the probe slot when its circuit is half-open. `None` when
    /// another request took the last one since the plan was made.
    pub fn claim(&self) -> Option<Claim> {
        let state = &self.backend.state;
        let cap = self.backend.cfg.max_concurrency;
        match state.availability() {
            Availability::Up => Some(Claim {
                in_flight: state.try_enter(cap)?,
            }),
            Availability::HalfOpen => {
                let mut in_flight = state.try_enter(cap)?;
                if !state.try_probe() {
                    return None;
                }
                in_flight.mark_probe();
                Some(Claim { in_flight })
            }
            _ => None,
        }
    }
}

impl Candidate {
    /// A slot, waiting at the gateway until `deadline` when the backend is at its cap (the
    /// request is queued here, not sent to a backend that is full).
    pub async fn claim_waiting(&self, deadline: tokio::time::Instant) -> Option<Claim> {
        if let Some(claim) = self.claim() {
            return Some(claim);
        }
        let max = self.backend.cfg.max_concurrency?;
        let state = &self.backend.state;
        match state.availability() {
            Availability::Up => Some(Claim {
                in_flight: state.enter_waiting(max, deadline).await?,
            }),
            _ => None,
        }
    }
}

/// Config names are printable (validated), so this only falls back for odd Unicode.
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("unprintable"))
}

/// What the router needs to know of a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub model: &'a str,
    pub endpoint: Endpoint,
    pub regions: &'a [Arc<str>],
    pub features: Features,
    /// The request's own output cap (`max_tokens`), counted in the context window.
    pub max_output_tokens: Option<u64>,
    pub prompt: Prompt<'a>,
    /// Bytes sent upstream, for egress.
    pub request_bytes: u64,
}

/// The prompt's size as known so far.
#[derive(Debug, Clone, Copy)]
pub struct Prompt<'a> {
    /// Never below the true count (the byte count): decides context fits until counted.
    pub upper: u64,
    /// A likely count (about four bytes a token): ranks costs until counted.
    pub typical: u64,
    /// Exact counts made so far, by the counter that made them.
    pub exact: &'a [(Counter, u64)],
}

impl Prompt<'_> {
    /// Bounds from the body size alone.
    pub fn from_bytes(bytes: usize) -> Prompt<'static> {
        Prompt {
            upper: crate::tokens::estimate_prompt_tokens(bytes),
            typical: (bytes as u64).div_ceil(4),
            exact: &[],
        }
    }

    /// A known count (`tollgate check --explain --prompt-tokens`).
    pub fn known(tokens: u64) -> Prompt<'static> {
        Prompt {
            upper: tokens,
            typical: tokens,
            exact: &[],
        }
    }

    /// (tokens for the context fit, tokens for the cost, counted exactly).
    fn for_counter(&self, c: &Counter) -> (u64, u64, bool) {
        match self.exact.iter().find(|(k, _)| k == c) {
            Some(&(_, n)) => (n, n, true),
            None => (
                self.upper,
                self.typical.min(self.upper),
                self.upper == self.typical,
            ),
        }
    }
}

/// Why a candidate was not used.
#[derive(Debug, Clone, PartialEq)]
pub enum Exclusion {
    Region {
        region: Option<Arc<str>>,
    },
    Features {
        missing: Features,
    },
    /// The backend's protocol has no such endpoint (Anthropic's API: only chat).
    Endpoint {
        endpoint: Endpoint,
    },
    Context {
        needed: u64,
        window: u64,
    },
    Circuit {
        reason: Option<Failure>,
        for_ms: u64,
    },
    Probing,
    Busy {
        for_ms: u64,
    },
    Capacity {
        in_flight: u32,
        max: u32,
    },
}

impl Exclusion {
    /// Short name for headers and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Exclusion::Region { .. } => "region",
            Exclusion::Features { .. } => "features",
            Exclusion::Endpoint { .. } => "endpoint",
            Exclusion::Context { .. } => "context",
            Exclusion::Circuit { .. } => "circuit_open",
            Exclusion::Probing => "probing",
            Exclusion::Busy { .. } => "rate_limited",
            Exclusion::Capacity { .. } => "capacity",
        }
    }

    /// Gone by itself after a while; the rest depend on the request or the config.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Exclusion::Circuit { for_ms, .. } | Exclusion::Busy { for_ms } => {
                Some(Duration::from_millis(*for_ms))
            }
            Exclusion::Probing | Exclusion::Capacity { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// How a ranked candidate's cost was reckoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Self-hosted under `marginal`: capacity already paid for.
    Marginal,
    /// Self-hosted under `rate_card`: its share of the GPU cost.
    RateCard,
    /// A provider's per-token price.
    List,
    Unpriced,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Marginal => "marginal",
            Basis::RateCard => "rate_card",
            Basis::List => "list",
            Basis::Unpriced => "unpriced",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ranked {
    pub candidate: Arc<Candidate>,
    /// Expected cost for routing, nano-dollars; `i64::MAX` when unpriced (ranked last).
    pub cost_nusd: i64,
    pub basis: Basis,
    /// Load in thousandths of its capacity (of 1000 requests when uncapped).
    pub load_permille: u32,
    pub latency_us: u64,
    /// Over its `max_concurrency`, but nothing else can take the request: it queues there
    /// rather than being refused, as the backend's own batch queue would hold it.
    pub queued: bool,
}

#[derive(Debug, Clone)]
pub struct Excluded {
    pub candidate: Arc<Candidate>,
    pub why: Exclusion,
}

/// The ranking of one request's candidates.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Eligible, best first; the later ones are the fallbacks.
    pub ranked: Vec<Ranked>,
    pub excluded: Vec<Excluded>,
    /// A candidate was removed by its context window on the prompt's upper bound only: an
    /// exact count could bring it back.
    pub needs_count: Vec<Counter>,
}

/// Load used when a backend sets no `max_concurrency`.
const UNCAPPED_CAPACITY: u32 = 1000;

#[derive(Debug)]
pub struct Router {
    by_name: HashMap<Arc<str>, Vec<Arc<Candidate>>>,
    self_hosted_cost: SelfHostedCost,
    expected_output_tokens: u64,
}

impl Router {
    pub fn new(backends: &[Arc<RouteBackend>], catalog: &Catalog, routing: &Routing) -> Self {
        let mut by_name: HashMap<Arc<str>, Vec<Arc<Candidate>>> = HashMap::new();
        for b in backends {
            for m in &b.cfg.models {
                let listed = catalog.get(&m.name);
                let candidate = Arc::new(Candidate {
                    backend: b.clone(),
                    model: m.name.clone(),
                    model_header: header_value(&m.name),
                    price: prices::resolve(&b.cfg, m, catalog).map(Arc::new),
                    counter: Encoding::for_model(&m.name),
                    max_output_tokens: m.max_output_tokens.or_else(|| listed?.max_output_tokens),
                    context_window: m.context_window.or_else(|| listed?.context_window),
                    features: m.features,
                });
                for name in std::iter::once(&m.name).chain(&m.aliases) {
                    by_name
                        .entry(name.clone())
                        .or_default()
                        .push(candidate.clone());
                }
            }
        }
        Self {
            by_name,
            self_hosted_cost: routing.self_hosted_cost,
            expected_output_tokens: routing.expected_output_tokens,
        }
    }

    /// Ranks every candidate for the request; `UnknownModel` when nothing serves the name.
    pub fn plan(&self, req: &RouteRequest<'_>) -> Result<Plan, GatewayError> {
        let all = self
            .by_name
            .get(req.model)
            .ok_or_else(|| GatewayError::UnknownModel(req.model.into()))?;
        let mut plan = Plan {
            ranked: Vec::with_capacity(all.len()),
            excluded: Vec::new(),
            needs_count: Vec::new(),
        };
        let mut full = Vec::new();
        for c in all {
            match self.score(c, req, false) {
                Ok(r) => plan.ranked.push(r),
                Err((why @ Exclusion::Capacity { .. }, _)) => {
                    // Kept aside: it becomes the queue if nothing else is eligible.
                    full.push(c);
                    plan.excluded.push(Excluded {
                        candidate: c.clone(),
                        why,
                    });
                }
                Err((why, estimated)) => {
                    if estimated && !plan.needs_count.contains(&c.counter) {
                        plan.needs_count.push(c.counter);
                    }
                    plan.excluded.push(Excluded {
                        candidate: c.clone(),
                        why,
                    });
                }
            }
        }
        if plan.ranked.is_empty() && !full.is_empty() {
            // Every candidate left is full: queue at them, cheapest and least loaded first,
            // rather than refuse work that owned capacity will get to in a moment.
            plan.excluded
                .retain(|e| !matches!(e.why, Exclusion::Capacity { .. }));
            plan.ranked = full
                .into_iter()
                .filter_map(|c| self.score(c, req, true).ok())
                .collect();
        }
        // Stable: config order breaks the last ties.
        plan.ranked
            .sort_by_key(|r| (r.cost_nusd, r.load_permille, r.latency_us));
        Ok(plan)
    }

    /// The candidate's rank, or why it is out (and whether that rests on an estimate).
    fn score(
        &self,
        c: &Arc<Candidate>,
        req: &RouteRequest<'_>,
        queue: bool,
    ) -> Result<Ranked, (Exclusion, bool)> {
        let cfg = &c.backend.cfg;
        if !in_regions(cfg, req.regions) {
            return Err((
                Exclusion::Region {
                    region: cfg.region.clone(),
                },
                false,
            ));
        }
        if cfg.protocol == Protocol::Anthropic && req.endpoint != Endpoint::ChatCompletions {
            return Err((
                Exclusion::Endpoint {
                    endpoint: req.endpoint,
                },
                false,
            ));
        }
        let missing = req.features.missing_from(c.features);
        if !missing.is_empty() {
            return Err((Exclusion::Features { missing }, false));
        }
        let (fit_tokens, cost_tokens, exact) = req.prompt.for_counter(&c.counter);
        if let Some(window) = c.context_window {
            let needed = fit_tokens + req.max_output_tokens.unwrap_or(0);
            if needed > window {
                return Err((Exclusion::Context { needed, window }, !exact));
            }
        }
        let state = &c.backend.state;
        match state.availability() {
            Availability::Up | Availability::HalfOpen => {}
            Availability::Open { reason, for_ms } => {
                return Err((Exclusion::Circuit { reason, for_ms }, false))
            }
            Availability::Probing => return Err((Exclusion::Probing, false)),
            Availability::Busy { for_ms } => return Err((Exclusion::Busy { for_ms }, false)),
        }
        let in_flight = state.in_flight();
        let cap = cfg.max_concurrency;
        let queued = match cap {
            Some(max) if in_flight >= max => {
                if !queue {
                    return Err((Exclusion::Capacity { in_flight, max }, false));
                }
                true
            }
            _ => false,
        };
        let load_permille =
            (in_flight as u64 * 1000 / cap.unwrap_or(UNCAPPED_CAPACITY) as u64) as u32;

        let (basis, cost_nusd) = self.expected_cost(c, req, cost_tokens);
        Ok(Ranked {
            candidate: c.clone(),
            cost_nusd,
            basis,
            load_permille,
            latency_us: state.latency().map_or(0, |l| l.as_micros() as u64),
            queued,
        })
    }

    /// What routing expects a request to cost on `c`, and on what basis: prompt at the input
    /// price, expected output at the output price, plus egress; a self-hosted backend under
    /// `marginal` costs only its egress while it has capacity.
    fn expected_cost(
        &self,
        c: &Candidate,
        req: &RouteRequest<'_>,
        cost_tokens: u64,
    ) -> (Basis, i64) {
        let cfg = &c.backend.cfg;
        let output = req
            .max_output_tokens
            .map_or(self.expected_output_tokens, |m| {
                m.min(self.expected_output_tokens)
            });
        let basis = match (cfg.hosting, self.self_hosted_cost, &c.price) {
            (Hosting::SelfHosted, SelfHostedCost::Marginal, _) => Basis::Marginal,
            (_, _, None) => Basis::Unpriced,
            (Hosting::SelfHosted, _, Some(_)) => Basis::RateCard,
            (Hosting::Commercial, _, Some(_)) => Basis::List,
        };
        let price = match basis {
            Basis::RateCard | Basis::List => c.price.as_deref(),
            Basis::Marginal | Basis::Unpriced => None,
        };
        // Answers run about four bytes a token, plus the JSON around them.
        let egress = price::Egress {
            bytes: req.request_bytes + output * 4 + 300,
            usd_per_gb: cfg.egress_usd_per_gb,
        };
        let expected = price::Tokens {
            prompt: cost_tokens,
            completion: output,
            ..Default::default()
        };
        let cost_nusd = match basis {
            Basis::Unpriced => i64::MAX,
            _ => price::cost_nusd(price, expected, egress, price::Rounding::Nearest),
        };
        (basis, cost_nusd)
    }

    /// The error for a request no candidate can take, saying why for each.
    pub fn refusal(model: &str, team: &str, plan: &Plan) -> GatewayError {
        let reasons = plan
            .excluded
            .iter()
            .map(|e| {
                format!(
                    "{}: {}",
                    e.candidate.backend.cfg.name,
                    explain::describe(&e.why)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let permanent_only = plan.excluded.iter().all(|e| {
            matches!(
                e.why,
                Exclusion::Context { .. } | Exclusion::Features { .. } | Exclusion::Endpoint { .. }
            )
        });
        if permanent_only && !plan.excluded.is_empty() {
            let all = |f: fn(&Exclusion) -> bool| plan.excluded.iter().all(|e| f(&e.why));
            return GatewayError::NotServable {
                model: model.into(),
                reason: reasons,
                code: if all(|w| matches!(w, Exclusion::Context { .. })) {
                    "context_length_exceeded"
                } else if all(|w| matches!(w, Exclusion::Endpoint { .. })) {
                    "unsupported_endpoint"
                } else {
                    "unsupported_feature"
                },
            };
        }
        GatewayError::NoEligibleBackend {
            model: model.into(),
            reason: format!("no backend can serve it for team `{team}`: {reasons}"),
            retry_after: plan
                .excluded
                .iter()
                .filter_map(|e| e.why.retry_after())
                .min(),
        }
    }

    /// Model names and aliases the principal may ask for, sorted.
    pub fn names_for<'a>(&'a self, principal: &'a Principal) -> impl Iterator<Item = &'a str> + 'a {
        let names: BTreeSet<&str> = self
            .by_name
            .iter()
            .filter(|(_, cs)| {
                cs.iter()
                    .any(|c| in_regions(&c.backend.cfg, &principal.team.regions))
            })
            .map(|(n, _)| &**n)
            .collect();
        names.into_iter()
    }

    /// The candidates that serve a model name or alias to the principal (in its regions), in
    /// the config's order.
    pub fn candidates_for<'a>(
        &'a self,
        name: &str,
        principal: &'a Principal,
    ) -> impl Iterator<Item = &'a Arc<Candidate>> + 'a {
        self.by_name
            .get(name)
            .map_or(&[][..], |c| c.as_slice())
            .iter()
            .filter(|c| in_regions(&c.backend.cfg, &principal.team.regions))
    }

    /// Every name with its candidates, sorted by name: the routing table `tollgate check` prints.
    pub fn table(&self) -> Vec<(&str, &[Arc<Candidate>])> {
        let mut rows: Vec<_> = self
            .by_name
            .iter()
            .map(|(n, c)| (&**n, c.as_slice()))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows
    }
}

fn in_regions(backend: &Backend, regions: &[Arc<str>]) -> bool {
    regions.is_empty() || backend.region.as_ref().is_some_and(|r| regions.contains(r))
}

#[cfg(test)]
mod tests;
