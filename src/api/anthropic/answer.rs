//! Whole (non-stream) answers, both ways.

use super::request::{call_to_tool_use, tool_use_to_call};
use super::{
    as_array, as_object, finish_reason, get, message_id, now_seconds, parse_object, stop_reason,
    str_field, to_bytes, wrong_type, Untranslatable, Usage,
};
use serde_json::{json, Value};

/// A whole (non-stream) Anthropic `message` answer -> OpenAI `chat.completion` answer.
pub fn answer_to_openai(body: &[u8]) -> Result<Vec<u8>, Untranslatable> {
    let msg = Value::Object(parse_object(body, "the answer")?);
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for (j, block) in as_array(get(&msg, "content"), "content", "content")?
        .iter()
        .enumerate()
    {
        let at = format!("content[{j}]");
        match str_field(block, "type", "content", &at)? {
            "text" => text
                .get_or_insert_with(String::new)
                .push_str(str_field(block, "text", "content", &at)?),
            "tool_use" => calls.push(tool_use_to_call(block, "content", &at)?),
            other => {
                let why =
                    format!("{at}: `{other}` blocks have no OpenAI chat completion counterpart");
                return Err(Untranslatable::new("content", why));
            }
        }
    }
    let mut message = json!({ "role": "assistant", "content": text, "refusal": null });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let finish = match get(&msg, "stop_reason") {
        Value::Null => Value::Null,
        _ => finish_reason(str_field(&msg, "stop_reason", "stop_reason", "")?)?.into(),
    };
    let usage = Usage::from_anthropic(as_object(get(&msg, "usage"), "usage", "usage")?)?;
    let choice =
        json!({ "index": 0, "message": message, "logprobs": null, "finish_reason": finish });
    Ok(to_bytes(&json!({
        "id": str_field(&msg, "id", "id", "")?,
        "object": "chat.completion",
        "created": now_seconds(),
        "model": get(&msg, "model"),
        "choices": [choice],
        "usage": usage.to_openai(),
    })))
}

/// A whole OpenAI `chat.completion` answer -> Anthropic `message` answer.
///
/// Reasoning text some engines add beside the answer (`reasoning_content`) is left out: the
/// request refused `thinking`, and Anthropic without thinking shows none (its tokens still
/// count in `output_tokens`). An answer without `usage` gets zeros: the caller counts instead.
pub fn answer_to_anthropic(body: &[u8]) -> Result<Vec<u8>, Untranslatable> {
    let answer = Value::Object(parse_object(body, "the answer")?);
    let choice = match as_array(get(&answer, "choices"), "choices", "choices")?.as_slice() {
        [one] => one,
        [] => return Err(Untranslatable::new("choices", "the answer has no choice")),
        _ => {
            let why = "Anthropic answers carry one completion; this answer has several choices";
            return Err(Untranslatable::new("n", why));
        }
    };
    let message = get(choice, "message");
    as_object(message, "choices", "choices[0].message")?;
    if !get(message, "function_call").is_null() {
        let why = "legacy function calls are not translated";
        return Err(Untranslatable::new("function_call", why));
    }
    // A refusal is what the model said, and why it stopped.
    let (text, refused) = match (get(message, "content"), get(message, "refusal")) {
        (Value::String(s), _) => (s.as_str(), false),
        (Value::Null, Value::String(r)) => (r.as_str(), true),
        (Value::Null, _) => ("", false),
        _ => {
            return Err(wrong_type(
                "choices",
                "choices[0].message.content",
                "a string",
            ))
        }
    };
    let mut content = Vec::new();
    if !text.is_empty() {
        content.push(json!({ "type": "text", "text": text }));
    }
    if let Some(calls) = message.get("tool_calls").filter(|v| !v.is_null()) {
        let at = "choices[0].message.tool_calls";
        for (j, call) in as_array(calls, "tool_calls", at)?.iter().enumerate() {
            content.push(call_to_tool_use(call, &format!("{at}[{j}]"))?);
        }
    }
    let stop = match get(choice, "finish_reason") {
        _ if refused => Value::from("refusal"),
        Value::Null => Value::Null,
        _ => stop_reason(str_field(choice, "finish_reason", "finish_reason", "")?)?.into(),
    };
    let usage = match get(&answer, "usage") {
        Value::Null => Usage::default(),
        u => Usage::from_openai(as_object(u, "usage", "usage")?)?,
    };
    Ok(to_bytes(&json!({
        "id": message_id(str_field(&answer, "id", "id", "")?),
        "type": "message",
        "role": "assistant",
        "model": get(&answer, "model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": usage.to_anthropic(),
    })))
}
