//! The response body of every client response: a small error body, or an upstream body
//! passed through frame by frame. One concrete type keeps hyper's write path free of boxing.

use crate::server::limits::{InFlightPermit, KeyShare};
use crate::upstream::stream::BodyError;
use crate::upstream::stream::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

pub struct GatewayBody {
    kind: Kind,
    /// The global in-flight permit lives as long as the body, so a long stream counts
    /// against the limit until its last byte is written, not just until its headers.
    _permit: Option<InFlightPermit>,
    /// Likewise the request's place in its API key's share.
    _share: Option<KeyShare>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Pin<Box<UpstreamBody>>),
}

// === impl GatewayBody ===

impl GatewayBody {
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full(Some(bytes)),
            _permit: None,
            _share: None,
        }
    }

    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
            _permit: None,
            _share: None,
        }
    }

    pub fn upstream(body: UpstreamBody) -> Self {
        Self {
            kind: Kind::Upstream(Box::pin(body)),
            _permit: None,
            _share: None,
        }
    }

    /// Keeps the request's place in its key's share until the last byte.
    pub fn hold_share(&mut self, share: KeyShare) {
        self._share = Some(share);
    }

    /// An error as the client's protocol shows it.
    pub fn error(error: &crate::error::GatewayError) -> http::Response<Self> {
        crate::api::error::response(error, GatewayBody::full)
    }

    /// An error in the client's protocol.
    pub fn error_for(
        protocol: crate::config::Protocol,
        error: &crate::error::GatewayError,
    ) -> http::Response<Self> {
        crate::api::error::response_for(protocol, error, GatewayBody::full)
    }
}

impl crate::server::EdgeBody for GatewayBody {
    fn refusal(error: &crate::error::GatewayError) -> http::Response<Self> {
        GatewayBody::error(error)
    }

    fn hold(&mut self, permit: InFlightPermit) {
        self._permit = Some(permit);
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}
