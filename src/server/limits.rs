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
                metrics::gauge!(m::IN_FLIGHT).increment(1.0);
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

/// The permit, and the gauge that mirrors it.
pub struct InFlightPermit {
    _permit: OwnedSemaphorePermit,
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
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
