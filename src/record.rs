//! The completion guard: whatever way a proxied request ends (finished, upstream broke,
//! client went away), its outcome is recorded exactly once.
//!
//! The guard travels inside the response body, so the end of the body is the end of the
//! request; dropping it unfinished means the client closed the connection.

use crate::ctx::RequestCtx;
use crate::metrics as m;
use crate::route::health::InFlight;

/// How a proxied request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response was sent in full with this status.
    Complete(u16),
    /// The client closed the connection before the response ended.
    ClientClosed,
    /// The upstream failed or went silent after the response had started.
    UpstreamBroken,
}

impl Outcome {
    /// The `status` label: a status code or one of two words, a bounded set.
    fn label(self) -> std::borrow::Cow<'static, str> {
        match self {
            Outcome::Complete(code) => code.to_string().into(),
            Outcome::ClientClosed => "client_closed".into(),
            Outcome::UpstreamBroken => "upstream_broken".into(),
        }
    }
}

#[derive(Debug)]
pub struct Completion {
    ctx: RequestCtx,
    status: u16,
    _in_flight: Option<InFlight>,
    done: bool,
}

// === impl Completion ===

impl Completion {
    pub fn new(ctx: RequestCtx, status: u16, in_flight: InFlight) -> Self {
        Self {
            ctx,
            status,
            _in_flight: Some(in_flight),
            done: false,
        }
    }

    pub fn ctx(&self) -> &RequestCtx {
        &self.ctx
    }

    /// The response ended normally.
    pub fn complete(&mut self) {
        self.finish(Outcome::Complete(self.status));
    }

    pub fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self._in_flight = None;
        let ctx = &self.ctx;
        let backend = ctx.backend.clone().unwrap_or_else(|| "".into());
        let model = ctx
            .served_model
            .clone()
            .unwrap_or_else(|| ctx.requested_model.clone());
        let labels = [
            metrics::Label::new("team", ctx.principal.team.name.clone()),
            metrics::Label::new("model", model),
            metrics::Label::new("backend", backend),
            metrics::Label::new("status", outcome.label()),
        ];
        metrics::counter!(m::REQUESTS_TOTAL, labels.iter()).increment(1);
        metrics::histogram!(m::REQUEST_DURATION_SECONDS, labels.iter())
            .record(ctx.started.elapsed().as_secs_f64());
        tracing::debug!(request_id = ctx.id.as_str(), ?outcome, "request finished");
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.finish(Outcome::ClientClosed);
    }
}
