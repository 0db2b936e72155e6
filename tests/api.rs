//! The client API end to end over loopback: chat (JSON and stream), completions,
//! embeddings and models, against the simulator.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[tokio::test]
async fn chat_json_is_forwarded_with_the_alias_resolved() {
    let gw = basic().await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 10
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.headers["x-tollgate-backend"], "llama");
    assert_eq!(
        r.headers["x-tollgate-model"],
        "meta-llama/Llama-3.1-8B-Instruct"
    );
    // A UUID: the id also goes upstream as `x-request-id`, where strict servers want one.
    let id = r.headers["x-tollgate-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert_eq!(id.matches('-').count(), 4, "{id}");
    assert_eq!(
        gw.sim("llama")
            .stats
            .last_headers
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()["x-request-id"],
        id
    );
    // The backend saw its own model name, not the alias, and the rest of the body intact.
    let sent: serde_json::Value = gw.last_sent("llama");
    assert_eq!(sent["model"], "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(sent["messages"][1]["content"], "What does a gateway meter?");
}

#[tokio::test]
async fn a_concrete_model_name_is_forwarded_unchanged() {
    let gw = basic().await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("meta-llama/Llama-3.1-8B-Instruct", false),
        )
        .await;
    assert_eq!(r.status, 200);
    let sent = gw
        .sim("llama")
        .stats
        .last_body
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    assert_eq!(
        sent,
        chat("meta-llama/Llama-3.1-8B-Instruct", false).as_bytes(),
        "body forwarded byte for byte"
    );
}

#[tokio::test]
async fn chat_stream_passes_events_through_as_they_are_generated() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .paced(Duration::from_millis(40), 10),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let started = Instant::now();
    let resp = gw
        .open("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = started.elapsed();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    // The upstream takes 10 x 40 ms; the first event must not wait for its end.
    assert_eq!(
        gw.sim("llama")
            .stats
            .streams_completed
            .load(Ordering::Relaxed),
        0,
        "upstream already done"
    );
    assert!(
        first_at < Duration::from_millis(300),
        "first event after {first_at:?}"
    );

    let rest = body.collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&first) + String::from_utf8_lossy(&rest);
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let content: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content.split_whitespace().count(), 10, "{content}");
    assert_eq!(
        gw.sim("llama")
            .stats
            .streams_completed
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn stream_usage_is_passed_when_the_client_asks_for_it() {
    let gw = basic().await;
    let body = serde_json::json!({"model": "chat-small", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, body.to_string())
        .await;
    let events = r.events();
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 16);
}

#[tokio::test]
async fn legacy_completions_json_and_stream() {
    let gw = basic().await;
    let body = serde_json::json!({"model": "chat-small", "prompt": "Say hello", "max_tokens": 5});
    let r = gw
        .post("/v1/completions", SEARCH_KEY, body.to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    let body = serde_json::json!({"model": "chat-small", "prompt": "Say hello", "stream": true});
    let r = gw
        .post("/v1/completions", SEARCH_KEY, body.to_string())
        .await;
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events[0].contains("\"text_completion\""));
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let gw = Harness::new()
        .backend(Backend::sim("openai", "text-embedding-3-small").alias("embed"))
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let r = gw
        .post(
            "/v1/embeddings",
            SEARCH_KEY,
            r#"{"model":"embed","input":["a","b"]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 16);
    let r = gw
        .post(
            "/v1/embeddings",
            SEARCH_KEY,
            r#"{"model":"embed","input":"a","encoding_format":"base64"}"#,
        )
        .await;
    assert!(r.json()["data"][0]["embedding"].is_string());
}

#[tokio::test]
async fn models_lists_what_the_team_may_use() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama-eu", "llama-8b")
                .alias("chat-small")
                .region("eu"),
        )
        .backend(
            Backend::sim("gpt-us", "gpt-4o")
                .alias("chat-large")
                .region("us"),
        )
        .team_toml("search", SEARCH_KEY, "regions = [\"eu\"]")
        .team("other", OTHER_KEY)
        .start()
        .await;
    let ids = |r: Reply| -> Vec<String> {
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let r = gw.get("/v1/models", SEARCH_KEY).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["object"], "list");
    assert_eq!(ids(r), vec!["chat-small", "llama-8b"]);
    assert_eq!(
        ids(gw.get("/v1/models", OTHER_KEY).await),
        vec!["chat-large", "chat-small", "gpt-4o", "llama-8b"]
    );
}

#[tokio::test]
async fn a_team_never_reaches_a_backend_outside_its_regions() {
    let gw = Harness::new()
        .backend(
            Backend::sim("gpt-us", "gpt-4o")
                .alias("chat-large")
                .region("us"),
        )
        .team_toml("search", SEARCH_KEY, "regions = [\"eu\"]")
        .start()
        .await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-large", false),
        )
        .await;
    let e = r.error(503);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("not among the team's regions"),
        "{e}"
    );
    assert_eq!(gw.sim("gpt-us").stats.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn http2_clients_are_served() {
    let gw = basic().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .request(gw.request("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true)))
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let r = collect(resp).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.events().last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn the_key_scheme_is_case_insensitive() {
    let gw = basic().await;
    for scheme in ["bearer", "BEARER", "Bearer  ", "bearer\t"] {
        let mut req = gw.request(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        );
        req.headers_mut().insert(
            "authorization",
            format!("{scheme} {SEARCH_KEY}").parse().unwrap(),
        );
        let r = gw.send(req).await;
        assert_eq!(r.status, 200, "{scheme:?}: {}", r.text());
    }
}
