//! The attempts of one request: sent to the backend that holds its slot, then, while nothing
//! has reached the client, to the next candidates of its plan.
//!
//! ```text
//! send ─► answer ─► 2xx/4xx: it stands
//!             └──► a failure in `routing.retry_on` (default: connect error, 429, 5xx) ─►
//!                  next candidate with a slot whose budget fits (the caller retargets)
//!                  ─► send again, up to max_attempts
//! ```
//!
//! A request is never sent twice to one backend, and after a failure that left the backend
//! possibly working on it (a timeout, a broken connection) only if the user allowed it; such
//! a resend is marked on the record and counted (`tollgate_resends_total`).
//!
//! What moving a request to another backend takes (its body for that backend, a bigger
//! budget reservation, its record's new terms) is the caller's: [`Retarget`].

use super::forward;
use super::h1::Driver;
use crate::config::RetryOn;
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
    /// The body to send it; the caller records the move. Async: a shared budget store
    /// reserves the difference in one round trip.
    fn retarget(
        &mut self,
        to: &Arc<Candidate>,
        claim: Claim,
    ) -> impl std::future::Future<Output = Option<Bytes>> + Send;
    /// Attempts made so far, the first included.
    fn attempts(&self) -> u32;
    /// The request goes to another backend after one that may have begun working on it.
    fn resent(&mut self);
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
    /// The failures that may move a request on.
    pub retry_on: RetryPolicy,
}

/// `routing.retry_on` as sets of bits, for a check per try without a list: what may move a
/// request on from a commercial backend, and from a self-hosted one.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    commercial: u8,
    self_hosted: u8,
}

impl RetryPolicy {
    pub fn new(retry_on: Option<&[RetryOn]>) -> Self {
        let mask = |on: &[RetryOn]| on.iter().fold(0u8, |m, r| m | 1 << *r as u8);
        match retry_on {
            Some(on) => Self {
                commercial: mask(on),
                self_hosted: mask(on),
            },
            // A provider may bill a generation it began before timing out or breaking; an
            // owned GPU's lost work costs nothing more.
            None => Self {
                commercial: mask(&[RetryOn::Connect, RetryOn::Busy, RetryOn::ServerError]),
                self_hosted: u8::MAX,
            },
        }
    }

    fn allows(self, why: RetryOn, from: &Candidate) -> bool {
        let mask = match from.backend.cfg.hosting {
            crate::config::Hosting::Commercial => self.commercial,
            crate::config::Hosting::SelfHosted => self.self_hosted,
        };
        mask & (1 << why as u8) != 0
    }
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
                Some(why) if more && self.retry_on.allows(why, self.candidate()) => {
                    // Boxed, here and in `move_on`: a fallback (a new budget reservation,
                    // perhaps over Redis) is rare, and inline its future would enlarge every
                    // request's.
                    match Box::pin(self.fall_back(why, req.request_id, hooks)).await {
                        Some(body) => req.body = body,
                        None => return attempt,
                    }
                }
                _ => return attempt,
            }
        }
    }

    /// Moves on after an answer found broken only once read (a 2xx that is not JSON), when a
    /// candidate is left and the policy allows it; the body for the next try.
    pub async fn move_on(
        &mut self,
        why: RetryOn,
        request_id: &HeaderValue,
        hooks: &mut impl Retarget,
    ) -> Option<Bytes> {
        let more = self.idx + 1 < self.plan.ranked.len() && hooks.attempts() < self.max_attempts;
        if !more || !self.retry_on.allows(why, self.candidate()) {
            return None;
        }
        Box::pin(self.fall_back(why, request_id, hooks)).await
    }

    /// Moves to the next candidate that has a slot and takes the request; its body, or
    /// `None` when none is left and the last answer must stand.
    async fn fall_back(
        &mut self,
        retry: RetryOn,
        request_id: &HeaderValue,
        hooks: &mut impl Retarget,
    ) -> Option<Bytes> {
        let why = retry.as_str();
        let from = self.candidate().backend.cfg.name.clone();
        let mut tried = vec![(from.clone(), why)];
        let mut next = self.idx + 1;
        while let Some((i, claim)) = claim_from(&self.plan, next, &mut tried) {
            let to = self.plan.ranked[i].candidate.clone();
            if retry.after_send() && to.backend.cfg.name == from {
                // Another model on the backend that may be working on it: never twice.
                drop(claim);
                tried.push((from.clone(), "same_backend"));
                next = i + 1;
                continue;
            }
            if let Some(body) = hooks.retarget(&to, claim).await {
                self.tried.append(&mut tried);
                metrics::counter!(m::ROUTE_FALLBACKS_TOTAL, "from" => from.clone(), "reason" => why)
                    .increment(1);
                if retry.after_send() {
                    hooks.resent();
                    metrics::counter!(m::RESENDS_TOTAL, "from" => from.clone(), "reason" => why)
                        .increment(1);
                }
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

/// The kind of failure an attempt was, if it was one another backend might do better on.
fn retryable(attempt: &Attempt) -> Option<RetryOn> {
    match attempt {
        Ok((resp, _)) if resp.status() == http::StatusCode::TOO_MANY_REQUESTS => {
            Some(RetryOn::Busy)
        }
        Ok((resp, _)) if resp.status().is_server_error() => Some(RetryOn::ServerError),
        Ok(_) => None,
        Err(GatewayError::UpstreamConnect { .. }) => Some(RetryOn::Connect),
        Err(GatewayError::UpstreamTimeout { .. }) => Some(RetryOn::Timeout),
        Err(_) => Some(RetryOn::Failed),
    }
}
