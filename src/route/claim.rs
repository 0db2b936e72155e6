//! The routing phase of a request: plan its candidates (counting the prompt exactly when its
//! byte bound alone would rule a model out), then take a slot on the best one that has one,
//! or wait at the gateway for the cheapest.

use super::{Claim, Plan, Prompt, RouteRequest, Router};
use crate::api::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::tokens::Counter;
use bytes::Bytes;
use std::sync::Arc;

/// Prompt counts made while planning, by the counter that made them: admission reuses them.
pub type ExactCounts = Vec<(Counter, u64)>;

/// Where the request goes first, and what was passed over to get there.
#[derive(Debug)]
pub struct Claimed {
    /// The candidate of the plan that holds the slot.
    pub idx: usize,
    pub claim: Claim,
    /// Candidates passed over before it, and why (for `x-tollgate-route`).
    pub tried: Vec<(Arc<str>, &'static str)>,
}

/// Plans a request. The byte count is a free upper bound on the prompt; when it puts a
/// prompt over some model's context window, the prompt is counted with those models'
/// tokenizers and planned again, so a prompt that fits is not sent to a bigger, dearer model.
pub async fn plan(
    router: &Router,
    request: &RouteRequest<'_>,
    endpoint: Endpoint,
    body: &Bytes,
) -> Result<(Plan, ExactCounts), GatewayError> {
    let mut plan = router.plan(request)?;
    let mut exact = ExactCounts::new();
    if !plan.needs_count.is_empty() {
        for counter in std::mem::take(&mut plan.needs_count) {
            exact.push((
                counter,
                crate::tokens::count_prompt(counter, endpoint, body).await,
            ));
        }
        plan = router.plan(&RouteRequest {
            prompt: Prompt {
                exact: &exact,
                ..request.prompt
            },
            ..*request
        })?;
    }
    Ok((plan, exact))
}

/// Takes a slot on the first ranked candidate that has one; when all filled up since the plan
/// was made, waits at the gateway for one on the cheapest until `deadline`.
pub async fn claim(
    plan: &Plan,
    model: &str,
    deadline: tokio::time::Instant,
) -> Result<Claimed, GatewayError> {
    let mut tried = Vec::new();
    if let Some((idx, claim)) = claim_from(plan, 0, &mut tried) {
        return Ok(Claimed { idx, claim, tried });
    }
    match plan.ranked[0].candidate.claim_waiting(deadline).await {
        Some(claim) => Ok(Claimed {
            idx: 0,
            claim,
            tried: Vec::new(),
        }),
        None => Err(at_capacity(model, &tried)),
    }
}

/// Claims a slot on the first ranked candidate from `start` that still has one; those that
/// filled up since the plan was made are noted in `tried`.
pub fn claim_from(
    plan: &Plan,
    start: usize,
    tried: &mut Vec<(Arc<str>, &'static str)>,
) -> Option<(usize, Claim)> {
    for (i, r) in plan.ranked.iter().enumerate().skip(start) {
        match r.candidate.claim() {
            Some(claim) => return Some((i, claim)),
            None => tried.push((r.candidate.backend.cfg.name.clone(), "capacity")),
        }
    }
    None
}

fn at_capacity(model: &str, tried: &[(Arc<str>, &'static str)]) -> GatewayError {
    let names: Vec<&str> = tried.iter().map(|(n, _)| &**n).collect();
    GatewayError::NoEligibleBackend {
        model: model.into(),
        reason: format!(
            "every backend that could serve it is at capacity ({})",
            names.join(", ")
        ),
        retry_after: Some(std::time::Duration::from_secs(1)),
    }
}
