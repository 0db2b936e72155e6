//! GPU economics of self-hosted backends: what their hours cost, how busy they are, how much
//! of that cost requests were charged, and the rest, idle cost.
//!
//! ```text
//! paid        = hourly_usd × count × fraction × wall time since the backend was configured
//! charged     = Σ cost of the requests it served (its rate card, as in the ledger)
//! idle cost   = paid − charged
//! busy        = share of wall time with at least one request in flight
//! concurrency = mean requests in flight ÷ max_concurrency
//! ```
//!
//! Worked example (tested below): $2/h, busy for half an hour at its rated
//! `tokens_per_second` and idle the other half: paid $2, charged $1, idle $1, busy 0.5.
//! Busy the same half hour at half the rated throughput: charged $0.50, idle $1.50. Idle
//! cost is everything the rate card did not recover: the hours with nothing in flight and
//! the unused capacity of the busy ones.
//!
//! Time comes from the gateway's clock (`clock::Clock`), so tests can run a simulated hour in
//! a moment. The exposition of these figures is the FinOps wing's (`finops/gpu.rs`).

use crate::config::{Backend, Hosting};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

const HOUR_US: i64 = 3_600_000_000;

/// Wall-time accounting of one backend, kept with its run-time state across reloads.
#[derive(Debug)]
pub struct Occupancy {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// When accounting began: the backend's first configuration.
    since_us: i64,
    /// Everything below is integrated up to here.
    last_us: i64,
    in_flight: u32,
    busy_us: i64,
    /// ∫ requests in flight dt, in request-microseconds.
    in_flight_us: i64,
    /// Last time a request started or ended.
    last_activity_us: i64,
    rate_nusd_per_hour: i64,
    gpus: f64,
    /// ∫ rate dt in nano-dollar-microseconds per hour: exact until divided once on reading.
    paid_acc: i128,
    gpu_seconds: f64,
    charged_nusd: i64,
    /// The largest `paid − charged` read so far (see [`Reading::idle_nusd`]).
    idle_nusd: i64,
    max_concurrency: Option<u32>,
    idle_flagged: bool,
    /// (time, busy_us, in_flight_us), for ratios over the recent window.
    samples: VecDeque<(i64, i64, i64)>,
}

/// The figures of one backend at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub paid_nusd: i64,
    pub charged_nusd: i64,
    /// `paid − charged`, held at its highest value so the exported counter never decreases:
    /// when requests are charged more than the hours cost (throughput above the rated
    /// `tokens_per_second`), it holds still until the hours catch up.
    pub idle_nusd: i64,
    pub gpu_seconds: f64,
    pub busy_seconds: f64,
    /// Share of the window with at least one request in flight.
    pub busy_ratio: f64,
    /// Mean in flight over the window ÷ `max_concurrency`; `None` without a cap.
    pub concurrency_ratio: Option<f64>,
    pub idle: bool,
}

/// A change worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleChange {
    BecameIdle { quiet_for: Duration },
    Active,
}

// === impl Occupancy ===

impl Occupancy {
    pub fn new(now_us: i64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                since_us: now_us,
                last_us: now_us,
                in_flight: 0,
                busy_us: 0,
                in_flight_us: 0,
                last_activity_us: now_us,
                rate_nusd_per_hour: 0,
                gpus: 0.0,
                paid_acc: 0,
                gpu_seconds: 0.0,
                charged_nusd: 0,
                idle_nusd: 0,
                max_concurrency: None,
                idle_flagged: false,
                samples: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The figures stay consistent even if a holder panicked: every update is one step.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a (re)loaded backend's cost and cap; hours before `now_us` keep their old rate.
    pub fn configure(&self, backend: &Backend, now_us: i64) {
        let mut s = self.lock();
        s.advance(now_us);
        let (rate, gpus) = match (&backend.gpu, backend.hosting) {
            (Some(g), Hosting::SelfHosted) => (g.nusd_per_hour(), g.gpus()),
            _ => (0, 0.0),
        };
        s.rate_nusd_per_hour = rate;
        s.gpus = gpus;
        s.max_concurrency = backend.max_concurrency;
    }

    pub fn enter(&self, now_us: i64) {
        let mut s = self.lock();
        s.advance(now_us);
        s.in_flight += 1;
        s.last_activity_us = now_us;
    }

    pub fn leave(&self, now_us: i64) {
        let mut s = self.lock();
        s.advance(now_us);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.last_activity_us = now_us;
    }

    /// A request this backend served was charged `nusd`.
    pub fn charge(&self, nusd: i64) {
        self.lock().charged_nusd += nusd;
    }

    /// The figures at `now_us`, ratios over the last `window`.
    pub fn read(&self, now_us: i64, window: Duration, idle_after: Duration) -> Reading {
        let mut s = self.lock();
        s.advance(now_us);
        let window_us = window.as_micros() as i64;
        // A sample every 1/30 of the window keeps the ratio's edge within about 3%.
        let step = (window_us / 30).max(1);
        if s.samples.back().is_none_or(|&(t, _, _)| now_us - t >= step) {
            let sample = (now_us, s.busy_us, s.in_flight_us);
            s.samples.push_back(sample);
        }
        while s.samples.len() > 1 && s.samples[1].0 <= now_us - window_us {
            s.samples.pop_front();
        }
        // Before a whole window has passed the ratio is over the time since accounting began.
        let (t0, busy0, area0) = match s.samples.front() {
            Some(&(t, b, a)) if t <= now_us - window_us => (t, b, a),
            _ => (s.since_us, 0, 0),
        };
        let span = (now_us - t0).max(1) as f64;
        let busy_ratio = (s.busy_us - busy0) as f64 / span;
        let concurrency_ratio = s
            .max_concurrency
            .map(|cap| (s.in_flight_us - area0) as f64 / span / cap.max(1) as f64);
        let paid_nusd = (s.paid_acc / HOUR_US as i128) as i64;
        s.idle_nusd = s.idle_nusd.max(paid_nusd - s.charged_nusd);
        Reading {
            paid_nusd,
            charged_nusd: s.charged_nusd,
            idle_nusd: s.idle_nusd,
            gpu_seconds: s.gpu_seconds,
            busy_seconds: s.busy_us as f64 / 1e6,
            busy_ratio,
            concurrency_ratio,
            idle: s.is_idle(now_us, idle_after),
        }
    }

    /// Flags the backend idle once it has had no request for `idle_after`; says when that
    /// changes, so the caller logs each idle stretch once.
    pub fn check_idle(&self, now_us: i64, idle_after: Duration) -> Option<IdleChange> {
        let mut s = self.lock();
        let idle = s.is_idle(now_us, idle_after);
        if idle == s.idle_flagged {
            return None;
        }
        s.idle_flagged = idle;
        Some(if idle {
            IdleChange::BecameIdle {
                quiet_for: Duration::from_micros((now_us - s.last_activity_us).max(0) as u64),
            }
        } else {
            IdleChange::Active
        })
    }
}

// === impl Inner ===

impl Inner {
    fn advance(&mut self, now_us: i64) {
        let dt = now_us - self.last_us;
        if dt <= 0 {
            return;
        }
        if self.in_flight > 0 {
            self.busy_us += dt;
            self.in_flight_us += self.in_flight as i64 * dt;
        }
        self.paid_acc += self.rate_nusd_per_hour as i128 * dt as i128;
        self.gpu_seconds += self.gpus * dt as f64 / 1e6;
        self.last_us = now_us;
    }

    fn is_idle(&self, now_us: i64, idle_after: Duration) -> bool {
        self.in_flight == 0 && now_us - self.last_activity_us >= idle_after.as_micros() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000;

    fn backend(text: &str) -> std::sync::Arc<Backend> {
        let toml = format!(
            r#"
[[backend]]
name = "gpu"
url = "http://127.0.0.1:1"
hosting = "self_hosted"
{text}
models = [{{ name = "m" }}]
"#
        );
        crate::config::parse(&toml, "t", &|_| None)
            .unwrap()
            .backends
            .remove(0)
    }

    fn hour_split(tokens_per_second_served: f64) -> Reading {
        let b = backend(
            "max_concurrency = 4\ngpu = { hourly_usd = 2.0, count = 1, tokens_per_second = 1000 }",
        );
        let per_token = crate::config::prices::gpu_usd_per_token(b.gpu.as_ref().unwrap()).unwrap();
        let t0 = 1_000 * HOUR_US;
        let o = Occupancy::new(t0);
        o.configure(&b, t0);
        // Two requests overlap during the first half hour: busy, with a mean of 2 in flight.
        o.enter(t0);
        o.enter(t0);
        let tokens = tokens_per_second_served * 1800.0;
        o.charge((tokens * per_token * 1e9).round() as i64);
        o.leave(t0 + 30 * MIN);
        o.leave(t0 + 30 * MIN);
        o.read(
            t0 + 60 * MIN,
            Duration::from_secs(3600),
            Duration::from_secs(600),
        )
    }

    #[test]
    fn half_an_hour_busy_at_the_rated_throughput_splits_two_dollars_evenly() {
        let r = hour_split(1000.0);
        assert_eq!(r.paid_nusd, 2_000_000_000);
        assert_eq!(r.charged_nusd, 1_000_000_000);
        assert_eq!(r.idle_nusd, 1_000_000_000);
        assert_eq!(r.busy_ratio, 0.5);
        assert_eq!(r.concurrency_ratio, Some(0.25), "2 of 4 for half the hour");
        assert_eq!(r.gpu_seconds, 3600.0);
        assert_eq!(r.busy_seconds, 1800.0);
        assert!(r.idle, "quiet for 30 min, flagged after 10");
    }

    #[test]
    fn busy_below_the_rated_throughput_counts_the_unused_capacity_as_idle() {
        let r = hour_split(500.0);
        assert_eq!(r.charged_nusd, 500_000_000);
        assert_eq!(r.idle_nusd, 1_500_000_000);
        assert_eq!(r.busy_ratio, 0.5);
    }

    #[test]
    fn idle_cost_never_decreases_when_requests_overpay() {
        let b = backend("gpu = { hourly_usd = 1.0, count = 2, fraction = 0.5 }");
        let o = Occupancy::new(0);
        o.configure(&b, 0);
        let w = Duration::from_secs(3600);
        let r = o.read(30 * MIN, w, w);
        assert_eq!((r.paid_nusd, r.idle_nusd), (500_000_000, 500_000_000));
        o.charge(2_000_000_000);
        let r = o.read(60 * MIN, w, w);
        assert_eq!(r.paid_nusd, 1_000_000_000);
        assert_eq!(r.idle_nusd, 500_000_000, "held, not lowered");
        let r = o.read(240 * MIN, w, w);
        assert_eq!(r.idle_nusd, 2_000_000_000, "4 h paid, 2 charged");
    }

    #[test]
    fn the_busy_ratio_follows_the_recent_window_and_a_reload_keeps_earlier_hours_at_their_rate() {
        let o = Occupancy::new(0);
        o.configure(&backend("gpu = { hourly_usd = 1.0 }"), 0);
        let w = Duration::from_secs(600);
        let far = Duration::from_secs(3600);
        for minute in 0..=10 {
            o.read(minute * MIN, w, far);
        }
        o.enter(10 * MIN);
        for minute in 11..=20 {
            o.read(minute * MIN, w, far);
        }
        let r = o.read(20 * MIN, w, far);
        assert!((r.busy_ratio - 1.0).abs() < 1e-9, "{r:?}");
        o.configure(&backend("gpu = { hourly_usd = 3.0 }"), 30 * MIN);
        let r = o.read(60 * MIN, w, far);
        assert_eq!(r.paid_nusd, 500_000_000 + 1_500_000_000);
    }

    #[test]
    fn an_idle_stretch_is_reported_once() {
        let o = Occupancy::new(0);
        let after = Duration::from_secs(600);
        assert_eq!(o.check_idle(5 * MIN, after), None);
        assert_eq!(
            o.check_idle(10 * MIN, after),
            Some(IdleChange::BecameIdle {
                quiet_for: Duration::from_secs(600)
            })
        );
        assert_eq!(o.check_idle(20 * MIN, after), None, "logged once");
        o.enter(21 * MIN);
        assert_eq!(o.check_idle(22 * MIN, after), Some(IdleChange::Active));
        o.leave(23 * MIN);
        assert_eq!(o.check_idle(30 * MIN, after), None, "quiet 7 min only");
    }
}
