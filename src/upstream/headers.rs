//! Header hygiene at the proxy boundary.
//!
//! A request reaches a backend with the few client headers of [`FORWARDED`], the gateway's
//! own `X-Forwarded-*` and request id, and the backend's own key; nothing else the client
//! sent crosses. Answers coming back lose their hop-by-hop headers, which describe one
//! connection and must not cross a proxy (RFC 9110 §7.6.1), including any header the
//! `Connection` header names.

use crate::config::Protocol;
use crate::server::peer::PEER;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static OPENAI_BETA: HeaderName = HeaderName::from_static("openai-beta");
static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// The version of Anthropic's API the translation writes.
const ANTHROPIC_API_VERSION: &str = "2023-06-01";
static ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The client headers a backend gets. An allow list, because a deny list forwards whatever
/// the next SDK, or the next attacker, thinks of.
///
/// In, because the backend needs them to answer as the client expects:
/// - `content-type`, `accept`: what the body is, and what answer the client can read;
/// - `user-agent`: which SDK is calling, what an operator looks for in a provider's logs;
/// - `openai-beta`, `anthropic-version`, `anthropic-beta`: the API version and opt-in features
///   the body was written for; without them the same body asks for something else;
/// - `traceparent`, `tracestate`: W3C trace context, so a trace runs on through the gateway.
///
/// Out, on purpose (with everything unnamed):
/// - `authorization`, `x-api-key`: the caller's key; the backend's own is set instead;
/// - `openai-organization`, `openai-project`: they choose whom the provider bills, which the
///   backend's key decides, not the caller;
/// - `cookie`: the caller's session with someone else;
/// - `x-forwarded-*`, `forwarded`, `x-real-ip`: what the caller claims about itself; the
///   gateway sets its own from the connection;
/// - `accept-encoding`: answers are read to meter them, so they must arrive uncompressed;
/// - `content-length`, `content-encoding`: the body sent is the gateway's (the model name may
///   be rewritten), plain, and its length is set from it;
/// - `x-request-id`: the gateway's own id goes instead, one a strict engine accepts;
/// - `x-stainless-*`: the official SDKs' telemetry (language, OS, runtime, retry count). The
///   backend's client is the gateway, whose own attempts those counts do not describe, and
///   the rest tells a third party what runs in the caller's network, for no behaviour.
const FORWARDED: [&HeaderName; 8] = [
    &header::CONTENT_TYPE,
    &header::ACCEPT,
    &header::USER_AGENT,
    &OPENAI_BETA,
    &ANTHROPIC_VERSION,
    &ANTHROPIC_BETA,
    &TRACEPARENT,
    &TRACESTATE,
];

const HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in `Connection` are hop-by-hop too; collect them before it is removed.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed
        .iter()
        .chain(HOP_BY_HOP)
        .chain([&KEEP_ALIVE, &PROXY_CONNECTION])
    {
        headers.remove(name);
    }
}

/// The headers a client request may send on to any backend: those of [`FORWARDED`], and the
/// gateway's own `X-Forwarded-For` (the connection's peer), `X-Forwarded-Proto` and
/// `X-Forwarded-Host` (the `Host` the client asked for, or its h2 `:authority`). Made once
/// per request; [`to_upstream`] adds what differs per backend.
pub fn from_client(client: &http::request::Parts) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(FORWARDED.len() + 6);
    // One pass over what the client sent (a handful of headers), rather than a hashed
    // lookup of every allowed name.
    for (name, value) in &client.headers {
        if FORWARDED.contains(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    if let Some(peer) = client.headers.get(&PEER) {
        out.insert(X_FORWARDED_FOR.clone(), peer.clone());
    }
    // The gateway serves plain HTTP; TLS, if any, ended before it.
    out.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    let host = client.headers.get(header::HOST).cloned().or_else(|| {
        let authority = client.uri.authority()?;
        HeaderValue::from_str(authority.as_str()).ok()
    });
    if let Some(host) = host {
        out.insert(X_FORWARDED_HOST.clone(), host);
    }
    out
}

/// Completes the headers of [`from_client`] for one backend: its own key (or none: the map
/// may have been completed for another backend before) and the request id.
pub fn to_upstream(
    headers: &mut HeaderMap,
    protocol: Protocol,
    api_key: Option<&str>,
    request_id: &HeaderValue,
) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(&X_API_KEY);
    match protocol {
        Protocol::OpenAi => {
            if let Some(key) = api_key {
                if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {key}")) {
                    v.set_sensitive(true);
                    headers.insert(header::AUTHORIZATION, v);
                }
            }
        }
        Protocol::Anthropic => {
            if let Some(Ok(mut v)) = api_key.map(HeaderValue::from_str) {
                v.set_sensitive(true);
                headers.insert(X_API_KEY.clone(), v);
            }
            // Anthropic's API refuses a request without its version; an Anthropic client's
            // own goes through, an OpenAI client gets the version the translation is for.
            if !headers.contains_key(&ANTHROPIC_VERSION) {
                headers.insert(
                    ANTHROPIC_VERSION.clone(),
                    HeaderValue::from_static(ANTHROPIC_API_VERSION),
                );
            }
        }
    }
    // The gateway's id, always: it finds the request in both logs, and a client's own id may
    // be a form a strict server refuses.
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_including_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    fn parts(req: http::request::Builder) -> http::request::Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_allowed_client_headers_and_the_gateway_forwarding_headers_go() {
        let mut client = parts(
            http::Request::post("/v1/chat/completions")
                .header("host", "gw.example")
                .header("content-type", "application/json")
                .header("accept", "text/event-stream")
                .header("anthropic-beta", "a")
                .header("anthropic-beta", "b")
                .header("traceparent", "00-1-2-01")
                .header("cookie", "s=1")
                .header("openai-organization", "org-x")
                .header("openai-project", "proj-x")
                .header("x-forwarded-for", "6.6.6.6")
                .header("forwarded", "for=6.6.6.6")
                .header("accept-encoding", "gzip")
                .header("x-stainless-lang", "python")
                .header("x-evil", "1"),
        );
        client
            .headers
            .insert(&PEER, HeaderValue::from_static("2001:db8::7"));
        let h = from_client(&client);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "anthropic-beta",
                "content-type",
                "traceparent",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
            ]
        );
        assert_eq!(h.get_all("anthropic-beta").iter().count(), 2);
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::7");
        assert_eq!(h[&X_FORWARDED_HOST], "gw.example");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");

        // h2 carries the host in the URI (`:authority`), not in a header.
        let h2 = parts(http::Request::post("http://gw.example:8080/v1/embeddings"));
        assert_eq!(from_client(&h2)[&X_FORWARDED_HOST], "gw.example:8080");
    }

    #[test]
    fn caller_credentials_never_go_upstream() {
        let client = parts(
            http::Request::post("/v1/chat/completions")
                .header("authorization", "Bearer tg-client")
                .header("x-api-key", "tg-client")
                .header("x-tollgate-tags", "project=a")
                .header("x-request-id", "client-chosen"),
        );
        let mut h = from_client(&client);
        to_upstream(
            &mut h,
            Protocol::OpenAi,
            Some("sk-backend"),
            &HeaderValue::from_static("req_1"),
        );
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-backend");
        assert!(!h.contains_key("x-api-key"));
        assert!(!h.contains_key("x-tollgate-tags"));
        assert_eq!(h[&X_REQUEST_ID], "req_1");
        to_upstream(
            &mut h,
            Protocol::OpenAi,
            None,
            &HeaderValue::from_static("req_1"),
        );
        assert!(!h.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn an_anthropic_backend_gets_its_key_and_version_its_own_way() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tg-client"),
        );
        let id = HeaderValue::from_static("req_1");
        to_upstream(&mut h, Protocol::Anthropic, Some("sk-ant"), &id);
        assert_eq!(h[&X_API_KEY], "sk-ant");
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert_eq!(h[&ANTHROPIC_VERSION], ANTHROPIC_API_VERSION);
        // A client's own version is kept.
        let mut h = HeaderMap::new();
        h.insert(
            ANTHROPIC_VERSION.clone(),
            HeaderValue::from_static("2024-01-01"),
        );
        to_upstream(&mut h, Protocol::Anthropic, None, &id);
        assert_eq!(h[&ANTHROPIC_VERSION], "2024-01-01");
        assert!(!h.contains_key(&X_API_KEY));
    }
}
