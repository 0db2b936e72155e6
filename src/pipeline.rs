//! The `Gateway` service: runs one request through the phases, in the order of DESIGN.md,
//! on one [`RequestCtx`], and turns any [`GatewayError`] into an OpenAI-style response.
//!
//! ```text
//! route path ─ authenticate ─ read body (limit) ─ parse ─ route ─ forward ─ stream back
//! ```

use crate::api::endpoint::Endpoint;
use crate::api::openai::BodyEdits;
use crate::api::{models, openai};
use crate::body::GatewayBody;
use crate::budget::{BudgetBook, Demand, Remaining, Reservation};
use crate::config::OnDisconnect;
use crate::ctx::{RequestCtx, RequestId};
use crate::error::GatewayError;
use crate::ledger::Ledger;
use crate::live::{Live, LiveState};
use crate::meter::{self, format_usd, sse::SseObserver};
use crate::meter::{Generated, Outcome, Settled, Status};
use crate::metrics as m;
use crate::record::{self, Completion};
use crate::route::health::Failure;
use crate::route::{Candidate, Claim, Plan, Prompt, RouteRequest, Router};
use crate::server::limits::read_body;
use crate::server::request_id::next_id;
use crate::tags;
use crate::tokens::Counter;
use crate::upstream::forward;
use crate::upstream::h1::Driver;
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
pub static X_TOLLGATE_ROUTE: HeaderName = HeaderName::from_static("x-tollgate-route");
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
                    GatewayBody::error(&e)
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
    // Commercial providers bill a request the client abandoned: run the exchange on its own
    // task so it reaches the provider's usage even if this future is dropped. Any backend it
    // may fall back to counts.
    let drain = exchange.plan.ranked[exchange.idx..]
        .iter()
        .any(|r| r.candidate.backend.cfg.on_disconnect == OnDisconnect::Drain);
    if drain {
        tokio::spawn(exchange.run())
            .await
            .unwrap_or(Err(GatewayError::Internal))
    } else {
        exchange.run().await
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

    let team = &principal.team;
    let route_request = |prompt| RouteRequest {
        model: &summary.model,
        regions: &team.regions,
        features: summary.features,
        max_output_tokens: summary.max_output_tokens,
        prompt,
        request_bytes: body.len() as u64,
    };
    let bounds = Prompt::from_bytes(body.len());
    let mut plan = live.router.plan(&route_request(bounds))?;
    // The byte count put a prompt over some context window: count it with those models'
    // tokenizers and plan again, so a prompt that fits is not sent to a bigger, dearer model.
    let mut exact: Vec<(Counter, u64)> = Vec::new();
    if !plan.needs_count.is_empty() {
        for counter in std::mem::take(&mut plan.needs_count) {
            exact.push((counter, count_prompt(counter, endpoint, &body).await));
        }
        plan = live.router.plan(&route_request(Prompt {
            exact: &exact,
            ..bounds
        }))?;
    }
    if plan.ranked.is_empty() {
        return Err(Router::refusal(&summary.model, &team.name, &plan));
    }
    // A request that could not be recorded must not be served.
    if !gw.ledger.is_healthy() {
        return Err(GatewayError::LedgerUnavailable);
    }
    let mut tried = Vec::new();
    let (idx, claim) = match claim_from(&plan, 0, &mut tried) {
        Some(claimed) => claimed,
        // All filled up since the plan was made: wait for a slot at the cheapest one.
        None => match plan.ranked[0]
            .candidate
            .claim_waiting(tokio::time::Instant::from_std(
                started + server.request_timeout,
            ))
            .await
        {
            Some(claim) => {
                tried.clear();
                (0, claim)
            }
            None => return Err(at_capacity(&summary.model, &tried)),
        },
    };
    let candidate = plan.ranked[idx].candidate.clone();
    let output = match endpoint {
        Endpoint::Embeddings => 0,
        _ => summary
            .max_output_tokens
            .or(candidate.max_output_tokens)
            .unwrap_or(DEFAULT_OUTPUT_RESERVE),
    };
    let known = exact
        .iter()
        .find(|(c, _)| *c == candidate.counter)
        .map(|&(_, n)| n);
    let (budget, admitted, output_limit) = if team.budgets.is_empty() {
        (None, None, None)
    } else {
        let (reservation, remaining, admitted) =
            admit(gw, principal, &candidate, output, known, &body, endpoint).await?;
        let limit = output_limit(&remaining, output, candidate.price.as_deref());
        (
            Some((reservation, gw.budgets.clone())),
            Some((admitted, remaining)),
            limit,
        )
    };
    let shape = Shape {
        body: body.clone(),
        requested: requested_model.clone(),
        model_span: summary.model_span.clone(),
        stream_options_span: summary.stream_options_span.clone(),
        ask_usage: summary.stream && !summary.include_usage && endpoint != Endpoint::Embeddings,
        client_usage: summary.stream && summary.include_usage,
    };
    let (upstream_body, strip_usage) = shape.for_candidate(&candidate);

    let ctx = RequestCtx {
        id: id.clone(),
        started,
        endpoint,
        principal: principal.clone(),
        metric_tags: crate::metrics::TagLabels::of(&live.config.metrics, &seen.tags),
        tags: std::mem::take(&mut seen.tags),
        requested_model,
        stream: summary.stream,
        body: body.clone(),
        counter: candidate.counter,
        backend: Some(candidate.backend.cfg.name.clone()),
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
        candidate.backend.cfg.egress_usd_per_gb,
        gw.ledger.clone(),
        budget,
        claim.in_flight,
        crate::upstream::engine::EngineCounter::new(&candidate.backend, &candidate.model),
    );
    Ok(Exchange {
        plan,
        idx,
        tried,
        max_attempts: live.config.routing.max_attempts,
        shape,
        principal: principal.clone(),
        budgets: gw.budgets.clone(),
        output,
        admitted,
        path,
        headers: parts.headers,
        body: upstream_body,
        completion,
        request_timeout: server.request_timeout,
        max_response_bytes: server.max_response_bytes,
        strip_usage,
        output_limit,
        upstream_wait: std::time::Duration::ZERO,
    })
}

/// Claims a slot on the first ranked candidate from `start` that still has one; those that
/// filled up since the plan was made are noted in `tried`.
fn claim_from(
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

/// What is needed to write the request body for whichever candidate serves it.
struct Shape {
    body: bytes::Bytes,
    requested: Arc<str>,
    model_span: std::ops::Range<usize>,
    stream_options_span: Option<std::ops::Range<usize>>,
    /// A stream whose client did not ask for usage: ask for it where the backend can.
    ask_usage: bool,
    /// The client asked for usage on its stream.
    client_usage: bool,
}

impl Shape {
    /// The body for `c` (its model name, usage asked for), and whether usage must be hidden
    /// from the client: it did not ask, whether the gateway did or the engine sends usage
    /// anyway (llama.cpp and TGI on completions, Mistral on every stream).
    fn for_candidate(&self, c: &Candidate) -> (bytes::Bytes, bool) {
        let mut edits = BodyEdits::default();
        if *c.model != *self.requested {
            edits.set_model(&self.model_span, &c.model);
        }
        if self.ask_usage && c.backend.cfg.stream_usage {
            edits.request_stream_usage(&self.body, self.stream_options_span.as_ref());
        }
        (edits.apply(&self.body), self.ask_usage)
    }
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
        (Some(n), Some(p)) => crate::meter::price::output_tokens_for(p, n).map(|t| reserved + t),
        _ => None,
    };
    [by_tokens, by_usd].into_iter().flatten().min()
}

/// A request whose rough worst case is over 1/NEAR_LIMIT_FRACTION of the room left in a budget
/// is counted exactly before it is admitted.
const NEAR_LIMIT_FRACTION: i64 = 16;

/// What a request holds against its budgets: its prompt as counted for admission, and the
/// worst case reserved, so a fallback to a dearer backend can reserve the difference.
#[derive(Debug, Clone, Copy)]
struct Admitted {
    prompt_tokens: u64,
    demand: Demand,
}

/// The worst case of a request on `candidate`: prompt plus the most it may generate, at the
/// candidate's prices.
fn worst_case(candidate: &Candidate, prompt: u64, output: u64) -> Demand {
    use crate::meter::price::{cost_nusd, Egress, Rounding, Tokens};
    let tokens = Tokens {
        prompt,
        completion: output,
        ..Default::default()
    };
    Demand {
        nusd: cost_nusd(
            candidate.price.as_deref(),
            tokens,
            Egress::default(),
            Rounding::Up,
        ),
        tokens: (prompt + output) as i64,
    }
}

/// Counts a prompt exactly with `counter`, off the runtime when large.
async fn count_prompt(counter: Counter, endpoint: Endpoint, body: &bytes::Bytes) -> u64 {
    let estimate = crate::tokens::estimate_prompt_tokens(body.len());
    let owned = body.clone();
    crate::tokens::Tokenizers::shared()
        .off_runtime(body.len(), move |tok| {
            crate::tokens::ChatPrompt::parse(endpoint, &owned)
                .map(|p| counter.scale(crate::tokens::count_chat_prompt(tok, counter.encoding, &p)))
                .unwrap_or(estimate)
        })
        .await
}

/// Reserves the request's worst case against its team's budgets. The prompt is first taken
/// at its free upper bound; only when that does not fit (near a limit) is it counted exactly,
/// and tried again. `known` is an exact count made already (for routing).
async fn admit(
    gw: &Gateway,
    principal: &crate::auth::Principal,
    candidate: &Candidate,
    output: u64,
    known: Option<u64>,
    body: &bytes::Bytes,
    endpoint: Endpoint,
) -> Result<(Reservation, Remaining, Admitted), GatewayError> {
    let team = &principal.team;
    let reserve = |prompt: u64| {
        let demand = worst_case(candidate, prompt, output);
        gw.budgets
            .admit(team, &principal.key_id, demand)
            .map(|(r, room)| {
                (
                    r,
                    room,
                    Admitted {
                        prompt_tokens: prompt,
                        demand,
                    },
                )
            })
    };
    let prompt = match known {
        Some(n) => n,
        None => {
            let estimate = crate::tokens::estimate_prompt_tokens(body.len());
            // Far from every limit, the free estimate is good enough; near one, its slack
            // would refuse requests that fit (and hold room others could use), so the prompt
            // is counted exactly.
            let rough = worst_case(candidate, estimate, output);
            let room = gw.budgets.room(team, &principal.key_id);
            let far = room
                .nusd
                .is_none_or(|r| rough.nusd <= r / NEAR_LIMIT_FRACTION)
                && room
                    .tokens
                    .is_none_or(|r| rough.tokens <= r / NEAR_LIMIT_FRACTION);
            if far {
                if let Ok(admitted) = reserve(estimate) {
                    return Ok(admitted);
                }
            }
            count_prompt(candidate.counter, endpoint, body).await
        }
    };
    reserve(prompt).map_err(|over| {
        metrics::counter!(m::BUDGET_REJECTIONS_TOTAL, "team" => over.team.clone(), "window" => over.window.as_str())
            .increment(1);
        GatewayError::OverBudget(Box::new(over))
    })
}

/// One request's trip to its backend and back, from sending to a metered response, moving
/// to the next candidate of its plan while nothing has reached the client.
struct Exchange {
    plan: Plan,
    /// The candidate of `plan.ranked` being tried.
    idx: usize,
    /// Candidates passed over before it, and why (for `x-tollgate-route`).
    tried: Vec<(Arc<str>, &'static str)>,
    max_attempts: u32,
    shape: Shape,
    principal: Arc<crate::auth::Principal>,
    budgets: Arc<BudgetBook>,
    output: u64,
    /// What the request holds against its budgets, and the room left; `None` without budgets.
    admitted: Option<(Admitted, Remaining)>,
    path: String,
    headers: http::HeaderMap,
    /// The body for the current candidate.
    body: bytes::Bytes,
    completion: Completion,
    request_timeout: std::time::Duration,
    max_response_bytes: u64,
    /// The client streams without asking for usage: hide any from it.
    strip_usage: bool,
    output_limit: Option<u64>,
    /// Time spent waiting on upstreams, so the gateway's own time can be told apart.
    upstream_wait: std::time::Duration,
}

/// A response that may still be handed to another backend: nothing was sent to the client.
type Attempt = Result<(Response<Incoming>, Option<Driver>), GatewayError>;

impl Exchange {
    fn candidate(&self) -> &Arc<Candidate> {
        &self.plan.ranked[self.idx].candidate
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

    /// Moves to the next candidate that has a slot and fits the budget; false when none is
    /// left (or attempts are used up) and the last answer must stand.
    fn fall_back(&mut self, why: &'static str) -> bool {
        let attempts = self.completion.ctx().map_or(u32::MAX, |c| c.attempts);
        if attempts >= self.max_attempts {
            return false;
        }
        let from = self.candidate().backend.cfg.name.clone();
        let mut tried = vec![(from.clone(), why)];
        let mut next = self.idx + 1;
        while let Some((i, claim)) = claim_from(&self.plan, next, &mut tried) {
            let c = self.plan.ranked[i].candidate.clone();
            if self.grow_reservation(&c) {
                self.tried.append(&mut tried);
                metrics::counter!(m::ROUTE_FALLBACKS_TOTAL, "from" => from, "reason" => why)
                    .increment(1);
                tracing::info!(
                    request_id = self.completion.ctx().map_or("", |c| c.id.as_str()),
                    from = &*self.candidate().backend.cfg.name,
                    to = &*c.backend.cfg.name,
                    reason = why,
                    "falling back"
                );
                let (body, strip_usage) = self.shape.for_candidate(&c);
                self.completion.retarget(&c, claim, body.len() as u64);
                self.body = body;
                self.strip_usage = strip_usage;
                self.idx = i;
                return true;
            }
            tried.push((c.backend.cfg.name.clone(), "budget"));
            next = i + 1;
        }
        false
    }

    /// Reserves the difference when `c`'s worst case exceeds what is held; false when that
    /// does not fit the team's budgets.
    fn grow_reservation(&mut self, c: &Candidate) -> bool {
        let Some((admitted, _)) = self.admitted else {
            return true;
        };
        let demand = worst_case(c, admitted.prompt_tokens, self.output);
        let extra = Demand {
            nusd: (demand.nusd - admitted.demand.nusd).max(0),
            tokens: (demand.tokens - admitted.demand.tokens).max(0),
        };
        if extra == Demand::default() {
            return true;
        }
        let p = &self.principal;
        match self.budgets.admit(&p.team, &p.key_id, extra) {
            Ok((more, remaining)) => {
                if let Some(held) = self.completion.reservation_mut() {
                    held.absorb(more);
                }
                self.output_limit = output_limit(&remaining, self.output, c.price.as_deref());
                self.admitted = Some((Admitted { demand, ..admitted }, remaining));
                true
            }
            Err(_) => false,
        }
    }

    /// Sends to the current candidate, then to fallbacks while the answer is a failure
    /// that no client has seen.
    async fn send(&mut self, request_id: &HeaderValue) -> Attempt {
        loop {
            let more = self.idx + 1 < self.plan.ranked.len()
                && self
                    .completion
                    .ctx()
                    .is_some_and(|c| c.attempts < self.max_attempts);
            // The headers are needed again only if another backend may be tried.
            let headers = if more {
                self.headers.clone()
            } else {
                std::mem::take(&mut self.headers)
            };
            let asked = Instant::now();
            let attempt = forward::send(
                self.candidate(),
                &self.path,
                headers,
                self.body.clone(),
                request_id,
                self.request_timeout,
            )
            .await;
            self.upstream_wait += asked.elapsed();
            match Self::retryable(&attempt) {
                Some(why) if more && self.fall_back(why) => continue,
                _ => return attempt,
            }
        }
    }

    async fn run(mut self) -> Result<Response<GatewayBody>, GatewayError> {
        let (request_id, started) = {
            let ctx = self.completion.ctx().expect("not settled yet");
            (ctx.id.0.clone(), ctx.started)
        };
        let attempt = self.send(&request_id).await;
        let Exchange {
            plan,
            idx,
            tried,
            shape,
            admitted,
            completion,
            request_timeout,
            max_response_bytes,
            strip_usage,
            output_limit,
            mut upstream_wait,
            ..
        } = self;
        let candidate = plan.ranked[idx].candidate.clone();
        let upstream = match attempt {
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
        parts.headers.insert(
            X_TOLLGATE_ROUTE.clone(),
            crate::route::explain::header(&plan, idx, &tried),
        );
        if let Some((_, r)) = admitted {
            set_budget_headers(&mut parts.headers, &r);
        }
        let sse = parts
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let status = parts.status.as_u16();

        if sse && parts.status.is_success() {
            let who = {
                let ctx = completion.ctx().expect("not settled yet");
                crate::upstream::stream::Who {
                    request_id: ctx.id.as_str().to_string(),
                    model: candidate.model.clone(),
                    endpoint: ctx.endpoint,
                }
            };
            let body = UpstreamBody::new(
                incoming,
                SseObserver::new(strip_usage),
                Box::new(completion),
                &openai::STREAM,
                who,
                &candidate.backend,
                status,
            )
            .with_output_limit(output_limit)
            .with_client_usage(shape.client_usage)
            .with_driver(driver);
            // The head leaves before the stream's end, where its duration is measured.
            record_overhead(&candidate, started.elapsed(), upstream_wait);
            return Ok(Response::from_parts(parts, GatewayBody::upstream(body)));
        }

        // A JSON answer (or an upstream error) is read whole: its usage decides the headers.
        let deadline = tokio::time::Instant::from_std(started + request_timeout);
        let read = read_response(incoming, max_response_bytes, deadline);
        let reading = Instant::now();
        let read = match driver.as_mut() {
            Some(d) => d.drive(read).await,
            None => read.await,
        };
        upstream_wait += reading.elapsed();
        let bytes = match read {
            Ok(b) => {
                if let Some(d) = driver.take() {
                    d.release();
                }
                b
            }
            Err(e) => {
                let backend = candidate.backend.cfg.name.clone();
                let (kind, err) = match &e {
                    ReadError::Timeout => ("timeout", GatewayError::UpstreamTimeout { backend }),
                    ReadError::TooLarge | ReadError::Body => {
                        ("body", GatewayError::UpstreamFailed { backend })
                    }
                };
                forward::count_error(&candidate.backend.cfg.name, kind);
                candidate.backend.state.on_failure(match e {
                    ReadError::Timeout => Failure::Timeout,
                    _ => Failure::Broken,
                });
                let _ = completion
                    .finish(failure(Status::UpstreamBroken, err.status().as_u16()))
                    .await;
                return Err(err);
            }
        };
        let ok = parts.status.is_success();
        let answer = if ok { meter::read_answer(&bytes) } else { None };
        if ok && answer.is_none() {
            // A success the client could not parse: an upstream fault, not an answer.
            let backend = candidate.backend.cfg.name.clone();
            tracing::warn!(
                backend = &*backend,
                "upstream answered 2xx with a body that is not JSON"
            );
            forward::count_error(&backend, "malformed_body");
            candidate.backend.state.on_failure(Failure::Broken);
            let err = GatewayError::UpstreamFailed { backend };
            let _ = completion
                .finish(failure(Status::UpstreamBroken, err.status().as_u16()))
                .await;
            return Err(err);
        }
        let (usage, text) = answer.unwrap_or_default();
        let outcome = Outcome {
            status: if ok {
                Status::Ok
            } else {
                Status::UpstreamError
            },
            http_status: status,
            usage,
            generated: ok.then_some(Generated {
                text,
                overflow_bytes: 0,
            }),
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
        record_overhead(
            &candidate,
            settled.ended.duration_since(started),
            upstream_wait,
        );
        Ok(Response::from_parts(parts, GatewayBody::full(bytes)))
    }
}

/// The gateway's own share of `span`, a part of the request's measured duration that starts
/// where it starts: what is left when the time spent waiting on upstreams is taken out.
fn record_overhead(
    candidate: &Candidate,
    span: std::time::Duration,
    upstream_wait: std::time::Duration,
) {
    let own = span.saturating_sub(upstream_wait);
    metrics::histogram!(m::OVERHEAD_SECONDS, "backend" => candidate.backend.cfg.name.clone())
        .record(own.as_secs_f64());
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
