//! Who a request's cost is attributed to beyond its team: the team's tags from config, plus
//! request tags from the `x-tollgate-tags: k=v,k=v` header and the body's `metadata` object
//! (and `user`, when the team allows a `user` tag).
//!
//! A team may set only the keys listed in its `request_tags`; anything else is refused with
//! a 400 naming the key, so a typo never silently lands spend on an untagged line.

use crate::config::Team;
use http::HeaderMap;
use std::collections::BTreeMap;

pub static X_TOLLGATE_TAGS: http::HeaderName = http::HeaderName::from_static("x-tollgate-tags");

pub const MAX_REQUEST_TAGS: usize = 16;
pub const MAX_KEY_LEN: usize = 64;
pub const MAX_VALUE_LEN: usize = 256;

pub type Tags = BTreeMap<String, String>;

/// A tag the request may not set, with the field it came from (the header, `metadata`,
/// `user`); the caller answers 400 naming that field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TagError {
    pub param: &'static str,
    pub message: String,
}

/// Team tags overlaid with the request's own; the request's win on a shared key.
pub fn collect(
    team: &Team,
    headers: &HeaderMap,
    metadata: Option<&serde_json::Map<String, serde_json::Value>>,
    user: Option<&str>,
) -> Result<Tags, TagError> {
    let mut tags = team.tags.clone();
    let mut set = 0;
    let mut put = |key: &str, value: &str, source: &'static str| -> Result<(), TagError> {
        check(team, key, value, source)?;
        set += 1;
        if set > MAX_REQUEST_TAGS {
            return Err(bad(
                source,
                format!("at most {MAX_REQUEST_TAGS} request tags are allowed"),
            ));
        }
        tags.insert(key.to_string(), value.to_string());
        Ok(())
    };
    for value in headers.get_all(&X_TOLLGATE_TAGS) {
        let value = value
            .to_str()
            .map_err(|_| bad("x-tollgate-tags", "x-tollgate-tags must be ASCII".into()))?;
        for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                bad(
                    "x-tollgate-tags",
                    format!("malformed tag `{}`: expected key=value", truncate(pair)),
                )
            })?;
            put(k.trim(), v.trim(), "x-tollgate-tags")?;
        }
    }
    if let Some(meta) = metadata {
        for (k, v) in meta {
            let v = v.as_str().ok_or_else(|| {
                bad(
                    "metadata",
                    format!("metadata `{}` must be a string", truncate(k)),
                )
            })?;
            put(k, v, "metadata")?;
        }
    }
    if let Some(u) = user {
        // `user` is an OpenAI field with its own meaning; it becomes a tag only when allowed.
        if team.request_tags.iter().any(|k| k == "user") {
            put("user", u, "user")?;
        }
    }
    Ok(tags)
}

fn check(team: &Team, key: &str, value: &str, source: &'static str) -> Result<(), TagError> {
    if key.is_empty()
        || key.len() > MAX_KEY_LEN
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(bad(
            source,
            format!(
                "tag key `{}` must be 1-{MAX_KEY_LEN} characters of a-z, 0-9, _ - .",
                truncate(key)
            ),
        ));
    }
    if !team.request_tags.iter().any(|k| k == key) {
        return Err(bad(
            source,
            format!(
                "tag key `{key}` is not allowed for team `{}` (allowed: {})",
                team.name,
                allowed(team)
            ),
        ));
    }
    if value.len() > MAX_VALUE_LEN || value.chars().any(char::is_control) {
        return Err(bad(
            source,
            format!("tag `{key}` value must be at most {MAX_VALUE_LEN} printable characters"),
        ));
    }
    Ok(())
}

fn allowed(team: &Team) -> String {
    if team.request_tags.is_empty() {
        "none".into()
    } else {
        team.request_tags.join(", ")
    }
}

fn bad(param: &'static str, message: String) -> TagError {
    TagError { param, message }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(MAX_KEY_LEN) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn team() -> Team {
        Team {
            name: "search".into(),
            key_hashes: vec![],
            tags: [("department".to_string(), "rnd".to_string())].into(),
            request_tags: vec!["project".into(), "env".into()],
            regions: vec![],
            budgets: vec![],
        }
    }

    fn header(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(X_TOLLGATE_TAGS.clone(), HeaderValue::from_static(v));
        h
    }

    #[test]
    fn team_header_and_metadata_tags_merge() {
        let meta = serde_json::json!({"env": "prod"});
        let tags = collect(&team(), &header("project=alpha"), meta.as_object(), None).unwrap();
        assert_eq!(tags["department"], "rnd");
        assert_eq!(tags["project"], "alpha");
        assert_eq!(tags["env"], "prod");
    }

    #[test]
    fn keys_the_team_may_not_set_are_refused_by_name() {
        let e = collect(&team(), &header("project=a, owner=bob"), None, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("`owner` is not allowed for team `search`"),
            "{e}"
        );
        let meta = serde_json::json!({"cost_center": "x"});
        let e = collect(&team(), &HeaderMap::new(), meta.as_object(), None).unwrap_err();
        assert!(e.to_string().contains("`cost_center`"), "{e}");
    }

    #[test]
    fn malformed_headers_and_oversized_values_are_refused() {
        assert!(collect(&team(), &header("project"), None, None)
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        let long = format!("project={}", "x".repeat(300));
        let mut h = HeaderMap::new();
        h.insert(
            X_TOLLGATE_TAGS.clone(),
            HeaderValue::from_str(&long).unwrap(),
        );
        assert!(collect(&team(), &h, None, None).is_err());
    }

    #[test]
    fn user_becomes_a_tag_only_when_allowed() {
        assert!(!collect(&team(), &HeaderMap::new(), None, Some("u1"))
            .unwrap()
            .contains_key("user"));
        let mut t = team();
        t.request_tags.push("user".into());
        assert_eq!(
            collect(&t, &HeaderMap::new(), None, Some("u1")).unwrap()["user"],
            "u1"
        );
    }
}
