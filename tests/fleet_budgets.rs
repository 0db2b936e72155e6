//! Budgets shared by replicas through Redis (`store.budgets = "redis://…"`): one limit for the
//! fleet under concurrent load, leases that give a dead holder's room back, fail closed (503
//! `budget_store_unavailable`) or fail open within an allowance when Redis is down, and
//! counters rebuilt from the ledger after a flush. Each test uses its own key prefix.

mod common;
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/pg.rs"]
mod pg;

use common::*;
use fleet::{require_redis, Relay, TestCluster, TestTlsRedis};
use std::sync::Arc;
use std::time::Duration;
use tollgate::budget::redis::RedisBook;
use tollgate::budget::{BudgetBook, Demand, Refusal, Reservation};
use tollgate::clock::SystemClock;
use tollgate::config::{Budget, RedisStore, Team, Window};

/// One request costs 19 x $2.50/M + 10 x $10/M = $0.0001475 (the simulator answers 10
/// tokens to `max_tokens: 10`).
const COST: i64 = 147_500;

fn gpt() -> Backend {
    Backend::sim("gpt", "gpt-4o")
        .alias("chat-large")
        .price(2.5, 10.0)
        .config(|c| c.max_concurrency = 256)
}

fn request() -> String {
    let mut v: serde_json::Value = serde_json::from_str(&chat("chat-large", false)).unwrap();
    v["max_tokens"] = 10.into();
    v.to_string()
}

fn ledger_spend(gw: &Gateway) -> i64 {
    gw.ledger(
        "SELECT COALESCE(SUM(cost_nusd), 0) FROM requests WHERE team = 'search'",
        |r| r.get(0),
    )[0]
}

fn nusd(v: &serde_json::Value) -> i64 {
    let s = v.as_str().unwrap();
    (s.parse::<f64>().unwrap() * 1e9).round() as i64
}

/// The fleet's figures for the first team's first budget, once no reservation is held in any.
async fn settled_spend(gw: &Gateway) -> i64 {
    let mut last = String::new();
    for _ in 0..300 {
        let r = gw.admin_get("/admin/budgets").await;
        if r.status != 200 {
            // Redis not (yet) reachable again.
            assert_eq!(r.error(503)["code"], "budget_store_unavailable");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let v = r.json();
        last = v.to_string();
        if v.as_array()
            .unwrap()
            .iter()
            .all(|r| nusd(&r["reserved_usd"]) == 0)
        {
            return nusd(&v[0]["spent_usd"]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("reservations still held: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_hold_one_team_budget_under_concurrent_load() {
    let Some(redis) = require_redis("two_gateways_on_one_redis_hold_one_team_budget") else {
        return;
    };
    hold_one_team_budget_under_concurrent_load(redis.store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_a_redis_cluster_hold_one_team_budget_under_concurrent_load() {
    let Some(cluster) = TestCluster::require("two_gateways_on_a_redis_cluster_hold_one_team")
    else {
        return;
    };
    hold_one_team_budget_under_concurrent_load(cluster.store("tgtest:")).await;
}

/// 200 concurrent requests over two gateways sharing `store`: the team's limit holds for the
/// fleet, within one request's reservation, and every admitted request is billed once.
async fn hold_one_team_budget_under_concurrent_load(store: String) {
    const LIMIT: i64 = 7_500_000;
    let start = || {
        Harness::new()
            .backend(gpt())
            // Two gateways, their backends and 200 clients share two cores in a debug build:
            // an answer may wait longer on the client's side than the production default.
            .store(&format!("{store}\nredis_timeout_ms = 1000"))
            .team_toml(
                "search",
                SEARCH_KEY,
                "budgets = [{ window = \"day\", usd = 0.0075 }]",
            )
            .start()
    };
    let gws = [Arc::new(start().await), Arc::new(start().await)];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let gw = gws[i % 2].clone();
        tasks.spawn(async move { gw.post("/v1/chat/completions", SEARCH_KEY, request()).await });
    }
    let (mut admitted, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => {
                refused += 1;
                assert_eq!(r.error(429)["type"], "budget_exceeded");
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!(refused > 0, "the load was more than the budget");
    // Settlements run after the responses: wait for them, so no worst case is still held.
    settled_spend(&gws[0]).await;
    // Requests refused while others' worst cases were held may leave room: fill it one by one.
    for i in 0.. {
        let r = gws[i % 2]
            .post("/v1/chat/completions", SEARCH_KEY, request())
            .await;
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => break,
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    let ledger = ledger_spend(&gws[0]) + ledger_spend(&gws[1]);
    assert_eq!(
        ledger,
        admitted * COST,
        "every admitted request billed once"
    );
    assert!(ledger <= LIMIT, "spent {ledger} over the limit {LIMIT}");
    assert!(
        LIMIT - ledger < COST,
        "spent {ledger}: more than one request's reservation left unused of {LIMIT}"
    );
    // Both replicas show the fleet's figure, and it is the ledgers' sum.
    assert_eq!(settled_spend(&gws[0]).await, ledger);
    assert_eq!(settled_spend(&gws[1]).await, ledger);
    // Stopped before the prefix is deleted: nothing writes to it afterwards.
    for gw in gws {
        Arc::try_unwrap(gw).ok().unwrap().shutdown().await;
    }
}

fn team(tokens: u64, fail_open: bool) -> Team {
    Team {
        name: "search".into(),
        key_hashes: vec![],
        tags: Default::default(),
        request_tags: vec![],
        regions: vec![],
        budgets: vec![Budget {
            window: Window::Day,
            tokens: Some(tokens),
            usd: None,
            nusd: None,
            soft_ratio: None,
            per_key: false,
            fail_open,
        }],
    }
}

fn store(url: &str, prefix: &str, lease: Duration) -> RedisStore {
    RedisStore {
        url: tollgate::secret::Secret::new(url),
        cluster: false,
        ca_file: None,
        prefix: prefix.into(),
        timeout: Duration::from_millis(100),
        lease,
        fail_open_share: 0.1,
    }
}

/// A replica's book, and its background work (lease renewal among it).
async fn book(cfg: RedisStore) -> (BudgetBook, tollgate::tasks::Tasks) {
    let tasks = tollgate::tasks::Tasks::new();
    let b = RedisBook::new(cfg, Arc::new(SystemClock), tasks.clone()).unwrap();
    b.start().await.unwrap();
    (BudgetBook::Redis(b), tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_reservation_expires_after_its_lease_and_the_room_comes_back() {
    let Some(redis) = require_redis("a_dead_holders_reservation_expires_after_its_lease") else {
        return;
    };
    let lease = Duration::from_secs(2);
    let (a, a_tasks) = book(store(&redis.url, &redis.prefix, lease)).await;
    let (b, _b_tasks) = book(store(&redis.url, &redis.prefix, lease)).await;
    let t = team(100, false);
    let key: Arc<str> = "k".into();
    let one = Demand {
        nusd: 0,
        tokens: 60,
    };
    let (held, _) = a.admit(&t, &key, one).await.unwrap();
    // Alive, `a` renews the lease: still held two leases later.
    tokio::time::sleep(lease * 2).await;
    match b.admit(&t, &key, one).await {
        Err(Refusal::Over(o)) => assert_eq!((o.limit, o.used), (100, 60)),
        other => panic!("the other replica must see the reservation: {other:?}"),
    }
    // Replica `a` dies holding it: never settled, never released, no longer renewed.
    std::mem::forget(held);
    a_tasks.close_and_wait().await;
    match b.admit(&t, &key, one).await {
        Err(Refusal::Over(_)) => {}
        other => panic!("held until its lease ends: {other:?}"),
    }
    tokio::time::sleep(lease + Duration::from_millis(500)).await;
    let (r, room) = b.admit(&t, &key, one).await.expect("the lease expired");
    assert_eq!(room.tokens, Some(40));
    let BudgetBook::Redis(_) = &b else {
        unreachable!()
    };
    let tollgate::budget::Reservation::Redis(r) = r else {
        unreachable!()
    };
    assert!(
        r.settle_confirmed(Demand { nusd: 0, tokens: 7 }, b.now_us())
            .await
    );
    let v = b.view(&[Arc::new(t)]).await.unwrap();
    assert_eq!((v[0].spent.tokens, v[0].reserved.tokens), (7, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_unreachable_requests_are_refused_with_503_budget_store_unavailable() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Harness::new()
        .backend(gpt())
        .store(&format!(
            "budgets = \"redis://:s3cret@{closed}/0\"\nredis_timeout_ms = 50"
        ))
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"day\", usd = 1.0 }]",
        )
        .team("other", OTHER_KEY)
        .start()
        .await;
    let asked = std::time::Instant::now();
    let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
    assert!(asked.elapsed() < Duration::from_secs(1), "never hangs");
    let e = r.error(503);
    assert_eq!(e["code"], "budget_store_unavailable", "{e}");
    assert_eq!(e["type"], "server_error", "{e}");
    assert_eq!(r.headers["retry-after"], "1");
    // Anthropic clients get their own error shape, same status.
    let mut req = gw.request(
        "/v1/messages",
        SEARCH_KEY,
        r#"{"model":"chat-large","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    req.headers_mut()
        .insert("anthropic-version", "2023-06-01".parse().unwrap());
    let r = gw.send(req).await;
    assert_eq!(r.status, 503, "{}", r.text());
    // A team without budgets does not need the store.
    let r = gw.post("/v1/chat/completions", OTHER_KEY, request()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.wait_ledger_rows(
        "SELECT 1 FROM requests WHERE team = 'search' AND http_status = 503",
        2,
    )
    .await;
    let m = gw.admin_get("/metrics").await.text();
    assert!(
        m.contains("tollgate_budget_store_errors_total{op=\"admit\"}"),
        "{m}"
    );
    assert!(!m.contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_admits_within_the_allowance_while_redis_is_down_and_reconciles_after() {
    let Some(redis) = require_redis("fail_open_admits_within_the_allowance") else {
        return;
    };
    let relay = Relay::start(&redis.url).await;
    let gw = Harness::new()
        .backend(gpt())
        .store(&format!(
            "{}\nfail_open_share = 0.2\nredis_timeout_ms = 100",
            redis.store_via(&relay.url(&redis.url))
        ))
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"day\", usd = 0.0075, fail_open = true }]",
        )
        .start()
        .await;
    for _ in 0..4 {
        let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Room last seen: at most 7.5M - 4 x 147.5K = 6.91M (less while the last admissions held
    // their rough worst case); a fifth of it is at most 1.382M: 9 requests.
    let allowance = (7_500_000 - 4 * COST) / 5;
    relay.down();
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..20 {
        let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
        match r.status.as_u16() {
            200 => admitted += 1,
            503 => {
                refused += 1;
                assert_eq!(r.error(503)["code"], "budget_store_unavailable");
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!(
        (1..=allowance / COST).contains(&admitted),
        "admitted {admitted} on an allowance of at most {allowance}"
    );
    assert_eq!(refused, 20 - admitted);
    relay.up();
    // Reconciled: Redis holds what the ledger billed, outage included.
    let want = ledger_spend(&gw);
    assert_eq!(want, (4 + admitted) * COST);
    let mut got = 0;
    for _ in 0..100 {
        got = settled_spend(&gw).await;
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, want, "the spend made during the outage reached Redis");
    let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_is_reseeded_from_the_ledger_at_start() {
    let Some(redis) = require_redis("a_flushed_redis_is_reseeded_from_the_ledger") else {
        return;
    };
    let ledger = temp_dir("fleet-seed").join("tollgate.db");
    let start = || {
        Harness::new()
            .backend(gpt())
            .ledger(&ledger)
            .store(&redis.store())
            .team_toml(
                "search",
                SEARCH_KEY,
                "budgets = [{ window = \"day\", usd = 0.0075 }]",
            )
            .start()
    };
    let gw = start().await;
    for _ in 0..3 {
        let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(settled_spend(&gw).await, 3 * COST);
    gw.shutdown().await;
    redis.flush();
    let gw = start().await;
    assert_eq!(
        settled_spend(&gw).await,
        3 * COST,
        "rebuilt from the ledger"
    );
    // A second replica starting on the same ledger counts nothing twice.
    let again = start().await;
    assert_eq!(settled_spend(&again).await, 3 * COST);
    let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
    assert_eq!(r.status, 200);
    assert_eq!(settled_spend(&again).await, 4 * COST);
    gw.shutdown().await;
    again.shutdown().await;
}

/// Posts until the team is refused, alternating replicas; a refusal counts only once no
/// reservation is held (a settlement still on its way makes an early 429). How many got in.
async fn fill(gws: &[&Gateway], key: &str) -> i64 {
    let mut admitted = 0;
    let mut refused_settled = false;
    for i in 0.. {
        let r = gws[i % gws.len()]
            .post("/v1/chat/completions", key, request())
            .await;
        match r.status.as_u16() {
            200 => {
                admitted += 1;
                refused_settled = false;
            }
            429 if refused_settled => return admitted,
            429 => {
                settled_spend(gws[0]).await;
                refused_settled = true;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
        assert!(admitted < 200, "never refused");
    }
    unreachable!()
}

/// The one ledger a fleet's replicas share in the rebuild test.
enum FleetLedger {
    Sqlite(std::path::PathBuf),
    Postgres(pg::TestDb),
}

impl FleetLedger {
    fn on(&self, h: Harness) -> Harness {
        match self {
            FleetLedger::Sqlite(path) => h.ledger(path),
            FleetLedger::Postgres(db) => h.ledger_url(&db.url),
        }
    }

    /// The team's billed spend, once `n` of its requests answered 200 are recorded.
    async fn spend(&self, gw: &Gateway, n: i64) -> i64 {
        let ok = "FROM requests WHERE team = 'search' AND http_status = 200";
        match self {
            FleetLedger::Sqlite(_) => {
                gw.wait_ledger_rows(&format!("SELECT 1 {ok}"), n as usize)
                    .await;
                gw.ledger(&format!("SELECT COALESCE(SUM(cost_nusd), 0) {ok}"), |r| {
                    r.get(0)
                })[0]
            }
            FleetLedger::Postgres(db) => {
                let c = db.client().await;
                for _ in 0..200 {
                    let sql = format!(
                        "SELECT COUNT(*), CAST(COALESCE(SUM(cost_nusd), 0) AS BIGINT) {ok}"
                    );
                    let row = c.query_one(&sql, &[]).await.unwrap();
                    if row.get::<_, i64>(0) >= n {
                        return row.get(1);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("fewer than {n} records reached PostgreSQL");
            }
        }
    }
}

/// Redis loses the keys under a running fleet (FLUSHALL, eviction, a failover to an empty
/// server): the next admission finds the team's marker gone and rebuilds the counters from
/// the ledger before it decides, so the fleet stops at the true limit, not a fresh one.
async fn rebuilds_counters_lost_by_redis(test: &str, ledger: FleetLedger) {
    let Some(redis) = require_redis(test) else {
        return;
    };
    const LIMIT: i64 = 7_500_000;
    const BEFORE: i64 = 30;
    let start = || {
        ledger
            .on(Harness::new())
            .backend(gpt())
            .store(&redis.store())
            .team_toml(
                "search",
                SEARCH_KEY,
                "budgets = [{ window = \"day\", usd = 0.0075 }]",
            )
            .start()
    };
    let (a, b) = (start().await, start().await);
    for i in 0..BEFORE {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // In the ledger before Redis loses them: the rebuild can only count what is recorded.
    assert_eq!(ledger.spend(&a, BEFORE).await, BEFORE * COST);
    assert_eq!(settled_spend(&a).await, BEFORE * COST);
    // Every key of this fleet gone, as FLUSHALL would leave them (the Redis is shared).
    redis.flush();
    assert!(redis.keys().is_empty());
    let after = fill(&[&b, &a], SEARCH_KEY).await;
    let spent = ledger.spend(&a, BEFORE + after).await;
    assert_eq!(
        spent,
        (BEFORE + after) * COST,
        "every admitted request billed once"
    );
    assert!(
        spent <= LIMIT,
        "spent {spent} over the limit {LIMIT}: counted from zero"
    );
    assert!(
        LIMIT - spent < COST,
        "spent {spent}: more than one request's room left unused of {LIMIT}"
    );
    // `/admin/budgets` rebuilds too rather than show the fleet as having spent nothing.
    redis.flush();
    assert_eq!(
        settled_spend(&b).await,
        spent,
        "the view shows the ledger's spend"
    );
    let m = b.admin_get("/metrics").await.text();
    assert!(
        m.contains("tollgate_budget_reseeds_total{team=\"search\"}"),
        "{m}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_fleet_rebuilds_counters_from_the_ledger_when_redis_loses_them() {
    // One ledger file for both replicas, standing in for the fleet's PostgreSQL.
    let ledger = FleetLedger::Sqlite(temp_dir("fleet-reseed-live").join("tollgate.db"));
    rebuilds_counters_lost_by_redis("a_running_fleet_rebuilds_counters (SQLite)", ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_fleet_on_postgres_rebuilds_counters_from_it_when_redis_loses_them() {
    let Some(db) = pg::TestDb::new("fleet_reseed").await else {
        return;
    };
    let ledger = FleetLedger::Postgres(db);
    rebuilds_counters_lost_by_redis("a_running_fleet_rebuilds_counters (PostgreSQL)", ledger).await;
}

/// Two gateways on a Redis Cluster of three primaries (`store.redis_cluster`): teams whose
/// hash tags land on different nodes each hold their limit across both replicas, and
/// `/admin/budgets` reads every node, per-key rows included (found by a scan on the node
/// holding the team's slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_each_teams_budget_on_the_node_of_its_slot() {
    let Some(cluster) = TestCluster::require("a_redis_cluster_holds_each_teams_budget") else {
        return;
    };
    // Ten requests fit ($0.0014750), the eleventh does not.
    const LIMIT: i64 = 1_500_000;
    let teams = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let key = |t: &str| format!("tg-test-{t}");
    let start = || {
        let mut h = Harness::new().backend(gpt()).store(&format!(
            "{}\nredis_timeout_ms = 1000",
            cluster.store("tgtest:")
        ));
        for t in teams {
            h = h.team_toml(
                t,
                &key(t),
                "budgets = [{ window = \"day\", usd = 0.0015 }, { window = \"month\", usd = 1.0, per_key = true }]",
            );
        }
        h.start()
    };
    let (a, b) = (start().await, start().await);
    for t in teams {
        let admitted = fill(&[&a, &b], &key(t)).await;
        assert_eq!(admitted, LIMIT / COST, "team {t}");
    }
    let spread = cluster.keys_per_node();
    assert!(
        spread.iter().filter(|n| **n > 0).count() >= 2,
        "the teams' keys should sit on several nodes: {spread:?}"
    );
    for gw in [&a, &b] {
        let v = gw.admin_get("/admin/budgets").await.json();
        for t in teams {
            let rows: Vec<_> = v
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["team"] == t)
                .collect();
            assert_eq!(rows.len(), 2, "team-wide and one key: {v}");
            for r in rows {
                assert_eq!(nusd(&r["spent_usd"]), LIMIT / COST * COST, "{r}");
            }
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// `store(…)` with the whole room as the fail-open allowance.
fn open_store(url: &str, prefix: &str, lease: Duration) -> RedisStore {
    RedisStore {
        fail_open_share: 1.0,
        ..store(url, prefix, lease)
    }
}

/// A request admitted on a replica's allowance while Redis was out of its reach, still
/// running when Redis answers again, is reserved in Redis then: another replica cannot hand
/// out its room while it runs, and its settlement gives the reservation back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_running_on_the_allowance_is_reserved_in_redis_when_it_answers_again() {
    let Some(redis) = require_redis("a_request_running_on_the_allowance_is_reserved") else {
        return;
    };
    let relay = Relay::start(&redis.url).await;
    let lease = Duration::from_secs(2);
    let (a, _a_tasks) = book(open_store(&relay.url(&redis.url), &redis.prefix, lease)).await;
    let (b, _b_tasks) = book(store(&redis.url, &redis.prefix, lease)).await;
    let t = team(100, true);
    let key: Arc<str> = "k".into();
    let tokens = |n| Demand { nusd: 0, tokens: n };
    let (r, _) = b.admit(&t, &key, tokens(10)).await.unwrap();
    let Reservation::Redis(r) = r else {
        unreachable!()
    };
    assert!(r.settle_confirmed(tokens(10), b.now_us()).await);
    relay.down();
    let (running, _) = a
        .admit(&t, &key, tokens(60))
        .await
        .expect("admitted on the allowance");
    relay.up();
    let mut v = Vec::new();
    for _ in 0..100 {
        v = b.view(&[Arc::new(team(100, true))]).await.unwrap();
        if v[0].reserved.tokens == 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (v[0].spent.tokens, v[0].reserved.tokens),
        (10, 60),
        "the running request is reserved in Redis"
    );
    match b.admit(&t, &key, tokens(60)).await {
        Err(Refusal::Over(o)) => assert_eq!(o.used, 70),
        other => panic!("the other replica must count the running request: {other:?}"),
    }
    // Renewed like any running request: still held past its lease.
    tokio::time::sleep(lease + Duration::from_millis(500)).await;
    let v = b.view(&[Arc::new(team(100, true))]).await.unwrap();
    assert_eq!(v[0].reserved.tokens, 60, "renewed");
    let Reservation::Redis(running) = running else {
        unreachable!()
    };
    assert!(running.settle_confirmed(tokens(45), a.now_us()).await);
    let v = b.view(&[Arc::new(team(100, true))]).await.unwrap();
    assert_eq!((v[0].spent.tokens, v[0].reserved.tokens), (55, 0));
}

/// While Redis is down a replica's settlements wait merged per set of counters: a thousand
/// requests leave one queued settlement, not a thousand, and their spend reaches Redis once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlements_queued_while_redis_is_down_are_merged_and_counted_once() {
    let Some(redis) = require_redis("settlements_queued_while_redis_is_down_are_merged") else {
        return;
    };
    const N: i64 = 1000;
    let relay = Relay::start(&redis.url).await;
    let lease = Duration::from_secs(2);
    let (a, _a_tasks) = book(open_store(&relay.url(&redis.url), &redis.prefix, lease)).await;
    let (b, _b_tasks) = book(store(&redis.url, &redis.prefix, lease)).await;
    let t = team(1_000_000, true);
    let key: Arc<str> = "k".into();
    let tokens = |n| Demand { nusd: 0, tokens: n };
    let (r, _) = a.admit(&t, &key, tokens(10)).await.unwrap();
    let Reservation::Redis(r) = r else {
        unreachable!()
    };
    assert!(r.settle_confirmed(tokens(7), a.now_us()).await);
    relay.down();
    for _ in 0..N {
        let (r, _) = a.admit(&t, &key, tokens(10)).await.unwrap();
        r.settle(tokens(7), a.now_us());
    }
    let BudgetBook::Redis(queue) = &a else {
        unreachable!()
    };
    assert_eq!(queue.queued(), 1, "merged into one settlement");
    relay.up();
    let want = (N + 1) * 7;
    let mut spent = 0;
    for _ in 0..100 {
        spent = b.view(&[Arc::new(team(1_000_000, true))]).await.unwrap()[0]
            .spent
            .tokens;
        if spent == want && queue.queued() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(spent, want);
    // Nothing more arrives later: counted once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = b.view(&[Arc::new(team(1_000_000, true))]).await.unwrap();
    assert_eq!((v[0].spent.tokens, v[0].reserved.tokens), (want, 0));
}

/// A replica whose cluster is not up yet when it starts still serves (budgets fail closed
/// meanwhile), and uses the cluster once it is there: the client keeps trying its nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_its_redis_cluster_uses_it_once_it_is_up() {
    let test = "a_replica_started_before_its_redis_cluster";
    if !TestCluster::installed(test) {
        return;
    }
    let ports = TestCluster::free_ports();
    let gw = Harness::new()
        .backend(gpt())
        .store(&format!(
            "{}\nredis_timeout_ms = 300",
            TestCluster::store_on(&ports, "tgtest:")
        ))
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"day\", usd = 0.0015 }]",
        )
        .start()
        .await;
    let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
    assert_eq!(r.error(503)["code"], "budget_store_unavailable");
    let _cluster = TestCluster::start(ports);
    let up = std::time::Instant::now();
    loop {
        let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
        match r.status.as_u16() {
            200 => break,
            503 => assert!(
                up.elapsed() < Duration::from_secs(20),
                "still unavailable 20 s after the cluster came up"
            ),
            other => panic!("unexpected {other}: {}", r.text()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the cluster was in use {:?} after it came up", up.elapsed());
    assert_eq!(
        fill(&[&gw], SEARCH_KEY).await,
        9,
        "ten fit, one was admitted above"
    );
    gw.shutdown().await;
}

/// `rediss://` to a Redis whose certificate a private CA signed, named by
/// `store.redis_ca_file`: budgets are held over TLS. Without the CA the public roots do not
/// vouch for that server, so the store is unreachable and budgets fail closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_held_over_tls_with_a_private_certificate_authority() {
    let Some(tls) = TestTlsRedis::require("budgets_are_held_over_tls") else {
        return;
    };
    let start = |extra: String| {
        Harness::new()
            .backend(gpt())
            .store(&format!(
                "budgets = \"rediss://127.0.0.1:{}/0\"\nredis_timeout_ms = 1000\n{extra}",
                tls.port
            ))
            .team_toml(
                "search",
                SEARCH_KEY,
                "budgets = [{ window = \"day\", usd = 0.0015 }]",
            )
            .start()
    };
    let gw = start(format!("redis_ca_file = \"{}\"", tls.ca.display())).await;
    assert_eq!(fill(&[&gw], SEARCH_KEY).await, 10, "ten fit in $0.0015");
    assert_eq!(settled_spend(&gw).await, 10 * COST);
    gw.shutdown().await;
    let gw = start(String::new()).await;
    let r = gw.post("/v1/chat/completions", SEARCH_KEY, request()).await;
    assert_eq!(r.error(503)["code"], "budget_store_unavailable");
    gw.shutdown().await;
}

/// A replica killed mid-stream (SIGKILL: no settlement, no release) leaves its reservations
/// as leases; once they run out, the team's room is back for the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_reservations_come_back_after_the_lease() {
    let Some(redis) = require_redis("a_killed_replicas_reservations_come_back") else {
        return;
    };
    const STREAMS: usize = 4;
    let budgets = "budgets = [{ window = \"day\", tokens = 100000 }]";
    let (text, _sims, _) = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2)
                // Ten seconds of tokens: every stream is still going when the replica dies.
                .paced(Duration::from_millis(100), 100),
        )
        .store(&format!("{}\nlease_s = 2", redis.store()))
        .team_toml("search", SEARCH_KEY, budgets)
        .render()
        .await;
    let path = temp_dir("fleet-kill").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let doomed = BinaryGateway::start(&path).await;
    let survivor = Harness::new()
        .backend(gpt())
        .store(&redis.store())
        .team_toml("search", SEARCH_KEY, budgets)
        .start()
        .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        let mut body: serde_json::Value = serde_json::from_str(&chat("chat-small", true)).unwrap();
        body["max_tokens"] = 100.into();
        let req = http::Request::post(format!("http://{}/v1/chat/completions", doomed.addr))
            .header("authorization", format!("Bearer {SEARCH_KEY}"))
            .body(http_body_util::Full::from(body.to_string()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        use http_body_util::BodyExt;
        assert!(body.frame().await.unwrap().unwrap().is_data());
        open.push(body);
    }
    let tokens = |v: &serde_json::Value, f: &str| v[0][f].as_i64().unwrap();
    let v = survivor.admin_get("/admin/budgets").await.json();
    let held = tokens(&v, "reserved_tokens");
    assert!(
        held >= STREAMS as i64 * 100,
        "the fleet sees the streams' reservations: {v}"
    );
    // Streams outliving their lease keep their room while their replica lives (it renews).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = survivor.admin_get("/admin/budgets").await.json();
    assert_eq!(tokens(&v, "reserved_tokens"), held, "renewed: {v}");
    let killed = std::time::Instant::now();
    let (status, _) = doomed.stop("-KILL").await;
    assert!(!status.success());
    drop(open);
    let v = survivor.admin_get("/admin/budgets").await.json();
    assert_eq!(
        tokens(&v, "reserved_tokens"),
        held,
        "held until the leases end"
    );
    loop {
        let v = survivor.admin_get("/admin/budgets").await.json();
        if tokens(&v, "reserved_tokens") == 0 {
            assert_eq!(tokens(&v, "spent_tokens"), 0, "nothing was settled: {v}");
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "the leases (2 s) should have run out: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed.elapsed() >= Duration::from_millis(1500),
        "not before the lease"
    );
    survivor.shutdown().await;
}

/// Credentials Redis refuses are a config mistake no waiting mends: `serve` stops at start
/// with an error naming the field, and the password shows nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_the_credentials_stops_the_start_naming_the_field_and_hiding_the_password() {
    let Some(redis) = require_redis("redis_refusing_the_credentials") else {
        return;
    };
    let wrong = redis
        .url
        .replacen("redis://", "redis://no_such_user:s3cret@", 1);
    let (text, _sims, _) = Harness::new()
        .backend(gpt())
        .store(&redis.store_via(&wrong))
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"day\", usd = 1.0 }]",
        )
        .render()
        .await;
    let path = temp_dir("fleet-wrongpass").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running with credentials Redis refuses");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("store.budgets"), "{all}");
    assert!(all.contains("refused the credentials"), "{all}");
    assert!(!all.contains("s3cret"), "leaked:\n{all}");
}
