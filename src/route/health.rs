//! Per-backend run-time state: requests in flight, a circuit breaker, a "busy" mark from 429s,
//! and a latency average; plus the active probe that watches self-hosted servers.
//!
//! The breaker is passive first: `circuit_failures` consecutive failures (5xx, timeouts,
//! broken connections) open it, and a refused connection opens it at once, since nothing
//! will answer there. After `circuit_open` one request is let through as a probe (half-open);
//! its success closes the circuit, its failure opens it again. The active probe speeds up
//! both directions: a failed probe opens the circuit before a user request finds the backend
//! dead, and a good one brings it back without waiting for a user request to risk it.
//!
//! Everything is atomics: the router reads this state for every candidate of every request.

use crate::clock::{Clock, SystemClock};
use crate::config::Routing;
use crate::metrics as m;
use crate::route::occupancy::Occupancy;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why a circuit opened, kept for the route explanation and `/admin/backends`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Failure {
    Connect = 1,
    Timeout = 2,
    ServerError = 3,
    Broken = 4,
    ProbeFailed = 5,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::ServerError => "5xx",
            Failure::Broken => "broken",
            Failure::ProbeFailed => "probe",
        }
    }

    fn from_u8(v: u8) -> Option<Failure> {
        Some(match v {
            1 => Failure::Connect,
            2 => Failure::Timeout,
            3 => Failure::ServerError,
            4 => Failure::Broken,
            5 => Failure::ProbeFailed,
            _ => return None,
        })
    }
}

/// Whether a backend may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Up,
    /// The circuit's open time is over: one request may go as a probe.
    HalfOpen,
    /// Circuit open; `for_ms` until a probe is allowed.
    Open {
        reason: Option<Failure>,
        for_ms: u64,
    },
    /// A half-open probe request is already out.
    Probing,
    /// It answered 429; avoided for its `Retry-After`.
    Busy {
        for_ms: u64,
    },
}

/// A half-open probe that never reported back (its task died) frees the slot after this.
const PROBE_STALE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct BackendState {
    name: Arc<str>,
    in_flight: AtomicU32,
    /// `tollgate_backend_in_flight` and `tollgate_overhead_seconds` of this backend, looked
    /// up once: a lookup per request builds and hashes the series key each time.
    in_flight_gauge: ::metrics::Gauge,
    pub overhead: ::metrics::Histogram,
    consecutive_failures: AtomicU32,
    /// [`now_ms`] until which the circuit is open; 0 = closed. Past it: half-open.
    open_until_ms: AtomicU64,
    /// [`now_ms`] when the current half-open probe request left; 0 = none out.
    probe_since_ms: AtomicU64,
    busy_until_ms: AtomicU64,
    last_failure: AtomicU8,
    /// Time to response headers, microseconds, exponentially weighted; 0 = not yet seen.
    latency_us: AtomicU64,
    /// An active prober runs for this backend name.
    probing: AtomicBool,
    /// The breaker's settings (`[routing]`), set by each config build.
    circuit_failures: AtomicU32,
    circuit_open_ms: AtomicU64,
    /// Wall-time accounting (busy time, GPU hours paid and charged), on the gateway's clock.
    pub occupancy: Occupancy,
    /// What each model's chat template adds to prompts, learned from the engine's counts.
    pub template: crate::meter::template::TemplateMemory,
    /// Requests waiting at the gateway for a slot, and how they learn that one freed.
    waiting: AtomicU32,
    slot_freed: tokio::sync::Notify,
    clock: Arc<dyn Clock>,
}

// === impl BackendState ===

impl BackendState {
    pub fn new(name: Arc<str>) -> Self {
        Self::with_clock(name, Arc::new(SystemClock))
    }

    pub fn with_clock(name: Arc<str>, clock: Arc<dyn Clock>) -> Self {
        // Handles made before the recorder exists would count nothing, for good.
        let _ = m::install();
        ::metrics::gauge!(m::BACKEND_UP, "backend" => name.clone()).set(1.0);
        let in_flight_gauge = ::metrics::gauge!(m::BACKEND_IN_FLIGHT, "backend" => name.clone());
        in_flight_gauge.set(0.0);
        Self {
            overhead: ::metrics::histogram!(m::OVERHEAD_SECONDS, "backend" => name.clone()),
            in_flight_gauge,
            name,
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probe_since_ms: AtomicU64::new(0),
            busy_until_ms: AtomicU64::new(0),
            last_failure: AtomicU8::new(0),
            latency_us: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            circuit_failures: AtomicU32::new(crate::config::DEFAULT_CIRCUIT_FAILURES),
            circuit_open_ms: AtomicU64::new(
                (crate::config::DEFAULT_CIRCUIT_OPEN_S * 1000.0) as u64,
            ),
            occupancy: Occupancy::new(clock.now_us()),
            template: Default::default(),
            waiting: AtomicU32::new(0),
            slot_freed: tokio::sync::Notify::new(),
            clock,
        }
    }

    /// Marks an active prober as running for this backend; false when one already is.
    pub fn start_probing(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub fn stop_probing(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Takes a (re)loaded backend's GPU cost and cap, for its economics.
    pub fn set_cost(&self, backend: &crate::config::Backend) {
        self.occupancy.configure(backend, self.clock.now_us());
    }

    /// Takes the breaker settings of a (re)loaded config.
    pub fn configure(&self, policy: &Routing) {
        self.circuit_failures
            .store(policy.circuit_failures, Ordering::Relaxed);
        self.circuit_open_ms
            .store(policy.circuit_open.as_millis() as u64, Ordering::Relaxed);
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.circuit_open_ms.load(Ordering::Relaxed))
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn availability(&self) -> Availability {
        let open_until = self.open_until_ms.load(Ordering::Relaxed);
        let busy_until = self.busy_until_ms.load(Ordering::Relaxed);
        if open_until == 0 && busy_until == 0 {
            return Availability::Up;
        }
        let now = self.clock.now_ms();
        if open_until != 0 {
            if now < open_until {
                return Availability::Open {
                    reason: Failure::from_u8(self.last_failure.load(Ordering::Relaxed)),
                    for_ms: open_until - now,
                };
            }
            let since = self.probe_since_ms.load(Ordering::Relaxed);
            if since != 0 && now.saturating_sub(since) < PROBE_STALE.as_millis() as u64 {
                return Availability::Probing;
            }
            return Availability::HalfOpen;
        }
        if now < busy_until {
            return Availability::Busy {
                for_ms: busy_until - now,
            };
        }
        Availability::Up
    }

    /// Takes the half-open probe slot; false when another request took it first.
    pub fn try_probe(&self) -> bool {
        let now = self.clock.now_ms();
        let since = self.probe_since_ms.load(Ordering::Relaxed);
        if since != 0 && now.saturating_sub(since) < PROBE_STALE.as_millis() as u64 {
            return false;
        }
        self.probe_since_ms
            .compare_exchange(since, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Shorthand for the admin view and tests: not open and not busy.
    pub fn is_up(&self) -> bool {
        matches!(
            self.availability(),
            Availability::Up | Availability::HalfOpen
        )
    }

    /// A response's headers arrived (any status the backend answers normally).
    pub fn on_success(&self, latency: Duration) {
        let sample = latency.as_micros().max(1) as u64;
        let old = self.latency_us.load(Ordering::Relaxed);
        // Weight 1/8: smooth enough to ignore one slow answer, quick enough to follow a trend.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.latency_us.store(new, Ordering::Relaxed);
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.open_until_ms.load(Ordering::Relaxed) != 0 {
            self.close();
        }
    }

    pub fn on_failure(&self, failure: Failure) {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let half_open = self.open_until_ms.load(Ordering::Relaxed) != 0;
        if half_open
            || failure == Failure::Connect
            || n >= self.circuit_failures.load(Ordering::Relaxed)
        {
            self.open(failure, self.open_for());
        }
    }

    /// The backend answered 429: pass over it for `retry_after`.
    pub fn on_busy(&self, retry_after: Duration) {
        let until = self.clock.now_ms() + retry_after.as_millis() as u64;
        self.busy_until_ms.fetch_max(until, Ordering::Relaxed);
        tracing::info!(
            backend = &*self.name,
            ?retry_after,
            "backend is rate limiting; avoiding it"
        );
    }

    /// The result of an active probe.
    pub fn on_probe(&self, ok: bool) {
        match (ok, self.open_until_ms.load(Ordering::Relaxed)) {
            (true, 0) => {}
            (true, _) => {
                // The server answers again. If it was unreachable, it is back; if it failed
                // requests, let the next request check that as a half-open probe.
                match Failure::from_u8(self.last_failure.load(Ordering::Relaxed)) {
                    Some(Failure::ServerError | Failure::Broken) => self
                        .open_until_ms
                        .store(self.clock.now_ms(), Ordering::Relaxed),
                    _ => self.close(),
                }
            }
            // Down, or still down: out for another period.
            (false, _) => self.open(Failure::ProbeFailed, self.open_for()),
        }
    }

    fn open(&self, failure: Failure, for_: Duration) {
        self.last_failure.store(failure as u8, Ordering::Relaxed);
        let was = self.open_until_ms.swap(
            self.clock.now_ms() + for_.as_millis() as u64,
            Ordering::Relaxed,
        );
        self.probe_since_ms.store(0, Ordering::Relaxed);
        if was == 0 {
            tracing::warn!(
                backend = &*self.name,
                reason = failure.as_str(),
                ?for_,
                "circuit opened: backend taken out of routing"
            );
            ::metrics::gauge!(m::BACKEND_UP, "backend" => self.name.clone()).set(0.0);
        }
    }

    fn close(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.probe_since_ms.store(0, Ordering::Relaxed);
        if self.open_until_ms.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(
                backend = &*self.name,
                "circuit closed: backend back in routing"
            );
            ::metrics::gauge!(m::BACKEND_UP, "backend" => self.name.clone()).set(1.0);
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Time to response headers, weighted average; `None` before the first answer.
    pub fn latency(&self) -> Option<Duration> {
        match self.latency_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Counts one request against this backend if it is under `max` in flight; atomic, so
    /// concurrent requests cannot overrun the cap between looking and entering.
    pub fn try_enter(self: &Arc<Self>, max: Option<u32>) -> Option<InFlight> {
        let Some(max) = max else {
            return Some(self.enter());
        };
        let mut cur = self.in_flight.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.occupancy.enter(self.clock.now_us());
        self.in_flight_gauge.increment(1.0);
        Some(InFlight {
            state: self.clone(),
            probe: false,
        })
    }

    /// Waits at the gateway for one of `max` slots, until `deadline`. A backend at its cap
    /// is not sent more: some engines (llama-cpp-python) cut their running stream short when
    /// another request waits, and every engine serves a cap it was sized for.
    pub async fn enter_waiting(
        self: &Arc<Self>,
        max: u32,
        deadline: tokio::time::Instant,
    ) -> Option<InFlight> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = scopeguard_waiting(self);
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a slot freed in between is not missed.
            freed.as_mut().enable();
            if let Some(g) = self.try_enter(Some(max)) {
                return Some(g);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }

    /// Requests waiting for a slot here now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts one request against this backend until the guard drops (end of its body).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.occupancy.enter(self.clock.now_us());
        self.in_flight_gauge.increment(1.0);
        InFlight {
            state: self.clone(),
            probe: false,
        }
    }
}

/// One request counted against a backend, until it ends.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<BackendState>,
    /// This request is the half-open probe: when it ends without a verdict (refused by a
    /// budget, abandoned), the probe slot must not stay taken.
    probe: bool,
}

impl InFlight {
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.state
    }

    pub fn mark_probe(&mut self) {
        self.probe = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.state;
        s.in_flight.fetch_sub(1, Ordering::Relaxed);
        s.occupancy.leave(s.clock.now_us());
        if self.probe {
            // A verdict (success or failure) already cleared it; otherwise the next request probes.
            s.probe_since_ms.store(0, Ordering::Relaxed);
        }
        s.in_flight_gauge.decrement(1.0);
        if s.waiting.load(Ordering::Acquire) > 0 {
            s.slot_freed.notify_waiters();
        }
    }
}

/// Takes a waiter off the count however its wait ends (slot, deadline, client gone).
fn scopeguard_waiting(state: &BackendState) -> impl Drop + '_ {
    struct Waiting<'a>(&'a BackendState);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
    Waiting(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend on a clock the test moves, so no test waits in real time.
    fn state(failures: u32, open: Duration) -> (BackendState, Arc<crate::clock::ManualClock>) {
        let clock = Arc::new(crate::clock::ManualClock::new(1_800_000_000_000_000));
        let s = BackendState::with_clock("b".into(), clock.clone());
        s.configure(&Routing {
            self_hosted_cost: crate::config::SelfHostedCost::Marginal,
            max_attempts: 3,
            retry_on: None,
            expected_output_tokens: 256,
            circuit_failures: failures,
            circuit_open: open,
        });
        (s, clock)
    }

    #[test]
    fn failures_open_the_circuit_and_a_probe_closes_it() {
        let (s, clock) = state(3, Duration::from_millis(30));
        s.on_failure(Failure::ServerError);
        s.on_failure(Failure::ServerError);
        assert_eq!(s.availability(), Availability::Up, "two of three failures");
        s.on_failure(Failure::Timeout);
        assert!(matches!(
            s.availability(),
            Availability::Open {
                reason: Some(Failure::Timeout),
                ..
            }
        ));
        clock.advance(Duration::from_millis(40));
        assert_eq!(s.availability(), Availability::HalfOpen);
        assert!(s.try_probe());
        assert!(!s.try_probe(), "one probe at a time");
        assert_eq!(s.availability(), Availability::Probing);
        let s = Arc::new(s);
        let mut probe = s.enter();
        probe.mark_probe();
        drop(probe);
        assert_eq!(
            s.availability(),
            Availability::HalfOpen,
            "a probe that ended without a verdict frees the slot"
        );
        assert!(s.try_probe());
        s.on_success(Duration::from_millis(5));
        assert_eq!(s.availability(), Availability::Up);
    }

    #[test]
    fn a_failed_half_open_probe_reopens_and_connect_errors_open_at_once() {
        let (s, clock) = state(5, Duration::from_millis(20));
        s.on_failure(Failure::Connect);
        assert!(matches!(s.availability(), Availability::Open { .. }));
        clock.advance(Duration::from_millis(30));
        assert!(s.try_probe());
        s.on_failure(Failure::ServerError);
        assert!(matches!(
            s.availability(),
            Availability::Open {
                reason: Some(Failure::ServerError),
                ..
            }
        ));
    }

    #[test]
    fn active_probes_open_and_close() {
        let (s, _clock) = state(5, Duration::from_secs(60));
        s.on_probe(false);
        assert!(!s.is_up());
        s.on_probe(true);
        assert_eq!(s.availability(), Availability::Up, "unreachable, then back");
        s.on_failure(Failure::Broken);
        s.on_failure(Failure::Broken);
        s.on_failure(Failure::Broken);
        s.on_failure(Failure::Broken);
        s.on_failure(Failure::Broken);
        assert!(!s.is_up());
        s.on_probe(true);
        assert_eq!(
            s.availability(),
            Availability::HalfOpen,
            "a server that broke requests must pass a real one"
        );
    }

    #[test]
    fn busy_marks_expire_and_in_flight_follows_guards() {
        let (s, clock) = state(5, Duration::from_secs(1));
        let s = Arc::new(s);
        s.on_busy(Duration::from_millis(20));
        assert!(matches!(s.availability(), Availability::Busy { .. }));
        clock.advance(Duration::from_millis(30));
        assert_eq!(s.availability(), Availability::Up);
        let g = s.enter();
        let g2 = s.try_enter(Some(2)).expect("one of two taken");
        assert!(s.try_enter(Some(2)).is_none(), "full");
        assert_eq!(s.in_flight(), 2);
        drop((g, g2));
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn latency_is_a_weighted_average() {
        let s = BackendState::new("b".into());
        assert_eq!(s.latency(), None);
        s.on_success(Duration::from_millis(8));
        s.on_success(Duration::from_millis(16));
        assert_eq!(s.latency(), Some(Duration::from_millis(9)));
    }
}
