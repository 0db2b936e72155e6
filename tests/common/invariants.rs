//! The invariants of what the gateway reads from callers and operators, each written once and
//! checked by two drivers: proptest's generated inputs (`tests/properties.rs`) and the
//! mutation fuzzer's (`tests/fuzz.rs`). Each `check_*` panics when its invariant fails.
#![allow(dead_code)]

use super::rng::Rng;
use super::toml_writer;
use http::{HeaderMap, HeaderValue};
use serde_json::{Map, Value};
use std::sync::Arc;
use tollgate::api::openai::{parse, BodyEdits};
use tollgate::config::{self, Config, Team};
use tollgate::tags::{self, TagError, MAX_KEY_LEN, MAX_REQUEST_TAGS, MAX_VALUE_LEN};

// === tags ===

pub const REQUEST_TAGS: &[&str] = &["project", "env", "user", "a.b", "x-y_Z9"];

pub fn team() -> Arc<Team> {
    let text = r#"
[[backend]]
name = "b"
url = "http://127.0.0.1:1"
hosting = "self_hosted"
models = [{ name = "m" }]

[[team]]
name = "search"
tags = { department = "rnd", project = "default" }
request_tags = ["project", "env", "user", "a.b", "x-y_Z9"]
"#;
    let c = config::parse(text, "tags.toml", &|_| None).unwrap();
    c.teams[0].clone()
}

/// The documented rules, written out: keys of 1-64 characters of `[A-Za-z0-9_.-]` that the
/// team allows, values of at most 256 bytes and no control characters, at most 16 set per
/// request; the header first, then `metadata`, then `user`; a later one wins.
fn expected(
    team: &Team,
    headers: &[Vec<u8>],
    metadata: Option<&Map<String, Value>>,
    user: Option<&str>,
) -> Result<tags::Tags, &'static str> {
    let mut out = team.tags.clone();
    let mut set = 0;
    let mut put = |k: &str, v: &str, from: &'static str| {
        let key_ok = (1..=MAX_KEY_LEN).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        let allowed = team.request_tags.iter().any(|t| t == k);
        let value_ok = v.len() <= MAX_VALUE_LEN && !v.chars().any(char::is_control);
        set += 1;
        if !(key_ok && allowed && value_ok) || set > MAX_REQUEST_TAGS {
            return Err(from);
        }
        out.insert(k.to_string(), v.to_string());
        Ok(())
    };
    for h in headers {
        // What `HeaderValue::to_str` takes: visible ASCII and tabs.
        if !h.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
            return Err("x-tollgate-tags");
        }
        let h = std::str::from_utf8(h).unwrap();
        for pair in h.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or("x-tollgate-tags")?;
            put(k.trim(), v.trim(), "x-tollgate-tags")?;
        }
    }
    for (k, v) in metadata.into_iter().flatten() {
        put(k, v.as_str().ok_or("metadata")?, "metadata")?;
    }
    if let Some(u) = user.filter(|_| team.request_tags.iter().any(|t| t == "user")) {
        put("user", u, "user")?;
    }
    Ok(out)
}

/// Tags from a caller are taken exactly as the documented rules say, or refused with the
/// field they came from and a message of bounded size (a hostile value is not echoed).
pub fn check_tags(
    team: &Team,
    headers: &[Vec<u8>],
    metadata: Option<&Map<String, Value>>,
    user: Option<&str>,
) {
    let mut map = HeaderMap::new();
    let mut sent = Vec::new();
    for h in headers {
        // Bytes a header cannot carry never reach the gateway.
        if let Ok(v) = HeaderValue::from_bytes(h) {
            map.append(tags::X_TOLLGATE_TAGS.clone(), v);
            sent.push(h.clone());
        }
    }
    let got = tags::collect(team, &map, metadata, user);
    let want = expected(team, &sent, metadata, user);
    match (got, want) {
        (Ok(got), Ok(want)) => {
            assert_eq!(got, want);
            for (k, v) in &got {
                if team.tags.get(k) != Some(v) {
                    assert!(team.request_tags.contains(k), "{k}");
                    assert!(v.len() <= MAX_VALUE_LEN);
                }
            }
            assert!(got.len() <= team.tags.len() + MAX_REQUEST_TAGS);
        }
        (Err(TagError { param, message }), Err(from)) => {
            assert_eq!(param, from, "{message}");
            assert!(!message.is_empty());
            // 64 characters of a key at most, of up to 4 bytes each, and the words.
            assert!(message.len() <= 400, "{message}");
        }
        (got, want) => panic!("got {got:?}, the rules say {want:?}"),
    }
}

// === the request parser ===

/// The top-level fields a body edit must set, read back with serde alone.
#[derive(serde::Deserialize)]
struct Edited {
    model: String,
    stream_options: Map<String, Value>,
}

/// What holds for any body the parser accepts: the model is named where the summary says it
/// is, and the edits made before forwarding give a body that says what they set.
pub fn accepted_body_holds(body: &[u8]) {
    let Ok(s) = parse(body) else { return };
    assert!(!s.model.is_empty());
    let at: String = serde_json::from_slice(&body[s.model_span.clone()]).expect("a string");
    assert_eq!(at, s.model);
    if let Some(span) = &s.stream_options_span {
        serde_json::from_slice::<serde::de::IgnoredAny>(&body[span.clone()]).expect("JSON");
    }
    let bytes = bytes::Bytes::copy_from_slice(body);
    let mut edits = BodyEdits::default();
    edits.set_model(&s.model_span, "served/\"model\"");
    edits.request_stream_usage(&bytes, s.stream_options_span.as_ref());
    let out = edits.apply(&bytes);
    let e: Edited = serde_json::from_slice(&out).unwrap_or_else(|err| {
        panic!("{err}: {}", String::from_utf8_lossy(&out));
    });
    assert_eq!(e.model, "served/\"model\"");
    assert_eq!(
        e.stream_options.get("include_usage"),
        Some(&Value::Bool(true))
    );
}

/// Any body: no panic; what is not JSON is refused; every refusal is the client's error; and
/// what is accepted holds as [`accepted_body_holds`] says.
pub fn check_request(body: &[u8]) {
    let result = parse(body).map(|_| ());
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        assert!(result.is_err(), "not JSON, accepted");
    }
    if let Err(e) = result {
        assert!(e.status().is_client_error(), "{e:?} is {}", e.status());
    }
    accepted_body_holds(body);
}

// === the config loader ===

pub fn load(text: &str) -> Result<Config, config::ConfigErrors> {
    config::parse(text, "fuzz.toml", &|_| Some("sk-test".into()))
}

/// Every error names its field, or, when the text is not TOML at all, the line.
pub fn errors_name_a_field(e: &config::ConfigErrors) {
    assert!(!e.errors.is_empty());
    for err in &e.errors {
        assert!(
            !err.path.is_empty() || err.message.contains("line "),
            "names nothing: {err:?}"
        );
    }
}

/// A config written another way loads as the same config.
pub fn rewritten_loads_alike(text: &str, config: &Config, seed: u64) {
    let table: toml::Table = toml::from_str(text).expect("TOML");
    let again = toml_writer::write(&table, &mut Rng::new(seed));
    let reread: toml::Table =
        toml::from_str(&again).unwrap_or_else(|e| panic!("{e}\n---\n{again}"));
    assert_eq!(reread, table, "the writer changed the document:\n{again}");
    let loaded = load(&again).unwrap_or_else(|e| panic!("{e}\n---\n{again}"));
    assert_eq!(
        format!("{loaded:?}"),
        format!("{config:?}"),
        "\n---\n{again}"
    );
}

/// Any text: no panic; a refusal names a field or a line; what loads, loads alike however it
/// is written (`seed` picks the writing).
pub fn check_config(text: &str, seed: u64) {
    match load(text) {
        Err(e) => errors_name_a_field(&e),
        Ok(c) => rewritten_loads_alike(text, &c, seed),
    }
}
