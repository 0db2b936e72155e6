//! How each simulated engine speaks, as data: the JSON it writes, where `usage` goes in its
//! streams, what it refuses, and which tokenize endpoints it has. Every entry comes from
//! docs/ENGINES.md (read from the engines' source); the response builders only read this
//! table, so a dialect is one `const` here and nothing else.
//!
//! The default, [`Dialect::OpenAi`], is the simulator as it always was: byte for byte the same
//! answers, so the tests and benchmarks written against it are unchanged.

use crate::config::Engine;
use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use serde_json::Value;
use std::io::{self, Write};

/// Which engine the simulator impersonates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dialect {
    #[default]
    OpenAi,
    Vllm,
    LlamaCpp,
    LlamaCppPython,
    Tgi,
    Sglang,
    Ollama,
    /// Mistral's API: usage on every stream's last chunk, asked or not.
    Mistral,
}

/// What one dialect does; see [`Dialect::spec`].
#[derive(Debug)]
pub struct Spec {
    /// Serializer of stream events.
    pub events: Json,
    /// Serializer of whole JSON answers (llama-cpp-python's differs from its events').
    pub bodies: Json,
    pub chat: StreamUsage,
    pub completion: StreamUsage,
    /// `usage` carries OpenAI's detail objects (cached and reasoning tokens).
    pub usage_details: bool,
    /// llama.cpp's `timings` (its own counts) on a stream's last chunk and in JSON answers.
    pub timings: bool,
    /// An `x-request-id` that is not a UUID is answered 400 with an empty body.
    pub uuid_request_id: bool,
    /// `stream_options` on a request that does not stream is answered 400 (vLLM).
    pub stream_options_need_stream: bool,
    /// `"stream_options": null` is answered 422 (TGI: absent is fine, `null` is not).
    pub stream_options_not_null: bool,
    pub tokenize: Tokenize,
    /// How prompts are counted: `None` is the OpenAI simulator's rough count, else the
    /// simulated tokenizer and chat template (`super::tokenizer`), which the engine's usage,
    /// its tokenize endpoints and its streamed text all agree on.
    pub template: Option<Template>,
    /// Generated words, one token each; cycled.
    pub words: &'static [&'static str],
}

/// Where a stream's `usage` goes, for one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamUsage {
    pub totals: Totals,
    /// What the other chunks carry in `usage`.
    pub others: Others,
    pub continuous: Continuous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Totals {
    /// Never: `stream_options` is ignored (llama-cpp-python).
    Never,
    /// On an extra last chunk with `choices: []`, when `include_usage` asks.
    WhenAsked,
    /// On the finishing chunk, next to its choice, asked or not.
    OnFinish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Others {
    Absent,
    /// `"usage":null`, when `include_usage` asks (OpenAI).
    NullWhenAsked,
    /// `"usage":null` on every chunk (TGI chat).
    NullAlways,
    /// Zeros on every chunk, when `include_usage` asks (Ollama completions).
    ZerosWhenAsked,
}

/// `stream_options.continuous_usage_stats`: running totals on every content chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuous {
    Unsupported,
    /// Only together with `include_usage` (vLLM).
    WithIncludeUsage,
    /// On its own too (SGLang).
    Alone,
}

/// The tokenize endpoints an engine serves (request and answer shapes in docs/ENGINES.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenize {
    None,
    /// `/tokenize` (no template, BOS only when asked) and `/apply-template`.
    LlamaCpp,
    /// `/tokenize` with a prompt or with messages (template applied): `{count, tokens}`.
    Vllm,
    /// As vLLM's, also under `/v1/tokenize`.
    Sglang,
    /// `/tokenize` (special tokens always added) and `/chat_tokenize` (template applied).
    Tgi,
    /// `/extras/tokenize` and `/extras/tokenize/count`: BOS always added, no template.
    LlamaCppPython,
}

/// The chat template's one engine-specific choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// The chat route adds BOS to the rendered prompt (llama.cpp, llama-cpp-python); the
    /// others tokenize it as rendered.
    pub chat_bos: bool,
}

/// How an engine serializes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Json {
    /// serde_json, pydantic, nlohmann: no spaces, raw UTF-8.
    Compact,
    /// Python's `json.dumps` defaults: `", "` and `": "`, non-ASCII as `\uXXXX`.
    Python,
    /// Go's `encoding/json`: compact, `<`, `>`, `&` as `\u003c`, `\u003e`, `\u0026`.
    Go,
}

/// What the OpenAI simulator has always generated.
const OPENAI_WORDS: &[&str] = &[
    "The", "gateway", "counts", "every", "token", "and", "prices", "each", "answer", "so", "teams",
    "see", "what", "their", "models", "cost",
];
/// Words that exercise every serializer's escapes (non-ASCII, astral, `<>&`).
const ENGINE_WORDS: &[&str] = &[
    "The", "gateway", "counts", "every", "tökén", "&", "prices", "<each>", "answer", "so", "téams",
    "see", "what", "their", "mödels", "cost", "😀",
];

const ASKED: StreamUsage = StreamUsage {
    totals: Totals::WhenAsked,
    others: Others::Absent,
    continuous: Continuous::Unsupported,
};
const ON_FINISH: StreamUsage = StreamUsage {
    totals: Totals::OnFinish,
    ..ASKED
};
const NEVER: StreamUsage = StreamUsage {
    totals: Totals::Never,
    ..ASKED
};
const SIM_TEMPLATE: Option<Template> = Some(Template { chat_bos: false });

const OPENAI: Spec = Spec {
    events: Json::Compact,
    bodies: Json::Compact,
    chat: StreamUsage {
        others: Others::NullWhenAsked,
        ..ASKED
    },
    completion: StreamUsage {
        others: Others::NullWhenAsked,
        ..ASKED
    },
    usage_details: true,
    timings: false,
    uuid_request_id: false,
    stream_options_need_stream: false,
    stream_options_not_null: false,
    tokenize: Tokenize::None,
    template: None,
    words: OPENAI_WORDS,
};
const VLLM: Spec = Spec {
    chat: StreamUsage {
        continuous: Continuous::WithIncludeUsage,
        ..ASKED
    },
    completion: StreamUsage {
        continuous: Continuous::WithIncludeUsage,
        ..ASKED
    },
    usage_details: false,
    stream_options_need_stream: true,
    tokenize: Tokenize::Vllm,
    template: SIM_TEMPLATE,
    words: ENGINE_WORDS,
    ..OPENAI
};
const SGLANG: Spec = Spec {
    chat: StreamUsage {
        continuous: Continuous::Alone,
        ..ASKED
    },
    completion: StreamUsage {
        continuous: Continuous::Alone,
        ..ASKED
    },
    stream_options_need_stream: false,
    tokenize: Tokenize::Sglang,
    ..VLLM
};
const LLAMA_CPP: Spec = Spec {
    chat: ASKED,
    completion: ON_FINISH,
    timings: true,
    stream_options_need_stream: false,
    tokenize: Tokenize::LlamaCpp,
    template: Some(Template { chat_bos: true }),
    ..VLLM
};
const LLAMA_CPP_PYTHON: Spec = Spec {
    events: Json::Python,
    chat: NEVER,
    completion: NEVER,
    timings: false,
    uuid_request_id: true,
    tokenize: Tokenize::LlamaCppPython,
    ..LLAMA_CPP
};
const TGI: Spec = Spec {
    chat: StreamUsage {
        others: Others::NullAlways,
        ..ASKED
    },
    completion: ON_FINISH,
    stream_options_need_stream: false,
    stream_options_not_null: true,
    tokenize: Tokenize::Tgi,
    ..VLLM
};
const OLLAMA: Spec = Spec {
    events: Json::Go,
    bodies: Json::Go,
    chat: ASKED,
    completion: StreamUsage {
        others: Others::ZerosWhenAsked,
        ..ASKED
    },
    stream_options_need_stream: false,
    tokenize: Tokenize::None,
    ..VLLM
};
const MISTRAL: Spec = Spec {
    chat: ON_FINISH,
    completion: ON_FINISH,
    stream_options_need_stream: false,
    tokenize: Tokenize::None,
    ..VLLM
};

// === impl Dialect ===

impl Dialect {
    pub const ALL: [Dialect; 8] = [
        Dialect::OpenAi,
        Dialect::Vllm,
        Dialect::LlamaCpp,
        Dialect::LlamaCppPython,
        Dialect::Tgi,
        Dialect::Sglang,
        Dialect::Ollama,
        Dialect::Mistral,
    ];

    pub fn spec(self) -> &'static Spec {
        match self {
            Dialect::OpenAi => &OPENAI,
            Dialect::Vllm => &VLLM,
            Dialect::LlamaCpp => &LLAMA_CPP,
            Dialect::LlamaCppPython => &LLAMA_CPP_PYTHON,
            Dialect::Tgi => &TGI,
            Dialect::Sglang => &SGLANG,
            Dialect::Ollama => &OLLAMA,
            Dialect::Mistral => &MISTRAL,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Mistral => "mistral",
            other => other.engine().as_str(),
        }
    }

    /// The `engine` of a backend that serves this dialect.
    pub fn engine(self) -> Engine {
        match self {
            Dialect::OpenAi | Dialect::Mistral => Engine::OpenAi,
            Dialect::Vllm => Engine::Vllm,
            Dialect::LlamaCpp => Engine::LlamaCpp,
            Dialect::LlamaCppPython => Engine::LlamaCppPython,
            Dialect::Tgi => Engine::Tgi,
            Dialect::Sglang => Engine::Sglang,
            Dialect::Ollama => Engine::Ollama,
        }
    }
}

impl std::str::FromStr for Dialect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Dialect::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Dialect::ALL.iter().map(|d| d.as_str()).collect();
                format!("unknown dialect `{s}`; one of {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Json ===

impl Json {
    pub fn write(self, out: &mut Vec<u8>, v: &Value) {
        let written = match self {
            Json::Compact => serde_json::to_writer(&mut *out, v),
            Json::Python => v.serialize(&mut serde_json::Serializer::with_formatter(
                &mut *out,
                PythonFormatter,
            )),
            Json::Go => v.serialize(&mut serde_json::Serializer::with_formatter(
                &mut *out,
                GoFormatter,
            )),
        };
        written.expect("a Value always serializes");
    }
}

/// `json.dumps(x)`: `ensure_ascii` (UTF-16 escapes, lowercase hex) and spaced separators.
struct PythonFormatter;

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, s: &str) -> io::Result<()> {
        // Quotes, backslashes and control characters come through `write_char_escape`, which
        // already writes them as Python does.
        for c in s.chars() {
            if (' '..='~').contains(&c) {
                w.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// `json.Marshal`: HTML-safe escapes, and Go's spelling of control characters.
struct GoFormatter;

impl Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, s: &str) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in s.char_indices() {
            let escaped: &[u8] = match c {
                '<' => b"\\u003c",
                '>' => b"\\u003e",
                '&' => b"\\u0026",
                '\u{2028}' => b"\\u2028",
                '\u{2029}' => b"\\u2029",
                _ => continue,
            };
            w.write_all(&s.as_bytes()[start..i])?;
            w.write_all(escaped)?;
            start = i + c.len_utf8();
        }
        w.write_all(&s.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + Write>(&mut self, w: &mut W, e: CharEscape) -> io::Result<()> {
        match e {
            CharEscape::Backspace => w.write_all(b"\\u0008"),
            CharEscape::FormFeed => w.write_all(b"\\u000c"),
            other => serde_json::ser::CompactFormatter.write_char_escape(w, other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn written(json: Json, v: &Value) -> String {
        let mut out = Vec::new();
        json.write(&mut out, v);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn each_serializer_writes_as_its_engine_does() {
        let v = json!({"a": ["x", 1], "b": "é <&> 😀\n\u{1b}\u{8}"});
        assert_eq!(
            written(Json::Compact, &v),
            "{\"a\":[\"x\",1],\"b\":\"é <&> 😀\\n\\u001b\\b\"}"
        );
        // Python 3: json.dumps({"a": ["x", 1], "b": "é <&> 😀\n\x1b\b"})
        assert_eq!(
            written(Json::Python, &v),
            r#"{"a": ["x", 1], "b": "\u00e9 <&> \ud83d\ude00\n\u001b\b"}"#
        );
        // Go: json.Marshal(map[string]any{...})
        assert_eq!(
            written(Json::Go, &v),
            r#"{"a":["x",1],"b":"é \u003c\u0026\u003e 😀\n\u001b\u0008"}"#
        );
        for json in [Json::Compact, Json::Python, Json::Go] {
            let back: Value = serde_json::from_str(&written(json, &v)).unwrap();
            assert_eq!(back, v, "{json:?} round-trips");
        }
    }

    #[test]
    fn names_parse_back() {
        for d in Dialect::ALL {
            assert_eq!(d.as_str().parse::<Dialect>(), Ok(d));
        }
        assert!("gpt".parse::<Dialect>().is_err());
    }

    #[test]
    fn engine_words_are_one_token_each() {
        for w in ENGINE_WORDS.iter().chain(OPENAI_WORDS) {
            assert!(!w.contains([' ', '\n']) && !w.is_empty(), "{w:?}");
        }
    }
}
