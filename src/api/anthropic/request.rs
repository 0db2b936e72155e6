//! Request bodies, both ways.
//!
//! Decisions the two references leave open, made here once:
//! - `cache_control` (Anthropic) and `prompt_cache_key` (OpenAI) are dropped. OpenAI-style
//!   backends cache prompt prefixes automatically and offer no per-block control, so there is
//!   nothing to carry them to; a hint lost this way changes cost, never content.
//! - A `tool_result` with `is_error: true` becomes a tool message whose text starts with
//!   `Error: `: OpenAI has no error flag on tool messages, and refusing would break the common
//!   agent loop of reporting a failed tool back to the model.
//! - An OpenAI `system`/`developer` message after the first user or assistant message is
//!   refused: Anthropic takes one system prompt before the conversation, and hoisting a
//!   mid-conversation instruction to the top changes what the model reads.
//! - An image's `detail` is dropped: Anthropic picks its own resolution; the image itself goes
//!   through whole.

use super::{
    as_array, as_object, get, parse_object, static_name, str_field, to_bytes, wrong_type,
    Untranslatable,
};
use serde_json::{json, Map, Value};

/// Content blocks that exist only on Anthropic's side, refused with their own name as `param`.
const ANTHROPIC_ONLY_BLOCKS: &[&str] = &[
    "thinking",
    "redacted_thinking",
    "document",
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "mcp_tool_use",
    "mcp_tool_result",
    "container_upload",
];

/// Anthropic request fields with no OpenAI counterpart (besides blocks and tools).
const ANTHROPIC_ONLY_FIELDS: &[&str] = &[
    "container",
    "mcp_servers",
    "context_management",
    "output_config",
];

/// OpenAI request fields refused unless they hold their neutral value.
const OPENAI_ONLY_FIELDS: &[&str] = &[
    "n",
    "best_of",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "functions",
    "function_call",
    "store",
    "service_tier",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
];

/// OpenAI content part types with no Anthropic counterpart.
const OPENAI_ONLY_PARTS: &[&str] = &["input_audio", "file"];

// === Anthropic -> OpenAI ===

/// Anthropic Messages request body -> OpenAI chat completions request body.
pub fn request_to_openai(body: &[u8]) -> Result<Vec<u8>, Untranslatable> {
    let req = parse_object(body, "the request body")?;
    let mut messages = Vec::new();
    match req.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({ "role": "system", "content": s })),
        Some(other) => {
            let mut texts = Vec::new();
            for (j, block) in as_array(other, "system", "system")?.iter().enumerate() {
                texts.push(text_of_block(block, "system", &format!("system[{j}]"))?);
            }
            messages.push(json!({ "role": "system", "content": texts.join("\n\n") }));
        }
    }
    let turns = req
        .get("messages")
        .ok_or_else(|| Untranslatable::new("messages", "`messages` is required"))?;
    for (i, turn) in as_array(turns, "messages", "messages")?.iter().enumerate() {
        turn_to_openai(turn, &format!("messages[{i}]"), &mut messages)?;
    }
    let mut out = Map::new();
    out.insert("messages".into(), Value::Array(messages));

    for (key, value) in req.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "system" | "messages" => {}
            // `top_k` is not OpenAI's, but the self-hosted engines behind OpenAI-style APIs take it.
            "model" | "max_tokens" | "temperature" | "top_p" | "top_k" => {
                out.insert(key.clone(), value.clone());
            }
            "stop_sequences" => {
                out.insert("stop".into(), value.clone());
            }
            "stream" => match value {
                Value::Bool(true) => {
                    out.insert("stream".into(), true.into());
                    // Anthropic streams always end with usage; OpenAI's only when asked.
                    out.insert("stream_options".into(), json!({ "include_usage": true }));
                }
                Value::Bool(false) => {}
                _ => return Err(wrong_type("stream", "stream", "a boolean")),
            },
            "metadata" => {
                if let Some(user) = metadata_user(value)? {
                    out.insert("user".into(), user.into());
                }
            }
            "tools" => {
                out.insert("tools".into(), tools_to_openai(value)?);
            }
            "tool_choice" => tool_choice_to_openai(value, &mut out)?,
            "thinking" => {
                if value.get("type").and_then(Value::as_str) != Some("disabled") {
                    return Err(Untranslatable::new(
                        "thinking",
                        "extended thinking has no OpenAI chat completions counterpart; send the request without `thinking`",
                    ));
                }
            }
            // One tier is all an OpenAI-style backend has; both values are served as asked.
            "service_tier" => {
                if !matches!(value.as_str(), Some("auto" | "standard_only")) {
                    let expected = "`auto` or `standard_only`";
                    return Err(wrong_type("service_tier", "service_tier", expected));
                }
            }
            // Dropped: see the module docs (caching is automatic on the other side).
            "cache_control" => {}
            other => {
                return Err(Untranslatable::new(
                    static_name(other, ANTHROPIC_ONLY_FIELDS, "body"),
                    format!("`{other}` has no OpenAI chat completions counterpart"),
                ))
            }
        }
    }
    Ok(to_bytes(&Value::Object(out)))
}

fn turn_to_openai(turn: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), Untranslatable> {
    as_object(turn, "messages", at)?;
    let role = str_field(turn, "role", "messages", at)?;
    if role != "user" && role != "assistant" {
        return Err(Untranslatable::new(
            "messages",
            format!("{at}.role must be `user` or `assistant`, not `{role}`"),
        ));
    }
    let blocks = match get(turn, "content") {
        Value::String(s) => {
            out.push(json!({ "role": role, "content": s }));
            return Ok(());
        }
        content => as_array(content, "messages", &format!("{at}.content"))?,
    };
    if role == "assistant" {
        out.push(assistant_to_openai(blocks, at)?);
        return Ok(());
    }
    // Tool results answer the previous assistant turn, so they come first, as tool messages;
    // the rest of the turn follows as one user message.
    let mut parts = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match str_field(block, "type", "messages", &at)? {
            "text" => {
                let text = text_of_block(block, "messages", &at)?;
                parts.push(json!({ "type": "text", "text": text }));
            }
            "image" => parts.push(image_to_openai(block, &at)?),
            "tool_result" => out.push(tool_result_to_openai(block, &at)?),
            "tool_use" => {
                let why = format!("{at}: `tool_use` blocks belong in assistant turns");
                return Err(Untranslatable::new("messages", why));
            }
            other => return Err(anthropic_only_block(other, &at)),
        }
    }
    if !parts.is_empty() || blocks.is_empty() {
        let content = match parts.as_slice() {
            [one] if one["type"] == "text" => one["text"].clone(),
            _ => Value::Array(parts),
        };
        out.push(json!({ "role": "user", "content": content }));
    }
    Ok(())
}

fn assistant_to_openai(blocks: &[Value], at: &str) -> Result<Value, Untranslatable> {
    let mut text: Option<String> = None;
    let mut calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match str_field(block, "type", "messages", &at)? {
            // Joined without a separator: consecutive text blocks are one text split at
            // citations, as answers split them.
            "text" => text
                .get_or_insert_with(String::new)
                .push_str(text_of_block(block, "messages", &at)?),
            "tool_use" => calls.push(tool_use_to_call(block, "messages", &at)?),
            "tool_result" | "image" => {
                let why = format!("{at}: OpenAI assistant messages cannot carry this block");
                return Err(Untranslatable::new("messages", why));
            }
            other => return Err(anthropic_only_block(other, &at)),
        }
    }
    let mut msg = json!({ "role": "assistant", "content": text });
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    Ok(msg)
}

/// A `tool_use` block as an OpenAI tool call; answers use it too.
pub(super) fn tool_use_to_call(
    block: &Value,
    param: &'static str,
    at: &str,
) -> Result<Value, Untranslatable> {
    let input = get(block, "input");
    as_object(input, param, &format!("{at}.input"))?;
    Ok(json!({
        "id": str_field(block, "id", param, at)?,
        "type": "function",
        "function": { "name": str_field(block, "name", param, at)?, "arguments": input.to_string() },
    }))
}

fn anthropic_only_block(kind: &str, at: &str) -> Untranslatable {
    Untranslatable::new(
        static_name(kind, ANTHROPIC_ONLY_BLOCKS, "messages"),
        format!("{at}: `{kind}` blocks have no OpenAI chat completions counterpart"),
    )
}

/// The text of a `text` block. Citations are refused: OpenAI messages cannot carry them.
fn text_of_block<'a>(
    block: &'a Value,
    param: &'static str,
    at: &str,
) -> Result<&'a str, Untranslatable> {
    if block.get("type").and_then(Value::as_str) != Some("text") {
        return Err(Untranslatable::new(
            param,
            format!("{at} must be a text block"),
        ));
    }
    let cited = match get(block, "citations") {
        Value::Null => false,
        Value::Array(c) => !c.is_empty(),
        _ => true,
    };
    if cited {
        let why = format!("{at}: citations have no OpenAI chat completions counterpart");
        return Err(Untranslatable::new("citations", why));
    }
    str_field(block, "text", param, at)
}

fn image_to_openai(block: &Value, at: &str) -> Result<Value, Untranslatable> {
    let source = get(block, "source");
    let at = format!("{at}.source");
    let url = match str_field(source, "type", "messages", &at)? {
        "base64" => format!(
            "data:{};base64,{}",
            str_field(source, "media_type", "messages", &at)?,
            str_field(source, "data", "messages", &at)?
        ),
        "url" => str_field(source, "url", "messages", &at)?.to_owned(),
        other => {
            let why = format!(
                "{at}: `{other}` image sources have no OpenAI counterpart; send base64 or a URL"
            );
            return Err(Untranslatable::new("image", why));
        }
    };
    Ok(json!({ "type": "image_url", "image_url": { "url": url } }))
}

fn tool_result_to_openai(block: &Value, at: &str) -> Result<Value, Untranslatable> {
    let id = str_field(block, "tool_use_id", "messages", at)?;
    let mut text = match get(block, "content") {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => {
            let mut texts = Vec::new();
            for (k, part) in as_array(other, "messages", &format!("{at}.content"))?
                .iter()
                .enumerate()
            {
                let at = format!("{at}.content[{k}]");
                if part.get("type").and_then(Value::as_str) != Some("text") {
                    let why = format!("{at}: OpenAI tool messages carry text only");
                    return Err(Untranslatable::new("tool_result", why));
                }
                texts.push(text_of_block(part, "messages", &at)?);
            }
            texts.join("\n")
        }
    };
    if block.get("is_error") == Some(&Value::Bool(true)) {
        text.insert_str(0, "Error: ");
    }
    Ok(json!({ "role": "tool", "tool_call_id": id, "content": text }))
}

fn metadata_user(value: &Value) -> Result<Option<String>, Untranslatable> {
    let mut user = None;
    for (k, v) in as_object(value, "metadata", "metadata")? {
        match k.as_str() {
            "user_id" if v.is_null() => {}
            "user_id" => {
                user = Some(str_field(value, "user_id", "metadata", "metadata")?.to_owned())
            }
            other => {
                let why = format!("metadata.{other} is not a field of Anthropic's metadata");
                return Err(Untranslatable::new("metadata", why));
            }
        }
    }
    Ok(user)
}

fn tools_to_openai(tools: &Value) -> Result<Value, Untranslatable> {
    let mut out = Vec::new();
    for (i, tool) in as_array(tools, "tools", "tools")?.iter().enumerate() {
        let at = format!("tools[{i}]");
        let mut function = Map::new();
        for (k, v) in as_object(tool, "tools", &at)? {
            match k.as_str() {
                "name" => {
                    function.insert(k.clone(), str_field(tool, "name", "tools", &at)?.into());
                }
                "description" | "strict" => {
                    function.insert(k.clone(), v.clone());
                }
                "input_schema" => {
                    function.insert("parameters".into(), v.clone());
                }
                "cache_control" => {}
                "type" if v.is_null() || v == "custom" => {}
                "type" => {
                    let why = format!("{at}: server tool `{v}` runs only on Anthropic's side");
                    return Err(Untranslatable::new("tools", why));
                }
                other => {
                    let why = format!("{at}.{other} has no OpenAI function-tool counterpart");
                    return Err(Untranslatable::new("tools", why));
                }
            }
        }
        if !function.contains_key("name") {
            return Err(Untranslatable::new(
                "tools",
                format!("{at}.name is required"),
            ));
        }
        out.push(json!({ "type": "function", "function": function }));
    }
    Ok(Value::Array(out))
}

fn tool_choice_to_openai(
    choice: &Value,
    out: &mut Map<String, Value>,
) -> Result<(), Untranslatable> {
    let mapped = match str_field(choice, "type", "tool_choice", "tool_choice")? {
        "auto" => json!("auto"),
        "any" => json!("required"),
        "none" => json!("none"),
        "tool" => {
            let name = str_field(choice, "name", "tool_choice", "tool_choice")?;
            json!({ "type": "function", "function": { "name": name } })
        }
        other => {
            let why = format!("tool_choice of type `{other}` has no OpenAI counterpart");
            return Err(Untranslatable::new("tool_choice", why));
        }
    };
    out.insert("tool_choice".into(), mapped);
    if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
        out.insert("parallel_tool_calls".into(), false.into());
    }
    Ok(())
}

// === OpenAI -> Anthropic ===

/// OpenAI chat completions request body -> Anthropic Messages request body. `default_max_tokens`
/// is used when the client sent neither `max_tokens` nor `max_completion_tokens` (Anthropic requires max_tokens).
pub fn request_to_anthropic(
    body: &[u8],
    default_max_tokens: u64,
) -> Result<Vec<u8>, Untranslatable> {
    let req = parse_object(body, "the request body")?;
    let messages = req
        .get("messages")
        .ok_or_else(|| Untranslatable::new("messages", "`messages` is required"))?;
    let mut out = Map::new();
    messages_to_anthropic(messages, &mut out)?;
    let mut max_tokens: Option<u64> = None;
    let mut user = None;
    let mut safety_id = None;
    for (key, value) in req.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "messages" | "tools" | "tool_choice" | "parallel_tool_calls" => {}
            "model" | "top_p" | "top_k" => {
                out.insert(key.clone(), value.clone());
            }
            // The larger cap when both are sent, as the gateway's own summary reads them.
            "max_tokens" | "max_completion_tokens" => {
                let param = static_name(key, &["max_tokens"], "max_completion_tokens");
                let n = value
                    .as_u64()
                    .ok_or_else(|| wrong_type(param, key, "a non-negative integer"))?;
                max_tokens = Some(max_tokens.map_or(n, |m| m.max(n)));
            }
            "temperature" => match value.as_f64() {
                Some(t) if t > 1.0 => {
                    let why = format!("temperature {t} is above 1, the most Anthropic accepts (OpenAI's scale goes to 2)");
                    return Err(Untranslatable::new("temperature", why));
                }
                Some(_) => {
                    out.insert(key.clone(), value.clone());
                }
                None => return Err(wrong_type("temperature", "temperature", "a number")),
            },
            "stop" => {
                let stops = match value {
                    Value::String(s) => json!([s]),
                    Value::Array(_) => value.clone(),
                    _ => {
                        return Err(wrong_type(
                            "stop",
                            "stop",
                            "a string or an array of strings",
                        ))
                    }
                };
                out.insert("stop_sequences".into(), stops);
            }
            "stream" => {
                if !value.is_boolean() {
                    return Err(wrong_type("stream", "stream", "a boolean"));
                }
                out.insert(key.clone(), value.clone());
            }
            // Anthropic streams always report usage.
            "stream_options" => {}
            "user" => {
                user = Some(
                    value
                        .as_str()
                        .ok_or_else(|| wrong_type("user", "user", "a string"))?,
                )
            }
            "safety_identifier" => safety_id = value.as_str(),
            // Only stored completions (`store`, refused when true) use it; the gateway reads its
            // own tags from it before translating.
            "metadata" => {}
            // Dropped: see the module docs (a cache hint, not content).
            "prompt_cache_key" => {}
            other => refuse_unless_neutral(other, value)?,
        }
    }
    let max_tokens = max_tokens.unwrap_or(default_max_tokens);
    out.insert("max_tokens".into(), max_tokens.into());
    if let Some(id) = user.or(safety_id) {
        out.insert("metadata".into(), json!({ "user_id": id }));
    }
    tools_to_anthropic(&req, &mut out)?;
    Ok(to_bytes(&Value::Object(out)))
}

/// OpenAI parameters Anthropic lacks pass only with the value that asks for nothing.
fn refuse_unless_neutral(key: &str, value: &Value) -> Result<(), Untranslatable> {
    let neutral = match key {
        "n" | "best_of" => value.as_u64() == Some(1),
        "logprobs" | "store" => value == false,
        "top_logprobs" | "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty),
        "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
        "modalities" => value == &json!(["text"]),
        "service_tier" => matches!(value.as_str(), Some("auto" | "default")),
        _ => false,
    };
    if neutral {
        return Ok(());
    }
    let why = match key {
        "response_format" => {
            "Anthropic has no JSON mode; describe the format in the prompt or use a tool"
        }
        "n" | "best_of" => "Anthropic returns one completion per request",
        _ => "it has no Anthropic Messages counterpart",
    };
    Err(Untranslatable::new(
        static_name(key, OPENAI_ONLY_FIELDS, "body"),
        format!("`{key}` cannot be translated: {why}"),
    ))
}

/// The conversation, as Anthropic's alternating turns: consecutive messages of one role are
/// merged, and tool messages become `tool_result` blocks of a user turn.
fn messages_to_anthropic(
    value: &Value,
    out: &mut Map<String, Value>,
) -> Result<(), Untranslatable> {
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, msg) in as_array(value, "messages", "messages")?.iter().enumerate() {
        let at = format!("messages[{i}]");
        as_object(msg, "messages", &at)?;
        let role = str_field(msg, "role", "messages", &at)?;
        if role == "function" {
            let why = format!("{at}: legacy `function` messages are not translated; use tools");
            return Err(Untranslatable::new("functions", why));
        }
        if !get(msg, "name").is_null() {
            let why = format!("{at}.name: Anthropic messages carry no participant names");
            return Err(Untranslatable::new("messages", why));
        }
        let (role, blocks) = match role {
            "system" | "developer" if turns.is_empty() => {
                system.push(plain_text(get(msg, "content"), &format!("{at}.content"))?);
                continue;
            }
            "system" | "developer" => {
                let why = format!("{at}: Anthropic takes a system prompt only before the conversation, not inside it");
                return Err(Untranslatable::new("messages", why));
            }
            "user" => ("user", user_blocks(get(msg, "content"), &at)?),
            "assistant" => ("assistant", assistant_blocks(msg, &at)?),
            "tool" => {
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": str_field(msg, "tool_call_id", "messages", &at)?,
                    "content": plain_text(get(msg, "content"), &format!("{at}.content"))?,
                });
                ("user", vec![result])
            }
            other => {
                let why = format!("{at}.role `{other}` has no Anthropic counterpart");
                return Err(Untranslatable::new("messages", why));
            }
        };
        match turns.last_mut() {
            Some((last, prev)) if *last == role => prev.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    let messages = turns
        .into_iter()
        .map(|(role, mut blocks)| {
            // Anthropic refuses empty text blocks; an empty turn stays visible as "".
            blocks.retain(|b| !(b["type"] == "text" && b["text"] == ""));
            let content = match blocks.as_slice() {
                [] => json!(""),
                [one] if one["type"] == "text" => one["text"].clone(),
                _ => Value::Array(blocks),
            };
            json!({ "role": role, "content": content })
        })
        .collect();
    out.insert("messages".into(), Value::Array(messages));
    Ok(())
}

/// Text content: a string, or text parts joined without a separator, as OpenAI reads them.
/// `refusal` parts count as text: a refusal is what the assistant said.
fn plain_text(content: &Value, at: &str) -> Result<String, Untranslatable> {
    let parts = match content {
        Value::String(s) => return Ok(s.clone()),
        Value::Null => return Ok(String::new()),
        other => as_array(other, "messages", at)?,
    };
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{at}[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some(kind @ ("text" | "refusal")) => {
                text.push_str(str_field(part, kind, "messages", &at)?)
            }
            _ => {
                let why = format!("{at}: only text parts are possible here on Anthropic's side");
                return Err(Untranslatable::new("messages", why));
            }
        }
    }
    Ok(text)
}

fn user_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    let parts = match content {
        Value::String(s) => return Ok(vec![json!({ "type": "text", "text": s })]),
        other => as_array(other, "messages", &format!("{at}.content"))?,
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        blocks.push(match str_field(part, "type", "messages", &at)? {
            "text" => json!({ "type": "text", "text": str_field(part, "text", "messages", &at)? }),
            "image_url" => image_to_anthropic(get(part, "image_url"), &at)?,
            other => {
                let why = format!("{at}: `{other}` content has no Anthropic Messages counterpart");
                return Err(Untranslatable::new(
                    static_name(other, OPENAI_ONLY_PARTS, "messages"),
                    why,
                ));
            }
        });
    }
    Ok(blocks)
}

fn image_to_anthropic(image: &Value, at: &str) -> Result<Value, Untranslatable> {
    let url = str_field(image, "url", "messages", &format!("{at}.image_url"))?;
    if let Some((media_type, data)) = url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
        .filter(|(media_type, _)| !media_type.is_empty())
    {
        let source = json!({ "type": "base64", "media_type": media_type, "data": data });
        return Ok(json!({ "type": "image", "source": source }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({ "type": "image", "source": { "type": "url", "url": url } }));
    }
    let why = format!("{at}: an image must be a base64 data URL or an http(s) URL");
    Err(Untranslatable::new("image_url", why))
}

fn assistant_blocks(msg: &Value, at: &str) -> Result<Vec<Value>, Untranslatable> {
    for legacy in ["function_call", "audio"] {
        if !get(msg, legacy).is_null() {
            let why = format!("{at}.{legacy} has no Anthropic Messages counterpart");
            return Err(Untranslatable::new(
                static_name(legacy, &["audio"], "function_call"),
                why,
            ));
        }
    }
    // A refusal is what the assistant said; it stays in the conversation as text.
    let text = match (get(msg, "content"), get(msg, "refusal")) {
        (Value::Null, Value::String(r)) => r.clone(),
        (content, _) => plain_text(content, &format!("{at}.content"))?,
    };
    let mut blocks = vec![json!({ "type": "text", "text": text })];
    if let Some(calls) = msg.get("tool_calls").filter(|v| !v.is_null()) {
        let at = format!("{at}.tool_calls");
        for (j, call) in as_array(calls, "tool_calls", &at)?.iter().enumerate() {
            blocks.push(call_to_tool_use(call, &format!("{at}[{j}]"))?);
        }
    }
    Ok(blocks)
}

/// An OpenAI tool call as a `tool_use` block; answers use it too. Its arguments must be a JSON
/// object: Anthropic takes the input parsed, and a malformed string cannot be carried over.
pub(super) fn call_to_tool_use(call: &Value, at: &str) -> Result<Value, Untranslatable> {
    let kind = call
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    if kind != "function" {
        let why = format!("{at}: tool calls of type `{kind}` have no Anthropic counterpart");
        return Err(Untranslatable::new("tool_calls", why));
    }
    let function = get(call, "function");
    let fn_at = format!("{at}.function");
    let arguments = str_field(function, "arguments", "tool_calls", &fn_at)?;
    Ok(json!({
        "type": "tool_use",
        "id": str_field(call, "id", "tool_calls", at)?,
        "name": str_field(function, "name", "tool_calls", &fn_at)?,
        "input": arguments_object(arguments, at)?,
    }))
}

/// Tool-call arguments (a JSON string) as the object Anthropic's `input` holds. Empty
/// arguments, which some engines send for a call without parameters, are `{}`.
fn arguments_object(arguments: &str, at: &str) -> Result<Value, Untranslatable> {
    if arguments.trim().is_empty() {
        return Ok(json!({}));
    }
    let why = match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => return Ok(v),
        Ok(_) => "must be a JSON object".to_owned(),
        Err(e) => format!("are not valid JSON: {e}"),
    };
    Err(Untranslatable::new(
        "tool_calls",
        format!("{at}: tool arguments {why}"),
    ))
}

fn tools_to_anthropic(
    req: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<(), Untranslatable> {
    let tools = match req.get("tools") {
        None | Some(Value::Null) => &[][..],
        Some(v) => as_array(v, "tools", "tools")?.as_slice(),
    };
    let mut converted = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let at = format!("tools[{i}]");
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            let why = format!("{at}: tools of type `{kind}` have no Anthropic counterpart");
            return Err(Untranslatable::new("tools", why));
        }
        let mut t = Map::new();
        for (k, v) in as_object(get(tool, "function"), "tools", &format!("{at}.function"))? {
            match k.as_str() {
                "name" | "description" | "strict" => t.insert(k.clone(), v.clone()),
                "parameters" => t.insert("input_schema".into(), v.clone()),
                other => {
                    let why = format!("{at}.function.{other} has no Anthropic tool counterpart");
                    return Err(Untranslatable::new("tools", why));
                }
            };
        }
        // OpenAI allows a function without parameters; Anthropic requires a schema.
        t.entry("input_schema")
            .or_insert_with(|| json!({ "type": "object", "properties": {} }));
        converted.push(Value::Object(t));
    }
    let sent_choice = req.get("tool_choice").filter(|c| !c.is_null());
    let mut choice = match sent_choice {
        None => json!({ "type": "auto" }),
        Some(Value::String(s)) if s == "auto" => json!({ "type": "auto" }),
        Some(Value::String(s)) if s == "required" => json!({ "type": "any" }),
        Some(Value::String(s)) if s == "none" => json!({ "type": "none" }),
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v["type"] == "function" => json!({ "type": "tool", "name": name }),
            _ => {
                let why = "tool_choice must be auto, required, none or {\"type\":\"function\",\"function\":{\"name\"}}";
                return Err(Untranslatable::new("tool_choice", why));
            }
        },
    };
    let parallel = match req.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            let expected = "a boolean";
            return Err(wrong_type(
                "parallel_tool_calls",
                "parallel_tool_calls",
                expected,
            ));
        }
    };
    if converted.is_empty() {
        // Without tools, a choice of none or auto asks for nothing; a demand for a tool that
        // does not exist goes on, for the upstream to refuse.
        if choice["type"] != "auto" && choice["type"] != "none" {
            out.insert("tool_choice".into(), choice);
        }
        return Ok(());
    }
    out.insert("tools".into(), Value::Array(converted));
    if !parallel && choice["type"] != "none" {
        choice["disable_parallel_tool_use"] = true.into();
    }
    // `auto` is Anthropic's default: sent only when the client chose it or it carries a flag.
    if sent_choice.is_some() || choice != json!({ "type": "auto" }) {
        out.insert("tool_choice".into(), choice);
    }
    Ok(())
}
