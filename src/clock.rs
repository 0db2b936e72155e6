//! The gateway's one clock, and the calendar it reads.
//!
//! Two kinds of time, both from here:
//! - **Gateway time** ([`Clock`]): wall-clock Unix microseconds that budget windows, GPU hours
//!   and the circuit breaker are judged by. Tests pass a [`ManualClock`] and move it by hand,
//!   so an hour of GPU time or a breaker's open period passes in a moment, without sleeping.
//! - **Spans** ([`now`]): a monotonic instant for what the gateway measures of one request
//!   (latency, time to first token, its own overhead), which must not jump with the wall clock.
//!
//! Nothing else in the crate reads `SystemTime` or `Instant::now` (clippy.toml says so).

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Gateway time, in Unix microseconds.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now_us(&self) -> i64;

    /// Milliseconds, never 0 (so that 0 can mean "unset" in an atomic).
    fn now_ms(&self) -> u64 {
        (self.now_us() / 1000).max(1) as u64
    }
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        unix_now_us()
    }
}

/// Wall-clock time in Unix microseconds: ledger timestamps, budget windows, reports.
#[allow(clippy::disallowed_methods)]
pub fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A monotonic instant, for spans of one request.
#[allow(clippy::disallowed_methods)]
pub fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_us: i64) -> Self {
        Self(AtomicI64::new(now_us))
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_micros() as i64, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// `2026-11-22T10:30:15Z`: Unix microseconds as UTC, to the second.
pub fn format_time(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_and_print_in_utc() {
        for days in [-719_468, -1, 0, 1, 20_424, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(format_time(1_795_343_415_000_000), "2026-11-22T10:30:15Z");
        let c = ManualClock::new(1_000_000);
        c.advance(Duration::from_millis(2500));
        assert_eq!((c.now_us(), c.now_ms()), (3_500_000, 3_500));
    }
}
