//! The send phase: one request's trip to its backends and back, up to a metered response.
//!
//! ```text
//! tries (upstream::exchange) ─► stream: pass through, metered on the way
//!                           └─► JSON: read whole ─► not JSON? next backend, as retry_on allows
//!                                              └─► metered, settled, recorded ─► response
//! ```
//!
//! Moving to a fallback backend changes what the earlier phases decided: a bigger
//! reservation if the fallback is dearer (a budget that cannot hold it ends the fallbacks),
//! the body shaped for it, and its terms on the record ([`Fallback`]).

use crate::answer;
use crate::api::openai;
use crate::body::GatewayBody;
use crate::budget::admit::{self, Admission};
use crate::budget::BudgetBook;
use crate::config::RetryOn;
use crate::error::GatewayError;
use crate::live::LiveState;
use crate::meter::Status;
use crate::record::Completion;
use crate::route::{Candidate, Claim};
use crate::upstream::exchange::{self, Attempts, Retarget};
use crate::upstream::forward::{self, ReadError};
use http::header::CONTENT_TYPE;
use http::Response;
use std::sync::Arc;
use std::time::Duration;

/// What the phases before sending decided.
pub struct Prepared {
    pub request: openai::ClientRequest,
    pub admission: Option<Admission>,
    /// The body for the current candidate, and whether usage must be hidden from the client.
    pub body: bytes::Bytes,
    pub strip_usage: bool,
}

/// Moving to a fallback: a bigger reservation if it is dearer, its body, its terms on record.
pub struct Fallback<'a> {
    pub record: &'a mut Completion,
    pub prepared: &'a mut Prepared,
    pub book: &'a BudgetBook,
}

impl Retarget for Fallback<'_> {
    async fn retarget(&mut self, to: &Arc<Candidate>, claim: Claim) -> Option<bytes::Bytes> {
        let Fallback {
            record,
            prepared,
            book,
        } = self;
        if let Some(admission) = prepared.admission.as_mut() {
            let principal = record.ctx_mut().principal.clone();
            match admit::grow(book, &principal, admission, to.price.as_deref()).await {
                Ok(Some(more)) => {
                    if let Some(held) = record.reservation_mut() {
                        held.absorb(more);
                    }
                }
                Ok(None) => {}
                Err(_) => return None,
            }
        }
        // A request the fallback's protocol cannot carry ends the fallbacks.
        let (body, strip_usage) = prepared.request.shape.for_backend(to).ok()?;
        record.send_to(to, claim, body.len() as u64);
        prepared.strip_usage = strip_usage;
        Some(body)
    }

    fn attempts(&self) -> u32 {
        self.record.ctx().map_or(u32::MAX, |c| c.attempts)
    }

    fn resent(&mut self) {
        self.record.ctx_mut().resent += 1;
    }
}

/// One request's trip to its backends and back, from sending to a metered response.
pub struct Exchange {
    pub prepared: Prepared,
    pub attempts: Attempts,
    pub record: Completion,
    pub budgets: Arc<BudgetBook>,
    pub live: Arc<LiveState>,
    pub headers: http::HeaderMap,
    pub path: String,
}

impl Exchange {
    pub async fn run(self) -> Result<Response<GatewayBody>, GatewayError> {
        let Exchange {
            mut prepared,
            mut attempts,
            mut record,
            budgets,
            live,
            mut headers,
            path,
        } = self;
        let (request_id, started) = {
            let ctx = record.ctx_mut();
            (ctx.id.0.clone(), ctx.started)
        };
        let server = &live.config.server;
        let deadline = tokio::time::Instant::from_std(started + server.request_timeout);
        loop {
            // Kept only while another backend may be tried.
            let headers = if attempts.idx + 1 < attempts.plan.ranked.len() {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            let send = exchange::Request {
                path: &path,
                headers,
                body: prepared.body.clone(),
                request_id: &request_id,
                timeout: server.request_timeout,
            };
            let mut waited = Duration::ZERO;
            let mut fallback = Fallback {
                record: &mut record,
                prepared: &mut prepared,
                book: &budgets,
            };
            let attempt = attempts.send(send, &mut fallback, &mut waited).await;
            record.ctx_mut().upstream_wait += waited;
            let candidate = attempts.candidate().clone();
            let (upstream, driver) = match attempt {
                Ok(answer) => answer,
                Err(e) => {
                    // Recorded before the error goes out, like any other ending.
                    let _ = record
                        .finish(answer::unanswered(
                            Status::UpstreamError,
                            e.status().as_u16(),
                        ))
                        .await;
                    return Err(e);
                }
            };
            let (mut parts, incoming) = upstream.into_parts();
            let sse = parts
                .headers
                .get(CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            answer::head(
                &mut parts.headers,
                &candidate,
                crate::route::explain::header(&attempts.plan, attempts.idx, &attempts.tried),
                prepared.admission.as_ref().map(|a| &a.remaining),
            );
            if sse && parts.status.is_success() {
                let shaped = answer::Stream {
                    strip_usage: prepared.strip_usage,
                    client_usage: prepared.request.shape.client_usage,
                    output_limit: prepared.admission.and_then(|a| a.output_limit),
                };
                let status = parts.status.as_u16();
                let body = answer::stream(incoming, driver, status, shaped, record, &candidate);
                return Ok(Response::from_parts(parts, body));
            }
            let reading = crate::clock::now();
            let read =
                forward::read_answer(incoming, driver, server.max_response_bytes, deadline).await;
            record.ctx_mut().upstream_wait += reading.elapsed();
            let client = record.ctx_mut().client_protocol;
            let read = answer::from_backend(read, &candidate, client, parts.status.as_u16());
            let read = answer::parse(read, parts.status.is_success());
            // A success that is not JSON: nothing reached the client, so another backend may
            // answer, as the retry policy allows.
            if matches!(read, Err(ReadError::NotJson)) {
                let mut fallback = Fallback {
                    record: &mut record,
                    prepared: &mut prepared,
                    book: &budgets,
                };
                if let Some(body) = attempts
                    .move_on(RetryOn::Failed, &request_id, &mut fallback)
                    .await
                {
                    answer::broken_answer(&candidate);
                    prepared.body = body;
                    continue;
                }
            }
            let body = answer::whole(read, &mut parts, record, &candidate).await?;
            return Ok(Response::from_parts(parts, body));
        }
    }
}
