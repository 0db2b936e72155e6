//! Streams, both ways: one state machine per direction, fed whole SSE events (or `data:`
//! payloads) by the caller, appending the other protocol's frames to a buffer.
//!
//! ```text
//! Anthropic                          OpenAI
//! message_start ───────────────────► chunk {role:"assistant", content:""}
//! content_block_start (tool_use) ──► chunk {tool_calls:[{index, id, name, arguments:""}]}
//! content_block_delta ─────────────► chunk {content} | {tool_calls:[{index, arguments}]}
//! message_delta ───────────────────► chunk {finish_reason}, then chunk {choices:[], usage}
//! message_stop ────────────────────► [DONE]
//! ```
//!
//! Going back, OpenAI gives no block boundaries: a block starts when the kind of delta changes
//! (text, or a new tool call index) and stops before the next one or at `finish_reason`.
//! `message_delta` waits for the usage chunk OpenAI sends after the finish chunk, so that it
//! carries the real counts.

use super::error::{openai_error, openai_message};
use super::{
    as_array, as_object, finish_reason, get, message_id, now_seconds, stop_reason, str_field,
    to_bytes, Untranslatable, Usage,
};
use bytes::BytesMut;
use serde_json::{json, Value};

fn parse(data: &[u8]) -> Result<Value, Untranslatable> {
    let why = match serde_json::from_slice::<Value>(data) {
        Ok(v @ Value::Object(_)) => return Ok(v),
        Ok(_) => "must be a JSON object".to_owned(),
        Err(e) => format!("is not valid JSON: {e}"),
    };
    Err(Untranslatable::new(
        "stream",
        format!("a stream event {why}"),
    ))
}

fn stream_error(message: impl Into<String>) -> Untranslatable {
    Untranslatable::new("stream", message)
}

// === Anthropic -> OpenAI ===

#[derive(Debug, Clone, Copy)]
enum BlockKind {
    Text,
    /// The OpenAI `tool_calls[].index` of this tool_use block.
    Tool(u64),
}

/// Anthropic SSE events in, OpenAI chunks out (`data: {json}\n\n`, and `data: [DONE]\n\n` at message_stop).
#[derive(Debug)]
pub struct StreamToOpenAi {
    id: String,
    model: Value,
    created: i64,
    started: bool,
    ended: bool,
    /// Anthropic block index -> kind, for the blocks started so far.
    blocks: Vec<(u64, BlockKind)>,
    tool_calls: u64,
    usage: Usage,
    usage_chunk: bool,
    anthropic_extras: bool,
}

/// Members a translated chunk carries, when the stream is translated back to Anthropic, for
/// what OpenAI chunks cannot say: the usage `message_start` reports (input and cache, before
/// any output) and the exact `stop_reason` and `stop_sequence`. The meter reads only `usage`.
pub(super) const START_USAGE: &str = "x_anthropic_start_usage";
pub(super) const STOP: &str = "x_anthropic_stop";

impl Default for StreamToOpenAi {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamToOpenAi {
    pub fn new() -> Self {
        Self {
            id: String::new(),
            model: Value::Null,
            created: now_seconds(),
            started: false,
            ended: false,
            blocks: Vec::new(),
            tool_calls: 0,
            usage: Usage::default(),
            usage_chunk: true,
            anthropic_extras: false,
        }
    }

    /// Whether chunks carry [`START_USAGE`] and [`STOP`]: on when the client speaks Anthropic
    /// too, so that its events say what the backend's said.
    pub fn with_anthropic_extras(mut self, on: bool) -> Self {
        self.anthropic_extras = on;
        self
    }

    /// Whether the usage chunk (`choices: []`) is sent. On by default: the gateway meters from
    /// it. A client that did not ask for `include_usage` may index `choices[0]` of every chunk;
    /// the caller can turn it off for that client.
    pub fn with_usage_chunk(mut self, on: bool) -> Self {
        self.usage_chunk = on;
        self
    }

    /// Whether message_stop (or an error event) has been seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// One whole SSE event: its `event:` name and its `data:` payload. Appends zero or more OpenAI SSE frames to `out`.
    pub fn event(
        &mut self,
        name: &str,
        data: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), Untranslatable> {
        if self.ended {
            return Ok(());
        }
        let v = parse(data)?;
        // The data repeats the name as `type`; an event without the `event:` line still reads.
        let name = match name {
            "" => v.get("type").and_then(Value::as_str).unwrap_or(""),
            n => n,
        };
        if !self.started && !matches!(name, "message_start" | "error" | "ping") {
            return Err(stream_error(format!("`{name}` before message_start")));
        }
        match name {
            "message_start" => self.message_start(&v, out)?,
            "content_block_start" => self.block_start(&v, out)?,
            "content_block_delta" => self.block_delta(&v, out)?,
            "message_delta" => self.message_delta(&v, out)?,
            "message_stop" => {
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.ended = true;
            }
            "error" => {
                let e = get(&v, "error");
                let kind = e.get("type").and_then(Value::as_str).unwrap_or("api_error");
                let message = e.get("message").and_then(Value::as_str);
                frame(
                    out,
                    &openai_error(kind, message.unwrap_or("the upstream stream failed")),
                );
                self.ended = true;
            }
            // content_block_stop and ping carry nothing OpenAI shows. Anthropic's versioning
            // policy lets new event types appear; clients are to ignore the ones they don't know.
            _ => {}
        }
        Ok(())
    }

    fn message_start(&mut self, v: &Value, out: &mut BytesMut) -> Result<(), Untranslatable> {
        let message = get(v, "message");
        self.id = str_field(message, "id", "stream", "message")?.to_owned();
        self.model = get(message, "model").clone();
        if let Some(u) = message.get("usage").filter(|u| !u.is_null()) {
            self.usage
                .merge_anthropic(as_object(u, "usage", "message.usage")?)?;
        }
        self.started = true;
        let choice = json!({ "index": 0, "delta": { "role": "assistant", "content": "" },
                             "logprobs": null, "finish_reason": null });
        let mut chunk = self.chunk(json!([choice]));
        if self.anthropic_extras {
            chunk[START_USAGE] = get(message, "usage").clone();
        }
        frame(out, &chunk);
        Ok(())
    }

    fn block_start(&mut self, v: &Value, out: &mut BytesMut) -> Result<(), Untranslatable> {
        let index = index_of(v)?;
        let block = get(v, "content_block");
        match str_field(block, "type", "stream", "content_block")? {
            "text" => {
                self.blocks.push((index, BlockKind::Text));
                match block.get("text").and_then(Value::as_str) {
                    Some(text) if !text.is_empty() => self.delta(out, json!({ "content": text })),
                    _ => {}
                }
            }
            "tool_use" => {
                let tool = self.tool_calls;
                self.tool_calls += 1;
                self.blocks.push((index, BlockKind::Tool(tool)));
                // Input arrives in input_json_delta events; a non-empty start is sent whole.
                let arguments = match block.get("input") {
                    Some(input @ Value::Object(m)) if !m.is_empty() => input.to_string(),
                    _ => String::new(),
                };
                let call = json!({
                    "index": tool,
                    "id": str_field(block, "id", "stream", "content_block")?,
                    "type": "function",
                    "function": {
                        "name": str_field(block, "name", "stream", "content_block")?,
                        "arguments": arguments,
                    },
                });
                self.delta(out, json!({ "tool_calls": [call] }));
            }
            other => {
                let param = if other.contains("thinking") {
                    "thinking"
                } else {
                    "stream"
                };
                let why = format!("`{other}` blocks have no OpenAI chat completion counterpart");
                return Err(Untranslatable::new(param, why));
            }
        }
        Ok(())
    }

    fn block_delta(&mut self, v: &Value, out: &mut BytesMut) -> Result<(), Untranslatable> {
        let index = index_of(v)?;
        let kind = self
            .blocks
            .iter()
            .rev()
            .find(|(i, _)| *i == index)
            .map(|(_, k)| *k)
            .ok_or_else(|| stream_error(format!("a delta for block {index}, never started")))?;
        let delta = get(v, "delta");
        match (str_field(delta, "type", "stream", "delta")?, kind) {
            ("text_delta", BlockKind::Text) => {
                let text = str_field(delta, "text", "stream", "delta")?;
                self.delta(out, json!({ "content": text }));
            }
            ("input_json_delta", BlockKind::Tool(tool)) => {
                let partial = str_field(delta, "partial_json", "stream", "delta")?;
                if !partial.is_empty() {
                    let call = json!({ "index": tool, "function": { "arguments": partial } });
                    self.delta(out, json!({ "tool_calls": [call] }));
                }
            }
            ("thinking_delta" | "signature_delta", _) => {
                let why = "extended thinking has no OpenAI chat completion counterpart";
                return Err(Untranslatable::new("thinking", why));
            }
            ("citations_delta", _) => {
                let why = "citations have no OpenAI chat completion counterpart";
                return Err(Untranslatable::new("citations", why));
            }
            (other, _) => {
                return Err(stream_error(format!(
                    "`{other}` does not fit block {index}"
                )))
            }
        }
        Ok(())
    }

    fn message_delta(&mut self, v: &Value, out: &mut BytesMut) -> Result<(), Untranslatable> {
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage
                .merge_anthropic(as_object(u, "usage", "usage")?)?;
        }
        let delta = get(v, "delta");
        if !get(delta, "stop_reason").is_null() {
            let reason = str_field(delta, "stop_reason", "stop_reason", "delta")?;
            let choice = json!({ "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(reason)? });
            let mut chunk = self.chunk(json!([choice]));
            if self.anthropic_extras {
                chunk[STOP] =
                    json!({ "stop_reason": reason, "stop_sequence": get(delta, "stop_sequence") });
            }
            frame(out, &chunk);
        }
        if self.usage_chunk {
            let mut chunk = self.chunk(json!([]));
            chunk["usage"] = self.usage.to_openai();
            frame(out, &chunk);
        }
        Ok(())
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn delta(&self, out: &mut BytesMut, delta: Value) {
        let choice = json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": null });
        frame(out, &self.chunk(json!([choice])));
    }
}

fn index_of(v: &Value) -> Result<u64, Untranslatable> {
    v.get("index")
        .and_then(Value::as_u64)
        .ok_or_else(|| stream_error("`index` must be a non-negative integer"))
}

fn frame(out: &mut BytesMut, v: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&to_bytes(v));
    out.extend_from_slice(b"\n\n");
}

// === OpenAI -> Anthropic ===

#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    None,
    Text { index: u64 },
    Tool { call: u64, index: u64 },
}

/// OpenAI chunks in, Anthropic SSE events out (`event: NAME\ndata: {json}\n\n`).
#[derive(Debug)]
pub struct StreamToAnthropic {
    model: String,
    started: bool,
    /// message_stop or an error event sent: nothing more follows.
    finished: bool,
    next_index: u64,
    open: Open,
    /// OpenAI tool call indices already seen: a call whose block was stopped cannot resume.
    calls: Vec<u64>,
    refused: bool,
    stop_reason: Option<&'static str>,
    /// The Anthropic backend's own stop reason and sequence, when the chunks carried them.
    native_stop: Option<Value>,
    usage: Option<Usage>,
}

impl StreamToAnthropic {
    /// `model` is the name the client sees in `message_start`.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            started: false,
            finished: false,
            next_index: 0,
            open: Open::None,
            calls: Vec::new(),
            refused: false,
            stop_reason: None,
            native_stop: None,
            usage: None,
        }
    }

    /// One `data:` payload of an OpenAI stream (a chunk JSON, or an error object `{"error":{..}}`).
    ///
    /// Reasoning deltas some engines add (`reasoning_content`) are left out, as in
    /// [`super::answer_to_anthropic`].
    pub fn chunk(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), Untranslatable> {
        if self.finished {
            return Ok(());
        }
        let v = parse(data)?;
        if !get(&v, "error").is_null() {
            let message = openai_message(&v).unwrap_or_else(|| "the upstream stream failed".into());
            let error =
                json!({ "type": "error", "error": { "type": "api_error", "message": message } });
            event(out, "error", &error);
            self.finished = true;
            return Ok(());
        }
        if !self.started {
            self.start(&v, out)?;
        }
        match get(&v, "choices") {
            Value::Null => {}
            choices => match as_array(choices, "stream", "choices")?.as_slice() {
                [] => {}
                [choice] if choice.get("index").and_then(Value::as_u64).unwrap_or(0) == 0 => {
                    self.choice(choice, out)?
                }
                _ => {
                    let why =
                        "Anthropic streams carry one completion; this stream has several choices";
                    return Err(Untranslatable::new("n", why));
                }
            },
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(Usage::from_openai(as_object(u, "usage", "usage")?)?);
        }
        if let Some(stop) = v.get(STOP).filter(|s| s.is_object()) {
            self.native_stop = Some(stop.clone());
        }
        if self.stop_reason.is_some() && self.usage.is_some() {
            self.finish(out);
        }
        Ok(())
    }

    /// `data: [DONE]` (or the upstream's end): emits whatever closing events are still owed (content_block_stop, message_delta, message_stop).
    ///
    /// A stream that ended without a finish reason gets `stop_reason: null`: it did not say
    /// why it ended, and a made-up reason would hide a cut stream. Nothing is emitted for a
    /// stream that never started.
    pub fn done(&mut self, out: &mut BytesMut) {
        if self.started && !self.finished {
            self.finish(out);
        }
    }

    fn start(&mut self, v: &Value, out: &mut BytesMut) -> Result<(), Untranslatable> {
        let id = message_id(v.get("id").and_then(Value::as_str).unwrap_or(""));
        let usage = match (v.get(START_USAGE), v.get("usage")) {
            // An Anthropic backend's own message_start usage, whole (cache figures included).
            (Some(u @ Value::Object(_)), _) => u.clone(),
            (_, Some(u)) if !u.is_null() => {
                let input = Usage::from_openai(as_object(u, "usage", "usage")?)?.input;
                json!({ "input_tokens": input, "output_tokens": 0 })
            }
            _ => json!({ "input_tokens": 0, "output_tokens": 0 }),
        };
        let message = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": usage,
        });
        event(
            out,
            "message_start",
            &json!({ "type": "message_start", "message": message }),
        );
        self.started = true;
        Ok(())
    }

    fn choice(&mut self, choice: &Value, out: &mut BytesMut) -> Result<(), Untranslatable> {
        let delta = get(choice, "delta");
        if let Some(text) = delta.get("content").and_then(Value::as_str) {
            self.text(text, out);
        }
        // A refusal is what the model said; it ends the message as one.
        if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
            self.refused = true;
            self.text(text, out);
        }
        if let Some(calls) = delta.get("tool_calls").filter(|c| !c.is_null()) {
            for call in as_array(calls, "tool_calls", "delta.tool_calls")? {
                self.tool_call(call, out)?;
            }
        }
        if !get(delta, "function_call").is_null() {
            let why = "legacy function calls are not translated";
            return Err(Untranslatable::new("function_call", why));
        }
        if !get(choice, "finish_reason").is_null() {
            let reason = stop_reason(str_field(choice, "finish_reason", "finish_reason", "")?)?;
            self.close(out);
            self.stop_reason = Some(if self.refused { "refusal" } else { reason });
        }
        Ok(())
    }

    fn text(&mut self, text: &str, out: &mut BytesMut) {
        if text.is_empty() {
            return;
        }
        let index = match self.open {
            Open::Text { index } => index,
            _ => {
                let index = self.open_block(out, json!({ "type": "text", "text": "" }));
                self.open = Open::Text { index };
                index
            }
        };
        let delta = json!({ "type": "text_delta", "text": text });
        let data = json!({ "type": "content_block_delta", "index": index, "delta": delta });
        event(out, "content_block_delta", &data);
    }

    fn tool_call(&mut self, call: &Value, out: &mut BytesMut) -> Result<(), Untranslatable> {
        let n = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let function = get(call, "function");
        let index = match self.open {
            Open::Tool { call, index } if call == n => index,
            _ if self.calls.contains(&n) => {
                let why = format!("tool call {n} resumed after another block began; Anthropic blocks cannot interleave");
                return Err(Untranslatable::new("tool_calls", why));
            }
            _ => {
                let block = json!({
                    "type": "tool_use",
                    "id": str_field(call, "id", "tool_calls", "tool_calls[]")?,
                    "name": str_field(function, "name", "tool_calls", "tool_calls[].function")?,
                    "input": {},
                });
                let index = self.open_block(out, block);
                self.calls.push(n);
                self.open = Open::Tool { call: n, index };
                index
            }
        };
        let arguments = function
            .get("arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !arguments.is_empty() {
            let delta = json!({ "type": "input_json_delta", "partial_json": arguments });
            let data = json!({ "type": "content_block_delta", "index": index, "delta": delta });
            event(out, "content_block_delta", &data);
        }
        Ok(())
    }

    /// Stops the open block, starts the next one and returns its index.
    fn open_block(&mut self, out: &mut BytesMut, block: Value) -> u64 {
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        let data = json!({ "type": "content_block_start", "index": index, "content_block": block });
        event(out, "content_block_start", &data);
        index
    }

    fn close(&mut self, out: &mut BytesMut) {
        if let Open::Text { index } | Open::Tool { index, .. } = self.open {
            let data = json!({ "type": "content_block_stop", "index": index });
            event(out, "content_block_stop", &data);
        }
        self.open = Open::None;
    }

    fn finish(&mut self, out: &mut BytesMut) {
        self.close(out);
        let usage = match &self.usage {
            Some(u) => u.to_anthropic(),
            None => json!({ "output_tokens": 0 }),
        };
        let delta = match self.native_stop.take() {
            Some(stop) => stop,
            None => json!({ "stop_reason": self.stop_reason, "stop_sequence": null }),
        };
        let data = json!({ "type": "message_delta", "delta": delta, "usage": usage });
        event(out, "message_delta", &data);
        event(out, "message_stop", &json!({ "type": "message_stop" }));
        self.finished = true;
    }
}

fn event(out: &mut BytesMut, name: &str, data: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(&to_bytes(data));
    out.extend_from_slice(b"\n\n");
}
