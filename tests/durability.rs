//! No record of a response the client saw finish is lost when the gateway is killed.
//!
//! The real binary serves concurrent JSON and streamed requests; it is killed with SIGKILL
//! mid-load and started again on the same ledger. Every request whose response a client
//! received in full must be in the ledger.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_completed_response_survives_sigkill() {
    let (text, _sims, _) = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2)
                .paced(Duration::from_millis(1), 8),
        )
        .team("search", SEARCH_KEY)
        .render()
        .await;
    let path = temp_dir("durability").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let gw = BinaryGateway::start(&path).await;
    let addr = gw.addr;

    let completed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let completed = completed.clone();
        let stop = stop.clone();
        clients.spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
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
                // In full: a JSON body that parses, or a stream that reached [DONE].
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let completed = completed.lock().unwrap().clone();
    assert!(
        completed.len() > 50,
        "the load ran: {} responses",
        completed.len()
    );

    // Restart on the same ledger: it opens, recovers its WAL, and serves.
    let gw = BinaryGateway::start(&path).await;
    let ledger = text
        .lines()
        .find_map(|l| l.strip_prefix("ledger = \"sqlite://"))
        .unwrap()
        .trim_end_matches('"');
    let conn = rusqlite::Connection::open(ledger).unwrap();
    let ids: HashSet<String> = conn
        .prepare("SELECT id FROM requests")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let lost: Vec<&String> = completed.iter().filter(|id| !ids.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} completed responses have no record: {:?}",
        lost.len(),
        completed.len(),
        &lost[..lost.len().min(5)]
    );
    // Most of them were loaded into SQLite before the kill; the last ones only reached the
    // journal, and the restart loaded them (the log says how many).
    let (_, log) = gw.stop("-TERM").await;
    let from_journal = log
        .lines()
        .find(|l| l.contains("loaded the records a stopped process left in the journal"))
        .unwrap_or("no record was left in the journal");
    eprintln!(
        "{} completed responses, {} ledger records, none lost; at the restart: {from_journal}",
        completed.len(),
        ids.len()
    );
}

/// Responses do not wait for SQLite: with the ledger file locked by another writer, requests
/// are still answered (their records in the journal only); killed then, the gateway loads each
/// of them exactly once when it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_only_in_the_journal_at_a_sigkill_are_loaded_once_at_the_restart() {
    let (text, _sims, _) = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2),
        )
        .team("search", SEARCH_KEY)
        .render()
        .await;
    let path = temp_dir("journal-kill").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let ledger = text
        .lines()
        .find_map(|l| l.strip_prefix("ledger = \"sqlite://"))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    let gw = BinaryGateway::start(&path).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let post = |stream: bool| {
        let req = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr))
            .header("authorization", format!("Bearer {SEARCH_KEY}"))
            .body(http_body_util::Full::from(chat("chat-small", stream)))
            .unwrap();
        let client = client.clone();
        async move {
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let id = resp.headers()["x-tollgate-request-id"]
                .to_str()
                .unwrap()
                .to_string();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(!body.is_empty());
            id
        }
    };
    let first = post(false).await;
    // Wait until the first record is in SQLite, then take SQLite's write lock.
    let count = |id: &str| -> i64 {
        let conn = rusqlite::Connection::open(&ledger).unwrap();
        conn.query_row("SELECT COUNT(*) FROM requests WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
    };
    for _ in 0..200 {
        if count(&first) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(&first), 1);
    let lock = rusqlite::Connection::open(&ledger).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let started = std::time::Instant::now();
    let mut answered = Vec::new();
    for i in 0..20 {
        answered.push(post(i % 2 == 0).await);
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answers waited for the locked ledger: {:?}",
        started.elapsed()
    );
    let (status, _) = gw.stop("-KILL").await;
    assert!(!status.success(), "killed, not exited");
    for id in &answered {
        assert_eq!(count(id), 0, "{id} reached SQLite through its lock");
    }
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    let gw = BinaryGateway::start(&path).await;
    for id in answered.iter().chain([&first]) {
        assert_eq!(count(id), 1, "{id}: once in the ledger after the restart");
    }
    let (_, log) = gw.stop("-TERM").await;
    assert!(
        log.contains("loaded the records a stopped process left in the journal records=20 "),
        "the restart says it loaded 20 records:\n{log}"
    );
}

/// Records still on their way when SIGTERM arrives are written before the process exits:
/// streams a commercial backend keeps generating after their clients left are read to their
/// end for the provider's usage (on_disconnect = drain), by tasks shutdown waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_the_records_still_being_made() {
    const STREAMS: usize = 8;
    let (text, _sims, _) = Harness::new()
        .backend(
            Backend::sim("openai", "gpt-4o-mini")
                .commercial()
                .alias("chat-small")
                .price(0.15, 0.60)
                .paced(Duration::from_millis(25), 40),
        )
        .team("search", SEARCH_KEY)
        .render()
        .await;
    let path = temp_dir("sigterm").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let gw = BinaryGateway::start(&path).await;
    let addr = gw.addr;

    // Each client reads the first event of its stream, then leaves.
    let mut ids = Vec::new();
    for _ in 0..STREAMS {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("authorization", format!("Bearer {SEARCH_KEY}"))
            .body(http_body_util::Full::from(chat("chat-small", true)))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        ids.push(
            resp.headers()["x-tollgate-request-id"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop((body, client));
    }
    // The backend is still generating all of them (about a second to go).
    let (status, log) = gw.stop("-TERM").await;
    assert!(status.success(), "a clean exit: {log}");

    let ledger = text
        .lines()
        .find_map(|l| l.strip_prefix("ledger = \"sqlite://"))
        .unwrap()
        .trim_end_matches('"');
    let conn = rusqlite::Connection::open(ledger).unwrap();
    let rows: Vec<(String, String, String, i64)> = conn
        .prepare("SELECT id, status, token_source, completion_tokens FROM requests")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), STREAMS, "every stream has its record: {rows:?}");
    for (id, status, source, completion) in &rows {
        assert!(ids.contains(id));
        assert_eq!(status, "client_closed");
        // Read to its end after the client left: the provider's own usage, all 40 tokens.
        assert_eq!((source.as_str(), *completion), ("upstream", 40), "{id}");
    }
}

/// Streams still open when the grace period ends are ended by the gateway: each client gets
/// an error event and the close, each stream is billed for what it generated and recorded
/// before the process exits; `/readyz` says 503 throughout, and the client port takes no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_ends_twenty_streams_cleanly_and_records_them() {
    const STREAMS: usize = 20;
    let (text, _sims, _) = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2)
                // 40 s of tokens: every stream is still going when the grace ends.
                .paced(Duration::from_millis(100), 400)
                .config(|c| c.max_concurrency = 64),
        )
        .team("search", SEARCH_KEY)
        .server("shutdown_grace_s = 1")
        .render()
        .await;
    let path = temp_dir("sigterm-grace").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let gw = BinaryGateway::start(&path).await;
    let (addr, admin) = (gw.addr, gw.admin_addr);

    let mut streams = tokio::task::JoinSet::new();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(STREAMS);
    for _ in 0..STREAMS {
        let started = started_tx.clone();
        streams.spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("authorization", format!("Bearer {SEARCH_KEY}"))
                .body(http_body_util::Full::from(chat("chat-small", true)))
                .unwrap();
            let resp = client.request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let mut text = Vec::new();
            let mut told = false;
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.unwrap().into_data() else {
                    continue;
                };
                text.extend_from_slice(&data);
                if !told && text.windows(9).any(|w| w == b"\"content\"") {
                    told = true;
                    let _ = started.send(()).await;
                }
            }
            String::from_utf8(text).unwrap()
        });
    }
    for _ in 0..STREAMS {
        started_rx.recv().await.unwrap();
    }
    gw.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let ready = client
        .get(format!("http://{admin}/readyz").parse().unwrap())
        .await
        .expect("the admin port answers while draining");
    assert_eq!(ready.status(), 503);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the client port stopped accepting"
    );

    let mut ended = 0;
    while let Some(text) = streams.join_next().await {
        let text = text.unwrap();
        let last = text
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        assert!(last.contains(r#""code":"shutting_down""#), "{last}");
        assert!(text.contains(": tollgate {"), "the cost comment came first");
        ended += 1;
    }
    assert_eq!(ended, STREAMS);
    let (status, log) = gw.stop("-TERM").await;
    assert!(status.success(), "a clean exit: {log}");

    let ledger = text
        .lines()
        .find_map(|l| l.strip_prefix("ledger = \"sqlite://"))
        .unwrap()
        .trim_end_matches('"');
    let conn = rusqlite::Connection::open(ledger).unwrap();
    let rows: Vec<(String, i64, i64)> = conn
        .prepare("SELECT status, http_status, completion_tokens FROM requests")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), STREAMS, "{rows:?}");
    for (status, _http, completion) in &rows {
        assert_eq!(status, "shutdown");
        // About 12 tokens each (1.2 s at 100 ms a token), counted and billed.
        assert!((5..=40).contains(completion), "{rows:?}");
    }
}
