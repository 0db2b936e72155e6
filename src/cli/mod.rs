//! The `tollgate` command line: its arguments and what each subcommand does with the library.
//! `main.rs` only calls [`main`].

mod stdout;

use crate::ledger::Store;
use crate::{app, config, demo, keys, route::Router, sim};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An inference gateway with cost metering"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
    },
    /// Validate a config and print the routing table; with --explain, how one request
    /// would be routed.
    Check {
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// Rank every candidate for a request, with its expected cost and the filter that
        /// removed it (backends taken as healthy and idle).
        #[arg(long, requires = "model")]
        explain: bool,
        /// Model name or alias of the request.
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 1000)]
        prompt_tokens: u64,
        /// The request's `max_tokens`; without it the expected output is routing's default.
        #[arg(long)]
        output_tokens: Option<u64>,
        /// The team asking (its regions apply).
        #[arg(long)]
        team: Option<String>,
        /// Features the request needs: tools, vision, json (comma-separated).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
    },
    /// Simulated backends, the gateway, traffic from three teams, and a summary.
    Demo {
        /// Keep serving afterwards (on config/demo.toml's addresses) until ctrl-c.
        #[arg(long)]
        serve: bool,
        #[arg(long, default_value_t = 24)]
        requests_per_team: usize,
    },
    /// Run a simulated OpenAI-compatible LLM server.
    Simulate {
        #[arg(long, default_value_t = 8001)]
        port: u16,
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Model id served (repeatable); none accepts any model.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Require this bearer key.
        #[arg(long)]
        api_key: Option<String>,
        #[arg(long, default_value_t = 64)]
        max_concurrency: usize,
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        #[arg(long, default_value_t = 0)]
        token_ms: u64,
        /// Tokens per answer when the request does not cap them lower.
        #[arg(long, default_value_t = 16)]
        tokens: u32,
        /// Answer like this engine: openai, vllm, llama.cpp, llama-cpp-python, tgi, sglang,
        /// ollama or mistral (its JSON, stream usage, strict headers and tokenize endpoints).
        #[arg(long, default_value = "openai")]
        dialect: sim::Dialect,
    },
    /// Spend and unit-economics reports from the ledger.
    Report {
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// Group by these, comma-separated: team, model, requested_model, backend, key,
        /// status, endpoint, day, hour, or a tag key such as project. Not for focus, whose
        /// rows are always team x backend x model x hour.
        #[arg(long, default_value = "team,model")]
        by: String,
        /// Start: 2026-11-01, 2026-11-01T00:00:00Z, or an age like 24h or 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// table, csv, json, or focus (FinOps FOCUS cost and usage rows, CSV).
        #[arg(long, default_value = "table")]
        format: String,
        /// Only the self-hosted backends' unit economics (GPU hours paid, utilization, idle
        /// cost, break-even against commercial models). The table and JSON show them anyway.
        #[arg(long, conflicts_with_all = ["what_if", "statement"])]
        backends: bool,
        /// Re-price the ledger's traffic under another config (GPU costs, owned GPUs, prices)
        /// and show the difference per team and model.
        #[arg(long, value_name = "OTHER.toml", conflicts_with_all = ["statement", "by"])]
        what_if: Option<PathBuf>,
        /// A statement per team for one month (--month): showback, or with --chargeback
        /// the bill.
        #[arg(long, requires = "month", conflicts_with = "by")]
        statement: bool,
        /// A UTC calendar month, YYYY-MM, for --statement or --what-if.
        #[arg(long, conflicts_with_all = ["since", "until"])]
        month: Option<String>,
        /// With --statement: a chargeback statement (billed to teams), not showback.
        #[arg(long, requires = "statement")]
        chargeback: bool,
    },
    /// Apply the PostgreSQL ledger's schema migrations (the gateway also does at start).
    Migrate {
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
    },
    /// Manage client keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a key and print the hash to put in the team's `keys`.
    New {
        #[arg(long)]
        team: String,
    },
}

pub fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| "tollgate=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().command) {
        Err(e) if stdout::reader_gone(&e) => Ok(()),
        done => done,
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check {
            config,
            explain,
            model,
            prompt_tokens,
            output_tokens,
            team,
            features,
        } => {
            let explain = explain.then(|| Explain {
                model: model.unwrap_or_default(),
                prompt_tokens,
                output_tokens,
                team,
                features,
            });
            let mut out = stdout::Stdout::lock();
            check(&mut out, &config, explain)?;
            Ok(out.flush()?)
        }
        Command::Key {
            command: KeyCommand::New { team },
        } => {
            let (key, hash) = keys::new_key().context("reading the OS random source")?;
            let mut out = stdout::Stdout::lock();
            writeln!(out, "key:  {key}")?;
            writeln!(out, "hash: {hash}")?;
            writeln!(out, "\nGive the key to the caller; it is not stored anywhere. Add the hash to the team:")?;
            writeln!(out, "[[team]]\nname = \"{team}\"\nkeys = [\"{hash}\"]")?;
            Ok(out.flush()?)
        }
        Command::Serve { config } => runtime()?.block_on(serve(config)),
        Command::Migrate { config } => {
            let mut out = stdout::Stdout::lock();
            migrate(&mut out, &config)?;
            Ok(out.flush()?)
        }
        Command::Report {
            config,
            by,
            since,
            until,
            format,
            backends,
            what_if,
            statement,
            month,
            chargeback,
        } => {
            let mut out = stdout::Stdout::lock();
            let special = match (what_if, statement) {
                (Some(other), _) => Some(Special::WhatIf(other)),
                (None, true) => Some(Special::Statement { chargeback }),
                (None, false) => None,
            };
            if month.is_some() && special.is_none() {
                anyhow::bail!(
                    "--month is for --statement or --what-if; use --since/--until for the report"
                );
            }
            report(
                &mut out,
                &config,
                &by,
                Period {
                    since,
                    until,
                    month,
                },
                &format,
                backends,
                special,
            )?;
            Ok(out.flush()?)
        }
        Command::Demo {
            serve,
            requests_per_team,
        } => runtime()?.block_on(demo::run(demo::DemoOptions {
            serve,
            requests_per_team,
        })),
        Command::Simulate {
            port,
            host,
            models,
            api_key,
            max_concurrency,
            ttft_ms,
            token_ms,
            tokens,
            dialect,
        } => runtime()?.block_on(async move {
            let cfg = sim::SimConfig {
                models,
                api_key,
                max_concurrency,
                time_to_first_token: Duration::from_millis(ttft_ms),
                token_interval: Duration::from_millis(token_ms),
                completion_tokens: tokens,
                dialect,
                ..Default::default()
            };
            let addr = SocketAddr::new(host, port);
            let listener = crate::server::bind(addr, 4096)
                .with_context(|| format!("cannot listen on {addr}"))?;
            let s = sim::Sim::start(listener, cfg);
            eprintln!("simulated {dialect} server on http://{}", s.addr);
            app::terminate_signal().await;
            s.stop().await;
            Ok(())
        }),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let cfg = config::load(&path, &config::process_env)?;
    let running = app::start(cfg, Some(path)).await?;
    app::terminate_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}

fn migrate(out: &mut impl Write, config: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config::load(config, &config::process_env)?;
    let store = Store::from_url(cfg.ledger_url.expose(), &cfg.ledger_spool)?;
    let Store::Postgres { url, .. } = &store else {
        writeln!(
            out,
            "store.ledger is {}: the embedded ledger migrates itself when opened; nothing to do",
            store.display()
        )?;
        return Ok(());
    };
    let shown = store.display();
    let mut pg = crate::ledger::postgres::Blocking::connect(url.expose())
        .with_context(|| format!("store.ledger: cannot connect to {shown}"))?;
    let applied = pg
        .migrate()
        .with_context(|| format!("store.ledger: migrating {shown}"))?;
    let latest = crate::ledger::postgres::MIGRATIONS
        .last()
        .map_or(0, |m| m.0);
    if applied.is_empty() {
        writeln!(out, "{shown}: schema up to date (version {latest})")?;
    } else {
        for v in &applied {
            let name = crate::ledger::postgres::MIGRATIONS
                .iter()
                .find(|m| m.0 == *v)
                .map_or("", |m| m.1);
            writeln!(out, "{shown}: applied migration {v} ({name})")?;
        }
        writeln!(out, "{shown}: schema at version {latest}")?;
    }
    Ok(())
}

/// A report that is not the grouped spend report.
enum Special {
    WhatIf(PathBuf),
    Statement { chargeback: bool },
}

/// A special report, its inputs read and checked.
enum Job {
    WhatIf(PathBuf, Box<config::Config>, crate::finops::report::Format),
    Statement(
        crate::finops::statement::Month,
        crate::finops::statement::Mode,
        crate::finops::report::Format,
    ),
}

/// The report's period as the command line gave it.
struct Period {
    since: Option<String>,
    until: Option<String>,
    month: Option<String>,
}

fn report(
    out: &mut impl Write,
    config: &std::path::Path,
    by: &str,
    period: Period,
    format: &str,
    backends_only: bool,
    special: Option<Special>,
) -> anyhow::Result<()> {
    use crate::finops::report::{self, Dim, Format};
    use crate::finops::statement::{self, Month};
    let cfg = config::load(config, &config::process_env)?;
    let store = crate::ledger::Store::from_url(cfg.ledger_url.expose(), &cfg.ledger_spool)?;
    let now = crate::clock::unix_now_us();
    let month = period.month.map(|m| m.parse::<Month>()).transpose()?;
    let (mut from, mut to) = (
        period
            .since
            .map(|s| report::parse_time(&s, now))
            .transpose()?,
        period
            .until
            .map(|s| report::parse_time(&s, now))
            .transpose()?,
    );
    if let Some(m) = month {
        let (f, t) = m.range_us();
        // The month so far: owned GPUs have not been paid for the hours still to come.
        (from, to) = (Some(f), Some(t.min(now.max(f))));
    }
    // Checked before the ledger is opened, so a bad combination is named, not a missing file.
    let special = match special {
        Some(_) if format == "focus" => anyhow::bail!(
            "--format focus is the FOCUS export itself: use table, csv or json with --what-if or --statement"
        ),
        Some(Special::WhatIf(path)) => {
            let other = config::load(&path, &config::process_env)
                .with_context(|| format!("--what-if {}", path.display()))?;
            Some(Job::WhatIf(path, Box::new(other), format.parse::<Format>()?))
        }
        Some(Special::Statement { chargeback }) => Some(Job::Statement(
            month.context("--statement needs --month YYYY-MM")?,
            if chargeback {
                statement::Mode::Chargeback
            } else {
                statement::Mode::Showback
            },
            format.parse::<Format>()?,
        )),
        None => None,
    };
    // FOCUS is not a rendering of the grouped report: its rows and columns are fixed.
    let report = if format == "focus" {
        None
    } else {
        Some((Dim::parse_list(by)?, format.parse::<Format>()?))
    };
    let conn = store.reader().with_context(|| match &store {
        crate::ledger::Store::Sqlite(_) => {
            format!(
                "cannot open the ledger {} (has the gateway run yet?)",
                store.display()
            )
        }
        crate::ledger::Store::Postgres { .. } => {
            format!(
                "store.ledger: cannot read the PostgreSQL ledger {}",
                store.display()
            )
        }
    })?;
    if let Store::Postgres { spool, .. } = &store {
        if let Some(Ok(n)) = store.spool_reader().map(|r| {
            r.and_then(|r| {
                let rows = r.rows("SELECT COUNT(*) FROM requests", &[])?;
                Ok(rows
                    .first()
                    .and_then(|r| r[0].opt_int(0).ok().flatten())
                    .unwrap_or(0))
            })
        }) {
            if n > 0 {
                eprintln!(
                    "note: {n} records in the local spool {} are not in PostgreSQL yet and not in this report",
                    spool.display()
                );
            }
        }
    }
    match special {
        Some(Job::WhatIf(path, other, format)) => {
            let w = crate::finops::whatif::compare(
                &conn,
                &cfg,
                &other,
                &crate::config::prices::Catalog::builtin(),
                from,
                to,
                now,
            )?;
            let labels = (config.display().to_string(), path.display().to_string());
            write!(
                out,
                "{}",
                crate::finops::whatif::render(&w, (&labels.0, &labels.1), format)
            )?;
            return Ok(());
        }
        Some(Job::Statement(month, mode, format)) => {
            let mut s = statement::query(&conn, &cfg, month, mode)?;
            statement::add_owned_gpu_idle(&mut s, &conn, &cfg, now)?;
            write!(out, "{}", statement::render(&s, format))?;
            return Ok(());
        }
        None => {}
    }
    match report {
        None => write!(
            out,
            "{}",
            crate::finops::focus::export(&conn, &cfg, from, to)?
        )?,
        Some((dims, format)) => {
            let gpus = crate::finops::backends::economics(
                &conn,
                &cfg,
                &crate::config::prices::Catalog::builtin(),
                from,
                to,
                now,
            )?;
            if backends_only {
                write!(out, "{}", crate::finops::backends::render(&gpus, format))?;
                return Ok(());
            }
            let rows = report::query(&conn, &dims, from, to)?;
            match format {
                // One JSON document with both parts; CSV holds one table, so `--backends`.
                Format::Json => {
                    let groups: serde_json::Value =
                        serde_json::from_str(&report::render(&dims, &rows, format))?;
                    let gpus: serde_json::Value =
                        serde_json::from_str(&crate::finops::backends::render(&gpus, format))?;
                    let doc = serde_json::json!({"groups": groups, "self_hosted_backends": gpus});
                    writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
                }
                Format::Csv => write!(out, "{}", report::render(&dims, &rows, format))?,
                Format::Table => {
                    write!(out, "{}", report::render(&dims, &rows, format))?;
                    if !gpus.is_empty() {
                        write!(out, "\n{}", crate::finops::backends::render(&gpus, format))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The request `tollgate check --explain` routes.
struct Explain {
    model: String,
    prompt_tokens: u64,
    output_tokens: Option<u64>,
    team: Option<String>,
    features: Vec<String>,
}

fn check(
    out: &mut impl Write,
    path: &std::path::Path,
    explain: Option<Explain>,
) -> anyhow::Result<()> {
    let cfg = config::load(path, &config::process_env)?;
    for w in cfg.warnings.iter().chain(&cfg.missing_keys) {
        writeln!(out, "warning: {w}")?;
    }
    writeln!(
        out,
        "{} is valid: {} backends, {} teams.\n",
        path.display(),
        cfg.backends.len(),
        cfg.teams.len()
    )?;
    // The routing table needs no live clients; build them anyway to reuse the router exactly.
    let rt = runtime()?;
    let _guard = rt.enter();
    let live = crate::live::LiveState::build(cfg, None);
    let router: &Router = &live.router;
    if let Some(e) = explain {
        return explain_route(out, &live, &e);
    }
    writeln!(
        out,
        "{:<34} {:<16} {:<12} {:<7} {:>9} {:<17} {:>15}  serves as",
        "model or alias", "backend", "hosting", "region", "context", "features", "$/1M in / out"
    )?;
    for (name, candidates) in router.table() {
        for (i, c) in candidates.iter().enumerate() {
            let b = &c.backend.cfg;
            let price = c.price.as_ref().map_or_else(
                || "unpriced".to_string(),
                |p| format!("{:.2} / {:.2}", p.input * 1e6, p.output * 1e6),
            );
            let features = if c.features == crate::config::Features::UNDECLARED {
                "(not declared)".to_string()
            } else if c.features.is_empty() {
                "none".to_string()
            } else {
                c.features.to_string()
            };
            writeln!(
                out,
                "{:<34} {:<16} {:<12} {:<7} {:>9} {:<17} {:>15}  {}",
                if i == 0 { name } else { "" },
                b.name,
                b.hosting.as_str(),
                b.region.as_deref().unwrap_or("-"),
                c.context_window.map_or("-".to_string(), |w| w.to_string()),
                features,
                price,
                c.model
            )?;
        }
    }
    writeln!(out,
        "\nRouting: {}; up to {} attempts. `tollgate check --explain --model NAME` ranks them for one request.",
        match live.config.routing.self_hosted_cost {
            crate::config::SelfHostedCost::Marginal => "self-hosted capacity is free until full (marginal)",
            crate::config::SelfHostedCost::RateCard => "self-hosted backends compete at their rate card",
        },
        live.config.routing.max_attempts
    )?;
    Ok(())
}

fn explain_route(
    out: &mut impl Write,
    live: &crate::live::LiveState,
    e: &Explain,
) -> anyhow::Result<()> {
    use crate::config::Features;
    use crate::route::{explain, Prompt, RouteRequest};
    let config = &live.config;
    let regions = match &e.team {
        None => Vec::new(),
        Some(name) => config
            .teams
            .iter()
            .find(|t| &*t.name == name)
            .map(|t| t.regions.clone())
            .with_context(|| {
                let names: Vec<&str> = config.teams.iter().map(|t| &*t.name).collect();
                format!(
                    "no team `{name}` in the config (teams: {})",
                    names.join(", ")
                )
            })?,
    };
    let mut features = Features::NONE;
    for f in &e.features {
        features =
            features
                .with(Features::from_name(f).with_context(|| {
                    format!("unknown feature `{f}`: use tools, vision or json")
                })?);
    }
    let request = RouteRequest {
        model: &e.model,
        endpoint: crate::api::endpoint::Endpoint::ChatCompletions,
        regions: &regions,
        features,
        max_output_tokens: e.output_tokens,
        prompt: Prompt::known(e.prompt_tokens),
        request_bytes: e.prompt_tokens * 4,
    };
    let plan = live
        .router
        .plan(&request)
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    writeln!(
        out,
        "request: model `{}`, {} prompt tokens, output {}, team {}{}, features {}",
        e.model,
        e.prompt_tokens,
        e.output_tokens.map_or_else(
            || format!("~{} expected", config.routing.expected_output_tokens),
            |n| format!("up to {n}")
        ),
        e.team.as_deref().unwrap_or("(any)"),
        if regions.is_empty() {
            String::new()
        } else {
            let r: Vec<&str> = regions.iter().map(|r| &**r).collect();
            format!(" (regions {})", r.join(", "))
        },
        if features.is_empty() {
            "none".to_string()
        } else {
            features.to_string()
        },
    )?;
    writeln!(out,
        "policy: self_hosted_cost = {}, max_attempts = {}; every backend taken as healthy and idle\n",
        config.routing.self_hosted_cost.as_str(),
        config.routing.max_attempts
    )?;
    write!(out, "{}", explain::table(&plan))?;
    if plan.ranked.is_empty() {
        let team = e.team.as_deref().unwrap_or("(any)");
        writeln!(out, "\n{}", Router::refusal(&e.model, team, &plan))?;
    }
    Ok(())
}
