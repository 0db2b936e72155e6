//! The budget store of one process: counters in a DashMap, each behind its own mutex, so
//! admissions of different teams never contend and one team's are exact.

use super::{window, BudgetView, Demand, LimitKind, OverBudget, Remaining};
use crate::clock::Clock;
use crate::config::{Budget, Team, Window};
use dashmap::DashMap;

use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CounterKey {
    team: Arc<str>,
    /// `Some` for a `per_key` budget.
    key_id: Option<Arc<str>>,
    window: Window,
}

#[derive(Debug, Default)]
struct State {
    start_us: i64,
    spent: Demand,
    reserved: Demand,
    soft_warned: bool,
}

impl State {
    /// Moves to the window containing `now`; what was spent or reserved before stays behind.
    fn roll(&mut self, start_us: i64) {
        if start_us > self.start_us {
            *self = State {
                start_us,
                ..State::default()
            };
        }
    }
}

#[derive(Debug, Default)]
struct Counter(Mutex<State>);

impl Counter {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Budget counters of every team and key.
#[derive(Debug)]
pub struct LocalBook {
    counters: DashMap<CounterKey, Arc<Counter>>,
    clock: Arc<dyn Clock>,
}

/// A reservation held by a request; settle it once, or drop it to release.
#[derive(Debug)]
pub struct LocalReservation {
    held: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    counter: Arc<Counter>,
    /// Set for team-wide budgets, whose spend is exported as a metric.
    team: Option<Arc<str>>,
    window: Window,
    start_us: i64,
    demand: Demand,
}

// === impl LocalBook ===

impl LocalBook {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            counters: DashMap::new(),
            clock,
        }
    }

    pub fn now_us(&self) -> i64 {
        self.clock.now_us()
    }

    fn counter(&self, key: CounterKey) -> Arc<Counter> {
        // `get` first: the shard write lock is only taken to insert a missing key.
        if let Some(c) = self.counters.get(&key) {
            return c.clone();
        }
        self.counters.entry(key).or_default().clone()
    }

    fn key_for(team: &Team, key_id: &Arc<str>, b: &Budget) -> CounterKey {
        CounterKey {
            team: team.name.clone(),
            key_id: b.per_key.then(|| key_id.clone()),
            window: b.window,
        }
    }

    /// Reserves `demand` against every budget of the team and key, or refuses naming the
    /// first budget it does not fit.
    pub fn admit(
        &self,
        team: &Team,
        key_id: &Arc<str>,
        demand: Demand,
    ) -> Result<(LocalReservation, Remaining), OverBudget> {
        let now = self.clock.now_us();
        let mut reservation = LocalReservation {
            held: Vec::with_capacity(team.budgets.len()),
        };
        let mut remaining = Remaining::default();
        for b in &team.budgets {
            let (start, end) = window::bounds(b.window, now);
            let counter = self.counter(Self::key_for(team, key_id, b));
            let mut s = counter.lock();
            s.roll(start);
            let used = Demand {
                nusd: s.spent.nusd + s.reserved.nusd,
                tokens: s.spent.tokens + s.reserved.tokens,
            };
            let over = |kind, limit: i64, used: i64| OverBudget {
                team: team.name.clone(),
                key_id: b.per_key.then(|| key_id.clone()),
                window: b.window,
                kind,
                limit,
                used,
                reset_at_us: end,
                retry_after: Duration::from_micros((end - now).max(1_000_000) as u64),
            };
            if let Some(limit) = b.nusd {
                if used.nusd + demand.nusd > limit {
                    return Err(over(LimitKind::Usd, limit, used.nusd));
                }
            }
            if let Some(limit) = b.tokens.map(|t| t as i64) {
                if used.tokens + demand.tokens > limit {
                    return Err(over(LimitKind::Tokens, limit, used.tokens));
                }
            }
            s.reserved.nusd += demand.nusd;
            s.reserved.tokens += demand.tokens;
            let now_used = Demand {
                nusd: used.nusd + demand.nusd,
                tokens: used.tokens + demand.tokens,
            };
            if let Some(limit) = b.nusd {
                remaining.nusd = Some(
                    remaining
                        .nusd
                        .map_or(limit - now_used.nusd, |r| r.min(limit - now_used.nusd)),
                );
            }
            if let Some(limit) = b.tokens.map(|t| t as i64) {
                remaining.tokens = Some(
                    remaining
                        .tokens
                        .map_or(limit - now_used.tokens, |r| r.min(limit - now_used.tokens)),
                );
            }
            if let Some(ratio) = b.soft_ratio {
                let crossed = b
                    .nusd
                    .is_some_and(|l| now_used.nusd as f64 >= l as f64 * ratio)
                    || b.tokens
                        .is_some_and(|l| now_used.tokens as f64 >= l as f64 * ratio);
                if crossed && !s.soft_warned {
                    s.soft_warned = true;
                    tracing::warn!(team = &*team.name, window = %b.window, ratio, "team passed the soft limit of its budget");
                    metrics::gauge!(crate::metrics::BUDGET_SOFT_LIMIT_REACHED, "team" => team.name.clone(), "window" => b.window.as_str())
                        .set(1.0);
                }
            }
            drop(s);
            reservation.held.push(Held {
                counter,
                team: (!b.per_key).then(|| team.name.clone()),
                window: b.window,
                start_us: start,
                demand,
            });
        }
        Ok((reservation, remaining))
    }

    /// Room left before any budget of the team and key is reached (not reserving anything).
    pub fn room(&self, team: &Team, key_id: &Arc<str>) -> Remaining {
        let now = self.clock.now_us();
        let mut room = Remaining::default();
        for b in &team.budgets {
            let (start, _) = window::bounds(b.window, now);
            let counter = self.counter(Self::key_for(team, key_id, b));
            let mut s = counter.lock();
            s.roll(start);
            if let Some(limit) = b.nusd {
                let left = limit - s.spent.nusd - s.reserved.nusd;
                room.nusd = Some(room.nusd.map_or(left, |r| r.min(left)));
            }
            if let Some(limit) = b.tokens.map(|t| t as i64) {
                let left = limit - s.spent.tokens - s.reserved.tokens;
                room.tokens = Some(room.tokens.map_or(left, |r| r.min(left)));
            }
        }
        room
    }

    /// Spend already in the ledger for the window starting at `start_us`.
    pub fn seed(
        &self,
        team: &Arc<str>,
        key_id: Option<Arc<str>>,
        window: Window,
        start_us: i64,
        spent: Demand,
    ) {
        let team_wide = key_id.is_none();
        let counter = self.counter(CounterKey {
            team: team.clone(),
            key_id,
            window,
        });
        let mut s = counter.lock();
        s.roll(start_us);
        if s.start_us == start_us {
            s.spent.nusd += spent.nusd;
            s.spent.tokens += spent.tokens;
        }
        if team_wide {
            metrics::gauge!(crate::metrics::BUDGET_SPENT_USD, "team" => team.clone(), "window" => window.as_str())
                .set(s.spent.nusd as f64 / 1e9);
        }
    }

    /// Every budget of these teams, as `GET /admin/budgets` shows it.
    pub fn view(&self, teams: &[Arc<Team>]) -> Vec<BudgetView> {
        let now = self.clock.now_us();
        let mut out = Vec::new();
        for team in teams {
            for b in &team.budgets {
                let (start, end) = window::bounds(b.window, now);
                let keys: Vec<Option<Arc<str>>> = if b.per_key {
                    self.counters
                        .iter()
                        .filter(|e| {
                            e.key().team == team.name
                                && e.key().window == b.window
                                && e.key().key_id.is_some()
                        })
                        .map(|e| e.key().key_id.clone())
                        .collect()
                } else {
                    vec![None]
                };
                for key_id in keys {
                    let ck = CounterKey {
                        team: team.name.clone(),
                        key_id: key_id.clone(),
                        window: b.window,
                    };
                    let (spent, reserved) = match self.counters.get(&ck) {
                        Some(c) => {
                            let s = c.lock();
                            if s.start_us == start {
                                (s.spent, s.reserved)
                            } else {
                                Default::default()
                            }
                        }
                        None => Default::default(),
                    };
                    out.push(BudgetView {
                        team: team.name.clone(),
                        key_id,
                        window: b.window,
                        limit_nusd: b.nusd,
                        limit_tokens: b.tokens.map(|t| t as i64),
                        soft_ratio: b.soft_ratio,
                        spent,
                        reserved,
                        resets_at_us: end,
                    });
                }
            }
        }
        out
    }
}

// === impl LocalReservation ===

impl LocalReservation {
    /// Takes over `other`'s holdings, so one settlement counts the request once.
    pub fn absorb(&mut self, mut other: LocalReservation) {
        for h in other.held.drain(..) {
            match self
                .held
                .iter_mut()
                .find(|m| Arc::ptr_eq(&m.counter, &h.counter) && m.start_us == h.start_us)
            {
                Some(mine) => {
                    mine.demand.nusd += h.demand.nusd;
                    mine.demand.tokens += h.demand.tokens;
                }
                None => self.held.push(h),
            }
        }
    }

    /// Releases the reservation and records what was actually consumed, in the window that is
    /// current now (a request that straddles a reset is charged to the new window).
    pub fn settle(mut self, actual: Demand, now_us: i64) {
        let held = std::mem::take(&mut self.held);
        for (i, h) in held.iter().enumerate() {
            let mut s = h.counter.lock();
            if s.start_us == h.start_us {
                s.reserved.nusd -= h.demand.nusd;
                s.reserved.tokens -= h.demand.tokens;
            }
            // A counter held twice (a reservation grown across a window reset) is charged once.
            if held[..i]
                .iter()
                .any(|o| Arc::ptr_eq(&o.counter, &h.counter))
            {
                continue;
            }
            s.roll(window::bounds(h.window, now_us).0);
            s.spent.nusd += actual.nusd;
            s.spent.tokens += actual.tokens;
            if let Some(team) = &h.team {
                metrics::gauge!(crate::metrics::BUDGET_SPENT_USD, "team" => team.clone(), "window" => h.window.as_str())
                    .set(s.spent.nusd as f64 / 1e9);
            }
        }
    }
}

impl Drop for LocalReservation {
    fn drop(&mut self) {
        for h in self.held.drain(..) {
            let mut s = h.counter.lock();
            if s.start_us == h.start_us {
                s.reserved.nusd -= h.demand.nusd;
                s.reserved.tokens -= h.demand.tokens;
            }
        }
    }
}
