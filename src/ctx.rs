//! What the gateway knows about one request as it moves through the phases.

use crate::api::endpoint::Endpoint;
use crate::auth::Principal;
use crate::tags::Tags;
use crate::tokens::Counter;
use bytes::Bytes;
use http::HeaderValue;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request id, kept as a header value because that is how it leaves the gateway.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

/// One request, from the moment its caller is known to its record. Made right after
/// authentication and lent (`&mut`) to each phase in turn, which fills in what it learned;
/// the record guard (`record::Completion`) owns it, so however the request ends, its record
/// is written from what the phases left here.
#[derive(Debug)]
pub struct RequestCtx {
    pub id: RequestId,
    pub started: Instant,
    pub endpoint: Endpoint,
    /// The protocol the client speaks (its body, answers and errors).
    pub client_protocol: crate::config::Protocol,
    pub principal: Arc<Principal>,
    /// Read (api): the client's body as received (shared, not copied), and what it asks.
    pub body: Bytes,
    /// Empty until the body names it.
    pub requested_model: Arc<str>,
    pub stream: bool,
    /// Tagged (tags): the team's and the request's tags, and those that are metric labels.
    pub tags: Tags,
    pub metric_tags: crate::metrics::TagLabels,
    /// Sent (route, upstream): where it went, how it is counted, how often it was tried.
    pub counter: Counter,
    pub backend: Option<Arc<str>>,
    pub served_model: Option<Arc<str>>,
    /// Bytes sent upstream, for egress.
    pub upstream_request_bytes: u64,
    pub attempts: u32,
    /// Attempts sent after one whose backend may have begun working on the request.
    pub resent: u32,
    /// Time spent waiting on upstreams, so the gateway's own time can be told apart.
    pub upstream_wait: Duration,
}

impl RequestCtx {
    pub fn new(
        id: RequestId,
        started: Instant,
        endpoint: Endpoint,
        principal: Arc<Principal>,
    ) -> Self {
        Self {
            id,
            started,
            endpoint,
            client_protocol: crate::config::Protocol::OpenAi,
            principal,
            body: Bytes::new(),
            requested_model: Arc::from(""),
            stream: false,
            tags: Tags::new(),
            metric_tags: Default::default(),
            counter: crate::tokens::Encoding::for_model(""),
            backend: None,
            served_model: None,
            upstream_request_bytes: 0,
            attempts: 0,
            resent: 0,
            upstream_wait: Duration::ZERO,
        }
    }

    /// The model that answered, else the one asked for.
    pub fn model(&self) -> Arc<str> {
        self.served_model
            .clone()
            .unwrap_or_else(|| self.requested_model.clone())
    }
}
