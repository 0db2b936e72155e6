use super::health::Failure;
use super::*;
use crate::live::LiveState;

/// A self-hosted Llama (capped at 2, GPU-priced), a cheap and a dear commercial model in the
/// US, one commercial model in the EU, and a long-context model.
fn live(policy: &str) -> LiveState {
    let text = format!(
        r#"
[routing]
self_hosted_cost = "{policy}"

[[backend]]
name = "llama"
url = "http://127.0.0.1:1"
hosting = "self_hosted"
region = "eu"
max_concurrency = 2
health_check = {{ interval_s = 0 }}
gpu = {{ hourly_usd = 7.2, tokens_per_second = 1000 }}
models = [{{ name = "llama-8b", aliases = ["chat"], context_window = 8192, features = ["tools", "json"] }}]

[[backend]]
name = "cheap-us"
url = "http://127.0.0.1:2"
hosting = "commercial"
region = "us"
models = [{{ name = "mini", aliases = ["chat"], context_window = 128000, input_usd_per_mtok = 0.15, output_usd_per_mtok = 0.60 }}]

[[backend]]
name = "dear-us"
url = "http://127.0.0.1:3"
hosting = "commercial"
region = "us"
models = [{{ name = "big", aliases = ["chat"], context_window = 128000, input_usd_per_mtok = 2.5, output_usd_per_mtok = 10.0, features = ["tools", "vision", "json"] }}]

[[backend]]
name = "mid-eu"
url = "http://127.0.0.1:4"
hosting = "commercial"
region = "eu"
models = [{{ name = "eu-mini", aliases = ["chat"], context_window = 32000, input_usd_per_mtok = 0.4, output_usd_per_mtok = 1.6 }}]
"#
    );
    let cfg = crate::config::parse(&text, "test", &|_| None).unwrap();
    LiveState::build(cfg, None)
}

fn req<'a>(regions: &'a [Arc<str>], prompt: Prompt<'a>) -> RouteRequest<'a> {
    RouteRequest {
        model: "chat",
        endpoint: crate::api::endpoint::Endpoint::ChatCompletions,
        regions,
        features: Features::NONE,
        max_output_tokens: Some(100),
        prompt,
        request_bytes: 1000,
    }
}

fn order(plan: &Plan) -> Vec<&str> {
    plan.ranked
        .iter()
        .map(|r| &*r.candidate.backend.cfg.name)
        .collect()
}

fn excluded<'a>(plan: &'a Plan, name: &str) -> Option<&'a Exclusion> {
    plan.excluded
        .iter()
        .find(|e| &*e.candidate.backend.cfg.name == name)
        .map(|e| &e.why)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn marginal_keeps_owned_gpus_first_and_rate_card_compares_prices() {
    let rt = runtime();
    let _g = rt.enter();
    let any: Vec<Arc<str>> = vec![];
    // $7.20/h at 1000 tok/s is $2 per 1M tokens: dearer than the two small commercial models.
    let marginal = live("marginal");
    let plan = marginal
        .router
        .plan(&req(&any, Prompt::known(1000)))
        .unwrap();
    assert_eq!(order(&plan), ["llama", "cheap-us", "mid-eu", "dear-us"]);
    assert_eq!(plan.ranked[0].basis, Basis::Marginal);
    assert_eq!(plan.ranked[0].cost_nusd, 0);
    // 1000 prompt tokens at $0.15/M and 100 output at $0.60/M.
    assert_eq!(plan.ranked[1].cost_nusd, 150_000 + 60_000);

    let rate_card = live("rate_card");
    let plan = rate_card
        .router
        .plan(&req(&any, Prompt::known(1000)))
        .unwrap();
    assert_eq!(order(&plan), ["cheap-us", "mid-eu", "llama", "dear-us"]);
    assert_eq!(plan.ranked[2].basis, Basis::RateCard);
}

#[test]
fn a_full_self_hosted_backend_overflows_to_the_cheapest_commercial_one() {
    let rt = runtime();
    let _g = rt.enter();
    let live = live("marginal");
    let any: Vec<Arc<str>> = vec![];
    let plan = live.router.plan(&req(&any, Prompt::known(10))).unwrap();
    let first = plan.ranked[0].candidate.claim().unwrap();
    let second = plan.ranked[0].candidate.claim().unwrap();
    assert!(
        plan.ranked[0].candidate.claim().is_none(),
        "max_concurrency = 2"
    );
    let plan = live.router.plan(&req(&any, Prompt::known(10))).unwrap();
    assert_eq!(order(&plan)[0], "cheap-us");
    assert_eq!(
        excluded(&plan, "llama"),
        Some(&Exclusion::Capacity {
            in_flight: 2,
            max: 2
        })
    );
    // With nothing else to take it (EU only, the EU provider rate limited), a request queues
    // for the full backend rather than being refused: at the gateway, never past the cap.
    live.backends[3].state.on_busy(Duration::from_secs(30));
    let eu: Vec<Arc<str>> = vec!["eu".into()];
    let plan = live.router.plan(&req(&eu, Prompt::known(10))).unwrap();
    assert_eq!(order(&plan), ["llama"]);
    assert!(plan.ranked[0].queued);
    assert!(explain::header(&plan, 0, &[])
        .to_str()
        .unwrap()
        .contains("reason=queued"));
    let candidate = plan.ranked[0].candidate.clone();
    assert!(candidate.claim().is_none(), "never past the cap");
    let soon = tokio::time::Instant::now() + Duration::from_millis(20);
    assert!(
        rt.block_on(candidate.claim_waiting(soon)).is_none(),
        "a wait that no freed slot ends"
    );
    let state = candidate.backend.state.clone();
    let later = tokio::time::Instant::now() + Duration::from_secs(10);
    let queued = rt.block_on(async {
        let waiter =
            crate::tasks::Tasks::new().spawn(async move { candidate.claim_waiting(later).await });
        while state.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        drop(first);
        waiter
            .await
            .unwrap()
            .expect("the freed slot goes to the waiter")
    });
    assert_eq!(state.in_flight(), 2);
    drop((second, queued));
    let plan = live.router.plan(&req(&any, Prompt::known(10))).unwrap();
    assert_eq!(order(&plan)[0], "llama", "back once a slot frees");
}

#[test]
fn regions_features_and_context_windows_filter() {
    let rt = runtime();
    let _g = rt.enter();
    let live = live("marginal");
    let eu: Vec<Arc<str>> = vec!["eu".into()];
    let plan = live.router.plan(&req(&eu, Prompt::known(10))).unwrap();
    assert_eq!(order(&plan), ["llama", "mid-eu"]);
    assert!(matches!(
        excluded(&plan, "cheap-us"),
        Some(Exclusion::Region { .. })
    ));

    // Vision: only the model that declares it; `mini` declares nothing and is not filtered.
    let any: Vec<Arc<str>> = vec![];
    let mut r = req(&any, Prompt::known(10));
    r.features = Features::VISION.with(Features::TOOLS);
    let plan = live.router.plan(&r).unwrap();
    assert_eq!(order(&plan), ["cheap-us", "mid-eu", "dear-us"]);
    assert_eq!(
        excluded(&plan, "llama"),
        Some(&Exclusion::Features {
            missing: Features::VISION
        })
    );

    // 9000 prompt tokens + 100 do not fit Llama's 8192.
    let plan = live.router.plan(&req(&any, Prompt::known(9000))).unwrap();
    assert_eq!(order(&plan)[0], "cheap-us");
    assert_eq!(
        excluded(&plan, "llama"),
        Some(&Exclusion::Context {
            needed: 9100,
            window: 8192
        })
    );
    assert!(plan.needs_count.is_empty(), "a known count is final");

    // On the byte bound alone, the exclusion asks for an exact count; with it, Llama is back.
    let bytes = Prompt::from_bytes(20_000);
    let plan = live.router.plan(&req(&any, bytes)).unwrap();
    assert!(matches!(
        excluded(&plan, "llama"),
        Some(Exclusion::Context { .. })
    ));
    assert_eq!(plan.needs_count.len(), 1);
    let exact = [(plan.needs_count[0], 5000)];
    let plan = live
        .router
        .plan(&req(
            &any,
            Prompt {
                exact: &exact,
                ..bytes
            },
        ))
        .unwrap();
    assert_eq!(order(&plan)[0], "llama");
}

#[test]
fn unhealthy_and_rate_limited_backends_are_passed_over() {
    let rt = runtime();
    let _g = rt.enter();
    let live = live("marginal");
    let any: Vec<Arc<str>> = vec![];
    let by_name = |n: &str| {
        live.backends
            .iter()
            .find(|b| &*b.cfg.name == n)
            .unwrap()
            .state
            .clone()
    };
    by_name("llama").on_failure(Failure::Connect);
    by_name("cheap-us").on_busy(Duration::from_secs(30));
    let plan = live.router.plan(&req(&any, Prompt::known(10))).unwrap();
    assert_eq!(order(&plan), ["mid-eu", "dear-us"]);
    assert!(matches!(
        excluded(&plan, "llama"),
        Some(Exclusion::Circuit {
            reason: Some(Failure::Connect),
            ..
        })
    ));
    assert!(matches!(
        excluded(&plan, "cheap-us"),
        Some(Exclusion::Busy { for_ms }) if *for_ms > 29_000
    ));
    let header = explain::header(&plan, 0, &[]);
    assert_eq!(
        header.to_str().unwrap(),
        "backend=mid-eu; reason=cheapest; cost=list; est_usd=0.000164000; eligible=2; excluded=llama:circuit_open,cheap-us:rate_limited"
    );

    // An EU team with its EU backends down gets a 503 that says why, with a retry time.
    by_name("mid-eu").on_failure(Failure::Connect);
    let eu: Vec<Arc<str>> = vec!["eu".into()];
    let plan = live.router.plan(&req(&eu, Prompt::known(10))).unwrap();
    assert!(plan.ranked.is_empty());
    let err = Router::refusal("chat", "search", &plan);
    assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let msg = err.to_string();
    assert!(
        msg.contains("llama: down") && msg.contains("cheap-us: region us"),
        "{msg}"
    );
}

#[test]
fn a_prompt_too_large_for_every_model_is_a_400() {
    let rt = runtime();
    let _g = rt.enter();
    let live = live("marginal");
    let any: Vec<Arc<str>> = vec![];
    let plan = live
        .router
        .plan(&req(&any, Prompt::known(200_000)))
        .unwrap();
    let err = Router::refusal("chat", "search", &plan);
    assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8(crate::api::error::openai_json(&err))
            .unwrap()
            .contains("context_length_exceeded"),
        "OpenAI's code for it"
    );
}

#[test]
fn equal_costs_go_to_the_less_loaded_then_the_faster() {
    let rt = runtime();
    let _g = rt.enter();
    let text = r#"
[[backend]]
name = "a"
url = "http://127.0.0.1:1"
hosting = "self_hosted"
max_concurrency = 10
health_check = { interval_s = 0 }
models = [{ name = "m" }]

[[backend]]
name = "b"
url = "http://127.0.0.1:2"
hosting = "self_hosted"
max_concurrency = 10
health_check = { interval_s = 0 }
models = [{ name = "m" }]
"#;
    let live = LiveState::build(crate::config::parse(text, "t", &|_| None).unwrap(), None);
    let any: Vec<Arc<str>> = vec![];
    let r = RouteRequest {
        model: "m",
        ..req(&any, Prompt::known(10))
    };
    let (a, b) = (&live.backends[0].state, &live.backends[1].state);
    let _busy = a.enter();
    assert_eq!(order(&live.router.plan(&r).unwrap()), ["b", "a"]);
    let _busy_too = b.enter();
    a.on_success(Duration::from_millis(50));
    b.on_success(Duration::from_millis(5));
    let plan = live.router.plan(&r).unwrap();
    assert_eq!(order(&plan), ["b", "a"]);
    assert!(explain::header(&plan, 0, &[])
        .to_str()
        .unwrap()
        .contains("reason=fastest"));
}
