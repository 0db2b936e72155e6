//! The FinOps metrics on `/metrics`, checked against the ledger of the same requests.
//! Metrics are process-wide, so this file's teams are its own.

mod common;

use common::{chat, Backend, Harness};
use std::collections::BTreeMap;
use std::time::Duration;

/// `tollgate_cost_usd_total` lines as (team, model, backend) → USD.
fn cost_counters(text: &str) -> BTreeMap<(String, String, String), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("tollgate_cost_usd_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').unwrap();
        let label = |k: &str| {
            let start = labels.find(&format!("{k}=\"")).unwrap() + k.len() + 2;
            labels[start..start + labels[start..].find('"').unwrap()].to_string()
        };
        out.insert(
            (label("team"), label("model"), label("backend")),
            value.parse::<f64>().unwrap(),
        );
    }
    out
}

#[tokio::test]
async fn spend_counters_match_the_ledger_to_the_nano_dollar() {
    let gw = Harness::new()
        .backend(
            Backend::sim("gpu-m", "llama-m")
                .alias("chat")
                .paced(Duration::from_millis(1), 12)
                .toml("gpu = { hourly_usd = 3.0, tokens_per_second = 1000 }"),
        )
        .backend(
            Backend::sim("api-m", "gpt-m")
                .commercial()
                .price(0.15, 0.60)
                .toml("egress_usd_per_gb = 0.09"),
        )
        .team("metrics-a", "tg-metrics-a")
        .team("metrics-b", "tg-metrics-b")
        .start()
        .await;
    for (key, model, stream) in [
        ("tg-metrics-a", "chat", false),
        ("tg-metrics-a", "chat", true),
        ("tg-metrics-a", "gpt-m", false),
        ("tg-metrics-b", "gpt-m", true),
        ("tg-metrics-b", "chat", false),
    ] {
        let r = gw
            .post("/v1/chat/completions", key, chat(model, stream))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    gw.wait_ledger_rows("SELECT id FROM requests", 5).await;
    let ledger: BTreeMap<(String, String, String), f64> = gw
        .ledger(
            "SELECT team, served_model, backend, sum(cost_nusd) FROM requests GROUP BY 1, 2, 3",
            |r| {
                Ok((
                    (r.get(0)?, r.get(1)?, r.get(2)?),
                    r.get::<_, i64>(3)? as f64 / 1e9,
                ))
            },
        )
        .into_iter()
        .collect();
    assert_eq!(ledger.len(), 4, "{ledger:?}");
    let text = gw.admin_get("/metrics").await.text();
    let counters = cost_counters(&text);
    let ours: BTreeMap<_, _> = counters
        .into_iter()
        .filter(|((team, _, _), _)| team.starts_with("metrics-"))
        .collect();
    assert_eq!(ours, ledger, "{text}");
    assert!(
        text.lines()
            .any(|l| l == "# TYPE tollgate_cost_usd_total counter"),
        "{text}"
    );

    // One cost observation per priced inference; TTFT for the streams.
    let count = |metric: &str, team: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with(&format!("{metric}_count{{"))
                    && l.contains(&format!("team=\"{team}\""))
            })
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(count("tollgate_request_cost_usd", "metrics-a"), 3);
    assert_eq!(count("tollgate_request_cost_usd", "metrics-b"), 2);
    assert_eq!(
        count("tollgate_time_to_first_token_seconds", "metrics-a"),
        1
    );
    assert_eq!(
        count("tollgate_time_to_first_token_seconds", "metrics-b"),
        1
    );
    gw.shutdown().await;
}
