//! Per-team budgets hold under concurrent load, across restarts and window resets.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use tollgate::clock::ManualClock;

/// gpt-4o at list price; the simulator answers 10 tokens to `max_tokens: 10`.
fn gpt() -> Backend {
    Backend::sim("gpt", "gpt-4o")
        .alias("chat-large")
        .price(2.5, 10.0)
        .config(|c| c.max_concurrency = 256)
}

fn request(max_tokens: u32) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&chat("chat-large", false)).unwrap();
    v["max_tokens"] = max_tokens.into();
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_never_overrun_the_budget() {
    // One request costs 19 x $2.50/M + 10 x $10/M = $0.0001475; the budget fits 50.8 of them.
    const COST: i64 = 147_500;
    const LIMIT: i64 = 7_500_000;
    let gw = Arc::new(
        Harness::new()
            .backend(gpt())
            .team_toml(
                "search",
                SEARCH_KEY,
                "budgets = [{ window = \"day\", usd = 0.0075 }]",
            )
            .start()
            .await,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let gw = gw.clone();
        tasks.spawn(async move {
            gw.post("/v1/chat/completions", SEARCH_KEY, request(10))
                .await
        });
    }
    let (mut admitted, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => {
                refused += 1;
                let e = r.error(429);
                assert_eq!(e["type"], "budget_exceeded", "{e}");
                assert_eq!(e["budget"]["window"], "day");
                assert!(
                    e["message"]
                        .as_str()
                        .unwrap()
                        .contains("day budget of $0.007500000"),
                    "{e}"
                );
                let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=86_400).contains(&retry));
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!(admitted + refused, 200);
    let allowed = LIMIT / COST;
    assert!(
        (admitted - allowed).abs() <= 1,
        "admitted {admitted}, the budget allows {allowed}"
    );
    let spent: i64 = gw.ledger(
        "SELECT COALESCE(SUM(cost_nusd), 0) FROM requests WHERE team = 'search'",
        |r| r.get(0),
    )[0];
    // Worst case of one request: 20 exactly counted prompt tokens and 10 output tokens.
    assert!(
        spent <= LIMIT + 150_000,
        "spent {spent} over the limit {LIMIT}"
    );
    assert_eq!(
        spent,
        admitted * COST,
        "the ledger has every admitted request"
    );
}

#[tokio::test]
async fn spend_survives_a_restart() {
    let ledger = temp_dir("budget-restart").join("tollgate.db");
    let team = "budgets = [{ window = \"day\", tokens = 100 }]";
    let gw = Harness::new()
        .backend(gpt())
        .team_toml("search", SEARCH_KEY, team)
        .ledger(&ledger)
        .start()
        .await;
    for _ in 0..2 {
        assert_eq!(
            gw.post("/v1/chat/completions", SEARCH_KEY, request(10))
                .await
                .status,
            200
        );
    }
    gw.shutdown().await;

    let gw = Harness::new()
        .backend(gpt())
        .team_toml("search", SEARCH_KEY, team)
        .ledger(&ledger)
        .start()
        .await;
    let v = gw.admin_get("/admin/budgets").await.json();
    assert_eq!(
        v[0]["spent_tokens"], 58,
        "2 x (19 + 10) tokens, from the ledger: {v}"
    );
    assert_eq!(v[0]["remaining_tokens"], 42);
    assert_eq!(
        gw.post("/v1/chat/completions", SEARCH_KEY, request(10))
            .await
            .status,
        200
    );
    // 87 spent; the next worst case (20 + 10) does not fit in 100.
    gw.post("/v1/chat/completions", SEARCH_KEY, request(10))
        .await
        .error(429);
}

#[tokio::test]
async fn a_window_reset_lets_requests_through_again() {
    // 10:30:50 UTC: the minute window resets in 10 seconds.
    let clock = Arc::new(ManualClock::new(1_795_343_450_000_000));
    let gw = Harness::new()
        .backend(gpt())
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"minute\", tokens = 60 }]",
        )
        .clock(clock.clone())
        .start()
        .await;
    for _ in 0..2 {
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, request(10))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, request(10))
        .await;
    let e = r.error(429);
    assert_eq!(r.headers["retry-after"], "10");
    assert_eq!(e["budget"]["resets_at"], "2026-11-22T10:31:00Z");
    assert_eq!(e["budget"]["used_tokens"], 58);
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        gw.post("/v1/chat/completions", SEARCH_KEY, request(10))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn responses_say_what_is_left_and_the_admin_port_shows_every_window() {
    let gw = Harness::new()
        .backend(gpt())
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"month\", usd = 1.0, soft_ratio = 0.8 }, { window = \"day\", tokens = 1000 }]",
        )
        .start()
        .await;
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, request(10))
        .await;
    assert_eq!(r.status, 200);
    let usd = r.headers["x-tollgate-budget-remaining-usd"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(usd.starts_with("0.99"), "{usd}");
    assert!(r.headers.contains_key("x-tollgate-budget-remaining-tokens"));
    let v = gw.admin_get("/admin/budgets").await.json();
    let windows: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["window"].as_str().unwrap())
        .collect();
    assert_eq!(windows, ["month", "day"]);
    assert_eq!(v[0]["spent_usd"], "0.000147500");
    assert_eq!(v[0]["reserved_usd"], "0.000000000", "settled: nothing held");
    assert_eq!(v[1]["spent_tokens"], 29);
    let m = gw.admin_get("/metrics").await.text();
    assert!(
        m.contains("tollgate_budget_limit_usd{team=\"search\",window=\"month\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_budget_spent_usd{team=\"search\",window=\"month\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn a_team_without_budgets_is_not_slowed_or_limited() {
    let gw = Harness::new()
        .backend(gpt())
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, request(10))
        .await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("x-tollgate-budget-remaining-usd"));
}

#[tokio::test]
async fn a_stream_that_outgrows_its_reservation_is_ended_cleanly_at_the_hard_limit() {
    // The model claims a cap of 20 output tokens, but the server streams 64 regardless.
    let gw = Harness::new()
        .backend(gpt().model_toml("max_output_tokens = 20").config(|c| {
            c.completion_tokens = 64;
            c.ignores_max_tokens = true;
            c.token_interval = Duration::from_millis(2);
        }))
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"day\", tokens = 60 }]",
        )
        .start()
        .await;
    // Reserves 20 (prompt) + 20 (cap) of 60: 20 tokens of room remain for the overrun.
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat-large", true))
        .await;
    assert_eq!(r.status, 200);
    let events = r.events();
    let content = events
        .iter()
        .filter(|e| e.contains("\"content\":\" ") || e.contains("\"content\":\"The"))
        .count();
    assert_eq!(content, 41, "cut just past the room: {events:?}");
    let finish: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let text = r.text();
    let comment = text
        .lines()
        .find_map(|l| l.strip_prefix(": tollgate "))
        .unwrap();
    assert!(comment.contains(r#""ended_by":"budget""#), "{comment}");
    gw.wait_ledger_rows("SELECT 1 FROM requests WHERE status = 'budget_cut'", 1)
        .await;
    let sim = &gw.sim("gpt").stats;
    for _ in 0..100 {
        if sim
            .streams_cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the upstream kept generating past the cut");
}

#[tokio::test]
async fn a_reload_changes_limits_without_losing_spend() {
    let (text, _sims, env) = Harness::new()
        .backend(gpt())
        .team_toml(
            "search",
            SEARCH_KEY,
            "budgets = [{ window = \"day\", tokens = 100 }]",
        )
        .render()
        .await;
    assert!(env.is_empty());
    let path = temp_dir("budget-reload").join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let cfg = tollgate::config::load(&path, &|_| None).unwrap();
    let bind = || tollgate::server::bind("127.0.0.1:0".parse().unwrap(), 64).unwrap();
    let running = tollgate::app::start_on(cfg, Some(path.clone()), bind(), bind())
        .await
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let send = || {
        client.request(
            http::Request::post(format!("http://{}/v1/chat/completions", running.addr))
                .header("authorization", format!("Bearer {SEARCH_KEY}"))
                .body(http_body_util::Full::<bytes::Bytes>::from(request(10)))
                .unwrap(),
        )
    };
    for _ in 0..3 {
        assert_eq!(send().await.unwrap().status(), 200);
    }
    assert_eq!(send().await.unwrap().status(), 429, "87 of 100 spent");
    std::fs::write(&path, text.replace("tokens = 100", "tokens = 200")).unwrap();
    running.admin.reload().unwrap();
    // The 87 tokens already spent still count against the new limit.
    for _ in 0..3 {
        assert_eq!(send().await.unwrap().status(), 200);
    }
    assert_eq!(send().await.unwrap().status(), 429, "174 of 200 spent");
    running.shutdown().await;
}
