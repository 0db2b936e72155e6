//! Per-team (and per-key) token and dollar budgets over calendar windows, held exactly
//! under concurrency, in this process ([`local`], the default) or shared by a fleet of
//! replicas in Redis ([`redis`]).
//!
//! ```text
//! admit:  for every budget of the team: roll the window, check spent + reserved + demand
//!         <= limit, reserve the demand (worst case: prompt + max output at the model's price)
//!         any budget short -> undo the others, 429 with the window's reset time
//! settle: release the reservation, add what the request actually cost
//! drop:   (failed before settling) release only
//! ```
//!
//! Money is integer nano-dollars, so sums never drift. Counters live outside the config
//! snapshot: a reload changes limits without losing spend. At start they are seeded from the
//! ledger, so a restart neither forgets spend nor counts it twice.
//!
//! The two stores sit behind one enum rather than a trait object: the local store's admission
//! stays a plain call with no allocation or boxed future, and the Redis one is one round
//! trip per phase.

pub mod admit;
pub mod forecast;
pub mod local;
pub mod redis;
pub mod window;

pub use local::{LocalBook, LocalReservation};

use crate::clock::Clock;
use crate::config::{Team, Window};
use std::sync::Arc;
use std::time::Duration;

/// What a request may consume at most (admission) or did consume (settlement).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub nusd: i64,
    pub tokens: i64,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Usd,
    Tokens,
}

#[derive(Debug, Clone)]
pub struct OverBudget {
    pub team: Arc<str>,
    pub key_id: Option<Arc<str>>,
    pub window: Window,
    pub kind: LimitKind,
    /// Nano-dollars or tokens, as `kind` says.
    pub limit: i64,
    pub used: i64,
    pub reset_at_us: i64,
    pub retry_after: Duration,
}

/// Why an admission was refused.
#[derive(Debug, Clone)]
pub enum Refusal {
    Over(OverBudget),
    /// The shared store did not answer, and the budget does not fail open (or its local
    /// allowance is used up).
    StoreUnavailable,
}

/// The tightest room left after an admission, for the response headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Remaining {
    pub nusd: Option<i64>,
    pub tokens: Option<i64>,
}

impl Remaining {
    /// Narrows to `left` of one budget's limits.
    fn narrow(&mut self, nusd: Option<i64>, tokens: Option<i64>) {
        if let Some(n) = nusd {
            self.nusd = Some(self.nusd.map_or(n, |r| r.min(n)));
        }
        if let Some(t) = tokens {
            self.tokens = Some(self.tokens.map_or(t, |r| r.min(t)));
        }
    }
}

/// Spend the ledger holds for one counter of a current window.
#[derive(Debug, Clone)]
pub struct LedgerSeed {
    pub window: Window,
    pub start_us: i64,
    /// The key, for a per-key budget; `None` for the team-wide one.
    pub key_id: Option<Arc<str>>,
    pub spent: Demand,
}

/// The ledger could not be read, so counters cannot be rebuilt from it.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the ledger's spend: {0}")]
pub struct SpendUnreadable(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// Where a running shared store finds a team's spend when its counters are lost (a flushed,
/// evicted or new Redis). The budget module cannot read the ledger itself (the ledger sits
/// after it on the request's path); the app hands it this.
pub trait SpendSource: Send + Sync + 'static {
    /// The ledger's spend in the current window (at `now_us`) of each of `budgets`
    /// (window, per key), one seed per counter that has any. Blocks: call it off the runtime.
    fn spend(
        &self,
        team: &str,
        budgets: &[(Window, bool)],
        now_us: i64,
    ) -> Result<Vec<LedgerSeed>, SpendUnreadable>;
}

#[derive(Debug, Clone)]
pub struct BudgetView {
    pub team: Arc<str>,
    pub key_id: Option<Arc<str>>,
    pub window: Window,
    pub limit_nusd: Option<i64>,
    pub limit_tokens: Option<i64>,
    pub soft_ratio: Option<f64>,
    pub spent: Demand,
    pub reserved: Demand,
    pub resets_at_us: i64,
}

/// Budget counters of every team and key, wherever they are kept.
#[derive(Debug)]
pub enum BudgetBook {
    Local(LocalBook),
    Redis(redis::RedisBook),
}

/// A reservation held by a request; settle it once, or drop it to release.
#[derive(Debug)]
pub enum Reservation {
    Local(LocalReservation),
    Redis(redis::RedisReservation),
}

// === impl BudgetBook ===

impl BudgetBook {
    /// The local store.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        BudgetBook::Local(LocalBook::new(clock))
    }

    pub fn now_us(&self) -> i64 {
        match self {
            BudgetBook::Local(b) => b.now_us(),
            BudgetBook::Redis(b) => b.now_us(),
        }
    }

    /// Reserves `demand` against every budget of the team and key, or refuses naming the
    /// first budget it does not fit.
    pub async fn admit(
        &self,
        team: &Team,
        key_id: &Arc<str>,
        demand: Demand,
    ) -> Result<(Reservation, Remaining), Refusal> {
        match self {
            BudgetBook::Local(b) => b
                .admit(team, key_id, demand)
                .map(|(r, rem)| (Reservation::Local(r), rem))
                .map_err(Refusal::Over),
            // Boxed: the Redis client's future is kilobytes, and inline it would enlarge every
            // request's future (allocated and copied per request) in local mode too. A Redis
            // admission pays one allocation beside its round trip.
            BudgetBook::Redis(b) => Box::pin(b.admit(team, key_id, demand))
                .await
                .map(|(r, rem)| (Reservation::Redis(r), rem)),
        }
    }

    /// Room left before any budget of the team and key is reached (not reserving anything).
    /// For Redis, the room this replica last saw: a hint for how carefully to count, never
    /// a decision.
    pub fn room(&self, team: &Team, key_id: &Arc<str>) -> Remaining {
        match self {
            BudgetBook::Local(b) => b.room(team, key_id),
            BudgetBook::Redis(b) => b.room(team, key_id),
        }
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
        match self {
            BudgetBook::Local(b) => b.seed(team, key_id, window, start_us, spent),
            BudgetBook::Redis(b) => b.seed(team, key_id, window, start_us, spent),
        }
    }

    /// Every budget of these teams, as `GET /admin/budgets` shows it: for Redis, the
    /// fleet's figures (`StoreUnavailable` rather than figures it could not read).
    pub async fn view(&self, teams: &[Arc<Team>]) -> Result<Vec<BudgetView>, Refusal> {
        match self {
            BudgetBook::Local(b) => Ok(b.view(teams)),
            BudgetBook::Redis(b) => b.view(teams).await,
        }
    }
}

// === impl Reservation ===

impl Reservation {
    /// Takes over `other`'s holdings, so one settlement counts the request once.
    pub fn absorb(&mut self, other: Reservation) {
        match (self, other) {
            (Reservation::Local(mine), Reservation::Local(o)) => mine.absorb(o),
            (Reservation::Redis(mine), Reservation::Redis(o)) => mine.absorb(o),
            // One book makes both; a mix cannot happen, and dropping releases `other`.
            (_, other) => drop(other),
        }
    }

    /// Releases the reservation and records what was actually consumed, in the window that is
    /// current now (a request that straddles a reset is charged to the new window).
    pub fn settle(self, actual: Demand, now_us: i64) {
        match self {
            Reservation::Local(r) => r.settle(actual, now_us),
            Reservation::Redis(r) => r.settle(actual, now_us),
        }
    }
}

#[cfg(test)]
mod tests;
