//! `POST /v1/messages/count_tokens`: a Messages request's input tokens, billed to no one.
//!
//! Counted where the count is exact, in this order: by the model's first Anthropic backend
//! (Anthropic's own `count_tokens`; no Claude tokenizer ships), else by its first self-hosted
//! engine that renders its own chat template (its tokenize endpoint), else here, with the
//! model's tokenizer or the stand-in `tokens` names for it. A backend that fails or is slow
//! leaves the local count. The answer says which counted in `x-tollgate-token-source`.

use crate::api::endpoint::Endpoint;
use crate::api::openai;
use crate::auth::Principal;
use crate::config::Protocol;
use crate::error::GatewayError;
use crate::live::LiveState;
use crate::meter::TokenSource;
use crate::upstream::engine::{self, EngineCounter};
use crate::upstream::headers;
use bytes::Bytes;
use http::HeaderValue;
use serde_json::Value;
use std::sync::Arc;

/// A count and who made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub input_tokens: u64,
    pub source: TokenSource,
}

/// Counts the request `body` (Anthropic's Messages shape) for `principal`; `client` holds
/// the headers the client sent, of which the forwarded ones (`anthropic-beta`, …) go to an
/// Anthropic backend.
pub async fn count(
    live: &LiveState,
    principal: &Principal,
    client: &http::request::Parts,
    body: &[u8],
    request_id: &HeaderValue,
) -> Result<Count, GatewayError> {
    let original: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::MalformedJson(format!("the body is not valid JSON: {e}")))?;
    // `max_tokens` is not part of a count request; the translation, which checks the request
    // the way a real one would be, wants one.
    let mut checked = original.clone();
    if let Some(o) = checked.as_object_mut() {
        o.entry("max_tokens").or_insert(1.into());
    }
    let chat = Bytes::from(super::anthropic::request_to_openai(
        &serde_json::to_vec(&checked).unwrap_or_default(),
    )?);
    let summary = openai::parse(&chat)?;
    summary.check_shape(Endpoint::ChatCompletions)?;
    let candidates: Vec<_> = live
        .router
        .candidates_for(&summary.model, principal)
        .collect();
    if candidates.is_empty() {
        return Err(GatewayError::UnknownModel(Arc::from(&*summary.model)));
    }
    if let Some(c) = candidates
        .iter()
        .find(|c| c.backend.cfg.protocol == Protocol::Anthropic)
    {
        let mut native = original;
        native["model"] = Value::from(&*c.model);
        let mut sent = headers::from_client(client);
        let key = c.backend.cfg.api_key.as_ref().map(|k| k.expose());
        headers::to_upstream(&mut sent, Protocol::Anthropic, key, request_id);
        match engine::anthropic_count(&c.backend, sent, Bytes::from(native.to_string())).await {
            Ok(n) => {
                return Ok(Count {
                    input_tokens: n,
                    source: TokenSource::Upstream,
                })
            }
            Err(e) => {
                tracing::debug!(backend = &*c.backend.cfg.name, error = %e, "count_tokens counted locally")
            }
        }
    }
    // llama-cpp-python is left out: it would need a learned template and cuts a running
    // stream when another request arrives.
    if let Some(counter) = candidates.iter().find_map(|c| {
        EngineCounter::new(&c.backend, &c.model).filter(EngineCounter::renders_template)
    }) {
        match counter.prompt(Endpoint::ChatCompletions, &chat).await {
            Ok(n) => {
                return Ok(Count {
                    input_tokens: n,
                    source: TokenSource::Engine,
                })
            }
            Err(e) => tracing::debug!(error = %e, "count_tokens counted locally"),
        }
    }
    let counter = crate::tokens::Encoding::for_model(&summary.model);
    Ok(Count {
        input_tokens: crate::tokens::count_prompt(counter, Endpoint::ChatCompletions, &chat).await,
        source: TokenSource::Local,
    })
}
