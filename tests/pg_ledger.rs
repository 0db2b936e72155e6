//! The fleet ledger in PostgreSQL: what goes in comes back, once; reports agree with the
//! embedded ledger; an outage spools and drains; a killed gateway loses nothing.
//!
//! Needs the PostgreSQL this machine type runs (127.0.0.1:5432, trust auth). Each test makes
//! a database of its own and drops it. The TLS tests run a PostgreSQL of their own with
//! `ssl=on` (PostgreSQL's server binaries and `openssl`). Without a server the tests skip with the reason, except
//! under CI, where a missing server is a failure.

mod common;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/pg_server.rs"]
mod pg_server;

use common::*;
use pg::{Proxy, TestDb};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate::ledger::read;
use tollgate::ledger::{Ledger, Record, Store};
use tollgate::meter::TokenSource;

/// 2026-12-03T08:00:00Z
const DEC_2026: i64 = 1_796_284_800_000_000;

/// A record with every column set to something that can be told apart.
fn record(i: u32, at_us: i64, team: &str) -> Record {
    Record {
        id: format!("req-{i:06}"),
        started_at_us: at_us + i64::from(i) * 1_000,
        ended_at_us: at_us + i64::from(i) * 1_000 + 250_000,
        team: team.into(),
        key_id: format!("k-{}", i % 3).into(),
        tags: format!(r#"{{"project":"p{}","env":"prod"}}"#, i % 4),
        endpoint: if i.is_multiple_of(5) {
            "/v1/embeddings"
        } else {
            "/v1/chat/completions"
        },
        requested_model: "chat-small".into(),
        backend: (!i.is_multiple_of(7)).then(|| {
            if i.is_multiple_of(2) {
                "llama"
            } else {
                "openai"
            }
            .into()
        }),
        served_model: (!i.is_multiple_of(7)).then(|| {
            if i.is_multiple_of(2) {
                "llama-3"
            } else {
                "gpt-4o-mini"
            }
            .into()
        }),
        prompt_tokens: Some(u64::from(100 + i)),
        completion_tokens: (!i.is_multiple_of(11)).then_some(u64::from(20 + i % 50)),
        cached_tokens: Some(u64::from(i % 9)),
        cache_write_tokens: (i % 4 == 1).then_some(u64::from(i % 13)),
        cache_write_1h_tokens: (i % 4 == 1).then_some(u64::from(i % 13) / 2),
        reasoning_tokens: Some(u64::from(i % 2)),
        token_source: Some(match i % 3 {
            0 => TokenSource::Upstream,
            1 => TokenSource::Engine,
            _ => TokenSource::Local,
        }),
        cost_nusd: i64::from(i) * 1_234_567 + 89,
        priced: !i.is_multiple_of(13),
        egress_bytes: u64::from(i) * 1_000,
        status: match i % 10 {
            0 => "upstream_error",
            1 => "client_closed",
            _ => "ok",
        },
        http_status: if i.is_multiple_of(10) { 502 } else { 200 },
        attempts: 1 + i % 2,
        resent: i % 2,
        latency_ms: 12.5 + f64::from(i) / 3.0,
        ttft_ms: i.is_multiple_of(2).then_some(3.25 + f64::from(i)),
        stream: i.is_multiple_of(2),
        replica: format!("replica-{}", i % 3).into(),
    }
}

/// Submits and waits until every record is reported committed.
async fn write(ledger: &Arc<Ledger>, records: &[Record]) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for r in records {
        let tx = tx.clone();
        ledger.submit(
            r.clone(),
            Some(Box::new(move |ok| {
                let _ = tx.send(ok);
            })),
        );
    }
    drop(tx);
    let mut n = 0;
    while let Some(ok) = rx.recv().await {
        assert!(ok, "a record was not committed");
        n += 1;
    }
    assert_eq!(n, records.len());
}

async fn open(store: Store) -> Arc<Ledger> {
    tokio::task::spawn_blocking(move || Ledger::open(store, false, "test".into()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn close(ledger: Arc<Ledger>) {
    tokio::task::spawn_blocking(move || ledger.close())
        .await
        .unwrap();
}

fn pg_store(url: &str, what: &str) -> Store {
    Store::Postgres {
        url: tollgate::secret::Secret::new(url),
        spool: temp_dir(what).join("spool.db"),
    }
}

/// Every record in the store, by id.
async fn read_back(store: &Store) -> Vec<Record> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let reader = store.reader().unwrap();
        let sql = format!(
            "SELECT {} FROM requests ORDER BY id",
            tollgate::ledger::sqlite::COLUMNS
        );
        let mut out = Vec::new();
        reader
            .each(&sql, &[], |row| -> Result<(), read::ReadError> {
                out.push(read::record(row)?);
                Ok(())
            })
            .unwrap();
        out
    })
    .await
    .unwrap()
}

async fn wait_drained(ledger: &Ledger) {
    for _ in 0..300 {
        if ledger.spooled() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the spool still holds {} records", ledger.spooled());
}

#[tokio::test]
async fn records_come_back_equal_in_every_column_and_a_second_insert_adds_nothing() {
    let Some(db) = TestDb::new("roundtrip").await else {
        return;
    };
    let store = pg_store(&db.url, "pg-roundtrip");
    let ledger = open(store.clone()).await;
    // Three months, one of them past: partitions are made as records need them.
    let mut records: Vec<Record> = (0..300).map(|i| record(i, DEC_2026, "search")).collect();
    records.push(record(900, DEC_2026 + 40 * 86_400_000_000, "search"));
    records.push(record(901, DEC_2026 - 300 * 86_400_000_000, "ads"));
    write(&ledger, &records).await;
    assert_eq!(ledger.spooled(), 0);

    let mut want = records.clone();
    want.sort_by(|a, b| a.id.cmp(&b.id));
    let got = read_back(&store).await;
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(format!("{g:?}"), format!("{w:?}"));
    }

    // The same ids again (a replay): nothing new.
    write(&ledger, &records[..50]).await;
    close(ledger).await;
    let ids = db.ids().await;
    assert_eq!(ids.len(), records.len());
    assert!(ids.values().all(|&n| n == 1));
    let partitions: i64 = db
        .client()
        .await
        .query_one(
            "SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'requests'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(partitions >= 3, "{partitions} partitions");
}

#[tokio::test]
async fn reports_from_postgres_equal_reports_from_sqlite() {
    use tollgate::finops::{backends, focus, report, statement, whatif};
    let Some(db) = TestDb::new("reports").await else {
        return;
    };
    let records: Vec<Record> = (0..500)
        .map(|i| {
            let team = ["search", "ads", "support"][i as usize % 3];
            record(i, DEC_2026 + i64::from(i) * 60_000_000, team)
        })
        .collect();
    let file = Store::Sqlite(temp_dir("pg-reports").join("tollgate.db"));
    let pg = pg_store(&db.url, "pg-reports");
    for store in [&file, &pg] {
        let ledger = open(store.clone()).await;
        write(&ledger, &records).await;
        close(ledger).await;
    }
    let (text, _, env) = Harness::new()
        .backend(Backend::sim("llama", "llama-3").toml("gpu = { hourly_usd = 2.0, count = 1 }\n"))
        .backend(
            Backend::sim("openai", "gpt-4o-mini")
                .commercial()
                .alias("llama-3"),
        )
        .team("search", SEARCH_KEY)
        .render()
        .await;
    let config =
        Arc::new(tollgate::config::parse(&text, "t.toml", &|v| env.get(v).cloned()).unwrap());
    let results = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for store in [file, pg] {
            let conn = store.reader().unwrap();
            let mut figures = Vec::new();
            for by in [
                "team",
                "team,model",
                "backend,status",
                "key,endpoint",
                "day",
                "hour,team",
                "minute,model",
                "project,env",
                "requested_model",
                "",
            ] {
                let dims = report::Dim::parse_list(by).unwrap();
                let mut rows =
                    report::query(&conn, &dims, Some(DEC_2026 + 60_000_000), None).unwrap();
                rows.sort_by(|a, b| a.keys.cmp(&b.keys));
                figures.push(format!("{by}: {rows:?}"));
            }
            figures.push(focus::export(&conn, &config, None, None).unwrap());
            let gpus = backends::economics(
                &conn,
                &config,
                &tollgate::config::prices::Catalog::builtin(),
                Some(DEC_2026),
                Some(DEC_2026 + 86_400_000_000),
                DEC_2026,
            )
            .unwrap();
            figures.push(format!("{gpus:?}"));
            let month: statement::Month = "2026-12".parse().unwrap();
            let s = statement::query(&conn, &config, month, statement::Mode::Chargeback).unwrap();
            figures.push(format!("{s:?}"));
            let w = whatif::compare(
                &conn,
                &config,
                &config,
                &tollgate::config::prices::Catalog::builtin(),
                Some(DEC_2026),
                Some(DEC_2026 + 86_400_000_000),
                DEC_2026,
            )
            .unwrap();
            figures.push(format!("{w:?}"));
            for per_key in [false, true] {
                let mut spend = read::spend_since(&conn, "search", DEC_2026, per_key).unwrap();
                spend.sort();
                figures.push(format!("{spend:?}"));
            }
            out.push(figures);
        }
        out
    })
    .await
    .unwrap();
    let (sqlite, postgres) = (&results[0], &results[1]);
    assert!(sqlite[0].contains("search"), "{}", sqlite[0]);
    assert!(
        sqlite
            .iter()
            .any(|f| f.starts_with("Statement {") && f.contains("team: \"ads\"")),
        "the statement has rows to compare"
    );
    for (a, b) in sqlite.iter().zip(postgres) {
        assert_eq!(a, b);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_spools_and_the_spool_drains_once_in_order() {
    let Some(db) = TestDb::new("outage").await else {
        return;
    };
    let proxy = Proxy::start().await;
    let store = pg_store(&proxy.url(&db), "pg-outage");
    let ledger = open(store.clone()).await;
    let records: Vec<Record> = (0..600).map(|i| record(i, DEC_2026, "search")).collect();

    write(&ledger, &records[..100]).await;
    assert_eq!(ledger.spooled(), 0, "PostgreSQL up: nothing spooled");

    proxy.cut().await;
    // Each batch is committed (to the spool) while PostgreSQL is away.
    for chunk in records[100..400].chunks(50) {
        write(&ledger, chunk).await;
    }
    assert!(ledger.spooled() > 0, "records went to the spool");
    assert_eq!(db.ids().await.len(), 100, "nothing reached PostgreSQL");

    proxy.restore();
    // New records keep coming while the spool drains: they go behind it.
    for chunk in records[400..].chunks(50) {
        write(&ledger, chunk).await;
    }
    wait_drained(&ledger).await;
    close(ledger).await;

    let ids = db.ids().await;
    assert_eq!(ids.len(), records.len(), "every record arrived");
    assert!(ids.values().all(|&n| n == 1), "none twice");
    // In order: a record's insert transaction is never older than an earlier record's.
    let rows = db
        .client()
        .await
        .query("SELECT id, xmin::text::bigint FROM requests", &[])
        .await
        .unwrap();
    let xmin: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for pair in records.windows(2) {
        assert!(
            xmin[&pair[0].id] <= xmin[&pair[1].id],
            "{} was inserted after {}",
            pair[0].id,
            pair[1].id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_during_an_outage_spools_and_a_restart_replays_the_spool() {
    let Some(db) = TestDb::new("restart").await else {
        return;
    };
    let proxy = Proxy::start().await;
    proxy.cut().await;
    let store = pg_store(&proxy.url(&db), "pg-restart");
    // Unreachable at start: the ledger opens on its spool, it does not refuse.
    let ledger = open(store.clone()).await;
    let records: Vec<Record> = (0..250).map(|i| record(i, DEC_2026, "search")).collect();
    write(&ledger, &records).await;
    assert_eq!(ledger.spooled(), 250);
    close(ledger).await;

    // The spool file outlives the process; the next start replays it.
    proxy.restore();
    let ledger = open(store.clone()).await;
    assert_eq!(ledger.spooled(), 250, "the restart found the spool");
    wait_drained(&ledger).await;
    close(ledger).await;
    let ids = db.ids().await;
    assert_eq!(ids.len(), 250);
    assert!(ids.values().all(|&n| n == 1));
    let got = read_back(&store).await;
    let mut want = records;
    want.sort_by(|a, b| a.id.cmp(&b.id));
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(format!("{g:?}"), format!("{w:?}"));
    }
}

#[tokio::test]
async fn bad_urls_and_credentials_fail_naming_the_field_and_hiding_the_password() {
    // The shape is checked with the config.
    for url in [
        "postgres://app:s3cret@db:notaport/x",
        "mysql://app:s3cret@db/x",
    ] {
        let text = format!(
            "[store]\nledger = \"{url}\"\n[[backend]]\nname = \"b\"\nurl = \"http://127.0.0.1:1\"\nhosting = \"commercial\"\nmodels = [{{ name = \"m\", input_usd_per_mtok = 1.0, output_usd_per_mtok = 1.0 }}]\n"
        );
        let e = tollgate::config::parse(&text, "t.toml", &|_| None)
            .err()
            .unwrap_or_else(|| panic!("{url} accepted"))
            .to_string();
        assert!(e.contains("store.ledger"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
    let Some(_db) = TestDb::new("badauth").await else {
        return;
    };
    // The server answers but says no: a start error, not a spool.
    for (url, says) in [
        (
            format!(
                "postgres://postgres:s3cret@{}/tollgate_no_such_database",
                pg::server()
            ),
            "does not exist",
        ),
        (
            format!("postgres://no_such_role:s3cret@{}/test", pg::server()),
            "no_such_role",
        ),
    ] {
        let store = pg_store(&url, "pg-badauth");
        let e = tokio::task::spawn_blocking(move || Ledger::open(store, false, "t".into()))
            .await
            .unwrap()
            .err()
            .unwrap_or_else(|| panic!("{url} opened"))
            .to_string();
        assert!(e.contains("store.ledger"), "{e}");
        assert!(e.contains(says), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("*****"), "{e}");
    }
}

/// `tollgate migrate` applies the schema once; again, it has nothing to do; `tollgate
/// report` then reads PostgreSQL.
#[tokio::test]
async fn migrate_is_idempotent_and_report_reads_postgres() {
    let Some(db) = TestDb::new("migrate").await else {
        return;
    };
    let (text, _, _) = Harness::new()
        .backend(Backend::sim("llama", "llama-3"))
        .team("search", SEARCH_KEY)
        .ledger_url(&db.url)
        .store(&format!(
            "spool = \"sqlite://{}\"",
            temp_dir("pg-migrate").join("spool.db").display()
        ))
        .render()
        .await;
    let path = temp_dir("pg-migrate").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let first = run(&["migrate"]);
    assert!(first.contains("applied migration 1"), "{first}");
    let second = run(&["migrate"]);
    assert!(second.contains("up to date"), "{second}");
    let n: i64 = db
        .client()
        .await
        .query_one("SELECT COUNT(*) FROM tollgate_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    let ledger = open(pg_store(&db.url, "pg-migrate")).await;
    write(
        &ledger,
        &[record(1, DEC_2026, "search"), record(2, DEC_2026, "search")],
    )
    .await;
    close(ledger).await;
    let json = run(&["report", "--by", "team", "--format", "json"]);
    let doc: serde_json::Value =
        serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(doc["groups"][0]["team"], "search", "{doc}");
    assert_eq!(doc["groups"][0]["requests"], 2, "{doc}");
    let focus = run(&["report", "--format", "focus"]);
    assert!(focus.starts_with("BilledCost,"), "{focus}");
}

/// The gateway on a PostgreSQL ledger: requests land there, the admin reports read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_reports_read_the_postgres_ledger() {
    let Some(db) = TestDb::new("admin").await else {
        return;
    };
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2),
        )
        .team("search", SEARCH_KEY)
        .ledger_url(&db.url)
        .server("replica = \"replica-a\"")
        .store(&format!(
            "spool = \"sqlite://{}\"",
            temp_dir("pg-admin").join("spool.db").display()
        ))
        .start()
        .await;
    for _ in 0..5 {
        let r = gw
            .post(
                "/v1/chat/completions",
                SEARCH_KEY,
                chat("chat-small", false),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let usage = gw.admin_get("/admin/usage?group_by=team,model").await;
    assert_eq!(usage.status, 200, "{}", usage.text());
    let rows = usage.json();
    assert_eq!(rows[0]["team"], "search", "{rows}");
    assert_eq!(rows[0]["requests"], 5, "{rows}");
    let focus = gw.admin_get("/admin/report/focus").await;
    assert_eq!(focus.status, 200);
    assert!(focus.text().starts_with("BilledCost,"));
    // The console's JSON reads PostgreSQL as the report does (its minute buckets included).
    let console = gw.admin_get("/admin/console?from=1h").await;
    assert_eq!(console.status, 200, "{}", console.text());
    let spend = &console.json()["ledger"]["spend"]["by_team"]["rows"];
    assert_eq!(spend[0]["team"], "search", "{spend}");
    assert!(
        spend[0]["minute"].as_str().unwrap().ends_with('Z'),
        "{spend}"
    );
    let replicas = db
        .client()
        .await
        .query("SELECT DISTINCT replica FROM requests", &[])
        .await
        .unwrap();
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0].get::<_, String>(0), "replica-a");
    gw.shutdown().await;
}

/// PostgreSQL gone mid-load: no request fails for it, the spool fills and drains, and the
/// ledger then holds exactly one row per request the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_gone_mid_load_fails_no_request_and_loses_no_record() {
    let Some(db) = TestDb::new("midload").await else {
        return;
    };
    let proxy = Proxy::start().await;
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2),
        )
        .team("search", SEARCH_KEY)
        .ledger_url(&proxy.url(&db))
        .store(&format!(
            "spool = \"sqlite://{}\"",
            temp_dir("pg-midload").join("spool.db").display()
        ))
        .start()
        .await;
    let mut ids = Vec::new();
    let mut round = |replies: Vec<Reply>| {
        for r in replies {
            assert_eq!(r.status, 200, "{}", r.text());
            ids.push(
                r.headers["x-tollgate-request-id"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
    };
    let body = chat("chat-small", false);
    round(
        gw.post_concurrently(20, "/v1/chat/completions", SEARCH_KEY, body.clone())
            .await,
    );
    proxy.cut().await;
    let ledger = gw.running.as_ref().unwrap().ledger.clone();
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        round(
            gw.post_concurrently(20, "/v1/chat/completions", SEARCH_KEY, body.clone())
                .await,
        );
    }
    assert!(ledger.spooled() > 0, "the outage filled the spool");
    let metrics = gw.admin_get("/metrics").await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tollgate_ledger_spooled_records ") && !l.ends_with(" 0")),
        "the depth is exported"
    );
    proxy.restore();
    round(
        gw.post_concurrently(20, "/v1/chat/completions", SEARCH_KEY, body.clone())
            .await,
    );
    wait_drained(&ledger).await;
    gw.shutdown().await;
    let rows = db.ids().await;
    assert!(rows.values().all(|&n| n == 1), "a record twice");
    assert_eq!(rows.len(), ids.len(), "one row per request the clients saw");
    assert!(ids.iter().all(|id| rows.contains_key(id)));
    eprintln!("{} requests, {} rows", ids.len(), rows.len());
}

/// As tests/durability.rs, with the ledger in PostgreSQL: every response a client saw
/// complete has its record after SIGKILL, in PostgreSQL or in the spool the restart drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_completed_response_survives_sigkill_with_a_postgres_ledger() {
    use http_body_util::BodyExt;
    let Some(db) = TestDb::new("sigkill").await else {
        return;
    };
    let (text, _sims, _) = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2)
                .paced(Duration::from_millis(1), 8),
        )
        .team("search", SEARCH_KEY)
        .ledger_url(&db.url)
        .store(&format!(
            "spool = \"sqlite://{}\"",
            temp_dir("pg-sigkill").join("spool.db").display()
        ))
        .render()
        .await;
    let path = temp_dir("pg-sigkill").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let gw = BinaryGateway::start(&path).await;
    let addr = gw.addr;
    let completed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (completed, stop) = (completed.clone(), stop.clone());
        clients.spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let stream = (worker + i) % 2 == 0;
                let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {SEARCH_KEY}"))
                    .body(http_body_util::Full::from(chat("chat-small", stream)))
                    .unwrap();
                let Ok(resp) = client.request(req).await else {
                    continue;
                };
                let id = resp
                    .headers()
                    .get("x-tollgate-request-id")
                    .map(|v| v.to_str().unwrap().to_string());
                let ok = resp.status() == 200;
                let Ok(body) = resp.into_body().collect().await.map(|c| c.to_bytes()) else {
                    continue;
                };
                let whole = if stream {
                    body.ends_with(b"data: [DONE]\n\n")
                } else {
                    serde_json::from_slice::<serde_json::Value>(&body).is_ok()
                };
                if ok && whole {
                    completed.lock().unwrap().push(id.unwrap());
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, _log) = gw.stop("-KILL").await;
    assert!(!status.success(), "killed, not exited");
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let completed = completed.lock().unwrap().clone();
    assert!(
        completed.len() > 20,
        "the load ran: {} responses",
        completed.len()
    );

    // The restart drains whatever the spool held.
    let gw = BinaryGateway::start(&path).await;
    let mut ids = HashMap::new();
    for _ in 0..100 {
        ids = db.ids().await;
        if completed.iter().all(|id| ids.contains_key(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost: Vec<&String> = completed
        .iter()
        .filter(|id| !ids.contains_key(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} completed responses have no record: {:?}",
        lost.len(),
        completed.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(ids.values().all(|&n| n == 1), "a record twice");
    eprintln!(
        "{} completed responses, {} records in PostgreSQL, none lost",
        completed.len(),
        ids.len()
    );
    drop(gw);
}

/// Insert throughput through the ledger writer (group commits of up to 1024 records):
/// `cargo test --release --test pg_ledger -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run by hand for docs/PERFORMANCE.md"]
async fn throughput() {
    let Some(db) = TestDb::new("throughput").await else {
        return;
    };
    let ledger = open(pg_store(&db.url, "pg-throughput")).await;
    const N: u32 = 200_000;
    let records: Vec<Record> = (0..N).map(|i| record(i, DEC_2026, "search")).collect();
    let started = std::time::Instant::now();
    write(&ledger, &records).await;
    let took = started.elapsed();
    close(ledger).await;
    assert_eq!(db.ids().await.len(), N as usize);
    eprintln!(
        "{N} records in {:.2} s: {:.0} rows/s",
        took.as_secs_f64(),
        f64::from(N) / took.as_secs_f64()
    );
}

/// How fast a spool drains once PostgreSQL is back:
/// `cargo test --release --test pg_ledger -- --ignored --nocapture drain_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run by hand for docs/PERFORMANCE.md"]
async fn drain_throughput() {
    let Some(db) = TestDb::new("drain").await else {
        return;
    };
    let proxy = Proxy::start().await;
    proxy.cut().await;
    let ledger = open(pg_store(&proxy.url(&db), "pg-drain")).await;
    const N: u32 = 100_000;
    let records: Vec<Record> = (0..N).map(|i| record(i, DEC_2026, "search")).collect();
    let started = std::time::Instant::now();
    write(&ledger, &records).await;
    let spooled = started.elapsed();
    assert_eq!(ledger.spooled(), u64::from(N));
    proxy.restore();
    let started = std::time::Instant::now();
    for _ in 0..1200 {
        if ledger.spooled() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = started.elapsed();
    close(ledger).await;
    assert_eq!(db.ids().await.len(), N as usize);
    eprintln!(
        "{N} records spooled in {:.2} s ({:.0} rows/s), drained in {:.2} s ({:.0} rows/s, reconnect included)",
        spooled.as_secs_f64(),
        f64::from(N) / spooled.as_secs_f64(),
        drained.as_secs_f64(),
        f64::from(N) / drained.as_secs_f64()
    );
}

/// A test CA and a server certificate it signed for `localhost` only (not 127.0.0.1), in
/// PEM: (ca.crt, server.crt, server.key). A CA apart from the server's certificate because
/// webpki refuses a CA certificate as a server's own; the name is narrow so that verify-ca
/// and verify-full can be told apart by connecting to 127.0.0.1.
fn test_certificates(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=tollgate test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    (read("ca.crt"), read("server.crt"), read("server.key"))
}

/// A PostgreSQL of the test's own with TLS on and TCP connections allowed over TLS only
/// (`hostssl`; the test reads through the Unix socket), and its CA's file.
async fn tls_only_postgres(test: &str) -> Option<(pg_server::OwnPg, std::path::PathBuf)> {
    let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n";
    // The certificate and key in the data dir (the server's default file names), owned by
    // the server's user, before `ssl=on` starts.
    let mut pg = pg_server::OwnPg::init(test, Some(hba))?;
    let certs = temp_dir("pg-certs");
    let (ca, crt, key) = test_certificates(&certs);
    pg.put("server.crt", &crt, 0o644);
    pg.put("server.key", &key, 0o600);
    pg.set("ssl=on");
    pg.start_again().await;
    let ca_file = certs.join("ca.crt");
    std::fs::write(&ca_file, ca).unwrap();
    Some((pg, ca_file))
}

/// `sslmode=require` against a server with a certificate no root vouches for: the gateway
/// writes its ledger over TLS (the server's `pg_stat_ssl` says so for its sessions), as libpq
/// would, without checking the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_writes_the_ledger_over_tls() {
    let Some((pg, _ca)) = tls_only_postgres("sslmode_require_writes_the_ledger_over_tls").await
    else {
        return;
    };
    let url = pg.create_db("tollgate_tls").await;
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2),
        )
        .team("search", SEARCH_KEY)
        // A password the server does not ask for (trust): it must not show anywhere.
        .ledger_url(&format!(
            "{}?sslmode=require",
            url.replace("postgres@", "postgres:s3cret@")
        ))
        .store(&format!(
            "spool = \"sqlite://{}\"",
            temp_dir("pg-tls").join("spool.db").display()
        ))
        .start()
        .await;
    for _ in 0..5 {
        let r = gw
            .post(
                "/v1/chat/completions",
                SEARCH_KEY,
                chat("chat-small", false),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let db = pg.socket_client("tollgate_tls").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = db
            .query_one("SELECT COUNT(*) FROM requests", &[])
            .await
            .unwrap()
            .get(0);
        if n == 5 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} rows of 5");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The gateway's sessions (application_name tollgate), as the server sees them.
    let sessions = db
        .query(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tollgate'",
            &[],
        )
        .await
        .unwrap();
    assert!(!sessions.is_empty(), "no gateway session");
    for s in &sessions {
        let (ssl, version): (bool, Option<String>) = (s.get(0), s.get(1));
        assert!(ssl, "a gateway session in plain text");
        assert_eq!(version.as_deref(), Some("TLSv1.3"));
    }
    let m = gw.admin_get("/metrics").await.text();
    assert!(!m.contains("s3cret"));
    gw.shutdown().await;
}

/// `verify-full` checks the chain and the name, `verify-ca` the chain only; without the CA
/// (`sslrootcert`) the certificate is refused, and `sslmode=disable` meets a server that
/// takes TLS only: each refusal is a start error that says why and hides the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_checked_as_sslmode_says_and_plain_text_is_refused_by_a_tls_only_server() {
    let Some((pg, ca)) = tls_only_postgres("certificates_are_checked_as_sslmode_says").await else {
        return;
    };
    pg.create_db("tollgate_tls").await;
    let ca = ca.display().to_string();
    let url = |host: &str, query: &str| {
        format!(
            "postgres://postgres:s3cret@{host}:{}/tollgate_tls?{query}",
            pg.port
        )
    };
    let open = |url: String| async move {
        let store = pg_store(&url, "pg-tls-verify");
        tokio::task::spawn_blocking(move || {
            Ledger::open(store, false, "t".into()).map(|l| l.close())
        })
        .await
        .unwrap()
        .map_err(|e| e.to_string())
    };
    for ok in [
        url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        // The certificate names localhost only: verify-ca does not look at the name.
        url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")),
        // libpq: a root file makes `require` check the chain.
        url("127.0.0.1", &format!("sslmode=require&sslrootcert={ca}")),
        url("127.0.0.1", "sslmode=prefer"),
    ] {
        open(ok.clone())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", ok.split('@').nth(1).unwrap()));
    }
    for (bad, says) in [
        (
            url(
                "127.0.0.1",
                &format!("sslmode=verify-full&sslrootcert={ca}"),
            ),
            "certificate not valid for name \"127.0.0.1\"",
        ),
        // The webpki roots do not know the test CA.
        (url("localhost", "sslmode=verify-full"), "UnknownIssuer"),
        (url("127.0.0.1", "sslmode=disable"), "no encryption"),
    ] {
        let e = open(bad.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{} opened", bad.split('@').nth(1).unwrap()));
        assert!(e.contains("store.ledger"), "{e}");
        assert!(e.contains(says), "{says}: {e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
}
