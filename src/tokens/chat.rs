//! Prompt tokens of a request body, counted the way OpenAI bills them.
//!
//! Chat: every message costs 3 tokens plus its role, content and name (a name adds 1 more),
//! and 3 tokens prime the reply (OpenAI cookbook, "How to count tokens with tiktoken").
//! Tool definitions are rendered by OpenAI into a hidden system text; [`tools_tokens`] follows
//! the cookbook's accounting of that text. Image parts are not counted (their price depends on
//! the image size, which the gateway does not decode).

use super::{Encoding, Tokenizers};
use crate::api::endpoint::Endpoint;
use serde_json::Value;

const PER_MESSAGE: u64 = 3;
const PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

/// What a request body asks the model to read.
#[derive(Debug)]
pub struct ChatPrompt {
    endpoint: Endpoint,
    body: Value,
}

impl ChatPrompt {
    pub fn parse(endpoint: Endpoint, body: &[u8]) -> Option<ChatPrompt> {
        Some(ChatPrompt {
            endpoint,
            body: serde_json::from_slice(body).ok()?,
        })
    }
}

pub fn count_chat_prompt(tok: &Tokenizers, enc: Encoding, prompt: &ChatPrompt) -> u64 {
    let v = &prompt.body;
    match prompt.endpoint {
        Endpoint::ChatCompletions => {
            let messages = v["messages"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut n = REPLY_PRIMING;
            for m in messages {
                n += PER_MESSAGE;
                n += tok.count(enc, m["role"].as_str().unwrap_or(""));
                n += content_tokens(tok, enc, &m["content"]);
                if let Some(name) = m["name"].as_str() {
                    n += tok.count(enc, name) + PER_NAME;
                }
                for call in m["tool_calls"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    n += tok.count(enc, call["function"]["name"].as_str().unwrap_or(""));
                    n += tok.count(enc, call["function"]["arguments"].as_str().unwrap_or(""));
                }
            }
            n + tools_tokens(tok, enc, &v["tools"])
        }
        Endpoint::Completions => content_tokens(tok, enc, &v["prompt"]),
        Endpoint::Embeddings => content_tokens(tok, enc, &v["input"]),
    }
}

/// A string, or an array of strings or `{type: "text", text}` parts.
fn content_tokens(tok: &Tokenizers, enc: Encoding, v: &Value) -> u64 {
    match v {
        Value::String(s) => tok.count(enc, s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => tok.count(enc, s),
                Value::Object(_) => p["text"].as_str().map_or(0, |t| tok.count(enc, t)),
                // Token-id arrays (completions/embeddings input) are already tokens.
                Value::Number(_) => 1,
                Value::Array(ids) => ids.len() as u64,
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Function definitions, as the OpenAI cookbook's `num_tokens_for_tools` accounts for them.
fn tools_tokens(tok: &Tokenizers, enc: Encoding, tools: &Value) -> u64 {
    // The one constant that differs between encodings in the cookbook's accounting.
    let func_init: i64 = match enc {
        Encoding::O200kBase => 7,
        Encoding::Cl100kBase => 10,
    };
    const PROP_INIT: i64 = 3;
    const PROP_KEY: i64 = 3;
    const ENUM_INIT: i64 = -3;
    const ENUM_ITEM: i64 = 3;
    const FUNC_END: i64 = 12;
    let Some(tools) = tools.as_array().filter(|t| !t.is_empty()) else {
        return 0;
    };
    let mut n: i64 = 0;
    for tool in tools {
        let f = &tool["function"];
        n += func_init;
        let name = f["name"].as_str().unwrap_or("");
        let desc = strip_one_dot(f["description"].as_str().unwrap_or(""));
        n += tok.count(enc, &format!("{name}:{desc}")) as i64;
        if let Some(props) = f["parameters"]["properties"]
            .as_object()
            .filter(|p| !p.is_empty())
        {
            n += PROP_INIT;
            for (key, p) in props {
                n += PROP_KEY;
                if let Some(items) = p["enum"].as_array() {
                    n += ENUM_INIT;
                    for item in items {
                        n += ENUM_ITEM;
                        n += tok.count(enc, &json_text(item)) as i64;
                    }
                }
                let ty = p["type"].as_str().unwrap_or("");
                let pdesc = strip_one_dot(p["description"].as_str().unwrap_or(""));
                n += tok.count(enc, &format!("{key}:{ty}:{pdesc}")) as i64;
            }
        }
    }
    (n + FUNC_END).max(0) as u64
}

/// The cookbook strips one trailing full stop from descriptions, not all of them.
fn strip_one_dot(s: &str) -> &str {
    s.strip_suffix('.').unwrap_or(s)
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
