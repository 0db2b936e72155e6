//! Per-backend run-time state: requests in flight and a passive "down" mark.
//!
//! A connect failure marks a backend down for a short while so the next requests try another
//! candidate first; the full circuit breaker with active probes builds on this state.

use crate::metrics as m;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct BackendState {
    name: Arc<str>,
    in_flight: AtomicU32,
    /// Milliseconds since [`epoch`] until which the backend counts as down; 0 = up.
    down_until_ms: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

// === impl BackendState ===

impl BackendState {
    pub fn new(name: Arc<str>) -> Self {
        ::metrics::gauge!(m::BACKEND_UP, "backend" => name.clone()).set(1.0);
        Self {
            name,
            in_flight: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    pub fn mark_down(&self, for_: Duration) {
        self.down_until_ms
            .store(now_ms() + for_.as_millis() as u64, Ordering::Relaxed);
        ::metrics::gauge!(m::BACKEND_UP, "backend" => self.name.clone()).set(0.0);
    }

    pub fn mark_up(&self) {
        if self.down_until_ms.swap(0, Ordering::Relaxed) != 0 {
            ::metrics::gauge!(m::BACKEND_UP, "backend" => self.name.clone()).set(1.0);
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request against this backend until the guard drops (end of its body).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        ::metrics::gauge!(m::BACKEND_IN_FLIGHT, "backend" => self.name.clone()).increment(1.0);
        InFlight(self.clone())
    }
}

#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        ::metrics::gauge!(m::BACKEND_IN_FLIGHT, "backend" => self.0.name.clone()).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_marks_expire_and_in_flight_follows_guards() {
        let s = Arc::new(BackendState::new("b".into()));
        assert!(s.is_up());
        s.mark_down(Duration::from_secs(60));
        assert!(!s.is_up());
        s.mark_up();
        assert!(s.is_up());
        s.mark_down(Duration::ZERO);
        assert!(s.is_up(), "a zero-length mark has already expired");
        let g = s.enter();
        let g2 = s.enter();
        assert_eq!(s.in_flight(), 2);
        drop((g, g2));
        assert_eq!(s.in_flight(), 0);
    }
}
