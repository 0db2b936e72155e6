//! Header hygiene at the proxy boundary, in place on the map hyper parsed (no copy).
//!
//! Hop-by-hop headers describe one connection and must not cross the proxy (RFC 9110 §7.6.1),
//! including any header the `Connection` header names. The caller's credentials never go
//! upstream; the backend's own key is set instead.

use crate::auth::X_API_KEY;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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

/// Makes a client request's headers fit to send to a backend.
pub fn to_upstream(headers: &mut HeaderMap, api_key: Option<&str>, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(&X_API_KEY);
    // Set anew from the body actually sent (the model name may have been rewritten).
    headers.remove(header::CONTENT_LENGTH);
    // Usage is read from the response, so it must arrive uncompressed.
    headers.remove(header::ACCEPT_ENCODING);
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-tollgate-"))
        .cloned()
        .collect();
    for k in ours {
        headers.remove(k);
    }
    if let Some(key) = api_key {
        if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {key}")) {
            v.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, v);
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

    #[test]
    fn caller_credentials_never_go_upstream() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tg-client"),
        );
        h.insert("x-api-key", HeaderValue::from_static("tg-client"));
        h.insert("x-tollgate-tags", HeaderValue::from_static("project=a"));
        h.insert("x-request-id", HeaderValue::from_static("client-chosen"));
        to_upstream(
            &mut h,
            Some("sk-backend"),
            &HeaderValue::from_static("req_1"),
        );
        assert_eq!(h[header::AUTHORIZATION], "Bearer sk-backend");
        assert!(!h.contains_key("x-api-key"));
        assert!(!h.contains_key("x-tollgate-tags"));
        assert_eq!(h[&X_REQUEST_ID], "req_1");
        to_upstream(&mut h, None, &HeaderValue::from_static("req_1"));
        assert!(!h.contains_key(header::AUTHORIZATION));
    }
}
