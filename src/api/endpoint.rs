//! The client API's endpoints, named by method and path.

use crate::config::Protocol;
use crate::error::GatewayError;
use http::Method;

/// The kinds of request that are proxied (as opposed to answered locally). An Anthropic
/// `/v1/messages` request is a chat completion once translated; the protocol it came in is
/// kept beside it ([`Route::Proxied`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    /// The OpenAI-style path of the endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// What a method and path ask of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Sent to a backend; the protocol is the client's (its body, answers and errors).
    Proxied(Endpoint, Protocol),
    /// `GET /v1/models`, answered from the config.
    Models,
    /// `POST /v1/messages/count_tokens`, answered by counting here.
    CountTokens,
}

/// The protocol a path speaks, for errors raised before (or without) a route: Anthropic's
/// paths get Anthropic's error body.
pub fn protocol_of_path(path: &str) -> Protocol {
    if path.starts_with("/v1/messages") {
        Protocol::Anthropic
    } else {
        Protocol::OpenAi
    }
}

impl Route {
    pub fn of(method: &Method, path: &str) -> Result<Route, GatewayError> {
        Ok(match (method, path) {
            (&Method::POST, "/v1/chat/completions") => {
                Route::Proxied(Endpoint::ChatCompletions, Protocol::OpenAi)
            }
            (&Method::POST, "/v1/completions") => {
                Route::Proxied(Endpoint::Completions, Protocol::OpenAi)
            }
            (&Method::POST, "/v1/embeddings") => {
                Route::Proxied(Endpoint::Embeddings, Protocol::OpenAi)
            }
            (&Method::POST, "/v1/messages") => {
                Route::Proxied(Endpoint::ChatCompletions, Protocol::Anthropic)
            }
            (&Method::POST, "/v1/messages/count_tokens") => Route::CountTokens,
            (&Method::GET, "/v1/models") => Route::Models,
            (
                method,
                path @ ("/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
                | "/v1/models"
                | "/v1/messages"
                | "/v1/messages/count_tokens"),
            ) => {
                return Err(GatewayError::MethodNotAllowed {
                    method: method.clone(),
                    path: path.to_string(),
                })
            }
            (_, path) => {
                return Err(GatewayError::UnknownPath(
                    crate::error::prefix_chars(path, 200).to_string(),
                ))
            }
        })
    }
}
