//! Writes a JSON value the many ways JSON allows: whitespace anywhere, keys in any order,
//! any character as a `\u` escape (a surrogate pair past the BMP), `/` escaped or not. What a
//! parser reads must not depend on which.
#![allow(dead_code)]

use super::rng::Rng;
use serde_json::Value;

/// `v` written one of those ways, chosen by `rng`.
pub fn write(v: &Value, rng: &mut Rng, shuffle: bool) -> String {
    let mut w = Writer {
        rng,
        shuffle,
        out: String::new(),
    };
    w.ws();
    w.value(v);
    w.ws();
    w.out
}

pub struct Writer<'r> {
    pub rng: &'r mut Rng,
    /// Keys in another order than the value's.
    pub shuffle: bool,
    pub out: String,
}

impl Writer<'_> {
    pub fn ws(&mut self) {
        for _ in 0..self.rng.below(3) {
            let w = [" ", "\t", "\n", "  ", "\r\n"][self.rng.below(5) as usize];
            self.out.push_str(w);
        }
    }

    pub fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                c if (c as u32) < 0x20 || self.rng.chance(4) => {
                    // Any character may be written as \uXXXX (a surrogate pair past the BMP).
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        self.out.push_str(&format!("\\u{:04x}", u));
                    }
                }
                '/' if self.rng.chance(2) => self.out.push_str("\\/"),
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    pub fn value(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                self.out.push('{');
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.shuffle {
                    for i in (1..entries.len()).rev() {
                        let j = self.rng.below(i as u64 + 1) as usize;
                        entries.swap(i, j);
                    }
                }
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        self.ws();
                        self.out.push(',');
                    }
                    self.ws();
                    self.string(k);
                    self.ws();
                    self.out.push(':');
                    self.ws();
                    self.value(v);
                }
                self.ws();
                self.out.push('}');
            }
            Value::Array(items) => {
                self.out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        self.ws();
                        self.out.push(',');
                    }
                    self.ws();
                    self.value(v);
                }
                self.ws();
                self.out.push(']');
            }
            Value::String(s) => self.string(s),
            other => self.out.push_str(&other.to_string()),
        }
    }
}
