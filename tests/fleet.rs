//! Fleet mode end to end: three real `tollgate serve` processes sharing one Redis (budgets)
//! and one PostgreSQL (ledger), in front of in-process simulators. One team budget holds for
//! the fleet under 600 concurrent requests and every completed response has exactly one row,
//! with the replica that served it; a SIGKILLed replica's leases give the team's room back
//! while the others keep serving, and its restart (same name, same spool) leaves no record
//! missing or doubled.
//!
//! Outages of the stores themselves, with the fleet under load: a Redis of the test's own is
//! stopped (fail-closed budgets refuse with 503, fail-open ones admit within their allowance,
//! and once it is back its counters are the ledger's, also after a restart that lost its
//! data); a PostgreSQL of the test's own is stopped for 10 s (no request fails, the spools
//! fill and drain, the ledger ends with one row per completed response).
//!
//! Needs Redis at 127.0.0.1:6379 (or `TOLLGATE_TEST_REDIS`) and PostgreSQL at 127.0.0.1:5432
//! (trust auth); each test has its own key prefix and database and removes them. The outage
//! tests need `redis-server` and PostgreSQL's server binaries instead. Without them the tests
//! skip with the reason; with `CI` set they fail instead.

mod common;
// The Redis relay (an outage) is for other tests.
#[allow(dead_code)]
#[path = "common/fleet.rs"]
mod fleet;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/pg_server.rs"]
mod pg_server;
#[path = "common/redis_server.rs"]
mod redis_server;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REPLICAS: usize = 3;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// The quick backend: answers 10 tokens to `max_tokens: 10`.
fn gpt() -> Backend {
    Backend::sim("gpt", "gpt-4o")
        .alias("chat-large")
        .price(2.5, 10.0)
        .config(|c| c.max_concurrency = 1024)
}

fn body(model: &str, stream: bool, max_tokens: u64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&chat(model, stream)).unwrap();
    v["max_tokens"] = max_tokens.into();
    v.to_string()
}

/// Three configs that differ only in `[server] replica` and `[store] spool`, as the README's
/// "Three replicas locally" has it; the simulators they point at stay alive in `Fleet`.
struct Fleet {
    _sims: HashMap<String, tollgate::sim::Sim>,
    configs: Vec<PathBuf>,
}

impl Fleet {
    async fn new(h: Harness, what: &str) -> Fleet {
        let (text, sims, _env) = h
            .server("replica = \"@REPLICA@\"")
            .store("spool = \"sqlite://@SPOOL@\"")
            .render()
            .await;
        let dir = temp_dir(what);
        let configs = (0..REPLICAS)
            .map(|i| {
                let path = dir.join(format!("replica{}.toml", i + 1));
                let spool = dir.join(format!("spool-{}.db", replica(i)));
                let text = text
                    .replace("@REPLICA@", &replica(i))
                    .replace("@SPOOL@", &spool.display().to_string());
                std::fs::write(&path, text).unwrap();
                path
            })
            .collect();
        Fleet {
            _sims: sims,
            configs,
        }
    }

    /// Replica `i` reaches the ledger at `to` instead of `from`.
    fn route_ledger(&self, i: usize, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.configs[i]).unwrap();
        assert!(text.contains(from));
        std::fs::write(&self.configs[i], text.replace(from, to)).unwrap();
    }

    async fn start(&self, i: usize) -> BinaryGateway {
        BinaryGateway::start(&self.configs[i]).await
    }
}

fn replica(i: usize) -> String {
    format!("gw-{}", i + 1)
}

/// What a client saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    replica: usize,
    status: u16,
    id: Option<String>,
    /// The whole answer arrived: a JSON body, or a stream up to `[DONE]`.
    complete: bool,
    body: Bytes,
}

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    key: &str,
    body: String,
    replica: usize,
) -> Result<Seen, String> {
    let stream = body.contains("\"stream\":true");
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::from(body))
        .unwrap();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-tollgate-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let complete = status == 200
        && if stream {
            body.ends_with(b"data: [DONE]\n\n")
        } else {
            serde_json::from_slice::<serde_json::Value>(&body).is_ok()
        };
    Ok(Seen {
        replica,
        status,
        id,
        complete,
        body,
    })
}

/// GET on an admin port, as JSON.
async fn admin_json(client: &HttpClient, admin: SocketAddr, path: &str) -> serde_json::Value {
    let req = http::Request::get(format!("http://{admin}{path}"))
        .body(Full::default())
        .unwrap();
    let resp = client.request(req).await.expect("the admin port answers");
    assert_eq!(resp.status(), 200, "{path}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// The fleet's figures for the team's budget (its row without a key): (spent, reserved).
async fn team_tokens(client: &HttpClient, admin: SocketAddr) -> (i64, i64) {
    team_tokens_of(client, admin, "search").await
}

async fn team_tokens_of(client: &HttpClient, admin: SocketAddr, team: &str) -> (i64, i64) {
    let v = admin_json(client, admin, "/admin/budgets").await;
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["team"] == team && r["key_id"].is_null())
        .unwrap_or_else(|| panic!("no team row: {v}"))
        .clone();
    (
        row["spent_tokens"].as_i64().unwrap(),
        row["reserved_tokens"].as_i64().unwrap(),
    )
}

/// The fleet's spent tokens once no reservation is held (settlements run after responses).
async fn settled_tokens(client: &HttpClient, admin: SocketAddr) -> i64 {
    settled_tokens_of(client, admin, "search").await
}

async fn settled_tokens_of(client: &HttpClient, admin: SocketAddr, team: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (spent, reserved) = team_tokens_of(client, admin, team).await;
        if reserved == 0 {
            return spent;
        }
        assert!(
            Instant::now() < deadline,
            "reservations still held: {reserved} tokens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls PostgreSQL until `done(rows)` or the deadline, and returns the last rows read.
async fn rows_until(
    db: &pg::TestDb,
    within: Duration,
    done: impl Fn(&[pg::Row]) -> bool,
) -> Vec<pg::Row> {
    let deadline = Instant::now() + within;
    loop {
        let rows = db.rows().await;
        if done(&rows) || Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each request id of `seen` that has a row has exactly one, served by the replica the
/// client asked; every complete response has its row, with status ok. Returns the number of
/// complete responses.
fn check_rows(seen: &[Seen], rows: &[pg::Row]) -> usize {
    let mut by_id: HashMap<&str, Vec<&pg::Row>> = HashMap::new();
    for r in rows {
        by_id.entry(&r.id).or_default().push(r);
    }
    let doubled: Vec<_> = by_id.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(doubled.is_empty(), "records twice: {doubled:?}");
    let mut complete = 0;
    for s in seen {
        let Some(id) = &s.id else {
            assert!(!s.complete, "a complete response without a request id");
            continue;
        };
        match by_id.get(id.as_str()) {
            Some(v) => {
                let row = v[0];
                assert_eq!(
                    row.replica,
                    replica(s.replica),
                    "{id} served by another replica"
                );
                if s.complete {
                    assert_eq!((row.http_status, row.status.as_str()), (200, "ok"), "{id}");
                }
            }
            None => assert!(
                !s.complete,
                "no record of {id}, which its client saw complete"
            ),
        }
        complete += usize::from(s.complete);
    }
    complete
}

/// 600 concurrent requests (one in five a stream) round-robin over three replicas against
/// one team budget of tokens that about half of them fit: the fleet never admits past the
/// limit and ends within one request's reservation of it; PostgreSQL holds one row per
/// request, each with the replica that served it, and the spend Redis shows is the ledger's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_budget_and_write_one_ledger_row_per_request() {
    const TEST: &str = "three_replicas_hold_one_budget";
    let Some(redis) = fleet::require_redis(TEST) else {
        return;
    };
    let Some(db) = pg::TestDb::new("fleet_budget").await else {
        return;
    };
    const N: usize = 600;
    // 19 prompt tokens + 10 generated: what the simulator bills each request.
    const PER_REQUEST: i64 = 29;
    const LIMIT: i64 = PER_REQUEST * N as i64 / 2;
    let fleet = Fleet::new(
        Harness::new()
            .backend(gpt())
            .ledger_url(&db.url)
            // Three debug gateways, a simulator and 600 clients share two cores: an answer
            // may wait longer than the production default.
            .store(&format!("{}\nredis_timeout_ms = 2000", redis.store()))
            .team_toml(
                "search",
                SEARCH_KEY,
                &format!("budgets = [{{ window = \"day\", tokens = {LIMIT} }}]"),
            ),
        "fleet-budget",
    )
    .await;
    let mut gws = Vec::new();
    for i in 0..REPLICAS {
        gws.push(fleet.start(i).await);
    }
    let addrs: Vec<SocketAddr> = gws.iter().map(|g| g.addr).collect();
    let admin = gws[0].admin_addr;
    let client = client();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let (client, addr) = (client.clone(), addrs[i % REPLICAS]);
        tasks.spawn(async move {
            let stream = i.is_multiple_of(5);
            send(
                &client,
                addr,
                SEARCH_KEY,
                body("chat-large", stream, 10),
                i % REPLICAS,
            )
            .await
        });
    }
    let mut seen = Vec::new();
    while let Some(r) = tasks.join_next().await {
        seen.push(r.unwrap().expect("every replica answers"));
    }
    let wave = started.elapsed();
    let admitted_in_wave = seen.iter().filter(|s| s.status == 200).count();
    assert!(admitted_in_wave < N, "the load was more than the budget");
    // Requests refused while others' worst cases were held may leave room: settle, then fill
    // it one by one, still round-robin.
    settled_tokens(&client, admin).await;
    for i in 0.. {
        let s = send(
            &client,
            addrs[i % REPLICAS],
            SEARCH_KEY,
            body("chat-large", i.is_multiple_of(2), 10),
            i % REPLICAS,
        )
        .await
        .unwrap();
        let status = s.status;
        seen.push(s);
        if status == 429 {
            break;
        }
        assert!(i < N, "the budget never ran out");
    }
    for s in &seen {
        match s.status {
            200 => assert!(s.complete, "a 200 cut short: {:?}", s.body),
            429 => {
                let v: serde_json::Value = serde_json::from_slice(&s.body)
                    .unwrap_or_else(|e| panic!("a 429 not in JSON ({e}): {:?}", s.body));
                let e = &v["error"];
                assert_eq!(e["type"], "budget_exceeded", "{v}");
                assert_eq!(e["code"], "budget_exceeded", "{v}");
                assert!(e.get("param").is_some(), "{v}");
                assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            }
            other => panic!("unexpected {other}: {:?}", s.body),
        }
    }
    let admitted = seen.iter().filter(|s| s.status == 200).count();
    let refused = seen.len() - admitted;

    // Refusals are recorded too, after the fact: wait until every request has its row.
    let rows = rows_until(&db, Duration::from_secs(20), |rows| {
        rows.len() >= seen.len()
    })
    .await;
    assert_eq!(
        rows.len(),
        seen.len(),
        "one row per request, refusals included"
    );
    assert_eq!(check_rows(&seen, &rows), admitted);
    let ok_rows = rows.iter().filter(|r| r.status == "ok").count();
    assert_eq!(
        ok_rows, admitted,
        "a row of status ok per response seen complete"
    );
    let per_replica: Vec<usize> = (0..REPLICAS)
        .map(|i| rows.iter().filter(|r| r.replica == replica(i)).count())
        .collect();
    assert!(per_replica.iter().all(|&n| n > 0), "{per_replica:?}");

    let spent_pg: i64 = db
        .client()
        .await
        .query_one(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0)::BIGINT \
             FROM requests WHERE status = 'ok'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap();
    let spent_redis = settled_tokens(&client, admin).await;
    // Every replica shows the same fleet-wide figure.
    for g in &gws[1..] {
        assert_eq!(settled_tokens(&client, g.admin_addr).await, spent_redis);
    }
    assert_eq!(spent_redis, spent_pg, "Redis holds what the ledger billed");
    assert!(spent_pg <= LIMIT, "spent {spent_pg} over the limit {LIMIT}");
    // Near the limit a request's prompt is counted exactly, as OpenAI bills it (the gateway's
    // count, a little above the simulator's 19): it reserves that plus its `max_tokens`.
    let reservation = tollgate::tokens::count_prompt(
        tollgate::tokens::Encoding::for_model("gpt-4o"),
        tollgate::api::endpoint::Endpoint::ChatCompletions,
        &Bytes::from(body("chat-large", false, 10)),
    )
    .await as i64
        + 10;
    assert!(
        LIMIT - spent_pg < reservation,
        "spent {spent_pg}: more than one request's reservation ({reservation}) left of {LIMIT}"
    );
    eprintln!(
        "{N} concurrent in {:.1} s: {admitted_in_wave} admitted; after the top-up {admitted} admitted, {refused} refused (429); \
         spent {spent_pg} of {LIMIT} tokens (Redis {spent_redis}, one reservation {reservation}); {} rows, per replica {per_replica:?}",
        wave.as_secs_f64(),
        rows.len()
    );
    // Stopped before the prefix and the database go: nothing writes to them afterwards.
    for g in gws {
        let (status, _) = g.stop("-TERM").await;
        assert!(status.success());
    }
}

/// Long streams held on one replica when it is SIGKILLed mid-load: the two others keep
/// serving without an error, the room the dead one held comes back once its leases (2 s) end,
/// and after its restart (same replica name and spool) every response a client saw complete
/// has exactly one row in PostgreSQL — including those whose records the dead replica had
/// only in its spool, its path to PostgreSQL being cut just before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_gives_its_room_back_and_its_restart_loses_no_record() {
    const TEST: &str = "a_killed_replica_gives_its_room_back";
    let Some(redis) = fleet::require_redis(TEST) else {
        return;
    };
    let Some(db) = pg::TestDb::new("fleet_kill").await else {
        return;
    };
    const LEASE: Duration = Duration::from_secs(2);
    const STREAMS: usize = 4;
    const STREAM_TOKENS: i64 = 5_000;
    const DOOMED: usize = 2;
    let fleet = Fleet::new(
        Harness::new()
            .backend(gpt())
            .backend(
                Backend::sim("slow", "llama-3.1-8b")
                    .alias("chat-slow")
                    .price(0.2, 0.2)
                    // Twenty seconds of tokens: every stream is still going when its replica dies.
                    .paced(Duration::from_millis(100), 200),
            )
            .ledger_url(&db.url)
            .store(&format!(
                "{}\nredis_timeout_ms = 2000\nlease_s = {}",
                redis.store(),
                LEASE.as_secs()
            ))
            .team_toml(
                "search",
                SEARCH_KEY,
                "budgets = [{ window = \"day\", tokens = 100000000 }]",
            ),
        "fleet-kill",
    )
    .await;
    // The doomed replica reaches the database through a proxy the test cuts before the kill:
    // its last records wait in its spool, which only its restart can drain.
    let proxy = pg::Proxy::start().await;
    fleet.route_ledger(DOOMED, &db.url, &proxy.url(&db));
    let mut gws = Vec::new();
    for i in 0..REPLICAS {
        gws.push(Some(fleet.start(i).await));
    }
    let addrs: Vec<SocketAddr> = gws.iter().flatten().map(|g| g.addr).collect();
    let survivor_admin = gws[0].as_ref().unwrap().admin_addr;
    let client = client();

    // The load: workers pinned to replicas, JSON and streams. A worker of the doomed replica
    // stops at its first failure; one of a survivor may not fail at all.
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..6 {
        let (client, seen, stop) = (client.clone(), seen.clone(), stop.clone());
        let r = w % REPLICAS;
        let addr = addrs[r];
        workers.spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let stream = (w + i).is_multiple_of(2);
                match send(&client, addr, SEARCH_KEY, body("chat-large", stream, 10), r).await {
                    Ok(s) if r == DOOMED => {
                        let cut = !s.complete;
                        seen.lock().unwrap().push(s);
                        if cut {
                            return;
                        }
                    }
                    Ok(s) => {
                        assert!(
                            s.status == 200 && s.complete,
                            "a survivor failed a request: {} {:?}",
                            s.status,
                            s.body
                        );
                        seen.lock().unwrap().push(s);
                    }
                    // Refused or cut by the kill: nothing of it was seen complete.
                    Err(_) if r == DOOMED => return,
                    Err(e) => panic!("a survivor ({}) failed a request: {e}", replica(r)),
                }
            }
        });
    }

    // Long streams on the doomed replica, each holding its worst case under a lease.
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        let req = http::Request::post(format!("http://{}/v1/chat/completions", addrs[DOOMED]))
            .header("authorization", format!("Bearer {SEARCH_KEY}"))
            .body(Full::from(body("chat-slow", true, STREAM_TOKENS as u64)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        open.push(body);
    }
    let held_by_streams = STREAMS as i64 * STREAM_TOKENS;
    let (_, reserved) = team_tokens(&client, survivor_admin).await;
    assert!(
        reserved >= held_by_streams,
        "a survivor sees the streams' reservations: {reserved}"
    );
    // Longer than a lease: the live replica renews them, the load goes on meanwhile.
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    let (_, reserved) = team_tokens(&client, survivor_admin).await;
    assert!(reserved >= held_by_streams, "renewed: {reserved}");

    proxy.cut().await;
    let doomed = gws[DOOMED].take().unwrap();
    // Its responses still complete, their records committed to the spool.
    let cut = Instant::now();
    let spooled_at_kill = loop {
        let n = spooled(&client, doomed.admin_addr).await;
        if n >= 10 {
            break n;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "the doomed replica spooled only {n} records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed = Instant::now();
    let (status, _) = doomed.stop("-KILL").await;
    assert!(!status.success(), "killed, not exited");
    drop(open);
    // The survivors' own requests hold a few small reservations at any time; the streams'
    // room is back once the figure is below one stream's.
    let back = loop {
        let (_, reserved) = team_tokens(&client, survivor_admin).await;
        if reserved < STREAM_TOKENS {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < LEASE + Duration::from_secs(4),
            "the leases ({LEASE:?}) should have run out: {reserved} tokens still reserved"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Renewed every third of the lease, so about two thirds of it were left at the kill; a
    // renewal late on a loaded machine leaves less, hence the looser bound. What it rules out
    // is room given back at once, as if the dead replica had released it.
    assert!(
        back >= LEASE / 4,
        "the room came back before the lease could end: {back:?}"
    );
    // The survivors keep serving a little longer, then the load stops.
    let before = seen.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < before + 20 {
        assert!(Instant::now() < deadline, "the survivors stopped serving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(w) = workers.join_next().await {
        w.expect("a worker failed");
    }

    // The restart: same config, so the same replica name and spool; the database is back.
    let in_pg: std::collections::HashSet<String> =
        db.rows().await.into_iter().map(|r| r.id).collect();
    let waiting = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.complete && s.id.as_ref().is_some_and(|id| !in_pg.contains(id)))
        .count();
    assert!(
        waiting > 0,
        "some completed responses' records were only in the dead replica's spool"
    );
    proxy.restore();
    let restarted = fleet.start(DOOMED).await;
    let restarted_admin = restarted.admin_addr;
    let drained = Instant::now();
    loop {
        if spooled(&client, restarted_admin).await == 0 {
            break;
        }
        assert!(
            drained.elapsed() < Duration::from_secs(20),
            "the spool did not drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It serves again under its name.
    for i in 0..4usize {
        let s = send(
            &client,
            restarted.addr,
            SEARCH_KEY,
            body("chat-large", i.is_multiple_of(2), 10),
            DOOMED,
        )
        .await
        .unwrap();
        assert!(s.complete, "{} {:?}", s.status, s.body);
        seen.lock().unwrap().push(s);
    }
    let seen = seen.lock().unwrap().clone();
    let complete_ids: Vec<&str> = seen
        .iter()
        .filter(|s| s.complete)
        .filter_map(|s| s.id.as_deref())
        .collect();
    let rows = rows_until(&db, Duration::from_secs(20), |rows| {
        let have: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        complete_ids.iter().all(|id| have.contains(id))
    })
    .await;
    let complete = check_rows(&seen, &rows);
    let on_doomed = seen
        .iter()
        .filter(|s| s.complete && s.replica == DOOMED)
        .count();
    assert!(
        on_doomed > 4,
        "the doomed replica served before it died: {on_doomed}"
    );
    eprintln!(
        "{} requests, {complete} complete ({on_doomed} on {} across its kill and restart, \
         {spooled_at_kill}+ records spooled before the kill, {waiting} complete ones only there); reserved room back {:.2} s after SIGKILL (lease {LEASE:?}); {} rows in PostgreSQL, none missing or doubled",
        seen.len(),
        replica(DOOMED),
        back.as_secs_f64(),
        rows.len()
    );
    for g in gws.into_iter().flatten().chain([restarted]) {
        let (status, _) = g.stop("-TERM").await;
        assert!(status.success());
    }
}

/// Records waiting in a replica's spool (`tollgate_ledger_spooled_records`).
async fn spooled(client: &HttpClient, admin: SocketAddr) -> u64 {
    let m = admin_text(client, admin, "/metrics").await;
    m.lines()
        .find_map(|l| l.strip_prefix("tollgate_ledger_spooled_records "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no spool depth in the metrics:\n{m}")) as u64
}

async fn admin_text(client: &HttpClient, admin: SocketAddr, path: &str) -> String {
    let req = http::Request::get(format!("http://{admin}{path}"))
        .body(Full::default())
        .unwrap();
    let resp = client.request(req).await.expect("the admin port answers");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// One request of a [`Load`]: which worker sent it, when, and what came back.
#[derive(Debug, Clone)]
struct Shot {
    worker: usize,
    team: &'static str,
    sent: Instant,
    done: Instant,
    seen: Result<Seen, String>,
}

impl Shot {
    fn status(&self) -> Option<u16> {
        self.seen.as_ref().ok().map(|s| s.status)
    }

    fn replica(&self) -> usize {
        self.worker % REPLICAS
    }

    /// Sent and answered within `[from, to]`.
    fn within(&self, from: Instant, to: Instant) -> bool {
        self.sent >= from && self.done <= to
    }

    /// The OpenAI error body's `code`, for a refusal.
    fn error_code(&self) -> Option<String> {
        let s = self.seen.as_ref().ok()?;
        let v: serde_json::Value = serde_json::from_slice(&s.body).ok()?;
        v["error"]["code"].as_str().map(str::to_string)
    }
}

/// Steady load on the fleet: for each (team, key), `per_replica` workers on every replica,
/// each sending its next request when the last one ended (one in two a stream). Workers never
/// stop on a failure: the test reads every answer afterwards.
struct Load {
    shots: Arc<Mutex<Vec<Shot>>>,
    stop: Arc<AtomicBool>,
    workers: tokio::task::JoinSet<()>,
    /// Worker ids of each team.
    teams: HashMap<&'static str, Vec<usize>>,
}

impl Load {
    fn start(
        client: &HttpClient,
        addrs: &[SocketAddr],
        keys: &[(&'static str, &'static str)],
        per_replica: usize,
    ) -> Load {
        let shots = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = tokio::task::JoinSet::new();
        let mut teams: HashMap<&'static str, Vec<usize>> = HashMap::new();
        let mut w = 0;
        for &(team, key) in keys {
            for _ in 0..per_replica * addrs.len() {
                // `w % REPLICAS` is the worker's replica.
                let (client, addr) = (client.clone(), addrs[w % addrs.len()]);
                let (shots, stop) = (shots.clone(), stop.clone());
                teams.entry(team).or_default().push(w);
                workers.spawn(async move {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let sent = Instant::now();
                        let stream = (w + i).is_multiple_of(2);
                        let seen = send(
                            &client,
                            addr,
                            key,
                            body("chat-large", stream, 10),
                            w % REPLICAS,
                        )
                        .await;
                        shots.lock().unwrap().push(Shot {
                            worker: w,
                            team,
                            sent,
                            done: Instant::now(),
                            seen,
                        });
                    }
                });
                w += 1;
            }
        }
        Load {
            shots,
            stop,
            workers,
            teams,
        }
    }

    fn shots(&self) -> Vec<Shot> {
        self.shots.lock().unwrap().clone()
    }

    /// Polls until `done(shots so far)`; panics with `what` after `within`.
    async fn until(&self, within: Duration, what: &str, done: impl Fn(&[Shot]) -> bool) {
        let deadline = Instant::now() + within;
        while !done(&self.shots.lock().unwrap()) {
            assert!(Instant::now() < deadline, "{what} within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// True once every worker of `team` has had an answer to a request it sent after `t`.
    fn all_answered_after(&self, shots: &[Shot], team: &str, t: Instant) -> bool {
        self.teams[team]
            .iter()
            .all(|&w| shots.iter().any(|s| s.worker == w && s.sent >= t))
    }

    async fn stop(mut self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(w) = self.workers.join_next().await {
            w.expect("a load worker panicked");
        }
        self.shots()
    }
}

/// Tokens the ledger billed `team` (rows of status ok), as `/admin/budgets` counts them.
async fn ledger_tokens(pg: &tokio_postgres::Client, team: &str) -> i64 {
    pg.query_one(
        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0)::BIGINT \
         FROM requests WHERE status = 'ok' AND team = $1",
        &[&team],
    )
    .await
    .unwrap()
    .get(0)
}

/// Polls until every replica's `/admin/budgets` shows `team` settled at `want` tokens.
async fn counters_reach(
    client: &HttpClient,
    gws: &[BinaryGateway],
    team: &str,
    want: i64,
    within: Duration,
) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let mut got = Vec::new();
        for g in gws {
            got.push(settled_tokens_of(client, g.admin_addr, team).await);
        }
        if got.iter().all(|&t| t == want) || Instant::now() >= deadline {
            return *got.iter().find(|&&t| t != want).unwrap_or(&want);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The test's own Redis really stops (`SHUTDOWN SAVE`: the process exits) while three
/// replicas are under load from two teams, and starts again on the same port with its data:
/// - `search` (fail-closed): every request sent while Redis is down is refused with 503 and
///   OpenAI's body, code `budget_store_unavailable`; none is admitted. Once Redis is back the
///   replicas admit again, and its counters hold what the ledger billed.
/// - `other` (`fail_open`, `fail_open_share = 0.5`): each replica admits on its own
///   allowance, half the room it last saw; three halves let the fleet past the limit, and by
///   no more than the allowances. Once Redis is back the spend made meanwhile is in its
///   counters (equal to the ledger's) and the team is refused as over budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_load_refuses_fail_closed_budgets_bounds_fail_open_ones_and_then_agrees_with_the_ledger(
) {
    const TEST: &str = "redis_stopped_mid_load";
    let Some(mut redis) = redis_server::OwnRedis::start(TEST).await else {
        return;
    };
    let Some(db) = pg::TestDb::new("fleet_redis_stop").await else {
        return;
    };
    // 19 prompt tokens + 10 generated: what the simulator bills each request.
    const PER_REQUEST: i64 = 29;
    const OPEN_LIMIT: i64 = PER_REQUEST * 400;
    const SHARE: f64 = 0.5;
    let fleet = Fleet::new(
        Harness::new()
            .backend(gpt())
            .ledger_url(&db.url)
            .store(&format!(
                "{}\nredis_timeout_ms = 2000\nfail_open_share = {SHARE}",
                redis.store()
            ))
            .team_toml(
                "search",
                SEARCH_KEY,
                "budgets = [{ window = \"day\", tokens = 100000000 }]",
            )
            .team_toml(
                "other",
                OTHER_KEY,
                &format!(
                    "budgets = [{{ window = \"day\", tokens = {OPEN_LIMIT}, fail_open = true }}]"
                ),
            ),
        "fleet-redis-stop",
    )
    .await;
    let mut gws = Vec::new();
    for i in 0..REPLICAS {
        gws.push(fleet.start(i).await);
    }
    let addrs: Vec<SocketAddr> = gws.iter().map(|g| g.addr).collect();
    let admin = gws[0].admin_addr;
    let client = client();
    let load = Load::start(
        &client,
        &addrs,
        &[("search", SEARCH_KEY), ("other", OTHER_KEY)],
        2,
    );

    // `other` halfway to its limit, then the figure its allowances are bounded by: a replica's
    // allowance is a share of the room its last admission saw, and that room is at most the
    // limit less the spend at that moment. Once every worker of `other` has had an answer to
    // a request sent after this read, each replica's last look came after it (workers send
    // one request after another), so each allowance is at most SHARE x (limit - spent now).
    let halfway = Instant::now() + Duration::from_secs(60);
    let spent_before = loop {
        let (spent, _) = team_tokens_of(&client, admin, "other").await;
        if spent >= OPEN_LIMIT / 2 {
            break spent;
        }
        assert!(Instant::now() < halfway, "`other` spent only {spent}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let read = Instant::now();
    load.until(Duration::from_secs(20), "every worker answered", |s| {
        load.all_answered_after(s, "other", read)
    })
    .await;
    let allowance_max = REPLICAS as i64 * ((OPEN_LIMIT - spent_before) as f64 * SHARE) as i64;

    let stopping = Instant::now();
    redis.shutdown_saving().await;
    let down = Instant::now();
    // Down until every replica has refused both teams (`other`: its allowance is used up),
    // and for 2 s at least.
    load.until(
        Duration::from_secs(30),
        "every replica refused both teams",
        |shots| {
            down.elapsed() >= Duration::from_secs(2)
                && (0..REPLICAS).all(|r| {
                    ["search", "other"].iter().all(|t| {
                        shots.iter().any(|s| {
                            s.team == *t
                                && s.replica() == r
                                && s.sent >= down
                                && s.status() == Some(503)
                        })
                    })
                })
        },
    )
    .await;
    let restarting = Instant::now();
    let outage = restarting - down;
    redis.spawn().await;
    let up = Instant::now();
    // Back: each replica admits `search` again (after a failure a replica leaves Redis
    // alone for 500 ms, and its connection reconnects).
    load.until(
        Duration::from_secs(20),
        "every replica admitted `search` again",
        |shots| {
            (0..REPLICAS).all(|r| {
                shots.iter().any(|s| {
                    s.team == "search"
                        && s.replica() == r
                        && s.sent >= up
                        && s.status() == Some(200)
                })
            })
        },
    )
    .await;
    let back = Instant::now();
    load.until(
        Duration::from_secs(20),
        "more load after the return",
        |shots| shots.iter().filter(|s| s.sent >= back).count() >= 60,
    )
    .await;
    let shots = load.stop().await;

    for s in &shots {
        let seen = s
            .seen
            .as_ref()
            .unwrap_or_else(|e| panic!("{} did not answer a request: {e}", replica(s.replica())));
        match seen.status {
            200 => assert!(seen.complete, "a 200 cut short: {:?}", seen.body),
            429 => assert_eq!(s.team, "other", "{:?}", seen.body),
            503 => {
                let v: serde_json::Value = serde_json::from_slice(&seen.body)
                    .unwrap_or_else(|e| panic!("a 503 not in JSON ({e}): {:?}", seen.body));
                assert_eq!(v["error"]["code"], "budget_store_unavailable", "{v}");
                assert_eq!(v["error"]["type"], "server_error", "{v}");
                // From the stop until each replica has tried Redis again after its return.
                assert!(
                    s.done >= stopping && s.sent <= back,
                    "refused while Redis was up: {v}"
                );
            }
            other => panic!("unexpected {other}: {:?}", seen.body),
        }
    }
    let during: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.within(down, restarting))
        .collect();
    let closed_refused = during.iter().filter(|s| s.team == "search").count();
    assert!(closed_refused > 0);
    for s in during.iter().filter(|s| s.team == "search") {
        assert_eq!(
            (s.status(), s.error_code().as_deref()),
            (Some(503), Some("budget_store_unavailable")),
            "`search` (fail-closed) was answered while Redis was down"
        );
    }
    for s in shots
        .iter()
        .filter(|s| s.team == "search" && s.sent >= back)
    {
        assert_eq!(
            s.status(),
            Some(200),
            "`search` refused after Redis came back"
        );
    }
    let open_admitted = during
        .iter()
        .filter(|s| s.team == "other" && s.status() == Some(200))
        .count() as i64;
    for r in 0..REPLICAS {
        assert!(
            during
                .iter()
                .any(|s| s.team == "other" && s.replica() == r && s.status() == Some(200)),
            "{} admitted nothing on its allowance",
            replica(r)
        );
    }
    assert!(
        open_admitted * PER_REQUEST <= allowance_max,
        "admitted {open_admitted} requests on fail-open allowances of at most {allowance_max} tokens"
    );

    // Every request has its row (refusals too), once, with its replica.
    let seen: Vec<Seen> = shots.iter().filter_map(|s| s.seen.clone().ok()).collect();
    let rows = rows_until(&db, Duration::from_secs(20), |rows| {
        rows.len() >= seen.len()
    })
    .await;
    assert_eq!(rows.len(), seen.len(), "one row per request");
    check_rows(&seen, &rows);

    // Redis back: its counters are the ledger's, the outage's spend included.
    let pgc = db.client().await;
    let ledger_closed = ledger_tokens(&pgc, "search").await;
    let ledger_open = ledger_tokens(&pgc, "other").await;
    let redis_closed = counters_reach(
        &client,
        &gws,
        "search",
        ledger_closed,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        redis_closed, ledger_closed,
        "`search`: Redis holds what the ledger billed"
    );
    let redis_open =
        counters_reach(&client, &gws, "other", ledger_open, Duration::from_secs(20)).await;
    assert_eq!(
        redis_open, ledger_open,
        "`other`: the spend made on allowances reached Redis"
    );
    // Redis admitted up to the limit, the allowances the rest: past the limit (three replicas
    // with half the room each), and by no more than the allowances.
    assert!(
        ledger_open > OPEN_LIMIT,
        "the allowances ({allowance_max} tokens) let the fleet past the limit {OPEN_LIMIT}: spent {ledger_open}"
    );
    assert!(
        ledger_open - OPEN_LIMIT <= allowance_max,
        "spent {ledger_open}: more past the limit {OPEN_LIMIT} than the allowances ({allowance_max})"
    );
    for (i, g) in gws.iter().enumerate() {
        let s = send(&client, g.addr, OTHER_KEY, body("chat-large", false, 10), i)
            .await
            .unwrap();
        assert_eq!(s.status, 429, "`other` is over its limit: {:?}", s.body);
    }
    eprintln!(
        "{} requests; Redis down {:.1} s: `search` refused {closed_refused} (503 budget_store_unavailable), \
         `other` admitted {open_admitted} on allowances of at most {allowance_max} tokens (spent {spent_before} of \
         {OPEN_LIMIT} before); after: ledger = Redis = {ledger_closed} (`search`), {ledger_open} (`other`, \
         {} past the limit); {} rows",
        shots.len(),
        outage.as_secs_f64(),
        ledger_open - OPEN_LIMIT,
        rows.len()
    );
    for g in gws {
        let (status, _) = g.stop("-TERM").await;
        assert!(status.success());
    }
}

/// The test's own Redis is SIGKILLed mid-load and comes back empty, as one without
/// persistence does: the counters of a fail-closed team must be rebuilt from the ledger, or
/// the fleet would hand out the whole budget a second time. After the return the fleet runs
/// the team into its limit, and Redis and the ledger agree on a spend within it.
///
/// Relies on the budget store noticing a Redis that lost its data (its teams' `seeded`
/// markers gone) and re-seeding it from the ledger (src/budget/redis.rs): without that the two
/// assertions marked FLUSH DETECTION fail, the ledger showing about one and a half budgets
/// spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_load_is_reseeded_from_the_ledger_and_the_budget_holds() {
    const TEST: &str = "redis_restarted_empty_mid_load";
    let Some(mut redis) = redis_server::OwnRedis::start(TEST).await else {
        return;
    };
    let Some(db) = pg::TestDb::new("fleet_redis_empty").await else {
        return;
    };
    const PER_REQUEST: i64 = 29;
    const LIMIT: i64 = PER_REQUEST * 300;
    let fleet = Fleet::new(
        Harness::new()
            .backend(gpt())
            .ledger_url(&db.url)
            .store(&format!("{}\nredis_timeout_ms = 2000", redis.store()))
            .team_toml(
                "search",
                SEARCH_KEY,
                &format!("budgets = [{{ window = \"day\", tokens = {LIMIT} }}]"),
            ),
        "fleet-redis-empty",
    )
    .await;
    let mut gws = Vec::new();
    for i in 0..REPLICAS {
        gws.push(fleet.start(i).await);
    }
    let addrs: Vec<SocketAddr> = gws.iter().map(|g| g.addr).collect();
    let admin = gws[0].admin_addr;
    let client = client();
    let load = Load::start(&client, &addrs, &[("search", SEARCH_KEY)], 2);
    let halfway = Instant::now() + Duration::from_secs(60);
    let spent_before = loop {
        let (spent, _) = team_tokens(&client, admin).await;
        if spent >= LIMIT / 2 {
            break spent;
        }
        assert!(Instant::now() < halfway, "spent only {spent}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    redis.kill_losing_data().await;
    let down = Instant::now();
    load.until(
        Duration::from_secs(30),
        "every replica saw Redis down",
        |shots| {
            (0..REPLICAS).all(|r| {
                shots
                    .iter()
                    .any(|s| s.replica() == r && s.sent >= down && s.status() == Some(503))
            })
        },
    )
    .await;
    let outage = down.elapsed();
    redis.spawn().await;
    // Until every replica refuses as over budget: at the limit.
    let up = Instant::now();
    load.until(
        Duration::from_secs(90),
        "every replica refused as over budget",
        |shots| {
            (0..REPLICAS).all(|r| {
                shots
                    .iter()
                    .any(|s| s.replica() == r && s.sent >= up && s.status() == Some(429))
            })
        },
    )
    .await;
    let shots = load.stop().await;
    for s in &shots {
        let seen = s.seen.as_ref().expect("every replica answers");
        assert!(
            [200, 429, 503].contains(&seen.status),
            "unexpected {}: {:?}",
            seen.status,
            seen.body
        );
        assert!(seen.status != 200 || seen.complete);
    }
    let seen: Vec<Seen> = shots.iter().filter_map(|s| s.seen.clone().ok()).collect();
    let rows = rows_until(&db, Duration::from_secs(20), |rows| {
        rows.len() >= seen.len()
    })
    .await;
    assert_eq!(rows.len(), seen.len(), "one row per request");
    check_rows(&seen, &rows);
    let spent = ledger_tokens(&db.client().await, "search").await;
    let in_redis = counters_reach(&client, &gws, "search", spent, Duration::from_secs(20)).await;
    eprintln!(
        "{} requests; Redis SIGKILLed at {spent_before} of {LIMIT} tokens, empty again after {:.1} s; \
         ledger {spent}, Redis {in_redis}",
        shots.len(),
        outage.as_secs_f64()
    );
    // FLUSH DETECTION: Redis came back empty; the replicas rebuilt its counters from the
    // ledger, so the fleet stopped at the limit instead of granting it again.
    assert!(spent <= LIMIT, "spent {spent}: over the limit {LIMIT}");
    // FLUSH DETECTION: its counters are the ledger's.
    assert_eq!(in_redis, spent, "Redis holds what the ledger billed");
    for g in gws {
        let (status, _) = g.stop("-TERM").await;
        assert!(status.success());
    }
}

/// The test's own PostgreSQL is stopped (`pg_ctl stop -m fast`) for 10 s while three replicas
/// are under load, then started again: no request fails for it, each replica's spool fills
/// during the outage and drains after it, and the ledger ends with exactly one row per
/// response its client saw complete — none lost, none doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_ten_seconds_mid_load_fails_no_request_and_the_ledger_ends_exact() {
    const TEST: &str = "postgres_stopped_for_ten_seconds";
    const OUTAGE: Duration = Duration::from_secs(10);
    let Some(mut pg) = pg_server::OwnPg::start(TEST, &[], None).await else {
        return;
    };
    const DB: &str = "tollgate_fleet";
    let url = pg.create_db(DB).await;
    let fleet = Fleet::new(
        Harness::new()
            .backend(gpt())
            .ledger_url(&url)
            .team("search", SEARCH_KEY),
        "fleet-pg-stop",
    )
    .await;
    let mut gws = Vec::new();
    for i in 0..REPLICAS {
        gws.push(fleet.start(i).await);
    }
    let addrs: Vec<SocketAddr> = gws.iter().map(|g| g.addr).collect();
    let client = client();
    let load = Load::start(&client, &addrs, &[("search", SEARCH_KEY)], 2);
    // Writing to PostgreSQL before the stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.rows(DB).await.len() < 60 {
        assert!(Instant::now() < deadline, "the ledger is not being written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.stop().await;
    let down = Instant::now();
    // The spools while it is down: each replica's depth, sampled.
    let mut peak = [0u64; REPLICAS];
    while down.elapsed() < OUTAGE {
        for (i, g) in gws.iter().enumerate() {
            peak[i] = peak[i].max(spooled(&client, g.admin_addr).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut at_restart = [0u64; REPLICAS];
    for (i, g) in gws.iter().enumerate() {
        at_restart[i] = spooled(&client, g.admin_addr).await;
        peak[i] = peak[i].max(at_restart[i]);
    }
    pg.start_again().await;
    let up = Instant::now();
    let outage = up - down;
    // Drained while the load goes on.
    let drained = loop {
        let mut left = 0;
        for g in &gws {
            left += spooled(&client, g.admin_addr).await;
        }
        if left == 0 {
            break up.elapsed();
        }
        assert!(
            up.elapsed() < Duration::from_secs(60),
            "{left} records still spooled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after = Instant::now();
    load.until(
        Duration::from_secs(20),
        "more load after the drain",
        |shots| shots.iter().filter(|s| s.sent >= after).count() >= 30,
    )
    .await;
    let shots = load.stop().await;

    for s in &shots {
        let seen = s
            .seen
            .as_ref()
            .unwrap_or_else(|e| panic!("{} did not answer a request: {e}", replica(s.replica())));
        assert!(
            seen.status == 200 && seen.complete,
            "a request failed: {} {:?}",
            seen.status,
            seen.body
        );
    }
    let during = shots.iter().filter(|s| s.within(down, up)).count();
    assert!(during > 0, "no request was served during the outage");
    for (i, &p) in peak.iter().enumerate() {
        // Sampled: the depth at the restart alone would do, the load never stopping.
        assert!(
            p > 0,
            "{} spooled nothing while PostgreSQL was down",
            replica(i)
        );
    }
    let seen: Vec<Seen> = shots.iter().filter_map(|s| s.seen.clone().ok()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = pg.rows(DB).await;
        if rows.len() >= seen.len() || Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let complete = check_rows(&seen, &rows);
    assert_eq!(complete, seen.len());
    assert_eq!(
        rows.len(),
        complete,
        "exactly one row per response the clients saw complete"
    );
    eprintln!(
        "{} requests, all complete, {during} of them while PostgreSQL was down ({:.1} s); \
         spool peak per replica {peak:?} (at the restart {at_restart:?}), drained {:.1} s after it; \
         {} rows, one per response",
        shots.len(),
        outage.as_secs_f64(),
        drained.as_secs_f64(),
        rows.len()
    );
    for g in gws {
        let (status, _) = g.stop("-TERM").await;
        assert!(status.success());
    }
}
