//! What the gateway knows about one request as it moves through the phases.

use crate::api::endpoint::Endpoint;
use crate::auth::Principal;
use crate::tags::Tags;
use crate::tokens::Counter;
use bytes::Bytes;
use http::HeaderValue;
use std::sync::Arc;
use std::time::Instant;

/// A request id, kept as a header value because that is how it leaves the gateway.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }
}

#[derive(Debug)]
pub struct RequestCtx {
    pub id: RequestId,
    pub started: Instant,
    pub endpoint: Endpoint,
    pub principal: Arc<Principal>,
    pub tags: Tags,
    /// The tag values that become metric labels (`metrics.tag_labels`).
    pub metric_tags: crate::metrics::TagLabels,
    pub requested_model: Arc<str>,
    pub stream: bool,
    /// The client's body as received (shared, not copied): counted locally when needed.
    pub body: Bytes,
    pub counter: Counter,
    pub backend: Option<Arc<str>>,
    pub served_model: Option<Arc<str>>,
    /// Bytes sent upstream, for egress.
    pub upstream_request_bytes: u64,
    pub attempts: u32,
}
