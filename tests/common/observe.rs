//! The SSE observer run over any bytes, and what must hold whatever they are. Written once,
//! driven by proptest (`tests/observer.rs`) and by the mutation fuzzer (`tests/fuzz.rs`).
#![allow(dead_code)]

use super::full_parse;
use bytes::Bytes;
use tollgate::meter::sse::{SseObserver, Violation};
use tollgate::meter::{Usage, MAX_REPORTED_TOKENS};

/// Pieces of SSE framing, to build or mutate streams that get past the first byte.
#[rustfmt::skip]
pub const SSE_TOKENS: &[&[u8]] = &[
    b"data:", b"data: ", b"data", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\r", b": ping\n\n",
    b"event: chunk\n", b"id: 7\n", b"retry: 10\n", b"data: [DONE]\n\n", b"[DONE]",
    b"\"usage\":null", b"\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}",
    b"\"choices\":[]", b"\"error\":{\"message\":\"x\"}", b"\"content\":\"\xc3\xa9\"",
];

/// Pieces of JSON and of the members the meter looks for, awkward numbers and escapes, and
/// bytes that are not UTF-8.
#[rustfmt::skip]
pub const JSON_TOKENS: &[&[u8]] = &[
    b"{", b"}", b"[", b"]", b",", b":", b"\"", b"\\", b"\\u", b"\\u0000", b"\\ud83d\\ude00",
    b"\\ud800", b"\\udc00", b"null", b"true", b"false", b"-", b"0", b"-0", b"7", b"1e400",
    b"1E+2", b"0.5", b"4294967295", b"4294967296", b"18446744073709551616", b" ", b"\t",
    b"\"usage\"", b"\"choices\"", b"\"delta\"", b"\"message\"", b"\"content\"", b"\"text\"",
    b"\"reasoning_content\"", b"\"tool_calls\"", b"\"function\"", b"\"arguments\"",
    b"\"thinking\"", b"\"timings\"", b"\"error\"", b"\"prompt_tokens\"",
    b"\"completion_tokens\"", b"\"prompt_n\"", b"\"predicted_n\"", b"\"cache_n\"",
    b"\"con\\u0074ent\"", b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xff", b"\xe4\xb8",
];

/// Everything the observer tells the gateway about a stream, and what it forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub forwarded: Vec<u8>,
    pub usage: Option<Usage>,
    pub timings: Option<Usage>,
    pub text: String,
    pub overflow: u64,
    pub content_events: u64,
    pub done: bool,
    pub error_event: bool,
    pub bad_usage: bool,
    pub violation: Option<Violation>,
}

impl Observed {
    /// What does not depend on whether usage is hidden from the client.
    pub fn metering(&self) -> Observed {
        Observed {
            forwarded: Vec::new(),
            ..self.clone()
        }
    }
}

/// Any input, valid or not; once the upstream broke the protocol, nothing more comes out.
pub fn run(frames: &[Bytes], strip_usage: bool) -> Observed {
    let mut o = SseObserver::new(strip_usage);
    let mut forwarded = Vec::new();
    for f in frames {
        let broken = o.violation.is_some();
        if let Some(b) = o.feed(f.clone()) {
            assert!(!broken, "bytes forwarded after a violation");
            assert!(!b.is_empty(), "an empty frame is sent as none");
            forwarded.extend_from_slice(&b);
        }
    }
    if let Some(b) = o.finish() {
        assert!(o.violation.is_none());
        forwarded.extend_from_slice(&b);
    }
    let (text, overflow) = o.take_generated();
    Observed {
        forwarded,
        usage: o.usage,
        timings: o.timings,
        text,
        overflow,
        content_events: o.content_events,
        done: o.saw_done,
        error_event: o.error_event,
        bad_usage: o.bad_usage,
        violation: o.violation,
    }
}

pub fn cut_at(bytes: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < bytes.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut frames = Vec::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        frames.push(Bytes::copy_from_slice(&bytes[at..c]));
        at = c;
    }
    frames
}

pub fn bytewise(bytes: &[u8]) -> Vec<Bytes> {
    bytes
        .iter()
        .map(|&b| Bytes::copy_from_slice(&[b]))
        .collect()
}

/// No count past what one request can have ([`MAX_REPORTED_TOKENS`]). The prompt is held to
/// it without its cached and cache-write parts: a prompt summed from parts that are each in
/// bounds can pass it (`a_prompt_summed_from_parts_is_bounded_too` in `tests/fuzz.rs`).
fn assert_counts_bounded(u: &Option<Usage>) {
    if let Some(u) = u {
        assert!(u.cached + u.cache_write <= u.prompt, "{u:?}");
        let uncached = u.prompt - u.cached - u.cache_write;
        for n in [uncached, u.completion, u.cached, u.cache_write, u.reasoning] {
            assert!(n <= MAX_REPORTED_TOKENS, "{u:?}");
        }
    }
}

/// Whatever an upstream sends, the observer does not panic; reads it the same however it is
/// cut (`cuts`: offsets); meters the same whether or not it hides usage from the client;
/// forwards nothing it did not receive but the blank line that ends a last event; forwards a
/// stream that reads again as the same; and, where a full parse is an oracle, finds what a
/// full parse of each event finds. Events must be under the bound: past it, where frames fall
/// decides (see `tests/observer.rs`).
pub fn check_stream(bytes: &[u8], cuts: &[usize]) {
    let whole = run(&[Bytes::copy_from_slice(bytes)], false);
    assert_eq!(run(&cut_at(bytes, cuts), false), whole, "cut at {cuts:?}");
    assert!(whole.forwarded.len() <= bytes.len() + 2);
    assert_counts_bounded(&whole.usage);
    assert_counts_bounded(&whole.timings);
    let hidden = run(&cut_at(bytes, cuts), true);
    assert_eq!(
        hidden.metering(),
        whole.metering(),
        "hiding usage changed the metering"
    );
    assert_eq!(run(&[Bytes::copy_from_slice(bytes)], true), hidden);

    // What passed once passes again unchanged in meaning; its `[DONE]` was held back.
    let again = run(&[Bytes::from(whole.forwarded.clone())], false);
    assert_eq!(again.violation, None);
    assert!(!again.done);
    assert_eq!(again.forwarded, whole.forwarded);
    assert_eq!(
        (
            again.usage,
            again.timings,
            &again.text,
            again.content_events,
            again.bad_usage
        ),
        (
            whole.usage,
            whole.timings,
            &whole.text,
            whole.content_events,
            whole.bad_usage
        )
    );

    let Some(want) = full_parse::meter(bytes) else {
        return;
    };
    let got = full_parse::Metered {
        usage: whole.usage,
        bad_usage: whole.bad_usage,
        timings: whole.timings,
        text: whole.text.clone(),
        content_events: whole.content_events,
        done: whole.done,
        error_event: whole.error_event,
        malformed: whole.violation == Some(Violation::MalformedEvent),
    };
    assert_eq!(got, want, "the observer and a full parse disagree");
    // A client that did not ask for usage sees none.
    let shown = run(&[Bytes::from(hidden.forwarded)], false);
    assert_eq!((shown.usage, shown.bad_usage), (None, false), "usage shown");
}
