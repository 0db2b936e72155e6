//! Translation between Anthropic's Messages API and OpenAI's Chat Completions API, both ways:
//! requests, whole answers, streams and error bodies. Pure functions and state machines over
//! bytes; the pipeline decides when to call them.
//!
//! ```text
//! Anthropic client ─ request_to_openai ──► OpenAI-style backend
//!                  ◄─ answer_to_anthropic / StreamToAnthropic / error_to_anthropic ─┘
//! OpenAI client ──── request_to_anthropic ─► Anthropic backend
//!                  ◄─ answer_to_openai / StreamToOpenAi / error_to_openai ──────────┘
//! ```
//!
//! A feature one side has and the other lacks is refused with [`Untranslatable`] (a 400
//! naming the parameter), never dropped: a client that asked for JSON mode or extended thinking
//! and silently got neither would trust an answer it should not. The few things that *are*
//! dropped lose no content and say why where they are dropped (cache hints, neutral values).

mod answer;
mod error;
mod request;
mod sse;
mod stream;

pub use answer::{answer_to_anthropic, answer_to_openai};
pub use error::{error_body, error_to_anthropic, error_to_openai, error_type_for_status};
pub use request::{request_to_anthropic, request_to_openai};
pub use sse::{FromAnthropic, ToAnthropic};
pub use stream::{StreamToAnthropic, StreamToOpenAi};

use serde_json::{Map, Value};

/// A request or answer feature one protocol has and the other lacks: refused with 400 naming it, never dropped silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable {
    pub param: &'static str,
    pub message: String,
}

impl Untranslatable {
    pub(crate) fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.param, self.message)
    }
}

impl std::error::Error for Untranslatable {}

impl From<Untranslatable> for crate::error::GatewayError {
    fn from(e: Untranslatable) -> Self {
        crate::error::GatewayError::InvalidField {
            param: e.param,
            message: e.message,
        }
    }
}

// === JSON access that refuses instead of panicking ===

/// The body as a JSON object. serde_json stops at 128 levels of nesting, so hostile depth is
/// an error here, not a stack overflow.
fn parse_object(body: &[u8], what: &str) -> Result<Map<String, Value>, Untranslatable> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Untranslatable::new(
            "body",
            format!("{what} must be a JSON object"),
        )),
        Err(e) => Err(Untranslatable::new(
            "body",
            format!("{what} is not valid JSON: {e}"),
        )),
    }
}

fn to_bytes(v: &Value) -> Vec<u8> {
    // A Value with string keys always serializes; the fallback is never taken.
    serde_json::to_vec(v).unwrap_or_default()
}

fn wrong_type(param: &'static str, at: &str, expected: &str) -> Untranslatable {
    Untranslatable::new(param, format!("`{at}` must be {expected}"))
}

/// `v[key]`, `null` when absent (or when `v` is no object).
fn get<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or(&Value::Null)
}

/// `v[key]` as a string, refused naming its path otherwise.
fn str_field<'a>(
    v: &'a Value,
    key: &str,
    param: &'static str,
    at: &str,
) -> Result<&'a str, Untranslatable> {
    get(v, key).as_str().ok_or_else(|| {
        let path = if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        };
        wrong_type(param, &path, "a string")
    })
}

fn as_array<'a>(
    v: &'a Value,
    param: &'static str,
    at: &str,
) -> Result<&'a Vec<Value>, Untranslatable> {
    v.as_array()
        .ok_or_else(|| wrong_type(param, at, "an array"))
}

fn as_object<'a>(
    v: &'a Value,
    param: &'static str,
    at: &str,
) -> Result<&'a Map<String, Value>, Untranslatable> {
    v.as_object()
        .ok_or_else(|| wrong_type(param, at, "an object"))
}

/// A token count: absent or `null` is 0; anything else must be a non-negative integer.
fn count(obj: &Map<String, Value>, key: &str, param: &'static str) -> Result<u64, Untranslatable> {
    Ok(opt_count(obj, key, param)?.unwrap_or(0))
}

fn opt_count(
    obj: &Map<String, Value>,
    key: &str,
    param: &'static str,
) -> Result<Option<u64>, Untranslatable> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| wrong_type(param, key, "a non-negative integer")),
    }
}

/// `name` as one of `known`, so that a refusal can carry it as a `&'static str`; names outside
/// the list (a client's typo, a field newer than this code) fall back to `fallback`, and the
/// message carries the name itself.
fn static_name(name: &str, known: &[&'static str], fallback: &'static str) -> &'static str {
    known
        .iter()
        .copied()
        .find(|k| *k == name)
        .unwrap_or(fallback)
}

/// The usage figures both protocols carry, in Anthropic's terms (input excludes the cache).
#[derive(Debug, Clone, Default, PartialEq)]
struct Usage {
    input: u64,
    output: u64,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    /// Anthropic's `cache_creation` breakdown by TTL, kept whole: the meter prices 5-minute and
    /// 1-hour cache writes differently.
    cache_tiers: Option<Value>,
}

impl Usage {
    /// From an Anthropic `usage` object.
    fn from_anthropic(u: &Map<String, Value>) -> Result<Self, Untranslatable> {
        let mut usage = Self::default();
        usage.merge_anthropic(u)?;
        Ok(usage)
    }

    /// Takes the figures an Anthropic `usage` object holds; absent or `null` ones keep their
    /// value. A stream reports input in `message_start` and may repeat it, updated, in
    /// `message_delta`, whose `output_tokens` is the running total.
    fn merge_anthropic(&mut self, u: &Map<String, Value>) -> Result<(), Untranslatable> {
        if let Some(n) = opt_count(u, "input_tokens", "usage")? {
            self.input = n;
        }
        if let Some(n) = opt_count(u, "output_tokens", "usage")? {
            self.output = n;
        }
        if let Some(n) = opt_count(u, "cache_read_input_tokens", "usage")? {
            self.cache_read = Some(n);
        }
        if let Some(n) = opt_count(u, "cache_creation_input_tokens", "usage")? {
            self.cache_creation = Some(n);
        }
        match u.get("cache_creation") {
            None | Some(Value::Null) => {}
            Some(Value::Object(t)) => {
                let mut kept = Map::new();
                for key in ["ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"] {
                    if let Some(n) = opt_count(t, key, "usage")? {
                        kept.insert(key.into(), n.into());
                    }
                }
                self.cache_tiers = Some(Value::Object(kept));
            }
            Some(_) => return Err(wrong_type("usage", "usage.cache_creation", "an object")),
        }
        Ok(())
    }

    /// From an OpenAI `usage` object, which counts cached prompt tokens inside `prompt_tokens`.
    /// Cache writes are known only from the extra Anthropic-style field this module adds.
    fn from_openai(u: &Map<String, Value>) -> Result<Self, Untranslatable> {
        let prompt = count(u, "prompt_tokens", "usage")?;
        let details_cached = match u.get("prompt_tokens_details") {
            Some(Value::Object(d)) => opt_count(d, "cached_tokens", "usage")?,
            _ => None,
        };
        let cache_read = details_cached
            .or(opt_count(u, "cache_read_input_tokens", "usage")?)
            .unwrap_or(0);
        let cache_creation = count(u, "cache_creation_input_tokens", "usage")?;
        Ok(Self {
            input: prompt
                .saturating_sub(cache_read)
                .saturating_sub(cache_creation),
            output: count(u, "completion_tokens", "usage")?,
            cache_read: Some(cache_read),
            cache_creation: Some(cache_creation),
            cache_tiers: u.get("cache_creation").filter(|v| v.is_object()).cloned(),
        })
    }

    fn to_openai(&self) -> Value {
        let cache_read = self.cache_read.unwrap_or(0);
        let prompt = self
            .input
            .saturating_add(cache_read)
            .saturating_add(self.cache_creation.unwrap_or(0));
        let mut u = serde_json::json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt.saturating_add(self.output),
            "prompt_tokens_details": { "cached_tokens": cache_read },
        });
        // Extra fields OpenAI SDKs ignore; the meter prices cache writes from them.
        if let Some(n) = self.cache_read {
            u["cache_read_input_tokens"] = n.into();
        }
        if let Some(n) = self.cache_creation {
            u["cache_creation_input_tokens"] = n.into();
        }
        if let Some(t) = &self.cache_tiers {
            u["cache_creation"] = t.clone();
        }
        u
    }

    fn to_anthropic(&self) -> Value {
        let mut u = serde_json::json!({
            "input_tokens": self.input,
            "output_tokens": self.output,
            "cache_read_input_tokens": self.cache_read.unwrap_or(0),
            "cache_creation_input_tokens": self.cache_creation.unwrap_or(0),
        });
        if let Some(t) = &self.cache_tiers {
            u["cache_creation"] = t.clone();
        }
        u
    }
}

/// Anthropic `stop_reason` -> OpenAI `finish_reason`.
///
/// `pause_turn` -> `stop`: the turn ended without error and the client may continue it.
/// (It only follows server tools, which requests refuse, so a translated request never meets it.)
/// `refusal` -> `content_filter`: OpenAI's word for an answer withheld by the safety layer.
fn finish_reason(stop_reason: &str) -> Result<&'static str, Untranslatable> {
    Ok(match stop_reason {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => {
            return Err(Untranslatable::new(
                "stop_reason",
                format!("stop_reason `{other}` has no OpenAI finish_reason"),
            ))
        }
    })
}

/// OpenAI `finish_reason` -> Anthropic `stop_reason`.
///
/// `content_filter` -> `refusal`: Anthropic's word for an answer its safety layer stopped.
/// `stop` -> `end_turn` even when a stop sequence ended it: OpenAI does not say which one.
fn stop_reason(finish_reason: &str) -> Result<&'static str, Untranslatable> {
    Ok(match finish_reason {
        "stop" => "end_turn",
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        "content_filter" => "refusal",
        other => {
            return Err(Untranslatable::new(
                "finish_reason",
                format!("finish_reason `{other}` has no Anthropic stop_reason"),
            ))
        }
    })
}

/// `msg_…` as Anthropic SDKs expect an id to look; an OpenAI id gets the prefix.
fn message_id(openai_id: &str) -> String {
    if openai_id.starts_with("msg_") {
        openai_id.to_owned()
    } else {
        format!("msg_{openai_id}")
    }
}

fn now_seconds() -> i64 {
    crate::clock::unix_now_us() / 1_000_000
}

#[cfg(test)]
mod tests;
