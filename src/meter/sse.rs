//! Watches an SSE stream as it passes: reads `usage` from whichever event carries it, keeps
//! the generated text for a local count, holds back `data: [DONE]` so the gateway's own
//! closing comment can go before it, and removes the usage the gateway asked for on a
//! client's behalf when the client did not ask for it.
//!
//! Events are forwarded as soon as their terminating blank line arrives. Only the bytes of an
//! event not yet complete wait here, which is what lets an event be dropped or rewritten.
//! A frame made of whole events that need no change is forwarded as the same `Bytes`.
//!
//! Events are scanned, not parsed: only the one that carries `usage` is parsed. From the others
//! only the generated text is kept (the string values of `content`, `text`, `arguments`,
//! `reasoning_content`), a few bytes a token, for a local count if usage never comes.

use super::{usage_of, Usage};
use bytes::{Bytes, BytesMut};
use memchr::memmem;
use std::borrow::Cow;

/// Generated text kept for a local count, at most; past it, bytes are counted instead.
const MAX_KEPT: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct SseObserver {
    partial: BytesMut,
    /// The gateway added `stream_options.include_usage`; the client must not see its effects.
    strip_usage: bool,
    pub usage: Option<Usage>,
    /// Generated text, for a local count if usage never comes.
    text: String,
    /// Text bytes beyond [`MAX_KEPT`].
    overflow_bytes: u64,
    /// Events that carried generated text (for the time to first token).
    pub content_events: u64,
    pub saw_done: bool,
}

enum Verdict {
    Keep,
    Drop,
    Rewrite(Vec<u8>),
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
        if self.partial.is_empty() {
            let complete = complete_len(&frame);
            if complete == frame.len() {
                return self.process(frame);
            }
            self.partial.extend_from_slice(&frame);
        } else {
            self.partial.extend_from_slice(&frame);
        }
        let complete = complete_len(&self.partial);
        if complete == 0 {
            return None;
        }
        let events = self.partial.split_to(complete).freeze();
        self.process(events)
    }

    /// Bytes of a last event that never got its blank line.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.partial.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.partial).freeze();
        let mut with_end = BytesMut::from(&rest[..]);
        with_end.extend_from_slice(b"\n\n");
        self.process(with_end.freeze())
    }

    /// Whole events in, what to forward out.
    fn process(&mut self, events: Bytes) -> Option<Bytes> {
        let mut out: Option<BytesMut> = None;
        let mut start = 0;
        for end in boundaries(&events) {
            let event = &events[start..end];
            match self.inspect(event) {
                Verdict::Keep => {
                    if let Some(o) = out.as_mut() {
                        o.extend_from_slice(event);
                    }
                }
                verdict => {
                    let o = out.get_or_insert_with(|| BytesMut::from(&events[..start]));
                    if let Verdict::Rewrite(bytes) = verdict {
                        o.extend_from_slice(&bytes);
                    }
                }
            }
            start = end;
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
        if data.as_ref() == b"[DONE]" {
            self.saw_done = true;
            return Verdict::Drop;
        }
        if data.first() != Some(&b'{') {
            return Verdict::Keep;
        }
        let has_usage = memmem::find(&data, b"\"usage\":{").is_some()
            || memmem::find(&data, b"\"usage\": {").is_some();
        if has_usage {
            if let Some(u) = usage_of(&data) {
                self.usage = Some(u);
            }
        }
        let mut carried = false;
        for key in TEXT_KEYS {
            for at in memmem::find_iter(&data, key) {
                // The key's value starts at its opening quote (the last byte of the key).
                let start = at + key.len() - 1;
                let Some(value) = json_string(&data[start..]) else {
                    continue;
                };
                if value.is_empty() {
                    continue;
                }
                carried = true;
                if self.text.len() + value.len() <= MAX_KEPT {
                    self.text.push_str(&value);
                } else {
                    self.overflow_bytes += value.len() as u64;
                }
            }
        }
        if carried {
            self.content_events += 1;
        }
        if self.strip_usage {
            if has_usage && memmem::find(&data, b"\"choices\":[]").is_some() {
                return Verdict::Drop;
            }
            return strip_usage_field(event);
        }
        Verdict::Keep
    }

    /// The text the stream generated (content, reasoning, tool calls), for a local count,
    /// and the bytes past what was kept.
    pub fn generated(&self) -> (String, u64) {
        (self.text.clone(), self.overflow_bytes)
    }
}

/// Keys whose string values are generated text, quote included.
const TEXT_KEYS: [&[u8]; 4] = [
    b"\"content\":\"",
    b"\"text\":\"",
    b"\"arguments\":\"",
    b"\"reasoning_content\":\"",
];

/// The JSON string literal at the start of `b` (which begins with `"`), decoded.
fn json_string(b: &[u8]) -> Option<Cow<'_, str>> {
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return serde_json::from_slice(&b[..=i]).ok(),
            _ => i += 1,
        }
    }
    None
}

/// Length of the prefix made of complete events (ending in a blank line).
fn complete_len(b: &[u8]) -> usize {
    boundaries(b).last().unwrap_or(0)
}

/// End offsets of complete events: just past each blank line (`\n\n` or `\r\n\r\n`).
fn boundaries(b: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let mut line_start = 0;
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() {
            if b[i] == b'\n' {
                let line = &b[line_start..i];
                i += 1;
                let blank = line.is_empty() || line == b"\r";
                line_start = i;
                if blank {
                    return Some(i);
                }
            } else {
                i += 1;
            }
        }
        None
    })
}

/// The event's data (its `data:` lines joined by `\n`), or `None` for a comment-only event.
fn data_of(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut data: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
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
    }
    data
}

/// Removes `"usage":null` that `include_usage` adds to every chunk, so a client that did not
/// ask sees the chunks it would see without the gateway. Compact JSON only (what vLLM, OpenAI
/// and llama.cpp send); anything else is left alone, which SDKs tolerate.
fn strip_usage_field(event: &[u8]) -> Verdict {
    for pat in [&b",\"usage\":null"[..], b"\"usage\":null,"] {
        if let Some(at) = memmem::find(event, pat) {
            let mut v = Vec::with_capacity(event.len());
            v.extend_from_slice(&event[..at]);
            v.extend_from_slice(&event[at + pat.len()..]);
            return Verdict::Rewrite(v);
        }
    }
    Verdict::Keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        format!("data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}],\"usage\":null}}\n\n")
    }
    const USAGE: &str = "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

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
        assert_eq!(o.generated().0, "Hi");
    }

    #[test]
    fn events_split_across_frames_are_released_when_complete() {
        let mut o = SseObserver::new(false);
        let all = format!("{}{}", chunk("Hel"), chunk("lo"));
        let (a, b) = all.split_at(20);
        assert_eq!(o.feed(Bytes::copy_from_slice(a.as_bytes())), None);
        let out = o.feed(Bytes::copy_from_slice(b.as_bytes())).unwrap();
        assert_eq!(out, all.as_bytes());
        assert_eq!(o.generated().0, "Hello");
        assert_eq!(o.content_events, 2);
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
    fn usage_is_read_from_a_chunk_that_still_has_choices() {
        let mut o = SseObserver::new(false);
        let last = "data: {\"choices\":[{\"delta\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n";
        assert_eq!(o.feed(Bytes::from(last)).unwrap(), last);
        assert_eq!(o.usage.unwrap().prompt, 3);
        assert_eq!(o.generated().0, "!");
    }

    #[test]
    fn escaped_text_is_decoded_for_the_local_count() {
        let mut o = SseObserver::new(false);
        o.feed(Bytes::from(r#"data: {"choices":[{"delta":{"content":"say \"hi\"\n","tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]}}]}"#.to_string() + "\n\n"));
        assert_eq!(o.generated().0, "say \"hi\"\n{\"a\":1}");
        assert_eq!(o.content_events, 1);
    }

    #[test]
    fn crlf_events_and_comments_pass() {
        let mut o = SseObserver::new(false);
        let s = ": ping\r\n\r\ndata: {\"choices\":[{\"text\":\"x\"}]}\r\n\r\n";
        assert_eq!(o.feed(Bytes::from(s)).unwrap(), s);
        assert_eq!(o.generated().0, "x");
    }

    #[test]
    fn an_unterminated_last_event_is_flushed_at_the_end() {
        let mut o = SseObserver::new(false);
        assert_eq!(o.feed(Bytes::from("data: {\"choices\":[]}")), None);
        assert_eq!(o.finish().unwrap(), "data: {\"choices\":[]}\n\n");
    }
}
