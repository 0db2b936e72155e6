//! Limits that protect the gateway itself: requests in flight (shed, never queue) and
//! request body size.

use super::EdgeBody;
use crate::error::GatewayError;
use crate::metrics as m;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

/// At most `max` requests in flight; the next gets 503 at once. Queueing would only turn
/// overload into timeouts for everyone, and a client's retry to another replica is cheaper.
#[derive(Debug, Clone)]
pub struct InFlightLimitLayer {
    permits: Arc<Semaphore>,
}

impl InFlightLimitLayer {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
        }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            permits: self.permits.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InFlightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

// === impl InFlightLimit ===

impl<S, B, RB> Service<Request<B>> for InFlightLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    RB: EdgeBody,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = LimitFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                in_flight_gauge().increment(1.0);
                LimitFuture::Admitted {
                    inner: self.inner.call(req),
                    permit: Some(InFlightPermit { _permit: permit }),
                }
            }
            Err(_) => {
                metrics::counter!(m::REJECTED_TOTAL, "kind" => GatewayError::Overloaded.kind())
                    .increment(1);
                LimitFuture::Shed {
                    resp: Some(RB::refusal(&GatewayError::Overloaded)),
                }
            }
        }
    }
}

/// `tollgate_in_flight`, looked up once rather than per request.
fn in_flight_gauge() -> &'static metrics::Gauge {
    static GAUGE: std::sync::OnceLock<metrics::Gauge> = std::sync::OnceLock::new();
    GAUGE.get_or_init(|| {
        let _ = m::install();
        metrics::gauge!(m::IN_FLIGHT)
    })
}

/// The permit, and the gauge that mirrors it.
pub struct InFlightPermit {
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        in_flight_gauge().decrement(1.0);
    }
}

pin_project! {
    #[project = LimitProj]
    pub enum LimitFuture<F, RB> {
        Admitted { #[pin] inner: F, permit: Option<InFlightPermit> },
        Shed { resp: Option<Response<RB>> },
    }
}

impl<F, RB: EdgeBody> Future for LimitFuture<F, RB>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
{
    type Output = Result<Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            LimitProj::Admitted { inner, permit } => {
                let mut resp = std::task::ready!(inner.poll(cx))?;
                if let Some(p) = permit.take() {
                    resp.body_mut().hold(p);
                }
                Poll::Ready(Ok(resp))
            }
            LimitProj::Shed { resp } => Poll::Ready(Ok(resp
                .take()
                .expect("LimitFuture polled after completion"))),
        }
    }
}

/// Requests in flight per API key. The global limit alone lets one tenant whose requests
/// hang (slow bodies, stuck streams) hold every slot; with a share each, the others still
/// get in.
#[derive(Debug)]
pub struct KeyShares {
    max: usize,
    held: dashmap::DashMap<Arc<str>, usize>,
}

/// One request's place in its key's share, given back on drop.
#[derive(Debug)]
pub struct KeyShare {
    shares: Arc<KeyShares>,
    key: Arc<str>,
}

impl KeyShares {
    pub fn new(max_per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max_per_key,
            held: dashmap::DashMap::new(),
        })
    }

    /// A place for one more request of `key`, or 429 when it holds its whole share.
    pub fn enter(self: &Arc<Self>, key: &Arc<str>) -> Result<KeyShare, GatewayError> {
        let mut held = self.held.entry(key.clone()).or_insert(0);
        if *held >= self.max {
            metrics::counter!(m::REJECTED_TOTAL, "kind" => "key_in_flight").increment(1);
            return Err(GatewayError::KeyInFlight { limit: self.max });
        }
        *held += 1;
        Ok(KeyShare {
            shares: self.clone(),
            key: key.clone(),
        })
    }
}

impl Drop for KeyShare {
    fn drop(&mut self) {
        // The entry goes with its last request: keys that come and go leave nothing behind.
        self.shares.held.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

/// Refuses requests whose headers are over the limits before anything reads them.
///
/// The framing request smuggling relies on, `Transfer-Encoding` beside `Content-Length`, never
/// reaches here: hyper's parser lets the chunked coding win, drops `Content-Length` and
/// closes the connection after the response (RFC 9112 §6.1), and the gateway frames its own
/// upstream requests, so neither header is passed on.
pub fn check_headers(
    headers: &http::HeaderMap,
    max_bytes: usize,
    max_count: usize,
) -> Result<(), GatewayError> {
    if headers.len() > max_count {
        return Err(GatewayError::HeadersTooLarge(format!(
            "{} header lines, the limit is {max_count}",
            headers.len()
        )));
    }
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes > max_bytes {
        return Err(GatewayError::HeadersTooLarge(format!(
            "{bytes} bytes of headers, the limit is {max_bytes}"
        )));
    }
    Ok(())
}

/// Reads a whole request body, refusing more than `limit` bytes: early from
/// `Content-Length`, and while reading for chunked bodies that lie about nothing.
pub async fn read_body<B>(
    body: B,
    content_length: Option<u64>,
    limit: u64,
) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if content_length.is_some_and(|n| n > limit) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::BodyTooLarge { limit })
        }
        Err(_) => Err(GatewayError::BodyRead),
    }
}
