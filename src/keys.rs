//! Client API keys: random, shown once, stored only as a SHA-256 hash in the config.

use sha2::{Digest, Sha256};

/// Prefix that makes a leaked key easy to recognise in code and logs.
pub const KEY_PREFIX: &str = "tg-";

/// A new key and the `sha256:` line that goes into a team's `keys`.
pub fn new_key() -> Result<(String, String), getrandom::Error> {
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw)?;
    let key = format!("{KEY_PREFIX}{}", hex(&raw));
    let hash = format!("sha256:{}", hex(&hash_key(&key)));
    Ok((key, hash))
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_key_hash;

    #[test]
    fn a_new_key_matches_its_printed_hash() {
        let (key, line) = new_key().unwrap();
        assert!(key.starts_with(KEY_PREFIX));
        assert_eq!(parse_key_hash(&line), Some(hash_key(&key)));
        assert_ne!(new_key().unwrap().0, key);
    }
}
