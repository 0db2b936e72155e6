//! `/metrics` as Prometheus and Grafana read it: promtool's linter on the exposition, a real
//! Prometheus scraping the admin port with the shipped example config, and the shipped Grafana
//! dashboard's queries checked against the names the gateway exports.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package. Without them the
//! tests that need them skip with a printed reason, unless `TOLLGATE_REQUIRE_PROMETHEUS` is
//! set (CI does), where a missing binary fails the test instead of hiding it.
//!
//! Metrics are process-wide and the tests of this file run at once, so each runs the workload
//! under its own team and backend names and looks only at those.

mod common;

use common::{Backend, Gateway, Harness, Reply};
use http_body_util::Full;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const ADMIN_KEY: &str = "tg-prom-admin";
const REQUIRE: &str = "TOLLGATE_REQUIRE_PROMETHEUS";
const PROMETHEUS_YML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/prometheus.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/grafana/tollgate.json");

/// A gateway after the mixed workload, and the names its series carry.
struct Workload {
    gw: Gateway,
    teams: [String; 2],
    gpu: String,
}

/// One or two requests of every kind the gateway meters, so that every family the dashboard
/// reads has a series: JSON and streamed chat on a self-hosted GPU backend and on a commercial
/// one, tagged and untagged, embeddings, a malformed body, a budget refusal and a fallback
/// from a backend answering 503.
async fn mixed_workload(p: &str) -> Workload {
    let search = format!("{p}-search");
    let support = format!("{p}-support");
    let (search_key, support_key) = (format!("tg-{search}"), format!("tg-{support}"));
    let gpu = format!("{p}-gpu");
    let api = format!("{p}-api");
    let gw = Harness::new()
        .admin_key(ADMIN_KEY)
        .metrics("tag_labels = [\"project\"]")
        .backend(
            Backend::sim(&gpu, "llama-p")
                .alias("chat")
                .paced(Duration::from_millis(1), 12)
                .toml("max_concurrency = 4")
                .toml("gpu = { hourly_usd = 2.4, count = 1, tokens_per_second = 1000 }"),
        )
        .backend(
            Backend::sim(&api, "gpt-p")
                .alias("chat")
                .commercial()
                .price(0.15, 0.60),
        )
        .backend(
            Backend::sim(&format!("{p}-embed"), "embed-p")
                .commercial()
                .price(0.02, 0.0),
        )
        .team_toml(
            &search,
            &search_key,
            "request_tags = [\"project\"]\nbudgets = [{ window = \"month\", usd = 100.0 }]",
        )
        // Room for a few small answers and past its soft limit after the first.
        .team_toml(
            &support,
            &support_key,
            "budgets = [{ window = \"day\", usd = 0.001, soft_ratio = 0.01 }]",
        )
        .start()
        .await;

    let chat = |model: &str, stream: bool, max_tokens: u32| {
        json!({
            "model": model,
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "What does a gateway meter?"}],
        })
        .to_string()
    };
    let served_by = |r: &Reply, backend: &str| {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["x-tollgate-backend"], backend);
    };
    for (project, model, stream, backend) in [
        (Some("alpha"), "chat", false, &gpu),
        (Some("beta"), "chat", true, &gpu),
        (Some("alpha"), "gpt-p", false, &api),
        (None, "gpt-p", true, &api),
    ] {
        let mut req = gw.request("/v1/chat/completions", &search_key, chat(model, stream, 16));
        if let Some(project) = project {
            let tags = format!("project={project}").parse().unwrap();
            req.headers_mut().insert("x-tollgate-tags", tags);
        }
        served_by(&gw.send(req).await, backend);
    }
    let r = gw
        .post(
            "/v1/embeddings",
            &search_key,
            r#"{"model":"embed-p","input":["a","b"]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for (model, stream, backend) in [("chat", false, &gpu), ("gpt-p", true, &api)] {
        let r = gw
            .post(
                "/v1/chat/completions",
                &support_key,
                chat(model, stream, 16),
            )
            .await;
        served_by(&r, backend);
    }
    gw.post("/v1/chat/completions", &search_key, "{\"model\": ")
        .await
        .error(400);
    let e = gw
        .post(
            "/v1/chat/completions",
            &support_key,
            chat("chat", false, 100_000),
        )
        .await
        .error(429);
    assert_eq!(e["type"], "budget_exceeded", "{e}");

    let knobs = gw.sim(&gpu).knobs.clone();
    knobs.fail_status.store(503, Ordering::Relaxed);
    let r = gw
        .post("/v1/chat/completions", &search_key, chat("chat", false, 16))
        .await;
    knobs.fail_status.store(0, Ordering::Relaxed);
    served_by(&r, &api);
    let route = r.headers["x-tollgate-route"].to_str().unwrap();
    assert!(route.contains(&format!("tried={gpu}:5xx")), "{route}");

    gw.wait_ledger_rows("SELECT id FROM requests", 10).await;
    Workload {
        gw,
        teams: [search, support],
        gpu,
    }
}

/// Families the workload must have made, so that the checks below see all of them.
const FAMILIES: &[&str] = &[
    "tollgate_requests_total",
    "tollgate_tokens_total",
    "tollgate_cost_usd_total",
    "tollgate_request_cost_usd_bucket",
    "tollgate_request_duration_seconds_bucket",
    "tollgate_time_to_first_token_seconds_bucket",
    "tollgate_overhead_seconds_bucket",
    "tollgate_backend_up",
    "tollgate_backend_in_flight",
    "tollgate_in_flight",
    "tollgate_rejected_total",
    "tollgate_budget_limit_usd",
    "tollgate_budget_spent_usd",
    "tollgate_budget_rejections_total",
    "tollgate_budget_soft_limit_reached",
    "tollgate_route_fallbacks_total",
    "tollgate_backend_busy_ratio",
    "tollgate_backend_busy_seconds_total",
    "tollgate_backend_idle",
    "tollgate_backend_paid_usd_total",
    "tollgate_backend_charged_usd_total",
    "tollgate_backend_idle_cost_usd_total",
    "tollgate_backend_gpu_seconds_total",
];

async fn scrape(gw: &Gateway) -> String {
    let r = gw.admin_get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// The sample names of an exposition (a histogram's `_bucket`, `_sum` and `_count`).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l[..l.find(['{', ' ']).unwrap_or(l.len())].to_string())
        .collect()
}

fn assert_has_families(text: &str) {
    let names = sample_names(text);
    let missing: Vec<_> = FAMILIES.iter().filter(|f| !names.contains(**f)).collect();
    assert!(missing.is_empty(), "missing {missing:?} in:\n{text}");
}

/// The binary's path; `None`, after saying why, when it is missing and CI does not require it.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let required = std::env::var(REQUIRE).is_ok_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "`{name}` is not on PATH and {REQUIRE} is set: install Debian's `prometheus` package"
        );
        eprintln!(
            "skipping: `{name}` is not on PATH (Debian package `prometheus`); \
             set {REQUIRE}=1 to fail instead"
        );
    }
    found
}

#[tokio::test]
async fn promtool_finds_no_problem_in_the_exposition() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let w = mixed_workload("lint").await;
    let text = scrape(&w.gw).await;
    assert_has_families(&text);
    assert!(
        text.lines().any(
            |l| l.starts_with("tollgate_cost_usd_total{team=\"lint-search\"")
                && l.contains("project=\"alpha\"")
        ),
        "the configured tag label is linted too:\n{text}"
    );
    let out = run_with_stdin(&promtool, &["check", "metrics"], text.as_bytes());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && printed.trim().is_empty(),
        "promtool check metrics: {}\n{printed}\n--- exposition:\n{text}",
        out.status
    );
    w.gw.shutdown().await;
}

fn run_with_stdin(bin: &Path, args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Written from a thread: a large exposition could fill the pipe while promtool's
    // output fills the other.
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

/// A `prometheus` server of this test's own: loopback port, config and storage in a temp
/// dir. Killed when dropped, so a failing assertion does not leave it running.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Runs `config/prometheus.yml` pointed at `target` with `key`, scraping every second.
    fn start(bin: &Path, promtool: &Path, target: std::net::SocketAddr, key: &str) -> Prometheus {
        let dir = common::temp_dir("prometheus");
        let example = std::fs::read_to_string(PROMETHEUS_YML).unwrap();
        let config = replace_once(
            &replace_once(&example, "scrape_interval: 15s", "scrape_interval: 1s"),
            "\"127.0.0.1:9090\"",
            &format!("\"{target}\""),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        // The example's credentials_file is relative: next to the config.
        std::fs::write(dir.join("tollgate_admin_key"), key).unwrap();
        let check = std::process::Command::new(promtool)
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml"))
            .output()
            .unwrap();
        assert!(check.status.success(), "promtool check config: {check:?}");

        // Prometheus takes an address, not a listener: a port free now, bound a moment later.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = std::process::Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Prometheus { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/query`: the result vector, or `None` while the server is not up.
    async fn query(&mut self, gw: &Gateway, promql: &str) -> Option<Vec<Value>> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("prometheus exited ({status}):\n{}", self.log());
        }
        let uri = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(promql)
        );
        let req = http::Request::get(uri).body(Full::default()).unwrap();
        let resp = gw.client.request(req).await.ok()?;
        let reply = common::collect(resp).await;
        if reply.status == 503 {
            return None; // starting up
        }
        let v = reply.json();
        assert_eq!(v["status"], "success", "{promql}: {v}");
        Some(v["data"]["result"].as_array().unwrap().clone())
    }

    /// Polls `promql` until `done` accepts its result, for at most 30 s.
    async fn wait_for(
        &mut self,
        gw: &Gateway,
        promql: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(result) = self.query(gw, promql).await {
                if done(&result) {
                    return result;
                }
            }
            if Instant::now() > deadline {
                let targets = self.get(gw, "/api/v1/targets").await;
                panic!(
                    "no result for {promql} after 30 s; targets: {targets}\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn get(&self, gw: &Gateway, path: &str) -> String {
        let req = http::Request::get(format!("http://{}{path}", self.addr))
            .body(Full::default())
            .unwrap();
        match gw.client.request(req).await {
            Ok(resp) => common::collect(resp).await.text(),
            Err(e) => e.to_string(),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` once in:\n{text}");
    text.replace(from, to)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant vector's samples as (value of `label`, value).
fn by_label(result: &[Value], label: &str) -> BTreeMap<String, f64> {
    result
        .iter()
        .map(|s| {
            let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            (s["metric"][label].as_str().unwrap_or("").to_string(), value)
        })
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_admin_port_and_sums_spend_per_team_as_the_ledger_does() {
    let Some(bin) = tool("prometheus") else {
        return;
    };
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let w = mixed_workload("scrape").await;
    let gw = &w.gw;
    let mut prom = Prometheus::start(&bin, &promtool, gw.admin, ADMIN_KEY);
    // Prometheus applies its targets on a 5 s tick, so the first scrape takes 5-6 s.
    prom.wait_for(gw, "up{job=\"tollgate\"}", |r| {
        r.iter().any(|s| s["value"][1] == "1")
    })
    .await;

    // Every request of the workload was settled before Prometheus started, so any scrape
    // holds the final figures.
    let ledger: BTreeMap<String, f64> = gw
        .ledger(
            "SELECT team, sum(cost_nusd) FROM requests GROUP BY team",
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as f64 / 1e9)),
        )
        .into_iter()
        .collect();
    let spend = prom
        .query(gw, "sum by (team) (tollgate_cost_usd_total)")
        .await
        .unwrap();
    let scraped: BTreeMap<String, f64> = by_label(&spend, "team")
        .into_iter()
        .filter(|(team, _)| w.teams.contains(team))
        .collect();
    assert_eq!(
        scraped.keys().collect::<Vec<_>>(),
        ledger.keys().collect::<Vec<_>>(),
        "{spend:?}"
    );
    for (team, usd) in &ledger {
        assert!(*usd > 0.0, "{team} spent nothing: {ledger:?}");
        assert!(
            (scraped[team] - usd).abs() < 1e-9,
            "{team}: Prometheus {} vs ledger {usd}",
            scraped[team]
        );
    }

    // The GPU economics, rendered by hand at scrape time, reach Prometheus too: paid
    // accrues, and what was charged is the ledger's cost of the requests the GPU served.
    let gpu = format!("{{backend=\"{}\"}}", w.gpu);
    let paid = prom
        .query(gw, &format!("tollgate_backend_paid_usd_total{gpu}"))
        .await
        .unwrap();
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert!(by_label(&paid, "backend")[&w.gpu] > 0.0, "{paid:?}");
    let charged = prom
        .query(gw, &format!("tollgate_backend_charged_usd_total{gpu}"))
        .await
        .unwrap();
    let gpu_ledger = gw.ledger(
        &format!(
            "SELECT sum(cost_nusd) FROM requests WHERE backend = '{}'",
            w.gpu
        ),
        |r| r.get::<_, i64>(0),
    )[0] as f64
        / 1e9;
    assert!(gpu_ledger > 0.0);
    assert!(
        (by_label(&charged, "backend")[&w.gpu] - gpu_ledger).abs() < 1e-9,
        "{charged:?} vs ledger {gpu_ledger}"
    );

    // Every dashboard query is valid PromQL and finds series once rates have two samples.
    prom.wait_for(gw, "count_over_time(up{job=\"tollgate\"}[1m])", |r| {
        r.iter()
            .any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) >= Some(2.0))
    })
    .await;
    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries(&dashboard()) {
        let promql = as_promql(&expr)
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$team", ".*")
            .replace("$backend", ".*");
        if prom.query(gw, &promql).await.unwrap().is_empty() {
            empty.push(format!("{title}: {promql}"));
        }
    }
    assert!(empty.is_empty(), "no series for:\n{}", empty.join("\n"));
    drop(prom);
    w.gw.shutdown().await;
}

/// Grafana's `label_values(metric, label)` as the PromQL that has a series per value.
fn as_promql(expr: &str) -> String {
    match expr
        .strip_prefix("label_values(")
        .and_then(|e| e.strip_suffix(')'))
        .and_then(|e| e.rsplit_once(','))
    {
        Some((metric, label)) => format!("count by ({}) ({metric})", label.trim()),
        None => expr.to_string(),
    }
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every PromQL expression of the dashboard, with where it is: panel targets (rows included)
/// and template variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str();
                let expr = expr.unwrap_or_else(|| panic!("panel `{title}`: target without expr"));
                out.push((title.clone(), expr.to_string()));
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"].as_str().or(var["query"].as_str());
        let name = format!("variable ${}", var["name"].as_str().unwrap_or("?"));
        out.push((
            name,
            query.expect("a query variable has a query").to_string(),
        ));
    }
    out
}

/// The metric names an expression reads: its identifiers that start with `tollgate_`.
fn metric_names(expr: &str) -> Vec<&str> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tollgate_") {
        // Part of a longer identifier (`my_tollgate_x`) is not a name of ours.
        let preceded = rest[..i].chars().next_back().is_some_and(ident);
        let len = rest[i..]
            .find(|c: char| !ident(c))
            .unwrap_or(rest.len() - i);
        if !preceded {
            names.push(&rest[i..i + len]);
        }
        rest = &rest[i + len..];
    }
    names
}

#[test]
fn metric_names_are_whole_identifiers() {
    assert_eq!(
        metric_names(
            "sum(rate(tollgate_a_total{x=\"tollgate_b\"}[1m])) / tollgate_c:ratio + my_tollgate_d"
        ),
        ["tollgate_a_total", "tollgate_b", "tollgate_c:ratio"]
    );
}

/// What the dashboard must show, each as text one of its expressions contains entirely.
const TOPICS: &[(&str, &[&str])] = &[
    (
        "spend by team",
        &["sum by (team)", "rate(tollgate_cost_usd_total"],
    ),
    (
        "spend by model and backend",
        &["sum by (model, backend)", "rate(tollgate_cost_usd_total"],
    ),
    (
        "cost per inference p50",
        &[
            "histogram_quantile(0.5,",
            "tollgate_request_cost_usd_bucket",
        ],
    ),
    (
        "cost per inference p95",
        &[
            "histogram_quantile(0.95,",
            "tollgate_request_cost_usd_bucket",
        ],
    ),
    (
        "mean cost per inference",
        &[
            "rate(tollgate_cost_usd_total",
            "/",
            "rate(tollgate_requests_total",
        ],
    ),
    (
        "tokens per dollar",
        &[
            "rate(tollgate_tokens_total",
            "/",
            "rate(tollgate_cost_usd_total",
        ],
    ),
    (
        "tokens by direction",
        &["sum by (direction)", "rate(tollgate_tokens_total"],
    ),
    (
        "GPU busy ratio, both measures",
        &["tollgate_backend_busy_ratio", "measure"],
    ),
    ("idle cost", &["rate(tollgate_backend_idle_cost_usd_total"]),
    ("paid", &["rate(tollgate_backend_paid_usd_total"]),
    ("charged", &["rate(tollgate_backend_charged_usd_total"]),
    ("idle flag", &["tollgate_backend_idle{"]),
    (
        "budget burn",
        &[
            "tollgate_budget_spent_usd",
            "/",
            "tollgate_budget_limit_usd",
        ],
    ),
    ("budget rejections", &["tollgate_budget_rejections_total"]),
    (
        "fallbacks by reason",
        &["reason)", "tollgate_route_fallbacks_total"],
    ),
    (
        "requests by status",
        &["sum by (status)", "rate(tollgate_requests_total"],
    ),
    (
        "time to first token p99",
        &[
            "histogram_quantile(0.99,",
            "tollgate_time_to_first_token_seconds_bucket",
        ],
    ),
    (
        "overhead p99",
        &[
            "histogram_quantile(0.99,",
            "tollgate_overhead_seconds_bucket",
        ],
    ),
    ("backend up", &["tollgate_backend_up"]),
    ("backend in flight", &["tollgate_backend_in_flight"]),
];

#[tokio::test]
async fn the_dashboard_reads_only_metrics_the_gateway_exports() {
    let dashboard = dashboard();
    let queries = dashboard_queries(&dashboard);
    let w = mixed_workload("dash").await;
    let text = scrape(&w.gw).await;
    assert_has_families(&text);
    let exported = sample_names(&text);

    let mut unknown = Vec::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "`{title}` reads no tollgate_ metric: {expr}"
        );
        for name in names.into_iter().filter(|n| !exported.contains(*n)) {
            unknown.push(format!("{title}: {name}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "not exported:\n{}\n--- exported: {exported:?}",
        unknown.join("\n")
    );

    for (topic, needles) in TOPICS {
        assert!(
            queries
                .iter()
                .any(|(_, e)| needles.iter().all(|n| e.contains(n))),
            "no panel shows {topic} (an expression with all of {needles:?})"
        );
    }

    // Importable anywhere: the data source is a variable, and the filters are variables too.
    let vars: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    assert_eq!(vars["DS_PROMETHEUS"]["type"], "datasource");
    assert_eq!(vars["DS_PROMETHEUS"]["query"], "prometheus");
    for filter in ["team", "backend"] {
        assert_eq!(vars[filter]["type"], "query", "${filter}");
        assert_eq!(vars[filter]["datasource"]["uid"], "${DS_PROMETHEUS}");
        assert!(
            queries
                .iter()
                .any(|(_, e)| e.contains(&format!("=~\"${filter}\""))),
            "no query filters by ${filter}"
        );
    }
    let schema = dashboard["schemaVersion"].as_u64().unwrap();
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    fn check_panels(list: &Value) {
        for panel in list.as_array().into_iter().flatten() {
            if panel["type"] != "row" {
                assert_eq!(
                    panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                    "panel `{}`",
                    panel["title"]
                );
            }
            check_panels(&panel["panels"]);
        }
    }
    check_panels(&dashboard["panels"]);
    w.gw.shutdown().await;
}
