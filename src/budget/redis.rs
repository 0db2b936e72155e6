//! Budgets shared by a fleet of replicas, in Redis (`store.budgets = "redis://…"`).
//!
//! ```text
//! admit:  EVALSHA admit.lua  ── one round trip for all of a request's windows (team, key):
//!                               purge expired leases, check spent + reserved + demand <= limit
//!                               everywhere, then reserve under a lease (Redis's clock)
//! settle: EVALSHA settle.lua ── one round trip, off the request's path (a tracked task):
//!                               release the leases, add the actual spend once (a marker per
//!                               settlement makes a retry after a lost reply harmless)
//! start:  EVALSHA seed.lua   ── counters raised to the ledger's spend (a max: idempotent),
//!                               and the team's `seeded` marker set
//! admit finds no marker (Redis flushed, keys evicted, a new Redis):
//!         queued settlements pushed, 1.25 s for the other replicas' to land (their flush tick)
//!         ─► ledger read off the runtime (one per team at a time) ─► seed.lua ─► admit again
//! every lease/3: EVALSHA renew.lua ── leases of this replica's running requests pushed out
//!
//! Redis down (an error or no answer within store.redis_timeout_ms):
//!   budget without fail_open ─► 503 budget_store_unavailable
//!   every budget fail_open   ─► admitted against a local allowance: store.fail_open_share of
//!                               the room this replica last saw; the spend is queued (merged
//!                               per set of counters) and pushed (settle.lua, idempotent) once
//!                               Redis answers again; requests still running then are reserved
//!                               in Redis (admit.lua, forced) so the other replicas count them
//! ```
//!
//! A live replica renews the leases of its running requests, so a long stream keeps its room
//! however long it runs. A replica that dies stops renewing: its leases expire within
//! `store.lease_s`, the next admission touching the window purges them, and the team gets
//! its room back.
//! All of a team's keys carry the hash tag `{team}`, so each script's keys live on one node
//! of a Redis Cluster (`store.redis_cluster`), and each call goes to that node alone.
//!
//! Keys (`tollgate:` is `store.redis_prefix`), each expiring an hour after its window:
//! `tollgate:{team}:day:team:<window start s>` (team-wide), `…:day:k:<key id>:<start>` (per
//! key), the same plus `:leases`, `tollgate:{team}:done:<settlement id>` markers, and
//! `tollgate:{team}:seeded` (seven days, set again by each seed), whose absence tells a
//! running fleet that the team's counters lost their past: a counter that is merely missing
//! cannot tell "nothing spent yet" from "flushed".

use super::{
    window, BudgetView, Demand, LedgerSeed, LimitKind, OverBudget, Refusal, Remaining, SpendSource,
};
use crate::clock::Clock;
use crate::config::{Budget, RedisStore, Team, Window};
use crate::metrics as m;
use crate::tasks::Tasks;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::Script;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// After this many failed commands in a row, requests skip Redis for
/// [`RETRY_AFTER_FAILURE`] instead of each waiting out a timeout; the first request after it
/// tries again. One slow answer under load refuses only its own request.
const FAILURES_TO_TRIP: u32 = 3;
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);
/// Counters outlive their window by this, so a late settlement still finds its leases.
const KEY_MARGIN_S: i64 = 3600;
/// How long a settlement's marker keeps a retry from counting twice.
const DONE_MARKER_S: u64 = 86_400;
/// How often queued settlements (and seeds) are pushed while Redis is failing, and leases
/// looked at for renewal (more often for leases shorter than 4 s).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Reservation ids a merged queued settlement releases at most; the leases of any more run
/// out by themselves (`store.lease_s`), so an outage's queue stays one op per set of counters.
const MAX_MERGED_RIDS: usize = 256;
/// At most one warning per this, however many requests meet a failing Redis.
const WARN_EVERY_MS: u64 = 5_000;
/// How long a team's `seeded` marker lives. Its expiry only costs one needless rebuild (a
/// max over counters that are right), so it need not outlive the counters it vouches for.
const SEEDED_MARKER_S: i64 = 7 * 86_400;
/// How long requests wait for the ledger when Redis has lost a team's counters, before they
/// are refused (or admitted on the fail-open allowance) as if Redis were down.
const RESEED_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a rebuild waits before it reads the ledger: every replica pushes the settlements
/// it queued while Redis was away on its next flush (at most `FLUSH_EVERY` apart). Landing
/// before the seed, they are absorbed by its max; landing after it, they would be counted on
/// top of a ledger that already holds their records.
const RESEED_AFTER_FLUSHES: Duration = Duration::from_millis(1_250);
/// What `admit.lua` answers when the team's marker is missing.
const UNSEEDED: i64 = 2;

/// Budget counters in Redis, shared by every replica that names the same server and prefix.
#[derive(Debug, Clone)]
pub struct RedisBook {
    inner: Arc<Inner>,
}

/// Where a store failure happened, for the metric's `op` label.
#[derive(Debug, Clone, Copy)]
enum Op {
    Admit,
    Settle,
    Seed,
    Renew,
    View,
}

/// One server (or a failover address), or a Redis Cluster (`store.redis_cluster`). Both
/// multiplex one socket per node and reconnect by themselves; the cluster one also follows
/// slot moves. Every script's keys share the `{team}` hash tag, so each call goes to the one
/// node that holds them.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Inner {
    conn: Conn,
    admit: Script,
    settle: Script,
    seed: Script,
    renew: Script,
    cfg: RedisStore,
    clock: Arc<dyn Clock>,
    tasks: Tasks,
    /// Makes reservation ids unique across the fleet without a round trip.
    replica: String,
    next_id: AtomicU64,
    /// Monotonic milliseconds (since `born`) until which Redis counts as down: a span, not
    /// gateway time, which tests may hold still.
    born: std::time::Instant,
    down_until_ms: AtomicU64,
    failures: AtomicU32,
    last_warn_ms: AtomicU64,
    /// Room this replica last saw per budget (its counter key without the window start):
    /// a hint for `room`, and what the fail-open allowance is a share of.
    seen: Mutex<HashMap<String, Seen>>,
    /// Fail-open state per counter key while Redis is down.
    open: Mutex<HashMap<String, Open>>,
    /// Settlements Redis has not confirmed, retried until it does.
    pending: Mutex<Pending>,
    /// Requests admitted on a fail-open allowance and still running, by a number of this
    /// replica's: reserved in Redis once it answers again.
    open_running: Mutex<HashMap<u64, OpenRunning>>,
    /// Ledger spend not yet brought into Redis; admissions wait for it.
    seeds: Mutex<Vec<SeedOp>>,
    seeds_pending: AtomicBool,
    /// Where counters lost by Redis are rebuilt from; without one (benches, unit tests) they
    /// restart from what Redis holds.
    source: OnceLock<Arc<dyn SpendSource>>,
    /// One rebuild per team at a time in this replica; the others wait for it.
    reseeds: Mutex<HashMap<Arc<str>, Arc<Reseed>>>,
    soft_warned: Mutex<HashSet<String>>,
    /// Reservations of running requests, by id, for renewal.
    live: Mutex<HashMap<String, Running>>,
    /// When leases were last renewed (monotonic ms).
    renewed_ms: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    start_us: i64,
    nusd: Option<i64>,
    tokens: Option<i64>,
}

/// A running request's reservation: its team (the script's hash tag) and lease keys.
type Running = (Arc<str>, Vec<String>);

#[derive(Debug, Default)]
struct Reseed {
    gate: tokio::sync::Mutex<()>,
    /// Rebuilds done: a waiter that finds it moved on admits without reading the ledger again.
    done: AtomicU64,
    /// Rebuilds tried: a waiter that finds it moved on, `done` not, gives up at once rather
    /// than wait out another ledger read that will likely fail the same way.
    tried: AtomicU64,
}

/// Settlements Redis has not confirmed. Those never sent are merged per team and set of
/// counters (a fresh settlement id at each merge: no attempt carried the old one), so an
/// outage costs memory per counter, not per request. One that may have reached Redis (sent,
/// no answer) keeps its id and stays apart, so its retry never counts it twice; `flush`
/// sends nothing until a PING answers, so those stay as few as the attempts made while Redis
/// looked up.
#[derive(Debug, Default)]
struct Pending {
    unsent: Vec<SettleOp>,
    unsure: Vec<SettleOp>,
}

/// A running request admitted on a fail-open allowance.
#[derive(Debug, Clone)]
struct OpenRunning {
    team: Arc<str>,
    held: Vec<Held>,
    demand: Demand,
    /// Its reservation in Redis, once made.
    rid: Option<String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Open {
    allowance: Demand,
    /// Reserved and spent here while Redis was down.
    used: Demand,
}

#[derive(Debug, Clone)]
struct SettleOp {
    team: Arc<str>,
    id: String,
    /// (counter, leases) the reservations were held in.
    held: Vec<String>,
    rids: Vec<String>,
    /// Counters charged and the seconds each lives on.
    charge: Vec<(String, i64)>,
    actual: Demand,
    /// Team-wide counters charged, for the spend gauge: (index in `charge`, window).
    gauges: Vec<(usize, Window)>,
}

#[derive(Debug, Clone)]
struct SeedOp {
    team: Arc<str>,
    key: String,
    spent: Demand,
    ttl_s: i64,
}

/// One budget window a reservation is held in.
#[derive(Debug, Clone)]
struct Held {
    window: Window,
    per_key: bool,
    /// The counter key, window start included.
    key: String,
}

/// A request's reservation in Redis (and, while Redis was down, in the local allowance).
#[derive(Debug)]
pub struct RedisReservation {
    book: Arc<Inner>,
    team: Arc<str>,
    key_id: Arc<str>,
    held: Vec<Held>,
    rids: Vec<String>,
    /// Admitted on the fail-open allowance: counted in `open` until settled.
    open: Demand,
    /// Its entries in `open_running` (more than one once it absorbed another).
    open_ids: Vec<u64>,
    done: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBook")
            .field("prefix", &self.cfg.prefix)
            .field("replica", &self.replica)
            .finish()
    }
}

/// Where a script call failed: Redis answered with an error, or not in time.
#[derive(Debug)]
enum StoreError {
    Redis(redis::RedisError),
    Timeout,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Redis(e) => write!(f, "{e}"),
            StoreError::Timeout => f.write_str("no answer in time"),
        }
    }
}

/// Redis answered but refused the gateway's credentials (`store.budgets`' user and password).
#[derive(Debug, thiserror::Error)]
#[error("Redis refused the credentials in store.budgets: {0}")]
pub struct CredentialsRefused(String);

/// How long the start-up check waits for Redis's answer at least: a first connection (TLS,
/// a cluster's slot map) takes longer than one command on a warm one.
const START_CHECK: Duration = Duration::from_secs(2);

/// `AUTH` refused (WRONGPASS and the like), a command refused for want of it (`NOAUTH`), or
/// an ACL user not allowed to run what the gateway runs (`NOPERM`).
fn is_credentials_error(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
}

// === impl RedisBook ===

impl RedisBook {
    /// A book on the Redis that `cfg.url` names. Connects lazily: a replica starts while Redis
    /// is down (refusing or allowance-admitting until it answers) rather than not at all.
    pub fn new(
        cfg: RedisStore,
        clock: Arc<dyn Clock>,
        tasks: Tasks,
    ) -> Result<Self, redis::RedisError> {
        // Read once, at start: a rotated CA file takes a restart, as a rotated password does.
        let certs = match &cfg.ca_file {
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path)?),
            }),
            None => None,
        };
        let conn = if cfg.cluster {
            let seeds = cfg.url.expose().split(',').map(str::trim);
            let mut builder = redis::cluster::ClusterClientBuilder::new(seeds);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder
                .connection_timeout(cfg.timeout)
                .response_timeout(cfg.timeout)
                .retries(1)
                .max_retry_wait(200)
                .build()?;
            let conn_cfg = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(cfg.timeout)
                .set_response_timeout(cfg.timeout);
            // Pending: the cluster's slots are learnt on first use, so a replica starts while
            // the cluster is down, as with one server.
            Conn::Cluster(client.get_pending_async_connection_with_config(conn_cfg))
        } else {
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(cfg.url.expose(), certs)?,
                None => redis::Client::open(cfg.url.expose())?,
            };
            let conn_cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.timeout))
                .set_response_timeout(Some(cfg.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            Conn::Single(ConnectionManager::new_lazy_with_config(client, conn_cfg)?)
        };
        let mut id = [0u8; 6];
        let _ = getrandom::fill(&mut id);
        let replica = id.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                admit: Script::new(include_str!("redis/admit.lua")),
                settle: Script::new(include_str!("redis/settle.lua")),
                seed: Script::new(include_str!("redis/seed.lua")),
                renew: Script::new(include_str!("redis/renew.lua")),
                cfg,
                clock,
                tasks,
                replica,
                next_id: AtomicU64::new(0),
                born: crate::clock::now(),
                down_until_ms: AtomicU64::new(0),
                failures: AtomicU32::new(0),
                last_warn_ms: AtomicU64::new(0),
                seen: Mutex::default(),
                open: Mutex::default(),
                pending: Mutex::default(),
                open_running: Mutex::default(),
                seeds: Mutex::default(),
                seeds_pending: AtomicBool::new(false),
                source: OnceLock::new(),
                reseeds: Mutex::default(),
                soft_warned: Mutex::default(),
                live: Mutex::default(),
                renewed_ms: AtomicU64::new(0),
            }),
        })
    }

    pub fn now_us(&self) -> i64 {
        self.inner.clock.now_us()
    }

    /// Where to rebuild counters from when Redis loses them while the fleet runs; set once,
    /// before serving.
    pub fn set_spend_source(&self, source: Arc<dyn SpendSource>) {
        let _ = self.inner.source.set(source);
    }

    /// Pushes the seeds (once, now, if Redis answers) and starts the loop that retries queued
    /// settlements. Whether Redis answered; an error when it answered but refused this
    /// gateway's credentials: a config mistake, which no waiting mends, stops the start
    /// instead of refusing every budgeted request for ever.
    pub async fn start(&self) -> Result<bool, CredentialsRefused> {
        if let Some(refused) = self.inner.credentials_refused().await {
            return Err(refused);
        }
        let up = self.inner.flush().await;
        let inner = self.inner.clone();
        let tasks = self.inner.tasks.clone();
        let tick = FLUSH_EVERY.min(self.inner.cfg.lease / 4);
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = tasks.stopping() => break,
                    _ = tokio::time::sleep(tick) => {}
                }
                inner.renew_due().await;
                inner.flush().await;
            }
            // Shutdown: one last try, so a clean stop leaves nothing unpushed.
            inner.flush().await;
        });
        Ok(up)
    }

    /// Spend already in the ledger for the window starting at `start_us`: queued, and brought
    /// into Redis before the first admission.
    pub fn seed(
        &self,
        team: &Arc<str>,
        key_id: Option<Arc<str>>,
        window: Window,
        start_us: i64,
        spent: Demand,
    ) {
        let i = &self.inner;
        let end = window::bounds(window, start_us).1;
        let key = i.counter_key(team, window, key_id.as_deref(), start_us);
        lock(&i.seeds).push(SeedOp {
            team: team.clone(),
            key,
            spent,
            ttl_s: i.ttl_s(end),
        });
        i.seeds_pending.store(true, Ordering::Release);
    }

    /// Settlements waiting for Redis to confirm them: what an outage holds in memory.
    pub fn queued(&self) -> usize {
        let q = lock(&self.inner.pending);
        q.unsent.len() + q.unsure.len()
    }

    /// Room last seen by this replica; unknown budgets count as far from their limits.
    pub fn room(&self, team: &Team, key_id: &Arc<str>) -> Remaining {
        let now = self.now_us();
        let seen = lock(&self.inner.seen);
        let mut room = Remaining::default();
        for b in &team.budgets {
            let slot = self.inner.slot_key(&team.name, b, key_id);
            if let Some(s) = seen.get(&slot) {
                if s.start_us == window::bounds(b.window, now).0 {
                    room.narrow(s.nusd, s.tokens);
                }
            }
        }
        room
    }

    pub async fn admit(
        &self,
        team: &Team,
        key_id: &Arc<str>,
        demand: Demand,
    ) -> Result<(RedisReservation, Remaining), Refusal> {
        let i = &self.inner;
        let now = i.clock.now_us();
        let held: Vec<Held> = team
            .budgets
            .iter()
            .map(|b| Held {
                window: b.window,
                per_key: b.per_key,
                key: i.counter_key(
                    &team.name,
                    b.window,
                    b.per_key.then_some(&**key_id),
                    window::bounds(b.window, now).0,
                ),
            })
            .collect();
        if !i.is_down() && (!i.seeds_pending.load(Ordering::Acquire) || i.push_seeds().await) {
            let rid = i.new_id();
            let mut reply = i.run_admit(team, &held, &rid, demand, now, false).await;
            if matches!(&reply, Ok(r) if r.first() == Some(&UNSEEDED)) {
                // Admitting on counters that lost their past would start the team from zero.
                if !i.reseed(team).await {
                    return self.admit_open(team, key_id, held, demand, now);
                }
                reply = i.run_admit(team, &held, &rid, demand, now, false).await;
            }
            match reply {
                // Lost again at once: counted as a store that cannot be trusted right now.
                Ok(reply) if reply.first() == Some(&UNSEEDED) => {}
                Ok(reply) => return self.admitted(team, key_id, held, rid, demand, now, &reply),
                Err(e) => {
                    i.failed(Op::Admit, &e);
                    i.release_later(&team.name, &held, rid);
                }
            }
        }
        self.admit_open(team, key_id, held, demand, now)
    }

    /// Reads the reply of `admit.lua`: a reservation, or the budget that refused.
    #[allow(clippy::too_many_arguments)]
    fn admitted(
        &self,
        team: &Team,
        key_id: &Arc<str>,
        held: Vec<Held>,
        rid: String,
        demand: Demand,
        now: i64,
        reply: &[i64],
    ) -> Result<(RedisReservation, Remaining), Refusal> {
        let i = &self.inner;
        let fits = reply.first() == Some(&1);
        let refused_at = reply.get(1).copied().unwrap_or(0);
        let mut remaining = Remaining::default();
        let mut seen = lock(&i.seen);
        for (n, b) in team.budgets.iter().enumerate() {
            let at = 2 + 4 * n;
            let fig = |k: usize| reply.get(at + k).copied().unwrap_or(0);
            let used = Demand {
                nusd: fig(0) + fig(2),
                tokens: fig(1) + fig(3),
            };
            let (start, end) = window::bounds(b.window, now);
            let limit_tokens = b.tokens.map(|t| t as i64);
            if !fits && refused_at == n as i64 + 1 {
                let kind = match b.nusd {
                    Some(l) if used.nusd + demand.nusd > l => LimitKind::Usd,
                    _ => LimitKind::Tokens,
                };
                let (limit, used) = match kind {
                    LimitKind::Usd => (b.nusd.unwrap_or(0), used.nusd),
                    LimitKind::Tokens => (limit_tokens.unwrap_or(0), used.tokens),
                };
                return Err(Refusal::Over(OverBudget {
                    team: team.name.clone(),
                    key_id: b.per_key.then(|| key_id.clone()),
                    window: b.window,
                    kind,
                    limit,
                    used,
                    reset_at_us: end,
                    retry_after: Duration::from_micros((end - now).max(1_000_000) as u64),
                }));
            }
            let after = if fits { demand } else { Demand::default() };
            let left_n = b.nusd.map(|l| l - used.nusd - after.nusd);
            let left_t = limit_tokens.map(|l| l - used.tokens - after.tokens);
            remaining.narrow(left_n, left_t);
            seen.insert(
                i.slot_key(&team.name, b, key_id),
                Seen {
                    start_us: start,
                    nusd: left_n,
                    tokens: left_t,
                },
            );
            if let Some(ratio) = b.soft_ratio {
                i.soft_limit(team, b, &held[n].key, used, after, ratio);
            }
        }
        drop(seen);
        if !fits {
            // A refused window the reply did not name: refuse as unavailable, never admit.
            return Err(Refusal::StoreUnavailable);
        }
        let leases = held.iter().map(|h| format!("{}:leases", h.key)).collect();
        lock(&i.live).insert(rid.clone(), (team.name.clone(), leases));
        Ok((
            RedisReservation {
                book: i.clone(),
                team: team.name.clone(),
                key_id: key_id.clone(),
                held,
                rids: vec![rid],
                open: Demand::default(),
                open_ids: Vec::new(),
                done: false,
            },
            remaining,
        ))
    }

    /// Redis is down: admit against each budget's local allowance if every budget fails
    /// open, else refuse.
    fn admit_open(
        &self,
        team: &Team,
        key_id: &Arc<str>,
        held: Vec<Held>,
        demand: Demand,
        now: i64,
    ) -> Result<(RedisReservation, Remaining), Refusal> {
        let i = &self.inner;
        if team.budgets.iter().any(|b| !b.fail_open) {
            return Err(Refusal::StoreUnavailable);
        }
        let seen = lock(&i.seen).clone();
        let mut open = lock(&i.open);
        let mut remaining = Remaining::default();
        // All fit, or none is taken.
        for (b, h) in team.budgets.iter().zip(&held) {
            let o = open
                .entry(h.key.clone())
                .or_insert_with(|| i.allowance(&team.name, b, key_id, &seen, now));
            let left = Demand {
                nusd: o.allowance.nusd - o.used.nusd - demand.nusd,
                tokens: o.allowance.tokens - o.used.tokens - demand.tokens,
            };
            let check_n = b.nusd.is_some() && left.nusd < 0;
            let check_t = b.tokens.is_some() && left.tokens < 0;
            if check_n || check_t {
                return Err(Refusal::StoreUnavailable);
            }
            remaining.narrow(b.nusd.map(|_| left.nusd), b.tokens.map(|_| left.tokens));
        }
        for h in &held {
            if let Some(o) = open.get_mut(&h.key) {
                o.used.nusd += demand.nusd;
                o.used.tokens += demand.tokens;
            }
        }
        drop(open);
        metrics::counter!(m::BUDGET_FAIL_OPEN_TOTAL, "team" => team.name.clone()).increment(1);
        let open_id = i.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&i.open_running).insert(
            open_id,
            OpenRunning {
                team: team.name.clone(),
                held: held.clone(),
                demand,
                rid: None,
            },
        );
        Ok((
            RedisReservation {
                book: i.clone(),
                team: team.name.clone(),
                key_id: key_id.clone(),
                held,
                rids: Vec::new(),
                open: demand,
                open_ids: vec![open_id],
                done: false,
            },
            remaining,
        ))
    }

    /// Every budget of these teams as Redis holds it now: the whole fleet's figures.
    pub async fn view(&self, teams: &[Arc<Team>]) -> Result<Vec<BudgetView>, Refusal> {
        let i = &self.inner;
        let now = i.clock.now_us();
        let mut out = Vec::new();
        for team in teams {
            let mut rows: Vec<(usize, Option<Arc<str>>, String)> = Vec::new();
            for (n, b) in team.budgets.iter().enumerate() {
                let start = window::bounds(b.window, now).0;
                if b.per_key {
                    let head =
                        format!("{}{{{}}}:{}:k:", i.cfg.prefix, team.name, b.window.as_str());
                    let tail = format!(":{}", start / 1_000_000);
                    let pattern = format!("{head}*{tail}");
                    let keys = i.scan(&team.name, &pattern).await.map_err(|e| {
                        i.failed(Op::View, &e);
                        Refusal::StoreUnavailable
                    })?;
                    for k in keys {
                        let id = k
                            .strip_prefix(head.as_str())
                            .and_then(|rest| rest.strip_suffix(tail.as_str()))
                            .map(Arc::<str>::from);
                        if id.is_some() {
                            rows.push((n, id, k));
                        }
                    }
                } else {
                    rows.push((n, None, i.counter_key(&team.name, b.window, None, start)));
                }
            }
            let keys: Vec<&str> = rows.iter().map(|(_, _, k)| k.as_str()).collect();
            let fail = |e: StoreError| {
                i.failed(Op::View, &e);
                Refusal::StoreUnavailable
            };
            let mut figures = i.look(&team.name, &keys).await.map_err(fail)?;
            if figures.first() == Some(&UNSEEDED) {
                // Figures from lost counters would show the team as having spent nothing.
                if !i.reseed(team).await {
                    return Err(Refusal::StoreUnavailable);
                }
                figures = i.look(&team.name, &keys).await.map_err(fail)?;
                if figures.first() == Some(&UNSEEDED) {
                    return Err(Refusal::StoreUnavailable);
                }
            }
            for (r, (n, key_id, _)) in rows.into_iter().enumerate() {
                let b = &team.budgets[n];
                let fig = |k: usize| figures.get(2 + 4 * r + k).copied().unwrap_or(0);
                out.push(BudgetView {
                    team: team.name.clone(),
                    key_id,
                    window: b.window,
                    limit_nusd: b.nusd,
                    limit_tokens: b.tokens.map(|t| t as i64),
                    soft_ratio: b.soft_ratio,
                    spent: Demand {
                        nusd: fig(0),
                        tokens: fig(1),
                    },
                    reserved: Demand {
                        nusd: fig(2),
                        tokens: fig(3),
                    },
                    resets_at_us: window::bounds(b.window, now).1,
                });
            }
        }
        Ok(out)
    }
}

// === impl Inner ===

impl Inner {
    /// The budget a counter belongs to, window start excluded.
    fn slot_key(&self, team: &str, b: &Budget, key_id: &str) -> String {
        match b.per_key {
            true => format!(
                "{}{{{team}}}:{}:k:{key_id}",
                self.cfg.prefix,
                b.window.as_str()
            ),
            false => format!("{}{{{team}}}:{}:team", self.cfg.prefix, b.window.as_str()),
        }
    }

    fn counter_key(
        &self,
        team: &str,
        window: Window,
        key_id: Option<&str>,
        start_us: i64,
    ) -> String {
        let start_s = start_us / 1_000_000;
        match key_id {
            Some(k) => format!(
                "{}{{{team}}}:{}:k:{k}:{start_s}",
                self.cfg.prefix,
                window.as_str()
            ),
            None => format!(
                "{}{{{team}}}:{}:team:{start_s}",
                self.cfg.prefix,
                window.as_str()
            ),
        }
    }

    /// The team's `seeded` marker: same hash tag as its counters, so scripts stay on one node.
    fn marker_key(&self, team: &str) -> String {
        format!("{}{{{team}}}:seeded", self.cfg.prefix)
    }

    /// The marker that makes a settlement count once.
    fn done_key(&self, team: &str, settlement: &str) -> String {
        format!("{}{{{team}}}:done:{settlement}", self.cfg.prefix)
    }

    /// Seconds a counter of a window ending at `end_us` lives on.
    fn ttl_s(&self, end_us: i64) -> i64 {
        ((end_us - self.clock.now_us()) / 1_000_000).max(1) + KEY_MARGIN_S
    }

    fn new_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.replica)
    }

    fn is_down(&self) -> bool {
        self.mono_ms() < self.down_until_ms.load(Ordering::Acquire)
    }

    fn mono_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64 + 1
    }

    /// Counts and (at most every few seconds) logs a failure; after a few in a row,
    /// requests skip Redis briefly.
    fn failed(&self, op: Op, e: &StoreError) {
        let now = self.mono_ms();
        if self.failures.fetch_add(1, Ordering::AcqRel) + 1 >= FAILURES_TO_TRIP {
            self.down_until_ms.store(
                now + RETRY_AFTER_FAILURE.as_millis() as u64,
                Ordering::Release,
            );
        }
        let op = match op {
            Op::Admit => "admit",
            Op::Settle => "settle",
            Op::Seed => "seed",
            Op::Renew => "renew",
            Op::View => "view",
        };
        metrics::counter!(m::BUDGET_STORE_ERRORS_TOTAL, "op" => op).increment(1);
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        if (last == 0 || now >= last + WARN_EVERY_MS)
            && self
                .last_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // The error text of the client may quote the server's address, never the URL's
            // password; redacted all the same.
            let e = crate::secret::redact_urls(&e.to_string()).into_owned();
            tracing::warn!(
                op,
                error = %e,
                "the Redis budget store failed: budgets without fail_open refuse requests (503), \
                 fail_open budgets admit on their local allowance"
            );
        }
    }

    /// Runs a script with the command timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let call = async {
            match self.conn.clone() {
                Conn::Single(mut c) => inv.invoke_async(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
            }
        };
        match tokio::time::timeout(self.cfg.timeout, call).await {
            Ok(Ok(v)) => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                    self.down_until_ms.store(0, Ordering::Release);
                }
                Ok(v)
            }
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// `force` reserves even past the limits: for spend already made while Redis was down.
    async fn run_admit(
        &self,
        team: &Team,
        held: &[Held],
        rid: &str,
        demand: Demand,
        now: i64,
        force: bool,
    ) -> Result<Vec<i64>, StoreError> {
        let limits: Vec<(i64, i64)> = team
            .budgets
            .iter()
            .map(|b| (b.nusd.unwrap_or(-1), b.tokens.map_or(-1, |t| t as i64)))
            .collect();
        self.run_admit_in(&team.name, held, &limits, rid, demand, now, force)
            .await
    }

    /// `admit.lua` over `held`, whose limits (nano-dollars, tokens; -1 = none) are `limits`.
    #[allow(clippy::too_many_arguments)]
    async fn run_admit_in(
        &self,
        team: &str,
        held: &[Held],
        limits: &[(i64, i64)],
        rid: &str,
        demand: Demand,
        now: i64,
        force: bool,
    ) -> Result<Vec<i64>, StoreError> {
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.marker_key(team));
        inv.arg(rid)
            .arg(self.cfg.lease.as_millis() as u64)
            .arg(demand.nusd.max(0))
            .arg(demand.tokens.max(0))
            .arg(if force { "1" } else { "0" });
        for (&(nusd, tokens), h) in limits.iter().zip(held) {
            inv.key(&h.key).key(format!("{}:leases", h.key));
            inv.arg(nusd)
                .arg(tokens)
                .arg(self.ttl_s(window::bounds(h.window, now).1));
        }
        self.run(inv).await
    }

    /// Figures of these counters (of one team), nothing reserved.
    async fn look(&self, team: &str, keys: &[&str]) -> Result<Vec<i64>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.admit.prepare_invoke();
        inv.key(self.marker_key(team));
        inv.arg("").arg(0).arg(0).arg(0).arg("0");
        for k in keys {
            inv.key(*k).key(format!("{k}:leases"));
            inv.arg(-1).arg(-1).arg(KEY_MARGIN_S);
        }
        self.run(inv).await
    }

    /// Keys of one team matching `pattern`. In a cluster they all sit on the node holding the
    /// team's slot, so the scan goes there rather than to every primary.
    async fn scan(&self, team: &str, pattern: &str) -> Result<Vec<String>, StoreError> {
        let tag = self.marker_key(team);
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let step = async {
                match self.conn.clone() {
                    Conn::Single(mut c) => cmd.query_async::<(u64, Vec<String>)>(&mut c).await,
                    Conn::Cluster(mut c) => {
                        let node = Route::with_key(tag.as_bytes(), SlotAddr::Master);
                        let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(node));
                        let v = c.route_command(cmd, at).await?;
                        Ok(redis::from_redis_value::<(u64, Vec<String>)>(v)?)
                    }
                }
            };
            let (next, batch) = match tokio::time::timeout(self.cfg.timeout * 4, step).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(StoreError::Redis(e)),
                Err(_) => return Err(StoreError::Timeout),
            };
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// The local allowance of one budget while Redis is down: a share of the room last seen
    /// (of the whole limit when this replica has seen none in this window).
    fn allowance(
        &self,
        team: &str,
        b: &Budget,
        key_id: &str,
        seen: &HashMap<String, Seen>,
        now: i64,
    ) -> Open {
        let start = window::bounds(b.window, now).0;
        let last = seen
            .get(&self.slot_key(team, b, key_id))
            .filter(|s| s.start_us == start);
        let share = |room: i64| (room.max(0) as f64 * self.cfg.fail_open_share) as i64;
        let room_n = last.and_then(|s| s.nusd).or(b.nusd).unwrap_or(0);
        let room_t = last
            .and_then(|s| s.tokens)
            .or(b.tokens.map(|t| t as i64))
            .unwrap_or(0);
        Open {
            allowance: Demand {
                nusd: share(room_n),
                tokens: share(room_t),
            },
            used: Demand::default(),
        }
    }

    fn soft_limit(
        &self,
        team: &Team,
        b: &Budget,
        key: &str,
        used: Demand,
        add: Demand,
        ratio: f64,
    ) {
        let (n, t) = (used.nusd + add.nusd, used.tokens + add.tokens);
        let crossed = b.nusd.is_some_and(|l| n as f64 >= l as f64 * ratio)
            || b.tokens.is_some_and(|l| t as f64 >= l as f64 * ratio);
        if crossed && lock(&self.soft_warned).insert(key.to_string()) {
            tracing::warn!(team = &*team.name, window = %b.window, ratio, "team passed the soft limit of its budget");
            metrics::gauge!(m::BUDGET_SOFT_LIMIT_REACHED, "team" => team.name.clone(), "window" => b.window.as_str())
                .set(1.0);
        }
    }

    /// Renews the leases of running requests once a third of a lease has passed since the
    /// last renewal: one script per team.
    async fn renew_due(&self) {
        let now = self.mono_ms();
        let every = (self.cfg.lease.as_millis() as u64 / 3).max(1);
        if now < self.renewed_ms.load(Ordering::Relaxed) + every {
            return;
        }
        if self.renew().await {
            self.renewed_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Renews every running request's leases; whether Redis took them all.
    async fn renew(&self) -> bool {
        let mut by_team: HashMap<Arc<str>, Vec<(String, String)>> = HashMap::new();
        for (rid, (team, leases)) in lock(&self.live).iter() {
            let pairs = by_team.entry(team.clone()).or_default();
            pairs.extend(leases.iter().map(|z| (z.clone(), rid.clone())));
        }
        for pairs in by_team.values() {
            let mut inv = self.renew.prepare_invoke();
            inv.arg(self.cfg.lease.as_millis() as u64);
            for (z, rid) in pairs {
                inv.key(z).arg(rid);
            }
            if let Err(e) = self.run::<i64>(inv).await {
                self.failed(Op::Renew, &e);
                return false;
            }
        }
        true
    }

    /// Brings queued ledger spend into Redis; whether it is all there.
    async fn push_seeds(&self) -> bool {
        let seeds = lock(&self.seeds).clone();
        let mut by_team: HashMap<&str, Vec<&SeedOp>> = HashMap::new();
        for s in &seeds {
            by_team.entry(&s.team).or_default().push(s);
        }
        for (team, ops) in &by_team {
            if let Err(e) = self.run_seed(team, ops.iter().copied()).await {
                self.failed(Op::Seed, &e);
                return false;
            }
        }
        let mut q = lock(&self.seeds);
        let n = seeds.len().min(q.len());
        q.drain(..n);
        if q.is_empty() {
            self.seeds_pending.store(false, Ordering::Release);
        }
        true
    }

    /// Raises one team's counters to the ledger's spend and sets its marker.
    async fn run_seed(
        &self,
        team: &str,
        ops: impl Iterator<Item = &SeedOp>,
    ) -> Result<i64, StoreError> {
        let mut inv = self.seed.prepare_invoke();
        inv.key(self.marker_key(team)).arg(SEEDED_MARKER_S);
        for s in ops {
            inv.key(&s.key)
                .arg(s.spent.nusd.max(0))
                .arg(s.spent.tokens.max(0))
                .arg(s.ttl_s);
        }
        self.run(inv).await
    }

    /// Redis has lost the team's counters (or never had them): raises them to the ledger's
    /// spend, read off the runtime, one rebuild per team at a time. Whether they are back.
    ///
    /// Reservations Redis lost are gone with it; their settlements still add what the
    /// requests cost. A settlement that lands between the ledger read and the seed, of a
    /// record the read did not see, is hidden by the max: the error is bounded by the
    /// requests settling at that moment.
    async fn reseed(&self, team: &Team) -> bool {
        let gate = lock(&self.reseeds)
            .entry(team.name.clone())
            .or_default()
            .clone();
        let (done, tried) = (
            gate.done.load(Ordering::Acquire),
            gate.tried.load(Ordering::Acquire),
        );
        let _one = gate.gate.lock().await;
        if gate.done.load(Ordering::Acquire) != done {
            return true;
        }
        if gate.tried.load(Ordering::Acquire) != tried {
            return false;
        }
        let rebuilt = self.rebuild(team).await;
        if rebuilt {
            gate.done.fetch_add(1, Ordering::AcqRel);
        }
        gate.tried.fetch_add(1, Ordering::AcqRel);
        rebuilt
    }

    /// One rebuild of the team's counters from the ledger; whether Redis took it.
    async fn rebuild(&self, team: &Team) -> bool {
        if self.source.get().is_some() {
            self.flush().await;
            tokio::time::sleep(RESEED_AFTER_FLUSHES).await;
        }
        let now = self.clock.now_us();
        let seeds = match self.source.get() {
            None => Vec::new(),
            Some(source) => {
                let source = source.clone();
                let name = team.name.clone();
                let budgets: Vec<(Window, bool)> =
                    team.budgets.iter().map(|b| (b.window, b.per_key)).collect();
                let read = self
                    .tasks
                    .spawn_blocking(move || source.spend(&name, &budgets, now));
                match tokio::time::timeout(RESEED_TIMEOUT, read).await {
                    Ok(Ok(Ok(seeds))) => seeds,
                    Ok(Ok(Err(e))) => {
                        tracing::error!(team = &*team.name, error = %e, "Redis lost the team's budget counters and the ledger cannot be read to rebuild them");
                        return false;
                    }
                    Ok(Err(_)) | Err(_) => {
                        tracing::error!(team = &*team.name, "Redis lost the team's budget counters and the ledger read to rebuild them did not finish in time");
                        return false;
                    }
                }
            }
        };
        let ops: Vec<SeedOp> = seeds
            .into_iter()
            .map(|s: LedgerSeed| SeedOp {
                team: team.name.clone(),
                key: self.counter_key(&team.name, s.window, s.key_id.as_deref(), s.start_us),
                spent: s.spent,
                ttl_s: self.ttl_s(window::bounds(s.window, s.start_us).1),
            })
            .collect();
        match self.run_seed(&team.name, ops.iter()).await {
            Ok(_) => {
                metrics::counter!(m::BUDGET_RESEEDS_TOTAL, "team" => team.name.clone())
                    .increment(1);
                tracing::warn!(
                    team = &*team.name,
                    counters = ops.len(),
                    "Redis had lost the team's budget counters (flushed, evicted or new): \
                     rebuilt from the ledger"
                );
                true
            }
            Err(e) => {
                self.failed(Op::Seed, &e);
                false
            }
        }
    }

    /// One settlement; its spent-USD gauges updated from what Redis now holds.
    async fn run_settle(&self, op: &SettleOp) -> Result<(), StoreError> {
        let mut inv = self.settle.prepare_invoke();
        inv.key(self.done_key(&op.team, &op.id));
        for h in &op.held {
            inv.key(h).key(format!("{h}:leases"));
        }
        for (c, _) in &op.charge {
            inv.key(c);
        }
        inv.arg(op.held.len())
            .arg(op.actual.nusd.max(0))
            .arg(op.actual.tokens.max(0))
            .arg(DONE_MARKER_S)
            .arg(op.rids.len());
        for r in &op.rids {
            inv.arg(r);
        }
        for (_, ttl) in &op.charge {
            inv.arg(*ttl);
        }
        let spent: Vec<i64> = self.run(inv).await?;
        for &(idx, window) in &op.gauges {
            if let Some(&n) = spent.get(idx).filter(|n| **n >= 0) {
                metrics::gauge!(m::BUDGET_SPENT_USD, "team" => op.team.clone(), "window" => window.as_str())
                    .set(n as f64 / 1e9);
            }
        }
        Ok(())
    }

    /// Settles off the request's path; a settlement Redis does not confirm is queued.
    fn submit(self: &Arc<Self>, op: SettleOp) {
        // Without a runtime (a process ending) the lease gives the room back; spend is queued.
        // Spend is not even tried while Redis fails: unanswered, it would leave an op that
        // cannot be merged. A release alone is tried: lost, it is queued with the others.
        let failing = self.failures.load(Ordering::Relaxed) != 0 && op.actual != Demand::default();
        if tokio::runtime::Handle::try_current().is_err() || self.is_down() || failing {
            self.queue(op, false);
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = me.run_settle(&op).await {
                me.failed(Op::Settle, &e);
                me.queue(op, true);
            }
        });
    }

    /// A reservation `admit.lua` may have made though its answer never came (a timeout, a
    /// connection lost after the call was sent, Redis stopping with a save): given back once
    /// Redis answers, so the team's room does not wait out the lease. Releasing a reservation
    /// that was never made changes nothing, and the one connection keeps the release behind
    /// the call it undoes.
    fn release_later(&self, team: &Arc<str>, held: &[Held], rid: String) {
        self.queue(
            SettleOp {
                team: team.clone(),
                id: self.new_id(),
                held: held.iter().map(|h| h.key.clone()).collect(),
                rids: vec![rid],
                charge: Vec::new(),
                actual: Demand::default(),
                gauges: Vec::new(),
            },
            false,
        );
    }

    /// Queues a settlement Redis has not confirmed; `sent` if it may have reached Redis.
    fn queue(&self, mut op: SettleOp, sent: bool) {
        let release_only = op.actual == Demand::default();
        if op.rids.is_empty() && release_only {
            return;
        }
        let mut q = lock(&self.pending);
        // A release alone counts nothing, so sending it twice is harmless: it joins any of
        // the team's unsent settlements (at most MAX_MERGED_RIDS ids each; leases beyond run
        // out by themselves), so an outage still leaves one op per set of counters.
        if sent && !release_only {
            q.unsure.push(op);
            return;
        }
        let same_counters = |m: &SettleOp| {
            m.charge.len() == op.charge.len()
                && m.charge.iter().zip(&op.charge).all(|(a, b)| a.0 == b.0)
        };
        let joins = |m: &&mut SettleOp| {
            m.team == op.team && (release_only || m.actual == Demand::default() || same_counters(m))
        };
        let Some(m) = q.unsent.iter_mut().find(joins) else {
            q.unsent.push(op);
            return;
        };
        m.id = self.new_id();
        if !release_only {
            if m.actual == Demand::default() {
                // Releases until now: they take this spend's counters.
                m.charge = std::mem::take(&mut op.charge);
                m.gauges = std::mem::take(&mut op.gauges);
            } else {
                // The longer lifetime of the two: the later settlement's counters may need it.
                for (c, o) in m.charge.iter_mut().zip(&op.charge) {
                    c.1 = c.1.max(o.1);
                }
            }
        }
        m.actual.nusd = m.actual.nusd.saturating_add(op.actual.nusd);
        m.actual.tokens = m.actual.tokens.saturating_add(op.actual.tokens);
        for h in op.held.drain(..) {
            if !m.held.contains(&h) {
                m.held.push(h);
            }
        }
        let room = MAX_MERGED_RIDS.saturating_sub(m.rids.len());
        m.rids.extend(op.rids.drain(..).take(room));
    }

    /// Pushes what is queued: seeds first (so a new Redis holds the ledger's spend before
    /// more is added), then settlements. Once all is in, fail-open allowances start afresh.
    /// Whether Redis answered.
    async fn flush(&self) -> bool {
        if self.seeds_pending.load(Ordering::Acquire) && !self.push_seeds().await {
            return false;
        }
        let queued = {
            let q = lock(&self.pending);
            !q.unsent.is_empty() || !q.unsure.is_empty()
        };
        if queued && self.failures.load(Ordering::Relaxed) != 0 && !self.ping().await {
            return false;
        }
        let (unsure, unsent) = {
            let mut q = lock(&self.pending);
            (std::mem::take(&mut q.unsure), std::mem::take(&mut q.unsent))
        };
        let mut left = (Vec::new(), Vec::new());
        let mut up = true;
        // The unsure first, in order: their ids are kept, so a retry counts nothing twice.
        for (op, sent) in unsure
            .into_iter()
            .map(|o| (o, true))
            .chain(unsent.into_iter().map(|o| (o, false)))
        {
            if up {
                match self.run_settle(&op).await {
                    Ok(()) => continue,
                    Err(e) => {
                        self.failed(Op::Settle, &e);
                        up = false;
                        // Sent now, answered or not.
                        left.0.push(op);
                        continue;
                    }
                }
            }
            match sent {
                true => left.0.push(op),
                false => left.1.push(op),
            }
        }
        {
            let mut q = lock(&self.pending);
            let newer = std::mem::take(&mut q.unsent);
            q.unsure.splice(0..0, left.0);
            q.unsent = left.1;
            drop(q);
            for op in newer {
                self.queue(op, false);
            }
        }
        if !up {
            return false;
        }
        if lock(&self.open).is_empty() {
            return true;
        }
        // Allowances were in use: an answer ends the outage, and they start afresh next time;
        // the requests still running on them are reserved in Redis first.
        if !self.ping().await || !self.reserve_open_running().await {
            return false;
        }
        lock(&self.open).clear();
        tracing::info!(
            "the Redis budget store answers again; spend made on local allowances is in it"
        );
        true
    }

    /// Requests admitted on allowances that are still running, reserved in Redis (past the
    /// limits if need be: the spend is being made) under leases this replica renews, so the
    /// other replicas count them until they settle. Whether all are.
    async fn reserve_open_running(&self) -> bool {
        let waiting: Vec<(u64, OpenRunning)> = lock(&self.open_running)
            .iter()
            .filter(|(_, r)| r.rid.is_none())
            .map(|(id, r)| (*id, r.clone()))
            .collect();
        let now = self.clock.now_us();
        let mut all = true;
        for (id, r) in waiting {
            let rid = self.new_id();
            let limits = vec![(-1, -1); r.held.len()];
            match self
                .run_admit_in(&r.team, &r.held, &limits, &rid, r.demand, now, true)
                .await
            {
                Ok(reply) if reply.first() == Some(&1) => {}
                // Counters lost: the team's next admission rebuilds them; tried again then.
                Ok(_) => {
                    all = false;
                    continue;
                }
                Err(e) => {
                    self.failed(Op::Admit, &e);
                    self.release_later(&r.team, &r.held, rid);
                    return false;
                }
            }
            let leases: Vec<String> = r.held.iter().map(|h| format!("{}:leases", h.key)).collect();
            let claimed = match lock(&self.open_running).get_mut(&id) {
                Some(e) => {
                    e.rid = Some(rid.clone());
                    lock(&self.live).insert(rid.clone(), (r.team.clone(), leases));
                    true
                }
                None => false,
            };
            if claimed {
                continue;
            }
            // Settled meanwhile, its spend queued: only the reservation to give back.
            let release = SettleOp {
                team: r.team.clone(),
                id: self.new_id(),
                held: r.held.iter().map(|h| h.key.clone()).collect(),
                rids: vec![rid],
                charge: Vec::new(),
                actual: Demand::default(),
                gauges: Vec::new(),
            };
            if let Err(e) = self.run_settle(&release).await {
                self.failed(Op::Settle, &e);
                self.queue(release, true);
            }
        }
        all
    }

    /// Asks Redis once: `Some` when it answers but will not take this gateway's credentials
    /// (a wrong password or user, none given where one is required, a user not allowed to
    /// run scripts). Down, slow or fine: `None`, and the usual outage handling applies.
    async fn credentials_refused(&self) -> Option<CredentialsRefused> {
        let cmd = redis::cmd("PING");
        let ping = async {
            match self.conn.clone() {
                Conn::Single(mut c) => cmd.query_async::<String>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<String>(&mut c).await,
            }
        };
        match tokio::time::timeout(self.cfg.timeout.max(START_CHECK), ping).await {
            Ok(Err(e)) if is_credentials_error(&e) => Some(CredentialsRefused(
                crate::secret::redact_urls(&e.to_string()).into_owned(),
            )),
            _ => None,
        }
    }

    /// Whether Redis answers a PING in time.
    async fn ping(&self) -> bool {
        let cmd = redis::cmd("PING");
        let ping = async {
            match self.conn.clone() {
                Conn::Single(mut c) => cmd.query_async::<String>(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async::<String>(&mut c).await,
            }
        };
        let answer = match tokio::time::timeout(self.cfg.timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout),
        };
        match answer {
            Ok(()) => true,
            Err(e) => {
                self.failed(Op::Settle, &e);
                false
            }
        }
    }
}

// === impl RedisReservation ===

impl RedisReservation {
    /// Takes over `other`'s holdings, so one settlement counts the request once.
    pub fn absorb(&mut self, mut other: RedisReservation) {
        other.done = true;
        self.rids.append(&mut other.rids);
        self.open_ids.append(&mut other.open_ids);
        for h in other.held.drain(..) {
            if !self.held.iter().any(|m| m.key == h.key) {
                self.held.push(h);
            }
        }
        self.open.nusd += other.open.nusd;
        self.open.tokens += other.open.tokens;
    }

    /// Releases the leases and adds what was consumed to the windows current at `now_us`
    /// (each budget once), off the request's path.
    pub fn settle(self, actual: Demand, now_us: i64) {
        let (book, op) = self.into_settlement(actual, now_us);
        book.submit(op);
    }

    /// [`Self::settle`], waiting for Redis to confirm (or the settlement to be queued):
    /// for benches and tests that measure or check it.
    pub async fn settle_confirmed(self, actual: Demand, now_us: i64) -> bool {
        let (book, op) = self.into_settlement(actual, now_us);
        match book.run_settle(&op).await {
            Ok(()) => true,
            Err(e) => {
                book.failed(Op::Settle, &e);
                book.queue(op, true);
                false
            }
        }
    }

    fn into_settlement(mut self, actual: Demand, now_us: i64) -> (Arc<Inner>, SettleOp) {
        self.done = true;
        self.claim_open();
        self.forget_leases();
        let book = self.book.clone();
        self.release_open(Some(actual));
        let mut charge: Vec<(String, i64)> = Vec::new();
        let mut gauges = Vec::new();
        for h in &self.held {
            let (start, end) = window::bounds(h.window, now_us);
            let key = book.counter_key(
                &self.team,
                h.window,
                h.per_key.then_some(&*self.key_id),
                start,
            );
            if charge.iter().any(|(k, _)| *k == key) {
                continue;
            }
            if !h.per_key {
                gauges.push((charge.len(), h.window));
            }
            charge.push((key, book.ttl_s(end)));
        }
        let op = SettleOp {
            team: self.team.clone(),
            id: book.new_id(),
            held: if self.rids.is_empty() {
                Vec::new()
            } else {
                self.held.iter().map(|h| h.key.clone()).collect()
            },
            rids: std::mem::take(&mut self.rids),
            charge,
            actual,
            gauges,
        };
        (book, op)
    }

    /// Takes over the reservations made in Redis for this request when Redis came back
    /// while it ran on an allowance, so settling (or dropping) releases them.
    fn claim_open(&mut self) {
        if self.open_ids.is_empty() {
            return;
        }
        let mut running = lock(&self.book.open_running);
        for id in self.open_ids.drain(..) {
            if let Some(OpenRunning { rid: Some(rid), .. }) = running.remove(&id) {
                self.rids.push(rid);
            }
        }
    }

    /// Stops renewing this request's leases.
    fn forget_leases(&self) {
        if !self.rids.is_empty() {
            let mut live = lock(&self.book.live);
            for rid in &self.rids {
                live.remove(rid);
            }
        }
    }

    /// Gives back what was taken from a fail-open allowance; with `actual`, keeps that much
    /// counted as spent here until Redis has it.
    fn release_open(&mut self, actual: Option<Demand>) {
        if self.open == Demand::default() {
            return;
        }
        let spent = actual.unwrap_or_default();
        let mut open = lock(&self.book.open);
        for h in &self.held {
            if let Some(o) = open.get_mut(&h.key) {
                o.used.nusd += spent.nusd - self.open.nusd;
                o.used.tokens += spent.tokens - self.open.tokens;
            }
        }
        self.open = Demand::default();
    }
}

impl Drop for RedisReservation {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.release_open(None);
        self.claim_open();
        if self.rids.is_empty() {
            return;
        }
        self.forget_leases();
        let book = self.book.clone();
        let op = SettleOp {
            team: self.team.clone(),
            id: book.new_id(),
            held: self.held.iter().map(|h| h.key.clone()).collect(),
            rids: std::mem::take(&mut self.rids),
            charge: Vec::new(),
            actual: Demand::default(),
            gauges: Vec::new(),
        };
        book.submit(op);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
