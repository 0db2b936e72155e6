//! Gives every request an id before anything else happens, so even a shed or rejected
//! request can be found in logs by the `x-tollgate-request-id` its client got.

use crate::ctx::RequestId;
use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};
use tower::{Layer, Service};

pub static X_TOLLGATE_REQUEST_ID: HeaderName = HeaderName::from_static("x-tollgate-request-id");

/// A UUID (RFC 9562 version 4 layout): a random per-process prefix and a counter, so ids are
/// unique across restarts without a syscall per request. It is also the `x-request-id` sent
/// upstream, and strict servers accept only UUIDs there (llama-cpp-python answers anything
/// else with 400).
pub fn next_id() -> RequestId {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let text = uuid_text(prefix, n);
    RequestId(HeaderValue::from_bytes(&text).expect("hex and dashes are a valid header value"))
}

/// `prefix` and `n` in a version-4, variant-1 UUID's text form. Written digit by digit:
/// `format!` cost about 3,000 instructions here, on every request (callgrind).
fn uuid_text(prefix: u64, n: u64) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = (prefix & !0xF000) | 0x4000; // version 4 in bits 12-15
    let lo = (n & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000; // variant 10
    let value = (u128::from(hi) << 64) | u128::from(lo);
    let mut out = [b'-'; 36];
    let mut digit = 0;
    for (i, c) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        *c = HEX[(value >> (124 - 4 * digit)) as usize & 0xF];
        digit += 1;
    }
    out
}

#[derive(Debug, Clone, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = SetRequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SetRequestId { inner }
    }
}

#[derive(Debug, Clone)]
pub struct SetRequestId<S> {
    inner: S,
}

// === impl SetRequestId ===

impl<S, B, RB> Service<Request<B>> for SetRequestId<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = next_id();
        let header = id.0.clone();
        req.extensions_mut().insert(id);
        ResponseFuture {
            inner: self.inner.call(req),
            id: Some(header),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            resp.headers_mut().insert(X_TOLLGATE_REQUEST_ID.clone(), id);
        }
        Poll::Ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_4_uuids() {
        let s = uuid_text(u64::MAX, 0);
        assert_eq!(&s, b"ffffffff-ffff-4fff-8000-000000000000");
        let s = uuid_text(0, u64::MAX);
        assert_eq!(&s, b"00000000-0000-4000-bfff-ffffffffffff");
        let s = uuid_text(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
        assert_eq!(&s, b"01234567-89ab-4def-bedc-ba9876543210");
        let a = next_id();
        let b = next_id();
        assert_ne!(a.as_str(), b.as_str());
        let parts: Vec<&str> = a.as_str().split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
    }
}
