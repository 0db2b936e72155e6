//! Burn-rate forecasts: when each budget runs out if it keeps being spent as it is now.
//!
//! Computed when someone looks (`GET /admin/budgets`, a scrape of `/metrics`, the console, the
//! alerts task), never on the request path. Each look leaves a sample of the budget's spend,
//! at most one per [`STEP_US`], and samples older than [`RATE_WINDOW_US`] are dropped:
//!
//! ```text
//! spend ▲                                  rate        = (spent_now − spent_oldest) ÷ (now − t_oldest)
//!       │                   ╱● now         exhausts_at = now + (limit − spent − reserved) ÷ rate
//!       │             ●───╱                              (none when nothing burns, or when the
//!       │       ●───╱                                     window resets first)
//!       │ ●───╱ t_oldest ≥ now − RATE_WINDOW
//!       └────────────────────────────────► time
//! ```
//!
//! Until the samples span [`MIN_SPAN_US`] (the gateway just started, nobody looked yet, or
//! the window just reset) the rate is the window's spend so far over its elapsed time, which
//! the ledger seeded at start. Every forecast says which of the two it used and over when.

use super::{BudgetView, Demand, LimitKind};
use crate::config::Window;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// At most one sample per minute: a scrape every few seconds keeps sixteen samples, not hundreds.
pub const STEP_US: i64 = 60_000_000;
/// The recent rate is measured over at most the last fifteen minutes.
pub const RATE_WINDOW_US: i64 = 15 * 60_000_000;
/// A rate over less than this is noise; the window so far is used instead.
pub const MIN_SPAN_US: i64 = 5_000_000;

const HOUR_US: f64 = 3_600_000_000.0;

pub const BUDGET_EXHAUSTION_SECONDS: &str = "tollgate_budget_exhaustion_seconds";

/// What a rate was measured over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The samples of the last [`RATE_WINDOW_US`] at most.
    Recent,
    /// The budget window from its start.
    WindowSoFar,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub basis: Basis,
    /// The rate's measurement interval, Unix microseconds.
    pub rate_from_us: i64,
    pub rate_to_us: i64,
    pub nusd_per_hour: f64,
    pub tokens_per_hour: f64,
    /// When the first limit runs out at this rate; `None` when nothing burns or the window
    /// resets first. A budget already used up runs out `now`.
    pub exhausts_at_us: Option<i64>,
    /// Which limit runs out first.
    pub limit: Option<LimitKind>,
}

/// Samples of every budget that has been looked at, kept between looks.
#[derive(Debug, Default)]
pub struct Forecaster {
    series: Mutex<HashMap<Id, Series>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Id {
    team: Arc<str>,
    key_id: Option<Arc<str>>,
    window: Window,
}

#[derive(Debug)]
struct Series {
    window_start_us: i64,
    points: VecDeque<(i64, Demand)>,
}

// === impl Forecast ===

impl Forecast {
    /// Seconds from `now_us` until the budget runs out; `None` when it does not in its window.
    pub fn seconds_left(&self, now_us: i64) -> Option<f64> {
        self.exhausts_at_us
            .map(|t| (t - now_us).max(0) as f64 / 1e6)
    }

    /// The rate's window in words, e.g. "the last 15 min (from 2026-11-22T10:15:00Z)".
    pub fn describe_window(&self) -> String {
        let from = crate::clock::format_time(self.rate_from_us);
        let span_s = (self.rate_to_us - self.rate_from_us).max(0) / 1_000_000;
        let span = if span_s >= 120 {
            format!("{} min", span_s / 60)
        } else {
            format!("{span_s} s")
        };
        match self.basis {
            Basis::Recent => format!("the last {span} (from {from})"),
            Basis::WindowSoFar => format!("the window so far ({span}, from {from})"),
        }
    }
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Recent => "recent",
            Basis::WindowSoFar => "window_so_far",
        }
    }
}

// === impl Forecaster ===

impl Forecaster {
    pub fn new() -> Self {
        Self::default()
    }

    /// The forecast of each view (same order), sampling their spend at `now_us`. Budgets no
    /// longer among the views (a reload removed them) are forgotten.
    pub fn observe(&self, views: &[BudgetView], now_us: i64) -> Vec<Forecast> {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashMap::with_capacity(views.len());
        let out = views
            .iter()
            .map(|v| {
                let id = Id {
                    team: v.team.clone(),
                    key_id: v.key_id.clone(),
                    window: v.window,
                };
                let start = super::window::bounds(v.window, now_us).0;
                let s = series.remove(&id).unwrap_or(Series {
                    window_start_us: start,
                    points: VecDeque::new(),
                });
                let s = s.sample(start, now_us, v.spent);
                let f = forecast(v, now_us, start, s.points.front().copied());
                seen.insert(id, s);
                f
            })
            .collect();
        *series = seen;
        out
    }
}

// === impl Series ===

impl Series {
    fn sample(mut self, window_start_us: i64, now_us: i64, spent: Demand) -> Series {
        // A new window starts from nothing: the old window's spend would read as a refund.
        if window_start_us != self.window_start_us {
            self.points.clear();
            self.window_start_us = window_start_us;
        }
        while self
            .points
            .front()
            .is_some_and(|(t, _)| now_us - t > RATE_WINDOW_US)
        {
            self.points.pop_front();
        }
        if self
            .points
            .back()
            .is_none_or(|(t, _)| now_us - t >= STEP_US)
        {
            self.points.push_back((now_us, spent));
        }
        self
    }
}

/// The forecast of one budget, from the oldest sample kept (if it spans enough) or the window.
fn forecast(v: &BudgetView, now_us: i64, start_us: i64, oldest: Option<(i64, Demand)>) -> Forecast {
    let (basis, from_us, base) = match oldest {
        Some((t, d)) if now_us - t >= MIN_SPAN_US => (Basis::Recent, t, d),
        _ => (Basis::WindowSoFar, start_us, Demand::default()),
    };
    let hours = (now_us - from_us).max(1) as f64 / HOUR_US;
    let nusd_per_hour = (v.spent.nusd - base.nusd).max(0) as f64 / hours;
    let tokens_per_hour = (v.spent.tokens - base.tokens).max(0) as f64 / hours;
    let runs_out = |limit: Option<i64>, used: i64, per_hour: f64| -> Option<i64> {
        let left = limit? - used;
        if left <= 0 {
            return Some(now_us);
        }
        // `as` saturates a rate too slow to matter; the add must too.
        (per_hour > 0.0)
            .then(|| now_us.saturating_add((left as f64 / per_hour * HOUR_US).ceil() as i64))
    };
    let usd = runs_out(v.limit_nusd, v.spent.nusd + v.reserved.nusd, nusd_per_hour)
        .map(|t| (t, LimitKind::Usd));
    let tokens = runs_out(
        v.limit_tokens,
        v.spent.tokens + v.reserved.tokens,
        tokens_per_hour,
    )
    .map(|t| (t, LimitKind::Tokens));
    let first = [usd, tokens]
        .into_iter()
        .flatten()
        .min_by_key(|(t, _)| *t)
        // Spend after the reset counts against a new, empty window.
        .filter(|(t, _)| *t < v.resets_at_us);
    Forecast {
        basis,
        rate_from_us: from_us,
        rate_to_us: now_us,
        nusd_per_hour,
        tokens_per_hour,
        exhausts_at_us: first.map(|(t, _)| t),
        limit: first.map(|(_, k)| k),
    }
}

/// `tollgate_budget_exhaustion_seconds{team,window}` of every team-wide budget that runs out
/// within its window at the current rate. A budget that does not (nothing burns, or the
/// window resets first) has no series rather than +Inf, so `< 3600 * N` alerts and `min()`
/// read naturally, and a series that disappears means the danger passed.
pub fn render(
    views: &[BudgetView],
    forecasts: &[Forecast],
    now_us: i64,
    out: &mut crate::metrics::Exposition,
) {
    out.family(
        BUDGET_EXHAUSTION_SECONDS,
        "gauge",
        "Seconds until a team's budget runs out at its current burn rate (measured over up to the last 15 min, else the window so far); absent when it does not run out before its window resets.",
    );
    for (v, f) in views.iter().zip(forecasts) {
        if v.key_id.is_some() {
            continue;
        }
        if let Some(s) = f.seconds_left(now_us) {
            out.sample(
                BUDGET_EXHAUSTION_SECONDS,
                [("team", &*v.team), ("window", v.window.as_str())],
                s,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::LocalBook;
    use crate::clock::{Clock, ManualClock};
    use crate::config::Team;
    use std::time::Duration;

    const T0: i64 = 1_795_343_400_000_000; // 2026-11-22T10:30:00Z

    fn team(usd: f64, tokens: Option<u64>) -> Arc<Team> {
        Arc::new(crate::budget::tests::team(vec![
            crate::budget::tests::budget(Window::Day, Some(usd), tokens),
        ]))
    }

    fn spend(book: &LocalBook, team: &Team, clock: &ManualClock, nusd: i64, tokens: i64) {
        let key: Arc<str> = "k".into();
        let d = Demand { nusd, tokens };
        let (r, _) = book.admit(team, &key, d).unwrap();
        r.settle(d, clock.now_us());
    }

    #[test]
    fn a_steady_burn_predicts_exhaustion_within_one_step() {
        // $100 a day, $1 a minute from 10:30: it runs out at 12:10.
        let clock = Arc::new(ManualClock::new(T0));
        let book = LocalBook::new(clock.clone());
        let teams = [team(100.0, None)];
        let f = Forecaster::new();
        let expected = T0 + 100 * 60_000_000;
        let mut last = None;
        // Looks every 7 s (a scrape interval that does not divide the step).
        for _ in 0..(30 * 60 / 7) {
            clock.advance(Duration::from_secs(7));
            spend(&book, &teams[0], &clock, 1_000_000_000 * 7 / 60, 0);
            last = Some(f.observe(&book.view(&teams), clock.now_us()).remove(0));
        }
        let last = last.unwrap();
        assert_eq!(last.basis, Basis::Recent);
        assert_eq!(last.limit, Some(LimitKind::Usd));
        let at = last.exhausts_at_us.unwrap();
        assert!(
            (at - expected).abs() <= STEP_US,
            "predicted {} for {}",
            crate::clock::format_time(at),
            crate::clock::format_time(expected)
        );
        assert!((last.nusd_per_hour / 1e9 - 60.0).abs() < 0.5);
        assert!(last.rate_to_us - last.rate_from_us <= RATE_WINDOW_US);
        assert!(last.describe_window().starts_with("the last 1"));
    }

    #[test]
    fn no_burn_gives_no_date() {
        let clock = Arc::new(ManualClock::new(T0));
        let book = LocalBook::new(clock.clone());
        let teams = [team(100.0, Some(1_000))];
        let f = Forecaster::new();
        for _ in 0..20 {
            clock.advance(Duration::from_secs(60));
            let fc = f.observe(&book.view(&teams), clock.now_us()).remove(0);
            assert_eq!((fc.exhausts_at_us, fc.limit), (None, None));
            assert_eq!(fc.seconds_left(clock.now_us()), None);
            assert_eq!(fc.nusd_per_hour, 0.0);
        }
    }

    #[test]
    fn the_first_look_uses_the_window_so_far_and_a_reset_outlasts_a_slow_burn() {
        let clock = Arc::new(ManualClock::new(T0));
        let book = LocalBook::new(clock.clone());
        // 10:30 into the day, 630 tokens spent: 60 an hour; the 370 left last until 16:40.
        let teams = [team(1e6, Some(1_000))];
        spend(&book, &teams[0], &clock, 1, 630);
        let f = Forecaster::new();
        let fc = f.observe(&book.view(&teams), clock.now_us()).remove(0);
        assert_eq!(fc.basis, Basis::WindowSoFar);
        assert_eq!(fc.limit, Some(LimitKind::Tokens));
        assert_eq!(fc.exhausts_at_us, Some(T0 + 370 * 60_000_000));
        assert!(fc.describe_window().starts_with("the window so far"));
        // A $1M budget at that pace outlasts the day: no date, though it burns.
        let rich = [team(1e6, None)];
        let fc = Forecaster::new()
            .observe(&book.view(&rich), clock.now_us())
            .remove(0);
        assert!(fc.nusd_per_hour > 0.0);
        assert_eq!(fc.exhausts_at_us, None);
    }

    #[test]
    fn a_used_up_budget_runs_out_now() {
        let clock = Arc::new(ManualClock::new(T0));
        let book = LocalBook::new(clock.clone());
        let teams = [team(1.0, None)];
        spend(&book, &teams[0], &clock, 1_000_000_000, 0);
        let fc = Forecaster::new()
            .observe(&book.view(&teams), clock.now_us())
            .remove(0);
        assert_eq!(fc.seconds_left(clock.now_us()), Some(0.0));
        let mut out = crate::metrics::Exposition::new();
        render(&book.view(&teams), &[fc], clock.now_us(), &mut out);
        assert!(out
            .finish()
            .contains("tollgate_budget_exhaustion_seconds{team=\"search\",window=\"day\"} 0\n"));
    }
}
