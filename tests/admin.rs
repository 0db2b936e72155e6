//! The admin port: health, readiness, metrics, backends, reload, and its key.

mod common;

use common::*;
use http_body_util::Full;

#[tokio::test]
async fn health_ready_and_metrics() {
    let gw = basic().await;
    assert_eq!(gw.admin_get("/healthz").await.status, 200);
    assert_eq!(gw.admin_get("/readyz").await.status, 200);
    let r = gw
        .post(
            "/v1/chat/completions",
            SEARCH_KEY,
            chat("chat-small", false),
        )
        .await;
    assert_eq!(r.status, 200);
    let m = gw.admin_get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = m.text();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("tollgate_requests_total{")
                && l.contains("team=\"search\"")
                && l.contains("backend=\"llama\"")
        })
        .unwrap_or_else(|| panic!("no request counter for search/llama in:\n{text}"));
    assert!(line.contains("status=\"ok\""), "{line}");
    assert!(
        text.contains("tollgate_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("tollgate_backend_in_flight{backend=\"llama\"}"),
        "{text}"
    );
    assert!(text.contains("# HELP tollgate_requests_total"), "{text}");
}

#[tokio::test]
async fn backends_view_shows_health_and_load() {
    let gw = basic().await;
    let v = gw.admin_get("/admin/backends").await.json();
    assert_eq!(v[0]["name"], "llama");
    assert_eq!(v[0]["up"], true);
    assert_eq!(v[0]["in_flight"], 0);
}

#[tokio::test]
async fn the_admin_key_guards_everything_but_health() {
    let (text, _sims, env) = Harness::new()
        .backend(Backend::sim("llama", "m"))
        .team("search", SEARCH_KEY)
        .server("admin_key_env = \"TEST_ADMIN_KEY\"")
        .render()
        .await;
    let cfg = tollgate::config::parse(&text, "t", &|v| {
        if v == "TEST_ADMIN_KEY" {
            Some("adm-secret".into())
        } else {
            env.get(v).cloned()
        }
    })
    .unwrap();
    let bind = || tollgate::server::bind("127.0.0.1:0".parse().unwrap(), 64).unwrap();
    let running = tollgate::app::start_on(cfg, None, bind(), bind())
        .await
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let get = |path: &str, key: Option<&str>| {
        let mut b = http::Request::get(format!("http://{}{path}", running.admin_addr));
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        client.request(b.body(Full::<bytes::Bytes>::default()).unwrap())
    };
    assert_eq!(get("/healthz", None).await.unwrap().status(), 200);
    assert_eq!(get("/metrics", None).await.unwrap().status(), 401);
    assert_eq!(get("/metrics", Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(
        get("/metrics", Some("adm-secret")).await.unwrap().status(),
        200
    );
    assert_eq!(
        get("/admin/backends", Some("adm-secret"))
            .await
            .unwrap()
            .status(),
        200
    );
    // The scheme is case-insensitive (RFC 7235) and spacing after it is tolerated.
    for scheme in ["bearer", "BEARER", "Bearer  ", "bearer\t"] {
        let req = http::Request::get(format!("http://{}/metrics", running.admin_addr))
            .header("authorization", format!("{scheme} adm-secret"))
            .body(Full::<bytes::Bytes>::default())
            .unwrap();
        assert_eq!(
            client.request(req).await.unwrap().status(),
            200,
            "{scheme:?}"
        );
    }
    assert_eq!(
        get("/admin/report/focus", None).await.unwrap().status(),
        401
    );
    assert_eq!(
        get("/admin/report/focus", Some("adm-secret"))
            .await
            .unwrap()
            .status(),
        200
    );
    running.shutdown().await;
}

#[tokio::test]
async fn reload_swaps_the_config_and_keeps_it_on_a_bad_file() {
    let (text, _sims, env) = Harness::new()
        .backend(Backend::sim("llama", "m").alias("chat-small"))
        .team("search", SEARCH_KEY)
        .render()
        .await;
    assert!(env.is_empty());
    let dir = std::env::temp_dir().join(format!("tollgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, &text).unwrap();
    let cfg = tollgate::config::load(&path, &|_| None).unwrap();
    let bind = || tollgate::server::bind("127.0.0.1:0".parse().unwrap(), 64).unwrap();
    let running = tollgate::app::start_on(cfg, Some(path.clone()), bind(), bind())
        .await
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let reload = || {
        client.request(
            http::Request::post(format!("http://{}/admin/reload", running.admin_addr))
                .body(Full::<bytes::Bytes>::default())
                .unwrap(),
        )
    };
    let models = |key: &str| {
        client.request(
            http::Request::get(format!("http://{}/v1/models", running.addr))
                .header("authorization", format!("Bearer {key}"))
                .body(Full::<bytes::Bytes>::default())
                .unwrap(),
        )
    };
    assert_eq!(models(OTHER_KEY).await.unwrap().status(), 401);

    // A new team appears without a restart.
    let hash = tollgate::keys::hex(&tollgate::keys::hash_key(OTHER_KEY));
    std::fs::write(
        &path,
        format!("{text}\n[[team]]\nname = \"other\"\nkeys = [\"sha256:{hash}\"]\n"),
    )
    .unwrap();
    assert_eq!(reload().await.unwrap().status(), 200);
    assert_eq!(models(OTHER_KEY).await.unwrap().status(), 200);

    // A broken file is refused with the field named, and the running config stays.
    std::fs::write(
        &path,
        text.replace("hosting = \"self_hosted\"", "hosting = \"moon\""),
    )
    .unwrap();
    let r = collect(reload().await.unwrap()).await;
    let e = r.error(400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("backend[0].hosting"),
        "{e}"
    );
    assert_eq!(models(OTHER_KEY).await.unwrap().status(), 200);

    // Counters live in the store the gateway started with: moving them needs a restart.
    let ledger = text.lines().find(|l| l.starts_with("ledger = ")).unwrap();
    std::fs::write(
        &path,
        text.replace(
            ledger,
            &format!("{ledger}\nbudgets = \"redis://127.0.0.1:6379/0\""),
        ),
    )
    .unwrap();
    let r = collect(reload().await.unwrap()).await;
    let e = r.error(400);
    assert!(
        e["message"].as_str().unwrap().contains("store.budgets"),
        "{e}"
    );
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
