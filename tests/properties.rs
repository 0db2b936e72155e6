//! Properties of what the gateway reads from people it does not control: a caller's tags
//! (`x-tollgate-tags`, `metadata`, `user`), a caller's request body, and an operator's config
//! file. Whatever comes in, nothing panics; what is accepted keeps the documented limits; what
//! is refused says which field. (The SSE observer's properties are in `tests/observer.rs`,
//! the random mutation of real inputs in `tests/fuzz.rs`.)

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tollgate::api::openai::{parse, BodyEdits};
use tollgate::tags::{self, MAX_REQUEST_TAGS};

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;
#[path = "common/json_writer.rs"]
mod json_writer;
#[path = "common/toml_writer.rs"]
mod toml_writer;
#[path = "common/invariants.rs"]
mod invariants;
use invariants::{
    accepted_body_holds, check_config, check_request, check_tags, errors_name_a_field, load,
    rewritten_loads_alike, team, REQUEST_TAGS,
};

// === tags ===

fn tag_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(REQUEST_TAGS).prop_map(String::from),
        1 => Just("department".to_string()),
        1 => "[A-Za-z0-9_.-]{0,70}",
        1 => "[a-z]{100,1000}",
        1 => "\\PC{0,8}",
        1 => " ?[a-z]{1,3}[ =]?",
    ]
}

fn tag_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9 ._/-]{0,12}",
        1 => "[ -~]{250,260}",
        1 => "\\PC{0,12}",
        1 => "[a-z]{0,3}[\\x00-\\x1f\\x7f][a-z]{0,3}",
    ]
}

/// One `x-tollgate-tags` value: pairs joined by commas, spaced or not, with the odd
/// malformed piece, or any bytes a header may carry.
fn tag_header() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        6 => (tag_key(), tag_value(), "[ \t]{0,2}").prop_map(|(k, v, s)| format!("{s}{k}{s}={s}{v}")),
        1 => "[a-z]{0,5}",
        1 => Just(String::new()),
    ];
    prop_oneof![
        8 => prop::collection::vec(piece, 0..20).prop_map(|p| p.join(",").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..80),
    ]
}

fn metadata() -> impl Strategy<Value = Option<Map<String, Value>>> {
    let value = prop_oneof![
        8 => tag_value().prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => Just(Value::Null),
        1 => Just(json!({"nested": "x"})),
    ];
    prop::option::of(
        prop::collection::vec((tag_key(), value), 0..20).prop_map(|kv| kv.into_iter().collect()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// See [`check_tags`].
    #[test]
    fn request_tags_follow_the_documented_rules(
        headers in prop::collection::vec(tag_header(), 0..3),
        metadata in metadata(),
        user in prop::option::of(tag_value()),
    ) {
        check_tags(&team(), &headers, metadata.as_ref(), user.as_deref());
    }
}

#[test]
fn the_seventeenth_request_tag_is_refused() {
    let team = team();
    let pairs = |n: usize| {
        let mut h = HeaderMap::new();
        let v = vec!["project=p"; n].join(",");
        h.insert(
            tags::X_TOLLGATE_TAGS.clone(),
            HeaderValue::from_str(&v).unwrap(),
        );
        h
    };
    assert!(tags::collect(&team, &pairs(MAX_REQUEST_TAGS), None, None).is_ok());
    let e = tags::collect(&team, &pairs(MAX_REQUEST_TAGS + 1), None, None).unwrap_err();
    assert_eq!(e.param, "x-tollgate-tags");
}

// === the request parser ===

/// A chat request as an OpenAI SDK would send it, and what the gateway must read from it.
#[derive(Debug, Clone)]
struct Chat {
    body: Value,
    model: String,
    stream: Option<bool>,
    include_usage: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    user: Option<String>,
    metadata: Option<Map<String, Value>>,
}

fn chat() -> impl Strategy<Value = Chat> {
    let message = (
        prop::sample::select(&["system", "user", "assistant"][..]),
        "\\PC{0,40}",
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    let metadata = prop::option::of(
        prop::collection::btree_map("[a-z_]{1,12}", "[a-z0-9 -]{0,16}", 0..4).prop_map(|m| {
            m.into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect::<Map<_, _>>()
        }),
    );
    (
        "[A-Za-z0-9][A-Za-z0-9._:/-]{0,40}",
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(1u64..200_000),
        prop::option::of(1u64..200_000),
        prop::option::of("[a-z0-9_-]{1,16}"),
        metadata,
        prop::collection::vec(message, 1..5),
        // Tenths: short decimals read back as the same f64 with serde_json's fast parser.
        prop::option::of((0u8..=20).prop_map(|t| f64::from(t) / 10.0)),
    )
        .prop_map(
            |(model, stream, include_usage, mt, mct, user, metadata, messages, temperature)| {
                let mut body = Map::new();
                body.insert("model".into(), json!(model));
                body.insert("messages".into(), json!(messages));
                if let Some(s) = stream {
                    body.insert("stream".into(), json!(s));
                }
                // OpenAI takes `stream_options` only on a stream.
                let include_usage = include_usage.filter(|_| stream == Some(true));
                if let Some(u) = include_usage {
                    body.insert("stream_options".into(), json!({"include_usage": u}));
                }
                if let Some(n) = mt {
                    body.insert("max_tokens".into(), json!(n));
                }
                if let Some(n) = mct {
                    body.insert("max_completion_tokens".into(), json!(n));
                }
                if let Some(u) = &user {
                    body.insert("user".into(), json!(u));
                }
                if let Some(m) = &metadata {
                    body.insert("metadata".into(), Value::Object(m.clone()));
                }
                if let Some(t) = temperature {
                    body.insert("temperature".into(), json!(t));
                }
                Chat {
                    body: Value::Object(body),
                    model,
                    stream,
                    include_usage,
                    max_tokens: mt,
                    max_completion_tokens: mct,
                    user,
                    metadata,
                }
            },
        )
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,8}".prop_map(Value::from),
        prop::sample::select(&["model", "m", "", "stream", "max_tokens"][..]).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        let key = prop_oneof![
            prop::sample::select(
                &[
                    "model",
                    "stream",
                    "stream_options",
                    "include_usage",
                    "max_tokens",
                    "max_completion_tokens",
                    "metadata",
                    "user",
                    "tools",
                    "functions",
                    "response_format",
                    "type",
                    "messages",
                    "content",
                    "image_url",
                ][..]
            )
            .prop_map(String::from),
            "[a-z]{1,4}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// However an SDK writes a chat request, the summary says what was sent.
    #[test]
    fn a_valid_chat_body_is_read_as_written(c in chat(), seed in any::<u64>()) {
        let text = json_writer::write(&c.body, &mut Rng::new(seed), true);
        let s = parse(text.as_bytes()).unwrap_or_else(|e| panic!("{e}: {text}"));
        prop_assert_eq!(&*s.model, c.model.as_str());
        prop_assert_eq!(s.stream, c.stream.unwrap_or(false));
        prop_assert_eq!(s.include_usage, c.include_usage.unwrap_or(false));
        // Both sent: the larger, since engines disagree on which one wins.
        let cap = match (c.max_completion_tokens, c.max_tokens) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        prop_assert_eq!(s.max_output_tokens, cap);
        prop_assert_eq!(s.user.as_deref(), c.user.as_deref());
        prop_assert_eq!(s.metadata.as_ref(), c.metadata.as_ref());
        prop_assert_eq!(s.features, tollgate::config::Features::NONE);
        accepted_body_holds(text.as_bytes());
        // The edits leave every other field as it was.
        let mut edits = BodyEdits::default();
        edits.set_model(&s.model_span, "other");
        let out: Value = serde_json::from_slice(&edits.apply(&bytes::Bytes::from(text.clone()))).unwrap();
        let mut want = c.body.clone();
        want["model"] = json!("other");
        prop_assert_eq!(out, want);
    }

    /// See [`check_request`].
    #[test]
    fn any_bytes_are_parsed_or_refused(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (json_value(), any::<u64>()).prop_map(|(v, seed)| json_writer::write(&v, &mut Rng::new(seed), false).into_bytes()),
    ]) {
        check_request(&bytes);
    }
}

// === the config loader ===

fn examples() -> Vec<(&'static str, &'static str)> {
    vec![
        ("tollgate.toml", include_str!("../config/tollgate.toml")),
        ("demo.toml", include_str!("../config/demo.toml")),
    ]
}

/// Values of every TOML type, to put where another type belongs.
fn other_type(original: &toml::Value, pick: usize) -> Option<toml::Value> {
    use toml::Value as V;
    let mut t = toml::Table::new();
    t.insert("x".into(), V::Integer(1));
    let candidates = [
        V::String("s".into()),
        V::Boolean(true),
        V::Table(t),
        V::Array(vec![V::Boolean(false)]),
    ];
    // Integers and floats stand in for each other where TOML's reader allows it, and a
    // struct can be read from an array; neither is a type error.
    let c = candidates[pick % candidates.len()].clone();
    let same = std::mem::discriminant(&c) == std::mem::discriminant(original);
    let struct_from_array = original.is_table() && c.is_array();
    (!same && !struct_from_array).then_some(c)
}

/// Every path to a value in a TOML document, in `backend[0].models[1].name` form.
fn paths(v: &toml::Value, at: String, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                out.push(p.clone());
                paths(v, p, out);
            }
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                let p = format!("{at}[{i}]");
                out.push(p.clone());
                paths(v, p, out);
            }
        }
        _ => {}
    }
}

fn at_path<'a>(v: &'a mut toml::Value, path: &str) -> &'a mut toml::Value {
    let mut v = v;
    for part in path.split('.') {
        let (key, indices) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            v = v.get_mut(key).unwrap();
        }
        for i in indices.split('[').filter(|s| !s.is_empty()) {
            v = v
                .get_mut(i.trim_end_matches(']').parse::<usize>().unwrap())
                .unwrap();
        }
    }
    v
}

#[test]
fn the_examples_load_and_round_trip() {
    for (name, text) in examples() {
        let c = load(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        for seed in 0..64 {
            rewritten_loads_alike(text, &c, seed);
        }
    }
}

/// Pieces of TOML and of our config, to make text that gets past the first character.
const TOML_SOUP: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "backend",
    "team",
    "server",
    "models",
    "gpu",
    "budgets",
    "=",
    " = ",
    "\"",
    "'",
    "\"\"\"",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "#",
    " ",
    "name",
    "url",
    "hosting",
    "\"self_hosted\"",
    "\"commercial\"",
    "listen",
    "\"127.0.0.1:0\"",
    "window",
    "\"day\"",
    "usd",
    "tokens",
    "1",
    "-1",
    "0",
    "1e400",
    "nan",
    "inf",
    "1.5",
    "0x10",
    "true",
    "9223372036854775807",
    "18446744073709551616",
    "\\u0000",
    "\\",
    "é",
    "\"http://h\"",
    "tags",
    "request_tags",
    "tag_labels",
    "metrics",
    "store",
    "ledger",
    "\"sqlite://x\"",
    "fraction",
    "hourly_usd",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// See [`check_config`].
    #[test]
    fn any_text_loads_or_names_what_is_wrong(text in prop_oneof![
        "\\PC{0,200}",
        prop::collection::vec(prop::sample::select(TOML_SOUP), 0..80).prop_map(|p| p.concat()),
    ]) {
        check_config(&text, 0);
    }

    /// A valid config with one value of the wrong type is refused, naming exactly that field.
    #[test]
    fn a_value_of_the_wrong_type_is_named(
        example in 0usize..2,
        which in any::<prop::sample::Index>(),
        kind in 0usize..4,
        seed in any::<u64>(),
    ) {
        let (_, text) = examples()[example];
        let mut doc = toml::Value::Table(toml::from_str(text).unwrap());
        let mut all = Vec::new();
        paths(&doc, String::new(), &mut all);
        let path = which.get(&all).clone();
        let target = at_path(&mut doc, &path);
        let Some(replacement) = other_type(target, kind) else { return Ok(()) };
        let before = target.clone();
        *target = replacement;
        let written = toml_writer::write(doc.as_table().unwrap(), &mut Rng::new(seed));
        let e = load(&written).expect_err(&format!("{path}: {before:?} replaced, accepted:\n{written}"));
        errors_name_a_field(&e);
        prop_assert!(
            e.errors.iter().any(|err| err.path == path),
            "{path} not named: {e}"
        );
    }

    /// A key no version of the config has is refused by name (except in `tags`, whose keys
    /// are the user's).
    #[test]
    fn an_unknown_key_is_named(
        example in 0usize..2,
        which in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let (_, text) = examples()[example];
        let mut doc = toml::Value::Table(toml::from_str(text).unwrap());
        let mut tables = vec![String::new()];
        let mut all = Vec::new();
        paths(&doc, String::new(), &mut all);
        tables.extend(all.into_iter().filter(|p| {
            at_path(&mut doc, p).is_table()
        }));
        let path = which.get(&tables).clone();
        let target = if path.is_empty() { &mut doc } else { at_path(&mut doc, &path) };
        target.as_table_mut().unwrap().insert("surplus_knob".into(), toml::Value::Integer(1));
        let written = toml_writer::write(doc.as_table().unwrap(), &mut Rng::new(seed));
        match load(&written) {
            Ok(_) => prop_assert!(path.ends_with(".tags"), "accepted at {path:?}"),
            Err(e) => {
                errors_name_a_field(&e);
                prop_assert!(e.to_string().contains("surplus_knob"), "{e}");
            }
        }
    }

    /// However the examples are written (key order, tables as headers, inline or dotted,
    /// strings escaped, integers in hex), they load as the same config.
    #[test]
    fn a_valid_config_round_trips(example in 0usize..2, seed in any::<u64>()) {
        let (_, text) = examples()[example];
        let c = load(text).unwrap();
        rewritten_loads_alike(text, &c, seed);
    }

    /// A store URL's password is never printed, whatever refuses the URL.
    #[test]
    fn a_store_password_is_never_printed(
        scheme in prop::sample::select(&["postgres", "redis", "mysql", "sqlite"][..]),
        password in "[A-Za-z0-9._~!$&'()*+,;=%-]{6,20}",
    ) {
        let url = format!("{scheme}://user:{password}@db.internal:5432/tollgate");
        let text = format!(
            "[store]\nledger = {url:?}\nbudgets = {url:?}\n\n[[backend]]\nname = \"b\"\nurl = \"http://127.0.0.1:1\"\nhosting = \"self_hosted\"\nmodels = [{{ name = \"m\" }}]\n"
        );
        let e = load(&text).unwrap_err();
        prop_assert!(!e.to_string().contains(&password), "{e}");
    }
}
