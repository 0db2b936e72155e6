//! One attempt to send a request to one backend, up to its response headers.
//!
//! Failures are classified by where they happened, because that decides both the status the
//! client sees (502 unreachable, 504 too slow) and, with fallback, whether another backend
//! may be tried: nothing has reached the client yet at this point.

use crate::error::GatewayError;
use crate::route::Candidate;
use crate::upstream::headers;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use std::time::Duration;

/// How long a backend that refused a connection is passed over.
const DOWN_AFTER_CONNECT_ERROR: Duration = Duration::from_secs(5);

pub async fn send(
    candidate: &Candidate,
    path: &str,
    mut headers: HeaderMap,
    body: Bytes,
    request_id: &HeaderValue,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    let backend = &candidate.backend;
    let cfg = &backend.cfg;
    headers::to_upstream(
        &mut headers,
        cfg.api_key.as_ref().map(|k| k.expose()),
        request_id,
    );
    let uri = format!("{}{}", cfg.base_url, path);
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .body(Full::new(body))
        .map_err(|_| GatewayError::UpstreamFailed {
            backend: cfg.name.clone(),
        })?;
    *req.headers_mut() = headers;

    match tokio::time::timeout(timeout, backend.client.request(req)).await {
        Ok(Ok(resp)) => {
            backend.state.mark_up();
            Ok(resp)
        }
        Ok(Err(e)) if e.is_connect() => {
            tracing::warn!(backend = &*cfg.name, error = %e, "upstream connect failed");
            backend.state.mark_down(DOWN_AFTER_CONNECT_ERROR);
            count_error(&cfg.name, "connect");
            Err(GatewayError::UpstreamConnect {
                backend: cfg.name.clone(),
            })
        }
        Ok(Err(e)) => {
            tracing::warn!(backend = &*cfg.name, error = %e, "upstream request failed");
            count_error(&cfg.name, "request");
            Err(GatewayError::UpstreamFailed {
                backend: cfg.name.clone(),
            })
        }
        Err(_) => {
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

pub fn count_error(backend: &std::sync::Arc<str>, kind: &'static str) {
    metrics::counter!(crate::metrics::UPSTREAM_ERRORS_TOTAL, "backend" => backend.clone(), "kind" => kind)
        .increment(1);
}
