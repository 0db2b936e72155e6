//! `GET /dashboard`: the FinOps console's page, its script and style, embedded in the binary.
//!
//! A browser cannot send the admin key as a header on a page load, so the page accepts it once:
//!
//! ```text
//! GET /dashboard?key=KEY ─► right key: 303 to /dashboard + cookie tollgate_console=SESSION
//!                            (HttpOnly, SameSite=Strict, Path=/): the key leaves the address bar
//!                        ─► wrong key: 401, the sign-in form again
//! GET /dashboard         ─► with the cookie or `Authorization: Bearer KEY`: the page
//!                        ─► otherwise: 401, a sign-in form (it submits ?key=…)
//! ```
//!
//! The session is a hash of the admin key and a secret drawn when the process starts: it is
//! not the key, it ends with the process, and it changes with the key. The cookie is honoured
//! on GET requests only, so no other page can make a browser reload the config with it; the
//! key is never written into a page. The page's script and style are served without a key:
//! they hold no data, only the code every binary ships. A strict Content-Security-Policy lets
//! the page load nothing but them and talk to nothing but this port.

use crate::body::GatewayBody;
use crate::keys::{hash_key, hex};
use bytes::Bytes;
use http::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION,
    REFERRER_POLICY, SET_COOKIE, X_CONTENT_TYPE_OPTIONS,
};
use http::{Request, Response, StatusCode};
use std::sync::OnceLock;

const PAGE: &str = include_str!("../../assets/dashboard/index.html");
const LOGIN: &str = include_str!("../../assets/dashboard/login.html");
const SCRIPT: &str = include_str!("../../assets/dashboard/app.js");
const STYLE: &str = include_str!("../../assets/dashboard/style.css");

pub const COOKIE_NAME: &str = "tollgate_console";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// A static asset of the page, by path.
pub fn asset(path: &str) -> Option<Response<GatewayBody>> {
    let (body, kind) = match path {
        "/dashboard/app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard/style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    Some(respond(StatusCode::OK, body, kind))
}

pub fn page() -> Response<GatewayBody> {
    respond(StatusCode::OK, PAGE, "text/html; charset=utf-8")
}

/// The sign-in form; `failed` when a key was given and was wrong.
pub fn login(failed: bool) -> Response<GatewayBody> {
    let note = if failed {
        "That key is not the admin key."
    } else {
        ""
    };
    let body = LOGIN.replace("{{note}}", note);
    respond_owned(StatusCode::UNAUTHORIZED, body, "text/html; charset=utf-8")
}

/// The redirect that sets the session cookie and drops the key from the address.
pub fn signed_in(admin_key: &str) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    let h = resp.headers_mut();
    h.insert(LOCATION, HeaderValue::from_static("/dashboard"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Some(session) = session(admin_key) {
        let cookie = format!("{COOKIE_NAME}={session}; Path=/; HttpOnly; SameSite=Strict");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(SET_COOKIE, v);
        }
    }
    resp
}

/// Whether the request carries the session cookie of this admin key.
pub fn has_session<B>(req: &Request<B>, admin_key: &str) -> bool {
    let Some(expected) = session(admin_key) else {
        return false;
    };
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE_NAME)
        // Hashes on both sides: the comparison's time says nothing of the session's prefix.
        .any(|(_, value)| hash_key(value) == hash_key(&expected))
}

/// The session value for this admin key; `None` when the system has no randomness to draw
/// the process's secret from (then only the header signs in).
fn session(admin_key: &str) -> Option<String> {
    static SECRET: OnceLock<Option<[u8; 32]>> = OnceLock::new();
    let secret = SECRET.get_or_init(|| {
        let mut s = [0u8; 32];
        getrandom::fill(&mut s).ok().map(|()| s)
    });
    let secret = secret.as_ref()?;
    Some(hex(&hash_key(&format!(
        "tollgate-console-session\0{}\0{admin_key}",
        hex(secret)
    ))))
}

fn respond(status: StatusCode, body: &'static str, kind: &'static str) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(Bytes::from_static(body.as_bytes())));
    headers(&mut resp, status, kind);
    resp
}

fn respond_owned(status: StatusCode, body: String, kind: &'static str) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(Bytes::from(body)));
    headers(&mut resp, status, kind);
    resp
}

fn headers(resp: &mut Response<GatewayBody>, status: StatusCode, kind: &'static str) {
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}
