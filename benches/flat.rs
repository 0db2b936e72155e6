//! Costs that must not grow with the deployment: each group measures one step of a request
//! at a small and a large size of the thing that grows, and the two rows should match.
//!
//! | group | small | large | the step |
//! |---|---|---|---|
//! | `teams` | 1 team | 10,000 teams | authenticate the key, admit and settle against the team's budgets |
//! | `backends` | 1 backend | 100 backends (99 serving other models) | plan the request's backends |
//! | `prompt` | 1 KB | 1 MB | parse the body and bound its prompt tokens (the estimate path, no count) |
//! | `tags` | 10 values | 10,000 values of one tag key | collect the request's tags, find its metric series |
//!
//! The large rows come twice: with requests going round 10 of the entries (the table is large,
//! the work touches a few: what the size itself costs) and round all of them (every request
//! finds its entries out of the CPU's caches: what a large working set costs).
//!
//! Run: `cargo bench --bench flat`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue};
use std::hint::black_box;
use std::sync::Arc;
use tollgate::api::openai;
use tollgate::budget::{Demand, LocalBook};
use tollgate::clock::SystemClock;
use tollgate::live::LiveState;
use tollgate::metrics::{RequestSeries, SpendLabels, TagLabels};
use tollgate::route::{Prompt, RouteRequest};

fn key_of(team: usize) -> String {
    format!("tg-flat-{team}")
}

/// `teams` teams with a key and two budgets each, and `backends` backends of which only the
/// first serves `chat-small`.
fn config(teams: usize, backends: usize) -> tollgate::config::Config {
    let mut text =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n");
    // Room for every value the groups use (the kept values are process-wide).
    text.push_str("[metrics]\ntag_labels = [\"project\"]\nmax_tag_values = 20000\n");
    for i in 0..backends {
        let model = if i == 0 {
            "{ name = \"model-0\", aliases = [\"chat-small\"] }".to_string()
        } else {
            format!("{{ name = \"model-{i}\" }}")
        };
        text.push_str(&format!(
            "[[backend]]\nname = \"b{i}\"\nurl = \"http://127.0.0.1:{}\"\nhosting = \"commercial\"\nmodels = [{model}]\n",
            9000 + i
        ));
    }
    for t in 0..teams {
        let hash = tollgate::keys::hex(&tollgate::keys::hash_key(&key_of(t)));
        text.push_str(&format!(
            "[[team]]\nname = \"team{t}\"\nkeys = [\"sha256:{hash}\"]\nrequest_tags = [\"project\"]\n\
             budgets = [{{ window = \"day\", tokens = 1000000000000 }}, {{ window = \"month\", usd = 1000000 }}]\n"
        ));
    }
    tollgate::config::parse(&text, "bench", &|_| None).expect("the bench's config is valid")
}

fn headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).expect("ASCII"),
    );
    h
}

fn body(prompt_bytes: usize) -> Bytes {
    let content = "lorem ipsum dolor sit amet ".repeat(prompt_bytes / 27 + 1);
    Bytes::from(
        serde_json::json!({
            "model": "chat-small",
            "messages": [{"role": "user", "content": &content[..prompt_bytes]}],
            "max_tokens": 256,
        })
        .to_string(),
    )
}

fn teams(c: &mut Criterion) {
    let mut group = c.benchmark_group("flat/teams");
    for (n, active) in [(1usize, 1usize), (10_000, 10), (10_000, 10_000)] {
        let live = LiveState::build(config(n, 1), None);
        let book = LocalBook::new(Arc::new(SystemClock));
        // Every team has a key and counters, as after some traffic; requests go round the teams.
        let all: Vec<HeaderMap> = (0..n).map(|t| headers(&key_of(t))).collect();
        for h in &all {
            let p = live.keys.authenticate(h).expect("a configured key");
            let (r, _) = book
                .admit(&p.team, &p.key_id, Demand::default())
                .expect("room");
            r.settle(Demand::default(), book.now_us());
        }
        let mut i = 0;
        let id = format!("{n}/active_{active}");
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| {
                i = (i + 7919) % active;
                let p = live.keys.authenticate(black_box(&all[i])).expect("a key");
                let demand = Demand {
                    nusd: 150_000,
                    tokens: 300,
                };
                let (r, _) = book.admit(&p.team, &p.key_id, demand).expect("room");
                r.settle(demand, book.now_us());
            })
        });
    }
    group.finish();
}

fn backends(c: &mut Criterion) {
    let mut group = c.benchmark_group("flat/backends");
    for n in [1usize, 100] {
        let live = LiveState::build(config(1, n), None);
        let p = live.keys.authenticate(&headers(&key_of(0))).expect("a key");
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                live.router
                    .plan(&RouteRequest {
                        model: black_box("chat-small"),
                        endpoint: tollgate::api::endpoint::Endpoint::ChatCompletions,
                        regions: &p.team.regions,
                        features: tollgate::config::Features::NONE,
                        max_output_tokens: Some(256),
                        prompt: Prompt::from_bytes(1024),
                        request_bytes: 1024,
                    })
                    .expect("a plan")
            })
        });
    }
    group.finish();
}

fn prompt(c: &mut Criterion) {
    let mut group = c.benchmark_group("flat/prompt");
    for (name, bytes) in [("1KB", 1024usize), ("1MB", 1 << 20)] {
        let b = body(bytes);
        group.bench_with_input(BenchmarkId::from_parameter(name), &b, |bench, b| {
            bench.iter(|| {
                let s = openai::parse(black_box(b)).expect("a valid body");
                (s.stream, tollgate::tokens::estimate_prompt_tokens(b.len()))
            })
        });
    }
    group.finish();
}

fn tags(c: &mut Criterion) {
    let mut group = c.benchmark_group("flat/tags");
    for (n, active) in [(10usize, 10usize), (10_000, 10), (10_000, 10_000)] {
        let live = LiveState::build(config(1, 1), None);
        let p = live.keys.authenticate(&headers(&key_of(0))).expect("a key");
        let metrics_cfg = live.config.metrics.clone();
        let all: Vec<HeaderMap> = (0..n)
            .map(|v| {
                let mut h = headers(&key_of(0));
                h.insert(
                    "x-tollgate-tags",
                    HeaderValue::from_str(&format!("project=p{n}-{v}")).expect("ASCII"),
                );
                h
            })
            .collect();
        // Every value seen once, so its series exists, as after some traffic.
        let series = |h: &HeaderMap| {
            let tags = tollgate::tags::collect(&p.team, h, None, None).expect("allowed tags");
            RequestSeries::of(SpendLabels {
                team: p.team.name.clone(),
                model: "model-0".into(),
                backend: Some("b0".into()),
                tags: TagLabels::of(&metrics_cfg, &tags),
            })
        };
        for h in &all {
            series(h);
        }
        let mut i = 0;
        let id = format!("{n}/active_{active}");
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            b.iter(|| {
                i = (i + 7919) % active;
                series(black_box(&all[i]))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, teams, backends, prompt, tags);
criterion_main!(benches);
