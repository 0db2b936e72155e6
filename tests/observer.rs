//! The SSE observer against a full JSON parse, over engine streams: the samples derived from
//! each engine's serializer (`tests/data/engines/<engine>/*.sse`, `expected.json`) and the
//! streams recorded from real llama.cpp servers (`real_*.sse`, `recorded.json`).
//!
//! The property: however a valid stream is written (whitespace anywhere JSON allows it, keys
//! in any order, characters escaped or not, `\r\n` or `\n`, data split over several `data:`
//! lines) and however it is cut into frames, the observer finds the usage, the generated text
//! and the end that a full parse (`serde_json::Value`) of each event finds.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tollgate::meter::sse::SseObserver;
use tollgate::meter::{read_answer, usage_json, Usage};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/engines")
}

/// A whole answer's generated text, as the scanner decodes it.
fn answer_text(json: &[u8]) -> String {
    let mut text = String::new();
    tollgate::meter::scan::scan(json, &mut text).expect("valid JSON");
    text
}

fn streams() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for engine in std::fs::read_dir(data_dir()).unwrap() {
        let engine = engine.unwrap().path();
        if !engine.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&engine).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "sse") {
                let rel = f.strip_prefix(data_dir()).unwrap().display().to_string();
                out.push((rel, std::fs::read(&f).unwrap()));
            }
        }
    }
    out.sort();
    assert!(out.len() >= 40, "the samples are there");
    out
}

/// What metering takes from a stream.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    usage: Option<Usage>,
    text: String,
    content_events: u64,
    done: bool,
}

fn observe(frames: &[Bytes]) -> (Seen, Vec<u8>) {
    let mut o = SseObserver::new(false);
    let mut forwarded = Vec::new();
    for f in frames {
        if let Some(b) = o.feed(f.clone()) {
            forwarded.extend_from_slice(&b);
        }
    }
    if let Some(b) = o.finish() {
        forwarded.extend_from_slice(&b);
    }
    assert_eq!(o.violation, None, "valid input is never a violation");
    let (text, overflow) = o.take_generated();
    assert_eq!(overflow, 0);
    (
        Seen {
            usage: o.usage,
            text,
            content_events: o.content_events,
            done: o.saw_done,
        },
        forwarded,
    )
}

/// The events of a stream file: each event's data lines joined, as an SSE client reads them.
fn event_data(stream: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(stream).unwrap().replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|event| {
            let lines: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect()
}

/// The reference: every event parsed whole, generated text read at the same JSON paths.
fn reference(stream: &[u8]) -> Seen {
    let mut seen = Seen {
        usage: None,
        text: String::new(),
        content_events: 0,
        done: false,
    };
    for data in event_data(stream) {
        if data.trim() == "[DONE]" {
            seen.done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).expect("samples are valid JSON");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            if let Some(u) = usage_json(u.to_string().as_bytes()) {
                seen.usage = Some(u);
            }
        }
        let before = seen.text.len();
        text_of(&v, &mut seen.text);
        if seen.text.len() > before {
            seen.content_events += 1;
        }
    }
    seen
}

fn text_of(v: &Value, out: &mut String) {
    let strings = |v: &Value, out: &mut String| {
        if let Some(s) = v.as_str() {
            out.push_str(s);
        }
    };
    fn parts(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => out.push_str(s),
            Value::Array(items) => {
                for p in items {
                    if let Some(s) = p.get("text").and_then(Value::as_str) {
                        out.push_str(s);
                    }
                    if let Some(t) = p.get("thinking") {
                        parts(t, out);
                    }
                }
            }
            _ => {}
        }
    }
    for c in v["choices"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        strings(&c["text"], out);
        for m in [&c["delta"], &c["message"]] {
            parts(&m["content"], out);
            strings(&m["reasoning_content"], out);
            strings(&m["reasoning"], out);
            for t in m["tool_calls"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                strings(&t["function"]["arguments"], out);
            }
        }
    }
}

#[test]
fn every_sample_is_metered_as_its_engine_wrote_it() {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(data_dir().join("expected.json")).unwrap()).unwrap();
    let mut checked = 0;
    for (name, bytes) in streams() {
        let (seen, forwarded) = observe(&[Bytes::from(bytes.clone())]);
        assert_eq!(seen, reference(&bytes), "{name}");
        // Nothing but `[DONE]` (held back for the gateway's own ending) is taken out.
        let without_done = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("data: [DONE]\n\n", "")
            .replace("data: [DONE]\r\n\r\n", "");
        assert_eq!(
            String::from_utf8(forwarded).unwrap(),
            without_done,
            "{name}"
        );
        if let Some(e) = expected.get(&name) {
            assert_eq!(seen.text, e["text"].as_str().unwrap(), "{name}");
            assert_eq!(
                seen.content_events,
                e["content_events"].as_u64().unwrap(),
                "{name}"
            );
            assert_eq!(seen.done, e["done"].as_bool().unwrap(), "{name}");
            match (&seen.usage, &e["usage"]) {
                (None, Value::Null) => {}
                (Some(u), eu) => {
                    assert_eq!(Some(u.prompt), eu["prompt_tokens"].as_u64(), "{name}");
                    assert_eq!(
                        Some(u.completion),
                        eu["completion_tokens"].as_u64(),
                        "{name}"
                    );
                    assert_eq!(
                        u.cached,
                        eu["cached_tokens"].as_u64().unwrap_or(0),
                        "{name}"
                    );
                    assert_eq!(
                        u.reasoning,
                        eu["reasoning_tokens"].as_u64().unwrap_or(0),
                        "{name}"
                    );
                }
                (None, eu) => panic!("{name}: no usage found, expected {eu}"),
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 40,
        "{checked} samples checked against expected.json"
    );
}

#[test]
fn real_recordings_meter_what_the_engine_reported() {
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(data_dir().join("recorded.json")).unwrap()).unwrap();
    let recorded = recorded.as_object().unwrap();
    assert!(recorded.len() >= 8);
    for (name, r) in recorded {
        let bytes = std::fs::read(data_dir().join(name)).unwrap();
        let (usage, text) = if name.ends_with(".json") {
            (
                read_answer(&bytes).expect("valid JSON").0,
                answer_text(&bytes),
            )
        } else {
            let (seen, _) = observe(&[Bytes::from(bytes)]);
            (seen.usage, seen.text)
        };
        assert_eq!(text, r["text"].as_str().unwrap(), "{name}");
        assert_eq!(
            usage.map(|u| (u.prompt, u.completion)),
            r["usage"].as_object().map(|u| (
                u["prompt_tokens"].as_u64().unwrap(),
                u["completion_tokens"].as_u64().unwrap()
            )),
            "{name}"
        );
    }
}

#[test]
fn json_answers_are_read_like_stream_events() {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(data_dir().join("expected.json")).unwrap()).unwrap();
    for (name, e) in expected.as_object().unwrap() {
        if !name.ends_with(".json") {
            continue;
        }
        let bytes = std::fs::read(data_dir().join(name)).unwrap();
        let (usage, _) = read_answer(&bytes).expect("valid JSON");
        assert_eq!(answer_text(&bytes), e["text"].as_str().unwrap(), "{name}");
        assert_eq!(
            usage.map(|u| u.completion),
            e["usage"]["completion_tokens"].as_u64(),
            "{name}"
        );
    }
}

// === random re-serialization ===

/// xorshift64*: the property's randomness comes from one proptest seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

struct Writer<'r> {
    rng: &'r mut Rng,
    shuffle: bool,
    out: String,
}

impl Writer<'_> {
    fn ws(&mut self) {
        for _ in 0..self.rng.below(3) {
            let w = [" ", "\t", "\n", "  ", "\r\n"][self.rng.below(5) as usize];
            self.out.push_str(w);
        }
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                c if (c as u32) < 0x20 || self.rng.chance(4) => {
                    // Any character may be written as \uXXXX (a surrogate pair past the BMP).
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{:04x}", u));
                    }
                }
                '/' if self.rng.chance(2) => self.out.push_str("\\/"),
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                self.out.push('{');
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.shuffle {
                    for i in (1..entries.len()).rev() {
                        let j = self.rng.below(i as u64 + 1) as usize;
                        entries.swap(i, j);
                    }
                }
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        self.ws();
                        self.out.push(',');
                    }
                    self.ws();
                    self.string(k);
                    self.ws();
                    self.out.push(':');
                    self.ws();
                    self.value(v);
                }
                self.ws();
                self.out.push('}');
            }
            Value::Array(items) => {
                self.out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        self.ws();
                        self.out.push(',');
                    }
                    self.ws();
                    self.value(v);
                }
                self.ws();
                self.out.push(']');
            }
            Value::String(s) => self.string(s),
            other => self.out.push_str(&other.to_string()),
        }
    }
}

/// The same stream written another way: events in their order, comments kept.
fn rewrite(stream: &[u8], seed: u64, shuffle: bool) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let nl = if rng.chance(3) { "\r\n" } else { "\n" };
    let mut out = String::new();
    if rng.chance(3) {
        out.push_str(&format!(": keep-alive{nl}{nl}"));
    }
    for data in event_data(stream) {
        let text = if data.trim() == "[DONE]" {
            data
        } else {
            // Parsed with key order kept, so that only `shuffle` moves keys.
            let v: Value = serde_json::from_str(&data).unwrap();
            let mut w = Writer {
                rng: &mut rng,
                shuffle,
                out: String::new(),
            };
            w.ws();
            w.value(&v);
            w.out
        };
        // A newline in the data (JSON whitespace) continues it on another `data:` line.
        let text = text.replace("\r\n", "\n");
        if rng.chance(4) {
            out.push_str(&format!("event: chunk{nl}"));
        }
        for line in text.split('\n') {
            let sep = if rng.chance(2) { "data: " } else { "data:" };
            // `data:` then a line that starts with a space would lose that space to the
            // field's own separator: give it one more.
            let sep = if sep == "data:" && line.starts_with(' ') {
                "data: "
            } else {
                sep
            };
            out.push_str(&format!("{sep}{line}{nl}"));
        }
        out.push_str(nl);
    }
    out.into_bytes()
}

fn split(bytes: &[u8], seed: u64) -> Vec<Bytes> {
    let mut rng = Rng(seed.rotate_left(17) | 1);
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = match rng.below(4) {
            0 => 1 + rng.below(4) as usize,
            1 => 1 + rng.below(64) as usize,
            _ => 1 + rng.below(1024) as usize,
        };
        let end = (at + len).min(bytes.len());
        frames.push(Bytes::copy_from_slice(&bytes[at..end]));
        at = end;
    }
    frames
}

fn sorted_chars(s: &str) -> Vec<char> {
    let mut v: Vec<char> = s.chars().collect();
    v.sort_unstable();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whitespace, escapes, line ends, multi-line data and frame splits change nothing.
    #[test]
    fn any_writing_and_any_split_meter_the_same(seed in any::<u64>()) {
        for (name, bytes) in streams() {
            let want = reference(&bytes);
            let rewritten = rewrite(&bytes, seed, false);
            prop_assert_eq!(&reference(&rewritten), &want, "{}: the rewrite changed the stream", name);
            let (seen, _) = observe(&split(&rewritten, seed));
            prop_assert_eq!(&seen, &want, "{}", name);
        }
    }

    /// Keys in another order: the same usage and events; text parts of one object may come
    /// in the order they are written, so the text is compared as a multiset of characters.
    #[test]
    fn key_order_changes_nothing_but_the_order_of_parts(seed in any::<u64>()) {
        for (name, bytes) in streams() {
            let want = reference(&bytes);
            let rewritten = rewrite(&bytes, seed, true);
            let (seen, _) = observe(&split(&rewritten, seed));
            prop_assert_eq!(seen.usage, want.usage, "{}", name);
            prop_assert_eq!(seen.content_events, want.content_events, "{}", name);
            prop_assert_eq!(seen.done, want.done, "{}", name);
            prop_assert_eq!(sorted_chars(&seen.text), sorted_chars(&want.text), "{}", name);
        }
    }
}
