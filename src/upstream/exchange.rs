//! The attempts of one request: sent to the backend that holds its slot, then, while nothing
//! has reached the client, to the next candidates of its plan.
//!
//! ```text
//! send ─► answer ─► 2xx/4xx: it stands
//!             └──► connect error, timeout, 429, 5xx ─► next candidate with a slot whose
//!                  budget fits (the caller retargets) ─► send again, up to max_attempts
//! ```
//!
//! What moving a request to another backend takes (its body for that backend, a bigger
//! budget reservation, its record's new terms) is the caller's: [`Retarget`].

use super::forward;
use super::h1::Driver;
use crate::error::GatewayError;
use crate::metrics as m;
use crate::route::claim::claim_from;
use crate::route::{Candidate, Claim, Plan};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;

/// A response that may still be handed to another backend: nothing was sent to the client.
pub type Attempt = Result<(Response<Incoming>, Option<Driver>), GatewayError>;

/// Moves a request to another candidate; `None` when that candidate cannot take it (its
/// worst case does not fit the budgets), and the slot it was given is then released.
pub trait Retarget {
    /// The body to send it; the caller records the move.
    fn retarget(&mut self, to: &Arc<Candidate>, claim: Claim) -> Option<Bytes>;
    /// Attempts made so far, the first included.
    fn attempts(&self) -> u32;
}

/// Where a request is in its plan.
#[derive(Debug)]
pub struct Attempts {
    pub plan: Plan,
    /// The candidate being tried.
    pub idx: usize,
    /// Candidates passed over before it, and why (for `x-tollgate-route`).
    pub tried: Vec<(Arc<str>, &'static str)>,
    pub max_attempts: u32,
}

/// What to send, the same for every attempt but the body.
#[derive(Debug)]
pub struct Request<'a> {
    pub path: &'a str,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_id: &'a HeaderValue,
    pub timeout: Duration,
}

impl Attempts {
    pub fn candidate(&self) -> &Arc<Candidate> {
        &self.plan.ranked[self.idx].candidate
    }

    /// Sends to the current candidate, then to fallbacks while the answer is a failure no
    /// client has seen. Adds the time spent waiting on upstreams to `waited`.
    pub async fn send(
        &mut self,
        mut req: Request<'_>,
        hooks: &mut impl Retarget,
        waited: &mut Duration,
    ) -> Attempt {
        loop {
            let more =
                self.idx + 1 < self.plan.ranked.len() && hooks.attempts() < self.max_attempts;
            // The headers are needed again only if another backend may be tried.
            let headers = if more {
                req.headers.clone()
            } else {
                std::mem::take(&mut req.headers)
            };
            let asked = crate::clock::now();
            let attempt = forward::send(
                self.candidate(),
                req.path,
                headers,
                req.body.clone(),
                req.request_id,
                req.timeout,
            )
            .await;
            *waited += asked.elapsed();
            match retryable(&attempt) {
                Some(why) if more => match self.fall_back(why, req.request_id, hooks) {
                    Some(body) => req.body = body,
                    None => return attempt,
                },
                _ => return attempt,
            }
        }
    }

    /// Moves to the next candidate that has a slot and takes the request; its body, or
    /// `None` when none is left and the last answer must stand.
    fn fall_back(
        &mut self,
        why: &'static str,
        request_id: &HeaderValue,
        hooks: &mut impl Retarget,
    ) -> Option<Bytes> {
        let from = self.candidate().backend.cfg.name.clone();
        let mut tried = vec![(from.clone(), why)];
        let mut next = self.idx + 1;
        while let Some((i, claim)) = claim_from(&self.plan, next, &mut tried) {
            let to = self.plan.ranked[i].candidate.clone();
            if let Some(body) = hooks.retarget(&to, claim) {
                self.tried.append(&mut tried);
                metrics::counter!(m::ROUTE_FALLBACKS_TOTAL, "from" => from.clone(), "reason" => why)
                    .increment(1);
                tracing::info!(
                    request_id = request_id.to_str().unwrap_or(""),
                    from = &*from,
                    to = &*to.backend.cfg.name,
                    reason = why,
                    "falling back"
                );
                self.idx = i;
                return Some(body);
            }
            tried.push((to.backend.cfg.name.clone(), "budget"));
            next = i + 1;
        }
        None
    }
}

/// Why an attempt should go to the next candidate, if it should.
fn retryable(attempt: &Attempt) -> Option<&'static str> {
    match attempt {
        Ok((resp, _)) if resp.status() == http::StatusCode::TOO_MANY_REQUESTS => Some("429"),
        Ok((resp, _)) if resp.status().is_server_error() => Some("5xx"),
        Ok(_) => None,
        Err(GatewayError::UpstreamConnect { .. }) => Some("connect"),
        Err(GatewayError::UpstreamTimeout { .. }) => Some("timeout"),
        Err(_) => Some("failed"),
    }
}
