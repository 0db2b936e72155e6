//! The stream translators on the wire: byte frames in, whole SSE events split out, translated
//! events back. The transport (`upstream::stream`) meters OpenAI chunks; these sit on either
//! side of it when the backend or the client speaks Anthropic's API.

use super::{StreamToAnthropic, StreamToOpenAi, Untranslatable};
use bytes::{Bytes, BytesMut};

/// The longest Anthropic event accepted while it is incomplete; the meter's own bound.
const MAX_EVENT_BYTES: usize = crate::meter::sse::MAX_EVENT_BYTES;

/// Splits whole SSE events off `buf` (events end at a blank line, `\n\n` or `\r\n\r\n`) and
/// gives each to `each` as its `event:` name and joined `data:` lines.
fn whole_events(
    buf: &mut BytesMut,
    mut each: impl FnMut(&str, &[u8]) -> Result<(), Untranslatable>,
) -> Result<(), Untranslatable> {
    loop {
        let Some((end, sep)) = event_end(buf) else {
            if buf.len() > MAX_EVENT_BYTES {
                return Err(Untranslatable::new(
                    "stream",
                    "an upstream event grew past its bound",
                ));
            }
            return Ok(());
        };
        let event = buf.split_to(end + sep);
        let text = &event[..end];
        let (mut name, mut data) = ("", Vec::new());
        for line in text.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(v) = field(line, b"event") {
                name = std::str::from_utf8(v).unwrap_or("");
            } else if let Some(v) = field(line, b"data") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(v);
            }
        }
        if !data.is_empty() {
            // `name` borrows from `event`, which lives to the end of this iteration.
            each(name, &data)?;
        }
    }
}

fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The value of an SSE field line `name: value` (one optional space after the colon).
fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?.strip_prefix(b":")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// An Anthropic backend's stream as OpenAI chunks, for the meter and an OpenAI client.
#[derive(Debug, Default)]
pub struct FromAnthropic {
    buf: BytesMut,
    inner: StreamToOpenAi,
}

impl FromAnthropic {
    pub fn new() -> Self {
        Self::default()
    }

    /// For an Anthropic client: the chunks also carry what only Anthropic events can say (see
    /// [`StreamToOpenAi::with_anthropic_extras`]), so its events are the backend's own.
    pub fn for_anthropic_client() -> Self {
        Self {
            buf: BytesMut::new(),
            inner: StreamToOpenAi::new().with_anthropic_extras(true),
        }
    }

    /// One upstream frame in; the OpenAI frames of the events it completed out (maybe none).
    pub fn feed(&mut self, frame: &[u8]) -> Result<Bytes, Untranslatable> {
        self.buf.extend_from_slice(frame);
        let mut out = BytesMut::new();
        let inner = &mut self.inner;
        whole_events(&mut self.buf, |name, data| {
            inner.event(name, data, &mut out)
        })?;
        Ok(out.freeze())
    }
}

/// An OpenAI stream (the meter's output, and the gateway's own ending) as Anthropic events
/// for an Anthropic client. The gateway's cost comment goes through where it comes, before
/// `message_stop`: the translator's `message_stop` waits for the stream's `[DONE]`.
#[derive(Debug)]
pub struct ToAnthropic {
    buf: BytesMut,
    inner: StreamToAnthropic,
    /// A `message_stop` made before the stream's end, held so the cost comment precedes it.
    held: Option<Bytes>,
}

const MESSAGE_STOP: &[u8] = b"event: message_stop\n";

impl ToAnthropic {
    pub fn new(model: &str) -> Self {
        Self {
            buf: BytesMut::new(),
            inner: StreamToAnthropic::new(model),
            held: None,
        }
    }

    /// Whole OpenAI events in (the meter passes whole events only); Anthropic events out.
    pub fn feed(&mut self, events: &[u8]) -> Bytes {
        self.buf.extend_from_slice(events);
        let mut out = BytesMut::new();
        while let Some((end, sep)) = event_end(&self.buf) {
            let event = self.buf.split_to(end + sep);
            let text = &event[..end];
            if text.first() == Some(&b':') {
                // A comment (the gateway's cost line): as it is, then what it was held for.
                out.extend_from_slice(&event);
                continue;
            }
            let data = text
                .split(|&b| b == b'\n')
                .filter_map(|l| field(l.strip_suffix(b"\r").unwrap_or(l), b"data"))
                .next()
                .unwrap_or(b"");
            if data == b"[DONE]" {
                self.inner.done(&mut out);
                if let Some(stop) = self.held.take() {
                    out.extend_from_slice(&stop);
                }
                continue;
            }
            if data.is_empty() {
                continue;
            }
            let mark = out.len();
            if let Err(e) = self.inner.chunk(data, &mut out) {
                out.truncate(mark);
                let body = super::error_body("api_error", &e.message);
                out.extend_from_slice(b"event: error\ndata: ");
                out.extend_from_slice(&body);
                out.extend_from_slice(b"\n\n");
                continue;
            }
            if let Some(at) = memchr::memmem::find(&out[mark..], MESSAGE_STOP) {
                self.held = Some(out.split_off(mark + at).freeze());
            }
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_frames_split_anywhere_become_the_same_chunks() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n\
event: content_block_start\r\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\r\n\r\n\
event: ping\ndata: {\"type\":\"ping\"}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi there\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let whole = FromAnthropic::new().feed(stream.as_bytes()).unwrap();
        for cut in [1, 17, 100, 333, stream.len() - 1] {
            let mut t = FromAnthropic::new();
            let mut got = t.feed(&stream.as_bytes()[..cut]).unwrap().to_vec();
            got.extend_from_slice(&t.feed(&stream.as_bytes()[cut..]).unwrap());
            // Chunks carry a `created` second; compare without it.
            let strip = |b: &[u8]| {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(|l| l.split("\"created\"").next().unwrap_or("").to_string())
                    .collect::<Vec<_>>()
            };
            assert_eq!(strip(&got), strip(&whole), "cut at {cut}");
        }
        let text = String::from_utf8_lossy(&whole);
        assert!(text.contains("Hi there"), "{text}");
        assert!(text.contains("\"prompt_tokens\":7"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    #[test]
    fn anthropic_on_both_sides_keeps_what_openai_chunks_cannot_say() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":7,\"cache_read_input_tokens\":100,\"cache_creation_input_tokens\":30,\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":30},\"output_tokens\":1}}}\n\n\
event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"one, two\"}}\n\n\
event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"stop_sequence\",\"stop_sequence\":\"three\"},\"usage\":{\"output_tokens\":4}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let chunks = FromAnthropic::for_anthropic_client()
            .feed(stream.as_bytes())
            .unwrap();
        let events = String::from_utf8(ToAnthropic::new("claude").feed(&chunks).to_vec()).unwrap();
        let data = |name: &str| -> serde_json::Value {
            let at = events.find(&format!("event: {name}\ndata: ")).unwrap() + name.len() + 14;
            let end = events[at..].find('\n').unwrap();
            serde_json::from_str(&events[at..at + end]).unwrap()
        };
        let start = data("message_start");
        assert_eq!(
            start["message"]["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
            30
        );
        assert_eq!(start["message"]["usage"]["cache_read_input_tokens"], 100);
        let delta = data("message_delta");
        assert_eq!(delta["delta"]["stop_reason"], "stop_sequence", "{events}");
        assert_eq!(delta["delta"]["stop_sequence"], "three");
        assert_eq!(
            delta["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
            30
        );
        assert_eq!(delta["usage"]["output_tokens"], 4);
        // An OpenAI client gets no such members.
        let plain = FromAnthropic::new().feed(stream.as_bytes()).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("x_anthropic"));
    }

    #[test]
    fn the_cost_comment_goes_before_message_stop() {
        let mut t = ToAnthropic::new("m");
        let mut out = t.feed(b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n").to_vec();
        out.extend_from_slice(&t.feed(b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n"));
        out.extend_from_slice(&t.feed(b": tollgate {\"cost_usd\":0.1}\n\ndata: [DONE]\n\n"));
        let text = String::from_utf8(out).unwrap();
        let comment = text.find(": tollgate").unwrap();
        let delta = text.find("event: message_delta").unwrap();
        let stop = text.find("event: message_stop").unwrap();
        assert!(delta < comment && comment < stop, "{text}");
        assert!(text.ends_with("\n\n"));
        assert_eq!(text.matches("event: message_stop").count(), 1, "{text}");
    }

    #[test]
    fn an_error_event_ends_an_anthropic_client_stream_in_its_own_shape() {
        let mut t = ToAnthropic::new("m");
        let out = t.feed(b"data: {\"error\":{\"message\":\"upstream broke\",\"type\":\"server_error\",\"code\":null,\"param\":null}}\n\n");
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("event: error\ndata: "), "{text}");
        assert!(text.contains("upstream broke"), "{text}");
    }
}
