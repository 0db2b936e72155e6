//! Cost routing with several simulated backends: a capped self-hosted Llama, two commercial
//! models at different prices, one of them in another region. Overflow, fallback, circuit
//! breaking and recovery, data residency, context windows and 429 back-off, seen from a
//! client, the response headers, the ledger and the metrics.

mod common;

use common::{chat, Backend, Harness, Reply, OTHER_KEY, SEARCH_KEY};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate::clock::ManualClock;
use tollgate::sim::{Sim, SimConfig};

const LLAMA: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// `llama`: self-hosted in the EU, 2 requests at once, 4096-token context.
/// `mini-us`: commercial in the US, $0.15 / $0.60 per 1M tokens, 128k context.
/// `mistral-eu`: commercial in the EU, $0.40 / $2.00 per 1M tokens, 32k context.
/// Team `search` may use any region; team `other` only the EU.
fn fleet(llama_token: Duration, llama_tokens: u32) -> Harness {
    Harness::new()
        .routing("circuit_failures = 3\ncircuit_open_s = 30")
        .backend(
            Backend::sim("llama", LLAMA)
                .alias("chat")
                .region("eu")
                .paced(llama_token, llama_tokens)
                .model_toml("context_window = 4096")
                .toml("max_concurrency = 2\ngpu = { hourly_usd = 10.0, tokens_per_second = 500 }\nhealth_check = { path = \"/health\", interval_s = 0.2, timeout_s = 1 }"),
        )
        .backend(
            Backend::sim("mini-us", "gpt-4o-mini")
                .commercial()
                // Paced, so a stream's headers and first events are out before it can break.
                .paced(Duration::from_millis(2), 8)
                .alias("chat")
                .region("us")
                .price(0.15, 0.60)
                .model_toml("context_window = 128000"),
        )
        .backend(
            Backend::sim("mistral-eu", "mistral-small")
                .commercial()
                .alias("chat")
                .region("eu")
                .price(0.40, 2.00)
                .model_toml("context_window = 32000"),
        )
        .team("search", SEARCH_KEY)
        .team_toml("other", OTHER_KEY, "regions = [\"eu\"]")
}

fn backend_of(r: &Reply) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.headers["x-tollgate-backend"]
        .to_str()
        .unwrap()
        .to_string()
}

fn route_of(r: &Reply) -> String {
    r.headers["x-tollgate-route"].to_str().unwrap().to_string()
}

fn requests(gw: &common::Gateway, name: &str) -> u64 {
    gw.sim(name).stats.requests.load(Ordering::Relaxed)
}

#[tokio::test]
async fn the_baseline_stays_on_the_owned_gpu_and_the_overflow_goes_to_the_cheapest_provider() {
    let gw = fleet(Duration::from_millis(25), 20).start().await;

    // Low load: one at a time, everything on the self-hosted backend.
    for _ in 0..3 {
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
            .await;
        assert_eq!(backend_of(&r), "llama");
        let route = route_of(&r);
        assert!(
            route.starts_with(
                "backend=llama; reason=cheapest; cost=marginal; est_usd=0.000000000; eligible=3"
            ),
            "{route}"
        );
    }

    // Eight at once against a cap of two (each holds its slot for about half a second).
    let replies = gw
        .post_concurrently(8, "/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    let mut split = BTreeMap::new();
    for r in &replies {
        *split.entry(backend_of(r)).or_insert(0) += 1;
    }
    assert_eq!(
        split,
        BTreeMap::from([("llama".into(), 2), ("mini-us".into(), 6)])
    );
    let overflowed = replies.iter().find(|r| backend_of(r) == "mini-us").unwrap();
    let route = route_of(overflowed);
    assert!(
        route.contains("excluded=llama:capacity") || route.contains("tried=llama:capacity"),
        "{route}"
    );
    assert_eq!(
        requests(&gw, "mistral-eu"),
        0,
        "the dearer provider is not needed"
    );

    // The ledger shows the split, with the commercial requests priced at the provider's rates.
    gw.wait_ledger_rows("SELECT id FROM requests", 11).await;
    let rows = gw.ledger(
        "SELECT backend, count(*), sum(cost_nusd) FROM requests GROUP BY backend ORDER BY backend",
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        },
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("llama", 5));
    assert_eq!((rows[1].0.as_str(), rows[1].1), ("mini-us", 6));
    assert!(
        rows[0].2 > 0,
        "self-hosted requests are charged their GPU share"
    );
    gw.shutdown().await;
}

/// What one load worker saw: when, the status, and the backend that answered.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(Instant, u16, String)>>>;

#[tokio::test]
async fn killing_the_self_hosted_server_mid_load_moves_traffic_and_it_comes_back() {
    let mut gw = fleet(Duration::from_millis(5), 8).start().await;
    let llama_addr = gw.sim("llama").addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen: Seen = Default::default();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let client = gw.client.clone();
            let req = gw.request("/v1/chat/completions", SEARCH_KEY, chat("chat", false));
            let (uri, headers) = (req.uri().clone(), req.headers().clone());
            let (stop, seen) = (stop.clone(), seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut req = http::Request::post(uri.clone())
                        .body(http_body_util::Full::new(bytes::Bytes::from(chat(
                            "chat", false,
                        ))))
                        .unwrap();
                    *req.headers_mut() = headers.clone();
                    let r =
                        common::collect(client.request(req).await.expect("gateway answers")).await;
                    let backend = r
                        .headers
                        .get("x-tollgate-backend")
                        .map_or(String::new(), |v| v.to_str().unwrap().to_string());
                    seen.lock()
                        .unwrap()
                        .push((Instant::now(), r.status.as_u16(), backend));
                }
            })
        })
        .collect();
    let served_by = |from: Instant, name: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(t, _, b)| *t > from && b == name)
            .count()
    };

    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now() - Duration::from_secs(1);
    assert!(
        served_by(start, "llama") > 0,
        "low load runs on the owned GPU"
    );
    let killed_at = Instant::now();
    gw.sims.remove("llama").unwrap().kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_kill = killed_at + Duration::from_millis(100);
    assert_eq!(served_by(after_kill, "llama"), 0);
    assert!(
        served_by(after_kill, "mini-us") > 0,
        "moved to the next-cheapest"
    );

    // Back on the same port; the active probe sees it and routing returns to it.
    let back = Sim::spawn_at(
        llama_addr,
        SimConfig {
            models: vec![LLAMA.into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(5);
    while served_by(restarted, "llama") == 0 {
        assert!(
            Instant::now() < deadline,
            "llama was not used again within 5 s of coming back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered_in = restarted.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let errors: Vec<_> = seen.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    assert!(
        seen.len() > 20,
        "the load kept flowing: {} requests",
        seen.len()
    );
    eprintln!(
        "{} requests, none failed; llama back in routing {recovered_in:?} after it restarted",
        seen.len()
    );
    // Requests in flight when it died were retried elsewhere, and say so.
    let retried = gw.ledger(
        "SELECT count(*) FROM requests WHERE attempts > 1 AND backend = 'mini-us'",
        |r| r.get::<_, i64>(0),
    );
    eprintln!("{} requests fell back after a failure on llama", retried[0]);
    // Up, as the gauge says. On a loaded machine a request or probe can still time out just
    // after the restart and open the circuit once more; the health probe closes it again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = gw.admin_get("/metrics").await.text();
        if metrics.contains(r#"tollgate_backend_up{backend="llama"} 1"#) {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    back.stop().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn an_eu_team_never_reaches_a_us_backend_even_when_it_is_cheaper_or_the_eu_ones_are_down() {
    let mut gw = fleet(Duration::ZERO, 8)
        .routing("self_hosted_cost = \"rate_card\"")
        .start()
        .await;
    // Under the rate card, Llama ($10/h at 500 tok/s: $5.56 per 1M) is dearer than mini-us
    // and mistral-eu: `search` goes to the US, `other` to the cheapest EU model.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    assert_eq!(backend_of(&r), "mini-us");
    for _ in 0..3 {
        let r = gw
            .post("/v1/chat/completions", OTHER_KEY, chat("chat", false))
            .await;
        assert_eq!(backend_of(&r), "mistral-eu");
        assert!(
            route_of(&r).contains("excluded=mini-us:region"),
            "{}",
            route_of(&r)
        );
    }
    assert_eq!(requests(&gw, "mini-us"), 1);

    // Both EU backends down: a 503 that says why, and still nothing sent to the US.
    gw.sims.remove("llama").unwrap().kill().await;
    gw.sims.remove("mistral-eu").unwrap().kill().await;
    let mut last = None;
    for _ in 0..4 {
        last = Some(
            gw.post("/v1/chat/completions", OTHER_KEY, chat("chat", false))
                .await,
        );
    }
    let r = last.unwrap();
    let e = r.error(503);
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("mini-us: region us is not among the team's regions"),
        "{msg}"
    );
    assert!(
        msg.contains("llama: down") && msg.contains("mistral-eu: down"),
        "{msg}"
    );
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(
        requests(&gw, "mini-us"),
        1,
        "no request of the EU team went to the US"
    );
    // The team without a residency rule is still served.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    assert_eq!(backend_of(&r), "mini-us");
    gw.shutdown().await;
}

fn long_chat(words: usize) -> String {
    serde_json::json!({
        "model": "chat",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "alpha beta gamma delta ".repeat(words / 4)}],
    })
    .to_string()
}

#[tokio::test]
async fn a_prompt_over_the_small_context_window_goes_to_a_larger_model() {
    let gw = fleet(Duration::ZERO, 8).start().await;
    // About 1,000 tokens in 5,500 bytes: over 4096 on the byte bound, under it when counted.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, long_chat(1000))
        .await;
    assert_eq!(backend_of(&r), "llama", "{}", route_of(&r));
    // About 5,000 tokens: only the 128k and 32k models can take it; the cheaper one wins.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, long_chat(5000))
        .await;
    assert_eq!(backend_of(&r), "mini-us");
    assert!(
        route_of(&r).contains("excluded=llama:context"),
        "{}",
        route_of(&r)
    );
    // Over every window: OpenAI's 400, naming each model's window.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, long_chat(130_000))
        .await;
    let e = r.error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("context window is 128000"),
        "{e}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_backend_answering_429_is_avoided_for_its_retry_after() {
    // The gateway's clock is moved by hand: the Retry-After passes without waiting for it.
    let clock = Arc::new(ManualClock::new(1_800_000_000_000_000));
    let gw = fleet(Duration::ZERO, 8).clock(clock.clone()).start().await;
    let llama = gw.sim("llama");
    llama.knobs.retry_after_s.store(2, Ordering::Relaxed);
    llama.knobs.fail_status.store(429, Ordering::Relaxed);

    // The 429 never reaches the client: the request goes on to the next-cheapest backend.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    assert_eq!(backend_of(&r), "mini-us");
    let route = route_of(&r);
    assert!(
        route.contains("reason=fallback") && route.contains("tried=llama:429"),
        "{route}"
    );
    llama.knobs.fail_status.store(0, Ordering::Relaxed);
    assert_eq!(requests(&gw, "llama"), 1);

    // For its Retry-After, llama is passed over without being asked.
    for step in [0, 500, 500, 500, 400] {
        clock.advance(Duration::from_millis(step));
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
            .await;
        assert_eq!(backend_of(&r), "mini-us");
        assert!(
            route_of(&r).contains("excluded=llama:rate_limited"),
            "{}",
            route_of(&r)
        );
    }
    assert_eq!(requests(&gw, "llama"), 1);
    clock.advance(Duration::from_millis(101));
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    assert_eq!(
        backend_of(&r),
        "llama",
        "used again once the Retry-After has passed"
    );

    gw.wait_ledger_rows("SELECT id FROM requests WHERE attempts = 2", 1)
        .await;
    let metrics = gw.admin_get("/metrics").await.text();
    assert!(
        metrics.contains(r#"tollgate_route_fallbacks_total{from="llama",reason="429"} 1"#),
        "{metrics}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn server_errors_fall_back_and_open_the_circuit_but_a_started_stream_is_never_retried() {
    let gw = fleet(Duration::ZERO, 8).start().await;
    let llama = gw.sim("llama");
    llama.knobs.fail_status.store(503, Ordering::Relaxed);
    for i in 0..3 {
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
            .await;
        assert_eq!(backend_of(&r), "mini-us", "request {i}");
        assert!(route_of(&r).contains("tried=llama:5xx"), "{}", route_of(&r));
    }
    // Three failures in a row (circuit_failures = 3) open the circuit: llama is not asked.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    assert_eq!(backend_of(&r), "mini-us");
    assert!(
        route_of(&r).contains("excluded=llama:circuit_open"),
        "{}",
        route_of(&r)
    );
    assert_eq!(requests(&gw, "llama"), 3);
    let backends = gw.admin_get("/admin/backends").await.json();
    assert_eq!(backends[0]["name"], "llama");
    assert_eq!(backends[0]["state"]["circuit"], "open");
    assert_eq!(backends[0]["state"]["reason"], "5xx");

    // The ledger keeps one record per request, with its attempts and the backend that served.
    gw.wait_ledger_rows("SELECT id FROM requests", 4).await;
    let attempts = gw.ledger(
        "SELECT backend, attempts, status FROM requests ORDER BY started_at_us",
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        },
    );
    assert_eq!(
        attempts,
        vec![
            ("mini-us".into(), 2, "ok".into()),
            ("mini-us".into(), 2, "ok".into()),
            ("mini-us".into(), 2, "ok".into()),
            ("mini-us".into(), 1, "ok".into()),
        ]
    );

    // A stream that breaks after its first bytes reached the client ends with an error event;
    // it is not replayed on another backend.
    let mini = gw.sim("mini-us");
    mini.knobs.break_after_tokens.store(3, Ordering::Relaxed);
    let before = requests(&gw, "mistral-eu");
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", true))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(backend_of(&r), "mini-us");
    assert!(r.text().contains("\"error\""), "{}", r.text());
    assert_eq!(requests(&gw, "mistral-eu"), before);
    gw.shutdown().await;
}

/// A commercial backend that may have begun generating (it took the request, then sent no
/// headers in time) is not replaced unless `routing.retry_on` allows it; when it is, the
/// resend is on the record and in the metrics.
#[tokio::test]
async fn a_request_a_provider_may_be_working_on_is_resent_only_when_allowed() {
    for (retry_on, resent) in [("", false), ("retry_on = [\"connect\", \"timeout\"]", true)] {
        let gw = Harness::new()
            .routing(retry_on)
            .server("request_timeout_s = 0.5")
            .backend(
                Backend::sim("cheap", "m1")
                    .commercial()
                    .alias("chat")
                    .price(0.1, 0.1),
            )
            .backend(
                Backend::sim("dear", "m2")
                    .commercial()
                    .alias("chat")
                    .price(1.0, 1.0),
            )
            .team("search", SEARCH_KEY)
            .start()
            .await;
        gw.sim("cheap")
            .knobs
            .headers_delay_ms
            .store(5_000, Ordering::Relaxed);
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
            .await;
        assert_eq!(requests(&gw, "cheap"), 1);
        gw.wait_ledger_rows("SELECT id FROM requests", 1).await;
        let (attempts, marked): (i64, i64) = gw
            .ledger("SELECT attempts, resent FROM requests", |r| {
                Ok((r.get(0)?, r.get(1)?))
            })[0];
        let metrics = gw.admin_get("/metrics").await.text();
        if resent {
            assert_eq!(backend_of(&r), "dear");
            assert_eq!((attempts, marked), (2, 1));
            assert!(
                metrics.contains(r#"tollgate_resends_total{from="cheap",reason="timeout"} 1"#),
                "{metrics}"
            );
        } else {
            assert_eq!(r.error(504)["code"], "upstream_timeout");
            assert_eq!(requests(&gw, "dear"), 0);
            assert_eq!((attempts, marked), (1, 0));
            assert!(!metrics.contains(r#"tollgate_resends_total{from="cheap""#));
        }
        gw.shutdown().await;
    }
}

/// A backend that reads a request and then closes its kept-alive connection without an
/// answer may have started on it: a provider's request is not sent again on a new connection.
/// A self-hosted server's is (such servers close idle connections at will, and a lost
/// generation on an owned GPU costs nothing more).
#[tokio::test]
async fn a_connection_closed_after_the_request_was_sent_is_replayed_only_to_owned_servers() {
    for (commercial, sends) in [(true, 2), (false, 3)] {
        // The first answered, the second read and then the connection closed: as a server
        // that crashed while generating; the third (a replay) answered.
        let (url, seen) = common::scripted_backend(|n| {
            (n != 1).then(|| common::json_answer(200, common::CHAT_ANSWER))
        })
        .await;
        let backend = Backend::at("raw", "m", &url).alias("chat");
        let gw = Harness::new()
            .backend(if commercial {
                backend.commercial()
            } else {
                backend
            })
            .team("search", SEARCH_KEY)
            .start()
            .await;
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The second request goes out on the pooled connection, which the server then closes.
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
            .await;
        assert_eq!(r.status, if commercial { 502 } else { 200 }, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            seen.load(Ordering::SeqCst),
            sends,
            "commercial {commercial}"
        );
    }
}
