//! Pass-through of an upstream SSE stream, event by event, as it arrives.
//!
//! Nothing waits for more than the rest of its own event: each event goes to the client
//! connection once its blank line arrives, and hyper's writer gathers events that are ready
//! together into one write. This layer adds time, metering and the ending:
//!
//! ```text
//!  upstream ──frame──► SseObserver (usage, text, [DONE] held) ──events──► client
//!     │ silent > stream_idle_timeout, or broke: settle as upstream_broken, error event
//!     │ ended: settle ─► ledger commit ─► `: tollgate {cost…}` ─► `data: [DONE]` ─► end
//!     └ client left: cancel (drop upstream) or drain (read on for the provider's usage),
//!       as the backend's on_disconnect says; the record is written either way
//! ```
//!
//! The transport only reports: how the stream ended goes to a [`StreamEnd`] (the meter
//! settles it), and the bytes of the ending are written by the client protocol's
//! [`StreamWire`]. It knows neither the ledger nor the wire format of the client.

use crate::api::anthropic::{FromAnthropic, ToAnthropic};
use crate::api::endpoint::Endpoint;
use crate::config::OnDisconnect;
use crate::error::GatewayError;
use crate::meter::sse::{SseObserver, Violation};
use crate::meter::{Generated, Outcome, Settled, Status, Usage};
use crate::route::health::{BackendState, Failure};
use crate::tasks::{EndWatch, Tasks};
use crate::upstream::h1::Driver;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body failed: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("upstream went silent for longer than its idle timeout")]
    Timeout,
}

/// Where a stream reports how it ended; the meter decides what that costs.
pub trait StreamEnd: Send + 'static {
    /// The stream ended with its client still there: the settled figures come back, to be
    /// written before the last bytes.
    fn finish(self: Box<Self>, outcome: Outcome) -> oneshot::Receiver<Settled>;
    /// The client left: nobody waits for the figures.
    fn abandon(self: Box<Self>, outcome: Outcome);
}

/// Who a stream answers, for the chunks the gateway writes itself.
#[derive(Debug, Clone)]
pub struct Who {
    pub request_id: String,
    pub model: Arc<str>,
    pub endpoint: Endpoint,
}

/// How a stream ends, for the client protocol to write.
#[derive(Debug)]
pub struct Ending<'a> {
    pub who: &'a Who,
    pub status: Status,
    /// The settled figures, when the record was committed.
    pub settled: Option<&'a Settled>,
    /// What ended the stream early, when something did.
    pub error: Option<&'a GatewayError>,
    /// The client asked for usage and the stream's own is not what was billed: the
    /// gateway's figures go out as a usage chunk.
    pub gateway_usage: bool,
    /// The upstream ended its stream properly (`[DONE]`).
    pub saw_done: bool,
}

/// A client protocol's stream endings (OpenAI's `data: [DONE]`, Anthropic's `message_stop`).
pub trait StreamWire: Send + Sync + 'static {
    /// The bytes after the upstream's last event.
    fn ending(&self, ending: &Ending<'_>) -> Vec<u8>;
}

impl Ending<'_> {
    /// The gateway's own closing comment, `: tollgate {"cost_usd":…}` and a blank line, which
    /// SSE clients ignore; every protocol writes it before its end.
    pub fn cost_comment(&self, out: &mut Vec<u8>) {
        let Some(s) = self.settled else { return };
        let Some(u) = s.usage else { return };
        let cost = if s.priced {
            crate::meter::format_usd(s.cost_nusd)
        } else {
            "null".into()
        };
        out.extend_from_slice(
            format!(
                r#": tollgate {{"cost_usd":{cost},"prompt_tokens":{},"completion_tokens":{},"token_source":"{}"{}{}}}"#,
                u.prompt,
                u.completion,
                u.source.as_str(),
                if self.gateway_usage { r#","usage_chunk":"gateway""# } else { "" },
                if self.status == Status::BudgetCut { r#","ended_by":"budget""# } else { "" }
            )
            .as_bytes(),
        );
        out.extend_from_slice(b"\n\n");
    }

    /// The usage the client was billed, when the gateway must send it itself.
    pub fn gateway_usage(&self) -> Option<Usage> {
        self.settled
            .and_then(|s| s.usage)
            .filter(|_| self.gateway_usage)
    }
}

enum State {
    Streaming,
    /// Waiting for the record to be committed before the last bytes.
    Settling {
        rx: oneshot::Receiver<Settled>,
        status: Status,
        error: Option<GatewayError>,
    },
    Done,
}

pub struct UpstreamBody {
    inner: Option<Incoming>,
    timer: Pin<Box<Sleep>>,
    idle: Duration,
    observer: SseObserver,
    state: State,
    end: Option<Box<dyn StreamEnd>>,
    wire: &'static dyn StreamWire,
    on_disconnect: OnDisconnect,
    backend: Arc<str>,
    /// The backend's health learns how its stream ended.
    health: Arc<BackendState>,
    http_status: u16,
    response_bytes: u64,
    first_token_at: Option<std::time::Instant>,
    /// Generated tokens (events) the team's hard budget leaves room for; past it, the stream
    /// is ended cleanly by the gateway.
    output_limit: Option<u64>,
    who: Who,
    /// The connection to poll alongside the body (plain-http backends; see `upstream::h1`).
    driver: Option<Driver>,
    /// The client asked for `stream_options.include_usage`: it gets a usage chunk even when
    /// the engine sends none, or one that was not billed (the gateway's counts, then).
    client_usage: bool,
    /// Where a stream drained after its client left goes on (shutdown waits for it).
    tasks: Tasks,
    /// Set with the tasks: tells the stream when shutdown ends open streams.
    end_watch: Option<EndWatch>,
    /// An Anthropic backend's events, as the OpenAI chunks the meter reads.
    from_backend: Option<FromAnthropic>,
    /// The metered OpenAI stream as Anthropic events, for an Anthropic client.
    to_client: Option<ToAnthropic>,
}

// === impl UpstreamBody ===

impl UpstreamBody {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: Incoming,
        observer: SseObserver,
        end: Box<dyn StreamEnd>,
        wire: &'static dyn StreamWire,
        who: Who,
        backend: &crate::route::RouteBackend,
        http_status: u16,
    ) -> Self {
        let idle = backend.cfg.stream_idle_timeout;
        Self {
            inner: Some(inner),
            timer: Box::pin(tokio::time::sleep(idle)),
            idle,
            observer,
            state: State::Streaming,
            end: Some(end),
            wire,
            on_disconnect: backend.cfg.on_disconnect,
            backend: backend.cfg.name.clone(),
            health: backend.state.clone(),
            http_status,
            response_bytes: 0,
            first_token_at: None,
            output_limit: None,
            who,
            driver: None,
            client_usage: false,
            tasks: Tasks::default(),
            end_watch: None,
            from_backend: None,
            to_client: None,
        }
    }

    /// Translators around the meter for the protocols of the backend and the client.
    pub fn with_translation(
        mut self,
        from_backend: Option<FromAnthropic>,
        to_client: Option<ToAnthropic>,
    ) -> Self {
        self.from_backend = from_backend;
        self.to_client = to_client;
        self
    }

    /// Bytes for the client, in its protocol.
    fn for_client(&mut self, b: Bytes) -> Bytes {
        match self.to_client.as_mut() {
            Some(t) => t.feed(&b),
            None => b,
        }
    }

    pub fn with_tasks(mut self, tasks: Tasks) -> Self {
        self.end_watch = Some(tasks.end_watch());
        self.tasks = tasks;
        self
    }

    pub fn with_client_usage(mut self, asked: bool) -> Self {
        self.client_usage = asked;
        self
    }

    pub fn with_driver(mut self, driver: Option<Driver>) -> Self {
        self.driver = driver;
        self
    }

    /// Ends the stream after this many generated tokens (the budget's room).
    pub fn with_output_limit(mut self, limit: Option<u64>) -> Self {
        self.output_limit = limit;
        self
    }

    fn outcome(&mut self, status: Status) -> Outcome {
        let (text, overflow_bytes) = self.observer.take_generated();
        Outcome {
            status,
            http_status: self.http_status,
            usage: self.observer.reported(),
            generated: Some(Generated {
                text,
                overflow_bytes,
            }),
            response_bytes: self.response_bytes,
            first_token_at: self.first_token_at,
        }
    }

    /// Ends the upstream side and starts settling; `error` is what the client is told.
    fn settle(&mut self, status: Status, error: Option<GatewayError>) -> Option<Bytes> {
        let leftover = self.observer.finish();
        self.inner = None;
        // A connection left mid-body cannot be reused: closing it stops the backend.
        self.driver = None;
        let outcome = self.outcome(status);
        let rx = self.end.take().expect("settled once").finish(outcome);
        self.state = State::Settling { rx, status, error };
        leftover
    }

    fn broken(&mut self, error: BodyError) -> Option<Bytes> {
        tracing::warn!(backend = &*self.backend, %error, "upstream stream ended early");
        let error_kind = matches!(error, BodyError::Timeout);
        let (kind, err) = match error {
            BodyError::Timeout => (
                "stream_idle_timeout",
                GatewayError::UpstreamTimeout {
                    backend: self.backend.clone(),
                },
            ),
            BodyError::Upstream(_) => (
                "body",
                GatewayError::UpstreamFailed {
                    backend: self.backend.clone(),
                },
            ),
        };
        crate::upstream::forward::count_error(&self.backend, kind);
        self.health.on_failure(match error_kind {
            true => Failure::Timeout,
            false => Failure::Broken,
        });
        self.settle(Status::UpstreamBroken, Some(err))
    }

    fn violated(&mut self, violation: Violation) {
        tracing::warn!(
            backend = &*self.backend,
            violation = violation.as_str(),
            "upstream broke the SSE protocol; ending the stream"
        );
        crate::upstream::forward::count_error(&self.backend, violation.as_str());
        self.health.on_failure(Failure::Broken);
        let err = GatewayError::UpstreamFailed {
            backend: self.backend.clone(),
        };
        let _ = self.settle(Status::UpstreamBroken, Some(err));
    }

    /// The bytes after the upstream's last event, in the client's protocol.
    fn ending(
        &self,
        settled: Option<Settled>,
        status: Status,
        error: Option<GatewayError>,
    ) -> Bytes {
        let settled = settled.filter(|s| s.committed);
        // A record that did not reach the ledger ends the answer with an error: the client
        // must not take it for a complete one.
        let error = match (&settled, error) {
            (None, e) => Some(e.unwrap_or(GatewayError::LedgerUnavailable)),
            (Some(_), e) => e,
        };
        // The client asked for usage and the stream's own is not what was billed (none
        // came, or it was not to be trusted): the gateway's goes last.
        let gateway_usage = settled.as_ref().is_some_and(|s| {
            self.client_usage && s.usage.is_some() && self.observer.usage != s.usage
        });
        Bytes::from(self.wire.ending(&Ending {
            who: &self.who,
            status,
            settled: settled.as_ref(),
            error: error.as_ref(),
            gateway_usage,
            saw_done: self.observer.saw_done,
        }))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        // Events already here leave together, in one write; none waits for a later one.
        let mut batch = Batch::default();
        loop {
            match &mut this.state {
                _ if batch.len() >= MAX_BATCH_BYTES => return batch.ready(),
                State::Done if batch.is_empty() => return Poll::Ready(None),
                State::Settling { .. } | State::Done if !batch.is_empty() => return batch.ready(),
                State::Done => unreachable!("handled above"),
                State::Settling { rx, status, error } => {
                    let settled = match Pin::new(rx).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r.ok(),
                    };
                    let (status, error) = (*status, error.take());
                    let ending = this.ending(settled, status, error);
                    let ending = this.for_client(ending);
                    this.state = State::Done;
                    return Poll::Ready(Some(Ok(Frame::data(ending))));
                }
                State::Streaming => {}
            }
            if let Some(d) = this.driver.as_mut() {
                let _ = d.poll_io(cx);
            }
            let inner = this.inner.as_mut().expect("streaming has an upstream");
            let leftover = match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    this.response_bytes += data.len() as u64;
                    this.timer.as_mut().reset(Instant::now() + this.idle);
                    let data = match this.from_backend.as_mut().map(|t| t.feed(&data)) {
                        None => data,
                        Some(Ok(chunks)) if chunks.is_empty() => continue,
                        Some(Ok(chunks)) => chunks,
                        Some(Err(_)) => {
                            this.violated(Violation::MalformedEvent);
                            continue;
                        }
                    };
                    if let Some(out) = this.observer.feed(data) {
                        let out = this.for_client(out);
                        batch.push(out);
                    }
                    if this.first_token_at.is_none() && this.observer.content_events > 0 {
                        this.first_token_at = Some(crate::clock::now());
                    }
                    if let Some(v) = this.observer.violation {
                        // What came before the bad event went out; the client now gets a
                        // clean error event, and the record what was generated until then.
                        this.violated(v);
                        continue;
                    }
                    if this
                        .output_limit
                        .is_some_and(|l| this.observer.content_events > l)
                    {
                        // Past the budget's room: stop the upstream; the events already here
                        // go out, then the gateway's own ending.
                        tracing::info!(
                            backend = &*this.backend,
                            "stream ended at its team's hard budget"
                        );
                        let _partial = this.settle(Status::BudgetCut, None);
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => this.broken(BodyError::Upstream(e)),
                Poll::Ready(None) => {
                    if let Some(d) = this.driver.take() {
                        d.release();
                    }
                    this.settle(Status::Ok, None)
                }
                Poll::Pending if !batch.is_empty() => return batch.ready(),
                // Asked only while waiting on the upstream: a flowing stream pays nothing.
                Poll::Pending if this.end_watch.as_mut().is_some_and(|w| w.poll_ended(cx)) => {
                    tracing::info!(backend = &*this.backend, "stream ended by shutdown");
                    this.settle(Status::ShutDown, Some(GatewayError::ShuttingDown))
                }
                Poll::Pending => match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.broken(BodyError::Timeout),
                    Poll::Pending => return Poll::Pending,
                },
            };
            if let Some(b) = leftover {
                let b = this.for_client(b);
                batch.push(b);
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A batch larger than this goes out without waiting for more ready events.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Event bytes gathered for one write: the first frame as it came, copied only if a second
/// one joins it.
#[derive(Default)]
struct Batch {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl Batch {
    fn push(&mut self, b: Bytes) {
        match (&self.first, &mut self.more) {
            (None, _) => self.first = Some(b),
            (Some(_), Some(m)) => m.extend_from_slice(&b),
            (Some(f), None) => {
                let mut m = BytesMut::with_capacity((f.len() + b.len()) * 4);
                m.extend_from_slice(f);
                m.extend_from_slice(&b);
                self.more = Some(m);
            }
        }
    }

    fn len(&self) -> usize {
        self.more
            .as_ref()
            .map_or_else(|| self.first.as_ref().map_or(0, Bytes::len), BytesMut::len)
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn ready(self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let bytes = match (self.first, self.more) {
            (_, Some(m)) => m.freeze(),
            (Some(f), None) => f,
            (None, None) => return Poll::Ready(None),
        };
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let (Some(end), Some(inner)) = (self.end.take(), self.inner.take()) else {
            return;
        };
        // The client left mid-stream.
        match (self.on_disconnect, tokio::runtime::Handle::try_current()) {
            (OnDisconnect::Drain, Ok(_)) => {
                let tasks = self.tasks.clone();
                let mut drain = UpstreamBody {
                    inner: Some(inner),
                    timer: Box::pin(tokio::time::sleep(self.idle)),
                    idle: self.idle,
                    observer: std::mem::take(&mut self.observer),
                    state: State::Streaming,
                    end: None,
                    wire: self.wire,
                    on_disconnect: OnDisconnect::Cancel,
                    backend: self.backend.clone(),
                    health: self.health.clone(),
                    http_status: self.http_status,
                    response_bytes: self.response_bytes,
                    first_token_at: self.first_token_at,
                    output_limit: None,
                    who: self.who.clone(),
                    driver: self.driver.take(),
                    client_usage: false,
                    tasks: self.tasks.clone(),
                    end_watch: self.end_watch.take(),
                    from_backend: self.from_backend.take(),
                    to_client: None,
                };
                tasks.spawn(async move {
                    // Read to the end for the provider's own usage; what is read goes nowhere.
                    // Shutdown's end stops it too: what was read so far is billed.
                    loop {
                        let (inner, driver, watch) = (
                            drain.inner.as_mut().expect("just set"),
                            &mut drain.driver,
                            &mut drain.end_watch,
                        );
                        let next = tokio::time::timeout(
                            drain.idle,
                            std::future::poll_fn(|cx| {
                                if let Some(d) = driver.as_mut() {
                                    let _ = d.poll_io(cx);
                                }
                                match Pin::new(&mut *inner).poll_frame(cx) {
                                    Poll::Pending
                                        if watch.as_mut().is_some_and(|w| w.poll_ended(cx)) =>
                                    {
                                        Poll::Ready(None)
                                    }
                                    other => other,
                                }
                            }),
                        )
                        .await;
                        match next {
                            Ok(Some(Ok(frame))) => {
                                if let Ok(data) = frame.into_data() {
                                    drain.response_bytes += data.len() as u64;
                                    let data = match drain.from_backend.as_mut() {
                                        Some(t) => t.feed(&data).unwrap_or_default(),
                                        None => data,
                                    };
                                    drain.observer.feed(data);
                                }
                            }
                            _ => break,
                        }
                    }
                    let _ = drain.observer.finish();
                    drain.inner = None;
                    end.abandon(drain.outcome(Status::ClientClosed));
                });
            }
            _ => {
                drop(inner);
                let _ = self.observer.finish();
                end.abandon(self.outcome(Status::ClientClosed));
            }
        }
    }
}
