//! Secrets that must never reach a log, a debug print, an error body or `tollgate check`'s
//! output: keys, held in a [`Secret`], and the passwords users write into store URLs
//! (`postgres://user:pass@host`, `redis://:pass@host`), taken out by [`redact_url`] and
//! [`redact_urls`] wherever a config value is quoted back.

use std::borrow::Cow;
use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl Secret {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Self(value.into())
    }

    /// The only way to read the value: call sites that do are easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(HIDDEN)
    }
}

const HIDDEN: &str = "*****";

/// `url` with its password, and any query parameter that looks like one, replaced. The
/// userinfo is taken to end at the *last* `@`, not at the first `/`: generated passwords hold
/// `/`, `?` and `#`, which end a URL's authority for a parser but not for the user who
/// pasted them. A value without `://` that holds an `@` is treated as userinfo too.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, rest),
    };
    let query = after.split_once('?').map(|(_, q)| q);
    if userinfo.is_none() && !query.is_some_and(has_secret_param) {
        return Cow::Borrowed(url);
    }
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    match userinfo.map(|u| u.split_once(':')) {
        // A user name is kept to tell stores apart; a lone userinfo may be a token.
        Some(Some((user, _))) => {
            out.push_str(user);
            out.push(':');
            out.push_str(HIDDEN);
            out.push('@');
        }
        Some(None) => {
            out.push_str(HIDDEN);
            out.push('@');
        }
        None => {}
    }
    match after.split_once('?') {
        Some((base, query)) => {
            out.push_str(base);
            out.push('?');
            for (i, pair) in query.split('&').enumerate() {
                if i > 0 {
                    out.push('&');
                }
                match pair.split_once('=') {
                    Some((k, _)) if is_secret_param(k) => {
                        out.push_str(k);
                        out.push('=');
                        out.push_str(HIDDEN);
                    }
                    _ => out.push_str(pair),
                }
            }
        }
        None => out.push_str(after),
    }
    Cow::Owned(out)
}

/// `text` with every URL in it passed through [`redact_url`]: for messages that quote what a
/// user wrote (a parser's error, a value echoed back), where a URL can stand anywhere.
pub fn redact_urls(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The URL starts at its scheme and runs to the first character that cannot be in it
        // as a config value is written: whitespace or a quote.
        let start = rest[..at]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

fn has_secret_param(query: &str) -> bool {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(k, _)| is_secret_param(k))
}

/// `password=` (libpq), `pass`, `pwd`, `secret`, `token`, `key`: names that carry credentials.
fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token", "key", "auth"]
        .iter()
        .any(|w| name.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_keep_everything_but_their_passwords() {
        for (url, shown) in [
            (
                "postgres://tg:s3cret@db:5432/ledger",
                "postgres://tg:*****@db:5432/ledger",
            ),
            (
                "redis://:s3cret@cache:6379/0",
                "redis://:*****@cache:6379/0",
            ),
            // Characters that end an authority, inside a password.
            (
                "postgres://tg:pa/s3cret@db/ledger",
                "postgres://tg:*****@db/ledger",
            ),
            ("redis://:a@b?s3cret@cache", "redis://:*****@cache"),
            ("rediss://s3cret@cache:6380", "rediss://*****@cache:6380"),
            (
                "postgres://db/ledger?user=tg&password=s3cret&sslmode=require",
                "postgres://db/ledger?user=tg&password=*****&sslmode=require",
            ),
            ("tg:s3cret@db/ledger", "tg:*****@db/ledger"),
            ("sqlite://data/tollgate.db", "sqlite://data/tollgate.db"),
            ("local", "local"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn urls_inside_a_message_are_found_and_redacted() {
        let text = "line 3: ledger = \"postgres://tg:s3cret@db/x\" x, also `redis://:s3cret@c`.";
        assert_eq!(
            redact_urls(text),
            "line 3: ledger = \"postgres://tg:*****@db/x\" x, also `redis://:*****@c`."
        );
        assert!(matches!(redact_urls("no url here"), Cow::Borrowed(_)));
        assert_eq!(redact_urls("«s3://a:s3cret@b»"), "«s3://a:*****@b»");
    }

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s} {s:?}"), "***** *****");
        assert_eq!(s.expose(), "sk-live-123");
    }
}
