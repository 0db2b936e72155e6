//! Writes a TOML document the many ways TOML allows: keys in any order, a table as a
//! `[header]`, an inline table or dotted keys, an array of tables as `[[headers]]` or inline,
//! strings basic or literal with characters escaped or not, integers in any base with
//! underscores. A config must load the same however it is written; this makes the writings.
//! (The crate's `toml` is built without its writer, and this one varies more.)
#![allow(dead_code)]

use super::rng::Rng;
use toml::{Table, Value};

pub fn write(table: &Table, rng: &mut Rng) -> String {
    let mut out = String::new();
    section(&mut out, &[], table, rng);
    out
}

enum Place<'a> {
    Plain(&'a str, &'a Value),
    Dotted(&'a str, &'a Table),
    Header(&'a str, &'a Table),
    Headers(&'a str, &'a [Value]),
}

fn section(out: &mut String, path: &[String], table: &Table, rng: &mut Rng) {
    let mut entries: Vec<(&String, &Value)> = table.iter().collect();
    rng.shuffle(&mut entries);
    let mut places = Vec::new();
    for (k, v) in entries {
        let place = match v {
            Value::Table(t) if rng.chance(2) => Place::Header(k, t),
            Value::Table(t) if !t.is_empty() && rng.chance(2) => Place::Dotted(k, t),
            Value::Array(items)
                if !items.is_empty() && items.iter().all(Value::is_table) && rng.chance(2) =>
            {
                Place::Headers(k, items)
            }
            _ => Place::Plain(k, v),
        };
        places.push(place);
    }
    // Keys of this table must come before the first header that opens another.
    for p in &places {
        match p {
            Place::Plain(k, v) => {
                out.push_str(&key(k, rng));
                out.push_str(" = ");
                value(out, v, rng);
                comment_or_newline(out, rng);
            }
            Place::Dotted(k, t) => dotted(out, &key(k, rng), t, rng),
            _ => {}
        }
    }
    for p in places {
        match p {
            Place::Header(k, t) => {
                let path = child(path, k);
                out.push_str(&format!("\n[{}]", header(&path, rng)));
                comment_or_newline(out, rng);
                section(out, &path, t, rng);
            }
            Place::Headers(k, items) => {
                let path = child(path, k);
                for item in items {
                    out.push_str(&format!("\n[[{}]]", header(&path, rng)));
                    comment_or_newline(out, rng);
                    section(out, &path, item.as_table().expect("tables"), rng);
                }
            }
            _ => {}
        }
    }
}

fn child(path: &[String], k: &str) -> Vec<String> {
    let mut p = path.to_vec();
    p.push(k.to_string());
    p
}

fn header(path: &[String], rng: &mut Rng) -> String {
    let sep = if rng.chance(4) { " . " } else { "." };
    path.iter()
        .map(|k| key(k, rng))
        .collect::<Vec<_>>()
        .join(sep)
}

fn dotted(out: &mut String, prefix: &str, table: &Table, rng: &mut Rng) {
    for (k, v) in table {
        let name = format!("{prefix}.{}", key(k, rng));
        match v {
            Value::Table(t) if !t.is_empty() => dotted(out, &name, t, rng),
            _ => {
                out.push_str(&format!("{name} = "));
                value(out, v, rng);
                comment_or_newline(out, rng);
            }
        }
    }
}

fn comment_or_newline(out: &mut String, rng: &mut Rng) {
    if rng.chance(5) {
        out.push_str("   # a comment = [x]");
    }
    out.push('\n');
}

fn key(k: &str, rng: &mut Rng) -> String {
    let bare = !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare && !rng.chance(6) {
        k.to_string()
    } else {
        string(k, rng)
    }
}

fn value(out: &mut String, v: &Value, rng: &mut Rng) {
    match v {
        Value::String(s) => out.push_str(&string(s, rng)),
        Value::Integer(i) => out.push_str(&integer(*i, rng)),
        Value::Float(f) => out.push_str(&float(*f)),
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Datetime(d) => out.push_str(&d.to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // Arrays, unlike inline tables, may span lines.
                out.push_str(rng.pick::<&str>(&[" ", "", "\n  ", "\n"]));
                value(out, item, rng);
            }
            if !items.is_empty() && rng.chance(4) {
                out.push(',');
            }
            out.push_str(rng.pick::<&str>(&["", " ", "\n"]));
            out.push(']');
        }
        Value::Table(t) => {
            let mut entries: Vec<(&String, &Value)> = t.iter().collect();
            rng.shuffle(&mut entries);
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                out.push_str(if i > 0 { ", " } else { " " });
                out.push_str(&key(k, rng));
                out.push_str(" = ");
                value(out, v, rng);
            }
            out.push_str(" }");
        }
    }
}

fn string(s: &str, rng: &mut Rng) -> String {
    let literal_ok = !s.contains('\'') && !s.chars().any(|c| c.is_control() && c != '\t');
    if literal_ok && rng.chance(3) {
        return format!("'{s}'");
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || rng.chance(8) => {
                if (c as u32) < 0x10000 && rng.chance(2) {
                    out.push_str(&format!("\\u{:04X}", c as u32));
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn integer(i: i64, rng: &mut Rng) -> String {
    if i >= 0 {
        match rng.below(6) {
            0 => return format!("0x{i:x}"),
            1 => return format!("0o{i:o}"),
            2 => return format!("0b{i:b}"),
            _ => {}
        }
    }
    let digits = i.unsigned_abs().to_string();
    let mut out = String::new();
    if i < 0 {
        out.push('-');
    } else if rng.chance(5) {
        out.push('+');
    }
    for (n, d) in digits.chars().enumerate() {
        if n > 0 && rng.chance(4) {
            out.push('_');
        }
        out.push(d);
    }
    out
}

fn float(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        // Debug is the shortest text that reads back as the same f64, and always has a `.` or
        // an exponent, as TOML wants of a float.
        format!("{f:?}")
    }
}
