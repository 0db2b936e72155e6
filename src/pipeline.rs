//! The `Gateway` service: one request through the phases, in order, on one [`RequestCtx`].
//!
//! ```text
//! route path ─ authenticate ─► ctx, record guard
//!   read (api) ─ tag (tags) ─ plan (route) ─ claim a slot (route) ─ admit (budget)
//!   ─ send, fall back (send, upstream) ─ answer: stream pass-through, or read, settle (record) ─ respond
//! ```
//!
//! The phases live in the modules of their concerns; this file only calls them in order and
//! hands each what it needs. Two departures from DESIGN.md's path, on purpose: tags come
//! after the body is read (the body's `metadata` carries request tags), and admission comes
//! after routing (a budget reserves the worst case at the chosen backend's prices).
//!
//! However a request ends, the record guard ([`Completion`]) opened right after
//! authentication writes its ledger record: refused, answered, broken, or abandoned.

use crate::api::endpoint::Route;
use crate::api::{count_tokens, models, openai};
use crate::body::GatewayBody;
use crate::budget::admit;
use crate::budget::BudgetBook;
use crate::config::OnDisconnect;
use crate::ctx::{RequestCtx, RequestId};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::live::{Live, LiveState};
use crate::metrics as m;
use crate::record::{Completion, Recorder};
use crate::route::claim::{self as routing, Claimed};
use crate::route::{Prompt, RouteRequest, Router};
use crate::send::{Exchange, Prepared};
use crate::server::limits::{self, KeyShares};
use crate::server::request_id::next_id;
use crate::tags;
use crate::tasks::Tasks;
use crate::upstream::exchange::{self, Attempts};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The gateway's request service; one pointer to what every request shares, so that a
/// request clones one `Arc`, not one per part.
#[derive(Clone)]
pub struct Gateway(Arc<Shared>);

struct Shared {
    live: Live,
    budgets: Arc<BudgetBook>,
    recorder: Arc<Recorder>,
    shares: Arc<KeyShares>,
}

impl Gateway {
    pub fn new(live: Live, ledger: Arc<Ledger>, budgets: Arc<BudgetBook>, tasks: Tasks) -> Self {
        let per_key = live.load().config.server.max_in_flight_per_key;
        Self(Arc::new(Shared {
            shares: KeyShares::new(per_key),
            live,
            budgets,
            recorder: Arc::new(Recorder { ledger, tasks }),
        }))
    }
}

// === impl Gateway ===

impl tower::Service<Request<Incoming>> for Gateway {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        // One snapshot per request: a reload mid-request cannot mix two configs.
        let live = self.0.live.load_full();
        let gw = self.clone();
        let protocol = crate::api::endpoint::protocol_of_path(req.uri().path());
        Box::pin(async move {
            let started = crate::clock::now();
            let id = req
                .extensions()
                .get::<RequestId>()
                .cloned()
                .unwrap_or_else(next_id);
            Ok(match dispatch(&gw, &live, req, id.clone(), started).await {
                Ok(resp) => resp,
                Err(e) => {
                    if e.status().is_server_error() {
                        tracing::warn!(request_id = id.as_str(), kind = e.kind(), error = %e, "request failed");
                    } else {
                        tracing::debug!(request_id = id.as_str(), kind = e.kind(), error = %e, "request refused");
                    }
                    metrics::counter!(m::REJECTED_TOTAL, "kind" => e.kind()).increment(1);
                    GatewayBody::error_for(protocol, &e)
                }
            })
        })
    }
}

async fn dispatch(
    gw: &Gateway,
    live: &Arc<LiveState>,
    req: Request<Incoming>,
    id: RequestId,
    started: Instant,
) -> Result<Response<GatewayBody>, GatewayError> {
    let server = &live.config.server;
    limits::check_headers(req.headers(), server.max_header_bytes, server.max_headers)?;
    let (endpoint, client_protocol) = match Route::of(req.method(), req.uri().path())? {
        Route::Proxied(endpoint, protocol) => (endpoint, protocol),
        Route::Models => {
            // Answered here, from the config.
            let principal = live.keys.authenticate(req.headers())?;
            return Ok(json_response(models::list(&live.router, &principal)));
        }
        Route::CountTokens => return count_tokens(live, req, &id).await,
    };
    let (parts, body) = req.into_parts();
    let principal = live.keys.authenticate(&parts.headers)?;
    let share = gw.0.shares.enter(&principal.key_id);
    // The context first, inside the guard that records it whatever happens next.
    let mut ctx = RequestCtx::new(id, started, endpoint, principal);
    ctx.client_protocol = client_protocol;
    let mut record = Completion::open(ctx, &gw.0.recorder);
    let prepared = match share {
        Ok(share) => prepare(gw, live, &mut record, &parts, body)
            .await
            .map(|p| (p, share)),
        Err(e) => Err(e),
    };
    let exchange = match prepared {
        Ok(((prepared, attempts), share)) => (
            Exchange {
                prepared,
                attempts,
                record,
                budgets: gw.0.budgets.clone(),
                live: live.clone(),
                headers: crate::upstream::headers::from_client(&parts),
                path: parts
                    .uri
                    .path_and_query()
                    .map_or(endpoint.path(), |p| p.as_str())
                    .to_string(),
            },
            share,
        ),
        Err(e) => {
            // Refused before any backend answered: recorded at no cost, not metered.
            record.reject(&e);
            return Err(e);
        }
    };
    let (exchange, share) = exchange;
    // Commercial providers bill a request the client abandoned: run the exchange as a task of
    // its own so it reaches the provider's usage even if this future is dropped. Any backend
    // it may fall back to counts.
    let drain = exchange.attempts.plan.ranked[exchange.attempts.idx..]
        .iter()
        .any(|r| r.candidate.backend.cfg.on_disconnect == OnDisconnect::Drain);
    // Past shutdown's grace period, an answer still awaited ends as a 503 (a stream that has
    // begun ends in its body instead), recorded as such.
    let tasks = &gw.0.recorder.tasks;
    let mut resp = if drain {
        tasks
            .spawn(tasks.until_ended(exchange.run()))
            .await
            .unwrap_or(Some(Err(GatewayError::Internal)))
    } else {
        tasks.until_ended(exchange.run()).await
    }
    .unwrap_or(Err(GatewayError::ShuttingDown))?;
    resp.body_mut().hold_share(share);
    Ok(resp)
}

/// The phases before anything is sent: read, tag, plan, claim, admit.
async fn prepare(
    gw: &Gateway,
    live: &LiveState,
    record: &mut Completion,
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<(Prepared, Attempts), GatewayError> {
    let server = &live.config.server;
    let ctx = record.ctx_mut();
    let mut request = openai::read_request(ctx, &parts.headers, body, server).await?;

    ctx.tags = tags::collect(
        &ctx.principal.team,
        &parts.headers,
        request.metadata.take().as_ref(),
        request.user.take().as_deref(),
    )?;
    ctx.metric_tags = m::TagLabels::of(&live.config.metrics, &ctx.tags);

    let team = ctx.principal.team.clone();
    let route_request = RouteRequest {
        model: &request.model,
        endpoint: ctx.endpoint,
        regions: &team.regions,
        features: request.features,
        max_output_tokens: request.max_output_tokens,
        prompt: Prompt::from_bytes(ctx.body.len()),
        request_bytes: ctx.body.len() as u64,
    };
    let (plan, counts) =
        routing::plan(&live.router, &route_request, ctx.endpoint, &ctx.body).await?;
    if plan.ranked.is_empty() {
        return Err(Router::refusal(&request.model, &team.name, &plan));
    }
    // A request that could not be recorded must not be served.
    if !gw.0.recorder.ledger.is_healthy() {
        return Err(GatewayError::LedgerUnavailable);
    }
    let deadline = tokio::time::Instant::from_std(ctx.started + server.request_timeout);
    let Claimed { idx, claim, tried } = routing::claim(&plan, &request.model, deadline).await?;
    let candidate = plan.ranked[idx].candidate.clone();

    let admission = match admit::for_request(
        &gw.0.budgets,
        record.ctx_mut(),
        admit::OutputAsk {
            per_choice: request.max_output_tokens,
            choices: request.choices,
        },
        &candidate,
        &counts,
    )
    .await?
    {
        Some((reservation, admission)) => {
            record.hold(reservation, gw.0.budgets.clone());
            if request.max_output_tokens.is_none() && admission.per_choice > 0 {
                request.shape.cap_output(admission.per_choice);
            }
            Some(admission)
        }
        None => None,
    };

    let (body, strip_usage) = request.shape.for_backend(&candidate)?;
    record.send_to(&candidate, claim, body.len() as u64);
    let attempts = Attempts {
        plan,
        idx,
        tried,
        max_attempts: live.config.routing.max_attempts,
        retry_on: exchange::RetryPolicy::new(live.config.routing.retry_on.as_deref()),
    };
    Ok((
        Prepared {
            request,
            admission,
            body,
            strip_usage,
        },
        attempts,
    ))
}

fn json_response(body: bytes::Bytes) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `POST /v1/messages/count_tokens`, counted where it is exact (see [`count_tokens::count`]),
/// with nothing billed.
async fn count_tokens(
    live: &LiveState,
    req: Request<Incoming>,
    id: &RequestId,
) -> Result<Response<GatewayBody>, GatewayError> {
    let (parts, body) = req.into_parts();
    let principal = live.keys.authenticate(&parts.headers)?;
    let server = &live.config.server;
    let read = limits::read_body(body, None, server.max_body_bytes);
    let body = tokio::time::timeout(server.body_read_timeout, read)
        .await
        .map_err(|_| GatewayError::BodyTimeout {
            after: server.body_read_timeout,
        })??;
    let n = count_tokens::count(live, &principal, &parts, &body, &id.0).await?;
    let mut resp = json_response(bytes::Bytes::from(
        serde_json::json!({ "input_tokens": n.input_tokens }).to_string(),
    ));
    resp.headers_mut().insert(
        "x-tollgate-token-source",
        HeaderValue::from_static(n.source.as_str()),
    );
    Ok(resp)
}
