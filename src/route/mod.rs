//! Which backend serves a request.
//!
//! Candidates are every (backend, model) serving the requested name or alias, in config
//! order. This stage keeps those in the team's regions and picks the first that is not
//! marked down; cost-based ordering slots in here without touching the phases around it.

pub mod health;

use crate::auth::Principal;
use crate::config::prices::{self, Catalog, Price};
use crate::config::Backend;
use crate::error::GatewayError;
use crate::tokens::{Counter, Encoding};
use crate::upstream::client::UpstreamClient;
use crate::upstream::h1::H1Pool;
use health::BackendState;
use http::HeaderValue;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

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
        let h1 = H1Pool::for_base_url(&cfg.base_url, cfg.connect_timeout);
        Self {
            cfg,
            client,
            h1,
            state,
            name_header,
        }
    }
}

#[derive(Debug, Clone)]
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
}

/// Config names are printable (validated), so this only falls back for odd Unicode.
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("unprintable"))
}

#[derive(Debug, Default)]
pub struct Router {
    by_name: HashMap<Arc<str>, Vec<Candidate>>,
}

impl Router {
    pub fn new(backends: &[Arc<RouteBackend>], catalog: &Catalog) -> Self {
        let mut by_name: HashMap<Arc<str>, Vec<Candidate>> = HashMap::new();
        for b in backends {
            for m in &b.cfg.models {
                let candidate = Candidate {
                    backend: b.clone(),
                    model: m.name.clone(),
                    model_header: header_value(&m.name),
                    price: prices::resolve(&b.cfg, m, catalog).map(Arc::new),
                    counter: Encoding::for_model(&m.name),
                    max_output_tokens: m
                        .max_output_tokens
                        .or_else(|| catalog.get(&m.name)?.max_output_tokens),
                };
                for name in std::iter::once(&m.name).chain(&m.aliases) {
                    by_name
                        .entry(name.clone())
                        .or_default()
                        .push(candidate.clone());
                }
            }
        }
        Self { by_name }
    }

    pub fn resolve(&self, model: &str, principal: &Principal) -> Result<Candidate, GatewayError> {
        let all = self
            .by_name
            .get(model)
            .ok_or_else(|| GatewayError::UnknownModel(model.into()))?;
        let regions = &principal.team.regions;
        let mut allowed = all
            .iter()
            .filter(|c| in_regions(&c.backend.cfg, regions))
            .peekable();
        let first_allowed =
            allowed
                .peek()
                .cloned()
                .ok_or_else(|| GatewayError::NoEligibleBackend {
                    model: model.into(),
                    reason: format!(
                        "it is served only outside your team's regions ({})",
                        regions.join(", ")
                    ),
                })?;
        // A down mark is a passive guess; with every candidate marked down, trying one beats
        // failing without a try.
        Ok(allowed
            .find(|c| c.backend.state.is_up())
            .unwrap_or(first_allowed)
            .clone())
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

    /// Every name with its candidates, sorted by name: the routing table `tollgate check` prints.
    pub fn table(&self) -> Vec<(&str, &[Candidate])> {
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
