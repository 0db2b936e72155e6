//! The gateway in front of each engine's dialect (the simulator speaking it: docs/ENGINES.md),
//! every record held against the engine's own counts. A simulated engine's usage, its
//! tokenize endpoints and the text it streams agree exactly, as a real one's do, so the
//! ledger must equal what the engine counted, whichever way the gateway got the figures:
//! `upstream` (its usage, or llama.cpp's `timings`), `engine` (its tokenize endpoints), or
//! `local` where the engine has none (Ollama, OpenAI's API).
//!
//! Streams reach the client as the engine wrote them (spacing, key order, escapes), less only
//! what the gateway must hide: the usage a client did not ask for, and `[DONE]`, which moves
//! after the gateway's closing comment.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use tollgate::sim::{
    Dialect, USAGE_HUGE, USAGE_MALFORMED, USAGE_NEGATIVE, USAGE_OMITTED, USAGE_WRONG_TYPE,
};

const MODEL: &str = "sim-model";
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// One backend speaking `d`, priced at $1 in and $2 out per 1M tokens (1000 and 2000
/// nano-dollars a token), one request at a time as a small engine serves them.
async fn gateway(d: Dialect, backend_toml: &str, team_toml: &str) -> Gateway {
    let gw = Harness::new()
        .backend(
            Backend::sim("engine", MODEL)
                .price(1.0, 2.0)
                .dialect(d)
                .toml("max_concurrency = 1")
                .toml(backend_toml),
        )
        .team_toml("search", SEARCH_KEY, team_toml)
        .start()
        .await;
    gw.sim("engine")
        .knobs
        .record_streams
        .store(true, Ordering::Relaxed);
    gw
}

fn chat_body(stream: bool, include_usage: bool) -> String {
    let mut v: Value = serde_json::from_str(&chat(MODEL, stream)).unwrap();
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v.to_string()
}

fn completion_body(stream: bool, include_usage: bool) -> String {
    let mut v = json!({"model": MODEL, "prompt": "Say what a gateway meters:", "stream": stream});
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v.to_string()
}

/// A request's ledger record.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    prompt: u64,
    completion: u64,
    source: String,
    status: String,
    cost_nusd: i64,
}

/// What one request cost, as the gateway recorded it and as the engine counted it.
struct Exchange {
    reply: Reply,
    row: Row,
    /// The engine's own prompt and completion counts of this request.
    engine: (u64, u64),
    /// Every byte the engine sent (streams only).
    engine_bytes: Option<bytes::Bytes>,
}

async fn exchange(gw: &Gateway, path: &str, body: String) -> Exchange {
    let stats = &gw.sim("engine").stats;
    let counts = || {
        (
            stats.prompt_tokens.load(Ordering::Relaxed),
            stats.tokens_generated.load(Ordering::Relaxed),
        )
    };
    let before = counts();
    *stats.last_stream.lock().unwrap() = None;
    let reply = gw.post(path, SEARCH_KEY, body).await;
    let after = counts();
    let id = reply.headers["x-tollgate-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let rows = gw.ledger(
        &format!(
            "SELECT prompt_tokens, completion_tokens, token_source, status, cost_nusd
             FROM requests WHERE id = '{id}'"
        ),
        |r| {
            Ok(Row {
                prompt: r.get::<_, i64>(0)? as u64,
                completion: r.get::<_, i64>(1)? as u64,
                source: r.get(2)?,
                status: r.get(3)?,
                cost_nusd: r.get(4)?,
            })
        },
    );
    assert_eq!(rows.len(), 1, "one record for {id}: {}", reply.text());
    Exchange {
        row: rows[0].clone(),
        engine: (after.0 - before.0, after.1 - before.1),
        engine_bytes: stats.last_stream.lock().unwrap().clone(),
        reply,
    }
}

impl Exchange {
    /// The record is the engine's own count, from `source`, priced at the list price.
    fn assert_exact(&self, source: &str, what: &str) {
        let r = &self.row;
        assert_eq!(
            (r.prompt, r.completion, r.source.as_str(), r.status.as_str()),
            (self.engine.0, self.engine.1, source, "ok"),
            "{what}: the ledger against the engine's own counts"
        );
        assert!(r.completion > 0, "{what}");
        assert_eq!(
            r.cost_nusd,
            (r.prompt * 1000 + r.completion * 2000) as i64,
            "{what}"
        );
    }

    fn engine_bytes(&self) -> &[u8] {
        self.engine_bytes.as_deref().expect("a recorded stream")
    }
}

/// SSE events (`data:` or comment), without their blank line.
fn events(body: &[u8]) -> Vec<&str> {
    std::str::from_utf8(body)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect()
}

fn data(event: &str) -> Option<Value> {
    let d = event.strip_prefix("data: ")?;
    (d != "[DONE]").then(|| serde_json::from_str(d).unwrap())
}

/// The events that carry counts (not `null`, not Ollama's zero placeholders).
fn usage_chunks(body: &[u8]) -> Vec<Value> {
    events(body)
        .into_iter()
        .filter_map(data)
        .filter_map(|v| v.get("usage").cloned())
        .filter(|u| u.is_object() && u["prompt_tokens"].as_u64().unwrap_or(1) > 0)
        .collect()
}

/// Holds the client's stream against the engine's bytes: each engine event reached the client
/// unchanged, or, where the gateway had to `hide` usage the client did not ask for, without
/// its `usage` (and usage-only chunks not at all). Returns the gateway's own ending: its usage
/// chunk if it made one, the closing comment, `[DONE]`.
fn assert_as_engine_wrote<'a>(client: &'a [u8], engine: &[u8], hide: bool) -> Vec<&'a str> {
    let client = events(client);
    let mut engine = events(engine);
    assert_eq!(
        engine.pop(),
        Some("data: [DONE]"),
        "the engine ended with [DONE]"
    );
    let mut at = 0;
    for e in engine {
        let v = data(e).expect("engine events are JSON");
        match v.get("usage") {
            Some(u) if hide && !u.is_null() && v["choices"] == json!([]) => continue,
            Some(_) if hide => {
                let mut want = v.clone();
                want.as_object_mut().unwrap().remove("usage");
                assert_eq!(data(client[at]), Some(want), "{e}");
                assert!(!client[at].contains("\"usage\""), "{}", client[at]);
            }
            _ => assert_eq!(client[at], e, "passed through as the engine wrote it"),
        }
        at += 1;
    }
    let ending = client[at..].to_vec();
    assert_eq!(ending.last(), Some(&"data: [DONE]"), "{ending:?}");
    assert!(
        ending[ending.len() - 2].starts_with(": tollgate "),
        "{ending:?}"
    );
    ending
}

/// How the gateway gets a stream's counts from this engine when it may ask for usage.
fn stream_source(d: Dialect) -> &'static str {
    match d {
        // Never sends usage on streams: counted with its tokenize endpoint and the template
        // overhead it learned from a JSON answer.
        Dialect::LlamaCppPython => "engine",
        _ => "upstream",
    }
}

#[tokio::test]
async fn every_dialect_is_metered_as_its_engine_counts() {
    for d in Dialect::ALL {
        let gw = gateway(d, "", "").await;
        let what = |kind: &str| format!("{d} {kind}");

        // A JSON answer: its usage is the bill (and teaches llama-cpp-python's template).
        let x = exchange(&gw, CHAT, chat_body(false, false)).await;
        assert_eq!(x.reply.status, 200, "{}", x.reply.text());
        x.assert_exact("upstream", &what("json chat"));
        assert_eq!(
            x.reply.headers["x-tollgate-completion-tokens"],
            x.engine.1.to_string()
        );
        if d == Dialect::Ollama {
            assert!(
                x.reply
                    .text()
                    .contains(r#" \u0026 prices \u003ceach\u003e"#),
                "Go's escapes kept: {}",
                x.reply.text()
            );
        }

        // A stream whose client did not ask for usage: the gateway did, and hides it.
        let x = exchange(&gw, CHAT, chat_body(true, false)).await;
        x.assert_exact(stream_source(d), &what("chat stream"));
        let ending = assert_as_engine_wrote(&x.reply.body, x.engine_bytes(), true);
        assert_eq!(ending.len(), 2, "{ending:?}");
        assert!(usage_chunks(&x.reply.body).is_empty());
        assert!(
            !x.reply.text().contains("\"usage\""),
            "{d}: {}",
            x.reply.text()
        );
        let c = x.reply.closing_comment();
        assert_eq!(
            (c["prompt_tokens"].as_u64(), c["completion_tokens"].as_u64()),
            (Some(x.row.prompt), Some(x.row.completion))
        );
        if d == Dialect::LlamaCppPython {
            let text = x.reply.text();
            assert!(
                text.contains(r#"{"content": " t\u00f6k\u00e9n"}"#),
                "Python's spacing and escapes kept: {text}"
            );
        }

        // A client that asked for usage gets exactly one usage chunk: the engine's, or the
        // gateway's when the engine sends none.
        let x = exchange(&gw, CHAT, chat_body(true, true)).await;
        x.assert_exact(stream_source(d), &what("chat stream with usage"));
        let ending = assert_as_engine_wrote(&x.reply.body, x.engine_bytes(), false);
        let chunks = usage_chunks(&x.reply.body);
        assert_eq!(chunks.len(), 1, "{d}: {}", x.reply.text());
        assert_eq!(
            (
                chunks[0]["prompt_tokens"].as_u64(),
                chunks[0]["completion_tokens"].as_u64()
            ),
            (Some(x.row.prompt), Some(x.row.completion)),
            "{d}"
        );
        let gateways = x.row.source != "upstream";
        assert_eq!(ending.len(), 2 + gateways as usize, "{ending:?}");
        assert_eq!(
            x.reply.closing_comment().get("usage_chunk"),
            gateways.then(|| json!("gateway")).as_ref(),
            "{d}"
        );

        // Completions, streamed with and without usage asked, and whole.
        for include_usage in [false, true] {
            let x = exchange(&gw, COMPLETIONS, completion_body(true, include_usage)).await;
            let kind = format!("completion stream, include_usage {include_usage}");
            x.assert_exact(stream_source(d), &what(&kind));
            assert_as_engine_wrote(&x.reply.body, x.engine_bytes(), !include_usage);
            assert_eq!(
                usage_chunks(&x.reply.body).len(),
                include_usage as usize,
                "{d} {kind}: {}",
                x.reply.text()
            );
        }
        let x = exchange(&gw, COMPLETIONS, completion_body(false, false)).await;
        x.assert_exact("upstream", &what("json completion"));
        gw.shutdown().await;
    }
}

/// How the gateway counts a stream the engine sends no usage for (the backend says
/// `stream_usage = false`, so the gateway does not ask).
fn unasked_source(d: Dialect, path: &str) -> &'static str {
    match (d, path) {
        (Dialect::Vllm | Dialect::Sglang | Dialect::LlamaCppPython, _) => "engine",
        (Dialect::Tgi, CHAT) => "engine",
        // Usage on completion streams anyway; llama.cpp's `timings` on every stream.
        (Dialect::Tgi | Dialect::LlamaCpp | Dialect::Mistral, _) => "upstream",
        (Dialect::Ollama | Dialect::OpenAi, _) => "local",
    }
}

#[tokio::test]
async fn without_usage_the_gateway_counts_as_the_engine_does() {
    for d in Dialect::ALL {
        let gw = gateway(d, "stream_usage = false", "").await;
        // llama-cpp-python learns its template's overhead from one JSON answer.
        exchange(&gw, CHAT, chat_body(false, false))
            .await
            .assert_exact("upstream", &format!("{d} json"));
        for (path, body) in [
            (CHAT, chat_body(true, false)),
            (COMPLETIONS, completion_body(true, false)),
        ] {
            let what = format!("{d} {path} stream, no usage asked");
            let x = exchange(&gw, path, body).await;
            let sent: Value = gw.last_sent("engine");
            assert!(sent.get("stream_options").is_none(), "{what}: not asked");
            match unasked_source(d, path) {
                "local" => {
                    assert_eq!(x.row.source, "local", "{what}");
                    assert!(x.row.completion > 0 && x.row.cost_nusd > 0, "{what}");
                }
                source => x.assert_exact(source, &what),
            }
            // Usage an engine volunteers is hidden from a client that did not ask for it;
            // llama.cpp's `timings` are not usage and stay.
            assert_as_engine_wrote(&x.reply.body, x.engine_bytes(), true);
            assert!(usage_chunks(&x.reply.body).is_empty(), "{what}");
            assert!(
                !x.reply.text().contains("\"usage\""),
                "{what}: {}",
                x.reply.text()
            );
            if d == Dialect::LlamaCpp {
                assert!(x.reply.text().contains("\"timings\":{"), "{what}");
            }
        }
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn json_answers_without_usage_are_counted_with_the_engines_endpoints() {
    for d in Dialect::ALL {
        let gw = gateway(d, "", "").await;
        // Taught with usage first (llama-cpp-python learns from it; the others need not).
        exchange(&gw, CHAT, chat_body(false, false)).await;
        gw.sim("engine")
            .knobs
            .usage_mode
            .store(USAGE_OMITTED, Ordering::Relaxed);
        let before = gw
            .sim("engine")
            .stats
            .tokenize_requests
            .load(Ordering::Relaxed);
        for (path, body) in [
            (CHAT, chat_body(false, false)),
            (COMPLETIONS, completion_body(false, false)),
        ] {
            let what = format!("{d} {path} json without usage");
            let x = exchange(&gw, path, body).await;
            assert_eq!(x.reply.status, 200, "{what}");
            assert!(!x.reply.text().contains("\"usage\""), "{what}");
            match d {
                Dialect::Ollama | Dialect::OpenAi | Dialect::Mistral => {
                    assert_eq!(x.row.source, "local", "{what}");
                    assert!(x.row.completion > 0 && x.row.cost_nusd > 0, "{what}");
                }
                _ => x.assert_exact("engine", &what),
            }
        }
        let asked = gw
            .sim("engine")
            .stats
            .tokenize_requests
            .load(Ordering::Relaxed)
            - before;
        assert_eq!(
            asked > 0,
            d.spec().tokenize != tollgate::sim::dialect::Tokenize::None,
            "{d}: {asked} tokenize calls"
        );
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn continuous_usage_is_cumulative_and_hidden_when_not_asked() {
    for d in [Dialect::Vllm, Dialect::Sglang] {
        let gw = gateway(d, "", "").await;
        let mut body: Value = serde_json::from_str(&chat_body(true, true)).unwrap();
        body["stream_options"]["continuous_usage_stats"] = json!(true);
        let x = exchange(&gw, CHAT, body.to_string()).await;
        x.assert_exact("upstream", &format!("{d} continuous"));
        let chunks = usage_chunks(&x.reply.body);
        let completions: Vec<u64> = chunks
            .iter()
            .map(|u| u["completion_tokens"].as_u64().unwrap())
            .collect();
        let n = x.engine.1;
        let mut want: Vec<u64> = (1..=n).collect();
        want.push(n);
        assert_eq!(completions, want, "{d}: running totals, then the final");
        assert_as_engine_wrote(&x.reply.body, x.engine_bytes(), false);

        // SGLang sends continuous usage without `include_usage`: the gateway asks for the
        // totals and hides every usage from a client that asked for none of it.
        body["stream_options"] = json!({"continuous_usage_stats": true});
        let x = exchange(&gw, CHAT, body.to_string()).await;
        x.assert_exact("upstream", &format!("{d} continuous, not asked"));
        assert_as_engine_wrote(&x.reply.body, x.engine_bytes(), true);
        assert!(!x.reply.text().contains("\"usage\""), "{}", x.reply.text());
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn the_request_id_sent_upstream_is_one_a_strict_engine_accepts() {
    let gw = gateway(Dialect::LlamaCppPython, "", "").await;
    for stream in [false, true] {
        let mut req = gw.request(CHAT, SEARCH_KEY, chat_body(stream, false));
        req.headers_mut()
            .insert("x-request-id", "client-chosen-id".parse().unwrap());
        let r = gw.send(req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let sent = gw
            .sim("engine")
            .stats
            .last_headers
            .lock()
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!(
            sent["x-request-id"], r.headers["x-tollgate-request-id"],
            "the gateway's own id went upstream"
        );
    }
    // The engine really is strict: anything but a UUID is a 400 with an empty body.
    let direct = http::Request::post(format!("{}{CHAT}", gw.sim("engine").url()))
        .header("content-type", "application/json")
        .header("x-request-id", "req_0123456789abcdef0123")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat_body(
            false, false,
        ))))
        .unwrap();
    let r = gw.send(direct).await;
    assert_eq!((r.status.as_u16(), r.body.len()), (400, 0));
}

#[tokio::test]
async fn tgi_never_gets_a_null_stream_options_from_the_gateway() {
    let gw = gateway(Dialect::Tgi, "", "").await;
    let mut body: Value = serde_json::from_str(&chat_body(true, false)).unwrap();
    body["stream_options"] = Value::Null;
    let x = exchange(&gw, CHAT, body.to_string()).await;
    assert_eq!(x.reply.status, 200, "{}", x.reply.text());
    x.assert_exact("upstream", "tgi");
}

#[tokio::test]
async fn a_malformed_event_mid_stream_ends_in_an_error_event_and_a_counted_record() {
    for d in Dialect::ALL {
        let gw = gateway(d, "", "").await;
        exchange(&gw, CHAT, chat_body(false, false)).await;
        gw.sim("engine")
            .knobs
            .malformed_at_token
            .store(4, Ordering::Relaxed);
        for include_usage in [false, true] {
            let what = format!("{d} malformed 4th event, include_usage {include_usage}");
            let x = exchange(&gw, CHAT, chat_body(true, include_usage)).await;
            assert_eq!(x.reply.status, 200, "{what}");
            let text = x.reply.text();
            let last = x.reply.events().pop().unwrap();
            let error: Value = serde_json::from_str(&last).unwrap();
            assert!(error["error"]["message"].is_string(), "{what}: {text}");
            assert!(!text.contains("[DONE]"), "{what}: {text}");
            let r = &x.row;
            assert_eq!(r.status, "upstream_broken", "{what}");
            assert!(r.prompt > 0 && r.cost_nusd > 0, "{what}: {r:?}");
            // What the client got before the broken event: three tokens.
            match r.source.as_str() {
                "engine" => assert_eq!((r.prompt, r.completion), (x.engine.0, 3), "{what}"),
                source => {
                    assert_eq!(source, "local", "{what}");
                    assert!(r.completion > 0, "{what}: {r:?}");
                }
            }
        }
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn a_bad_usage_is_counted_never_trusted() {
    for d in Dialect::ALL {
        // A budget, so settling the bill is exercised too.
        let gw = gateway(d, "", "budgets = [{ window = \"day\", usd = 1000.0 }]").await;
        exchange(&gw, CHAT, chat_body(false, false)).await;
        for mode in [
            USAGE_MALFORMED,
            USAGE_NEGATIVE,
            USAGE_WRONG_TYPE,
            USAGE_HUGE,
        ] {
            gw.sim("engine")
                .knobs
                .usage_mode
                .store(mode, Ordering::Relaxed);
            for (path, body) in [
                (CHAT, chat_body(false, false)),
                (CHAT, chat_body(true, true)),
                (COMPLETIONS, completion_body(true, true)),
            ] {
                let what = format!("{d} usage mode {mode}: {body}");
                let x = exchange(&gw, path, body).await;
                assert_eq!(x.reply.status, 200, "{what}: {}", x.reply.text());
                let r = &x.row;
                assert_eq!(r.status, "ok", "{what}");
                assert!(
                    r.completion > 0 && r.prompt > 0 && r.cost_nusd > 0,
                    "{what}: {r:?}"
                );
                assert!(r.prompt < 1 << 32, "{what}: {r:?}");
                match (d, r.source.as_str()) {
                    // llama.cpp's own `timings` are still good.
                    (Dialect::LlamaCpp, "upstream") => x.assert_exact("upstream", &what),
                    (_, "engine") => x.assert_exact("engine", &what),
                    (_, source) => assert_eq!(source, "local", "{what}"),
                }
                if x.engine_bytes.is_some() {
                    // The last usage the client reads is the gateway's, the ledger's.
                    let last = usage_chunks(&x.reply.body).pop();
                    assert_eq!(
                        last.map(|u| (
                            u["prompt_tokens"].as_u64(),
                            u["completion_tokens"].as_u64()
                        )),
                        Some((Some(r.prompt), Some(r.completion))),
                        "{what}: {}",
                        x.reply.text()
                    );
                }
            }
        }
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn llama_cpp_python_template_overhead_is_learned_then_extrapolated() {
    let gw = gateway(Dialect::LlamaCppPython, "", "").await;
    let turns = |n: usize, system: bool, stream: bool| {
        let mut messages: Vec<Value> = (0..n)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                json!({"role": role, "content": format!("turn {i} of a long chat")})
            })
            .collect();
        if system {
            messages.insert(0, json!({"role": "system", "content": "Be brief."}));
        }
        json!({"model": MODEL, "messages": messages, "stream": stream}).to_string()
    };
    // Two shapes without a system message teach the base and the step a message adds.
    for n in [1, 3] {
        exchange(&gw, CHAT, turns(n, false, false))
            .await
            .assert_exact("upstream", &format!("json, {n} messages"));
    }
    exchange(&gw, CHAT, turns(5, false, true))
        .await
        .assert_exact("engine", "stream of 5 messages, extrapolated");
    // With a system message first (no default one) nothing is known yet: the prompt is
    // counted locally, the completion still by the engine.
    let x = exchange(&gw, CHAT, turns(3, true, true)).await;
    assert_eq!(
        (x.row.source.as_str(), x.row.completion),
        ("local", x.engine.1)
    );
    exchange(&gw, CHAT, turns(1, true, false))
        .await
        .assert_exact("upstream", "json with a system message");
    exchange(&gw, CHAT, turns(3, true, true))
        .await
        .assert_exact("engine", "its own base, the step learned without one");
}
