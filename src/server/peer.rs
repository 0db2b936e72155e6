//! The address a request came from, which only the accept loop knows: it is put on each
//! request as the [`PEER`] header (overwriting any a client sent), for the `X-Forwarded-For`
//! the gateway sends upstream in place of whatever the client claimed. A header, not a
//! request extension: it is written once per connection and cloned per request, where an
//! extension would allocate its map on every request.

use http::{HeaderName, HeaderValue, Request};
use hyper::service::Service;
use std::net::SocketAddr;

/// The peer's IP, set by [`WithPeer`]; never forwarded (it is not on the allow list).
pub static PEER: HeaderName = HeaderName::from_static("x-tollgate-peer");

/// Wraps a connection's service so that each of its requests carries the peer's address.
#[derive(Debug, Clone)]
pub struct WithPeer<S> {
    inner: S,
    peer: HeaderValue,
}

impl<S> WithPeer<S> {
    pub fn new(inner: S, peer: SocketAddr) -> Self {
        let peer = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        Self { inner, peer }
    }
}

impl<S, B> Service<Request<B>> for WithPeer<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: Request<B>) -> Self::Future {
        req.headers_mut().insert(PEER.clone(), self.peer.clone());
        self.inner.call(req)
    }
}
