//! The address a request came from, which only the accept loop knows: it is put on each
//! request as a [`ClientAddr`] extension, for the `X-Forwarded-For` the gateway sends upstream
//! in place of whatever the client claimed.

use http::Request;
use hyper::service::Service;
use std::net::SocketAddr;

/// The TCP peer of the connection a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Wraps a connection's service so that each of its requests carries the peer's address.
#[derive(Debug, Clone)]
pub struct WithPeer<S> {
    inner: S,
    peer: SocketAddr,
}

impl<S> WithPeer<S> {
    pub fn new(inner: S, peer: SocketAddr) -> Self {
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
        req.extensions_mut().insert(ClientAddr(self.peer));
        self.inner.call(req)
    }
}
