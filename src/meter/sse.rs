//! Watches an SSE stream as it passes: reads `usage` from whichever event carries it, keeps
//! the generated text for a count when usage never comes, holds back `data: [DONE]` so the
//! gateway's own closing comment can go before it, and removes usage from the stream of a
//! client that did not ask for it (asked for on its behalf, or sent by the engine anyway).
//!
//! Events are forwarded as soon as their terminating blank line arrives. Only the bytes of an
//! event not yet complete wait here, which is what lets an event be dropped or rewritten; that
//! wait is bounded ([`MAX_EVENT_BYTES`]) and each byte is searched for an event end once. A
//! frame made of whole events that need no change is forwarded as the same `Bytes`.
//!
//! Each event's JSON goes through [`scan`](super::scan): a validating one-pass scanner that
//! gives a full parse's answer on any valid JSON (spacing, key order, escapes, multi-line
//! `data:`), so every engine's dialect is metered alike; an event that repeats the last one's
//! bytes around another text string has only that string scanned (`Shape`). An event that is
//! not valid JSON is a protocol violation: nothing from it on is forwarded, and the stream is
//! ended by the gateway.

use super::scan::{scan, string_token, Scan};
use super::{timings_json, usage_json, Usage};
use bytes::{Bytes, BytesMut};
use std::borrow::Cow;

/// Generated text kept for a count, at most; past it, bytes are counted instead.
const MAX_KEPT: usize = 4 << 20;
/// Longest event kept as a [`Shape`]: content deltas are a few hundred bytes.
const MAX_SHAPE_BYTES: usize = 4096;
/// Longest event accepted. Engines send events of a few hundred bytes; one that never ends
/// would otherwise grow without bound.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// How an upstream broke the SSE protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// An event's data is not valid JSON.
    MalformedEvent,
    /// An event grew past [`MAX_EVENT_BYTES`] without ending.
    EventTooLarge,
}

impl Violation {
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::MalformedEvent => "malformed_event",
            Violation::EventTooLarge => "event_too_large",
        }
    }
}

#[derive(Debug, Default)]
pub struct SseObserver {
    partial: BytesMut,
    /// Bytes of `partial` already searched for an event end, and where its last line starts.
    searched: usize,
    line_start: usize,
    /// The client did not ask for usage: it must see none, whether the gateway asked for it
    /// or the engine sends it anyway.
    strip_usage: bool,
    /// The last valid `usage` the stream carried (cumulative when an engine repeats it).
    pub usage: Option<Usage>,
    /// llama.cpp's `timings` counts, for a stream that carried no usage.
    pub timings: Option<Usage>,
    /// Generated text, for a count if usage never comes.
    text: String,
    /// Text bytes beyond [`MAX_KEPT`].
    overflow_bytes: u64,
    /// The generated text of the event being scanned (reused).
    scratch: String,
    /// Events that carried generated text (for the time to first token and the budget cut).
    pub content_events: u64,
    pub saw_done: bool,
    /// An event carried an `error` object (an engine reporting a failure mid-stream).
    pub error_event: bool,
    /// A `usage` object was present but unusable (wrong types, negative numbers).
    pub bad_usage: bool,
    /// Set once the upstream broke the protocol; nothing more is forwarded.
    pub violation: Option<Violation>,
    /// The last content delta's bytes around its text.
    shape: Shape,
}

/// A scanned event's bytes before and after its one text string. Engines repeat the same
/// chunk around each token (id, model, index, finish_reason null), so the next event usually
/// differs from the last only in that string: when its bytes start and end the same, only the
/// string between is scanned. JSON's grammar makes that exact: one string token put in place
/// of another leaves the document as valid as it was and every other member where it was, so
/// the answer is the full scan's (`tests::a_repeated_shape_gives_the_full_scans_answer`).
#[derive(Debug, Default)]
struct Shape {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
    /// The full scan's answer for the event the shape was taken from.
    found: Scan,
    /// Whether `found` belongs to the bytes above (empty until a content delta is seen).
    set: bool,
}

impl Shape {
    /// Remembers `data`'s bytes around its one text string, when it has exactly one.
    fn take(&mut self, data: &[u8], found: &Scan) {
        self.set = false;
        let Some(span) = found.text_span.clone() else {
            return;
        };
        if found.text_parts != 1 || data.len() > MAX_SHAPE_BYTES {
            return;
        }
        self.prefix.clear();
        self.prefix.extend_from_slice(&data[..span.start]);
        self.suffix.clear();
        self.suffix.extend_from_slice(&data[span.end..]);
        self.found = found.clone();
        self.set = true;
    }

    /// The scan of `data` if it is this shape around another string (its text appended to
    /// `text`); `None` when a full scan must tell.
    fn fit(&self, data: &[u8], text: &mut String) -> Option<Scan> {
        let (p, s) = (self.prefix.len(), self.suffix.len());
        if !self.set
            || data.len() < p + s + 2
            || !data.starts_with(&self.prefix)
            || !data.ends_with(&self.suffix)
        {
            return None;
        }
        let token = &data[p..data.len() - s];
        if string_token(token, text).is_err() {
            text.clear();
            return None;
        }
        let old_end = self.found.text_span.as_ref()?.end;
        let by = token.len() as isize - (old_end - p) as isize;
        let mut found = self.found.shifted(old_end, by);
        if token.len() > 2 {
            found.text_span = Some(p..p + token.len());
        } else {
            found.text_span = None;
            found.text_parts = 0;
        }
        Some(found)
    }
}

enum Verdict {
    Keep,
    Drop,
    Rewrite(Vec<u8>),
    Violation(Violation),
}

impl SseObserver {
    pub fn new(strip_usage: bool) -> Self {
        Self {
            strip_usage,
            ..Default::default()
        }
    }

    /// Takes one upstream frame; returns what to send the client now (possibly nothing).
    pub fn feed(&mut self, frame: Bytes) -> Option<Bytes> {
        if self.violation.is_some() {
            return None;
        }
        if self.partial.is_empty() {
            // Usual case: the frame holds whole events; only an unfinished tail waits.
            let (complete, line_start) = ends(&frame, 0, 0);
            if complete == frame.len() {
                return self.process(frame);
            }
            self.partial.extend_from_slice(&frame[complete..]);
            self.searched = self.partial.len();
            self.line_start = line_start - complete;
            self.check_size();
            return if complete == 0 {
                None
            } else {
                self.process(frame.slice(..complete))
            };
        }
        self.partial.extend_from_slice(&frame);
        let (complete, line_start) = ends(&self.partial, self.searched, self.line_start);
        self.searched = self.partial.len() - complete;
        self.line_start = line_start - complete;
        if complete == 0 {
            self.check_size();
            return None;
        }
        let events = self.partial.split_to(complete).freeze();
        self.check_size();
        self.process(events)
    }

    fn check_size(&mut self) {
        if self.partial.len() > MAX_EVENT_BYTES {
            self.violation = Some(Violation::EventTooLarge);
            self.partial = BytesMut::new();
        }
    }

    /// Bytes of a last event that never got its blank line.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.partial.is_empty() || self.violation.is_some() {
            return None;
        }
        let mut rest = std::mem::take(&mut self.partial);
        rest.extend_from_slice(b"\n\n");
        self.process(rest.freeze())
    }

    /// Whole events in, what to forward out.
    fn process(&mut self, events: Bytes) -> Option<Bytes> {
        let mut out: Option<BytesMut> = None;
        let mut start = 0;
        let mut at = 0;
        while at < events.len() {
            let (end, _) = ends_first(&events, at);
            let event = &events[start..end];
            match self.inspect(event) {
                Verdict::Keep => {
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(event);
                    }
                }
                Verdict::Violation(v) => {
                    self.violation = Some(v);
                    self.partial = BytesMut::new();
                    let o = out.get_or_insert_with(|| BytesMut::from(&events[..start]));
                    return (!o.is_empty()).then(|| std::mem::take(o).freeze());
                }
                verdict => {
                    let o = out.get_or_insert_with(|| BytesMut::from(&events[..start]));
                    if let Verdict::Rewrite(bytes) = verdict {
                        o.extend_from_slice(&bytes);
                    }
                }
            }
            start = end;
            at = end;
        }
        match out {
            None if events.is_empty() => None,
            None => Some(events),
            Some(o) if o.is_empty() => None,
            Some(o) => Some(o.freeze()),
        }
    }

    fn inspect(&mut self, event: &[u8]) -> Verdict {
        let Some(data) = data_of(event) else {
            return Verdict::Keep;
        };
        let trimmed = data.trim_ascii();
        if trimmed == b"[DONE]" {
            self.saw_done = true;
            return Verdict::Drop;
        }
        if trimmed.is_empty() {
            return Verdict::Keep;
        }
        self.scratch.clear();
        let found = match self.shape.fit(&data, &mut self.scratch) {
            Some(found) => found,
            None => {
                let Ok(found) = scan(&data, &mut self.scratch) else {
                    return Verdict::Violation(Violation::MalformedEvent);
                };
                self.shape.take(&data, &found);
                found
            }
        };
        if let Some(span) = &found.usage {
            match usage_json(&data[span.clone()]) {
                Some(u) => self.usage = Some(u),
                None => self.bad_usage = true,
            }
        }
        if let Some(span) = &found.timings {
            self.timings = timings_json(&data[span.clone()]).or(self.timings);
        }
        if found.error {
            self.error_event = true;
        }
        if !self.scratch.is_empty() {
            self.content_events += 1;
            if self.text.len() + self.scratch.len() <= MAX_KEPT {
                self.text.push_str(&self.scratch);
            } else {
                self.overflow_bytes += self.scratch.len() as u64;
            }
        }
        if self.strip_usage {
            return strip_usage(event, &data, &found);
        }
        Verdict::Keep
    }

    /// The counts the stream carried: its usage, else the engine's timings.
    pub fn reported(&self) -> Option<Usage> {
        self.usage.or(self.timings)
    }

    /// The text the stream generated (content, reasoning, tool calls), for a count, and the
    /// bytes past what was kept. Taken: asked once, when the stream is settled.
    pub fn take_generated(&mut self) -> (String, u64) {
        (std::mem::take(&mut self.text), self.overflow_bytes)
    }
}

/// Hides the usage the client did not ask for: the usage-only chunk goes, and a `usage`
/// member (`null` on every chunk, or counts on the last one) is cut out of the others.
// `&Cow`, not `&[u8]`: whether the data is borrowed (one `data:` line) decides how to splice.
#[allow(clippy::ptr_arg)]
fn strip_usage(event: &[u8], data: &Cow<'_, [u8]>, found: &Scan) -> Verdict {
    if found.usage.is_some() && found.choices_empty {
        return Verdict::Drop;
    }
    let Some(cut) = &found.usage_member else {
        return Verdict::Keep;
    };
    let mut new_data = Vec::with_capacity(data.len());
    new_data.extend_from_slice(&data[..cut.start]);
    new_data.extend_from_slice(&data[cut.end..]);
    match data {
        // One `data:` line: splice in place, the rest of the event as it was.
        Cow::Borrowed(d) => {
            let offset = d.as_ptr() as usize - event.as_ptr() as usize;
            let mut v = Vec::with_capacity(event.len());
            v.extend_from_slice(&event[..offset]);
            v.extend_from_slice(&new_data);
            v.extend_from_slice(&event[offset + d.len()..]);
            Verdict::Rewrite(v)
        }
        // Several `data:` lines: the other fields as they were, the data on one line (its
        // newlines were JSON whitespace: a string cannot hold a raw one).
        Cow::Owned(_) => {
            let mut v = Vec::with_capacity(event.len());
            let mut data_written = false;
            for line in lines(event) {
                if is_data_line(line) {
                    if !data_written {
                        v.extend_from_slice(b"data: ");
                        v.extend(new_data.iter().map(|&c| if c == b'\n' { b' ' } else { c }));
                        v.push(b'\n');
                        data_written = true;
                    }
                } else if !line.is_empty() {
                    v.extend_from_slice(line);
                    v.push(b'\n');
                }
            }
            v.push(b'\n');
            Verdict::Rewrite(v)
        }
    }
}

/// Searches `b` from `from` (where the line in progress started at `line_start`) for event
/// ends; returns the offset just past the last one (0 if none) and where the last line starts.
fn ends(b: &[u8], from: usize, mut line_start: usize) -> (usize, usize) {
    let mut complete = 0;
    for nl in memchr::memchr_iter(b'\n', &b[from..]).map(|i| i + from) {
        let line = &b[line_start..nl];
        if line.is_empty() || line == b"\r" {
            complete = nl + 1;
        }
        line_start = nl + 1;
    }
    (complete, line_start)
}

/// The end of the first event starting at `from` in a buffer of whole events.
fn ends_first(b: &[u8], from: usize) -> (usize, usize) {
    let mut line_start = from;
    for nl in memchr::memchr_iter(b'\n', &b[from..]).map(|i| i + from) {
        let line = &b[line_start..nl];
        if line.is_empty() || line == b"\r" {
            return (nl + 1, nl + 1);
        }
        line_start = nl + 1;
    }
    (b.len(), b.len())
}

/// The event's lines, `\r` ends removed; as `split` on `\n` yields them (a last empty line
/// after a final `\n`), found by `memchr` rather than a test per byte.
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(event);
    std::iter::from_fn(move || {
        let r = rest?;
        let line = match memchr::memchr(b'\n', r) {
            Some(nl) => {
                rest = Some(&r[nl + 1..]);
                &r[..nl]
            }
            None => {
                rest = None;
                r
            }
        };
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
}

fn is_data_line(line: &[u8]) -> bool {
    line == b"data" || line.starts_with(b"data:")
}

/// The event's data (its `data:` lines joined by `\n`, one leading space of each removed),
/// or `None` for an event with no data (comments, keep-alives).
fn data_of(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in lines(event) {
        if !is_data_line(line) {
            continue;
        }
        let rest = &line[line.len().min(5)..];
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        data = Some(match data {
            None => Cow::Borrowed(rest),
            Some(prev) => {
                let mut v = prev.into_owned();
                v.push(b'\n');
                v.extend_from_slice(rest);
                Cow::Owned(v)
            }
        });
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":null}}\n\n")
    }
    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    /// Documents around one text string, and strings (raw bytes) to put in its place.
    const SHAPES: [&str; 6] = [
        r#"{"id":"c","choices":[{"index":0,"delta":{"content":@},"finish_reason":null}],"usage":null}"#,
        r#"{"usage":null,"id":"c","choices":[{"index":0,"delta":{"content":@}}]}"#,
        r#"{"id": "c", "choices": [{"delta": {"role": "assistant", "content": @}, "index": 0}], "usage": null}"#,
        r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":@}}]}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
        r#"{"choices":[{"delta":{"content":"","reasoning_content":@}}],"timings":{"prompt_n":1}}"#,
        r#"{"choices":[{"text":@,"index":0}],"error":null}"#,
    ];
    const MIDDLES: [&[u8]; 16] = [
        br#""Hello""#,
        br#""""#,
        br#""a much longer piece of text than the one the shape was taken from""#,
        br#""a\"b\\c\n""#,
        br#""\u00e9\ud83d\ude00 caf\u00e9""#,
        "\"é😀\"".as_bytes(),
        br#""a","content":"b""#,
        br#""a"},"x":{"y":"b""#,
        br#""a"#,
        b"\"a\nb\"",
        br#""\ud800""#,
        br#""\x""#,
        b"\"\xff\"",
        br#"null"#,
        br#""a" "b""#,
        br#""#,
    ];

    #[test]
    fn a_repeated_shape_gives_the_full_scans_answer() {
        let mut fitted = 0;
        for shape in SHAPES {
            let (before, after) = shape.split_once('@').unwrap();
            let of = |middle: &[u8]| [before.as_bytes(), middle, after.as_bytes()].concat();
            let first = of(br#""Hi""#);
            let mut text = String::new();
            let found = scan(&first, &mut text).unwrap();
            let mut s = Shape::default();
            s.take(&first, &found);
            assert!(s.set, "{shape}");
            for middle in MIDDLES {
                let doc = of(middle);
                let (mut fast, mut full) = (String::new(), String::new());
                let expected = scan(&doc, &mut full);
                match s.fit(&doc, &mut fast) {
                    Some(found) => {
                        fitted += 1;
                        assert_eq!(Ok(found), expected, "{}", String::from_utf8_lossy(&doc));
                        assert_eq!(fast, full);
                    }
                    None => assert!(fast.is_empty()),
                }
                // Not one string: the full scan tells (valid or not), never the shape.
                if middle.first() != Some(&b'"') || middle.len() < 2 {
                    assert!(s.fit(&doc, &mut String::new()).is_none());
                }
            }
        }
        // Every valid string of the list fitted, in every shape.
        assert_eq!(fitted, SHAPES.len() * 6);
    }

    #[test]
    fn usage_is_cut_at_the_right_place_when_the_text_around_it_changes_length() {
        let mut o = SseObserver::new(true);
        for content in ["Hi", "a longer piece", "", "x\\\"y", "é"] {
            let out = o.feed(Bytes::from(chunk(content))).unwrap();
            let expected = format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n");
            assert_eq!(std::str::from_utf8(&out).unwrap(), expected);
        }
        assert_eq!(o.take_generated().0, "Hia longer piecex\"yé");
        assert_eq!(o.content_events, 4);
    }

    #[test]
    fn whole_events_pass_as_the_same_bytes_and_done_is_held_back() {
        let mut o = SseObserver::new(false);
        let frame = Bytes::from(chunk("Hi"));
        let out = o.feed(frame.clone()).unwrap();
        assert_eq!(out.as_ptr(), frame.as_ptr(), "no copy");
        assert_eq!(o.feed(Bytes::from(USAGE)).unwrap(), USAGE);
        assert_eq!(o.feed(Bytes::from(DONE)), None);
        assert!(o.saw_done);
        assert_eq!(o.usage.unwrap().completion, 2);
        assert_eq!(o.take_generated().0, "Hi");
    }

    #[test]
    fn events_split_across_frames_are_released_when_complete() {
        let mut o = SseObserver::new(false);
        let all = format!("{}{}", chunk("Hel"), chunk("lo"));
        let (a, b) = all.split_at(20);
        assert_eq!(o.feed(Bytes::copy_from_slice(a.as_bytes())), None);
        let out = o.feed(Bytes::copy_from_slice(b.as_bytes())).unwrap();
        assert_eq!(out, all.as_bytes());
        assert_eq!(o.take_generated().0, "Hello");
        assert_eq!(o.content_events, 2);
    }

    #[test]
    fn a_frame_with_whole_events_and_a_tail_forwards_the_whole_ones_now() {
        let mut o = SseObserver::new(false);
        let all = format!("{}{}", chunk("a"), chunk("b"));
        let cut = chunk("a").len() + 5;
        let out = o
            .feed(Bytes::copy_from_slice(&all.as_bytes()[..cut]))
            .unwrap();
        assert_eq!(out, chunk("a").as_bytes());
        let out = o
            .feed(Bytes::copy_from_slice(&all.as_bytes()[cut..]))
            .unwrap();
        assert_eq!(out, chunk("b").as_bytes());
    }

    #[test]
    fn usage_asked_by_the_gateway_is_removed() {
        let mut o = SseObserver::new(true);
        let out = o
            .feed(Bytes::from(format!("{}{USAGE}{DONE}", chunk("Hi"))))
            .unwrap();
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(!text.contains("usage"), "{text}");
        assert!(text.contains("\"content\":\"Hi\""));
        assert_eq!(o.usage.unwrap().prompt, 7, "still read for metering");
    }

    #[test]
    fn usage_is_removed_from_spaced_and_multi_line_json_too() {
        let mut o = SseObserver::new(true);
        let spaced =
            "data: {\"choices\": [{\"delta\": {\"content\": \"Hi\"}}], \"usage\": null}\n\n";
        let out = o.feed(Bytes::from(spaced)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out[6..]).unwrap();
        assert!(v.get("usage").is_none());
        let multi = "event: chunk\ndata: {\"choices\": [{\"delta\": {\"content\": \"!\"}}],\ndata:  \"usage\": null}\n\n";
        let out = o.feed(Bytes::from(multi)).unwrap();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(s.starts_with("event: chunk\ndata: "), "{s}");
        assert!(!s.contains("usage"), "{s}");
        assert_eq!(o.take_generated().0, "Hi!");
    }

    #[test]
    fn usage_is_read_from_a_chunk_that_still_has_choices() {
        let mut o = SseObserver::new(false);
        let last = "data: {\"choices\":[{\"delta\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        assert_eq!(o.feed(Bytes::from(last)).unwrap(), last);
        assert_eq!(o.usage.unwrap().prompt, 3);
        assert_eq!(o.take_generated().0, "!");
    }

    #[test]
    fn llama_cpp_timings_count_when_no_usage_comes() {
        let mut o = SseObserver::new(false);
        let last = "data: {\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}],\"timings\":{\"cache_n\":24,\"prompt_n\":13,\"prompt_ms\":49.04,\"predicted_n\":26}}\n\n";
        o.feed(Bytes::from(last));
        assert_eq!(o.usage, None);
        let u = o.reported().unwrap();
        assert_eq!((u.prompt, u.completion, u.cached), (37, 26, 24));
    }

    #[test]
    fn escaped_text_is_decoded_for_the_count() {
        let mut o = SseObserver::new(false);
        o.feed(Bytes::from(r#"data: {"choices":[{"delta":{"content":"say \"hi\"\n","tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]}}]}"#.to_string() + "\n\n"));
        assert_eq!(o.take_generated().0, "say \"hi\"\n{\"a\":1}");
        assert_eq!(o.content_events, 1);
    }

    #[test]
    fn crlf_events_and_comments_pass() {
        let mut o = SseObserver::new(false);
        let s = ": ping\r\n\r\ndata: {\"choices\":[{\"text\":\"x\"}]}\r\n\r\n";
        assert_eq!(o.feed(Bytes::from(s)).unwrap(), s);
        assert_eq!(o.take_generated().0, "x");
    }

    #[test]
    fn an_unterminated_last_event_is_flushed_at_the_end() {
        let mut o = SseObserver::new(false);
        assert_eq!(o.feed(Bytes::from("data: {\"choices\":[]}")), None);
        assert_eq!(o.finish().unwrap(), "data: {\"choices\":[]}\n\n");
    }

    #[test]
    fn a_malformed_event_stops_forwarding_at_it() {
        let mut o = SseObserver::new(false);
        let frame = format!("{}data: {{\"choices\": [\n\n{}", chunk("a"), chunk("b"));
        let out = o.feed(Bytes::from(frame)).unwrap();
        assert_eq!(out, chunk("a").as_bytes());
        assert_eq!(o.violation, Some(Violation::MalformedEvent));
        assert_eq!(o.feed(Bytes::from(chunk("c"))), None);
        assert_eq!(o.take_generated().0, "a");
    }

    #[test]
    fn bad_usage_is_noted_and_not_used() {
        let mut o = SseObserver::new(false);
        let bad = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-3,\"completion_tokens\":\"x\"}}\n\n";
        assert!(o.feed(Bytes::from(bad)).is_some());
        assert!(o.usage.is_none());
        assert!(o.bad_usage);
    }

    #[test]
    fn an_event_that_never_ends_is_bounded() {
        let mut o = SseObserver::new(false);
        let piece = Bytes::from(vec![b'x'; 64 * 1024]);
        o.feed(Bytes::from_static(b"data: \""));
        for _ in 0..(MAX_EVENT_BYTES / piece.len() + 1) {
            assert_eq!(o.feed(piece.clone()), None);
        }
        assert_eq!(o.violation, Some(Violation::EventTooLarge));
        assert!(o.partial.capacity() < 1024);
    }
}
