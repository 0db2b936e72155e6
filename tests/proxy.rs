//! Proxy hygiene: what crosses the gateway and what does not, cancellation, connection
//! limits and timeouts.

mod common;

use common::*;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A backend that requires its own key, which the gateway has.
async fn keyed_backend() -> Gateway {
    Harness::new()
        .backend(
            Backend::sim("openai", "gpt-4o-mini")
                .alias("chat-small")
                .api_key("sk-backend-secret"),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await
}

#[tokio::test]
async fn the_caller_key_stays_here_and_the_backend_key_is_injected() {
    let gw = keyed_backend().await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await;
    assert_eq!(
        r.status,
        200,
        "the simulator accepted the backend's key: {}",
        r.text()
    );
    let seen = gw.headers_seen_by("openai");
    assert_eq!(seen["authorization"], "Bearer sk-backend-secret");
    let all: String = seen.iter().map(|(k, v)| format!("{k}: {v:?}\n")).collect();
    assert!(
        !all.contains(SEARCH_KEY),
        "client key leaked upstream:\n{all}"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_cross() {
    let gw = Harness::new()
        .backend(Backend::sim("llama", "m").alias("chat-small"))
        .team_toml("search", SEARCH_KEY, "request_tags = [\"project\"]")
        .start()
        .await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {SEARCH_KEY}"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret-for-next-hop-only")
        .header("te", "trailers")
        .header("x-tollgate-tags", "project=a")
        .body(Full::from(chat("chat-small", false)))
        .unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.status, 200);
    let seen = gw.headers_seen_by("llama");
    assert!(!seen.contains_key("x-hop"), "{seen:?}");
    assert!(!seen.contains_key("te"));
    assert!(!seen.contains_key("x-tollgate-tags"));
    assert_eq!(
        seen["x-request-id"], r.headers["x-tollgate-request-id"],
        "the backend can correlate logs"
    );
}

#[tokio::test]
async fn only_allowed_headers_reach_the_backend_with_the_gateway_own_forwarding_headers() {
    let gw = keyed_backend().await;
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("host", "gateway.example:8080")
        .header("authorization", format!("Bearer {SEARCH_KEY}"))
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, br")
        .header("user-agent", "OpenAI/Python 1.99.0")
        .header("openai-beta", "assistants=v2")
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "prompt-caching-2024-07-31")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("tracestate", "congo=t61rcWkgMzE")
        .header("x-request-id", "client-chosen")
        .header("x-stainless-lang", "python")
        .header("cookie", "session=abc")
        .header("openai-organization", "org-someone-else")
        .header("openai-project", "proj_someone_else")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=6.6.6.6;proto=https")
        .header("x-real-ip", "6.6.6.6")
        .header("x-evil", "1")
        .header("x-api-key", SEARCH_KEY)
        .body(Full::from(chat("chat-small", false)))
        .unwrap();
    let r = gw.send(req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = gw.headers_seen_by("openai");
    let mut names: Vec<&str> = seen.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            // The client's, allowed through.
            "accept",
            "anthropic-beta",
            "anthropic-version",
            // The gateway's own: the backend's key, the body's length, the backend's host.
            "authorization",
            "content-length",
            "content-type",
            "host",
            "openai-beta",
            "traceparent",
            "tracestate",
            "user-agent",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-request-id",
        ],
        "{seen:?}"
    );
    assert_eq!(seen["authorization"], "Bearer sk-backend-secret");
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "the client's own address"
    );
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "gateway.example:8080");
    assert_eq!(seen["x-request-id"], r.headers["x-tollgate-request-id"]);
    assert_eq!(seen["user-agent"], "OpenAI/Python 1.99.0");
    assert_eq!(
        seen["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(seen.get_all("x-forwarded-for").iter().count(), 1);
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_stream() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .paced(Duration::from_millis(20), 500),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let resp = gw
        .open("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let sim = gw.sim("llama");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.stats.streams_cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "upstream kept generating after the client left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sim.stats.tokens_generated.load(Ordering::Relaxed) < 100);
    assert_eq!(
        sim.stats.generating.load(Ordering::Relaxed),
        0,
        "the GPU slot is free again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let gw = Harness::new()
        .backend(Backend::sim("llama", "m"))
        .team("search", SEARCH_KEY)
        .server("header_read_timeout_s = 5")
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // Paused time jumps to the timeout; the read ends when the gateway closes.
    let n = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await;
    assert!(
        n.is_ok(),
        "connection still open after the header read timeout"
    );
}

#[tokio::test]
async fn a_burst_of_new_connections_is_accepted_without_syn_retries() {
    let gw = basic().await;
    let addr = gw.addr;
    let req = format!(
        "GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SEARCH_KEY}\r\nconnection: close\r\n\r\n"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let req = req.clone();
        tasks.spawn(async move {
            let started = Instant::now();
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.unwrap();
            assert!(
                buf.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf)
            );
            started.elapsed()
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(t) = tasks.join_next().await {
        slowest = slowest.max(t.unwrap());
    }
    // A dropped SYN is retried after one second; every connection must beat that.
    assert!(
        slowest < Duration::from_millis(900),
        "slowest connection took {slowest:?}"
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_streams_then_stops_accepting() {
    let mut gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .paced(Duration::from_millis(20), 25),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let resp = gw
        .open("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    let running = gw.running.take().unwrap();
    let admin = running.admin.clone();
    let stopping = tokio::spawn(running.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        admin.draining.load(Ordering::Relaxed),
        "/readyz reports draining"
    );
    let r = collect(resp).await;
    assert_eq!(
        r.events().last().unwrap(),
        "[DONE]",
        "the in-flight stream completed"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown finishes")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed() {
    let gw = Harness::new()
        .backend(Backend::sim("llama", "m"))
        .team("search", SEARCH_KEY)
        .server("header_read_timeout_s = 5")
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req =
        format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {SEARCH_KEY}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // Nothing more is sent: the gateway must not keep the connection forever.
    let rest = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await;
    assert!(rest.is_ok(), "idle keep-alive connection still open");
}

#[tokio::test]
async fn events_that_arrive_together_leave_in_one_write() {
    // Unpaced: the simulator writes 64 events as fast as it can, so they reach the gateway
    // many to a read; they should reach the client many to a chunk.
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .config(|c| c.completion_tokens = 64),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let resp = gw
        .open("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    let mut body = resp.into_body();
    let (mut frames, mut events) = (0, 0);
    while let Some(f) = body.frame().await {
        if let Ok(data) = f.unwrap().into_data() {
            frames += 1;
            events += String::from_utf8_lossy(&data).matches("data: ").count();
        }
    }
    assert!(events >= 66, "{events} events");
    assert!(frames * 4 <= events, "{frames} writes for {events} events");
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_not_an_error() {
    let gw = Harness::new()
        .backend(Backend::sim("llama", "m").alias("chat-small"))
        .team("search", SEARCH_KEY)
        .start()
        .await;
    assert_eq!(
        gw.post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false)
        )
        .await
        .status,
        200
    );
    // The backend restarts on the same port: the gateway's idle connection to it is dead.
    let mut gw = gw;
    let sim = gw.sims.remove("llama").unwrap();
    let addr = sim.addr;
    sim.stop().await;
    let listener = tollgate::server::bind(addr, 64).unwrap();
    let _sim = tollgate::sim::Sim::start(listener, tollgate::sim::SimConfig::default());
    for _ in 0..3 {
        let r = gw
            .post(
                "/v1/chat/completions",
                SEARCH_KEY,
                chat("chat-small", false),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}
