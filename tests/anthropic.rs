//! Anthropic's API both ways, over real HTTP: Anthropic clients on `/v1/messages` served by
//! OpenAI-style backends, OpenAI clients served by Anthropic backends (the simulator speaks
//! Anthropic's wire format), and Anthropic on both sides. Each metered to the ledger from the
//! backend's own usage.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

const KEY: &str = "tg-test-anthropic";

async fn gateway() -> Gateway {
    Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("small")
                .price(0.2, 0.6),
        )
        .backend(claude_backend().model_toml("max_output_tokens = 64"))
        .team("research", KEY)
        .start()
        .await
}

/// A request as the Anthropic SDK sends it: `x-api-key`, `anthropic-version`.
fn messages(gw: &Gateway, path: &str, key: &str, body: &serde_json::Value) -> Request<Full<Bytes>> {
    Request::post(gw.url(path))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn ledger_tokens(gw: &Gateway) -> Vec<(i64, i64, String, String)> {
    gw.ledger(
        "SELECT prompt_tokens, completion_tokens, backend, status FROM requests ORDER BY started_at_us",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
}

/// Anthropic SSE events as (name, data) pairs.
fn anthropic_events(text: &str) -> Vec<(String, serde_json::Value)> {
    text.split("\n\n")
        .filter_map(|e| {
            let name = e.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = e.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn an_anthropic_client_is_served_by_an_openai_backend() {
    let gw = gateway().await;
    let body = serde_json::json!({
        "model": "small", "max_tokens": 40, "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hello there"}],
    });
    let r = gw.send(messages(&gw, "/v1/messages", KEY, &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(
        v["content"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    assert_eq!(v["stop_reason"], "end_turn");
    // What the backend got: an OpenAI chat request, the system prompt first.
    let sent = gw.last_sent("llama");
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["max_tokens"], 40);
    let rows = ledger_tokens(&gw);
    assert_eq!(rows.len(), 1);
    let endpoint: Vec<String> = gw.ledger("SELECT endpoint FROM requests", |r| r.get(0));
    assert_eq!(endpoint, ["/v1/messages"]);
    assert_eq!(rows[0].0, v["usage"]["input_tokens"].as_i64().unwrap());
    assert_eq!(rows[0].1, v["usage"]["output_tokens"].as_i64().unwrap());
    assert_eq!(
        r.headers["x-tollgate-prompt-tokens"],
        rows[0].0.to_string().as_str()
    );
    assert!(r.headers.contains_key("x-tollgate-cost-usd"));
}

#[tokio::test]
async fn an_anthropic_stream_from_an_openai_backend_ends_with_the_cost_before_message_stop() {
    let gw = gateway().await;
    let body = serde_json::json!({
        "model": "small", "max_tokens": 40, "stream": true,
        "messages": [{"role": "user", "content": "Tell me a story"}],
    });
    let r = gw.send(messages(&gw, "/v1/messages", KEY, &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let events = anthropic_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(names.last(), Some(&"message_stop"), "{text}");
    assert!(names.contains(&"content_block_delta"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let comment = text.find(": tollgate ").expect("cost comment");
    assert!(
        comment < text.find("event: message_stop").unwrap(),
        "{text}"
    );
    let delta = &events.iter().find(|(n, _)| n == "message_delta").unwrap().1;
    let output = delta["usage"]["output_tokens"].as_i64().unwrap();
    let rows = ledger_tokens(&gw);
    assert_eq!(rows[0].1, output);
    assert_eq!(r.closing_comment()["completion_tokens"], output);
}

#[tokio::test]
async fn an_openai_client_is_served_by_an_anthropic_backend() {
    let gw = gateway().await;
    let r = gw
        .post("/v1/chat/completions", KEY, chat("sonnet", false))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let seen = gw.headers_seen_by("claude");
    assert_eq!(seen["x-api-key"], "sk-ant-sim");
    assert!(!seen.contains_key("authorization"));
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    // Anthropic requires max_tokens: the model's cap goes when the client set none.
    assert_eq!(gw.last_sent("claude")["max_tokens"], 64);
    let rows = ledger_tokens(&gw);
    assert_eq!(rows[0].2, "claude");
    assert_eq!(rows[0].0, v["usage"]["prompt_tokens"].as_i64().unwrap());
    assert_eq!(rows[0].1, v["usage"]["completion_tokens"].as_i64().unwrap());
}

#[tokio::test]
async fn an_openai_stream_from_an_anthropic_backend_is_metered_from_its_usage() {
    let gw = gateway().await;
    let body = serde_json::json!({
        "model": "sonnet", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Count to ten"}],
    });
    let r = gw.post("/v1/chat/completions", KEY, body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    let usage = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .expect("a usage chunk")["usage"]
        .clone();
    let rows = ledger_tokens(&gw);
    assert_eq!(rows[0].0, usage["prompt_tokens"].as_i64().unwrap());
    assert_eq!(rows[0].1, usage["completion_tokens"].as_i64().unwrap());
    assert_eq!(rows[0].3, "ok");
    // A client that did not ask for usage sees none.
    let r = gw
        .post("/v1/chat/completions", KEY, chat("sonnet", true))
        .await;
    assert!(!r.text().contains("\"usage\""), "{}", r.text());
}

#[tokio::test]
async fn anthropic_on_both_sides_json_and_stream() {
    let gw = gateway().await;
    let body = serde_json::json!({
        "model": "sonnet", "max_tokens": 30,
        "messages": [{"role": "user", "content": "Hi"}],
    });
    let r = gw.send(messages(&gw, "/v1/messages", KEY, &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    let mut stream = body.clone();
    stream["stream"] = true.into();
    let s = gw.send(messages(&gw, "/v1/messages", KEY, &stream)).await;
    let events = anthropic_events(&s.text());
    assert_eq!(events.last().unwrap().0, "message_stop", "{}", s.text());
    let rows = ledger_tokens(&gw);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].1, v["usage"]["output_tokens"].as_i64().unwrap());
    assert!(
        rows.iter().all(|r| r.2 == "claude" && r.3 == "ok"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn errors_on_anthropic_paths_have_anthropic_bodies() {
    let gw = gateway().await;
    let body = serde_json::json!({
        "model": "small", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
    });
    let check = |r: &Reply, status: u16, kind: &str| {
        assert_eq!(r.status.as_u16(), status, "{}", r.text());
        let v = r.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    };
    check(
        &gw.send(messages(&gw, "/v1/messages", "tg-wrong", &body))
            .await,
        401,
        "authentication_error",
    );
    let mut unknown = body.clone();
    unknown["model"] = "claude-9".into();
    check(
        &gw.send(messages(&gw, "/v1/messages", KEY, &unknown)).await,
        404,
        "not_found_error",
    );
    let mut thinking = body.clone();
    thinking["thinking"] = serde_json::json!({"type": "enabled", "budget_tokens": 1024});
    let r = gw.send(messages(&gw, "/v1/messages", KEY, &thinking)).await;
    check(&r, 400, "invalid_request_error");
    assert!(r.text().contains("thinking"), "{}", r.text());
    // What the OpenAI side cannot carry to Anthropic is named too.
    let n2 = serde_json::json!({"model": "sonnet", "n": 2, "messages": [{"role": "user", "content": "x"}]});
    let e = gw
        .post("/v1/chat/completions", KEY, n2.to_string())
        .await
        .error(400);
    assert_eq!(e["param"], "n", "{e}");
    // OpenAI paths keep OpenAI's body.
    gw.post("/v1/chat/completions", "tg-wrong", chat("small", false))
        .await
        .error(401);
}

#[tokio::test]
async fn count_tokens_asks_an_anthropic_backend_and_counts_locally_otherwise() {
    let gw = gateway().await;
    let body = serde_json::json!({
        "model": "sonnet", "system": "You are terse.",
        "messages": [{"role": "user", "content": "How many tokens is this sentence?"}],
    });
    let r = gw
        .send(messages(&gw, "/v1/messages/count_tokens", KEY, &body))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-tollgate-token-source"], "upstream");
    let counted = r.json()["input_tokens"].as_u64().unwrap();
    // The backend's count is what it bills when it serves the same request; nothing was billed
    // for counting.
    assert!(ledger_tokens(&gw).is_empty());
    let mut served = body.clone();
    served["max_tokens"] = 5.into();
    let s = gw.send(messages(&gw, "/v1/messages", KEY, &served)).await;
    assert_eq!(
        s.json()["usage"]["input_tokens"].as_u64(),
        Some(counted),
        "{}",
        s.text()
    );
    // A model no Anthropic backend or counting engine serves is counted here.
    let mut llama = body.clone();
    llama["model"] = "small".into();
    let r = gw
        .send(messages(&gw, "/v1/messages/count_tokens", KEY, &llama))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-tollgate-token-source"], "local");
    let n = r.json()["input_tokens"].as_u64().unwrap();
    assert!((10..40).contains(&n), "{n}");
    let mut unknown = body.clone();
    unknown["model"] = "nope".into();
    let r = gw
        .send(messages(&gw, "/v1/messages/count_tokens", KEY, &unknown))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn an_anthropic_client_on_an_anthropic_backend_keeps_its_cache_hints_and_pays_cache_rates() {
    let gw = Harness::new()
        .backend(
            claude_backend()
                .model_toml("cached_input_usd_per_mtok = 0.3, cache_write_usd_per_mtok = 3.75"),
        )
        .team("research", KEY)
        .start()
        .await;
    let long = "You answer questions about the tollgate. ".repeat(40);
    let body = serde_json::json!({
        "model": "sonnet", "max_tokens": 20,
        "system": [{"type": "text", "text": long, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Who pays?"}],
    });
    let first = gw.send(messages(&gw, "/v1/messages", KEY, &body)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    // The hint reached the backend as the client wrote it.
    assert_eq!(
        gw.last_sent("claude")["system"][0]["cache_control"]["type"],
        "ephemeral"
    );
    let second = gw.send(messages(&gw, "/v1/messages", KEY, &body)).await;
    let (u1, u2) = (
        first.json()["usage"].clone(),
        second.json()["usage"].clone(),
    );
    let written = u1["cache_creation_input_tokens"].as_i64().unwrap();
    let read = u2["cache_read_input_tokens"].as_i64().unwrap();
    assert!(written > 0 && read == written, "{u1} {u2}");
    let rows: Vec<(i64, i64, i64, i64, i64)> = gw.ledger(
        "SELECT prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens, cost_nusd FROM requests ORDER BY started_at_us",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    );
    // Anthropic's input excludes the cache; the ledger's prompt is all three.
    let input = |u: &serde_json::Value| u["input_tokens"].as_i64().unwrap();
    assert_eq!(rows[0].0, input(&u1) + written);
    assert_eq!((rows[0].2, rows[0].3), (0, written));
    assert_eq!(rows[1].0, input(&u2) + read);
    assert_eq!((rows[1].2, rows[1].3), (read, 0));
    // Each at its own rate, in nano-dollars: $3 input, $15 output, $0.30 reads, $3.75 writes.
    let cost = |uncached: i64, output: i64, reads: i64, writes: i64| {
        uncached * 3_000 + output * 15_000 + reads * 300 + writes * 3_750
    };
    let (o1, o2) = (rows[0].1, rows[1].1);
    assert_eq!(rows[0].4, cost(input(&u1), o1, 0, written));
    assert_eq!(rows[1].4, cost(input(&u2), o2, read, 0));
    assert_eq!(
        first.headers["x-tollgate-cost-usd"],
        format!("{:.9}", rows[0].4 as f64 / 1e9).as_str()
    );
}

#[tokio::test]
async fn one_hour_cache_writes_are_priced_at_their_own_rate_on_streams_too() {
    let gw = Harness::new()
        .backend(claude_backend().model_toml(
            "cached_input_usd_per_mtok = 0.3, cache_write_usd_per_mtok = 3.75, \
             cache_write_1h_usd_per_mtok = 6.0",
        ))
        .team("research", KEY)
        .start()
        .await;
    let long = "The hour-long part of the prompt. ".repeat(40);
    let body = serde_json::json!({
        "model": "sonnet", "max_tokens": 20, "stream": true,
        "system": [{"type": "text", "text": long,
                    "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": [{"role": "user", "content": "Who pays?"}],
    });
    let r = gw.send(messages(&gw, "/v1/messages", KEY, &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = anthropic_events(&r.text());
    let start = &events.iter().find(|e| e.0 == "message_start").unwrap().1;
    let u = &start["message"]["usage"];
    let hour = u["cache_creation"]["ephemeral_1h_input_tokens"]
        .as_i64()
        .unwrap_or_else(|| panic!("{}", r.text()));
    assert!(
        hour > 0 && u["cache_creation_input_tokens"].as_i64() == Some(hour),
        "{u}"
    );
    let output = events
        .iter()
        .rev()
        .find(|e| e.0 == "message_delta")
        .unwrap()
        .1["usage"]["output_tokens"]
        .as_i64()
        .unwrap();
    let rows: Vec<(i64, i64, i64, i64)> = gw.ledger(
        "SELECT cache_write_tokens, cache_write_1h_tokens, completion_tokens, cost_nusd FROM requests",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    );
    assert_eq!(rows[0].0, hour);
    assert_eq!(rows[0].1, hour);
    assert_eq!(rows[0].2, output);
    // $3 input, $15 output, $6 per 1M for an hour's write (not the 5-minute $3.75).
    let input = u["input_tokens"].as_i64().unwrap();
    assert_eq!(rows[0].3, input * 3_000 + output * 15_000 + hour * 6_000);
}

#[tokio::test]
async fn a_budget_ends_an_anthropic_stream_as_a_max_tokens_stop() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("small")
                .price(0.2, 0.6)
                .config(|c| {
                    c.completion_tokens = 64;
                    c.ignores_max_tokens = true;
                    c.token_interval = std::time::Duration::from_millis(2);
                }),
        )
        .team_toml(
            "research",
            KEY,
            "budgets = [{ window = \"day\", tokens = 60 }]",
        )
        .start()
        .await;
    let body = serde_json::json!({
        "model": "small", "max_tokens": 20, "stream": true,
        "messages": [{"role": "user", "content": "Go on and on"}],
    });
    let r = gw.send(messages(&gw, "/v1/messages", KEY, &body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = anthropic_events(&r.text());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[names.len() - 2..],
        ["message_delta", "message_stop"],
        "{}",
        r.text()
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "max_tokens"
    );
    assert!(r.text().contains(r#""ended_by":"budget""#), "{}", r.text());
    gw.wait_ledger_rows("SELECT 1 FROM requests WHERE status = 'budget_cut'", 1)
        .await;
}

#[tokio::test]
async fn anthropic_backends_are_passed_over_for_endpoints_their_api_lacks() {
    // Claude is the cheaper of the two for chat, but Anthropic's API has no completions or
    // embeddings: those go to the other backend of the alias, or are refused by name.
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("mixed")
                .commercial()
                .price(5.0, 20.0),
        )
        .backend(claude_backend().alias("mixed"))
        .team("research", KEY)
        .start()
        .await;
    let chat = r#"{"model":"mixed","max_tokens":5,"messages":[{"role":"user","content":"Hi"}]}"#;
    let r = gw.send(gw.request("/v1/chat/completions", KEY, chat)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-tollgate-backend"], "claude");
    let legacy = r#"{"model":"mixed","max_tokens":5,"prompt":"Once upon a time"}"#;
    let r = gw.send(gw.request("/v1/completions", KEY, legacy)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["x-tollgate-backend"], "llama");
    let embed = r#"{"model":"sonnet","input":"Hi"}"#;
    let r = gw.send(gw.request("/v1/embeddings", KEY, embed)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "unsupported_endpoint", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("/v1/embeddings"),
        "{e}"
    );
}
