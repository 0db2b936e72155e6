use super::*;
use bytes::BytesMut;
use proptest::prelude::*;
use serde_json::json;
use std::path::{Path, PathBuf};

fn data_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/anthropic")
        .join(kind)
}

/// Every `.json` fixture of a folder, by name, sorted so failures come in a stable order.
fn json_fixtures(kind: &str) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(data_dir(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no fixtures in {kind}");
    out
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

fn value(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap()
}

fn goes(fixture: &Value, direction: &str) -> bool {
    let d = fixture["direction"].as_str().unwrap();
    d == "both" || d == direction
}

/// SSE text as (event name, data) pairs; an event without an `event:` line has the name "".
fn sse(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d.to_owned();
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (name, data)
        })
        .collect()
}

/// Frames as comparable values: JSON data parsed, `created` (the translator's clock) zeroed.
fn frames(text: &str) -> Vec<(String, Value)> {
    sse(text)
        .into_iter()
        .map(|(name, data)| {
            let mut v = serde_json::from_str(&data).unwrap_or(Value::String(data));
            if v.get("created").is_some() {
                v["created"] = 0.into();
            }
            (name, v)
        })
        .collect()
}

fn to_openai_stream(input: &[(String, String)]) -> Result<String, Untranslatable> {
    let mut t = StreamToOpenAi::new();
    let mut out = BytesMut::new();
    for (name, data) in input {
        t.event(name, data.as_bytes(), &mut out)?;
    }
    Ok(String::from_utf8(out.to_vec()).unwrap())
}

/// OpenAI `data:` payloads through [`StreamToAnthropic`], `[DONE]` calling `done`.
fn to_anthropic_stream(input: &[(String, String)]) -> Result<String, Untranslatable> {
    let model = input
        .iter()
        .find_map(|(_, d)| {
            serde_json::from_str::<Value>(d).ok()?["model"]
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let mut t = StreamToAnthropic::new(&model);
    let mut out = BytesMut::new();
    for (_, data) in input {
        if data == "[DONE]" {
            t.done(&mut out);
        } else {
            t.chunk(data.as_bytes(), &mut out)?;
        }
    }
    t.done(&mut out);
    Ok(String::from_utf8(out.to_vec()).unwrap())
}

/// What the official Anthropic SDK's stream accumulator needs: message_start first, block
/// indices contiguous from 0, deltas only to the open block and of its kind, every block
/// stopped before message_delta, message_stop last. Returns the accumulated message.
fn accumulate_anthropic(events: &[(String, Value)]) -> Value {
    let mut message = Value::Null;
    let mut open: Option<usize> = None;
    let mut json_buf = String::new();
    let mut stopped = false;
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(
            data["type"],
            name.as_str(),
            "event {i}: data.type matches the name"
        );
        assert!(!stopped, "event {i} after message_stop");
        match name.as_str() {
            "message_start" => {
                assert_eq!(i, 0, "message_start comes first");
                message = data["message"].clone();
                assert_eq!(message["content"], json!([]));
                assert!(message["usage"]["input_tokens"].is_u64());
            }
            "content_block_start" => {
                assert!(
                    open.is_none(),
                    "event {i}: a block starts while another is open"
                );
                let n = message["content"].as_array().unwrap().len();
                assert_eq!(data["index"], n, "event {i}: indices contiguous from 0");
                message["content"]
                    .as_array_mut()
                    .unwrap()
                    .push(data["content_block"].clone());
                open = Some(n);
                json_buf.clear();
            }
            "content_block_delta" => {
                let n = open.expect("a delta to an open block");
                assert_eq!(data["index"], n, "event {i}: delta to the open block");
                let block = &mut message["content"][n];
                match data["delta"]["type"].as_str().unwrap() {
                    "text_delta" => {
                        assert_eq!(block["type"], "text");
                        let text = format!(
                            "{}{}",
                            block["text"].as_str().unwrap(),
                            data["delta"]["text"].as_str().unwrap()
                        );
                        block["text"] = text.into();
                    }
                    "input_json_delta" => {
                        assert_eq!(block["type"], "tool_use");
                        json_buf.push_str(data["delta"]["partial_json"].as_str().unwrap());
                    }
                    other => panic!("unexpected delta {other}"),
                }
            }
            "content_block_stop" => {
                let n = open.take().expect("a stop for an open block");
                assert_eq!(data["index"], n);
                if message["content"][n]["type"] == "tool_use" && !json_buf.is_empty() {
                    message["content"][n]["input"] = serde_json::from_str(&json_buf).unwrap();
                }
            }
            "message_delta" => {
                assert!(
                    open.is_none(),
                    "event {i}: every block stopped before message_delta"
                );
                message["stop_reason"] = data["delta"]["stop_reason"].clone();
                assert!(data["usage"]["output_tokens"].is_u64());
                for (k, v) in data["usage"].as_object().unwrap() {
                    message["usage"][k] = v.clone();
                }
            }
            "message_stop" => stopped = true,
            "error" => {
                assert!(data["error"]["message"].is_string());
                stopped = true;
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert!(stopped, "the stream ends with message_stop or error");
    message
}

// === table-driven: recorded pairs ===

#[test]
fn requests_translate_as_recorded() {
    for (name, f) in json_fixtures("requests") {
        if goes(&f, "anthropic_to_openai") {
            let got = request_to_openai(&bytes(&f["anthropic"]))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(value(&got), f["openai"], "{name}: anthropic -> openai");
        }
        if goes(&f, "openai_to_anthropic") {
            let default = f["default_max_tokens"].as_u64().unwrap_or(1);
            let got = request_to_anthropic(&bytes(&f["openai"]), default)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(value(&got), f["anthropic"], "{name}: openai -> anthropic");
        }
    }
}

#[test]
fn answers_translate_as_recorded() {
    for (name, f) in json_fixtures("answers") {
        if goes(&f, "anthropic_to_openai") {
            let mut got = value(
                &answer_to_openai(&bytes(&f["anthropic"]))
                    .unwrap_or_else(|e| panic!("{name}: {e}")),
            );
            assert!(
                got["created"].as_i64().unwrap() > 1_700_000_000,
                "{name}: created is now"
            );
            got["created"] = 0.into();
            assert_eq!(got, f["openai"], "{name}: anthropic -> openai");
        }
        if goes(&f, "openai_to_anthropic") {
            let got =
                answer_to_anthropic(&bytes(&f["openai"])).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(value(&got), f["anthropic"], "{name}: openai -> anthropic");
        }
    }
}

#[test]
fn streams_translate_as_recorded() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data_dir("streams"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    let mut checked = 0;
    for dir in dirs {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if let (Some(input), Some(expected)) = (read("anthropic.sse"), read("to_openai.sse")) {
            let got = to_openai_stream(&sse(&input)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                frames(&got),
                frames(&expected),
                "{name}: anthropic -> openai"
            );
            checked += 1;
        }
        if let (Some(input), Some(expected)) = (read("openai.sse"), read("to_anthropic.sse")) {
            let got = to_anthropic_stream(&sse(&input)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got = frames(&got);
            assert_eq!(got, frames(&expected), "{name}: openai -> anthropic");
            accumulate_anthropic(&got);
            checked += 1;
        }
    }
    assert!(checked >= 8, "every stream fixture has its expected output");
}

// === round trips ===

/// An Anthropic request in the one form both directions agree on: string content as one text
/// block, system as one string, cache hints gone.
fn canonical_anthropic(mut req: Value) -> Value {
    fn strip_cache(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("cache_control");
                m.values_mut().for_each(strip_cache);
            }
            Value::Array(a) => a.iter_mut().for_each(strip_cache),
            _ => {}
        }
    }
    strip_cache(&mut req);
    if let Some(Value::Array(blocks)) = req.get("system") {
        let texts: Vec<&str> = blocks.iter().map(|b| b["text"].as_str().unwrap()).collect();
        req["system"] = texts.join("\n\n").into();
    }
    for m in req["messages"].as_array_mut().unwrap() {
        if let Value::String(s) = &m["content"] {
            m["content"] = json!([{ "type": "text", "text": s }]);
        }
    }
    req
}

#[test]
fn anthropic_requests_survive_a_round_trip() {
    for (name, f) in json_fixtures("requests") {
        if !goes(&f, "anthropic_to_openai") || name == "tool_result_error" {
            continue;
        }
        let a = &f["anthropic"];
        let there = request_to_openai(&bytes(a)).unwrap();
        let back = request_to_anthropic(&there, 1).unwrap();
        assert_eq!(
            canonical_anthropic(value(&back)),
            canonical_anthropic(a.clone()),
            "{name}"
        );
    }
}

#[test]
fn openai_requests_survive_a_round_trip() {
    for (name, f) in json_fixtures("requests") {
        if !goes(&f, "openai_to_anthropic") {
            continue;
        }
        let once = request_to_anthropic(&bytes(&f["openai"]), 4096).unwrap();
        let twice = request_to_anthropic(&request_to_openai(&once).unwrap(), 4096).unwrap();
        assert_eq!(
            canonical_anthropic(value(&twice)),
            canonical_anthropic(value(&once)),
            "{name}"
        );
    }
}

#[test]
fn answers_survive_a_round_trip() {
    for (name, f) in json_fixtures("answers") {
        if let Some(a) = f.get("anthropic").filter(|_| f["direction"] == "both") {
            let back = answer_to_anthropic(&answer_to_openai(&bytes(a)).unwrap()).unwrap();
            assert_eq!(value(&back), *a, "{name}");
        }
    }
}

#[test]
fn anthropic_streams_survive_a_round_trip() {
    for name in ["text", "tool_use"] {
        let input =
            std::fs::read_to_string(data_dir("streams").join(name).join("anthropic.sse")).unwrap();
        let original = accumulate_anthropic(
            &frames(&input)
                .into_iter()
                .filter(|(n, _)| n != "ping")
                .collect::<Vec<_>>(),
        );
        let openai = to_openai_stream(&sse(&input)).unwrap();
        let back = accumulate_anthropic(&frames(&to_anthropic_stream(&sse(&openai)).unwrap()));
        assert_eq!(back["content"], original["content"], "{name}");
        assert_eq!(back["stop_reason"], original["stop_reason"], "{name}");
        assert_eq!(
            back["usage"]["output_tokens"], original["usage"]["output_tokens"],
            "{name}"
        );
        assert_eq!(
            back["usage"]["input_tokens"], original["usage"]["input_tokens"],
            "{name}"
        );
    }
}

// === refusals name their parameter ===

fn anthropic_req(extra: Value) -> Vec<u8> {
    let mut req = json!({ "model": "m", "max_tokens": 10, "messages": [{ "role": "user", "content": "hi" }] });
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    bytes(&req)
}

fn openai_req(extra: Value) -> Vec<u8> {
    let mut req = json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }] });
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    bytes(&req)
}

fn user(content: Value) -> Value {
    json!({ "messages": [{ "role": "user", "content": content }] })
}

fn assistant(content: Value) -> Value {
    json!({ "messages": [{ "role": "user", "content": "hi" }, { "role": "assistant", "content": content }] })
}

#[test]
fn anthropic_features_without_an_openai_counterpart_are_refused_by_name() {
    let cases = [
        (
            "thinking",
            json!({ "thinking": { "type": "enabled", "budget_tokens": 2048 } }),
        ),
        (
            "document",
            user(
                json!([{ "type": "document", "source": { "type": "text", "media_type": "text/plain", "data": "x" } }]),
            ),
        ),
        (
            "search_result",
            user(json!([{ "type": "search_result", "source": "s", "title": "t", "content": [] }])),
        ),
        (
            "server_tool_use",
            assistant(
                json!([{ "type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {} }]),
            ),
        ),
        (
            "redacted_thinking",
            assistant(json!([{ "type": "redacted_thinking", "data": "abc" }])),
        ),
        (
            "thinking",
            assistant(json!([{ "type": "thinking", "thinking": "hm", "signature": "sig" }])),
        ),
        (
            "tools",
            json!({ "tools": [{ "type": "web_search_20250305", "name": "web_search", "max_uses": 5 }] }),
        ),
        (
            "tools",
            json!({ "tools": [{ "name": "t", "input_schema": {}, "defer_loading": true }] }),
        ),
        (
            "container",
            json!({ "container": "container_011CPR5CNjB747bTd36fQLFk" }),
        ),
        (
            "mcp_servers",
            json!({ "mcp_servers": [{ "type": "url", "url": "https://mcp.example.com/sse", "name": "example" }] }),
        ),
        ("body", json!({ "frobnicate": true })),
        (
            "image",
            user(
                json!([{ "type": "image", "source": { "type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w" } }]),
            ),
        ),
        (
            "tool_result",
            user(
                json!([{ "type": "tool_result", "tool_use_id": "t", "content": [{ "type": "image", "source": { "type": "url", "url": "https://x/y.png" } }] }]),
            ),
        ),
        (
            "citations",
            assistant(
                json!([{ "type": "text", "text": "x", "citations": [{ "type": "char_location" }] }]),
            ),
        ),
        (
            "metadata",
            json!({ "metadata": { "user_id": "u", "team": "t" } }),
        ),
        (
            "tool_choice",
            json!({ "tool_choice": { "type": "sometimes" } }),
        ),
        (
            "messages",
            user(json!([{ "type": "tool_use", "id": "t", "name": "n", "input": {} }])),
        ),
        (
            "messages",
            json!({ "messages": [{ "role": "system", "content": "x" }] }),
        ),
        ("stream", json!({ "stream": "yes" })),
    ];
    for (param, extra) in cases {
        let err = request_to_openai(&anthropic_req(extra.clone())).expect_err(&extra.to_string());
        assert_eq!(err.param, param, "{extra}: {}", err.message);
    }
}

#[test]
fn openai_features_without_an_anthropic_counterpart_are_refused_by_name() {
    let cases = [
        ("n", json!({ "n": 2 })),
        ("best_of", json!({ "best_of": 3 })),
        ("logprobs", json!({ "logprobs": true })),
        ("top_logprobs", json!({ "top_logprobs": 3 })),
        ("logit_bias", json!({ "logit_bias": { "50256": -100 } })),
        ("frequency_penalty", json!({ "frequency_penalty": 0.5 })),
        ("presence_penalty", json!({ "presence_penalty": -0.1 })),
        ("seed", json!({ "seed": 42 })),
        (
            "response_format",
            json!({ "response_format": { "type": "json_object" } }),
        ),
        (
            "response_format",
            json!({ "response_format": { "type": "json_schema", "json_schema": { "name": "x", "schema": {} } } }),
        ),
        (
            "audio",
            json!({ "audio": { "voice": "alloy", "format": "wav" } }),
        ),
        ("modalities", json!({ "modalities": ["text", "audio"] })),
        (
            "prediction",
            json!({ "prediction": { "type": "content", "content": "x" } }),
        ),
        (
            "functions",
            json!({ "functions": [{ "name": "f", "parameters": {} }] }),
        ),
        ("function_call", json!({ "function_call": "auto" })),
        ("store", json!({ "store": true })),
        ("service_tier", json!({ "service_tier": "flex" })),
        ("reasoning_effort", json!({ "reasoning_effort": "high" })),
        ("temperature", json!({ "temperature": 1.5 })),
        ("body", json!({ "frobnicate": true })),
        ("max_tokens", json!({ "max_tokens": -1 })),
        (
            "messages",
            json!({ "messages": [{ "role": "user", "content": "a" }, { "role": "system", "content": "late" }] }),
        ),
        (
            "messages",
            json!({ "messages": [{ "role": "user", "content": "a", "name": "alice" }] }),
        ),
        (
            "functions",
            json!({ "messages": [{ "role": "function", "name": "f", "content": "x" }] }),
        ),
        (
            "tool_calls",
            json!({ "messages": [{ "role": "assistant", "content": null, "tool_calls": [{ "id": "c", "type": "function", "function": { "name": "f", "arguments": "{not json" } }] }] }),
        ),
        (
            "tool_calls",
            json!({ "messages": [{ "role": "assistant", "content": null, "tool_calls": [{ "id": "c", "type": "function", "function": { "name": "f", "arguments": "[1]" } }] }] }),
        ),
        (
            "input_audio",
            json!({ "messages": [{ "role": "user", "content": [{ "type": "input_audio", "input_audio": { "data": "x", "format": "wav" } }] }] }),
        ),
        (
            "file",
            json!({ "messages": [{ "role": "user", "content": [{ "type": "file", "file": { "file_id": "f" } }] }] }),
        ),
        (
            "image_url",
            json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "ftp://x/y.png" } }] }] }),
        ),
        (
            "tools",
            json!({ "tools": [{ "type": "custom", "custom": { "name": "x" } }] }),
        ),
        (
            "tool_choice",
            json!({ "tools": [{ "type": "function", "function": { "name": "f" } }], "tool_choice": "sometimes" }),
        ),
    ];
    for (param, extra) in cases {
        let err =
            request_to_anthropic(&openai_req(extra.clone()), 100).expect_err(&extra.to_string());
        assert_eq!(err.param, param, "{extra}: {}", err.message);
    }
}

#[test]
fn neutral_values_of_openai_only_parameters_pass() {
    let neutral = json!({
        "n": 1, "best_of": 1, "logprobs": false, "top_logprobs": 0, "logit_bias": {},
        "frequency_penalty": 0, "presence_penalty": 0.0, "seed": null, "response_format": { "type": "text" },
        "audio": null, "modalities": ["text"], "prediction": null, "functions": null, "function_call": null,
        "store": false, "service_tier": "auto", "reasoning_effort": null, "temperature": 1,
        "metadata": { "tag": "x" }, "prompt_cache_key": "k",
    });
    let got = value(&request_to_anthropic(&openai_req(neutral), 100).unwrap());
    assert_eq!(
        got,
        json!({ "model": "m", "max_tokens": 100, "temperature": 1, "messages": [{ "role": "user", "content": "hi" }] })
    );
}

#[test]
fn answer_refusals_name_their_parameter() {
    let anthropic = |content: Value, stop: &str| {
        bytes(
            &json!({ "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": content,
            "stop_reason": stop, "stop_sequence": null, "usage": { "input_tokens": 1, "output_tokens": 1 } }),
        )
    };
    let thinking = json!([{ "type": "thinking", "thinking": "hm", "signature": "s" }]);
    assert_eq!(
        answer_to_openai(&anthropic(thinking, "end_turn"))
            .unwrap_err()
            .param,
        "content"
    );
    assert_eq!(
        answer_to_openai(&anthropic(json!([]), "dreaming"))
            .unwrap_err()
            .param,
        "stop_reason"
    );

    let openai = |choices: Value| {
        bytes(
            &json!({ "id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": choices }),
        )
    };
    let choice = |message: Value, finish: &str| json!({ "index": 0, "message": message, "finish_reason": finish });
    let text = json!({ "role": "assistant", "content": "x" });
    assert_eq!(
        answer_to_anthropic(&openai(json!([
            choice(text.clone(), "stop"),
            choice(text.clone(), "stop")
        ])))
        .unwrap_err()
        .param,
        "n"
    );
    assert_eq!(
        answer_to_anthropic(&openai(json!([choice(text.clone(), "abort")])))
            .unwrap_err()
            .param,
        "finish_reason"
    );
    let bad_args = json!({ "role": "assistant", "content": null, "tool_calls": [{ "id": "c", "type": "function", "function": { "name": "f", "arguments": "{" } }] });
    assert_eq!(
        answer_to_anthropic(&openai(json!([choice(bad_args, "tool_calls")])))
            .unwrap_err()
            .param,
        "tool_calls"
    );
    assert_eq!(
        answer_to_anthropic(&openai(json!([]))).unwrap_err().param,
        "choices"
    );
}

#[test]
fn an_openai_refusal_answer_is_an_anthropic_refusal() {
    let answer = json!({ "id": "c", "model": "m", "choices": [{ "index": 0,
        "message": { "role": "assistant", "content": null, "refusal": "I can't help with that." }, "finish_reason": "stop" }] });
    let got = value(&answer_to_anthropic(&bytes(&answer)).unwrap());
    assert_eq!(got["stop_reason"], "refusal");
    assert_eq!(
        got["content"],
        json!([{ "type": "text", "text": "I can't help with that." }])
    );
    assert_eq!(
        got["usage"]["input_tokens"], 0,
        "no usage reported: zeros, for the caller to count"
    );
}

#[test]
fn stream_refusals_name_their_parameter() {
    let start = r#"{"type":"message_start","message":{"id":"msg_1","model":"m","usage":{"input_tokens":1,"output_tokens":1}}}"#;
    let mut out = BytesMut::new();
    let mut t = StreamToOpenAi::new();
    t.event("message_start", start.as_bytes(), &mut out)
        .unwrap();
    let thinking_start = r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#;
    assert_eq!(
        t.event("content_block_start", thinking_start.as_bytes(), &mut out)
            .unwrap_err()
            .param,
        "thinking"
    );
    t.event(
        "content_block_start",
        br#"{"index":0,"content_block":{"type":"text","text":""}}"#,
        &mut out,
    )
    .unwrap();
    let thinking_delta = r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}"#;
    assert_eq!(
        t.event("content_block_delta", thinking_delta.as_bytes(), &mut out)
            .unwrap_err()
            .param,
        "thinking"
    );
    let mut fresh = StreamToOpenAi::new();
    let early = fresh.event(
        "content_block_delta",
        br#"{"index":0,"delta":{"type":"text_delta","text":"x"}}"#,
        &mut out,
    );
    assert_eq!(early.unwrap_err().param, "stream");

    let mut t = StreamToAnthropic::new("m");
    let two = r#"{"id":"c","choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#;
    assert_eq!(t.chunk(two.as_bytes(), &mut out).unwrap_err().param, "n");
    let mut t = StreamToAnthropic::new("m");
    let call = |i: u32, id: &str| {
        format!(
            r#"{{"id":"c","choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":{i},"id":"{id}","function":{{"name":"f","arguments":"{{"}}}}]}}}}]}}"#
        )
    };
    t.chunk(call(0, "a").as_bytes(), &mut out).unwrap();
    t.chunk(call(1, "b").as_bytes(), &mut out).unwrap();
    assert_eq!(
        t.chunk(call(0, "a").as_bytes(), &mut out)
            .unwrap_err()
            .param,
        "tool_calls"
    );
}

#[test]
fn unknown_anthropic_events_are_ignored_and_nothing_follows_the_end() {
    let input = std::fs::read_to_string(data_dir("streams/text/anthropic.sse")).unwrap();
    let mut events = sse(&input);
    events.insert(
        2,
        (
            "some_future_event".into(),
            r#"{"type":"some_future_event"}"#.into(),
        ),
    );
    events.push(("message_stop".into(), r#"{"type":"message_stop"}"#.into()));
    let mut t = StreamToOpenAi::new();
    let mut out = BytesMut::new();
    for (name, data) in &events {
        t.event(name, data.as_bytes(), &mut out).unwrap();
    }
    assert!(t.ended());
    let text = String::from_utf8(out.to_vec()).unwrap();
    assert_eq!(text.matches("[DONE]").count(), 1);
    let expected = std::fs::read_to_string(data_dir("streams/text/to_openai.sse")).unwrap();
    assert_eq!(frames(&text), frames(&expected));
}

#[test]
fn the_usage_chunk_can_be_left_out() {
    let input = std::fs::read_to_string(data_dir("streams/text/anthropic.sse")).unwrap();
    let mut t = StreamToOpenAi::new().with_usage_chunk(false);
    let mut out = BytesMut::new();
    for (name, data) in sse(&input) {
        t.event(&name, data.as_bytes(), &mut out).unwrap();
    }
    let text = String::from_utf8(out.to_vec()).unwrap();
    assert!(!text.contains("usage"), "{text}");
    assert!(frames(&text)
        .iter()
        .all(|(_, v)| v == "[DONE]" || v["choices"].as_array().unwrap().len() == 1));
}

#[test]
fn a_cut_openai_stream_closes_with_no_stop_reason_and_an_empty_one_says_nothing() {
    let mut t = StreamToAnthropic::new("m");
    let mut out = BytesMut::new();
    t.chunk(
        br#"{"id":"c","choices":[{"index":0,"delta":{"content":"Hal"}}]}"#,
        &mut out,
    )
    .unwrap();
    t.done(&mut out);
    t.done(&mut out);
    let events = frames(std::str::from_utf8(&out).unwrap());
    let message = accumulate_anthropic(&events);
    assert_eq!(message["stop_reason"], Value::Null);
    assert_eq!(
        message["content"],
        json!([{ "type": "text", "text": "Hal" }])
    );

    let mut empty = StreamToAnthropic::new("m");
    let mut out = BytesMut::new();
    empty.done(&mut out);
    assert!(out.is_empty());
}

// === errors ===

#[test]
fn error_types_follow_anthropics_table() {
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "billing_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ] {
        assert_eq!(error_type_for_status(status), kind, "{status}");
    }
}

#[test]
fn error_bodies_translate_both_ways() {
    let anthropic = br#"{"type":"error","error":{"type":"not_found_error","message":"The requested resource could not be found."},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;
    assert_eq!(
        value(&error_to_openai(404, anthropic)),
        json!({ "error": { "message": "The requested resource could not be found.", "type": "not_found_error", "code": null, "param": null } })
    );
    let openai = br#"{"error":{"message":"Incorrect API key provided: sk-abc.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    assert_eq!(
        value(&error_to_anthropic(401, openai)),
        json!({ "type": "error", "error": { "type": "authentication_error", "message": "Incorrect API key provided: sk-abc." } })
    );
    // Engines' own shapes, and bodies with nothing readable.
    assert_eq!(
        value(&error_to_anthropic(400, br#"{"detail":"bad prompt"}"#))["error"]["message"],
        "bad prompt"
    );
    assert_eq!(
        value(&error_to_anthropic(500, br#"{"error":"boom"}"#))["error"]["message"],
        "boom"
    );
    let html = value(&error_to_anthropic(502, b"<html>Bad Gateway</html>"));
    assert_eq!(
        html["error"],
        json!({ "type": "api_error", "message": "the upstream answered with HTTP status 502" })
    );
    let html = value(&error_to_openai(529, b"<html>"));
    assert_eq!(html["error"]["type"], "overloaded_error");
    assert_eq!(
        value(&error_body("rate_limit_error", "slow down")),
        json!({ "type": "error", "error": { "type": "rate_limit_error", "message": "slow down" } })
    );
}

#[test]
fn refusals_become_400s_naming_the_param() {
    let e: crate::error::GatewayError = Untranslatable::new("seed", "no").into();
    assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    assert_eq!(e.param(), Some("seed"));
}

// === hostile input ===

fn hostile_bodies() -> Vec<Vec<u8>> {
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000));
    let deep_in_messages = format!(
        r#"{{"model":"m","max_tokens":1,"messages":[{{"role":"user","content":{}"x"{}}}]}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let mut bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"not json".to_vec(),
        b"[]".to_vec(),
        b"42".to_vec(),
        b"null".to_vec(),
        b"\xff\xfe".to_vec(),
        deep_array.into_bytes(),
        deep_object.into_bytes(),
        deep_in_messages.into_bytes(),
    ];
    for v in [
        json!({ "messages": 5 }),
        json!({ "messages": [5] }),
        json!({ "messages": [{ "role": 5 }] }),
        json!({ "messages": [{ "role": "user", "content": 5 }] }),
        json!({ "messages": [{ "role": "user", "content": [5] }] }),
        json!({ "messages": [{ "role": "user", "content": [{ "type": "image", "source": 5 }] }] }),
        json!({ "messages": [{ "role": "assistant", "content": [{ "type": "tool_use", "input": "x" }] }] }),
        json!({ "messages": [{ "role": "assistant", "tool_calls": [{ "function": 5 }] }] }),
        json!({ "messages": [], "tools": [5], "tool_choice": 5, "system": 5, "metadata": 5, "stop": 5 }),
        json!({ "content": 5, "usage": 5, "choices": 5 }),
        json!({ "id": 5, "content": [{ "type": "text" }], "usage": { "input_tokens": -1 } }),
        json!({ "id": "c", "choices": [{ "message": 5 }], "usage": { "prompt_tokens": "many" } }),
        json!({ "id": "c", "choices": [{ "message": { "content": [1] } }] }),
    ] {
        bodies.push(bytes(&v));
    }
    bodies
}

#[test]
fn hostile_input_is_refused_never_a_panic() {
    for body in hostile_bodies() {
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        assert!(request_to_openai(&body).is_err(), "{shown}");
        assert!(request_to_anthropic(&body, 1).is_err(), "{shown}");
        assert!(answer_to_openai(&body).is_err(), "{shown}");
        assert!(answer_to_anthropic(&body).is_err(), "{shown}");
        let _ = error_to_openai(500, &body);
        let _ = error_to_anthropic(500, &body);
        let mut out = BytesMut::new();
        let mut a = StreamToOpenAi::new();
        for name in [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "message_delta",
            "error",
            "",
        ] {
            let _ = a.event(name, &body, &mut out);
        }
        let mut b = StreamToAnthropic::new("m");
        let _ = b.chunk(&body, &mut out);
        b.done(&mut out);
    }
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "tool",
            "text",
            "image",
            "tool_use",
            "tool_result",
            "image_url",
            "function",
            "base64",
            "url",
            "data:image/png;base64,AA",
            "{}",
            "{\"a\":1}",
            "end_turn",
            "stop",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "model",
                    "messages",
                    "role",
                    "content",
                    "type",
                    "text",
                    "source",
                    "tools",
                    "tool_choice",
                    "tool_calls",
                    "function",
                    "arguments",
                    "name",
                    "id",
                    "input",
                    "usage",
                    "choices",
                    "message",
                    "delta",
                    "index",
                    "finish_reason",
                    "stop_reason",
                    "system",
                    "max_tokens",
                    "stream",
                    "error",
                    "content_block",
                    "partial_json",
                    "image_url",
                    "url",
                    "tool_use_id",
                    "tool_call_id",
                ])
                .prop_map(str::to_owned),
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever shape arrives, every entry point answers (Ok or a refusal) without panicking.
    #[test]
    fn arbitrary_json_never_panics(v in arbitrary_json()) {
        let body = bytes(&v);
        let _ = request_to_openai(&body);
        let _ = request_to_anthropic(&body, 1);
        let _ = answer_to_openai(&body);
        let _ = answer_to_anthropic(&body);
        let mut out = BytesMut::new();
        let mut a = StreamToOpenAi::new();
        let _ = a.event("message_start", br#"{"message":{"id":"m","model":"m"}}"#, &mut out);
        for name in ["content_block_start", "content_block_delta", "message_delta", ""] {
            let _ = a.event(name, &body, &mut out);
        }
        let mut b = StreamToAnthropic::new("m");
        let _ = b.chunk(&body, &mut out);
        let _ = b.chunk(&body, &mut out);
        b.done(&mut out);
    }

    /// Text split anywhere (at char boundaries: a JSON string cannot hold half a character)
    /// comes out of both translators byte for byte, and the Anthropic side stays well formed.
    #[test]
    fn split_text_survives_both_stream_translators(
        text in "(\\PC|[\"\\\\\n\t\u{1F600}é])*",
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let mut at: Vec<usize> = cuts.iter().map(|c| bounds[c.index(bounds.len())]).collect();
        at.extend([0, text.len()]);
        at.sort_unstable();
        at.dedup();
        let pieces: Vec<&str> = at.windows(2).map(|w| &text[w[0]..w[1]]).collect();

        // Anthropic events -> OpenAI chunks.
        let mut events = vec![
            ("message_start".to_owned(), json!({ "type": "message_start", "message": { "id": "msg_p", "model": "m", "content": [], "usage": { "input_tokens": 3, "output_tokens": 1 } } })),
            ("content_block_start".to_owned(), json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } })),
        ];
        for p in &pieces {
            events.push(("content_block_delta".to_owned(), json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": p } })));
        }
        events.push(("content_block_stop".to_owned(), json!({ "type": "content_block_stop", "index": 0 })));
        events.push(("message_delta".to_owned(), json!({ "type": "message_delta", "delta": { "stop_reason": "end_turn", "stop_sequence": null }, "usage": { "output_tokens": 7 } })));
        events.push(("message_stop".to_owned(), json!({ "type": "message_stop" })));
        let input: Vec<(String, String)> = events.iter().map(|(n, d)| (n.clone(), d.to_string())).collect();
        let openai = to_openai_stream(&input).unwrap();
        let content: String = frames(&openai)
            .iter()
            .filter_map(|(_, v)| v.get("choices")?.get(0)?.get("delta")?.get("content")?.as_str().map(str::to_owned))
            .collect();
        prop_assert_eq!(&content, &text);

        // OpenAI chunks (the translated ones, then ones split by hand) -> Anthropic events.
        let mut by_hand: String = pieces
            .iter()
            .map(|p| format!("data: {}\n\n", json!({ "id": "c", "choices": [{ "index": 0, "delta": { "content": p } }] })))
            .collect();
        by_hand.push_str("data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
        for source in [openai, by_hand] {
            let anthropic = frames(&to_anthropic_stream(&sse(&source)).unwrap());
            let message = accumulate_anthropic(&anthropic);
            let got: String = message["content"].as_array().unwrap().iter().map(|b| b["text"].as_str().unwrap().to_owned()).collect();
            prop_assert_eq!(&got, &text);
        }
    }
}
