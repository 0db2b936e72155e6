//! The `Gateway` service: runs one request through the phases, in the order of DESIGN.md,
//! on one [`RequestCtx`], and turns any [`GatewayError`] into an OpenAI-style response.
//!
//! ```text
//! route path ─ authenticate ─ read body (limit) ─ parse ─ route ─ forward ─ stream back
//! ```

use crate::api::{models, openai};
use crate::body::GatewayBody;
use crate::ctx::{Endpoint, RequestCtx, RequestId};
use crate::error::GatewayError;
use crate::live::{Live, LiveState};
use crate::metrics as m;
use crate::record::{Completion, Outcome};
use crate::server::limits::read_body;
use crate::server::request_id::next_id;
use crate::upstream::forward;
use crate::upstream::headers::strip_hop_by_hop;
use crate::upstream::stream::{Deadline, UpstreamBody};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

pub static X_TOLLGATE_BACKEND: HeaderName = HeaderName::from_static("x-tollgate-backend");
pub static X_TOLLGATE_MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");

#[derive(Clone)]
pub struct Gateway {
    live: Live,
}

impl Gateway {
    pub fn new(live: Live) -> Self {
        Self { live }
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
        Box::pin(async move {
            let started = Instant::now();
            let id = req
                .extensions()
                .get::<RequestId>()
                .cloned()
                .unwrap_or_else(next_id);
            Ok(match dispatch(&live, req, id.clone(), started).await {
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
        (_, path) => return Err(GatewayError::UnknownPath(truncate(path, 200))),
    };
    proxy(live, endpoint, req, id, started).await
}

async fn proxy(
    live: &LiveState,
    endpoint: Endpoint,
    req: Request<Incoming>,
    id: RequestId,
    started: Instant,
) -> Result<Response<GatewayBody>, GatewayError> {
    let server = &live.config.server;
    let (parts, body) = req.into_parts();

    let principal = live.keys.authenticate(&parts.headers)?;

    let content_length = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let body = read_body(body, content_length, server.max_body_bytes).await?;
    let summary = openai::parse(&body)?;

    let candidate = live.router.resolve(&summary.model, &principal)?;
    let upstream_body = if *candidate.model == *summary.model {
        body.clone()
    } else {
        openai::with_model(&body, summary.model_span.clone(), &candidate.model)
    };

    let ctx = RequestCtx {
        id,
        started,
        endpoint,
        principal,
        requested_model: summary.model.into(),
        stream: summary.stream,
        backend: Some(candidate.backend.cfg.name.clone()),
        served_model: Some(candidate.model.clone()),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or(endpoint.path(), |p| p.as_str());
    let in_flight = candidate.backend.state.enter();
    let upstream = forward::send(
        &candidate,
        path,
        parts.headers,
        upstream_body,
        &ctx.id.0,
        server.request_timeout,
    )
    .await;
    let upstream = match upstream {
        Ok(resp) => resp,
        Err(e) => {
            Completion::new(ctx, e.status().as_u16(), in_flight)
                .finish(Outcome::Complete(e.status().as_u16()));
            return Err(e);
        }
    };

    let (mut parts, incoming) = upstream.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        X_TOLLGATE_BACKEND.clone(),
        candidate.backend.name_header.clone(),
    );
    parts
        .headers
        .insert(X_TOLLGATE_MODEL.clone(), candidate.model_header.clone());
    let sse = parts
        .headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let deadline = if sse {
        Deadline::Idle(candidate.backend.cfg.stream_idle_timeout)
    } else {
        Deadline::At((started + server.request_timeout).into())
    };
    let completion = Completion::new(ctx, parts.status.as_u16(), in_flight);
    let body = UpstreamBody::new(incoming, deadline, sse, completion);
    Ok(Response::from_parts(parts, GatewayBody::upstream(body)))
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
