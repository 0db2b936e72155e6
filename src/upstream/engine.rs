//! Counting tokens with the serving engine's own tokenizer, for answers that carried no usage
//! (llama-cpp-python never reports it on streams; any stream cut short loses it).
//!
//! A self-hosted model's tokenizer and chat template cannot ship with the gateway for every
//! model, but the engine serving it has both and most engines expose them:
//!
//! | engine             | prompt of a chat                           | any text            |
//! |--------------------|--------------------------------------------|---------------------|
//! | `llama.cpp`        | `/apply-template`, then `/tokenize`: exact  | `/tokenize`         |
//! | `vllm`, `sglang`   | `/tokenize` with `messages`: exact          | `/tokenize`         |
//! | `tgi`              | `/chat_tokenize`: exact                     | `/tokenize`, less BOS |
//! | `llama-cpp-python` | contents by `/extras/tokenize/count`, plus  | `/extras/tokenize/count` |
//! |                    | the template overhead learned from usage    |                     |
//!
//! Calls go to the backend's own pooled client with its key, bounded by
//! [`ENGINE_COUNT_TIMEOUT`]; any failure leaves the local count in place. They are made while
//! the request still holds its slot on the backend: llama-cpp-python serves one request at a
//! time and cuts a running stream when another request waits, so a count must never overlap
//! the next generation.

use crate::api::endpoint::Endpoint;
use crate::config::Engine;
use crate::meter::template::Shape;
use crate::route::RouteBackend;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Longest an engine's count may take before the local count stands.
pub const ENGINE_COUNT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest tokenize answer read (a token list of a long prompt).
const MAX_ANSWER_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EngineCountError {
    #[error("the engine has no way to count this")]
    Unsupported,
    #[error("the request body is not a chat the engine can count")]
    Body,
    #[error("the template overhead of this prompt's shape is not learned yet")]
    NotLearned,
    #[error("the engine could not be asked: {0}")]
    Request(String),
    #[error("the engine answered {status}")]
    Status { status: u16 },
    #[error("the engine's answer has no count")]
    Answer,
    #[error("the engine took longer than {ENGINE_COUNT_TIMEOUT:?}")]
    Timeout,
}

/// Counts with one backend's engine, for one served model.
#[derive(Debug, Clone)]
pub struct EngineCounter {
    backend: Arc<RouteBackend>,
    model: Arc<str>,
}

impl EngineCounter {
    /// `None` when the backend's engine has no tokenize endpoint.
    pub fn new(backend: &Arc<RouteBackend>, model: &Arc<str>) -> Option<Self> {
        match backend.cfg.engine {
            Engine::LlamaCpp
            | Engine::LlamaCppPython
            | Engine::Vllm
            | Engine::Sglang
            | Engine::Tgi => Some(Self {
                backend: backend.clone(),
                model: model.clone(),
            }),
            Engine::OpenAi | Engine::Ollama => None,
        }
    }

    /// The engine renders its chat template itself, so its prompt counts need no learning.
    pub fn renders_template(&self) -> bool {
        !matches!(self.backend.cfg.engine, Engine::LlamaCppPython)
    }

    /// Prompt tokens of a request body, as the engine counts them when it serves it.
    pub async fn prompt(&self, endpoint: Endpoint, body: &[u8]) -> Result<u64, EngineCountError> {
        bounded(self.prompt_inner(endpoint, body)).await
    }

    /// Tokens of generated text, without anything the engine adds to a prompt (BOS).
    pub async fn text(&self, text: &str) -> Result<u64, EngineCountError> {
        if text.is_empty() {
            return Ok(0);
        }
        bounded(self.text_inner(text)).await
    }

    /// Learns what the template adds to prompts of this shape, from an engine-reported count.
    /// A no-op for engines that render their own template, or once the shape is known.
    pub async fn learn(&self, body: &[u8], engine_prompt: u64) -> Result<(), EngineCountError> {
        if self.renders_template() {
            return Ok(());
        }
        let chat = Chat::parse(body)?;
        let memory = &self.backend.state.template;
        if memory.knows(&self.model, chat.shape) {
            return Ok(());
        }
        let contents = bounded(self.contents(&chat)).await?;
        memory.learn(&self.model, chat.shape, contents, engine_prompt);
        Ok(())
    }

    async fn prompt_inner(&self, endpoint: Endpoint, body: &[u8]) -> Result<u64, EngineCountError> {
        let v: Value = serde_json::from_slice(body).map_err(|_| EngineCountError::Body)?;
        let engine = self.backend.cfg.engine;
        match endpoint {
            Endpoint::ChatCompletions => match engine {
                Engine::LlamaCpp => {
                    // The server's own rendering of this very request (tools included).
                    let rendered = self.post("/apply-template", &v).await?;
                    let prompt = rendered["prompt"]
                        .as_str()
                        .ok_or(EngineCountError::Answer)?;
                    let tokens = self
                        .post(
                            "/tokenize",
                            &json!({"content": prompt, "add_special": true, "parse_special": true}),
                        )
                        .await?;
                    list_len(&tokens["tokens"])
                }
                Engine::Vllm | Engine::Sglang => {
                    let mut req = json!({
                        "model": &*self.model,
                        "messages": v["messages"],
                        "add_generation_prompt": true,
                    });
                    if v.get("tools").is_some() {
                        req["tools"] = v["tools"].clone();
                    }
                    count_field(&self.post("/tokenize", &req).await?)
                }
                Engine::Tgi => {
                    let answer = self.post("/chat_tokenize", &v).await?;
                    list_len(&answer["tokenize_response"])
                }
                Engine::LlamaCppPython => {
                    let chat = Chat::parse(body)?;
                    let overhead = self
                        .backend
                        .state
                        .template
                        .overhead(&self.model, chat.shape)
                        .ok_or(EngineCountError::NotLearned)?;
                    Ok(self.contents(&chat).await? + overhead)
                }
                Engine::OpenAi | Engine::Ollama => Err(EngineCountError::Unsupported),
            },
            Endpoint::Completions => match &v["prompt"] {
                Value::String(p) => self.tokenize(p, true).await,
                // Token ids are their own count; several prompts are several generations.
                Value::Array(a) if a.iter().all(Value::is_number) => Ok(a.len() as u64),
                _ => Err(EngineCountError::Body),
            },
            Endpoint::Embeddings => Err(EngineCountError::Unsupported),
        }
    }

    async fn text_inner(&self, text: &str) -> Result<u64, EngineCountError> {
        self.tokenize(text, false).await
    }

    /// Tokens of `text`; with `special`, as a prompt (BOS and special tokens as the engine
    /// adds them), else as plain generated text.
    async fn tokenize(&self, text: &str, special: bool) -> Result<u64, EngineCountError> {
        match self.backend.cfg.engine {
            Engine::LlamaCpp => {
                let req =
                    json!({"content": text, "add_special": special, "parse_special": special});
                list_len(&self.post("/tokenize", &req).await?["tokens"])
            }
            Engine::Vllm | Engine::Sglang => {
                let req =
                    json!({"model": &*self.model, "prompt": text, "add_special_tokens": special});
                count_field(&self.post("/tokenize", &req).await?)
            }
            // Both always add what the model adds to a prompt (TGI's request type skips any
            // `add_special_tokens` it is sent): generated text is counted without it.
            Engine::Tgi => {
                let n = self.tgi_count(text).await?;
                self.less_specials(n, special, self.tgi_count("")).await
            }
            Engine::LlamaCppPython => {
                let n = self.extras_count(text).await?;
                self.less_specials(n, special, self.extras_count("")).await
            }
            Engine::OpenAi | Engine::Ollama => Err(EngineCountError::Unsupported),
        }
    }

    /// `n` tokens counted with the special tokens an engine always adds; without them
    /// unless `special`, as many as the empty string counts (learned once per model).
    async fn less_specials(
        &self,
        n: u64,
        special: bool,
        count_empty: impl std::future::Future<Output = Result<u64, EngineCountError>>,
    ) -> Result<u64, EngineCountError> {
        if special {
            return Ok(n);
        }
        let memory = &self.backend.state.template;
        let offset = match memory.text_offset(&self.model) {
            Some(o) => o,
            None => {
                let o = count_empty.await?;
                memory.set_text_offset(&self.model, o);
                o
            }
        };
        Ok(n.saturating_sub(offset))
    }

    async fn tgi_count(&self, text: &str) -> Result<u64, EngineCountError> {
        list_len(&self.post("/tokenize", &json!({ "inputs": text })).await?)
    }

    async fn extras_count(&self, text: &str) -> Result<u64, EngineCountError> {
        let req = json!({"input": text, "model": &*self.model});
        count_field(&self.post("/extras/tokenize/count", &req).await?)
    }

    /// The messages' contents, each counted as the engine tokenizes text inside a template.
    async fn contents(&self, chat: &Chat) -> Result<u64, EngineCountError> {
        let mut n = 0;
        for text in &chat.texts {
            n += self.tokenize(text, false).await?;
        }
        Ok(n)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value, EngineCountError> {
        let mut headers = http::HeaderMap::new();
        if let Some(Ok(mut v)) = self
            .backend
            .cfg
            .api_key
            .as_ref()
            .map(|key| http::HeaderValue::from_str(&format!("Bearer {}", key.expose())))
        {
            v.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, v);
        }
        post_json(&self.backend, path, headers, Bytes::from(body.to_string())).await
    }
}

/// Anthropic's own count of a Messages request (`POST /v1/messages/count_tokens`) on an
/// Anthropic backend: exact for Claude models, whose tokenizer does not ship. `headers` are
/// the client's, completed for this backend (its key, `anthropic-version`).
pub async fn anthropic_count(
    backend: &RouteBackend,
    headers: http::HeaderMap,
    body: Bytes,
) -> Result<u64, EngineCountError> {
    let v = bounded(post_json(
        backend,
        "/v1/messages/count_tokens",
        headers,
        body,
    ))
    .await?;
    v["input_tokens"].as_u64().ok_or(EngineCountError::Answer)
}

/// A JSON POST to one of the backend's counting endpoints on its own pooled client, and its
/// JSON answer (2xx only, bounded in size).
async fn post_json(
    backend: &RouteBackend,
    path: &str,
    headers: http::HeaderMap,
    body: Bytes,
) -> Result<Value, EngineCountError> {
    let mut req = http::Request::post(format!("{}{path}", backend.cfg.base_url))
        .body(Full::new(body))
        .map_err(|e| EngineCountError::Request(e.to_string()))?;
    *req.headers_mut() = headers;
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let resp = backend
        .client
        .request(req)
        .await
        .map_err(|e| EngineCountError::Request(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(EngineCountError::Status {
            status: resp.status().as_u16(),
        });
    }
    let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| EngineCountError::Request(e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|_| EngineCountError::Answer)
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, EngineCountError>>,
) -> Result<T, EngineCountError> {
    tokio::time::timeout(ENGINE_COUNT_TIMEOUT, f)
        .await
        .unwrap_or(Err(EngineCountError::Timeout))
}

fn list_len(v: &Value) -> Result<u64, EngineCountError> {
    v.as_array()
        .map(|a| a.len() as u64)
        .ok_or(EngineCountError::Answer)
}

fn count_field(v: &Value) -> Result<u64, EngineCountError> {
    v["count"].as_u64().ok_or(EngineCountError::Answer)
}

/// The texts a chat template wraps, and the conversation's shape.
struct Chat {
    texts: Vec<String>,
    shape: Shape,
}

impl Chat {
    fn parse(body: &[u8]) -> Result<Chat, EngineCountError> {
        let v: Value = serde_json::from_slice(body).map_err(|_| EngineCountError::Body)?;
        let messages = v["messages"].as_array().ok_or(EngineCountError::Body)?;
        // Tools are rendered by the template in ways no overhead table can follow.
        if v.get("tools").is_some_and(|t| !t.is_null()) {
            return Err(EngineCountError::Unsupported);
        }
        let mut texts = Vec::with_capacity(messages.len());
        for m in messages {
            match &m["content"] {
                Value::String(s) => texts.push(s.clone()),
                Value::Array(parts) => {
                    for p in parts {
                        match p["type"].as_str() {
                            Some("text") => {
                                texts.push(p["text"].as_str().unwrap_or_default().to_string())
                            }
                            // An image's tokens depend on the projector: not countable here.
                            _ => return Err(EngineCountError::Unsupported),
                        }
                    }
                }
                Value::Null => {}
                _ => return Err(EngineCountError::Body),
            }
            if m.get("tool_calls").is_some_and(|t| !t.is_null()) {
                return Err(EngineCountError::Unsupported);
            }
        }
        let system = messages
            .first()
            .is_some_and(|m| matches!(m["role"].as_str(), Some("system" | "developer")));
        Ok(Chat {
            texts,
            shape: Shape {
                messages: messages.len() as u32,
                system,
            },
        })
    }
}
