//! One attempt to send a request to one backend, up to its response headers.
//!
//! Failures are classified by where they happened, because that decides both the status the
//! client sees (502 unreachable, 504 too slow) and, with fallback, whether another backend
//! may be tried: nothing has reached the client yet at this point.

use crate::error::GatewayError;
use crate::route::health::Failure;
use crate::route::Candidate;
use crate::upstream::h1::Driver;
use crate::upstream::headers;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use std::time::Duration;

/// Longest `Retry-After` honoured: a backend is not shunned for hours on one answer.
const MAX_BUSY: Duration = Duration::from_secs(600);

/// Sends one request to one backend, up to its response headers. For a plain-`http://`
/// backend the response comes with the [`Driver`] of its connection, which whoever reads the
/// body must poll (see `upstream::h1`).
pub async fn send(
    candidate: &Candidate,
    path: &str,
    mut headers: HeaderMap,
    body: Bytes,
    request_id: &HeaderValue,
    timeout: Duration,
) -> Result<(Response<Incoming>, Option<Driver>), GatewayError> {
    let backend = &candidate.backend;
    let cfg = &backend.cfg;
    headers::to_upstream(
        &mut headers,
        cfg.protocol,
        cfg.api_key.as_ref().map(|k| k.expose()),
        request_id,
    );
    let path = upstream_path(cfg.protocol, path);
    let sent = crate::clock::now();
    let result = transmit(backend, path, headers, body, timeout).await;
    // What the answer (or its absence) says of the backend's health, and what the client is told.
    let name = || cfg.name.clone();
    match result {
        Ok(ok) => {
            let status = ok.0.status();
            if status == http::StatusCode::TOO_MANY_REQUESTS {
                backend.state.on_busy(retry_after(ok.0.headers()));
            } else if status.is_server_error() {
                backend.state.on_failure(Failure::ServerError);
            } else {
                backend.state.on_success(sent.elapsed());
            }
            Ok(ok)
        }
        Err(Sent::Refused(error)) => {
            tracing::warn!(backend = &*cfg.name, %error, "upstream connect failed");
            backend.state.on_failure(Failure::Connect);
            count_error(&cfg.name, "connect");
            Err(GatewayError::UpstreamConnect { backend: name() })
        }
        Err(Sent::Failed(error)) => {
            tracing::warn!(backend = &*cfg.name, %error, "upstream request failed");
            backend.state.on_failure(Failure::Broken);
            count_error(&cfg.name, "request");
            Err(GatewayError::UpstreamFailed { backend: name() })
        }
        Err(Sent::TimedOut) => {
            tracing::warn!(
                backend = &*cfg.name,
                ?timeout,
                "upstream sent no response headers in time"
            );
            backend.state.on_failure(Failure::Timeout);
            count_error(&cfg.name, "timeout");
            Err(GatewayError::UpstreamTimeout { backend: name() })
        }
    }
}

/// How sending failed, before any answer.
enum Sent {
    /// No connection could be made: the request never reached the backend.
    Refused(String),
    Failed(String),
    TimedOut,
}

/// Writes the request on the backend's pool and waits for its answer's head, for at most
/// `timeout`. (The timeout wraps the pool's own future, not this one: a larger future would
/// be copied as it is wrapped, on every request.)
async fn transmit(
    backend: &crate::route::RouteBackend,
    path: &str,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<(Response<Incoming>, Option<Driver>), Sent> {
    let cfg = &backend.cfg;
    let failed = |e: http::Error| Sent::Failed(e.to_string());
    match &backend.h1 {
        Some(pool) => {
            // Origin-form target and a Host header, as a client speaking to a server sends.
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(format!("{}{}", pool_prefix(&cfg.base_url), path))
                .body(Full::new(body))
                .map_err(failed)?;
            *req.headers_mut() = headers;
            if let Ok(host) = HeaderValue::from_str(pool.authority()) {
                req.headers_mut().insert(http::header::HOST, host);
            }
            match tokio::time::timeout(timeout, pool.send(req)).await {
                Ok(Ok((resp, driver))) => Ok((resp, Some(driver))),
                Ok(Err(e)) if e.is_connect() => Err(Sent::Refused(e.to_string())),
                Ok(Err(e)) => Err(Sent::Failed(e.to_string())),
                Err(_) => Err(Sent::TimedOut),
            }
        }
        None => {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(format!("{}{}", cfg.base_url, path))
                .body(Full::new(body))
                .map_err(failed)?;
            *req.headers_mut() = headers;
            match tokio::time::timeout(timeout, backend.client.request(req)).await {
                Ok(Ok(resp)) => Ok((resp, None)),
                Ok(Err(e)) if e.is_connect() => Err(Sent::Refused(e.to_string())),
                Ok(Err(e)) => Err(Sent::Failed(e.to_string())),
                Err(_) => Err(Sent::TimedOut),
            }
        }
    }
}

/// A 429's `Retry-After` in seconds (the form rate limiters send); one second without it.
pub fn retry_after(headers: &HeaderMap) -> Duration {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(
            Duration::from_secs_f64(crate::config::DEFAULT_BUSY_S),
            |s| Duration::from_secs_f64(s).min(MAX_BUSY),
        )
}

/// The backend's path for a request the client sent to `path`: a chat request crosses to
/// the other protocol's chat endpoint (the body was translated for it).
fn upstream_path(protocol: crate::config::Protocol, path: &str) -> &str {
    use crate::config::Protocol;
    let chat = path.starts_with("/v1/chat/completions") || path.starts_with("/v1/messages");
    match protocol {
        Protocol::Anthropic if chat => "/v1/messages",
        Protocol::OpenAi if path.starts_with("/v1/messages") => "/v1/chat/completions",
        _ => path,
    }
}

/// The path prefix of a base URL (`http://host:port/prefix` -> `/prefix`).
fn pool_prefix(base_url: &str) -> &str {
    let rest = base_url.split_once("://").map_or(base_url, |(_, r)| r);
    rest.find('/').map_or("", |i| &rest[i..])
}

pub fn count_error(backend: &std::sync::Arc<str>, kind: &'static str) {
    metrics::counter!(crate::metrics::UPSTREAM_ERRORS_TOTAL, "backend" => backend.clone(), "kind" => kind)
        .increment(1);
}

/// Why a whole answer could not be read.
#[derive(Debug)]
pub enum ReadError {
    Timeout,
    TooLarge,
    Body,
    /// A 2xx whose body is not JSON: the client could not use it.
    NotJson,
}

/// Reads a whole (non-stream) answer within `limit` bytes and `deadline`, driving its
/// connection; the connection goes back to the pool once the body is read whole.
pub async fn read_answer(
    body: hyper::body::Incoming,
    mut driver: Option<Driver>,
    limit: u64,
    deadline: tokio::time::Instant,
) -> Result<Bytes, ReadError> {
    use http_body_util::{BodyExt, Limited};
    let read = tokio::time::timeout_at(deadline, Limited::new(body, limit as usize).collect());
    let read = match driver.as_mut() {
        Some(d) => d.drive(read).await,
        None => read.await,
    };
    match read {
        Err(_) => Err(ReadError::Timeout),
        Ok(Ok(c)) => {
            if let Some(d) = driver.take() {
                d.release();
            }
            Ok(c.to_bytes())
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Ok(Err(_)) => Err(ReadError::Body),
    }
}
