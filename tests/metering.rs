//! Every request counted, priced, tagged and in the ledger; the figures agree everywhere a
//! user can read them: the simulator's usage, the response headers, the stream's closing
//! comment, the ledger, and the report.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tollgate::sim::{USAGE_MALFORMED, USAGE_OMITTED};

const SUPPORT_KEY: &str = "tg-test-support";

/// gpt-4o list prices: $2.50 in, $10.00 out per 1M tokens.
fn priced() -> Backend {
    Backend::sim("gpt", "gpt-4o")
        .alias("chat-large")
        .price(2.5, 10.0)
}

fn two_teams(b: Backend) -> Harness {
    Harness::new()
        .backend(b)
        .team_toml(
            "search",
            SEARCH_KEY,
            "tags = { department = \"rnd\" }\nrequest_tags = [\"project\", \"env\"]",
        )
        .team_toml("support", SUPPORT_KEY, "request_tags = [\"project\"]")
}

fn tagged(
    gw: &Gateway,
    key: &str,
    project: &str,
    body: String,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = gw.request("/v1/chat/completions", key, body);
    req.headers_mut().insert(
        "x-tollgate-tags",
        format!("project={project}").parse().unwrap(),
    );
    req
}

/// The `: tollgate {…}` comment that ends a stream.
fn closing_comment(events_text: &str) -> serde_json::Value {
    let line = events_text
        .lines()
        .find_map(|l| l.strip_prefix(": tollgate "))
        .expect("closing comment");
    serde_json::from_str(line).unwrap()
}

fn nanos(usd: &str) -> i64 {
    let (whole, frac) = usd.split_once('.').unwrap();
    whole.parse::<i64>().unwrap() * 1_000_000_000
        + format!("{frac:0<9}")[..9].parse::<i64>().unwrap()
}

#[tokio::test]
async fn headers_stream_comments_ledger_and_report_agree_to_the_cent() {
    let gw = two_teams(priced()).start().await;
    let mut seen_cost = 0i64;
    let (mut seen_prompt, mut seen_completion) = (0u64, 0u64);
    let mut by_team: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..12 {
        let (team, key) = if i % 2 == 0 {
            ("search", SEARCH_KEY)
        } else {
            ("support", SUPPORT_KEY)
        };
        let project = ["alpha", "beta", "gamma"][i % 3];
        let stream = i % 4 >= 2;
        let mut body: serde_json::Value =
            serde_json::from_str(&chat("chat-large", stream)).unwrap();
        body["max_tokens"] = (5 + i).into();
        if stream && i % 8 == 2 {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let r = gw.send(tagged(&gw, key, project, body.to_string())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let (cost, prompt, completion) = if stream {
            let c = closing_comment(&r.text());
            assert_eq!(
                r.events().last().unwrap(),
                "[DONE]",
                "[DONE] still ends the stream"
            );
            (
                nanos(&c["cost_usd"].to_string()),
                c["prompt_tokens"].as_u64().unwrap(),
                c["completion_tokens"].as_u64().unwrap(),
            )
        } else {
            let h = |n: &str| r.headers[n].to_str().unwrap().to_string();
            let v = r.json();
            assert_eq!(
                h("x-tollgate-prompt-tokens"),
                v["usage"]["prompt_tokens"].to_string(),
                "header = upstream usage"
            );
            (
                nanos(&h("x-tollgate-cost-usd")),
                h("x-tollgate-prompt-tokens").parse().unwrap(),
                h("x-tollgate-completion-tokens").parse().unwrap(),
            )
        };
        assert_eq!(completion, 5 + i as u64);
        // The cost is the list price applied to the counts, to the nano-dollar.
        assert_eq!(
            cost,
            (prompt as f64 * 2500.0 + completion as f64 * 10_000.0).round() as i64
        );
        seen_cost += cost;
        seen_prompt += prompt;
        seen_completion += completion;
        *by_team.entry(team.to_string()).or_default() += cost;
    }
    let sim = &gw.sim("gpt").stats;
    assert_eq!(
        seen_prompt,
        sim.prompt_tokens.load(Ordering::Relaxed),
        "the simulator's usage"
    );
    assert_eq!(
        seen_completion,
        sim.tokens_generated.load(Ordering::Relaxed)
    );

    let ledger: Vec<(i64, i64, i64, String, String)> = gw.ledger(
        "SELECT prompt_tokens, completion_tokens, cost_nusd, token_source, tags FROM requests",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    );
    assert_eq!(ledger.len(), 12);
    assert_eq!(ledger.iter().map(|l| l.2).sum::<i64>(), seen_cost);
    assert_eq!(ledger.iter().map(|l| l.0).sum::<i64>() as u64, seen_prompt);
    assert!(ledger.iter().all(|l| l.3 == "upstream"));
    assert!(
        ledger
            .iter()
            .any(|l| l.4 == r#"{"department":"rnd","project":"gamma"}"#),
        "{:?}",
        ledger[0].4
    );

    let report = gw.admin_get("/admin/usage?group_by=team,project").await;
    assert_eq!(report.status, 200, "{}", report.text());
    let rows = report.json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 6, "2 teams x 3 projects: {rows:?}");
    for team in ["search", "support"] {
        let sum: i64 = rows
            .iter()
            .filter(|r| r["team"] == team)
            .map(|r| nanos(&r["cost_usd"].to_string()))
            .sum();
        assert_eq!(sum, by_team[team], "{team}");
    }
    assert_eq!(
        rows.iter()
            .map(|r| r["requests"].as_u64().unwrap())
            .sum::<u64>(),
        12
    );
}

#[tokio::test]
async fn a_client_that_did_not_ask_for_stream_usage_sees_none_but_it_is_metered() {
    let gw = two_teams(priced()).start().await;
    let r = gw
        .post("/v1/chat/completions", SEARCH_KEY, chat("chat-large", true))
        .await;
    let text = r.text();
    assert!(
        !text.contains("\"usage\""),
        "usage leaked to a client that did not ask:\n{text}"
    );
    let sent: serde_json::Value = gw.last_sent("gpt");
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "the gateway asked upstream"
    );
    assert_eq!(closing_comment(&text)["token_source"], "upstream");
}

#[tokio::test]
async fn missing_or_malformed_usage_falls_back_to_local_counts() {
    let gw = two_teams(priced()).start().await;
    for mode in [USAGE_OMITTED, USAGE_MALFORMED] {
        gw.sim("gpt")
            .knobs
            .usage_mode
            .store(mode, Ordering::Relaxed);
        let r = gw
            .post(
                "/v1/chat/completions",
                SEARCH_KEY,
                chat("chat-large", false),
            )
            .await;
        assert_eq!(r.status, 200, "a bad usage never fails the request");
        assert_eq!(r.headers["x-tollgate-token-source"], "local");
        let prompt: u64 = r.headers["x-tollgate-prompt-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // system + user message under o200k: 3 + (3+1+3) + (3+1+6) = 20 tokens.
        assert_eq!(prompt, 20);
        assert_eq!(
            r.headers["x-tollgate-completion-tokens"], "16",
            "16 generated words, one token each"
        );
        assert!(
            nanos(r.headers["x-tollgate-cost-usd"].to_str().unwrap()) > 0,
            "priced, so never 0"
        );

        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, chat("chat-large", true))
            .await;
        let c = closing_comment(&r.text());
        assert_eq!(c["token_source"], "local");
        assert_eq!(c["completion_tokens"], 16);
    }
}

#[tokio::test]
async fn bad_tags_are_400_naming_the_key() {
    let gw = two_teams(priced()).start().await;
    let mut req = gw.request(
        "/v1/chat/completions",
        SUPPORT_KEY,
        chat("chat-large", false),
    );
    req.headers_mut()
        .insert("x-tollgate-tags", "project=a,env=prod".parse().unwrap());
    let e = gw.send(req).await.error(400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("`env` is not allowed for team `support`"),
        "{e}"
    );
    let mut req = gw.request(
        "/v1/chat/completions",
        SEARCH_KEY,
        chat("chat-large", false),
    );
    req.headers_mut()
        .insert("x-tollgate-tags", "project".parse().unwrap());
    assert_eq!(gw.send(req).await.error(400)["param"], "x-tollgate-tags");
    let body = r#"{"model":"chat-large","messages":[{"role":"user","content":"hi"}],"metadata":{"owner":"x"}}"#;
    let e = gw
        .post("/v1/chat/completions", SEARCH_KEY, body)
        .await
        .error(400);
    assert!(e["message"].as_str().unwrap().contains("`owner`"), "{e}");
    assert_eq!(gw.sim("gpt").stats.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_upstream_refusal_is_recorded_with_its_prompt_tokens_and_no_cost() {
    let gw = two_teams(priced()).start().await;
    gw.sim("gpt")
        .knobs
        .fail_status
        .store(400, Ordering::Relaxed);
    gw.post(
        "/v1/chat/completions",
        SEARCH_KEY,
        chat("chat-large", false),
    )
    .await
    .error(400);
    let rows: Vec<(String, i64, i64, i64, String)> = gw.ledger(
        "SELECT status, http_status, prompt_tokens, cost_nusd, token_source FROM requests",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    );
    assert_eq!(
        rows,
        vec![("upstream_error".into(), 400, 20, 0, "local".into())]
    );
}

#[tokio::test]
async fn an_unpriced_model_is_served_flagged_and_never_priced_at_zero() {
    let gw = Harness::new()
        .backend(Backend::sim("mystery", "mystery-model-7b"))
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("mystery-model-7b", false),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        !r.headers.contains_key("x-tollgate-cost-usd"),
        "no price, no cost header"
    );
    assert!(r.headers.contains_key("x-tollgate-prompt-tokens"));
    let priced: Vec<bool> = gw.ledger("SELECT priced FROM requests", |r| r.get(0));
    assert_eq!(priced, vec![false]);
    let m = gw.admin_get("/metrics").await.text();
    assert!(
        m.lines()
            .any(|l| l.starts_with("tollgate_unpriced_requests_total{")
                && l.contains("mystery-model-7b")),
        "{m}"
    );
    let report = gw.admin_get("/admin/usage?group_by=model").await.json();
    assert_eq!(report[0]["unpriced_requests"], 1);
}

/// 15 ms between tokens: slow enough for a client to leave mid-stream.
const PACE: Duration = Duration::from_millis(15);

#[tokio::test]
async fn a_client_leaving_a_self_hosted_stream_cancels_it_and_is_billed_for_what_was_generated() {
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "llama-3.1-8b")
                .alias("chat-small")
                .price(0.2, 0.2)
                .paced(PACE, 200),
        )
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let resp = gw
        .open("/v1/chat/completions", SEARCH_KEY, chat("chat-small", true))
        .await;
    let mut body = resp.into_body();
    let mut content_events = 0;
    while content_events < 5 {
        let f = body.frame().await.unwrap().unwrap().into_data().unwrap();
        content_events += String::from_utf8_lossy(&f)
            .matches("\"content\":\"")
            .count();
    }
    drop(body);
    gw.wait_ledger_rows("SELECT 1 FROM requests WHERE status = 'client_closed'", 1)
        .await;
    let (completion, source, cost): (i64, String, i64) = gw
        .ledger(
            "SELECT completion_tokens, token_source, cost_nusd FROM requests",
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .remove(0);
    assert_eq!(
        source, "local",
        "no usage arrived; counted from what was streamed"
    );
    assert!(
        (4..60).contains(&completion),
        "billed for what was generated: {completion}"
    );
    assert!(cost > 0);
    assert_eq!(
        gw.sim("llama")
            .stats
            .streams_cancelled
            .load(Ordering::Relaxed),
        1,
        "the upstream was cancelled"
    );
}

#[tokio::test]
async fn a_client_leaving_a_commercial_stream_is_drained_for_the_providers_usage() {
    let gw = Harness::new()
        .backend(priced().toml("on_disconnect = \"drain\"").paced(PACE, 40))
        .team("search", SEARCH_KEY)
        .start()
        .await;
    let resp = gw
        .open("/v1/chat/completions", SEARCH_KEY, chat("chat-large", true))
        .await;
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    gw.wait_ledger_rows("SELECT 1 FROM requests WHERE status = 'client_closed'", 1)
        .await;
    let (completion, source): (i64, String) = gw
        .ledger(
            "SELECT completion_tokens, token_source FROM requests",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .remove(0);
    assert_eq!(
        (completion, source.as_str()),
        (40, "upstream"),
        "the provider's own count of the whole answer"
    );
    let sim = &gw.sim("gpt").stats;
    assert_eq!(sim.streams_completed.load(Ordering::Relaxed), 1);
    assert_eq!(sim.streams_cancelled.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_ledger_that_cannot_be_written_refuses_billable_requests_then_recovers() {
    let gw = two_teams(priced()).start().await;
    assert_eq!(
        gw.post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-large", false)
        )
        .await
        .status,
        200
    );
    // Loaded, so the ledger thread is idle and healthy when the directory goes.
    assert_eq!(gw.ledger("SELECT id FROM requests", |_| Ok(())).len(), 1);
    // The ledger's directory becomes a plain file: nothing can be written there. Records
    // go to the journal (already open, so still mapped) until the ledger thread's next commit
    // fails; from then on billable requests are refused.
    let dir = gw.ledger_path().parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"not a directory").unwrap();
    let mut answered = Vec::new();
    let mut refused = false;
    for _ in 0..100 {
        let r = gw
            .post(
                "/v1/chat/completions",
                SEARCH_KEY,
                chat("chat-large", false),
            )
            .await;
        if r.status == 200 {
            answered.push(
                r.headers["x-tollgate-request-id"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        assert_eq!(r.error(503)["code"], "ledger_unavailable");
        refused = true;
        break;
    }
    assert!(
        refused,
        "billable requests were still served after 100 tries"
    );
    assert!(
        !answered.is_empty(),
        "the first request after the directory went was admitted while the ledger was healthy"
    );
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-large", false),
        )
        .await;
    assert_eq!(
        r.error(503)["code"],
        "ledger_unavailable",
        "refused up front while unhealthy"
    );
    let m = gw.admin_get("/metrics").await.text();
    assert!(m.contains("tollgate_ledger_errors_total"), "loud: counted");

    std::fs::remove_file(&dir).unwrap();
    let mut recovered = false;
    for _ in 0..100 {
        if gw
            .post(
                "/v1/chat/completions",
                SEARCH_KEY,
                chat("chat-large", false),
            )
            .await
            .status
            == 200
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the ledger did not recover");
    // What was answered while the ledger could not be written is in it now.
    let ids = gw.ledger("SELECT id FROM requests", |r| r.get::<_, String>(0));
    for id in &answered {
        assert!(
            ids.contains(id),
            "{id} was answered 200 but has no record: {ids:?}"
        );
    }
}

#[tokio::test]
async fn refused_requests_are_recorded_at_no_cost() {
    let gw = two_teams(priced()).start().await;
    gw.post(
        "/v1/chat/completions",
        SEARCH_KEY,
        chat("no-such-model", false),
    )
    .await
    .error(404);
    gw.post("/v1/chat/completions", SEARCH_KEY, "{oops")
        .await
        .error(400);
    gw.post(
        "/v1/chat/completions",
        "tg-unknown",
        chat("chat-large", false),
    )
    .await
    .error(401);
    gw.wait_ledger_rows("SELECT 1 FROM requests", 2).await;
    let rows: Vec<(String, i64, String, i64, Option<i64>)> = gw.ledger(
        "SELECT status, http_status, requested_model, cost_nusd, prompt_tokens FROM requests ORDER BY http_status",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    );
    // The 401 has no team to attribute it to: metrics count it, the ledger does not.
    assert_eq!(
        rows,
        vec![
            ("rejected".into(), 400, "".into(), 0, None),
            ("rejected".into(), 404, "no-such-model".into(), 0, None)
        ]
    );
}

/// Nano-dollars of a `usage` object, in either protocol's shape, at claude-sonnet-4-5's prices
/// as configured below ($3 in, $15 out, $0.30 cache reads, $3.75 5-minute and $6 1-hour
/// writes per 1M) or gpt-4o's ($2.50 in, $10 out).
fn expected_nusd(backend: &str, u: &serde_json::Value) -> i64 {
    let n = |v: &serde_json::Value| v.as_i64().unwrap_or(0);
    if backend == "gpt" {
        let prompt = n(&u["prompt_tokens"]).max(n(&u["input_tokens"]));
        let completion = n(&u["completion_tokens"]).max(n(&u["output_tokens"]));
        return prompt * 2_500 + completion * 10_000;
    }
    let hour = n(&u["cache_creation"]["ephemeral_1h_input_tokens"]);
    let writes = n(&u["cache_creation_input_tokens"]);
    let reads =
        n(&u["cache_read_input_tokens"]).max(n(&u["prompt_tokens_details"]["cached_tokens"]));
    // Anthropic's input excludes the cache; OpenAI's prompt includes it.
    let uncached = match u.get("input_tokens") {
        Some(i) => n(i),
        None => n(&u["prompt_tokens"]) - reads - writes,
    };
    let output = n(&u["output_tokens"]).max(n(&u["completion_tokens"]));
    uncached * 3_000 + output * 15_000 + reads * 300 + (writes - hour) * 3_750 + hour * 6_000
}

/// What a client read of a request's usage, and what the gateway said it cost.
type ReadCost = dyn Fn(&Reply) -> (serde_json::Value, i64);

#[tokio::test]
async fn both_protocols_with_cache_reads_and_writes_agree_everywhere_to_the_nano_dollar() {
    const KEY: &str = "tg-test-mixed-cache";
    let gw = Harness::new()
        .backend(priced())
        .backend(claude_backend().model_toml(
            "cached_input_usd_per_mtok = 0.3, cache_write_usd_per_mtok = 3.75, \
             cache_write_1h_usd_per_mtok = 6.0",
        ))
        .team("mixed-cache", KEY)
        .start()
        .await;
    let five = "Five minutes of context about the gateway. ".repeat(40);
    let hour = "An hour of context about the ledger. ".repeat(40);
    let mut seen = 0i64;
    let mut requests = 0;
    for i in 0..24usize {
        let anthropic_client = i % 2 == 0;
        let model = if i % 3 == 2 { "chat-large" } else { "sonnet" };
        let backend = if model == "sonnet" { "claude" } else { "gpt" };
        let stream = i % 4 >= 2;
        let (req, usage_and_cost): (_, Box<ReadCost>) = if anthropic_client {
            let (text, ttl) = if i % 8 < 4 {
                (&five, "5m")
            } else {
                (&hour, "1h")
            };
            let body = serde_json::json!({
                "model": model, "max_tokens": 8 + i, "stream": stream,
                "system": [{"type": "text", "text": text,
                            "cache_control": {"type": "ephemeral", "ttl": ttl}}],
                "messages": [{"role": "user", "content": format!("Question {i}?")}],
            });
            let req = http::Request::post(gw.url("/v1/messages"))
                .header("x-api-key", KEY)
                .header("anthropic-version", "2023-06-01")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_string(),
                )))
                .unwrap();
            (
                req,
                Box::new(move |r: &Reply| {
                    if !stream {
                        let cost = nanos(r.headers["x-tollgate-cost-usd"].to_str().unwrap());
                        return (r.json()["usage"].clone(), cost);
                    }
                    let text = r.text();
                    let data = |name: &str| -> Vec<serde_json::Value> {
                        text.split("\n\n")
                            .filter(|e| e.starts_with(&format!("event: {name}\n")))
                            .map(|e| {
                                serde_json::from_str(e.split_once("data: ").unwrap().1).unwrap()
                            })
                            .collect()
                    };
                    // Input and cache figures come in message_start (from an Anthropic
                    // backend; an OpenAI one tells them only at the end), the rest in the
                    // last message_delta; the gateway's comment precedes message_stop.
                    let mut u = data("message_start")[0]["message"]["usage"].clone();
                    let last = data("message_delta").pop().unwrap();
                    for (k, v) in last["usage"].as_object().unwrap() {
                        u[k] = v.clone();
                    }
                    let comment = closing_comment(&text);
                    assert!(
                        text.find(": tollgate").unwrap()
                            < text.find("event: message_stop").unwrap()
                    );
                    (u, nanos(&comment["cost_usd"].to_string()))
                }),
            )
        } else {
            let mut body: serde_json::Value = serde_json::from_str(&chat(model, stream)).unwrap();
            body["max_tokens"] = (8 + i).into();
            if stream {
                body["stream_options"] = serde_json::json!({"include_usage": true});
            }
            (
                gw.request("/v1/chat/completions", KEY, body.to_string()),
                Box::new(move |r: &Reply| {
                    if !stream {
                        let cost = nanos(r.headers["x-tollgate-cost-usd"].to_str().unwrap());
                        return (r.json()["usage"].clone(), cost);
                    }
                    let usage = r
                        .events()
                        .iter()
                        .filter(|e| *e != "[DONE]")
                        .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
                        .rfind(|c| c["usage"].is_object())
                        .unwrap()["usage"]
                        .clone();
                    (
                        usage,
                        nanos(&closing_comment(&r.text())["cost_usd"].to_string()),
                    )
                }),
            )
        };
        let r = gw.send(req).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        let (usage, cost) = usage_and_cost(&r);
        assert_eq!(cost, expected_nusd(backend, &usage), "request {i}: {usage}");
        seen += cost;
        requests += 1;
    }

    let rows: Vec<(i64, i64, i64, i64)> = gw.ledger(
        "SELECT cost_nusd, cached_tokens, cache_write_tokens, cache_write_1h_tokens FROM requests",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    );
    assert_eq!(rows.len(), requests);
    assert_eq!(rows.iter().map(|r| r.0).sum::<i64>(), seen, "ledger");
    // The workload did read and write the cache, at both lifetimes.
    assert!(rows.iter().any(|r| r.1 > 0), "cache reads: {rows:?}");
    assert!(
        rows.iter().any(|r| r.2 > r.3 && r.3 == 0),
        "5-minute writes: {rows:?}"
    );
    assert!(rows.iter().any(|r| r.3 > 0), "1-hour writes: {rows:?}");

    let report = gw.admin_get("/admin/usage?group_by=team").await;
    let rows = report.json();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["team"] == "mixed-cache")
        .unwrap();
    assert_eq!(nanos(&row["cost_usd"].to_string()), seen, "report");

    let metrics = gw.admin_get("/metrics").await.text();
    let metered: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_cost_usd_total{") && l.contains("team=\"mixed-cache\""))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!((metered * 1e9).round() as i64, seen, "metrics");
}
