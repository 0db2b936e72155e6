//! The SSE observer against a full JSON parse, over engine streams: the samples derived from
//! each engine's serializer (`tests/data/engines/<engine>/*.sse`, `expected.json`) and the
//! streams recorded from real llama.cpp servers (`real_*.sse`, `recorded.json`).
//!
//! The property: however a valid stream is written (whitespace anywhere JSON allows it, keys
//! in any order, characters escaped or not, `\r\n` or `\n`, data split over several `data:`
//! lines) and however it is cut into frames, the observer finds the usage, the generated text
//! and the end that a full parse (`serde_json::Value`) of each event finds.
//!
//! And for any bytes at all (`tests/common/observe.rs`): no panic; the same reading however
//! the bytes are cut, one at a time, inside a character or between `\r` and `\n`; a refusal
//! of an event that outgrows the bound, keeping what came before it.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tollgate::meter::sse::{SseObserver, Violation, MAX_EVENT_BYTES};
use tollgate::meter::{read_answer, usage_json, Usage};

#[path = "common/reference.rs"]
mod full_parse;
use full_parse::text_of;
#[path = "common/rng.rs"]
mod rng;
use rng::Rng;
#[path = "common/json_writer.rs"]
mod json_writer;
use json_writer::Writer;
#[path = "common/observe.rs"]
mod observe;
use observe::{bytewise, check_stream, cut_at, run, JSON_TOKENS, SSE_TOKENS};

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
        text_of(&serde_json::from_str(&data).unwrap(), &mut seen.text);
        if seen.text.len() > before {
            seen.content_events += 1;
        }
    }
    seen
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

// === every cut, any bytes, the bound ===

/// Offsets inside a multi-byte UTF-8 character or between a `\r` and its `\n`: where a cut
/// leaves each frame unreadable on its own.
fn awkward_offsets(bytes: &[u8]) -> Vec<usize> {
    (1..bytes.len())
        .filter(|&i| (0x80..0xc0).contains(&bytes[i]) || bytes[i - 1] == b'\r' && bytes[i] == b'\n')
        .collect()
}

#[test]
fn one_byte_frames_are_observed_like_one_frame() {
    for (name, bytes) in streams() {
        for strip in [false, true] {
            let whole = run(&[Bytes::from(bytes.clone())], strip);
            assert_eq!(whole.violation, None, "{name}");
            assert_eq!(
                run(&bytewise(&bytes), strip),
                whole,
                "{name}, strip {strip}"
            );
            let awkward = awkward_offsets(&bytes);
            assert_eq!(
                run(&cut_at(&bytes, &awkward), strip),
                whole,
                "{name}, cut at all {} awkward places",
                awkward.len()
            );
        }
        check_stream(&bytes, &awkward_offsets(&bytes));
    }
}

/// A chat stream whose text has characters of every UTF-8 length, with `\r\n` line ends.
fn multibyte_stream(contents: &[String], prompt: u64, completion: u64, crlf: bool) -> Vec<u8> {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut out = String::new();
    for c in contents {
        let chunk =
            serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"content": c}}]});
        out.push_str(&format!("data: {chunk}{nl}{nl}"));
    }
    let usage = serde_json::json!({"id": "c", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion}});
    out.push_str(&format!("data: {usage}{nl}{nl}data: [DONE]{nl}{nl}"));
    out.into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Cuts inside a character or a line end, wherever they fall, change nothing: the
    /// observer joins bytes before it reads them.
    #[test]
    fn cuts_inside_characters_and_line_ends_change_nothing(
        // The first text starts with characters of two and four bytes, so there are cuts.
        contents in prop::collection::vec("(\\PC|[é中😀]){0,12}", 1..8)
            .prop_map(|mut c| { c[0].insert_str(0, "é😀"); c }),
        prompt in 0u64..100_000,
        completion in 0u64..100_000,
        crlf in any::<bool>(),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..24),
        others in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        strip in any::<bool>(),
    ) {
        let bytes = multibyte_stream(&contents, prompt, completion, crlf);
        let awkward = awkward_offsets(&bytes);
        prop_assert!(!awkward.is_empty());
        let mut cuts: Vec<usize> = picks.iter().map(|i| awkward[i.index(awkward.len())]).collect();
        cuts.extend(others.iter().map(|i| i.index(bytes.len())));
        let whole = run(&[Bytes::from(bytes.clone())], strip);
        prop_assert_eq!(&run(&cut_at(&bytes, &cuts), strip), &whole);
        prop_assert_eq!(&whole.text, &contents.concat());
        prop_assert_eq!(whole.content_events, contents.iter().filter(|c| !c.is_empty()).count() as u64);
        prop_assert_eq!(whole.usage.map(|u| (u.prompt, u.completion)), Some((prompt, completion)));
        prop_assert!(whole.done);
        prop_assert_eq!(whole.violation, None);
    }
}

fn garbage() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(
            prop::sample::select([SSE_TOKENS, JSON_TOKENS].concat()),
            0..160
        )
        .prop_map(|p| p.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// See [`check_stream`]: any bytes, cut anywhere and a byte at a time.
    #[test]
    fn any_bytes_are_observed_as_a_full_parse_reads_them(
        bytes in garbage(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        check_stream(&bytes, &cuts);
        let every: Vec<usize> = (1..bytes.len()).collect();
        check_stream(&bytes, &every);
    }
}

const HEAD: &[u8] = br#"data: {"choices":[{"delta":{"content":""#;
const TAIL: &[u8] = b"\"}}]}\n\n";

/// A valid event of `len` bytes, blank line included, whose text is all `x`.
fn event_of_len(len: usize) -> Vec<u8> {
    let mut e = HEAD.to_vec();
    e.resize(len - TAIL.len(), b'x');
    e.extend_from_slice(TAIL);
    e
}

/// Frames of at most `max` bytes, sizes drawn from `seed`.
fn frames_upto(bytes: &[u8], max: usize, seed: u64) -> Vec<Bytes> {
    let mut rng = Rng(seed | 1);
    let mut cuts = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        at += 1 + rng.below(max as u64) as usize;
        cuts.push(at);
    }
    cut_at(bytes, &cuts)
}

/// The frames hyper hands over are at most this large in these tests.
const MAX_FRAME: usize = 64 * 1024;

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// An event whose unfinished part outgrows the bound is refused: the events before it
    /// pass, nothing of it or after it does, and what was metered before it stays. (Whether
    /// an event between the bound and the bound plus a frame passes depends on where the
    /// frames fall: the bound is on bytes held, not on event length.)
    #[test]
    fn an_event_past_the_bound_is_refused_however_cut(
        extra in 2 + MAX_FRAME..4 * MAX_FRAME,
        seed in any::<u64>(),
    ) {
        let before = multibyte_stream(&["é".into()], 3, 1, false);
        let before = &before[..before.len() - "data: [DONE]\n\n".len()];
        let mut bytes = before.to_vec();
        bytes.extend_from_slice(&event_of_len(MAX_EVENT_BYTES + extra));
        bytes.extend_from_slice(&multibyte_stream(&["after".into()], 9, 9, false));
        let seen = run(&frames_upto(&bytes, MAX_FRAME, seed), false);
        prop_assert_eq!(seen.violation, Some(Violation::EventTooLarge));
        prop_assert_eq!(&seen.forwarded[..], before);
        prop_assert_eq!(&seen.text, "é");
        prop_assert_eq!(seen.usage.map(|u| u.prompt), Some(3));
        prop_assert!(!seen.done);
    }

    /// An event of the bound's size passes, in any frames.
    #[test]
    fn an_event_of_the_bound_passes_however_cut(seed in any::<u64>()) {
        let event = event_of_len(MAX_EVENT_BYTES);
        let seen = run(&frames_upto(&event, MAX_FRAME, seed), false);
        prop_assert_eq!(seen.violation, None);
        prop_assert_eq!(seen.forwarded.len(), MAX_EVENT_BYTES);
        prop_assert_eq!(seen.text.len(), MAX_EVENT_BYTES - HEAD.len() - TAIL.len());
    }
}
