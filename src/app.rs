//! Builds a running gateway from a validated config, and owns its shutdown.

use crate::admin::Admin;
use crate::budget::redis::RedisBook;
use crate::budget::{BudgetBook, Demand, LedgerSeed, SpendSource, SpendUnreadable};
use crate::clock::{Clock, SystemClock};
use crate::config::{AdminAccess, BudgetStore, Config, Window};
use crate::ledger::read::{ReadError, Reader};
use crate::ledger::{Ledger, LedgerError, Store};
use crate::live::{Live, LiveState};
use crate::pipeline::Gateway;
use crate::server::catch_panic::CatchPanicLayer;
use crate::server::limits::InFlightLimitLayer;
use crate::server::request_id::RequestIdLayer;
use crate::server::{self, ServeOptions};
use crate::tasks::Tasks;
use crate::tokens::Tokenizers;
use arc_swap::ArcSwap;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend keys are missing:\n  - {}", .0.join("\n  - "))]
    MissingKeys(Vec<String>),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The URL was checked by validation; this is what the client still refuses.
    #[error("store.budgets cannot be used: {0}")]
    BudgetStore(String),
}

/// A gateway serving its client and admin ports.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub live: Live,
    pub admin: Admin,
    pub ledger: Arc<Ledger>,
    shutdown: watch::Sender<bool>,
    admin_shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    /// Every task the gateway spawned; shutdown waits for them before closing the ledger.
    pub tasks: Tasks,
}

/// Binds the configured addresses and starts serving.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Running, StartError> {
    // Before binding: a port that accepts before the gateway can answer leaves the first
    // clients waiting in the backlog.
    load_encodings(&config).await;
    let bind = |addr: SocketAddr| {
        server::bind(addr, config.server.listen_backlog)
            .map_err(|source| StartError::Bind { addr, source })
    };
    let client = bind(config.server.listen)?;
    let admin = bind(config.server.admin_listen)?;
    start_on(config, config_path, client, admin).await
}

/// Starts on listeners the caller bound (tests bind port 0).
pub async fn start_on(
    config: Config,
    config_path: Option<PathBuf>,
    client: TcpListener,
    admin_listener: TcpListener,
) -> Result<Running, StartError> {
    start_with_clock(
        config,
        config_path,
        client,
        admin_listener,
        Arc::new(SystemClock),
    )
    .await
}

/// As [`start_on`], with the clock budgets are judged by (tests move it by hand).
pub async fn start_with_clock(
    config: Config,
    config_path: Option<PathBuf>,
    client: TcpListener,
    admin_listener: TcpListener,
    clock: Arc<dyn Clock>,
) -> Result<Running, StartError> {
    if !config.missing_keys.is_empty() {
        return Err(StartError::MissingKeys(config.missing_keys));
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let addr = client.local_addr().expect("bound listener has an address");
    let admin_addr = admin_listener
        .local_addr()
        .expect("bound listener has an address");
    // Checked again on the address actually bound: validation saw only the configured one.
    if config.server.admin_access(admin_addr)? == AdminAccess::Loopback {
        tracing::info!(
            "admin port {admin_addr} has no key (${} is not set): open on loopback only",
            config.server.admin_key_env
        );
    }
    let handle = crate::metrics::install();
    let store = Store::from_url(config.ledger_url.expose(), &config.ledger_spool)?;
    let ledger = {
        let replica = config.server.replica.clone();
        let fsync = config.ledger_fsync;
        // Off the runtime: opening a PostgreSQL ledger connects and migrates.
        tokio::task::spawn_blocking(move || Ledger::open(store, fsync, replica))
            .await
            .map_err(|e| LedgerError::Thread(std::io::Error::other(e)))??
    };
    let tasks = Tasks::new();
    let budgets = Arc::new(budget_book(&config, &clock, &tasks)?);
    {
        let (budgets, ledger) = (budgets.clone(), ledger.clone());
        let teams = config.teams.clone();
        tokio::task::spawn_blocking(move || seed_budgets(&budgets, &ledger, &teams))
            .await
            .map_err(|e| LedgerError::Thread(std::io::Error::other(e)))??;
    }
    if let BudgetBook::Redis(book) = &*budgets {
        book.set_spend_source(Arc::new(LedgerSpend(ledger.clone())));
        // Served all the same: budgets without fail_open refuse until Redis answers.
        let up = book
            .start()
            .await
            .map_err(|e| StartError::BudgetStore(e.to_string()))?;
        if !up {
            tracing::error!(
                "store.budgets: Redis does not answer at start; requests under budgets without \
                 fail_open get 503 budget_store_unavailable until it does"
            );
        }
    }
    // Loading the encoders takes a moment; do it now, not on the first request to need them.
    load_encodings(&config).await;
    let opts = ServeOptions {
        header_read_timeout: config.server.header_read_timeout,
        shutdown_grace: config.server.shutdown_grace,
    };
    let max_in_flight = config.server.max_in_flight;
    let live: Live = Arc::new(ArcSwap::from_pointee(LiveState::build_with_clock(
        config, None, clock,
    )));
    crate::probe::ensure_probes(&live, &tasks);
    let (shutdown, signal) = watch::channel(false);
    // The admin port outlives the client port: `/readyz` answers 503 through the whole drain.
    let (admin_shutdown, admin_signal) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // The layers every request passes, outermost first.
    let service = ServiceBuilder::new()
        // First, so even a shed request's response carries an id to quote.
        .layer(RequestIdLayer)
        // Before any work: shedding must cost nothing.
        .layer(InFlightLimitLayer::new(max_in_flight))
        // Innermost: a panic in a phase becomes a 500 that still carries the request id and
        // releases the in-flight permit.
        .layer(CatchPanicLayer)
        .service(Gateway::new(
            live.clone(),
            ledger.clone(),
            budgets.clone(),
            tasks.clone(),
        ));
    let service = TowerToHyperService::new(service);

    let admin = Admin {
        live: live.clone(),
        metrics: handle.clone(),
        draining: Arc::new(AtomicBool::new(false)),
        config_path,
        ledger: ledger.clone(),
        budgets: budgets.clone(),
        forecast: Arc::new(crate::budget::forecast::Forecaster::new()),
        tasks: tasks.clone(),
    };
    // The alerts webhook's check and send loops (idle without `alerts.url`).
    crate::admin::alerts::start(&admin);
    let admin_service = {
        let admin = admin.clone();
        hyper::service::service_fn(move |req| admin.clone().handle(req))
    };

    let servers = vec![
        tasks.spawn({
            let tasks = tasks.clone();
            let stop = stopped(signal.clone());
            async move { server::serve(client, service, opts, &tasks, stop).await }
        }),
        tasks.spawn({
            let tasks = tasks.clone();
            let stop = stopped(admin_signal);
            async move { server::serve(admin_listener, admin_service, opts, &tasks, stop).await }
        }),
    ];
    // Background loops: they end when shutdown begins.
    let stop = tasks.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::metrics::upkeep(handle) => {}
            _ = stop.stopping() => {}
        }
    });
    let (stop, weak) = (tasks.clone(), Arc::downgrade(&live));
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::finops::gpu::watch(weak) => {}
            _ = stop.stopping() => {}
        }
    });
    #[cfg(unix)]
    if admin.config_path.is_some() {
        let admin = admin.clone();
        let mut stop = shutdown.subscribe();
        tasks.spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => if let Err(e) = admin.reload() {
                        tracing::error!("reload refused, keeping the running config: {e}");
                    },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    }
    tracing::info!(%addr, %admin_addr, "tollgate listening");
    Ok(Running {
        addr,
        admin_addr,
        live,
        admin,
        ledger,
        shutdown,
        admin_shutdown,
        servers,
        tasks,
    })
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the grace period), waits for
    /// every task (a record may still be on its way: a drained stream, a count), then closes
    /// the ledger once everything is written.
    pub async fn shutdown(self) {
        self.admin.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let mut servers = self.servers.into_iter();
        if let Some(client) = servers.next() {
            let _ = client.await;
        }
        let _ = self.admin_shutdown.send(true);
        for s in servers {
            let _ = s.await;
        }
        self.tasks.close_and_wait().await;
        // Every response has ended and every task with it: write all records before exit.
        let ledger = self.ledger;
        let _ = tokio::task::spawn_blocking(move || ledger.close()).await;
    }
}

/// The budget store the config names.
fn budget_book(
    config: &Config,
    clock: &Arc<dyn Clock>,
    tasks: &Tasks,
) -> Result<BudgetBook, StartError> {
    match &config.budget_store {
        BudgetStore::Local => Ok(BudgetBook::new(clock.clone())),
        BudgetStore::Redis(cfg) => RedisBook::new(cfg.clone(), clock.clone(), tasks.clone())
            .map(BudgetBook::Redis)
            .map_err(|e| {
                StartError::BudgetStore(crate::secret::redact_urls(&e.to_string()).into_owned())
            }),
    }
}

/// Starts every budget counter from what the ledger already holds for its current window,
/// so a restart neither forgets spend nor counts it twice. In fleet mode that is PostgreSQL
/// plus the local spool (records PostgreSQL has not received yet); PostgreSQL out of reach
/// leaves the spool alone to count, said loudly.
fn seed_budgets(
    book: &BudgetBook,
    ledger: &Ledger,
    teams: &[Arc<crate::config::Team>],
) -> Result<(), StartError> {
    let now = book.now_us();
    let read_err = |e: ReadError| LedgerError::Read {
        store: ledger.store.display(),
        source: e,
    };
    let readers = ledger_readers(&ledger.store).map_err(read_err)?;
    for team in teams {
        let budgets: Vec<(Window, bool)> =
            team.budgets.iter().map(|b| (b.window, b.per_key)).collect();
        for s in team_spend(&readers, &team.name, &budgets, now).map_err(read_err)? {
            book.seed(&team.name, s.key_id, s.window, s.start_us, s.spent);
        }
        for b in &team.budgets {
            if let (Some(nusd), false) = (b.nusd, b.per_key) {
                metrics::gauge!(crate::metrics::BUDGET_LIMIT_USD, "team" => team.name.clone(), "window" => b.window.as_str())
                    .set(nusd as f64 / 1e9);
            }
        }
    }
    Ok(())
}

/// What budget counters are rebuilt from: the spool first, so a record the writer moves to
/// PostgreSQL meanwhile is counted twice (a budget a little stricter for this window), never
/// not at all; then the ledger itself. PostgreSQL out of reach is logged, and the spool alone
/// counts; an unreadable SQLite ledger is an error.
fn ledger_readers(store: &Store) -> Result<Vec<Reader>, ReadError> {
    let mut readers = Vec::new();
    if let Some(spool) = store.spool_reader() {
        readers.push(spool?);
    }
    match (store.reader(), store) {
        (Ok(r), _) => readers.push(r),
        (Err(e), Store::Postgres { .. }) => tracing::error!(
            ledger = %store.display(), error = %e,
            "cannot read the PostgreSQL ledger: budgets start from the local spool only"
        ),
        (Err(e), Store::Sqlite(_)) => return Err(e),
    }
    Ok(readers)
}

/// The spend of `team` in the current window of each budget (window, per key), summed over
/// the readers first: a Redis store takes each seed as a floor (the larger of it and what
/// Redis holds), so one seed per counter must carry it all. A team-wide counter gets a seed
/// even when nothing was spent, so the store learns the team is seeded.
fn team_spend(
    readers: &[Reader],
    team: &str,
    budgets: &[(Window, bool)],
    now: i64,
) -> Result<Vec<LedgerSeed>, ReadError> {
    let mut out = Vec::new();
    for &(window, per_key) in budgets {
        let (start, _) = crate::budget::window::bounds(window, now);
        let mut spent: std::collections::BTreeMap<Option<String>, Demand> = Default::default();
        if !per_key {
            spent.insert(None, Demand::default());
        }
        for reader in readers {
            for (key, nusd, tokens) in
                crate::ledger::read::spend_since(reader, team, start, per_key)?
            {
                let d = spent.entry(key).or_default();
                d.nusd = d.nusd.saturating_add(nusd);
                d.tokens = d.tokens.saturating_add(tokens);
            }
        }
        out.extend(spent.into_iter().map(|(key, spent)| LedgerSeed {
            window,
            start_us: start,
            key_id: key.map(Arc::from),
            spent,
        }));
    }
    Ok(out)
}

/// The ledger as a running Redis budget store's source when Redis loses counters.
struct LedgerSpend(Arc<Ledger>);

impl SpendSource for LedgerSpend {
    fn spend(
        &self,
        team: &str,
        budgets: &[(Window, bool)],
        now_us: i64,
    ) -> Result<Vec<LedgerSeed>, SpendUnreadable> {
        // Records still in the journal count too (a short wait: this runs off the runtime).
        self.0.flush(crate::ledger::FLUSH_WAIT);
        let readers = ledger_readers(&self.0.store).map_err(|e| SpendUnreadable(e.into()))?;
        team_spend(&readers, team, budgets, now_us).map_err(|e| SpendUnreadable(e.into()))
    }
}

/// Builds the token encoders the configured models need (a few hundred milliseconds each),
/// off the runtime; already built ones cost nothing.
async fn load_encodings(config: &Config) {
    let encodings: std::collections::BTreeSet<_> = config
        .backends
        .iter()
        .flat_map(|b| {
            b.models
                .iter()
                .map(|m| crate::tokens::Encoding::for_model(&m.name).encoding)
        })
        .collect();
    let _ = tokio::task::spawn_blocking(move || {
        let tok = Tokenizers::shared();
        for enc in encodings {
            tok.load(enc);
        }
    })
    .await;
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn terminate_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
