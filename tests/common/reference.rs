//! The meter's reference: what a full parse (`serde_json::Value`) of an upstream document says
//! metering should find, and how an SSE client cuts a stream into events. The observer and the
//! scanner are checked against it (`tests/observer.rs`, `tests/fuzz.rs`), so it is written the
//! slow, obvious way and shares no code with them.
#![allow(dead_code)]

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use tollgate::meter::{timings_json, usage_json, Usage};

/// A JSON value with its members in document order (serde_json's `Value` sorts them), so
/// that text in several places of one object is read in the order it was written.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
    /// Numbers, booleans, null: nothing metering reads text from.
    Other,
}

static OTHER: Json = Json::Other;

impl Json {
    /// The member a parser keeps: the last of that name.
    pub fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(members) => members
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map_or(&OTHER, |(_, v)| v),
            _ => &OTHER,
        }
    }

    fn items(&self) -> &[Json] {
        match self {
            Json::Arr(items) => items,
            _ => &[],
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut members = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    members.push((k, map.next_value()?));
                }
                Ok(Json::Obj(members))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(v) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Json::Arr(items))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::Str(s))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Json, E> {
                Ok(Json::Other)
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Generated text at the scanner's documented paths (see `src/meter/scan.rs`), in document
/// order.
pub fn text_of(v: &Json, out: &mut String) {
    fn parts(v: &Json, out: &mut String) {
        match v {
            Json::Str(s) => out.push_str(s),
            Json::Arr(items) => {
                for p in items {
                    for (k, v) in members(p) {
                        match (k.as_str(), v) {
                            ("text", Json::Str(s)) => out.push_str(s),
                            ("thinking", t) => parts(t, out),
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for c in v.get("choices").items() {
        for (k, v) in members(c) {
            match (k.as_str(), v) {
                ("text", Json::Str(s)) => out.push_str(s),
                ("delta" | "message", m) => {
                    for (k, v) in members(m) {
                        match (k.as_str(), v) {
                            ("content", v) => parts(v, out),
                            ("reasoning_content" | "reasoning", Json::Str(s)) => out.push_str(s),
                            ("tool_calls", calls) => {
                                for t in calls.items() {
                                    for (k, f) in members(t) {
                                        if k == "function" {
                                            if let Json::Str(s) = f.get("arguments") {
                                                out.push_str(s);
                                            }
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

fn members(v: &Json) -> &[(String, Json)] {
    match v {
        Json::Obj(m) => m,
        _ => &[],
    }
}

/// The events of an SSE byte stream as the observer delimits them: lines end at `\n` (a `\r`
/// before it is dropped), an empty line ends an event, and an unterminated last event still
/// counts. Each event is its `data` lines joined by `\n`, or `None` when it has none.
pub fn sse_events(stream: &[u8]) -> Vec<Option<Vec<u8>>> {
    let mut events = Vec::new();
    let mut data: Option<Vec<&[u8]>> = None;
    let mut open = false;
    let mut lines: Vec<&[u8]> = stream.split(|&c| c == b'\n').collect();
    // `split` yields a last piece after the final `\n`; empty, it is not a line.
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            events.push(data.take().map(|d| d.join(&b'\n')));
            open = false;
            continue;
        }
        open = true;
        let value = if line == b"data" {
            Some(&b""[..])
        } else {
            line.strip_prefix(b"data:")
                .map(|v| v.strip_prefix(b" ").unwrap_or(v))
        };
        if let Some(v) = value {
            data.get_or_insert_with(Vec::new).push(v);
        }
    }
    if open {
        events.push(data.map(|d| d.join(&b'\n')));
    }
    events
}

/// What metering should take from a stream, by a full parse of each event.
#[derive(Debug, Clone, PartialEq)]
pub struct Metered {
    pub usage: Option<Usage>,
    pub bad_usage: bool,
    pub timings: Option<Usage>,
    pub text: String,
    pub content_events: u64,
    pub done: bool,
    pub error_event: bool,
    /// An event's data was not JSON: the stream ends there.
    pub malformed: bool,
}

/// [`Metered`] for any byte stream, or `None` where a full parse is no oracle: an event with a
/// key twice in one object (a parser keeps one of them, the scanner sees both), or one that
/// only serde_json's own limits refuse (see [`oracle_limit`]).
pub fn meter(stream: &[u8]) -> Option<Metered> {
    let mut m = Metered {
        usage: None,
        bad_usage: false,
        timings: None,
        text: String::new(),
        content_events: 0,
        done: false,
        error_event: false,
        malformed: false,
    };
    for data in sse_events(stream).into_iter().flatten() {
        let trimmed = data.trim_ascii();
        if trimmed == b"[DONE]" {
            m.done = true;
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        let v: Value = match serde_json::from_slice(&data) {
            Ok(v) => v,
            Err(e) if no_oracle(&e, &data) => return None,
            Err(_) => {
                m.malformed = true;
                return Some(m);
            }
        };
        if has_duplicate_keys(&data) {
            return None;
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            match usage_json(u.to_string().as_bytes()) {
                Some(u) => m.usage = Some(u),
                None => m.bad_usage = true,
            }
        }
        if let Some(t) = v.get("timings").filter(|t| !t.is_null()) {
            m.timings = timings_json(t.to_string().as_bytes()).or(m.timings);
        }
        m.error_event |= v.get("error").is_some_and(|e| !e.is_null());
        let before = m.text.len();
        let ordered: Json = serde_json::from_slice(&data).expect("parsed once already");
        text_of(&ordered, &mut m.text);
        if m.text.len() > before {
            m.content_events += 1;
        }
    }
    Some(m)
}

/// Whether serde_json's refusal of `json` says nothing about the document: it refuses
/// numbers past f64's range, which JSON allows (the scanner takes them), and nesting 128 deep,
/// which the scanner takes (`scanner_depth_limit_is_serde_json_s` in `tests/fuzz.rs`).
pub fn no_oracle(e: &serde_json::Error, json: &[u8]) -> bool {
    let m = e.to_string();
    m.starts_with("number out of range")
        || m.starts_with("recursion limit exceeded") && nesting(json) == 128
}

/// The deepest nesting of arrays and objects, brackets in strings aside.
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0, false, false);
    for &b in json {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                max = max.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Whether any object in `json` (valid JSON) names a key twice, keys compared decoded.
pub fn has_duplicate_keys(json: &[u8]) -> bool {
    fn dup(v: &Json) -> bool {
        match v {
            Json::Obj(members) => {
                let mut seen = std::collections::HashSet::new();
                members
                    .iter()
                    .any(|(k, v)| !seen.insert(k.as_str()) || dup(v))
            }
            Json::Arr(items) => items.iter().any(dup),
            _ => false,
        }
    }
    serde_json::from_slice::<Json>(json).is_ok_and(|v| dup(&v))
}
