//! Hostile callers: fields that multiply output, slow bodies, one tenant taking every slot.
//! Each test here failed against the gateway before the defect it names was fixed.

mod common;

use common::*;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// gpt-4o at list price.
fn gpt() -> Backend {
    Backend::sim("gpt", "gpt-4o")
        .alias("chat-large")
        .price(2.5, 10.0)
        .config(|c| c.max_concurrency = 256)
}

fn body(fields: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&chat("chat-large", false)).unwrap();
    for (k, val) in fields.as_object().unwrap() {
        v[k] = val.clone();
    }
    v.to_string()
}

/// A gateway in front of `backend` where team `search` has a day budget of `tokens`.
fn budgeted(backend: Backend, tokens: i64) -> Harness {
    Harness::new().backend(backend).team_toml(
        "search",
        SEARCH_KEY,
        &format!("budgets = [{{ window = \"day\", tokens = {tokens} }}]"),
    )
}

fn tokens_spent(gw: &Gateway) -> i64 {
    gw.ledger(
        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM requests WHERE team = 'search'",
        |r| r.get(0),
    )[0]
}

#[tokio::test]
async fn n_past_the_gateway_maximum_is_refused_naming_the_field() {
    let gw = budgeted(gpt(), 60).start().await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            body(serde_json::json!({"n": 500})),
        )
        .await;
    let e = r.error(400);
    assert_eq!(e["param"], "n", "{e}");
    assert!(e["message"].as_str().unwrap().contains("at most 16"), "{e}");
    for bad in [
        serde_json::json!({"n": 0}),
        serde_json::json!({"n": -1}),
        serde_json::json!({"n": 1.5}),
        serde_json::json!({"n": "2"}),
        serde_json::json!({"n": 1_000_000}),
        serde_json::json!({"best_of": 1, "n": 2}),
        serde_json::json!({"max_tokens": -5}),
    ] {
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, body(bad.clone()))
            .await;
        let e = r.error(400);
        let field = bad.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(e["param"], field.as_str(), "{bad}: {e}");
    }
    // A second `n` or `max_tokens` would let the gateway read one and the engine the other.
    for dup in [r#""n":1,"n":500"#, r#""max_tokens":1,"max_tokens":100000"#] {
        let b = chat("chat-large", false).replacen('{', &format!("{{{dup},"), 1);
        let r = gw.post("/v1/chat/completions", SEARCH_KEY, b).await;
        assert!(r.error(400)["message"]
            .as_str()
            .unwrap()
            .contains("duplicate"));
    }
    assert_eq!(gw.sim("gpt").stats.requests.load(Relaxed), 0);
    assert_eq!(tokens_spent(&gw), 0);
}

#[tokio::test]
async fn every_choice_is_reserved_so_n_cannot_overrun_a_budget() {
    // 19 prompt tokens; 2 choices of up to 20 tokens each: a worst case of 59 fits a budget
    // of 60, a third choice does not.
    let gw = budgeted(gpt(), 60).start().await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            body(serde_json::json!({"n": 3, "max_tokens": 20})),
        )
        .await;
    assert_eq!(r.error(429)["type"], "budget_exceeded");
    assert_eq!(gw.sim("gpt").stats.requests.load(Relaxed), 0);
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            body(serde_json::json!({"n": 2, "max_tokens": 20})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 2);
    // The simulator answers 16 tokens a choice: 19 + 32 spent, all of it billed.
    gw.wait_ledger_rows("SELECT 1 FROM requests WHERE status = 'ok'", 1)
        .await;
    assert_eq!(tokens_spent(&gw), 19 + 32);
}

#[tokio::test]
async fn a_request_without_max_tokens_is_sent_with_the_cap_it_reserved() {
    // The model's cap is 5 a choice; the engine would write 16 if not told.
    let gw = budgeted(gpt().model_toml("max_output_tokens = 5"), 1000)
        .team("free", OTHER_KEY)
        .start()
        .await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            body(serde_json::json!({"n": 3})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sent: serde_json::Value = gw.last_sent("gpt");
    assert_eq!(sent["max_tokens"], 5, "{sent}");
    assert_eq!(r.json()["usage"]["completion_tokens"], 15);
    // A team without budgets has nothing to protect: its body goes as it came.
    let r = gw
        .post("/v1/chat/completions", OTHER_KEY, chat("chat-large", false))
        .await;
    assert_eq!(r.status, 200);
    let sent = gw
        .sim("gpt")
        .stats
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert!(!String::from_utf8_lossy(&sent).contains("max_tokens"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_n_and_max_tokens_in_parallel_end_within_one_reservation_of_the_limit() {
    const LIMIT: i64 = 3_000;
    // The engine writes every token allowed, so what settles is what was reserved: any room
    // left at the end is room the admission refused.
    let gw = Arc::new(
        budgeted(gpt().config(|c| c.completion_tokens = 64), LIMIT)
            .start()
            .await,
    );
    // A fixed seed: the same mix every run; a failure names it.
    let mut seed: u64 = 0x5eed_0013;
    let mut next = move |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut largest = 0;
    for _ in 0..200 {
        let (n, max_tokens) = (1 + next(4), 1 + next(24));
        largest = largest.max(19 + n * max_tokens);
        let gw = gw.clone();
        let b = body(serde_json::json!({"n": n, "max_tokens": max_tokens}));
        tasks.spawn(async move {
            let r = gw.post("/v1/chat/completions", SEARCH_KEY, b.clone()).await;
            (r.status.as_u16(), b)
        });
    }
    let mut refused = vec![];
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            (200, _) => {}
            (429, b) => refused.push(b),
            (other, _) => panic!("unexpected {other}"),
        }
    }
    assert!(!refused.is_empty());
    let spent = tokens_spent(&gw);
    assert!(spent <= LIMIT, "spent {spent} of {LIMIT}");
    // Refused under contention, tried again one by one: whatever reservations were held
    // have all been settled or released, so the budget fills to within one request.
    for b in refused {
        let r = gw.post("/v1/chat/completions", SEARCH_KEY, b).await;
        assert!(matches!(r.status.as_u16(), 200 | 429), "{}", r.status);
    }
    let spent = tokens_spent(&gw);
    assert!(spent <= LIMIT, "spent {spent} of {LIMIT}");
    assert!(
        spent >= LIMIT - largest as i64,
        "spent {spent}: more than one reservation ({largest}) of {LIMIT} left unused"
    );
}

/// Sends a request's headers and the first `sent` bytes of a body of `len`, then holds the
/// connection open: a client trickling its body.
async fn slow_body(gw: &Gateway, key: &str, len: usize, sent: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&b"{\"model\":"[..sent]).await.unwrap();
    s
}

/// Everything the server writes until it closes, as text.
async fn read_all(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let gw = Harness::new()
        .backend(gpt())
        .team("search", SEARCH_KEY)
        .server("body_read_timeout_s = 0.3")
        .start()
        .await;
    let started = std::time::Instant::now();
    let mut s = slow_body(&gw, SEARCH_KEY, 100, 5).await;
    let reply = read_all(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains(r#""code":"request_timeout""#), "{reply}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(gw.sim("gpt").stats.requests.load(Relaxed), 0);
}

#[tokio::test]
async fn four_slow_clients_of_one_team_do_not_stop_another_team() {
    // Four slots; a key may hold half of them. The bodies never come (within the test).
    let gw = Harness::new()
        .backend(gpt())
        .team("search", SEARCH_KEY)
        .team("free", OTHER_KEY)
        .server("max_in_flight = 4\nbody_read_timeout_s = 60")
        .start()
        .await;
    let mut held = vec![];
    for _ in 0..4 {
        held.push(slow_body(&gw, SEARCH_KEY, 100, 5).await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Two of the four were refused at once, in OpenAI's rate-limit shape.
    let mut refused = 0;
    for s in held.iter_mut() {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; 4096];
        if let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), s.read(&mut buf)).await
        {
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
            assert!(reply.contains("rate_limit_exceeded"), "{reply}");
            refused += 1;
        }
    }
    assert_eq!(refused, 2);
    let r = gw
        .post("/v1/chat/completions", OTHER_KEY, chat("chat-large", false))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(held);
}

#[tokio::test]
async fn oversized_headers_are_refused_in_openai_shape() {
    use tokio::io::AsyncWriteExt;
    let gw = Harness::new()
        .backend(gpt())
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let big = "x".repeat(100 * 1024);
    let many: String = (0..80).map(|i| format!("x-h{i}: v\r\n")).collect();
    let body = chat("chat-large", false);
    let cases = [
        (
            format!("x-big: {big}\r\ncontent-length: {}\r\n", body.len()),
            "431",
            "request_header_fields_too_large",
        ),
        (
            format!("{many}content-length: {}\r\n", body.len()),
            "431",
            "request_header_fields_too_large",
        ),
    ];
    for (headers, status, needle) in cases {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SEARCH_KEY}\r\n\
             content-type: application/json\r\nconnection: close\r\n{headers}\r\n"
        );
        req.push_str(&body);
        s.write_all(req.as_bytes()).await.unwrap();
        let reply = read_all(&mut s).await;
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status}")),
            "{}",
            &reply[..reply.len().min(300)]
        );
        assert!(reply.contains(needle), "{reply}");
    }
    assert_eq!(gw.sim("gpt").stats.requests.load(Relaxed), 0);
}

#[tokio::test]
async fn chunked_with_a_content_length_cannot_smuggle_a_second_request() {
    use tokio::io::AsyncWriteExt;
    let gw = Harness::new()
        .backend(gpt())
        .team("search", SEARCH_KEY)
        .start()
        .await;
    // Framed by Content-Length, the body would be 5 bytes and the rest a second request.
    let body = chat("chat-large", false);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SEARCH_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\nhost: x\r\n\
         authorization: Bearer {SEARCH_KEY}\r\n\r\n",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let reply = read_all(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("chat.completion"), "{reply}");
    assert_eq!(
        reply.matches("HTTP/1.1 ").count(),
        1,
        "a second answer: {reply}"
    );
    assert_eq!(gw.sim("gpt").stats.requests.load(Relaxed), 1);
}

#[tokio::test]
async fn bodies_the_gateway_cannot_bill_are_refused_before_any_backend() {
    let gw = Harness::new()
        .backend(gpt())
        .team("search", SEARCH_KEY)
        .start()
        .await;
    // In a member serde skips: only a full validation sees it.
    let mut not_utf8 =
        br#"{"model":"chat-large","messages":[{"role":"user","content":"hi"}],"note":"a?"}"#
            .to_vec();
    let at = not_utf8.iter().rposition(|&b| b == b'?').unwrap();
    not_utf8[at] = 0xff;
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            br#"{"model":"chat-large","messages":[{"role":"user","content":"hi"}],"note":"\ud800"}"#.to_vec(),
            "application/json",
            400,
            "surrogate",
        ),
        (
            "/v1/chat/completions",
            not_utf8,
            "application/json",
            400,
            "UTF-8",
        ),
        (
            "/v1/chat/completions",
            chat("chat-large", false).into_bytes(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/chat/completions",
            b"model=chat-large".to_vec(),
            "application/x-www-form-urlencoded",
            415,
            "Content-Type: application/json",
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"chat-large","messages":"hi"}"#.to_vec(),
            "application/json",
            400,
            r#""param":"messages""#,
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"chat-large","messages":[{"role":"user","content":7}]}"#.to_vec(),
            "application/json",
            400,
            r#""param":"messages""#,
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"chat-large","messages":[{"content":"hi"}]}"#.to_vec(),
            "application/json",
            400,
            "`role`",
        ),
        (
            "/v1/completions",
            br#"{"model":"chat-large","prompt":{"a":1}}"#.to_vec(),
            "application/json",
            400,
            r#""param":"prompt""#,
        ),
        (
            "/v1/embeddings",
            br#"{"model":"chat-large"}"#.to_vec(),
            "application/json",
            400,
            r#""param":"input""#,
        ),
    ];
    for (path, body, content_type, status, needle) in cases {
        let mut req = gw.request(path, SEARCH_KEY, body);
        req.headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        let r = gw.send(req).await;
        assert_eq!(
            r.status.as_u16(),
            status,
            "{path} {content_type}: {}",
            r.text()
        );
        assert!(r.text().contains(needle), "{}", r.text());
        assert!(r.json()["error"]["message"].is_string());
    }
    assert_eq!(gw.sim("gpt").stats.requests.load(Relaxed), 0);
}

#[tokio::test]
async fn a_success_that_is_not_json_is_an_upstream_error_not_a_billed_answer() {
    let (url, seen) = scripted_backend(|_| {
        Some(json_answer(
            200,
            r#"{"id":"x","choices":[{"message":{"content":"hi"#,
        ))
    })
    .await;
    let gw = Harness::new()
        .backend(Backend::at("raw", "m", &url).alias("chat"))
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    let e = r.error(502);
    assert_eq!(e["type"], "upstream_error", "{e}");
    assert_eq!(seen.load(Relaxed), 1);
    gw.wait_ledger_rows("SELECT 1 FROM requests", 1).await;
    let (status, cost): (String, i64) = gw
        .ledger("SELECT status, cost_nusd FROM requests", |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .remove(0);
    assert_eq!((status.as_str(), cost), ("upstream_broken", 0));
}

#[tokio::test]
async fn a_success_that_is_not_json_falls_back_while_nothing_reached_the_client() {
    let (url, seen) = scripted_backend(|_| Some(json_answer(200, "<html>oops</html>"))).await;
    let gw = Harness::new()
        .backend(Backend::at("raw", "m", &url).alias("chat"))
        .backend(gpt().commercial().alias("chat"))
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat", false))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-tollgate-backend"], "gpt");
    assert_eq!(seen.load(Relaxed), 1);
    gw.wait_ledger_rows("SELECT 1 FROM requests", 1).await;
    let (backend, attempts, resent): (String, i64, i64) = gw
        .ledger("SELECT backend, attempts, resent FROM requests", |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .remove(0);
    assert_eq!((backend.as_str(), attempts, resent), ("gpt", 2, 1));
}
