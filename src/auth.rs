//! `Authorization: Bearer <key>` (or `x-api-key`) -> the calling team.
//!
//! Keys are compared by SHA-256 hash, so the config never holds a usable key and a lookup is
//! one hash plus one map probe.

use crate::config::Team;
use crate::error::GatewayError;
use crate::keys::{hash_key, hex};
use http::header::AUTHORIZATION;
use http::HeaderMap;
use std::collections::HashMap;
use std::sync::Arc;

pub static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

#[derive(Debug)]
pub struct Principal {
    pub team: Arc<Team>,
    /// The first hex digits of the key's hash: enough to tell keys apart in a ledger, useless to
    /// an attacker.
    pub key_id: Arc<str>,
}

/// Key hash -> principal, built once per config snapshot.
#[derive(Debug, Default)]
pub struct KeyTable {
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
}

impl KeyTable {
    pub fn new(teams: &[Arc<Team>]) -> Self {
        let mut by_hash = HashMap::new();
        for team in teams {
            for hash in &team.key_hashes {
                let key_id = Arc::from(format!("k-{}", &hex(hash)[..12]));
                by_hash.insert(
                    *hash,
                    Arc::new(Principal {
                        team: team.clone(),
                        key_id,
                    }),
                );
            }
        }
        Self { by_hash }
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Principal>, GatewayError> {
        let key = presented_key(headers).ok_or(GatewayError::MissingKey)?;
        self.by_hash
            .get(&hash_key(key))
            .cloned()
            .ok_or(GatewayError::InvalidKey)
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(AUTHORIZATION) {
        return bearer_token(v.to_str().ok()?);
    }
    let key = headers.get(&X_API_KEY)?.to_str().ok()?.trim();
    Some(key).filter(|k| !k.is_empty())
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 7235 §2.1), and clients write it as `bearer` or `BEARER`, some with more than one
/// space or a tab before the token: refusing them would turn a formatting habit into a 401.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::new_key;
    use http::HeaderValue;

    fn table_with(key_hash: &str) -> KeyTable {
        let team = Arc::new(Team {
            name: "search".into(),
            key_hashes: vec![crate::config::parse_key_hash(key_hash).unwrap()],
            tags: Default::default(),
            request_tags: vec![],
            regions: vec![],
            budgets: vec![],
        });
        KeyTable::new(&[team])
    }

    #[test]
    fn bearer_and_x_api_key_both_work() {
        let (key, hash) = new_key().unwrap();
        let table = table_with(&hash);
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        assert_eq!(&*table.authenticate(&h).unwrap().team.name, "search");
        let mut h = HeaderMap::new();
        h.insert(X_API_KEY.clone(), HeaderValue::from_str(&key).unwrap());
        assert!(table.authenticate(&h).is_ok());
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_spacing_is_tolerated() {
        let (key, hash) = new_key().unwrap();
        let table = table_with(&hash);
        for value in [
            format!("bearer {key}"),
            format!("BEARER {key}"),
            format!("BeArEr {key}"),
            format!("Bearer   {key}"),
            format!("Bearer \t {key} "),
        ] {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
            assert!(table.authenticate(&h).is_ok(), "{value:?}");
        }
        // A scheme is a whole word: `Bearerx` is another scheme, not Bearer without a space.
        for value in [
            format!("Bearer{key}"),
            format!("Bearerx {key}"),
            "Bearer ".into(),
        ] {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
            assert!(table.authenticate(&h).is_err(), "{value:?}");
        }
    }

    #[test]
    fn missing_and_wrong_keys_are_told_apart() {
        let (_, hash) = new_key().unwrap();
        let table = table_with(&hash);
        assert!(matches!(
            table.authenticate(&HeaderMap::new()),
            Err(GatewayError::MissingKey)
        ));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer tg-nope"));
        assert!(matches!(
            table.authenticate(&h),
            Err(GatewayError::InvalidKey)
        ));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(matches!(
            table.authenticate(&h),
            Err(GatewayError::MissingKey)
        ));
    }
}
