//! The `Gateway` service: runs one request through the phases, in the order of DESIGN.md,
//! on one [`RequestCtx`], and turns any [`GatewayError`] into an OpenAI-style response.
//!
//! ```text
//! route path ─ authenticate ─ read body (limit) ─ parse ─ route ─ forward ─ stream back
//! ```

use crate::api::openai::BodyEdits;
use crate::api::{models, openai};
use crate::body::GatewayBody;
use crate::budget::{BudgetBook, Demand, Remaining, Reservation};
use crate::config::OnDisconnect;
use crate::ctx::{Endpoint, RequestCtx, RequestId};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::live::{Live, LiveState};
use crate::meter::{self, format_usd, sse::SseObserver};
use crate::metrics as m;
use crate::record::{self, Completion, Generated, Outcome, Settled, Status};
use crate::route::Candidate;
use crate::server::limits::read_body;
use crate::server::request_id::next_id;
use crate::tags;
use crate::upstream::forward;
use crate::upstream::headers::strip_hop_by_hop;
use crate::upstream::stream::UpstreamBody;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

pub static X_TOLLGATE_BACKEND: HeaderName = HeaderName::from_static("x-tollgate-backend");
pub static X_TOLLGATE_MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
pub static X_TOLLGATE_PROMPT_TOKENS: HeaderName =
    HeaderName::from_static("x-tollgate-prompt-tokens");
pub static X_TOLLGATE_COMPLETION_TOKENS: HeaderName =
    HeaderName::from_static("x-tollgate-completion-tokens");
pub static X_TOLLGATE_TOKEN_SOURCE: HeaderName = HeaderName::from_static("x-tollgate-token-source");
pub static X_TOLLGATE_COST_USD: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");
pub static X_TOLLGATE_BUDGET_REMAINING_USD: HeaderName =
    HeaderName::from_static("x-tollgate-budget-remaining-usd");
pub static X_TOLLGATE_BUDGET_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-tollgate-budget-remaining-tokens");

#[derive(Clone)]
pub struct Gateway {
    live: Live,
    ledger: Arc<Ledger>,
    budgets: Arc<BudgetBook>,
}

impl Gateway {
    pub fn new(live: Live, ledger: Arc<Ledger>, budgets: Arc<BudgetBook>) -> Self {
        Self {
            live,
            ledger,
            budgets,
        }
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
        let live = self.live.load_full();
        let gw = self.clone();
        Box::pin(async move {
            let started = Instant::now();
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
                    e.into_response()
                }
            })
        })
    }
}

async fn dispatch(
    gw: &Gateway,
    live: &LiveState,
    req: Request<Incoming>,
    id: RequestId,
    started: Instant,
) -> Result<Response<GatewayBody>, GatewayError> {
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
        (&Method::GET, "/v1/models") => {
            let principal = live.keys.authenticate(req.headers())?;
            let mut resp = Response::new(GatewayBody::full(models::list(&live.router, &principal)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(resp);
        }
        (
            method,
            path @ ("/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models"),
        ) => {
            return Err(GatewayError::MethodNotAllowed {
                method: method.clone(),
                path: path.to_string(),
            })
        }
        (_, path) => {
            return Err(GatewayError::UnknownPath(
                crate::error::prefix_chars(path, 200).to_string(),
            ))
        }
    };
    proxy(gw, live, endpoint, req, id, started).await
}

async fn proxy(
    gw: &Gateway,
    live: &LiveState,
    endpoint: Endpoint,
    req: Request<Incoming>,
    id: RequestId,
    started: Instant,
) -> Result<Response<GatewayBody>, GatewayError> {
    let (parts, body) = req.into_parts();
    let principal = live.keys.authenticate(&parts.headers)?;
    let mut seen = Seen::default();
    let exchange = match prepare(
        gw, live, endpoint, parts, body, &id, started, &principal, &mut seen,
    )
    .await
    {
        Ok(exchange) => exchange,
        Err(e) => {
            // Refused before any backend was asked: recorded (at no cost), not metered.
            gw.ledger.submit(
                record::rejected(
                    &id, started, &principal, endpoint, seen.model, &seen.tags, &e,
                ),
                None,
            );
            return Err(e);
        }
    };
    match exchange.candidate.backend.cfg.on_disconnect {
        // Commercial providers bill a request the client abandoned: run the exchange on its
        // own task so it reaches the provider's usage even if this future is dropped.
        OnDisconnect::Drain => tokio::spawn(exchange.run())
            .await
            .unwrap_or(Err(GatewayError::Internal)),
        OnDisconnect::Cancel => exchange.run().await,
    }
}

/// What was learned of a request before it was refused, for its ledger record.
#[derive(Default)]
struct Seen {
    model: Option<Arc<str>>,
    tags: tags::Tags,
}

/// Reads, checks, tags and routes a request, up to the moment it can be sent.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    gw: &Gateway,
    live: &LiveState,
    endpoint: Endpoint,
    parts: http::request::Parts,
    body: Incoming,
    id: &RequestId,
    started: Instant,
    principal: &Arc<crate::auth::Principal>,
    seen: &mut Seen,
) -> Result<Exchange, GatewayError> {
    let server = &live.config.server;
    let content_length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let body = read_body(body, content_length, server.max_body_bytes).await?;
    let summary = openai::parse(&body)?;
    let requested_model: Arc<str> = Arc::from(&*summary.model);
    seen.model = Some(requested_model.clone());
    let tags = tags::collect(
        &principal.team,
        &parts.headers,
        summary.metadata.as_ref(),
        summary.user.as_deref(),
    )?;
    // Kept in `seen` until the request is sure to be sent: a refusal records them.
    seen.tags = tags;

    let candidate = live.router.resolve(&summary.model, principal)?;
    // A request that could not be recorded must not be served.
    if !gw.ledger.is_healthy() {
        return Err(GatewayError::LedgerUnavailable);
    }
    let (budget, remaining, output_limit) = if principal.team.budgets.is_empty() {
        (None, None, None)
    } else {
        let (reservation, remaining, output) =
            admit(gw, principal, &candidate, &summary, &body, endpoint).await?;
        let limit = output_limit(&remaining, output, candidate.price.as_deref());
        (
            Some((reservation, gw.budgets.clone())),
            Some(remaining),
            limit,
        )
    };
    let backend = &candidate.backend.cfg;
    let mut edits = BodyEdits::default();
    if *candidate.model != *summary.model {
        edits.set_model(&summary, &candidate.model);
    }
    let ask_usage = summary.stream
        && !summary.include_usage
        && backend.stream_usage
        && endpoint != Endpoint::Embeddings;
    if ask_usage {
        edits.request_stream_usage(&body, &summary);
    }
    let upstream_body = edits.apply(&body);

    let ctx = RequestCtx {
        id: id.clone(),
        started,
        endpoint,
        principal: principal.clone(),
        tags: std::mem::take(&mut seen.tags),
        requested_model,
        stream: summary.stream,
        body: body.clone(),
        counter: candidate.counter,
        backend: Some(backend.name.clone()),
        served_model: Some(candidate.model.clone()),
        upstream_request_bytes: upstream_body.len() as u64,
        attempts: 1,
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or(endpoint.path(), |p| p.as_str())
        .to_string();
    let completion = Completion::new(
        ctx,
        candidate.price.clone(),
        backend.egress_usd_per_gb,
        gw.ledger.clone(),
        budget,
        candidate.backend.state.enter(),
    );
    Ok(Exchange {
        candidate,
        path,
        headers: parts.headers,
        body: upstream_body,
        completion,
        request_timeout: server.request_timeout,
        max_response_bytes: server.max_response_bytes,
        strip_usage: ask_usage,
        remaining,
        output_limit,
    })
}

/// Output tokens reserved for a request that sets no `max_tokens` on a model with no known cap.
pub const DEFAULT_OUTPUT_RESERVE: u64 = 4096;

/// Generated tokens a stream may produce before it would run past a hard budget: what it
/// reserved, plus the room left after its reservation (in tokens, or dollars at the output
/// price). A stream whose server ignores its cap is ended there.
fn output_limit(
    room: &Remaining,
    reserved: u64,
    price: Option<&crate::config::prices::Price>,
) -> Option<u64> {
    let by_tokens = room.tokens.map(|t| reserved + t.max(0) as u64);
    let by_usd = match (room.nusd, price) {
        (Some(n), Some(p)) if p.output > 0.0 => {
            Some(reserved + (n.max(0) as f64 / (p.output * 1e9)) as u64)
        }
        _ => None,
    };
    [by_tokens, by_usd].into_iter().flatten().min()
}

/// A request whose rough worst case is over 1/NEAR_LIMIT_FRACTION of the room left in a budget
/// is counted exactly before it is admitted.
const NEAR_LIMIT_FRACTION: i64 = 16;

/// Reserves the request's worst case against its team's budgets: prompt tokens plus the most
/// it may generate, at the routed model's prices. The prompt is first taken at its free upper
/// bound; only when that does not fit (near a limit) is it counted exactly, and tried again.
async fn admit(
    gw: &Gateway,
    principal: &crate::auth::Principal,
    candidate: &Candidate,
    summary: &openai::RequestSummary<'_>,
    body: &bytes::Bytes,
    endpoint: Endpoint,
) -> Result<(Reservation, Remaining, u64), GatewayError> {
    let output = match endpoint {
        Endpoint::Embeddings => 0,
        _ => summary
            .max_output_tokens
            .or(candidate.max_output_tokens)
            .unwrap_or(DEFAULT_OUTPUT_RESERVE),
    };
    let demand = |prompt: u64| {
        let nusd = candidate.price.as_deref().map_or(0.0, |p| {
            let p = p.for_prompt(prompt);
            prompt as f64 * p.input + output as f64 * p.output
        });
        Demand {
            nusd: (nusd * 1e9).ceil() as i64,
            tokens: (prompt + output) as i64,
        }
    };
    let team = &principal.team;
    let estimate = crate::tokens::estimate_prompt_tokens(body.len());
    // Far from every limit, the free estimate is good enough; near one, its slack would refuse
    // requests that fit (and hold room others could use), so the prompt is counted exactly.
    let rough = demand(estimate);
    let room = gw.budgets.room(team, &principal.key_id);
    let far = room
        .nusd
        .is_none_or(|r| rough.nusd <= r / NEAR_LIMIT_FRACTION)
        && room
            .tokens
            .is_none_or(|r| rough.tokens <= r / NEAR_LIMIT_FRACTION);
    if far {
        if let Ok((r, room)) = gw.budgets.admit(team, &principal.key_id, rough) {
            return Ok((r, room, output));
        }
    }
    let counter = candidate.counter;
    let owned = body.clone();
    let exact = crate::tokens::Tokenizers::shared()
        .off_runtime(body.len(), move |tok| {
            crate::tokens::ChatPrompt::parse(endpoint, &owned)
                .map(|p| counter.scale(crate::tokens::count_chat_prompt(tok, counter.encoding, &p)))
                .unwrap_or(estimate)
        })
        .await;
    gw.budgets.admit(team, &principal.key_id, demand(exact)).map(|(r, room)| (r, room, output)).map_err(|over| {
        metrics::counter!(m::BUDGET_REJECTIONS_TOTAL, "team" => over.team.clone(), "window" => over.window.as_str())
            .increment(1);
        GatewayError::OverBudget(Box::new(over))
    })
}

/// One request's trip to its backend and back, from sending to a metered response.
struct Exchange {
    candidate: Candidate,
    path: String,
    headers: http::HeaderMap,
    body: bytes::Bytes,
    completion: Completion,
    request_timeout: std::time::Duration,
    max_response_bytes: u64,
    /// The gateway asked for stream usage the client did not: hide it from the client.
    strip_usage: bool,
    /// Room left in the team's tightest budgets, counting this request's reservation.
    remaining: Option<Remaining>,
    output_limit: Option<u64>,
}

impl Exchange {
    async fn run(self) -> Result<Response<GatewayBody>, GatewayError> {
        let Exchange {
            candidate,
            path,
            headers,
            body,
            completion,
            request_timeout,
            max_response_bytes,
            strip_usage,
            remaining,
            output_limit,
        } = self;
        let (request_id, started) = {
            let ctx = completion.ctx().expect("not settled yet");
            (ctx.id.0.clone(), ctx.started)
        };
        let upstream = match forward::send(
            &candidate,
            &path,
            headers,
            body,
            &request_id,
            request_timeout,
        )
        .await
        {
            Ok(resp) => resp,
            Err(e) => {
                // Recorded before the error goes out, like any other ending.
                let _ = completion
                    .finish(failure(Status::UpstreamError, e.status().as_u16()))
                    .await;
                return Err(e);
            }
        };

        let (upstream, mut driver) = upstream;
        let (mut parts, incoming) = upstream.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(
            X_TOLLGATE_BACKEND.clone(),
            candidate.backend.name_header.clone(),
        );
        parts
            .headers
            .insert(X_TOLLGATE_MODEL.clone(), candidate.model_header.clone());
        if let Some(r) = remaining {
            set_budget_headers(&mut parts.headers, &r);
        }
        let sse = parts
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let status = parts.status.as_u16();

        if sse && parts.status.is_success() {
            let cfg = &candidate.backend.cfg;
            let body = UpstreamBody::new(
                incoming,
                cfg.stream_idle_timeout,
                SseObserver::new(strip_usage),
                completion,
                cfg.on_disconnect,
                status,
            )
            .with_output_limit(output_limit)
            .with_driver(driver);
            return Ok(Response::from_parts(parts, GatewayBody::upstream(body)));
        }

        // A JSON answer (or an upstream error) is read whole: its usage decides the headers.
        let deadline = tokio::time::Instant::from_std(started + request_timeout);
        let read = read_response(incoming, max_response_bytes, deadline);
        let read = match driver.as_mut() {
            Some(d) => d.drive(read).await,
            None => read.await,
        };
        let bytes = match read {
            Ok(b) => {
                if let Some(d) = driver.take() {
                    d.release();
                }
                b
            }
            Err(e) => {
                let backend = candidate.backend.cfg.name.clone();
                let (kind, err) = match e {
                    ReadError::Timeout => ("timeout", GatewayError::UpstreamTimeout { backend }),
                    ReadError::TooLarge | ReadError::Body => {
                        ("body", GatewayError::UpstreamFailed { backend })
                    }
                };
                forward::count_error(&candidate.backend.cfg.name, kind);
                let _ = completion
                    .finish(failure(Status::UpstreamBroken, err.status().as_u16()))
                    .await;
                return Err(err);
            }
        };
        let ok = parts.status.is_success();
        let usage = if ok { meter::usage_of(&bytes) } else { None };
        let outcome = Outcome {
            status: if ok {
                Status::Ok
            } else {
                Status::UpstreamError
            },
            http_status: status,
            usage,
            generated: (ok && usage.is_none()).then(|| generated_text(&bytes)),
            response_bytes: bytes.len() as u64,
            first_token_at: None,
        };
        let settled = completion
            .finish(outcome)
            .await
            .map_err(|_| GatewayError::LedgerUnavailable)?;
        if !settled.committed {
            return Err(GatewayError::LedgerUnavailable);
        }
        if ok {
            set_usage_headers(&mut parts.headers, &settled);
        }
        parts.headers.remove(CONTENT_LENGTH);
        Ok(Response::from_parts(parts, GatewayBody::full(bytes)))
    }
}

fn failure(status: Status, http_status: u16) -> Outcome {
    Outcome {
        status,
        http_status,
        usage: None,
        generated: None,
        response_bytes: 0,
        first_token_at: None,
    }
}

fn set_budget_headers(h: &mut http::HeaderMap, r: &Remaining) {
    if let Some(nusd) = r.nusd {
        if let Ok(v) = HeaderValue::from_str(&format_usd(nusd.max(0))) {
            h.insert(X_TOLLGATE_BUDGET_REMAINING_USD.clone(), v);
        }
    }
    if let Some(tokens) = r.tokens {
        h.insert(
            X_TOLLGATE_BUDGET_REMAINING_TOKENS.clone(),
            HeaderValue::from(tokens.max(0)),
        );
    }
}

fn set_usage_headers(h: &mut http::HeaderMap, s: &Settled) {
    if let Some(u) = s.usage {
        h.insert(
            X_TOLLGATE_PROMPT_TOKENS.clone(),
            HeaderValue::from(u.prompt),
        );
        h.insert(
            X_TOLLGATE_COMPLETION_TOKENS.clone(),
            HeaderValue::from(u.completion),
        );
        h.insert(
            X_TOLLGATE_TOKEN_SOURCE.clone(),
            HeaderValue::from_static(u.source.as_str()),
        );
    }
    if s.priced {
        if let Ok(v) = HeaderValue::from_str(&format_usd(s.cost_nusd)) {
            h.insert(X_TOLLGATE_COST_USD.clone(), v);
        }
    }
}

/// The generated text of a JSON answer, for a local count when it carries no usage.
fn generated_text(json: &[u8]) -> Generated {
    let v: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    let mut text = String::new();
    for c in v["choices"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for t in [
            &c["message"]["content"],
            &c["message"]["reasoning_content"],
            &c["text"],
        ] {
            if let Some(s) = t.as_str() {
                text.push_str(s);
            }
        }
        for call in c["message"]["tool_calls"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            text.push_str(call["function"]["name"].as_str().unwrap_or(""));
            text.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    Generated {
        text,
        overflow_bytes: 0,
    }
}

enum ReadError {
    Timeout,
    TooLarge,
    Body,
}

async fn read_response(
    body: Incoming,
    limit: u64,
    deadline: tokio::time::Instant,
) -> Result<bytes::Bytes, ReadError> {
    use http_body_util::{BodyExt, Limited};
    match tokio::time::timeout_at(deadline, Limited::new(body, limit as usize).collect()).await {
        Err(_) => Err(ReadError::Timeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Ok(Err(_)) => Err(ReadError::Body),
    }
}
