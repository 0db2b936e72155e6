//! Reads only what routing needs from an OpenAI request body, borrowing from the received
//! bytes; the bytes themselves are forwarded as they are, except for the `model` value when
//! an alias resolves to another name (one splice, one copy).

use super::endpoint::Endpoint;
use crate::config::{Features, Protocol};
use crate::ctx::RequestCtx;
use crate::error::GatewayError;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// The fields of a request the gateway acts on.
#[derive(Debug)]
pub struct RequestSummary<'a> {
    pub model: Cow<'a, str>,
    /// Byte range of the model's JSON string (quotes included) within the body.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: bool,
    /// Byte range of the `stream_options` value, when present.
    pub stream_options_span: Option<Range<usize>>,
    /// Byte range of the `max_tokens` value, when present (`null` included).
    pub max_tokens_span: Option<Range<usize>>,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub user: Option<Cow<'a, str>>,
    /// The output cap of one choice: the larger of `max_completion_tokens` and `max_tokens`
    /// when both are sent, since engines disagree on which one wins.
    pub max_output_tokens: Option<u64>,
    /// How many completions the upstream generates: the larger of `n` and `best_of`.
    pub choices: u64,
    /// What the request needs of a model: tools, image inputs, JSON mode.
    pub features: Features,
    /// What the request asks about, by endpoint: checked for the shape billing relies on.
    pub messages: Option<MessagesShape>,
    pub prompt: Option<&'a RawValue>,
    pub input: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Head<'a> {
    messages: Option<MessagesShape>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    stream: Option<bool>,
    // `null` too, so that its place is known and can be replaced.
    #[serde(default, borrow, deserialize_with = "some_raw")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    // `null` too: a cap the gateway adds must replace it, not follow it as a duplicate key.
    #[serde(default, borrow, deserialize_with = "some_raw")]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    n: Option<&'a RawValue>,
    #[serde(borrow)]
    best_of: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    functions: Option<&'a RawValue>,
    #[serde(borrow)]
    response_format: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponseFormat<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

/// Only the part types of messages, to spot image inputs.
#[derive(Deserialize)]
struct Messages<'a> {
    #[serde(borrow, default)]
    messages: Vec<Message<'a>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

/// A non-empty list (or any non-null value that is not `[]`).
fn present(raw: Option<&RawValue>) -> bool {
    raw.is_some_and(|r| {
        let t = r.get().trim();
        t != "null" && t != "[]" && !(t.starts_with('[') && t[1..].trim_start() == "]")
    })
}

fn request_features(body: &str, head: &Head<'_>) -> Features {
    let mut f = Features::NONE;
    if present(head.tools) || present(head.functions) {
        f = f.with(Features::TOOLS);
    }
    if let Some(raw) = head.response_format {
        if let Ok(rf) = serde_json::from_str::<ResponseFormat<'_>>(raw.get()) {
            if matches!(rf.kind.as_deref(), Some("json_object" | "json_schema")) {
                f = f.with(Features::JSON);
            }
        }
    }
    // Parsing the messages costs a pass over the body; only a body that mentions an image
    // part type pays it.
    if memchr::memmem::find(body.as_bytes(), b"image").is_some() && has_image_part(body) {
        f = f.with(Features::VISION);
    }
    f
}

fn has_image_part(body: &str) -> bool {
    let Ok(m) = serde_json::from_str::<Messages<'_>>(body) else {
        return false;
    };
    m.messages.iter().filter_map(|m| m.content).any(|c| {
        serde_json::from_str::<Vec<Part<'_>>>(c.get()).is_ok_and(|parts| {
            parts.iter().any(|p| {
                matches!(
                    p.kind.as_deref(),
                    Some("image_url" | "input_image" | "image")
                )
            })
        })
    })
}

fn some_raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

pub fn parse(body: &[u8]) -> Result<RequestSummary<'_>, GatewayError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(GatewayError::MalformedJson(
            "the body must be a JSON object".into(),
        ));
    }
    // serde skips the members it does not read without checking their text: a byte that is
    // not UTF-8 or a lone surrogate escape would pass it and reach the engine. Checked whole
    // once here, the text is then parsed as a `str`, which serde does not validate again
    // string by string (as it would parsing bytes).
    let not_utf8 = || {
        GatewayError::MalformedJson(
            "the body is not well-formed UTF-8 JSON (an invalid byte, or a lone surrogate escape such as \\ud800)".into(),
        )
    };
    let text = std::str::from_utf8(body).map_err(|_| not_utf8())?;
    let head: Head<'_> = serde_json::from_str(text).map_err(json_error)?;
    if has_lone_surrogate(body) {
        return Err(not_utf8());
    }
    let raw = head.model.ok_or_else(|| GatewayError::InvalidField {
        param: "model",
        message: "you must provide a model parameter".into(),
    })?;
    let model: Cow<'_, str> =
        serde_json::from_str(raw.get()).map_err(|_| GatewayError::InvalidField {
            param: "model",
            message: "`model` must be a string".into(),
        })?;
    if model.is_empty() {
        return Err(GatewayError::InvalidField {
            param: "model",
            message: "`model` must not be empty".into(),
        });
    }
    let include_usage = match head.stream_options {
        Some(raw) if raw.get() != "null" => serde_json::from_str::<StreamOptions>(raw.get())
            .map_err(|_| GatewayError::InvalidField {
                param: "stream_options",
                message: "`stream_options` must be an object".into(),
            })?
            .include_usage
            .unwrap_or(false),
        _ => false,
    };
    let metadata = match head.metadata {
        Some(raw) if raw.get() != "null" => Some(serde_json::from_str(raw.get()).map_err(
            |_| GatewayError::InvalidField {
                param: "metadata",
                message: "`metadata` must be an object".into(),
            },
        )?),
        _ => None,
    };
    let features = request_features(text, &head);
    let cap = |raw, name| count_field(raw, name, 1);
    let max_output_tokens = match (
        cap(head.max_completion_tokens, "max_completion_tokens")?,
        cap(head.max_tokens, "max_tokens")?,
    ) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let n = cap(head.n, "n")?.unwrap_or(1);
    let best_of = cap(head.best_of, "best_of")?.unwrap_or(n);
    if best_of < n {
        return Err(GatewayError::InvalidField {
            param: "best_of",
            message: format!("`best_of` ({best_of}) must be at least `n` ({n})"),
        });
    }
    Ok(RequestSummary {
        features,
        model,
        model_span: span_of(body, raw),
        stream: head.stream.unwrap_or(false),
        include_usage,
        stream_options_span: head.stream_options.map(|raw| span_of(body, raw)),
        max_tokens_span: head.max_tokens.map(|raw| span_of(body, raw)),
        metadata,
        user: head.user,
        max_output_tokens,
        choices: best_of,
        messages: head.messages,
        prompt: head.prompt,
        input: head.input,
    })
}

/// `messages` as billing reads it, found in the same pass as the rest of the head: never an
/// error of its own, so that a wrong shape is reported naming the field, and nothing of the
/// messages is kept or copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessagesShape {
    Valid,
    Invalid(&'static str),
}

impl<'de> Deserialize<'de> for MessagesShape {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(shape::Messages)
    }
}

mod shape {
    use super::MessagesShape::{self, Invalid, Valid};
    use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::borrow::Cow;
    use std::fmt;

    const NOT_ARRAY: &str = "`messages` must be an array of message objects";
    const NO_ROLE: &str = "every message needs a string `role`";
    const CONTENT: &str = "a message's `content` must be a string, an array of parts or null";

    /// Any JSON value, skipped, reduced to what the shape check needs of it.
    #[derive(PartialEq, Eq)]
    enum Kind {
        Text { empty: bool },
        Array,
        Null,
        Other,
    }

    struct KindOf;

    impl<'de> de::Deserialize<'de> for Kind {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(KindOf)
        }
    }

    impl<'de> Visitor<'de> for KindOf {
        type Value = Kind;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_str<E>(self, v: &str) -> Result<Kind, E> {
            Ok(Kind::Text {
                empty: v.is_empty(),
            })
        }
        fn visit_unit<E>(self) -> Result<Kind, E> {
            Ok(Kind::Null)
        }
        fn visit_none<E>(self) -> Result<Kind, E> {
            Ok(Kind::Null)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Kind::Array)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Kind::Other)
        }
    }

    /// One message: its problem, if it has one.
    struct Message(Option<&'static str>);

    impl<'de> de::Deserialize<'de> for Message {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(MessageOf)
        }
    }

    struct MessageOf;

    impl<'de> Visitor<'de> for MessageOf {
        type Value = Message;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a message object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
            let (mut role, mut content) = (false, Kind::Null);
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                match &*key {
                    "role" => role = map.next_value::<Kind>()? == Kind::Text { empty: false },
                    "content" => content = map.next_value::<Kind>()?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Message(match (role, content) {
                (false, _) => Some(NO_ROLE),
                (true, Kind::Other) => Some(CONTENT),
                _ => None,
            }))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Message, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Message(Some(NOT_ARRAY)))
        }
        fn visit_str<E>(self, _: &str) -> Result<Message, E> {
            Ok(Message(Some(NOT_ARRAY)))
        }
        fn visit_unit<E>(self) -> Result<Message, E> {
            Ok(Message(Some(NOT_ARRAY)))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Message, E> {
            Ok(Message(Some(NOT_ARRAY)))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Message, E> {
            Ok(Message(Some(NOT_ARRAY)))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Message, E> {
            Ok(Message(Some(NOT_ARRAY)))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Message, E> {
            Ok(Message(Some(NOT_ARRAY)))
        }
    }

    pub struct Messages;

    impl<'de> Visitor<'de> for Messages {
        type Value = MessagesShape;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of messages")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessagesShape, A::Error> {
            let (mut any, mut problem) = (false, None);
            while let Some(Message(p)) = seq.next_element::<Message>()? {
                any = true;
                problem = problem.or(p);
            }
            Ok(match (any, problem) {
                (false, _) => Invalid("`messages` must not be empty"),
                (true, Some(p)) => Invalid(p),
                (true, None) => Valid,
            })
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MessagesShape, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Invalid(NOT_ARRAY))
        }
        fn visit_str<E>(self, _: &str) -> Result<MessagesShape, E> {
            Ok(Invalid(NOT_ARRAY))
        }
        fn visit_unit<E>(self) -> Result<MessagesShape, E> {
            Ok(Invalid(NOT_ARRAY))
        }
        fn visit_bool<E>(self, _: bool) -> Result<MessagesShape, E> {
            Ok(Invalid(NOT_ARRAY))
        }
        fn visit_i64<E>(self, _: i64) -> Result<MessagesShape, E> {
            Ok(Invalid(NOT_ARRAY))
        }
        fn visit_u64<E>(self, _: u64) -> Result<MessagesShape, E> {
            Ok(Invalid(NOT_ARRAY))
        }
        fn visit_f64<E>(self, _: f64) -> Result<MessagesShape, E> {
            Ok(Invalid(NOT_ARRAY))
        }
    }
}

impl RequestSummary<'_> {
    /// The members the endpoint bills on are there and of the types its engines take.
    pub fn check_shape(&self, endpoint: Endpoint) -> Result<(), GatewayError> {
        let invalid = |param: &'static str, message: &str| {
            Err(GatewayError::InvalidField {
                param,
                message: message.into(),
            })
        };
        let kind = |raw: Option<&RawValue>| raw.map(|r| r.get().as_bytes()[0]);
        match endpoint {
            Endpoint::ChatCompletions => match self.messages {
                Some(MessagesShape::Valid) => Ok(()),
                Some(MessagesShape::Invalid(why)) => invalid("messages", why),
                None => invalid("messages", "`messages` is required"),
            },
            Endpoint::Completions => match kind(self.prompt) {
                Some(b'"' | b'[') => Ok(()),
                None => invalid("prompt", "`prompt` is required"),
                _ => invalid("prompt", "`prompt` must be a string or an array"),
            },
            Endpoint::Embeddings => match kind(self.input) {
                Some(b'"' | b'[') => Ok(()),
                None => invalid("input", "`input` is required"),
                _ => invalid("input", "`input` must be a string or an array"),
            },
        }
    }
}

/// The body must be JSON: a client that sends a form or text gets told, rather than the
/// engine guessing. A request without a content type is read as JSON (as OpenAI does).
fn check_content_type(headers: &http::HeaderMap) -> Result<(), GatewayError> {
    let Some(v) = headers.get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = v
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        return Ok(());
    }
    Err(GatewayError::UnsupportedMediaType(format!(
        "the body must be JSON, sent with `Content-Type: application/json` (got `{}`)",
        crate::error::prefix_chars(v.to_str().unwrap_or("?"), 64)
    )))
}

/// Whether a JSON document (already known to be well-formed) escapes half a surrogate pair
/// (`\ud800` alone). Only `\u` escapes are looked at, found by a SIMD search.
fn has_lone_surrogate(doc: &[u8]) -> bool {
    let hex = |at: usize| {
        doc.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let mut paired_low = None;
    for at in memchr::memmem::find_iter(doc, b"\\u") {
        // `\\u` is an escaped backslash, then a plain `u`: an odd run of backslashes escapes.
        let run = doc[..=at].iter().rev().take_while(|&&b| b == b'\\').count();
        if run % 2 == 0 {
            continue;
        }
        match hex(at + 2) {
            Some(0xD800..=0xDBFF) => {
                let low = at + 6;
                if doc.get(low..low + 2) != Some(b"\\u")
                    || !matches!(hex(low + 2), Some(0xDC00..=0xDFFF))
                {
                    return true;
                }
                paired_low = Some(low);
            }
            Some(0xDC00..=0xDFFF) if paired_low != Some(at) => return true,
            _ => {}
        }
    }
    false
}

/// A count the client sets (`n`, `max_tokens`, …): absent or `null`, or a whole number of at
/// least `min`. Its own error names the field, where serde's would name the body.
fn count_field(
    raw: Option<&RawValue>,
    param: &'static str,
    min: u64,
) -> Result<Option<u64>, GatewayError> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(None);
    };
    match serde_json::from_str::<u64>(raw.get()) {
        Ok(v) if v >= min => Ok(Some(v)),
        _ => Err(GatewayError::InvalidField {
            param,
            message: format!(
                "`{param}` must be a whole number of at least {min} (got {})",
                crate::error::prefix_chars(raw.get(), 32)
            ),
        }),
    }
}

/// What the later phases need of a request, read once from its body (which the context
/// keeps, unparsed, for forwarding and counting).
#[derive(Debug)]
pub struct ClientRequest {
    pub model: Arc<str>,
    /// The output cap of one choice, as the client set it.
    pub max_output_tokens: Option<u64>,
    /// Completions the upstream generates (`n`, `best_of`).
    pub choices: u64,
    pub features: Features,
    /// For the tags phase.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub user: Option<String>,
    /// How to write the body for whichever backend serves it.
    pub shape: Shape,
}

/// The read phase: the body within `max_body_bytes`, parsed once; the context learns the
/// body, the model asked for and whether it streams.
pub async fn read_request<B>(
    ctx: &mut RequestCtx,
    headers: &http::HeaderMap,
    body: B,
    limits: &crate::config::Server,
) -> Result<ClientRequest, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    check_content_type(headers)?;
    let content_length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let read = crate::server::limits::read_body(body, content_length, limits.max_body_bytes);
    let body = tokio::time::timeout(limits.body_read_timeout, read)
        .await
        .map_err(|_| GatewayError::BodyTimeout {
            after: limits.body_read_timeout,
        })??;
    // An Anthropic client's request is a chat completion from here on: one model of a
    // request for routing, budgets and counting, whichever protocol it came in.
    let (body, native) = match ctx.client_protocol {
        Protocol::OpenAi => (body, None),
        Protocol::Anthropic => (
            Bytes::from(crate::api::anthropic::request_to_openai(&body)?),
            Some(body),
        ),
    };
    let summary = parse(&body)?;
    summary.check_shape(ctx.endpoint)?;
    if summary.choices > limits.max_n {
        return Err(GatewayError::InvalidField {
            param: "n",
            message: format!(
                "`n` and `best_of` may be at most {} on this gateway (got {})",
                limits.max_n, summary.choices
            ),
        });
    }
    let model: Arc<str> = Arc::from(&*summary.model);
    ctx.requested_model = model.clone();
    ctx.stream = summary.stream;
    let streams = summary.stream && ctx.endpoint != Endpoint::Embeddings;
    let shape = Shape {
        body: body.clone(),
        requested: model.clone(),
        model_span: summary.model_span.clone(),
        stream_options_span: summary.stream_options_span.clone(),
        max_tokens_span: summary.max_tokens_span.clone(),
        ask_usage: streams && !summary.include_usage,
        client_usage: streams && summary.include_usage,
        output_cap: None,
        native,
    };
    let request = ClientRequest {
        model,
        max_output_tokens: summary.max_output_tokens,
        choices: summary.choices,
        features: summary.features,
        metadata: summary.metadata,
        user: summary.user.map(Cow::into_owned),
        shape,
    };
    ctx.body = body;
    Ok(request)
}

/// `max_tokens` sent to an Anthropic model whose cap is unknown, for a client that set none
/// (Anthropic's API requires one; every current Claude model generates at least this many).
const DEFAULT_ANTHROPIC_MAX_TOKENS: u64 = 4096;

/// What is needed to write the request body for whichever backend serves it.
#[derive(Debug)]
pub struct Shape {
    body: Bytes,
    requested: Arc<str>,
    model_span: Range<usize>,
    stream_options_span: Option<Range<usize>>,
    max_tokens_span: Option<Range<usize>>,
    /// A stream whose client did not ask for usage: ask for it where the backend can.
    ask_usage: bool,
    /// The client asked for usage on its stream.
    pub client_usage: bool,
    /// `max_tokens` to add for a request that set none: under a budget, what the upstream
    /// may generate must be bounded by what was reserved.
    output_cap: Option<u64>,
    /// An Anthropic client's own body: an Anthropic backend gets it as sent (its cache hints
    /// and all), not a translation of a translation.
    native: Option<Bytes>,
}

impl Shape {
    /// The body for the candidate that serves the request, and whether usage must be hidden
    /// from the client: whenever it did not ask, since some engines send usage unasked.
    /// An Anthropic backend gets the request translated to its API, with `max_tokens` (which
    /// it requires) at the model's cap when the client set none.
    pub fn for_backend(&self, to: &crate::route::Candidate) -> Result<(Bytes, bool), GatewayError> {
        let cfg = &to.backend.cfg;
        let body = self.edited(
            &to.model,
            cfg.stream_usage || cfg.protocol == Protocol::Anthropic,
        );
        match cfg.protocol {
            Protocol::OpenAi => Ok((body, self.ask_usage)),
            Protocol::Anthropic if self.native.is_some() => {
                Ok((self.native_for(&to.model)?, self.ask_usage))
            }
            Protocol::Anthropic => {
                let max = to.max_output_tokens.unwrap_or(DEFAULT_ANTHROPIC_MAX_TOKENS);
                let translated = crate::api::anthropic::request_to_anthropic(&body, max)?;
                Ok((Bytes::from(translated), self.ask_usage))
            }
        }
    }

    /// The Anthropic client's body for an Anthropic backend: as sent, but for the model's name
    /// there. `max_tokens` is in it already (Anthropic's API, and the translation, require
    /// it), so no cap is ever added.
    fn native_for(&self, model: &str) -> Result<Bytes, GatewayError> {
        let native = self.native.clone().unwrap_or_default();
        if model == &*self.requested {
            return Ok(native);
        }
        let mut v: serde_json::Value = serde_json::from_slice(&native)
            .map_err(|e| GatewayError::MalformedJson(e.to_string()))?;
        v["model"] = model.into();
        Ok(Bytes::from(v.to_string()))
    }

    /// The client's body with the backend's model name, the usage request and the output cap.
    fn edited(&self, model: &str, stream_usage: bool) -> Bytes {
        let mut edits = BodyEdits::default();
        if model != &*self.requested {
            edits.set_model(&self.model_span, model);
        }
        if self.ask_usage && stream_usage {
            edits.request_stream_usage(&self.body, self.stream_options_span.as_ref());
        }
        if let Some(cap) = self.output_cap {
            match &self.max_tokens_span {
                // `"max_tokens": null`: only a null can be there when a cap is added.
                Some(span) => edits
                    .edits
                    .push((span.clone(), cap.to_string().into_bytes())),
                None => {
                    edits.insert_first(format!(r#""max_tokens":{cap},"#).into_bytes(), &self.body)
                }
            }
        }
        edits.apply(&self.body)
    }

    /// Sends `max_tokens = per_choice` with a request that set no output cap. `max_tokens`,
    /// not `max_completion_tokens`: every OpenAI-compatible engine reads it.
    pub fn cap_output(&mut self, per_choice: u64) {
        self.output_cap = Some(per_choice);
    }
}

/// `raw` borrows from `body`, so its position is a pointer difference.
fn span_of(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// Edits to make to a request body before it goes upstream.
#[derive(Debug, Default)]
pub struct BodyEdits {
    edits: Vec<(Range<usize>, Vec<u8>)>,
}

impl BodyEdits {
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Replaces the `model` string at `span` ([`RequestSummary::model_span`]).
    pub fn set_model(&mut self, span: &Range<usize>, model: &str) {
        let quoted = serde_json::to_vec(model).unwrap_or_default();
        self.edits.push((span.clone(), quoted));
    }

    /// Asks the upstream for a final usage event on a stream (`stream_options.include_usage`);
    /// `stream_options` is [`RequestSummary::stream_options_span`].
    pub fn request_stream_usage(&mut self, body: &[u8], stream_options: Option<&Range<usize>>) {
        match stream_options {
            Some(span) => {
                let mut opts: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&body[span.clone()]).unwrap_or_default();
                opts.insert("include_usage".into(), serde_json::Value::Bool(true));
                self.edits
                    .push((span.clone(), serde_json::to_vec(&opts).unwrap_or_default()));
            }
            None => self.insert_first(
                br#""stream_options":{"include_usage":true},"#.to_vec(),
                body,
            ),
        }
    }

    /// Inserts a member (written with its trailing comma) right after the opening brace; the
    /// object has at least `model`, so the comma is valid.
    fn insert_first(&mut self, member: Vec<u8>, body: &[u8]) {
        let at = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
        self.edits.push((at..at, member));
    }

    /// The body with every edit applied, in one copy.
    pub fn apply(mut self, body: &Bytes) -> Bytes {
        if self.edits.is_empty() {
            return body.clone();
        }
        self.edits.sort_by_key(|(r, _)| r.start);
        let added: usize = self.edits.iter().map(|(_, b)| b.len()).sum();
        let mut out = BytesMut::with_capacity(body.len() + added);
        let mut at = 0;
        for (range, bytes) in &self.edits {
            out.extend_from_slice(&body[at..range.start]);
            out.extend_from_slice(bytes);
            at = range.end;
        }
        out.extend_from_slice(&body[at..]);
        out.freeze()
    }
}

fn json_error(e: serde_json::Error) -> GatewayError {
    match e.classify() {
        serde_json::error::Category::Data => GatewayError::InvalidField {
            param: "body",
            message: format!("invalid request: {e}"),
        },
        _ => GatewayError::MalformedJson(e.to_string()),
    }
}

/// OpenAI's stream endings: the chunks the gateway writes itself, its cost comment, then
/// `data: [DONE]`, or the error event that replaces it.
pub struct OpenAiStream;

pub static STREAM: OpenAiStream = OpenAiStream;

impl crate::upstream::stream::StreamWire for OpenAiStream {
    fn ending(&self, e: &crate::upstream::stream::Ending<'_>) -> Vec<u8> {
        use crate::meter::Status;
        let mut out = Vec::with_capacity(200);
        let (who, created) = (e.who, crate::clock::unix_now_us() / 1_000_000);
        let chat = who.endpoint == super::endpoint::Endpoint::ChatCompletions;
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = |v: serde_json::Value| {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(v.to_string().as_bytes());
            out.extend_from_slice(b"\n\n");
        };
        if e.status == Status::BudgetCut {
            // What a model that hit its length limit sends, so clients end the answer normally.
            let choice = if chat {
                serde_json::json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"})
            } else {
                serde_json::json!({"index": 0, "text": "", "logprobs": null, "finish_reason": "length"})
            };
            chunk(serde_json::json!({"id": who.request_id, "object": object,
                "created": created, "model": &*who.model, "choices": [choice]}));
        }
        if let Some(u) = e.gateway_usage() {
            chunk(serde_json::json!({"id": who.request_id, "object": object,
                "created": created, "model": &*who.model, "choices": [],
                "usage": {"prompt_tokens": u.prompt, "completion_tokens": u.completion,
                          "total_tokens": u.prompt + u.completion}}));
        }
        e.cost_comment(&mut out);
        match e.error {
            Some(err) => {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&super::error::openai_json(err));
                out.extend_from_slice(b"\n\n");
            }
            None if e.status == Status::Ok && e.saw_done || e.status == Status::BudgetCut => {
                out.extend_from_slice(b"data: [DONE]\n\n")
            }
            None => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::admit::OutputAsk;
    use proptest::prelude::*;

    #[test]
    fn lone_surrogates_are_found_wherever_they_hide() {
        for (doc, lone) in [
            (r#"{"a":"\ud83d\ude00"}"#, false),
            (r#"{"a":"\ud83d"}"#, true),
            (r#"{"a":"\ude00"}"#, true),
            (r#"{"a":"\ud83dx\ude00"}"#, true),
            (r#"{"a":"\\ud800"}"#, false),
            (r#"{"a":"\\\ud800"}"#, true),
            (r#"{"a":"\u00e9\u4e2d"}"#, false),
        ] {
            assert_eq!(has_lone_surrogate(doc.as_bytes()), lone, "{doc}");
            // The same verdict as a full parse.
            let parsed = serde_json::from_str::<serde_json::Value>(doc).is_ok();
            assert_eq!(parsed, !lone, "{doc}");
        }
    }

    /// A value a client might put in a count field: absent, null, valid, or hostile.
    fn count_value() -> impl Strategy<Value = Option<serde_json::Value>> {
        prop_oneof![
            Just(None),
            Just(Some(serde_json::Value::Null)),
            (0u64..40).prop_map(|n| Some(n.into())),
            any::<u64>().prop_map(|n| Some(n.into())),
            any::<i64>().prop_map(|n| Some(n.into())),
            Just(Some(serde_json::json!(1.5))),
            Just(Some(serde_json::json!("3"))),
        ]
    }

    /// What an engine may generate for a body: every choice at its cap, where engines read
    /// either cap field; unbounded (`None`) when the body sets neither.
    fn upstream_may_generate(body: &[u8]) -> Option<u64> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let choices = v["n"]
            .as_u64()
            .unwrap_or(1)
            .max(v["best_of"].as_u64().unwrap_or(1));
        let cap = match (
            v["max_tokens"].as_u64(),
            v["max_completion_tokens"].as_u64(),
        ) {
            (None, None) => return None,
            (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)),
        };
        Some(choices.max(1).saturating_mul(cap))
    }

    proptest! {
        #[test]
        fn the_upstream_never_generates_more_than_was_reserved(
            n in count_value(),
            best_of in count_value(),
            max_tokens in count_value(),
            max_completion_tokens in count_value(),
            model_cap in proptest::option::of(1u64..100_000),
        ) {
            let mut v = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            for (k, val) in [("n", n), ("best_of", best_of), ("max_tokens", max_tokens),
                             ("max_completion_tokens", max_completion_tokens)] {
                if let Some(val) = val {
                    v[k] = val;
                }
            }
            let body = Bytes::from(v.to_string());
            let Ok(s) = parse(&body) else { return Ok(()) };
            let ask = OutputAsk { per_choice: s.max_output_tokens, choices: s.choices };
            let (per_choice, reserved) = ask.worst_case(Endpoint::ChatCompletions, model_cap);
            // As the pipeline does under a budget.
            let mut shape = Shape {
                body: body.clone(),
                requested: Arc::from("m"),
                model_span: s.model_span.clone(),
                stream_options_span: None,
                max_tokens_span: s.max_tokens_span.clone(),
                ask_usage: false,
                client_usage: false,
                output_cap: None,
                native: None,
            };
            if s.max_output_tokens.is_none() {
                shape.cap_output(per_choice);
            }
            let sent = shape.edited("m", false);
            let may = upstream_may_generate(&sent);
            prop_assert!(may.is_some_and(|m| m <= reserved), "{} may generate {may:?}, reserved {reserved}", String::from_utf8_lossy(&sent));
        }
    }

    #[test]
    fn reads_model_and_stream_and_their_place() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"chat-small","stream":true}"#;
        let s = parse(body).unwrap();
        assert_eq!(s.model, "chat-small");
        assert!(s.stream);
        assert_eq!(&body[s.model_span.clone()], br#""chat-small""#);
    }

    #[test]
    fn rewrites_only_the_model() {
        let body = Bytes::from_static(br#"{"model":"chat-small","n":1}"#);
        let s = parse(&body).unwrap();
        let mut edits = BodyEdits::default();
        edits.set_model(&s.model_span, "meta-llama/Llama \"3\"");
        let out = edits.apply(&body);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "meta-llama/Llama \"3\"");
        assert_eq!(v["n"], 1);
    }

    #[test]
    fn asks_for_stream_usage_with_or_without_stream_options() {
        for body in [
            &br#"{"model":"m","stream":true}"#[..],
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
            br#"{"model":"m","stream":true,"stream_options":null}"#,
        ] {
            let body = Bytes::copy_from_slice(body);
            let s = parse(&body).unwrap();
            assert!(!s.include_usage);
            let mut edits = BodyEdits::default();
            edits.request_stream_usage(&body, s.stream_options_span.as_ref());
            edits.set_model(&s.model_span, "served");
            let out = edits.apply(&body);
            let v: serde_json::Value =
                serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"));
            assert_eq!(v["stream_options"]["include_usage"], true, "{v}");
            assert_eq!(v["model"], "served");
        }
    }

    #[test]
    fn reads_tags_sources_and_output_cap() {
        let s = parse(br#"{"model":"m","metadata":{"project":"a"},"user":"u","max_tokens":9,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(s.metadata.unwrap()["project"], "a");
        assert_eq!(s.user.as_deref(), Some("u"));
        assert_eq!(s.max_output_tokens, Some(9));
        assert!(s.include_usage);
        assert!(parse(br#"{"model":"m","metadata":[1]}"#).is_err());
    }

    #[test]
    fn features_are_read_from_tools_images_and_json_mode() {
        let f = |body: &str| parse(body.as_bytes()).unwrap().features;
        assert_eq!(
            f(r#"{"model":"m","messages":[{"role":"user","content":"an image"}]}"#),
            Features::NONE
        );
        assert_eq!(f(r#"{"model":"m","tools":[]}"#), Features::NONE);
        assert_eq!(
            f(r#"{"model":"m","tools":[{"type":"function","function":{"name":"f"}}]}"#),
            Features::TOOLS
        );
        assert_eq!(
            f(r#"{"model":"m","response_format":{"type":"json_object"}}"#),
            Features::JSON
        );
        assert_eq!(
            f(r#"{"model":"m","response_format":{"type":"text"}}"#),
            Features::NONE
        );
        assert_eq!(
            f(
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"what is it"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AA"}}]}]}"#
            ),
            Features::VISION
        );
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let s = parse(br#"{"model":"a\u002fb"}"#).unwrap();
        assert_eq!(s.model, "a/b");
    }

    #[test]
    fn bad_bodies_are_told_apart() {
        assert!(matches!(
            parse(b"{\"model\":"),
            Err(GatewayError::MalformedJson(_))
        ));
        assert!(matches!(
            parse(b"[1,2]"),
            Err(GatewayError::MalformedJson(_))
        ));
        assert!(matches!(
            parse(b"{}"),
            Err(GatewayError::InvalidField { param: "model", .. })
        ));
        assert!(matches!(
            parse(br#"{"model":7}"#),
            Err(GatewayError::InvalidField { param: "model", .. })
        ));
        assert!(matches!(
            parse(br#"{"model":"m","stream":"yes"}"#),
            Err(GatewayError::InvalidField { param: "body", .. })
        ));
    }
}
