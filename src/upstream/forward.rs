//! One attempt to send a request to one backend, up to its response headers.
//!
//! Failures are classified by where they happened, because that decides both the status the
//! client sees (502 unreachable, 504 too slow) and, with fallback, whether another backend
//! may be tried: nothing has reached the client yet at this point.

use crate::error::GatewayError;
use crate::route::Candidate;
use crate::upstream::h1::Driver;
use crate::upstream::headers;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use std::time::Duration;

/// How long a backend that refused a connection is passed over.
const DOWN_AFTER_CONNECT_ERROR: Duration = Duration::from_secs(5);

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
        cfg.api_key.as_ref().map(|k| k.expose()),
        request_id,
    );
    let failed = || GatewayError::UpstreamFailed {
        backend: cfg.name.clone(),
    };

    let result = match &backend.h1 {
        Some(pool) => {
            // Origin-form target and a Host header, as a client speaking to a server sends.
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(format!("{}{}", pool_prefix(&cfg.base_url), path))
                .body(Full::new(body))
                .map_err(|_| failed())?;
            *req.headers_mut() = headers;
            if let Ok(host) = HeaderValue::from_str(pool.authority()) {
                req.headers_mut().insert(http::header::HOST, host);
            }
            match tokio::time::timeout(timeout, pool.send(req)).await {
                Ok(Ok((resp, driver))) => Ok(Ok((resp, Some(driver)))),
                Ok(Err(e)) => Ok(Err((e.is_connect(), e.to_string()))),
                Err(_) => Err(()),
            }
        }
        None => {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(format!("{}{}", cfg.base_url, path))
                .body(Full::new(body))
                .map_err(|_| failed())?;
            *req.headers_mut() = headers;
            match tokio::time::timeout(timeout, backend.client.request(req)).await {
                Ok(Ok(resp)) => Ok(Ok((resp, None))),
                Ok(Err(e)) => Ok(Err((e.is_connect(), e.to_string()))),
                Err(_) => Err(()),
            }
        }
    };
    match result {
        Ok(Ok(ok)) => {
            backend.state.mark_up();
            Ok(ok)
        }
        Ok(Err((true, error))) => {
            tracing::warn!(backend = &*cfg.name, %error, "upstream connect failed");
            backend.state.mark_down(DOWN_AFTER_CONNECT_ERROR);
            count_error(&cfg.name, "connect");
            Err(GatewayError::UpstreamConnect {
                backend: cfg.name.clone(),
            })
        }
        Ok(Err((false, error))) => {
            tracing::warn!(backend = &*cfg.name, %error, "upstream request failed");
            count_error(&cfg.name, "request");
            Err(failed())
        }
        Err(()) => {
            tracing::warn!(
                backend = &*cfg.name,
                ?timeout,
                "upstream sent no response headers in time"
            );
            count_error(&cfg.name, "timeout");
            Err(GatewayError::UpstreamTimeout {
                backend: cfg.name.clone(),
            })
        }
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
