//! `tollgate demo`: simulated backends, the gateway in front of them, a little traffic from
//! three teams, and what happened. No key, no network.

use crate::config::{self, RawConfig};
use crate::sim::{Sim, SimConfig};
use crate::{app, server};
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
const SIM_OPENAI_KEY: &str = "sk-sim-openai";
const SIM_ANTHROPIC_KEY: &str = "sk-ant-sim";
pub const TEAM_KEYS: [(&str, &str); 3] = [
    ("search", "tg-demo-search"),
    ("support", "tg-demo-support"),
    ("research", "tg-demo-research"),
];

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keep serving after the traffic, on the config's addresses, until ctrl-c.
    pub serve: bool,
    pub requests_per_team: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            serve: false,
            requests_per_team: 24,
        }
    }
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let llama = Sim::spawn(SimConfig {
        models: vec!["meta-llama/Llama-3.1-8B-Instruct".into()],
        max_concurrency: 4,
        time_to_first_token: Duration::from_millis(40),
        token_interval: Duration::from_millis(5),
        completion_tokens: 24,
        ..Default::default()
    })
    .await?;
    let openai = Sim::spawn(SimConfig {
        models: vec![
            "gpt-4o-mini".into(),
            "gpt-4o".into(),
            "text-embedding-3-small".into(),
        ],
        api_key: Some(SIM_OPENAI_KEY.into()),
        time_to_first_token: Duration::from_millis(120),
        token_interval: Duration::from_millis(3),
        completion_tokens: 48,
        ..Default::default()
    })
    .await?;

    let anthropic = Sim::spawn(SimConfig {
        models: vec!["claude-haiku-4-5".into()],
        api_key: Some(SIM_ANTHROPIC_KEY.into()),
        time_to_first_token: Duration::from_millis(150),
        token_interval: Duration::from_millis(3),
        completion_tokens: 40,
        ..Default::default()
    })
    .await?;

    let mut raw: RawConfig = toml::from_str(DEMO_CONFIG).context("config/demo.toml")?;
    for b in &mut raw.backend {
        b.url = match b.name.as_str() {
            "llama-onprem" => llama.url(),
            "anthropic-sim" => anthropic.url(),
            _ => openai.url(),
        };
    }
    let listen: SocketAddr = raw.server.listen.parse()?;
    let admin_listen: SocketAddr = raw.server.admin_listen.parse()?;
    let cfg = config::validate(raw, &|var| match var {
        "DEMO_OPENAI_KEY" => Some(SIM_OPENAI_KEY.to_string()),
        "DEMO_ANTHROPIC_KEY" => Some(SIM_ANTHROPIC_KEY.to_string()),
        _ => None,
    })
    .map_err(|errs| anyhow::anyhow!("demo config: {errs:?}"))?;
    let ephemeral = SocketAddr::from(([127, 0, 0, 1], 0));
    let (client_addr, admin_addr) = if opts.serve {
        (listen, admin_listen)
    } else {
        (ephemeral, ephemeral)
    };
    let bind = |a| server::bind(a, 1024).with_context(|| format!("cannot listen on {a}"));
    let admin_keyed = cfg.server.admin_key.is_some();
    let gw = app::start_on(cfg, None, bind(client_addr)?, bind(admin_addr)?).await?;

    println!("tollgate demo");
    println!(
        "  simulated backends: llama-onprem (self-hosted, 4 slots) at {}, openai-sim at {}, anthropic-sim at {}",
        llama.addr, openai.addr, anthropic.addr
    );
    println!("  gateway: {} (admin {})", gw.addr, gw.admin_addr);
    println!(
        "  traffic: {} requests from each of {} teams\n",
        opts.requests_per_team,
        TEAM_KEYS.len()
    );

    let started = crate::clock::now();
    let since_us = crate::clock::unix_now_us();
    let results = drive_traffic(gw.addr, opts.requests_per_team).await;
    print_summary(&results, started.elapsed());
    print_cost_report(&gw, since_us).await?;

    if opts.serve {
        println!("\nServing until ctrl-c. Try:");
        println!(
            "  curl -s http://{}/v1/chat/completions -H 'authorization: Bearer tg-demo-search' \\\n    -H 'content-type: application/json' -d '{{\"model\":\"chat-small\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'",
            gw.addr
        );
        println!(
            "  curl -s http://{}/metrics | grep tollgate_",
            gw.admin_addr
        );
        println!(
            "\nThe FinOps console (spend, budgets and their forecasts, GPUs, routing, break-even):"
        );
        println!("  http://{}/dashboard", gw.admin_addr);
        if admin_keyed {
            println!(
                "  sign in with the admin key once (the form, or /dashboard?key=KEY): it sets an \
                 HttpOnly session cookie; scripts send `authorization: Bearer KEY` instead"
            );
        } else {
            println!(
                "  no admin key is set, so the admin port answers on loopback without one; set \
                 one with server.admin_key_env before exposing it"
            );
        }
        app::terminate_signal().await;
    }
    gw.shutdown().await;
    llama.stop().await;
    openai.stop().await;
    Ok(())
}

#[derive(Debug)]
struct Outcome {
    team: &'static str,
    model: String,
    backend: String,
    status: u16,
    latency: Duration,
    prompt_tokens: u64,
    completion_tokens: u64,
}

async fn drive_traffic(addr: SocketAddr, per_team: usize) -> Vec<Outcome> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut tasks = tokio::task::JoinSet::new();
    // Each team sends with a few requests in flight, as a small service would.
    let limit = Arc::new(tokio::sync::Semaphore::new(12));
    for (team, key) in TEAM_KEYS {
        for i in 0..per_team {
            let (path, body) = request_for(team, i);
            let client = client.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                let _slot = limit.acquire().await;
                send(&client, addr, team, key, path, body).await
            });
        }
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(o) = r {
            out.push(o);
        }
    }
    out
}

fn request_for(team: &str, i: usize) -> (&'static str, String) {
    let prompt = format!("Request {i} from {team}: summarise why metering inference matters.");
    let chat = |model: &str, stream: bool| {
        serde_json::json!({
            "model": model, "stream": stream, "max_tokens": 64,
            "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { serde_json::Value::Null },
            "messages": [{"role": "user", "content": prompt}],
        })
        .to_string()
    };
    // An Anthropic SDK user: its own API, on the gateway's `/v1/messages`.
    let messages = |model: &str, stream: bool| {
        serde_json::json!({
            "model": model, "stream": stream, "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}],
        })
        .to_string()
    };
    match (team, i % 4) {
        ("search", 3) if i % 8 == 7 => ("/v1/messages", messages("chat-fast", i % 16 == 15)),
        ("research", 2) => ("/v1/messages", messages("chat-fast", true)),
        ("research", 3) => ("/v1/chat/completions", chat("chat-fast", false)),
        ("search", 0 | 1) => ("/v1/chat/completions", chat("chat-small", true)),
        ("search", _) => ("/v1/chat/completions", chat("chat-small", false)),
        ("support", _) => (
            "/v1/chat/completions",
            chat("chat-small", i.is_multiple_of(2)),
        ),
        (_, 0) => (
            "/v1/embeddings",
            serde_json::json!({"model": "embed", "input": prompt}).to_string(),
        ),
        (_, 1) => ("/v1/chat/completions", chat("gpt-4o-mini", true)),
        _ => ("/v1/chat/completions", chat("chat-large", false)),
    }
}

async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    team: &'static str,
    key: &str,
    path: &str,
    body: String,
) -> Outcome {
    let model = serde_json::from_str::<serde_json::Value>(&body)
        .map(|v| v["model"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let anthropic = path == "/v1/messages";
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header(
            if anthropic {
                "x-api-key"
            } else {
                "authorization"
            },
            if anthropic {
                key.to_string()
            } else {
                format!("Bearer {key}")
            },
        )
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let started = crate::clock::now();
    let mut o = Outcome {
        team,
        model,
        backend: "-".into(),
        status: 0,
        latency: Duration::ZERO,
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let Ok(resp) = client.request(req).await else {
        return o;
    };
    o.status = resp.status().as_u16();
    if let Some(b) = resp
        .headers()
        .get("x-tollgate-backend")
        .and_then(|v| v.to_str().ok())
    {
        o.backend = b.to_string();
    }
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    o.latency = started.elapsed();
    // JSON bodies carry `usage`; streams carry it in their last data event.
    let text = String::from_utf8_lossy(&bytes);
    let usage_of = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .ok()
            .map(|v| v["usage"].clone())
    };
    let usage = if text.starts_with("data:") || text.starts_with("event:") {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(usage_of)
            .rfind(|u| u.is_object())
    } else {
        usage_of(&text)
    };
    if let Some(u) = usage {
        // OpenAI's names, or Anthropic's (input without the cache reads and writes).
        let n = |k: &str| u[k].as_u64().unwrap_or(0);
        o.prompt_tokens = n("prompt_tokens")
            + n("input_tokens")
            + n("cache_read_input_tokens")
            + n("cache_creation_input_tokens");
        o.completion_tokens = n("completion_tokens") + n("output_tokens");
    }
    o
}

/// The ledger's view of this run: what each team spent, on which model and backend.
async fn print_cost_report(gw: &app::Running, since_us: i64) -> anyhow::Result<()> {
    use crate::finops::report::{self, Dim, Format};
    let ledger = gw.ledger.clone();
    let config = gw.live.load().config.clone();
    let table = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        ledger.flush(crate::ledger::FLUSH_WAIT);
        let conn = ledger.store.reader()?;
        let by = [Dim::Team, Dim::Model, Dim::Backend];
        let rows = report::query(&conn, &by, Some(since_us), None)?;
        let gpus = crate::finops::backends::economics(
            &conn,
            &config,
            &crate::config::prices::Catalog::builtin(),
            Some(since_us),
            None,
            crate::clock::unix_now_us(),
        )?;
        Ok(format!(
            "{}\n{}",
            report::render(&by, &rows, Format::Table),
            crate::finops::backends::render(&gpus, Format::Table)
        ))
    })
    .await??;
    println!(
        "\nCost report from the ledger ({}):\n",
        gw.ledger.store.display()
    );
    print!("{table}");
    println!(
        "\nThe same report any time: tollgate report --config config/demo.toml --by team,model"
    );
    Ok(())
}

fn print_summary(results: &[Outcome], elapsed: Duration) {
    #[derive(Default)]
    struct Row {
        requests: usize,
        ok: usize,
        over_budget: usize,
        prompt: u64,
        completion: u64,
        latencies: Vec<Duration>,
    }
    let mut rows: BTreeMap<(&str, &str, &str), Row> = BTreeMap::new();
    for r in results {
        let row = rows.entry((r.team, &r.model, &r.backend)).or_default();
        row.requests += 1;
        row.ok += usize::from(r.status == 200);
        row.over_budget += usize::from(r.status == 429);
        row.prompt += r.prompt_tokens;
        row.completion += r.completion_tokens;
        row.latencies.push(r.latency);
    }
    println!(
        "{:<10} {:<12} {:<14} {:>5} {:>5} {:>5} {:>8} {:>8} {:>9}",
        "team", "model", "backend", "reqs", "ok", "429", "prompt", "complet.", "p50 ms"
    );
    for ((team, model, backend), mut row) in rows {
        row.latencies.sort();
        let p50 = row.latencies[row.latencies.len() / 2].as_secs_f64() * 1e3;
        println!(
            "{team:<10} {model:<12} {backend:<14} {:>5} {:>5} {:>5} {:>8} {:>8} {p50:>9.1}",
            row.requests, row.ok, row.over_budget, row.prompt, row.completion
        );
    }
    let ok = results.iter().filter(|r| r.status == 200).count();
    let over = results.iter().filter(|r| r.status == 429).count();
    println!(
        "\n{ok}/{} requests answered in {:.1}s.",
        results.len(),
        elapsed.as_secs_f64()
    );
    if over > 0 {
        println!("{over} refused with 429: research's budget of $0.004 a minute (config/demo.toml) ran out.");
    }
}
