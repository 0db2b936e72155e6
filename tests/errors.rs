//! Every bad input and upstream failure gets an OpenAI-style error with a fitting status,
//! never a panic or a hang.

mod common;

use common::*;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test]
async fn missing_and_wrong_keys_are_401() {
    let gw = basic().await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .body(Full::from(chat("chat-small", false)))
        .unwrap();
    let e = gw.send(req).await.error(401);
    assert_eq!(e["code"], "invalid_api_key");
    let e = gw
        .post(
            "/v1/chat/completions",
            "tg-wrong",
            chat("chat-small", false),
        )
        .await
        .error(401);
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(gw.get("/v1/models", "tg-wrong").await.status, 401);
    assert_eq!(gw.sim("llama").stats.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let gw = basic().await;
    for bad in ["{not json", "", "[1]", "{\"model\": \"chat-small\""] {
        let e = gw
            .post("/v1/chat/completions", SEARCH_KEY, bad)
            .await
            .error(400);
        assert_eq!(e["type"], "invalid_request_error", "{bad}");
    }
    let e = gw
        .post("/v1/chat/completions", SEARCH_KEY, r#"{"messages":[]}"#)
        .await
        .error(400);
    assert_eq!(e["param"], "model");
    let e = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            r#"{"model":"chat-small","stream":"yes"}"#,
        )
        .await
        .error(400);
    assert!(e["message"].as_str().unwrap().contains("boolean"), "{e}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_whether_announced_or_chunked() {
    let gw = Harness::new()
        .backend(Backend::sim("llama", "m").alias("chat-small"))
        .team("search", SEARCH_KEY)
        .server("max_body_bytes = 1024")
        .start()
        .await;
    let big = format!(
        r#"{{"model":"chat-small","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let e = gw
        .post("/v1/chat/completions", SEARCH_KEY, big.clone())
        .await
        .error(413);
    assert!(e["message"].as_str().unwrap().contains("1024"), "{e}");

    // No Content-Length: the limit is enforced while reading.
    let chunks = big
        .as_bytes()
        .chunks(256)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {SEARCH_KEY}"))
        .body(Chunked(chunks))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(gw.sim("llama").stats.requests.load(Ordering::Relaxed), 0);
}

/// A body of unknown length, sent with chunked transfer encoding.
struct Chunked(std::collections::VecDeque<bytes::Bytes>);

impl hyper::body::Body for Chunked {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test]
async fn unknown_model_is_404_model_not_found() {
    let gw = basic().await;
    let e = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("gpt-9", false))
        .await
        .error(404);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
}

#[tokio::test]
async fn wrong_method_is_405_and_unknown_path_404() {
    let gw = basic().await;
    let e = gw.get("/v1/chat/completions", SEARCH_KEY).await.error(405);
    assert!(e["message"].as_str().unwrap().contains("GET"));
    let e = gw.post("/v1/nope", SEARCH_KEY, "{}").await.error(404);
    assert_eq!(e["code"], "unknown_url");
    // Even an unauthenticated probe of a random path gets a clean 404.
    let req = http::Request::get(gw.url("/../../etc/passwd"))
        .body(Full::default())
        .unwrap();
    gw.send(req).await.error(404);
}

#[tokio::test]
async fn upstream_refusing_connections_is_502() {
    // Bind then drop a listener: that port now refuses connections.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = Harness::new()
        .backend(
            Backend::at("llama", "m", &format!("http://127.0.0.1:{port}"))
                .alias("chat-small")
                // No active probe: the first request is the one to find the port closed.
                .toml("health_check = { interval_s = 0 }"),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let e = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await
        .error(502);
    assert_eq!(e["code"], "upstream_connect");
    assert!(
        !e["message"].as_str().unwrap().contains(&port.to_string()),
        "no internal address leaks: {e}"
    );
    // That opened its circuit: the next request is refused at once, saying why and when.
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await;
    let e = r.error(503);
    assert_eq!(e["code"], "no_eligible_backend");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("llama: down (circuit open after connect failures"),
        "{msg}"
    );
    assert!(
        !msg.contains(&port.to_string()),
        "no internal address leaks: {e}"
    );
    assert_eq!(r.headers["retry-after"], "10");
}

#[tokio::test(start_paused = true)]
async fn upstream_slower_than_the_request_timeout_is_504() {
    let gw = Harness::new()
        .backend(Backend::sim("llama", "m").alias("chat-small"))
        .team("search", SEARCH_KEY)
        .server("request_timeout_s = 30")
        .start()
        .await;
    gw.sim("llama")
        .knobs
        .headers_delay_ms
        .store(60_000, Ordering::Relaxed);
    let e = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await
        .error(504);
    assert_eq!(e["code"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_errors_pass_through_with_their_body() {
    let gw = basic().await;
    // 429 last: it makes the only backend avoided for its Retry-After.
    for status in [400u16, 500, 503, 429] {
        gw.sim("llama")
            .knobs
            .fail_status
            .store(status, Ordering::Relaxed);
        let r = gw
            .post(
                "/v1/chat/completions",
                SEARCH_KEY,
                chat("chat-small", false),
            )
            .await;
        let e = r.error(status);
        assert_eq!(e["message"], "The simulated server failed as configured.");
        if status == 429 {
            assert_eq!(
                r.headers["retry-after"], "2",
                "upstream Retry-After reaches the client"
            );
        }
        assert_eq!(r.headers["x-tollgate-backend"], "llama");
    }
}

#[tokio::test]
async fn upstream_dying_mid_stream_ends_the_stream_with_an_error_event() {
    // Paced tokens, so the upstream's headers and first events are out before it dies.
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .config(|c| c.token_interval = Duration::from_millis(5)),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    gw.sim("llama")
        .knobs
        .break_after_tokens
        .store(3, Ordering::Relaxed);
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    assert_eq!(r.status, 200);
    let events = r.events();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.contains("\"delta\":{\"content\""))
            .count(),
        3,
        "{events:?}"
    );
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_failed", "{last}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_goes_silent_is_cut_after_the_idle_timeout() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .toml("stream_idle_timeout_s = 5"),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    gw.sim("llama")
        .knobs
        .stall_before_token
        .store(4, Ordering::Relaxed);
    gw.sim("llama")
        .knobs
        .stall_ms
        .store(3_600_000, Ordering::Relaxed);
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    let events = r.events();
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.contains("\"content\":\" "))
            .count(),
        2,
        "{events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_stream_within_the_idle_timeout_is_not_cut() {
    // 20 tokens x 2 s = 40 s in all: longer than the idle timeout, but never silent that long.
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .toml("stream_idle_timeout_s = 5")
                .paced(Duration::from_secs(2), 20),
        )
        .team("search", SEARCH_KEY)
        .server("request_timeout_s = 10")
        .start()
        .await;
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    assert_eq!(r.events().last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn past_the_in_flight_limit_requests_are_shed_with_503() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .paced(Duration::from_millis(50), 20),
        )
        .team("search", SEARCH_KEY)
        .server("max_in_flight = 1")
        .start()
        .await;
    // The open stream holds the only slot until its last byte.
    let holding = gw
        .open("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await;
    let e = r.error(503);
    assert_eq!(e["code"], "overloaded");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(r.headers.contains_key("x-tollgate-request-id"));
    let _ = holding.into_body().collect().await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await;
    assert_eq!(
        r.status, 200,
        "the slot is free again once the stream ended"
    );
}
