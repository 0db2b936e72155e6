//! The client API's proxied endpoints, named by method and path.

/// The client API endpoints that are proxied (as opposed to answered locally).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

impl Endpoint {
    /// The proxied endpoint a method and path name; `None` for `GET /v1/models`, which the
    /// gateway answers itself.
    pub fn of(
        method: &http::Method,
        path: &str,
    ) -> Result<Option<Endpoint>, crate::error::GatewayError> {
        use crate::error::GatewayError;
        use http::Method;
        Ok(Some(match (method, path) {
            (&Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
            (&Method::POST, "/v1/completions") => Endpoint::Completions,
            (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
            (&Method::GET, "/v1/models") => return Ok(None),
            (
                method,
                path @ ("/v1/chat/completions"
                | "/v1/completions"
                | "/v1/embeddings"
                | "/v1/models"),
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
        }))
    }
}
