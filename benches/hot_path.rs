//! The gateway's own per-request work before a byte goes upstream: authenticate, parse the
//! body, rank the model's backends, prepare the upstream headers. Upstream time is excluded; this is
//! what `tollgate_overhead_seconds` will measure in production.
//!
//! Run: `cargo bench --bench hot_path`
//!
//! Before the timings it prints the heap allocations each measured step makes (a counting
//! allocator wraps the system one for this bench): a count does not move with the machine's
//! load, so it shows a change that timings on a busy 2-core machine would hide.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use tollgate::api::openai;
use tollgate::live::LiveState;
use tollgate::route::{Prompt, RouteRequest};

const KEY: &str = "tg-bench-key";

/// The system allocator, counting allocations (not frees: the figure is work done).
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and bytes per call of `f`, over 100 calls after one warm-up call.
fn allocations<R>(name: &str, mut f: impl FnMut() -> R) {
    black_box(f());
    let (n0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        ALLOC_BYTES.load(Ordering::Relaxed),
    );
    for _ in 0..100 {
        black_box(f());
    }
    let (n1, b1) = (
        ALLOCS.load(Ordering::Relaxed),
        ALLOC_BYTES.load(Ordering::Relaxed),
    );
    eprintln!(
        "allocations {name:<28} {:>6.1} per call, {:>8.0} bytes",
        (n1 - n0) as f64 / 100.0,
        (b1 - b0) as f64 / 100.0
    );
}

fn config() -> tollgate::config::Config {
    let hash = tollgate::keys::hex(&tollgate::keys::hash_key(KEY));
    let mut text =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n");
    // 50 backends, 10 teams: a sizeable deployment, so map lookups are not flattered.
    for i in 0..50 {
        text.push_str(&format!(
            "[[backend]]\nname = \"b{i}\"\nurl = \"http://127.0.0.1:{}\"\nhosting = \"commercial\"\nmodels = [{{ name = \"model-{i}\", aliases = [\"chat-small\"] }}]\n",
            9000 + i
        ));
    }
    for t in 0..10 {
        let k = if t == 0 {
            hash.clone()
        } else {
            tollgate::keys::hex(&tollgate::keys::hash_key(&format!("other-{t}")))
        };
        text.push_str(&format!(
            "[[team]]\nname = \"team{t}\"\nkeys = [\"sha256:{k}\"]\n"
        ));
    }
    tollgate::config::parse(&text, "bench", &|_| None).unwrap()
}

fn body(prompt_bytes: usize) -> Bytes {
    let content = "lorem ipsum dolor sit amet ".repeat(prompt_bytes / 27 + 1);
    Bytes::from(
        serde_json::json!({
            "model": "chat-small",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": &content[..prompt_bytes]}],
            "max_tokens": 256, "temperature": 0.2, "stream": true,
        })
        .to_string(),
    )
}

fn route_request<'a>(
    model: &'a str,
    p: &'a tollgate::auth::Principal,
    body_bytes: usize,
) -> RouteRequest<'a> {
    RouteRequest {
        model,
        endpoint: tollgate::api::endpoint::Endpoint::ChatCompletions,
        regions: &p.team.regions,
        features: tollgate::config::Features::NONE,
        max_output_tokens: Some(256),
        prompt: Prompt::from_bytes(body_bytes),
        request_bytes: body_bytes as u64,
    }
}

/// Everything the gateway does to a request before sending it: authenticate, parse, rank the
/// backends, rewrite the model, prepare the upstream headers.
fn front(
    live: &LiveState,
    headers: &HeaderMap,
    body: &Bytes,
    id: &HeaderValue,
) -> (Bytes, HeaderMap) {
    let p = live.keys.authenticate(headers).unwrap();
    let s = openai::parse(body).unwrap();
    let plan = live
        .router
        .plan(&route_request(&s.model, &p, body.len()))
        .unwrap();
    let c = &plan.ranked[0].candidate;
    let out = {
        let mut e = openai::BodyEdits::default();
        e.set_model(&s.model_span, &c.model);
        e.apply(body)
    };
    let mut h = headers.clone();
    tollgate::upstream::headers::to_upstream(&mut h, tollgate::config::Protocol::OpenAi, None, id);
    (out, h)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let live = LiveState::build(config(), None);
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {KEY}")).unwrap(),
    );
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("user-agent", HeaderValue::from_static("OpenAI/Python 1.0"));
    let principal = live.keys.authenticate(&headers).unwrap();

    let id = HeaderValue::from_static("req_0000000000000000");
    allocations("auth", || live.keys.authenticate(&headers).unwrap());
    allocations("route_among_50", || {
        live.router
            .plan(&route_request("chat-small", &principal, 1024))
            .unwrap()
    });
    for size in [1024, 8 * 1024, 100 * 1024] {
        let b = body(size);
        allocations(&format!("parse/{size}"), || {
            openai::parse(&b).unwrap().stream
        });
    }
    for size in [1024, 8 * 1024] {
        let b = body(size);
        allocations(&format!("hot_path/{size}"), || {
            front(&live, &headers, &b, &id)
        });
    }

    c.bench_function("auth", |b| {
        b.iter(|| live.keys.authenticate(black_box(&headers)).unwrap())
    });
    c.bench_function("route_among_50", |b| {
        b.iter(|| {
            live.router
                .plan(&route_request(black_box("chat-small"), &principal, 1024))
                .unwrap()
        })
    });
    c.bench_function("upstream_headers", |b| {
        let id = HeaderValue::from_static("req_0000000000000000");
        b.iter(|| {
            let mut h = headers.clone();
            tollgate::upstream::headers::to_upstream(
                &mut h,
                tollgate::config::Protocol::OpenAi,
                Some("sk-backend"),
                &id,
            );
            h
        })
    });

    let mut group = c.benchmark_group("parse");
    for size in [1024, 8 * 1024, 100 * 1024] {
        let body = body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| openai::parse(black_box(body)).unwrap().stream)
        });
    }
    group.finish();

    // The translation an Anthropic request pays on top (plain OpenAI traffic pays none):
    // its body to the OpenAI form and, for an OpenAI-style backend, the answer back; and an
    // OpenAI request's body for an Anthropic backend.
    let mut group = c.benchmark_group("anthropic");
    let messages = |size: usize| {
        Bytes::from(
            serde_json::json!({
                "model": "claude-sonnet-4-5", "max_tokens": 256, "system": "You are terse.",
                "messages": [{"role": "user", "content": "w ".repeat(size / 2)}],
            })
            .to_string(),
        )
    };
    let answer = Bytes::from_static(br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"The gateway meters every request it forwards."},"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":9,"total_tokens":259}}"#);
    for size in [1024, 8 * 1024] {
        let m = messages(size);
        group.bench_with_input(BenchmarkId::new("request_to_openai", size), &m, |b, m| {
            b.iter(|| tollgate::api::anthropic::request_to_openai(black_box(m)).unwrap())
        });
        let o = body(size);
        group.bench_with_input(
            BenchmarkId::new("request_to_anthropic", size),
            &o,
            |b, o| {
                b.iter(|| {
                    tollgate::api::anthropic::request_to_anthropic(black_box(o), 4096).unwrap()
                })
            },
        );
    }
    group.bench_function("answer_to_anthropic", |b| {
        b.iter(|| tollgate::api::anthropic::answer_to_anthropic(black_box(&answer)).unwrap())
    });
    group.finish();

    let mut group = c.benchmark_group("hot_path");
    for size in [1024, 8 * 1024] {
        let body = body(size);
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            let id = HeaderValue::from_static("req_0000000000000000");
            b.iter(|| front(&live, &headers, body, &id))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
