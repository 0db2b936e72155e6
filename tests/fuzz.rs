//! A mutation fuzzer on stable Rust, for the parsers that read what the gateway does not
//! control: the SSE observer, the JSON scanner, the request parser, the tag parser and the
//! config loader.
//!
//! Each target starts from its corpus, `tests/data/fuzz/<target>/` (plus the real inputs the
//! repository already has: engine streams, the example configs), runs every file as it is,
//! then mutates them for a bounded time: bit flips, byte changes, insertions of random bytes
//! or of tokens the parser cares about, deletions, duplicated spans, splices between corpus
//! entries, truncation, numbers swapped for awkward ones. Each input must not panic and must
//! keep the target's invariants (`tests/common/invariants.rs`, `tests/common/observe.rs`).
//!
//! A failing input is shrunk, written to `tests/data/fuzz/<target>/crash-<hash>`, and the test
//! fails; the file stays in the corpus as a regression input, run first from then on.
//!
//! ```text
//! TOLLGATE_FUZZ_SECS=60 cargo test --release --test fuzz -- --nocapture   # longer
//! TOLLGATE_FUZZ_SEED=1234 cargo test --test fuzz                          # replay a run
//! ```
//!
//! Without a seed, each run draws one and prints it; each target mixes its name into it. A
//! replay draws the same inputs; how far it gets in its time depends on the machine.
//!
//! A bug found in the gateway is kept as an ignored test under "bugs found" until it is
//! fixed, and the invariant it breaks is narrowed, with a comment naming that test, so that
//! the fuzzer keeps looking for other bugs instead of finding that one again.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "common/reference.rs"]
mod full_parse;
#[path = "common/invariants.rs"]
mod invariants;
#[path = "common/observe.rs"]
mod observe;
#[path = "common/rng.rs"]
mod rng;
#[path = "common/toml_writer.rs"]
mod toml_writer;

use rng::Rng;

/// A parser under test: its corpus directory, tokens worth inserting, the largest input to
/// try, and a check that panics when an invariant fails. The check must be a function of the
/// input alone, so that a saved crash replays.
struct Target {
    name: &'static str,
    tokens: &'static [&'static [&'static [u8]]],
    max_len: usize,
    extra_seeds: fn() -> Vec<(String, Vec<u8>)>,
    check: fn(&[u8]),
}

// === targets ===

#[rustfmt::skip]
const REQUEST_TOKENS: &[&[u8]] = &[
    b"\"model\"",
    b"\"stream\"",
    b"\"stream_options\"",
    b"\"include_usage\"",
    b"\"max_tokens\"",
    b"\"max_completion_tokens\"",
    b"\"metadata\"",
    b"\"user\"",
    b"\"tools\"",
    b"\"functions\"",
    b"\"response_format\"",
    b"\"json_schema\"",
    b"\"json_object\"",
    b"\"messages\"",
    b"\"image_url\"",
    b"\"type\"",
    b"\"\"",
    b"[]",
    b"{}",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"18446744073709551616",
    b"1e400",
    b"\"m\"",
    b"\\u0000",
    b"\\ud800",
    b"\xff",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
];

#[rustfmt::skip]
const TAG_TOKENS: &[&[u8]] = &[
    b"project=",
    b"env=",
    b"user=",
    b"a.b=",
    b"x-y_Z9=",
    b"department=",
    b"=",
    b",",
    b" ",
    b"\t",
    b"\n",
    b"\"",
    b"{",
    b"}",
    b":",
    b"\"project\":",
    b"\"env\":\"prod\"",
    b"null",
    b"1",
    b"\xc3\xa9",
    b"\x7f",
    b"\x01",
    b"\xff",
];

#[rustfmt::skip]
const CONFIG_TOKENS: &[&[u8]] = &[
    b"[[backend]]\n",
    b"[[team]]\n",
    b"[server]\n",
    b"[store]\n",
    b"[metrics]\n",
    b"[focus]\n",
    b"[routing]\n",
    b" = ",
    b"\"",
    b"'",
    b"\"\"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b".",
    b"\n",
    b"#",
    b"name",
    b"url",
    b"hosting",
    b"\"self_hosted\"",
    b"\"commercial\"",
    b"models",
    b"budgets",
    b"gpu",
    b"window = \"day\"",
    b"usd = ",
    b"tokens = ",
    b"-1",
    b"0",
    b"1e400",
    b"nan",
    b"inf",
    b"-inf",
    b"0x7fffffffffffffff",
    b"9223372036854775807",
    b"1.5",
    b"true",
    b"\"http://127.0.0.1:1\"",
    b"\"sqlite://x\"",
    b"\"postgres://u:p@h/db\"",
    b"\\u0000",
    b"\xc3\xa9",
    b"\xff",
    b"fraction = ",
    b"count = 0",
    b"interval_s = ",
    b"tag_labels = [",
];

fn engine_streams() -> Vec<(String, Vec<u8>)> {
    files_under(&root().join("tests/data/engines"), "sse")
}

/// The engines' whole answers and the data of every event of their streams.
fn engine_documents() -> Vec<(String, Vec<u8>)> {
    let mut docs: Vec<(String, Vec<u8>)> = files_under(&root().join("tests/data/engines"), "json")
        .into_iter()
        .filter(|(name, _)| !name.ends_with("expected.json") && !name.ends_with("recorded.json"))
        .collect();
    for (name, stream) in engine_streams() {
        let events = full_parse::sse_events(&stream).into_iter().flatten();
        for (i, data) in events.enumerate() {
            if data.starts_with(b"{") {
                docs.push((format!("{name}#{i}"), data));
            }
        }
    }
    docs
}

fn example_configs() -> Vec<(String, Vec<u8>)> {
    files_under(&root().join("config"), "toml")
}

fn none() -> Vec<(String, Vec<u8>)> {
    Vec::new()
}

/// The observer over the input cut into frames at places drawn from the input itself.
fn check_sse(input: &[u8]) {
    let mut rng = Rng::new(fnv(input));
    let cuts: Vec<usize> = (0..rng.below(12))
        .map(|_| rng.index(input.len() + 1))
        .collect();
    observe::check_stream(input, &cuts);
}

/// The scanner against serde_json: the same validity, and on a valid document the same usage,
/// text, empty `choices`, error and timings; `scan` and `scan_only` agree; removing the usage
/// member leaves JSON without one; `read_answer` agrees with both.
fn check_scan(input: &[u8]) {
    use serde_json::Value;
    use tollgate::meter::scan::{scan, scan_only};
    use tollgate::meter::{read_answer, timings_json, usage_json};

    let mut text = String::new();
    let found = scan(input, &mut text);
    assert_eq!(scan_only(input), found, "scan and scan_only disagree");
    let answer = read_answer(input);
    assert_eq!(
        answer.is_some(),
        found.is_ok(),
        "read_answer and scan disagree"
    );
    let parsed = serde_json::from_slice::<Value>(input);
    let v = match (&parsed, &found) {
        (Ok(v), Ok(_)) => v,
        (Err(_), Err(_)) => return,
        (Err(e), Ok(_)) if full_parse::no_oracle(e, input) => return,
        // A repeated `usage` is refused on purpose (only one could be hidden from a client);
        // serde_json keeps the last.
        (Ok(_), Err(_)) if full_parse::has_duplicate_keys(input) => return,
        (p, s) => panic!(
            "validity: serde_json {:?}, scanner {s:?}",
            p.as_ref().map(|_| "valid").map_err(|e| e.to_string())
        ),
    };
    let found = found.unwrap();
    if full_parse::has_duplicate_keys(input) {
        return;
    }
    let mut want = String::new();
    let ordered: full_parse::Json = serde_json::from_slice(input).unwrap();
    full_parse::text_of(&ordered, &mut want);
    assert_eq!(text, want, "text");
    let usage = v.get("usage").filter(|u| !u.is_null());
    assert_eq!(found.usage.is_some(), usage.is_some(), "usage found");
    if let (Some(span), Some(u)) = (&found.usage, usage) {
        assert_eq!(
            usage_json(&input[span.clone()]),
            usage_json(u.to_string().as_bytes())
        );
    }
    let timings = v.get("timings").filter(|t| !t.is_null());
    assert_eq!(
        found.timings.clone().and_then(|s| timings_json(&input[s])),
        timings.and_then(|t| timings_json(t.to_string().as_bytes()))
    );
    assert_eq!(
        found.choices_empty,
        v.get("choices") == Some(&Value::Array(vec![]))
    );
    assert_eq!(found.error, v.get("error").is_some_and(|e| !e.is_null()));
    if let Some(cut) = &found.usage_member {
        let mut rest = input[..cut.start].to_vec();
        rest.extend_from_slice(&input[cut.end..]);
        let rest: Value = serde_json::from_slice(&rest).unwrap_or_else(|e| {
            panic!(
                "cutting usage broke the JSON ({e}): {}",
                String::from_utf8_lossy(&rest)
            )
        });
        assert!(rest.get("usage").is_none());
        assert_eq!(rest.get("choices"), v.get("choices"));
    }
    let (answer_usage, _) = answer.unwrap();
    let want_usage = usage
        .and_then(|u| usage_json(u.to_string().as_bytes()))
        .or_else(|| timings.and_then(|t| timings_json(t.to_string().as_bytes())));
    assert_eq!(answer_usage, want_usage, "read_answer usage");
}

fn check_request(input: &[u8]) {
    invariants::check_request(input);
}

/// The input is the `x-tollgate-tags` header's value, a newline, the body's `user`, a newline,
/// and the body's `metadata` object; a part that cannot be what it stands for is left out.
fn check_tags(input: &[u8]) {
    let mut parts = input.splitn(3, |&b| b == b'\n');
    let header = parts.next().unwrap_or_default().to_vec();
    let user = parts.next().and_then(|u| std::str::from_utf8(u).ok());
    let metadata: Option<serde_json::Map<String, serde_json::Value>> =
        parts.next().and_then(|m| serde_json::from_slice(m).ok());
    invariants::check_tags(&invariants::team(), &[header], metadata.as_ref(), user);
}

fn check_config(input: &[u8]) {
    invariants::check_config(&String::from_utf8_lossy(input), fnv(input));
}

const TARGETS: &[Target] = &[
    Target {
        name: "sse",
        tokens: &[observe::SSE_TOKENS, observe::JSON_TOKENS],
        max_len: 32 * 1024,
        extra_seeds: engine_streams,
        check: check_sse,
    },
    Target {
        name: "scan",
        tokens: &[observe::JSON_TOKENS],
        max_len: 32 * 1024,
        extra_seeds: engine_documents,
        check: check_scan,
    },
    Target {
        name: "request",
        tokens: &[REQUEST_TOKENS],
        max_len: 32 * 1024,
        extra_seeds: none,
        check: check_request,
    },
    Target {
        name: "tags",
        tokens: &[TAG_TOKENS],
        max_len: 4 * 1024,
        extra_seeds: none,
        check: check_tags,
    },
    Target {
        name: "config",
        tokens: &[CONFIG_TOKENS],
        max_len: 16 * 1024,
        extra_seeds: example_configs,
        check: check_config,
    },
];

fn target(name: &str) -> &'static Target {
    TARGETS.iter().find(|t| t.name == name).unwrap()
}

#[test]
fn fuzz_sse_observer() {
    fuzz(target("sse"));
}

#[test]
fn fuzz_json_scanner() {
    fuzz(target("scan"));
}

#[test]
fn fuzz_request_parser() {
    fuzz(target("request"));
}

#[test]
fn fuzz_tag_parser() {
    fuzz(target("tags"));
}

#[test]
fn fuzz_config_loader() {
    fuzz(target("config"));
}

// === bugs the fuzzer found, kept as regressions ===

/// src/meter/scan.rs: serde_json refuses a document nested 128 deep; the scanner took it,
/// giving an answer where a full parse gives none.
#[test]
fn scanner_depth_limit_is_serde_json_s() {
    let doc = "[".repeat(128) + &"]".repeat(128);
    assert!(serde_json::from_str::<serde_json::Value>(&doc).is_err());
    assert!(tollgate::meter::scan::scan_only(doc.as_bytes()).is_err());
}

/// src/meter/scan.rs and sse.rs: with a `usage` key twice in one chunk, only the last member
/// was cut for a client that did not ask for usage; the first reached it. Such an event is now
/// a protocol violation: it is not forwarded, and the stream ends with an error event.
#[test]
fn a_repeated_usage_key_is_hidden_too() {
    let event = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1},\"usage\":null}\n\n";
    let hidden = observe::run(&[bytes::Bytes::from(event)], true);
    assert_eq!(hidden.usage, None);
    let shown = String::from_utf8(hidden.forwarded).unwrap();
    assert!(!shown.contains("usage"), "{shown}");
}

/// src/meter/mod.rs: `MAX_REPORTED_TOKENS` bounded each count an engine reports, but not a
/// prompt the meter adds up from parts (llama.cpp's `prompt_n + cache_n`, Anthropic's input
/// plus cache reads and writes): up to three times the bound was trusted and billed. Found by
/// `fuzz_sse_observer`.
#[test]
fn a_prompt_summed_from_parts_is_bounded_too() {
    use tollgate::meter::{usage_of, MAX_REPORTED_TOKENS};
    for doc in [
        r#"{"timings":{"cache_n":4294967295,"prompt_n":13,"predicted_n":26}}"#,
        r#"{"usage":{"input_tokens":4294967295,"cache_read_input_tokens":4294967295,"cache_creation_input_tokens":4294967295,"output_tokens":1}}"#,
    ] {
        if let Some(u) = usage_of(doc.as_bytes()) {
            assert!(u.prompt <= MAX_REPORTED_TOKENS, "{doc}: {u:?}");
        }
    }
}

// === the fuzzer ===

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_dir(t: &Target) -> PathBuf {
    root().join("tests/data/fuzz").join(t.name)
}

fn files_under(dir: &Path, ext: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if ext.is_empty() || p.extension().is_some_and(|e| e == ext) {
                let name = p.strip_prefix(root()).unwrap().display().to_string();
                out.push((name, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// FNV-1a: a hash stable across Rust versions, for file names and seeds.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// A failure: where it panicked (to tell one bug from another while shrinking) and why.
#[derive(Debug, Clone, PartialEq)]
struct Failure {
    location: String,
    message: String,
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<Failure>> = const { std::cell::RefCell::new(None) };
}

/// Panics inside a check are expected and reported by the fuzzer itself: the hook records
/// them instead of printing each one. Panics elsewhere print as usual.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_check = LAST_PANIC.with(|p| {
                let mut p = p.borrow_mut();
                let armed = p.as_ref().is_some_and(|f| f.location == "armed");
                if armed {
                    let message = info
                        .payload()
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    *p = Some(Failure {
                        location: info.location().map(|l| l.to_string()).unwrap_or_default(),
                        message,
                    });
                }
                armed
            });
            if !in_check {
                default(info);
            }
        }));
    });
}

fn try_check(t: &Target, input: &[u8]) -> Result<(), Failure> {
    LAST_PANIC.with(|p| {
        *p.borrow_mut() = Some(Failure {
            location: "armed".into(),
            message: String::new(),
        })
    });
    let result = catch_unwind(AssertUnwindSafe(|| (t.check)(input)));
    let recorded = LAST_PANIC.with(|p| p.borrow_mut().take());
    match result {
        Ok(()) => Ok(()),
        Err(_) => Err(recorded.unwrap_or(Failure {
            location: "?".into(),
            message: "panic without a message".into(),
        })),
    }
}

fn fuzz(t: &Target) {
    quiet_panics();
    let dir = corpus_dir(t);
    let mut corpus = files_under(&dir, "");
    assert!(!corpus.is_empty(), "{} has no seeds", dir.display());
    corpus.extend((t.extra_seeds)());
    // Every seed as it is first: a crash saved by an earlier run must stay fixed.
    for (name, input) in &corpus {
        if let Err(f) = try_check(t, input) {
            panic!(
                "fuzz {}: {name} fails at {}: {}",
                t.name, f.location, f.message
            );
        }
    }
    let seed: u64 = env_or("TOLLGATE_FUZZ_SEED", fnv(&nanos().to_le_bytes()));
    let secs: f64 = env_or("TOLLGATE_FUZZ_SECS", 3.0);
    eprintln!(
        "fuzz {}: {} seeds, {secs} s, TOLLGATE_FUZZ_SEED={seed}",
        t.name,
        corpus.len()
    );
    let mut rng = Rng::new(seed ^ fnv(t.name.as_bytes()));
    let inputs: Vec<Vec<u8>> = corpus.into_iter().map(|(_, b)| b).collect();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    let mut input = Vec::new();
    while Instant::now() < deadline {
        // Mostly a fresh corpus entry; sometimes keep mutating the last input, to go further.
        if input.is_empty() || !rng.chance(4) {
            input = rng.pick(&inputs).clone();
        }
        for _ in 0..1 + rng.below(6) {
            mutate(&mut input, &inputs, t.tokens, &mut rng);
        }
        input.truncate(t.max_len);
        runs += 1;
        if let Err(f) = try_check(t, &input) {
            let small = shrink(t, input.clone(), &f);
            let path = dir.join(format!("crash-{:016x}", fnv(&small)));
            std::fs::write(&path, &small).unwrap();
            panic!(
                "fuzz {}: input {runs} of TOLLGATE_FUZZ_SEED={seed} fails at {}: {}\n\
                 shrunk from {} to {} bytes, saved as {}",
                t.name,
                f.location,
                f.message,
                input.len(),
                small.len(),
                path.display()
            );
        }
    }
    eprintln!("fuzz {}: {runs} inputs, all passed", t.name);
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Removes spans, halves first, then smaller, while the input still fails in the same place.
fn shrink(t: &Target, mut input: Vec<u8>, failure: &Failure) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut span = input.len() / 2;
    while span > 0 && Instant::now() < deadline {
        let mut at = 0;
        while at < input.len() && Instant::now() < deadline {
            let mut smaller = input.clone();
            smaller.drain(at..(at + span).min(input.len()));
            match try_check(t, &smaller) {
                Err(f) if f.location == failure.location => input = smaller,
                _ => at += span,
            }
        }
        span /= 2;
    }
    input
}

#[rustfmt::skip]
const NUMBERS: &[&[u8]] = &[
    b"0",
    b"-1",
    b"-0",
    b"1.5",
    b"1e400",
    b"-1e400",
    b"4294967295",
    b"4294967296",
    b"9223372036854775807",
    b"18446744073709551615",
    b"18446744073709551616",
    b"nan",
    b"inf",
];

fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], tokens: &[&[&[u8]]], rng: &mut Rng) {
    let len = input.len();
    let at = |rng: &mut Rng| rng.index(len + 1);
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.index(len);
            input[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.index(len);
            input[i] = *rng.pick(b"\x00\x01\x1f\x7f\x80\xbf\xc3\xe4\xf0\xff\"\\\n\r{}[],:= ");
        }
        2 => {
            let i = at(rng);
            let n = 1 + rng.index(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            input.splice(i..i, bytes);
        }
        3 | 4 => {
            let i = at(rng);
            let list = *rng.pick(tokens);
            let token = *rng.pick(list);
            input.splice(i..i, token.iter().copied());
        }
        5 if len > 0 => {
            let i = rng.index(len);
            let n = 1 + rng.index((len - i).min(64));
            input.drain(i..i + n);
        }
        6 if len > 0 => {
            let i = rng.index(len);
            let n = 1 + rng.index((len - i).min(256));
            let span = input[i..i + n].to_vec();
            let j = at(rng);
            input.splice(j..j, span);
        }
        7 => {
            // A span of another entry, put in place of a span of this one.
            let other = rng.pick(corpus);
            if !other.is_empty() {
                let i = rng.index(other.len());
                let n = 1 + rng.index((other.len() - i).min(512));
                let from = at(rng);
                let to = (from + rng.index(64)).min(len);
                input.splice(from..to, other[i..i + n].iter().copied());
            }
        }
        8 => input.truncate(at(rng)),
        9 => {
            // A run of digits becomes an awkward number.
            let digits: Vec<usize> = (0..len).filter(|&i| input[i].is_ascii_digit()).collect();
            if !digits.is_empty() {
                let start = *rng.pick(&digits);
                let end = (start..len)
                    .find(|&i| !input[i].is_ascii_digit())
                    .unwrap_or(len);
                input.splice(start..end, rng.pick(NUMBERS).iter().copied());
            }
        }
        _ => {
            // This one's head on another's tail.
            let other = rng.pick(corpus);
            let cut = rng.index(other.len() + 1);
            input.truncate(at(rng));
            input.extend_from_slice(&other[cut..]);
        }
    }
}
