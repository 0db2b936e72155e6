//! How a request ended, in the meter's terms: what the transport reports (an [`Outcome`]) and
//! what settling it decided (the [`Settled`] figures the client's last bytes carry).

use super::Usage;
use std::time::Instant;

/// How a request ended, in the ledger's `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The upstream answered 2xx and the client got all of it.
    Ok,
    /// The client left before the end.
    ClientClosed,
    /// The upstream failed or went silent after the response had started.
    UpstreamBroken,
    /// The upstream answered with an error status (passed through), or could not be reached.
    UpstreamError,
    /// The gateway refused it before asking any backend (bad input, unknown model, …).
    Rejected,
    /// The gateway ended a stream that would have run past its team's hard budget.
    BudgetCut,
    /// The gateway was shutting down and its grace period ended before the answer did.
    ShutDown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::ClientClosed => "client_closed",
            Status::UpstreamBroken => "upstream_broken",
            Status::UpstreamError => "upstream_error",
            Status::Rejected => "rejected",
            Status::BudgetCut => "budget_cut",
            Status::ShutDown => "shutdown",
        }
    }
}

/// Text the model generated, for a local count when the upstream reports no usage.
#[derive(Debug, Default)]
pub struct Generated {
    pub text: String,
    /// Bytes past what was kept; counted at 4 bytes a token.
    pub overflow_bytes: u64,
}

#[derive(Debug)]
pub struct Outcome {
    pub status: Status,
    pub http_status: u16,
    /// The upstream's own usage, when it reported one.
    pub usage: Option<Usage>,
    pub generated: Option<Generated>,
    pub response_bytes: u64,
    pub first_token_at: Option<Instant>,
}

/// A request's final figures.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub usage: Option<Usage>,
    pub cost_nusd: i64,
    pub priced: bool,
    /// The record reached the ledger; when false the response must not complete normally.
    pub committed: bool,
    /// The instant the request's duration was measured to: the gateway's own time of a
    /// response is measured on the same span, so it can never exceed the duration.
    pub ended: Instant,
}
