//! The alerts webhook: a real HTTP receiver on loopback gets one JSON POST per condition and
//! episode (budget soft limit, forecast exhaustion, idle GPU), retried when it fails, with no
//! secret in any payload; a bad `[alerts]` section is refused naming the field.

mod common;

use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const ADMIN_KEY: &str = "tg-test-admin-alerts";
const SIM_KEY: &str = "sk-sim-alerts-secret";

/// A webhook receiver that answers 503 to its first `fail_first` POSTs, then 200, and keeps
/// every body it was sent (failed ones included).
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<(u16, serde_json::Value)>>>,
}

async fn receiver(fail_first: usize) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hooks/tollgate-token-123",
        listener.local_addr().unwrap()
    );
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(AtomicUsize::new(0));
    let tasks = tollgate::tasks::Tasks::new();
    let (b, t) = (bodies.clone(), tasks.clone());
    tasks.spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (b, seen) = (b.clone(), seen.clone());
            t.spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (b, seen) = (b.clone(), seen.clone());
                    async move {
                        assert_eq!(req.method(), http::Method::POST);
                        assert_eq!(req.headers()["content-type"], "application/json");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let status = if seen.fetch_add(1, Ordering::SeqCst) < fail_first {
                            503
                        } else {
                            200
                        };
                        b.lock()
                            .unwrap()
                            .push((status, serde_json::from_slice(&body).unwrap()));
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Receiver { url, bodies }
}

impl Receiver {
    fn delivered(&self, kind: &str) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, b)| *s == 200 && b["kind"] == kind)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

#[tokio::test]
async fn each_condition_alerts_once_with_retries_and_no_secret() {
    let hook = receiver(2).await;
    let gw = Harness::new()
        .backend(
            Backend::sim("llama", "m")
                .alias("chat-small")
                .api_key(SIM_KEY)
                .toml("gpu = { hourly_usd = 2.40, count = 1, tokens_per_second = 2500 }"),
        )
        .team_toml(
            "search",
            SEARCH_KEY,
            // Monthly: a day's window could reset before the forecast date near midnight.
            "budgets = [{ window = \"month\", usd = 0.002, soft_ratio = 0.01 }]",
        )
        .team_toml("other", OTHER_KEY, "budgets = [{ window = \"day\", usd = 5.0, soft_ratio = 0.9 }]")
        .metrics("idle_after_s = 1")
        .admin_key(ADMIN_KEY)
        .alerts(&format!(
            "url = \"{}\"\nforecast_hours = 24\ncheck_interval_s = 0.2\nretry_initial_s = 0.05\nmax_attempts = 5",
            hook.url
        ))
        .start()
        .await;
    // The checker's first look (nothing spent) starts the forecast's samples.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = serde_json::json!({
        "model": "chat-small",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string();
    for _ in 0..6 {
        let r = gw
            .post("/v1/chat/completions", SEARCH_KEY, body.clone())
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // A recent rate needs samples 5 s apart; the idle flag, a quiet second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ["budget_soft_limit", "budget_forecast", "gpu_idle"]
        .iter()
        .any(|k| hook.delivered(k).is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing alerts; received {:?}",
            hook.bodies.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Conditions that still hold do not alert again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let soft = hook.delivered("budget_soft_limit");
    assert_eq!(soft.len(), 1, "{soft:?}");
    assert_eq!(soft[0]["team"], "search");
    assert_eq!(soft[0]["window"], "month");
    assert_eq!(soft[0]["soft_ratio"], 0.01);
    let forecast = hook.delivered("budget_forecast");
    assert_eq!(forecast.len(), 1, "{forecast:?}");
    assert_eq!(forecast[0]["team"], "search");
    assert!(forecast[0]["exhausts_at"].is_string(), "{forecast:?}");
    assert!(forecast[0]["seconds_left"].as_f64().unwrap() <= 24.0 * 3600.0);
    assert!(forecast[0]["rate_window"]
        .as_str()
        .unwrap()
        .starts_with("the last "));
    let idle = hook.delivered("gpu_idle");
    assert!(!idle.is_empty() && idle.len() <= 2, "{idle:?}");
    assert_eq!(idle[0]["backend"], "llama");
    // The team that spent nothing has no alert.
    let all = hook.bodies.lock().unwrap().clone();
    assert!(!all.iter().any(|(_, b)| b["team"] == "other"), "{all:?}");
    // The receiver failed twice: the first alert was retried until it got through.
    let failed: Vec<_> = all.iter().filter(|(s, _)| *s == 503).collect();
    assert_eq!(failed.len(), 2);
    assert!(
        all.iter().any(|(s, b)| *s == 200
            && b["kind"] == failed[0].1["kind"]
            && b["at"] == failed[0].1["at"]),
        "{all:?}"
    );
    // No key, key hash or key id, no store URL, no backend key, no webhook token.
    let text = serde_json::to_string(&all).unwrap();
    let hash = tollgate::keys::hex(&tollgate::keys::hash_key(SEARCH_KEY));
    for secret in [
        SEARCH_KEY,
        ADMIN_KEY,
        SIM_KEY,
        &hash[..12],
        "sqlite://",
        "tollgate-token-123",
    ] {
        assert!(!text.contains(secret), "`{secret}` in {text}");
    }
}

#[test]
fn a_bad_alerts_section_is_refused_naming_the_field() {
    let parse = |alerts: &str| {
        let text = format!(
            "[[backend]]\nname = \"b\"\nurl = \"http://127.0.0.1:1\"\nhosting = \"commercial\"\nmodels = [{{ name = \"m\", input_usd_per_mtok = 1.0, output_usd_per_mtok = 1.0 }}]\n[alerts]\n{alerts}\n"
        );
        tollgate::config::parse(&text, "test.toml", &|_| None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = parse("url = \"ftp://hooks.example.com/x\"");
    assert!(e.contains("alerts.url") && e.contains("http://"), "{e}");
    let e = parse("url = \"https://user:hunter2@hooks.example.com/x\"");
    assert!(e.contains("alerts.url") && !e.contains("hunter2"), "{e}");
    let e = parse("url = \"https://hooks.example.com/x\"\nforecast_hours = -1");
    assert!(e.contains("alerts.forecast_hours"), "{e}");
    let e = parse("max_attempts = 0");
    assert!(e.contains("alerts.max_attempts"), "{e}");
    let e = parse("urls = \"https://hooks.example.com/x\"");
    assert!(e.contains("urls"), "{e}");
    assert_eq!(parse("url = \"https://hooks.example.com/x?token=abc\""), "");
}
