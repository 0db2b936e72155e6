//! The `tollgate` command line: parses arguments and calls the library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tollgate::{app, config, demo, keys, route::Router, sim};

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
    /// Validate a config and print the routing table.
    Check {
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
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
    },
    /// Spend and unit-economics reports from the ledger.
    Report {
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// Group by these, comma-separated: team, model, requested_model, backend, key,
        /// status, endpoint, day, hour, or a tag key such as project.
        #[arg(long, default_value = "team,model")]
        by: String,
        /// Start: 2026-11-01, 2026-11-01T00:00:00Z, or an age like 24h or 7d.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| "tollgate=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Key {
            command: KeyCommand::New { team },
        } => {
            let (key, hash) = keys::new_key().context("reading the OS random source")?;
            println!("key:  {key}");
            println!("hash: {hash}");
            println!("\nGive the key to the caller; it is not stored anywhere. Add the hash to the team:");
            println!("[[team]]\nname = \"{team}\"\nkeys = [\"{hash}\"]");
            Ok(())
        }
        Command::Serve { config } => runtime()?.block_on(serve(config)),
        Command::Report {
            config,
            by,
            since,
            until,
            format,
        } => report(&config, &by, since, until, &format),
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
        } => runtime()?.block_on(async move {
            let cfg = sim::SimConfig {
                models,
                api_key,
                max_concurrency,
                time_to_first_token: Duration::from_millis(ttft_ms),
                token_interval: Duration::from_millis(token_ms),
                completion_tokens: tokens,
                ..Default::default()
            };
            let addr = SocketAddr::new(host, port);
            let listener = tollgate::server::bind(addr, 4096)
                .with_context(|| format!("cannot listen on {addr}"))?;
            let s = sim::Sim::start(listener, cfg);
            eprintln!("simulated OpenAI server on http://{}", s.addr);
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

fn report(
    config: &std::path::Path,
    by: &str,
    since: Option<String>,
    until: Option<String>,
    format: &str,
) -> anyhow::Result<()> {
    use tollgate::report::{self, Dim, Format};
    let cfg = config::load(config, &config::process_env)?;
    let path = cfg
        .ledger_url
        .strip_prefix("sqlite://")
        .context("only sqlite:// ledgers are supported so far")?;
    let now = tollgate::budget::unix_now_us();
    let dims = Dim::parse_list(by)?;
    let from = since.map(|s| report::parse_time(&s, now)).transpose()?;
    let to = until.map(|s| report::parse_time(&s, now)).transpose()?;
    let format: Format = format.parse()?;
    let conn = tollgate::ledger::sqlite::open_read(std::path::Path::new(path))
        .with_context(|| format!("cannot open the ledger {path} (has the gateway run yet?)"))?;
    let rows = report::query(&conn, &dims, from, to)?;
    print!("{}", report::render(&dims, &rows, format));
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config::load(path, &config::process_env)?;
    for w in cfg.warnings.iter().chain(&cfg.missing_keys) {
        println!("warning: {w}");
    }
    println!(
        "{} is valid: {} backends, {} teams.\n",
        path.display(),
        cfg.backends.len(),
        cfg.teams.len()
    );
    // The routing table needs no live clients; build them anyway to reuse the router exactly.
    let rt = runtime()?;
    let _guard = rt.enter();
    let live = tollgate::live::LiveState::build(cfg, None);
    let router: &Router = &live.router;
    println!(
        "{:<36} {:<16} {:<12} {:<8} serves as",
        "model or alias", "backend", "hosting", "region"
    );
    for (name, candidates) in router.table() {
        for (i, c) in candidates.iter().enumerate() {
            let b = &c.backend.cfg;
            println!(
                "{:<36} {:<16} {:<12} {:<8} {}",
                if i == 0 { name } else { "" },
                b.name,
                b.hosting.as_str(),
                b.region.as_deref().unwrap_or("-"),
                c.model
            );
        }
    }
    Ok(())
}
