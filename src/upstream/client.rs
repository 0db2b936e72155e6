//! One pooled HTTP client per backend: keep-alive connections, HTTP/2 over TLS where the
//! backend offers it (ALPN), rustls with the webpki roots so no system OpenSSL is needed.

use crate::config::Backend;
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub fn build(backend: &Backend) -> UpstreamClient {
    https(backend.connect_timeout, backend.pool_idle_timeout)
}

/// The same client for any other URL the gateway posts to (the alerts webhook).
pub fn https(connect_timeout: Duration, pool_idle_timeout: Duration) -> UpstreamClient {
    let mut http = HttpConnector::new();
    // The TLS layer on top decides per URL; plain `http://` stays allowed for local servers.
    http.enforce_http(false);
    // SSE events are small writes that must leave at once.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool_idle_timeout)
        .build(https)
}
