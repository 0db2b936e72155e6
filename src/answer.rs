//! The answer phase: an upstream's response becomes the client's, metered and recorded.
//!
//! ```text
//! stream ─► passed through event by event (upstream::stream), settled at its end
//! whole  ─► read within its limits ─► usage, else counted ─► record committed ─► headers
//!           (x-tollgate-prompt-tokens, -completion-tokens, -cost-usd) ─► the body
//! ```

use crate::api::anthropic;
use crate::api::headers as h;
use crate::api::openai;
use crate::body::GatewayBody;
use crate::config::Protocol;
use crate::error::GatewayError;
use crate::meter::{self, sse::SseObserver, Generated, Outcome, Status};
use crate::record::Completion;
use crate::route::health::Failure;
use crate::route::Candidate;
use crate::upstream::forward::{self, ReadError};
use crate::upstream::h1::Driver;
use crate::upstream::stream::{UpstreamBody, Who};
use http::header::CONTENT_LENGTH;
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;

/// The head of any answer: the upstream's headers less its hop-by-hop ones, plus where the
/// request went and why, and the budget room it leaves.
pub fn head(
    out: &mut http::HeaderMap,
    candidate: &Candidate,
    route: http::HeaderValue,
    room: Option<&crate::budget::Remaining>,
) {
    crate::upstream::headers::strip_hop_by_hop(out);
    out.insert(
        h::X_TOLLGATE_BACKEND.clone(),
        candidate.backend.name_header.clone(),
    );
    out.insert(h::X_TOLLGATE_MODEL.clone(), candidate.model_header.clone());
    out.insert(h::X_TOLLGATE_ROUTE.clone(), route);
    if let Some(r) = room {
        h::set_budget(out, r);
    }
}

/// What a stream's pass-through must know of its request.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    /// The gateway asked for usage the client did not: hide it.
    pub strip_usage: bool,
    /// The client asked for usage: it gets a usage chunk, the gateway's when need be.
    pub client_usage: bool,
    /// Generated tokens the team's hard budget leaves room for.
    pub output_limit: Option<u64>,
}

/// A stream: passed through as it comes, metered on the way, settled at its end.
pub fn stream(
    incoming: Incoming,
    driver: Option<Driver>,
    status: u16,
    shaped: Stream,
    mut record: Completion,
    candidate: &Arc<Candidate>,
) -> GatewayBody {
    let ctx = record.ctx_mut();
    let who = Who {
        request_id: ctx.id.as_str().to_string(),
        model: candidate.model.clone(),
        endpoint: ctx.endpoint,
    };
    let (started, waited) = (ctx.started, ctx.upstream_wait);
    let from_backend = (candidate.backend.cfg.protocol == Protocol::Anthropic).then(|| {
        match ctx.client_protocol {
            Protocol::Anthropic => anthropic::FromAnthropic::for_anthropic_client(),
            Protocol::OpenAi => anthropic::FromAnthropic::new(),
        }
    });
    let to_client = (ctx.client_protocol == Protocol::Anthropic)
        .then(|| anthropic::ToAnthropic::new(&candidate.model));
    let tasks = record.tasks().cloned().unwrap_or_default();
    let body = UpstreamBody::new(
        incoming,
        SseObserver::new(shaped.strip_usage),
        Box::new(record),
        &openai::STREAM,
        who,
        &candidate.backend,
        status,
    )
    .with_tasks(tasks)
    .with_output_limit(shaped.output_limit)
    .with_client_usage(shaped.client_usage)
    .with_translation(from_backend, to_client)
    .with_driver(driver);
    // The head leaves before the stream's end, where its duration is measured.
    record_overhead(candidate, started.elapsed(), waited);
    GatewayBody::upstream(body)
}

/// A whole answer (or an upstream's error body): read, settled and recorded before its head
/// leaves, since its usage decides the headers.
/// A whole answer as read: its bytes, and for a success what metering found in it (its usage
/// and text); a success that is not JSON is `ReadError::NotJson`. Parsed once, here.
pub type ReadAnswer = Result<(bytes::Bytes, Option<(Option<meter::Usage>, String)>), ReadError>;

pub fn parse(read: Result<bytes::Bytes, ReadError>, ok: bool) -> ReadAnswer {
    match read {
        Ok(bytes) if !ok => Ok((bytes, None)),
        // A success the client could not parse is an upstream fault, not an answer.
        Ok(bytes) => meter::read_answer(&bytes)
            .map(|read| (bytes, Some(read)))
            .ok_or(ReadError::NotJson),
        Err(e) => Err(e),
    }
}

/// A whole answer of an Anthropic backend as the OpenAI answer (or error) it stands for, so
/// that it is metered, and relayed, like any other; an answer that does not translate is a
/// broken one.
pub fn from_backend(
    read: Result<bytes::Bytes, ReadError>,
    candidate: &Candidate,
    client: Protocol,
    status: u16,
) -> Result<bytes::Bytes, ReadError> {
    // Anthropic to Anthropic goes as it came: the meter reads Anthropic's usage as it is.
    if candidate.backend.cfg.protocol != Protocol::Anthropic || client == Protocol::Anthropic {
        return read;
    }
    let bytes = read?;
    if (200..300).contains(&status) {
        anthropic::answer_to_openai(&bytes)
            .map(bytes::Bytes::from)
            .map_err(|_| ReadError::NotJson)
    } else {
        Ok(bytes::Bytes::from(anthropic::error_to_openai(
            status, &bytes,
        )))
    }
}

/// A whole answer (or error) in the client's protocol.
fn to_client(
    bytes: bytes::Bytes,
    protocol: Protocol,
    backend: Protocol,
    status: u16,
) -> Result<bytes::Bytes, GatewayError> {
    match protocol {
        Protocol::OpenAi => Ok(bytes),
        Protocol::Anthropic if backend == Protocol::Anthropic => Ok(bytes),
        Protocol::Anthropic if (200..300).contains(&status) => {
            anthropic::answer_to_anthropic(&bytes)
                .map(bytes::Bytes::from)
                .map_err(GatewayError::from)
        }
        Protocol::Anthropic => Ok(bytes::Bytes::from(anthropic::error_to_anthropic(
            status, &bytes,
        ))),
    }
}

pub async fn whole(
    answer: ReadAnswer,
    parts: &mut http::response::Parts,
    mut record: Completion,
    candidate: &Candidate,
) -> Result<GatewayBody, GatewayError> {
    let ok = parts.status.is_success();
    let (bytes, read) = match answer {
        Ok(answer) => answer,
        Err(e) => {
            let err = upstream_broken(candidate, &e);
            let _ = record
                .finish(unanswered(Status::UpstreamBroken, err.status().as_u16()))
                .await;
            return Err(err);
        }
    };
    let (usage, text) = read.unwrap_or_default();
    let (started, waited, client) = {
        let ctx = record.ctx_mut();
        (ctx.started, ctx.upstream_wait, ctx.client_protocol)
    };
    let settled = record
        .finish(Outcome {
            status: if ok {
                Status::Ok
            } else {
                Status::UpstreamError
            },
            http_status: parts.status.as_u16(),
            usage,
            generated: ok.then_some(Generated {
                text,
                overflow_bytes: 0,
            }),
            response_bytes: bytes.len() as u64,
            first_token_at: None,
        })
        .await
        .map_err(|_| GatewayError::LedgerUnavailable)?;
    if !settled.committed {
        return Err(GatewayError::LedgerUnavailable);
    }
    if ok {
        h::set_usage(&mut parts.headers, &settled);
    }
    parts.headers.remove(CONTENT_LENGTH);
    record_overhead(candidate, settled.ended.duration_since(started), waited);
    let backend = candidate.backend.cfg.protocol;
    Ok(GatewayBody::full(to_client(
        bytes,
        client,
        backend,
        parts.status.as_u16(),
    )?))
}

/// A 2xx that is not JSON, before the request moves to another backend: its health and the
/// error count learn of it.
pub fn broken_answer(candidate: &Candidate) {
    let _ = upstream_broken(candidate, &ReadError::NotJson);
}

/// An answer that broke while being read, or a 2xx that is not JSON: the backend's health
/// learns of it, and the client gets a clean upstream error.
fn upstream_broken(candidate: &Candidate, e: &ReadError) -> GatewayError {
    let backend = candidate.backend.cfg.name.clone();
    let (kind, failure) = match e {
        ReadError::Timeout => ("timeout", Failure::Timeout),
        ReadError::NotJson => ("malformed_body", Failure::Broken),
        ReadError::TooLarge | ReadError::Body => ("body", Failure::Broken),
    };
    if matches!(e, ReadError::NotJson) {
        tracing::warn!(
            backend = &*backend,
            "upstream answered 2xx with a body that is not JSON"
        );
    }
    forward::count_error(&backend, kind);
    candidate.backend.state.on_failure(failure);
    match e {
        ReadError::Timeout => GatewayError::UpstreamTimeout { backend },
        _ => GatewayError::UpstreamFailed { backend },
    }
}

/// The gateway's own share of `span`, a part of the request's measured duration that starts
/// where it starts: what is left when the time spent waiting on upstreams is taken out.
fn record_overhead(candidate: &Candidate, span: Duration, upstream_wait: Duration) {
    let own = span.saturating_sub(upstream_wait);
    candidate.backend.state.overhead.record(own.as_secs_f64());
}

/// How a request that got no usable answer ended.
pub fn unanswered(status: Status, http_status: u16) -> Outcome {
    Outcome {
        status,
        http_status,
        usage: None,
        generated: None,
        response_bytes: 0,
        first_token_at: None,
    }
}
