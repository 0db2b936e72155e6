//! Pass-through of an upstream response body, frame by frame, as it arrives.
//!
//! Nothing is buffered: each frame hyper hands us goes straight to the client connection,
//! and hyper's writer gathers frames that are ready together into one write. What this layer
//! adds is time and accounting:
//!
//! ```text
//!  upstream ──frame──► UpstreamBody ──frame──► client
//!                        │  timer: reset on every frame (streams) or a fixed deadline
//!                        │  silent too long / upstream broke:
//!                        │     SSE  -> one `data: {"error":…}` event, then end
//!                        │     JSON -> abort, so the client sees a truncated body
//!                        └─ Completion guard: recorded once at end, error, or drop
//! ```
//!
//! Dropping this body (the client went away) drops the upstream body, which closes the
//! upstream connection: a self-hosted server stops generating.

use crate::body::BodyError;
use crate::error::GatewayError;
use crate::record::{Completion, Outcome};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// When the body must have made progress by.
#[derive(Debug, Clone, Copy)]
pub enum Deadline {
    /// A stream: at most this long between two frames.
    Idle(Duration),
    /// A plain response: the whole body by this instant.
    At(Instant),
}

pin_project! {
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        #[pin]
        timer: Sleep,
        deadline: Deadline,
        sse: bool,
        done: bool,
        completion: Completion,
    }
}

// === impl UpstreamBody ===

impl UpstreamBody {
    pub fn new(inner: Incoming, deadline: Deadline, sse: bool, completion: Completion) -> Self {
        let at = match deadline {
            Deadline::Idle(d) => Instant::now() + d,
            Deadline::At(at) => at,
        };
        Self {
            inner,
            timer: tokio::time::sleep_until(at),
            deadline,
            sse,
            done: false,
            completion,
        }
    }

    fn fail(
        self: Pin<&mut Self>,
        error: BodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        *this.done = true;
        let ctx = this.completion.ctx();
        let backend = ctx.backend.clone().unwrap_or_else(|| "".into());
        tracing::warn!(request_id = ctx.id.as_str(), backend = &*backend, %error, "upstream body ended early");
        let kind = if matches!(error, BodyError::Timeout) {
            "stream_idle_timeout"
        } else {
            "body"
        };
        crate::upstream::forward::count_error(&backend, kind);
        this.completion.finish(Outcome::UpstreamBroken);
        if *this.sse {
            // An SSE client cannot get a new status code mid-stream; an `error` event is what
            // OpenAI's SDKs raise from.
            let err = match error {
                BodyError::Timeout => GatewayError::UpstreamTimeout { backend },
                BodyError::Upstream(_) => GatewayError::UpstreamFailed { backend },
            };
            let mut event = b"data: ".to_vec();
            event.extend_from_slice(&err.body_json());
            event.extend_from_slice(b"\n\n");
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            Poll::Ready(Some(Err(error)))
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut this = self.as_mut().project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if this.inner.is_end_stream() {
                    // A body of known length ends with its last frame: hyper will not poll
                    // again, so this is the end of the request.
                    *this.done = true;
                    this.completion.complete();
                } else if let Deadline::Idle(d) = *this.deadline {
                    this.timer.reset(Instant::now() + d);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => self.fail(BodyError::Upstream(e)),
            Poll::Ready(None) => {
                *this.done = true;
                this.completion.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                ready!(this.timer.poll(cx));
                self.fail(BodyError::Timeout)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not the inner body's view: the completion is recorded on the final poll.
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
