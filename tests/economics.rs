//! GPU economics and the bounded tag labels on `/metrics`, on a gateway whose clock the test
//! moves: a simulated hour passes in a moment. Metrics are process-wide, so this file's
//! backends, teams and tag key are its own.

mod common;

use common::{chat, collect, Backend, Harness};
use std::sync::Arc;
use std::time::Duration;
use tollgate::clock::ManualClock;

/// 2026-11-22T10:00:00Z
const T0: i64 = 1_795_341_600_000_000;

/// The value of the sample whose name and labels are exactly `series`.
fn sample(metrics: &str, series: &str) -> Option<String> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_string)
}

fn number(metrics: &str, series: &str) -> f64 {
    sample(metrics, series)
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_gpu_busy_half_a_simulated_hour_shows_paid_charged_and_idle_cost() {
    let clock = Arc::new(ManualClock::new(T0));
    let gw = Harness::new()
        .backend(
            Backend::sim("gpu-econ", "llama-econ")
                .paced(Duration::from_millis(5), 10)
                .toml("max_concurrency = 2\ngpu = { hourly_usd = 2.0, tokens_per_second = 1000 }"),
        )
        .backend(
            Backend::sim("api-econ", "gpt-econ")
                .commercial()
                .price(0.15, 0.60),
        )
        .team("econ", "tg-econ")
        .metrics("busy_window_s = 3600\nidle_after_s = 600")
        .clock(clock.clone())
        .start()
        .await;

    // One stream is in flight from T0 until the clock has moved half an hour.
    let open = gw
        .open("/v1/chat/completions", "tg-econ", chat("llama-econ", true))
        .await;
    assert_eq!(open.status(), 200);
    clock.advance(Duration::from_secs(1800));
    let reply = collect(open).await;
    assert!(reply.text().contains("[DONE]"), "{}", reply.text());
    gw.wait_ledger_rows("SELECT 1 FROM requests WHERE backend = 'gpu-econ'", 1)
        .await;
    let m = gw.admin_get("/metrics").await.text();
    assert_eq!(
        number(&m, r#"tollgate_backend_idle{backend="gpu-econ"}"#),
        0.0,
        "just used"
    );
    // Then nothing for the rest of the hour.
    clock.advance(Duration::from_secs(1800));

    let m = gw.admin_get("/metrics").await.text();
    let busy = |measure: &str| {
        number(
            &m,
            &format!(r#"tollgate_backend_busy_ratio{{backend="gpu-econ",measure="{measure}"}}"#),
        )
    };
    assert_eq!(busy("busy"), 0.5);
    assert_eq!(
        busy("concurrency"),
        0.25,
        "one request of a cap of 2, half the time"
    );
    assert_eq!(
        number(
            &m,
            r#"tollgate_backend_busy_seconds_total{backend="gpu-econ"}"#
        ),
        1800.0
    );
    assert_eq!(
        number(
            &m,
            r#"tollgate_backend_gpu_seconds_total{backend="gpu-econ"}"#
        ),
        3600.0
    );
    assert_eq!(
        sample(&m, r#"tollgate_backend_paid_usd_total{backend="gpu-econ"}"#).as_deref(),
        Some("2.000000000")
    );
    let charged: i64 = gw.ledger(
        "SELECT SUM(cost_nusd) FROM requests WHERE backend = 'gpu-econ'",
        |r| r.get(0),
    )[0];
    assert!(charged > 0, "the rate card charged the stream");
    let usd = tollgate::meter::format_usd;
    assert_eq!(
        sample(
            &m,
            r#"tollgate_backend_charged_usd_total{backend="gpu-econ"}"#
        ),
        Some(usd(charged))
    );
    assert_eq!(
        sample(
            &m,
            r#"tollgate_backend_idle_cost_usd_total{backend="gpu-econ"}"#
        ),
        Some(usd(2_000_000_000 - charged)),
        "idle cost = paid - charged"
    );
    assert_eq!(
        number(&m, r#"tollgate_backend_idle{backend="gpu-econ"}"#),
        1.0,
        "quiet for 30 min, flagged after 10"
    );
    let backends = gw.admin_get("/admin/backends").await.json();
    let gpu = &backends[0]["gpu"];
    assert_eq!(backends[0]["name"], "gpu-econ");
    assert_eq!(gpu["busy_ratio"], 0.5);
    assert_eq!(gpu["paid_usd"], 2.0);
    assert_eq!(gpu["idle"], true);
    assert!(backends[1]["gpu"].is_null(), "{backends}");
    assert!(
        !m.contains(r#"backend="api-econ",measure="#)
            && !m.contains(r#"tollgate_backend_paid_usd_total{backend="api-econ"}"#),
        "a commercial backend has no GPU hours"
    );
}

#[tokio::test]
async fn tag_labels_are_bounded_and_the_gateway_overhead_is_measured() {
    let gw = Harness::new()
        .backend(
            Backend::sim("tags-econ", "model-tags")
                .commercial()
                .price(1.0, 2.0),
        )
        .team_toml(
            "econ-tags",
            "tg-econ-tags",
            "request_tags = [\"proj_econ\"]",
        )
        .metrics("tag_labels = [\"proj_econ\"]\nmax_tag_values = 2")
        .start()
        .await;
    for proj in ["a", "b", "c", "d", ""] {
        let mut req = gw.request(
            "/v1/chat/completions",
            "tg-econ-tags",
            chat("model-tags", false),
        );
        if !proj.is_empty() {
            req.headers_mut().insert(
                "x-tollgate-tags",
                format!("proj_econ={proj}").parse().unwrap(),
            );
        }
        let r = gw.send(req).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    gw.wait_ledger_rows("SELECT 1 FROM requests WHERE team = 'econ-tags'", 5)
        .await;
    let m = gw.admin_get("/metrics").await.text();
    let requests = |proj: &str| {
        number(
            &m,
            &format!(
                r#"tollgate_requests_total{{team="econ-tags",model="model-tags",backend="tags-econ",status="ok",proj_econ="{proj}"}}"#
            ),
        )
    };
    assert_eq!(requests("a"), 1.0);
    assert_eq!(requests("b"), 1.0);
    assert_eq!(requests("other"), 2.0, "c and d: past max_tag_values");
    assert_eq!(requests(""), 1.0, "untagged");
    assert!(
        !m.contains(r#"proj_econ="c""#),
        "no series per caller-chosen value"
    );

    // The spend counter carries the label too, and its series add up to the ledger.
    let spent: f64 = m
        .lines()
        .filter(|l| l.starts_with(r#"tollgate_cost_usd_total{team="econ-tags""#))
        .inspect(|l| assert!(l.contains("proj_econ=\""), "{l}"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    let ledger: i64 = gw.ledger(
        "SELECT SUM(cost_nusd) FROM requests WHERE team = 'econ-tags'",
        |r| r.get(0),
    )[0];
    assert!(
        (spent - ledger as f64 / 1e9).abs() < 1e-9,
        "{spent} vs {ledger}"
    );

    // Histograms stay without tag labels; the gateway's own time is recorded per backend.
    assert!(!m
        .lines()
        .any(|l| l.starts_with("tollgate_request_duration_seconds") && l.contains("proj_econ")));
    assert_eq!(
        number(
            &m,
            r#"tollgate_overhead_seconds_count{backend="tags-econ"}"#
        ),
        5.0
    );
    let overhead = number(&m, r#"tollgate_overhead_seconds_sum{backend="tags-econ"}"#) / 5.0;
    let total = number(
        &m,
        r#"tollgate_request_duration_seconds_sum{team="econ-tags",model="model-tags",backend="tags-econ",status="ok"}"#,
    ) / 5.0;
    assert!(
        overhead > 0.0 && overhead < total,
        "the gateway's own share ({overhead} s) is part of the request's time ({total} s)"
    );
}
