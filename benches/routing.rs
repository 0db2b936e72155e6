//! Routing one request among 50 backends that all serve the same alias: a mix of self-hosted
//! and commercial, three regions, two context windows, some full, some with an open circuit,
//! one rate limited. Measures the plan (filters and ranking), the plan plus claiming a slot,
//! the `x-tollgate-route` header, and the GPU-economics bookkeeping of one request.
//!
//! Run: `cargo bench --bench routing`

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tollgate::config::Features;
use tollgate::live::LiveState;
use tollgate::route::health::Failure;
use tollgate::route::{explain, Prompt, RouteRequest};

fn config() -> tollgate::config::Config {
    let regions = ["eu", "us", "ap"];
    let mut text =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n");
    for i in 0..50 {
        let region = regions[i % 3];
        if i % 5 == 0 {
            text.push_str(&format!(
                "[[backend]]\nname = \"gpu-{i}\"\nurl = \"http://127.0.0.1:{}\"\nhosting = \"self_hosted\"\nregion = \"{region}\"\nmax_concurrency = 8\nhealth_check = {{ interval_s = 0 }}\ngpu = {{ hourly_usd = 2.5, tokens_per_second = 2000 }}\nmodels = [{{ name = \"llama-{i}\", aliases = [\"chat\"], context_window = 8192, features = [\"tools\", \"json\"] }}]\n",
                9000 + i
            ));
        } else {
            text.push_str(&format!(
                "[[backend]]\nname = \"api-{i}\"\nurl = \"http://127.0.0.1:{}\"\nhosting = \"commercial\"\nregion = \"{region}\"\negress_usd_per_gb = 0.09\nmodels = [{{ name = \"model-{i}\", aliases = [\"chat\"], context_window = {}, input_usd_per_mtok = {}, output_usd_per_mtok = {} }}]\n",
                9000 + i,
                if i % 2 == 0 { 32000 } else { 128000 },
                0.1 + i as f64 * 0.05,
                0.4 + i as f64 * 0.2,
            ));
        }
    }
    text.push_str("[[team]]\nname = \"t\"\nregions = [\"eu\", \"us\"]\n");
    tollgate::config::parse(&text, "bench", &|_| None).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let live = LiveState::build(config(), None);
    // A realistic mess: two GPUs full, three backends down, one rate limited.
    let mut held = Vec::new();
    for b in live
        .backends
        .iter()
        .filter(|b| b.cfg.name.starts_with("gpu"))
        .take(2)
    {
        for _ in 0..8 {
            held.push(b.state.enter());
        }
    }
    for b in live
        .backends
        .iter()
        .filter(|b| b.cfg.name.starts_with("api"))
        .take(3)
    {
        b.state.on_failure(Failure::Connect);
    }
    live.backends[7].state.on_busy(Duration::from_secs(3600));
    let regions: Vec<Arc<str>> = vec!["eu".into(), "us".into()];
    let request = RouteRequest {
        model: "chat",
        endpoint: tollgate::api::endpoint::Endpoint::ChatCompletions,
        regions: &regions,
        features: Features::TOOLS,
        max_output_tokens: Some(512),
        prompt: Prompt::from_bytes(4096),
        request_bytes: 4096,
    };
    let plan = live.router.plan(&request).unwrap();
    println!(
        "50 backends: {} eligible, {} excluded; chosen {}",
        plan.ranked.len(),
        plan.excluded.len(),
        plan.ranked[0].candidate.backend.cfg.name
    );

    c.bench_function("route/plan_50_backends", |b| {
        b.iter(|| live.router.plan(black_box(&request)).unwrap())
    });
    c.bench_function("route/plan_and_claim_50_backends", |b| {
        b.iter(|| {
            let plan = live.router.plan(black_box(&request)).unwrap();
            let claim = plan.ranked[0].candidate.claim();
            (plan, claim)
        })
    });
    c.bench_function("route/header", |b| {
        b.iter(|| explain::header(black_box(&plan), 0, &[]))
    });
    // What GPU economics add to every request on a self-hosted backend: the in-flight slot
    // taken and freed (busy time, request-time integrated on the clock) and the cost charged.
    let gpu = live
        .backends
        .iter()
        .find(|b| b.cfg.name.starts_with("gpu-") && b.state.in_flight() == 0)
        .expect("an idle GPU backend")
        .state
        .clone();
    c.bench_function("gpu/enter_leave_charge", |b| {
        b.iter(|| {
            let slot = gpu.enter();
            gpu.occupancy.charge(black_box(1_000));
            drop(slot);
        })
    });
    drop(held);
}

criterion_group!(benches, bench);
criterion_main!(benches);
