//! The simulated engines' tokenizer, chat template and tokenize endpoints. A real engine's
//! usage, its tokenize endpoints and the text it streams agree exactly, because one tokenizer
//! and one template make all three; so do these.
//!
//! A token is a newline, a special marker (`<|im_start|>`, `<|im_end|>`, when parsed as
//! special), or a maximal run of ` ?[^ \n]+` (a space that starts no word is a token alone).
//! Generated words carry their leading space, so a streamed answer of n words re-tokenizes as
//! n tokens. The template is ChatML's, with what the gateway cannot know and must learn or
//! ask: a default system prompt when the first message is not a system one, five tokens
//! around each message, three for the generation prompt, and (per engine) a BOS.
//!
//! ```text
//! <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n   (only without a system message)
//! <|im_start|>user\nHello there<|im_end|>\n                      5 + 2 tokens
//! <|im_start|>assistant\n                                        3 tokens
//! ```

use super::dialect::{Template, Tokenize};
use super::Kind;
use http::StatusCode;
use serde_json::{json, Value};

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";
const SPECIALS: [&str; 2] = [IM_START, IM_END];
const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";
const BOS_ID: u32 = 1;
/// What `/tokenize` reports as the model's context.
const MAX_MODEL_LEN: u32 = 32768;

/// The tokens of `text`; with `parse_special`, the template's markers are one token each.
pub fn tokens(text: &str, parse_special: bool) -> Vec<&str> {
    let b = text.as_bytes();
    let special_at = |i: usize| {
        parse_special
            .then(|| SPECIALS.iter().find(|s| b[i..].starts_with(s.as_bytes())))
            .flatten()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if let Some(s) = special_at(i) {
            out.push(&text[i..i + s.len()]);
            i += s.len();
            continue;
        }
        let start = i;
        if b[i] == b'\n' {
            i += 1;
        } else {
            if b[i] == b' ' {
                i += 1;
            }
            // Only ASCII bytes end a word, so `i` stays on a character boundary.
            while i < b.len() && b[i] != b' ' && b[i] != b'\n' && special_at(i).is_none() {
                i += 1;
            }
        }
        out.push(&text[start..i]);
    }
    out
}

pub fn count(text: &str, parse_special: bool) -> u32 {
    tokens(text, parse_special).len() as u32
}

/// A token's id: BOS is 1, the markers 2 and 3, others a stable hash.
fn id(token: &str) -> u32 {
    if let Some(i) = SPECIALS.iter().position(|s| *s == token) {
        return 2 + i as u32;
    }
    let h = token.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    100 + h % 49_900
}

fn ids(text: &str, parse_special: bool, bos: bool) -> Vec<u32> {
    let mut out: Vec<u32> = bos.then_some(BOS_ID).into_iter().collect();
    out.extend(tokens(text, parse_special).into_iter().map(id));
    out
}

/// The chat template applied to `messages` (an array of `{role, content}`).
pub fn render(messages: &Value, add_generation_prompt: bool) -> String {
    let list = messages.as_array().map_or(&[][..], Vec::as_slice);
    let mut out = String::new();
    let system_first = list
        .first()
        .is_some_and(|m| matches!(m["role"].as_str(), Some("system" | "developer")));
    if !system_first {
        turn(&mut out, "system", DEFAULT_SYSTEM);
    }
    for m in list {
        let role = m["role"].as_str().unwrap_or("user");
        turn(&mut out, role, &content(&m["content"]));
    }
    if add_generation_prompt {
        out.push_str(IM_START);
        out.push_str("assistant\n");
    }
    out
}

fn turn(out: &mut String, role: &str, content: &str) {
    out.push_str(IM_START);
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str(IM_END);
    out.push('\n');
}

/// A message's text: a string, or its text parts joined as templates join them.
fn content(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// The prompt tokens an engine with this template reports for a request.
pub(crate) fn prompt_tokens(t: Template, kind: Kind, body: &Value) -> u32 {
    match kind {
        Kind::Chat => count(&render(&body["messages"], true), true) + u32::from(t.chat_bos),
        _ => match &body["prompt"] {
            Value::String(p) => count(p, true) + 1,
            // Token ids are their own count.
            Value::Array(a) if a.iter().all(Value::is_number) => a.len() as u32,
            Value::Array(a) => a
                .iter()
                .map(|p| p.as_str().map_or(0, |p| count(p, true) + 1))
                .sum(),
            _ => 0,
        },
    }
}

// === tokenize endpoints ===

/// The engine serves a tokenize endpoint at `path`.
pub(crate) fn serves(t: Tokenize, path: &str) -> bool {
    matches!(
        (t, path),
        (Tokenize::LlamaCpp, "/tokenize" | "/apply-template")
            | (Tokenize::Vllm, "/tokenize")
            | (Tokenize::Sglang, "/tokenize" | "/v1/tokenize")
            | (Tokenize::Tgi, "/tokenize" | "/chat_tokenize")
            | (
                Tokenize::LlamaCppPython,
                "/extras/tokenize" | "/extras/tokenize/count"
            )
    )
}

/// A tokenize endpoint's answer to `body`, or the status and message of a refusal.
pub(crate) fn answer(
    t: Tokenize,
    path: &str,
    body: &Value,
    models: &[String],
) -> Result<Value, (StatusCode, String)> {
    let text = |field: &str| {
        body[field].as_str().ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("`{field}` must be a string"),
            )
        })
    };
    let flag = |field: &str, default: bool| body[field].as_bool().unwrap_or(default);
    match (t, path) {
        (Tokenize::LlamaCpp, "/apply-template") => {
            Ok(json!({"prompt": render(&body["messages"], true)}))
        }
        (Tokenize::LlamaCpp, _) => {
            let ids = ids(
                text("content")?,
                flag("parse_special", true),
                flag("add_special", false),
            );
            Ok(json!({"tokens": ids}))
        }
        (Tokenize::Vllm | Tokenize::Sglang, _) => {
            if let Some(m) = body["model"].as_str() {
                if !models.is_empty() && !models.iter().any(|s| s == m) {
                    return Err((
                        StatusCode::NOT_FOUND,
                        format!("The model `{m}` does not exist."),
                    ));
                }
            }
            let ids = if body.get("messages").is_some() {
                let prompt = render(&body["messages"], flag("add_generation_prompt", true));
                ids(&prompt, true, flag("add_special_tokens", false))
            } else {
                ids(text("prompt")?, true, flag("add_special_tokens", true))
            };
            let mut v = json!({"count": ids.len(), "max_model_len": MAX_MODEL_LEN, "tokens": ids});
            if t == Tokenize::Vllm {
                v["token_strs"] = Value::Null;
            }
            Ok(v)
        }
        (Tokenize::Tgi, "/chat_tokenize") => {
            let prompt = render(&body["messages"], true);
            let spans = spans(&prompt, false);
            Ok(json!({"tokenize_response": spans, "templated_text": prompt}))
        }
        // Special tokens are always added: the request's `add_special_tokens` is not read.
        (Tokenize::Tgi, _) => Ok(Value::Array(spans(text("inputs")?, true))),
        (Tokenize::LlamaCppPython, _) => {
            let ids = ids(text("input")?, true, true);
            Ok(match path {
                "/extras/tokenize/count" => json!({"count": ids.len()}),
                _ => json!({"tokens": ids}),
            })
        }
        (Tokenize::None, _) => Err((StatusCode::NOT_FOUND, "Not Found".into())),
    }
}

/// TGI's token list: id, text and byte span; an added BOS spans nothing.
fn spans(text: &str, bos: bool) -> Vec<Value> {
    let mut out: Vec<Value> = bos
        .then(|| json!({"id": BOS_ID, "text": "", "start": 0, "stop": 0}))
        .into_iter()
        .collect();
    for t in tokens(text, true) {
        let start = t.as_ptr() as usize - text.as_ptr() as usize;
        out.push(json!({"id": id(t), "text": t, "start": start, "stop": start + t.len()}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_their_space_and_markers_are_single_tokens() {
        assert_eq!(
            tokens("The gateway  counts\n tökén😀 ", true),
            vec!["The", " gateway", " ", " counts", "\n", " tökén😀", " "]
        );
        let turn = "<|im_start|>user\nHi there<|im_end|>\n";
        assert_eq!(count(turn, true), 7);
        assert_eq!(count(turn, false), 5, "markers are text when not parsed");
        assert_eq!(count("", true), 0);
    }

    #[test]
    fn a_template_costs_its_overhead_plus_the_contents() {
        let contents = ["Be brief.", "What does a gateway meter?"];
        let with_system = json!([
            {"role": "system", "content": contents[0]},
            {"role": "user", "content": contents[1]},
        ]);
        let words: u32 = contents.iter().map(|c| count(c, false)).sum();
        assert_eq!(count(&render(&with_system, true), true), words + 2 * 5 + 3);
        let without = json!([{"role": "user", "content": contents[1]}]);
        assert_eq!(
            count(&render(&without, true), true),
            count(contents[1], false) + 5 + 3 + 5 + count(DEFAULT_SYSTEM, false)
        );
        let t = Template { chat_bos: true };
        let body = json!({"messages": with_system});
        assert_eq!(
            prompt_tokens(t, Kind::Chat, &body),
            words + 2 * 5 + 3 + 1,
            "BOS"
        );
    }

    #[test]
    fn each_engine_answers_its_own_tokenize_shape() {
        let models = ["m".to_string()];
        let ask = |t, path, body: Value| answer(t, path, &body, &models).unwrap();
        let v = ask(
            Tokenize::LlamaCpp,
            "/tokenize",
            json!({"content": "a b", "add_special": true}),
        );
        assert_eq!(v["tokens"].as_array().unwrap().len(), 3);
        assert_eq!(v["tokens"][0], BOS_ID);
        let v = ask(
            Tokenize::Vllm,
            "/tokenize",
            json!({"model": "m", "prompt": "a b", "add_special_tokens": false}),
        );
        assert_eq!(
            (v["count"].as_u64(), v["tokens"][0].as_u64()),
            (Some(2), Some(id("a") as u64))
        );
        let v = ask(
            Tokenize::Tgi,
            "/tokenize",
            json!({"inputs": "a b", "add_special_tokens": false}),
        );
        assert_eq!(v.as_array().unwrap().len(), 3, "TGI adds BOS regardless");
        assert_eq!(
            v[2],
            json!({"id": id(" b"), "text": " b", "start": 1, "stop": 3})
        );
        let v = ask(
            Tokenize::LlamaCppPython,
            "/extras/tokenize/count",
            json!({"input": ""}),
        );
        assert_eq!(v["count"], 1, "BOS only");
        assert!(answer(
            Tokenize::Sglang,
            "/v1/tokenize",
            &json!({"model": "x", "prompt": ""}),
            &models
        )
        .is_err());
        assert!(
            serves(Tokenize::Sglang, "/v1/tokenize") && !serves(Tokenize::Vllm, "/v1/tokenize")
        );
    }
}
