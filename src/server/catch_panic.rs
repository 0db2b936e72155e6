//! Turns a panic while handling a request into a 500 for that request alone.
//!
//! Without it a panic unwinds the connection task: the client sees a reset with no status and
//! every other request on that HTTP/2 connection is lost. The panic is still a bug; it is
//! logged and counted so it gets fixed.

use super::EdgeBody;
use crate::error::GatewayError;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::{Layer, Service};

#[derive(Debug, Clone, Default)]
pub struct CatchPanicLayer;

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CatchPanic { inner }
    }
}

#[derive(Debug, Clone)]
pub struct CatchPanic<S> {
    inner: S,
}

// === impl CatchPanic ===

impl<S, B, RB> Service<Request<B>> for CatchPanic<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    RB: EdgeBody,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(inner) => CatchPanicFuture { inner: Some(inner) },
            Err(_) => {
                record_panic();
                CatchPanicFuture { inner: None }
            }
        }
    }
}

pin_project! {
    pub struct CatchPanicFuture<F> {
        #[pin]
        inner: Option<F>,
    }
}

impl<F, RB: EdgeBody> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Ok(RB::refusal(&GatewayError::Internal)));
        };
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                this.inner.set(None);
                record_panic();
                Poll::Ready(Ok(RB::refusal(&GatewayError::Internal)))
            }
        }
    }
}

fn record_panic() {
    tracing::error!("request handler panicked; answered 500");
    metrics::counter!(crate::metrics::REJECTED_TOTAL, "kind" => GatewayError::Internal.kind())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::GatewayBody;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panicking_handler_answers_500() {
        let svc = CatchPanicLayer.layer(tower::service_fn(|_req: Request<()>| async {
            if true {
                panic!("bug");
            }
            Ok::<_, Infallible>(Response::new(GatewayBody::empty()))
        }));
        let resp = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(resp.status(), 500);
    }
}
