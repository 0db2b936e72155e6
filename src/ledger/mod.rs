//! The ledger: one record per request, success or failure, written by one thread in
//! group commits.
//!
//! ```text
//!  requests ──record + waiter──► channel ──► writer thread: drain all queued, one
//!                                            transaction, commit, wake every waiter
//!  response's last bytes ◄──────────────── waiter says committed
//! ```
//!
//! A response's last bytes leave only after its record is committed. With `store.fsync =
//! false` (default) a commit is a `write()` into SQLite's WAL, which the kernel keeps when the
//! process is killed; with `fsync = true` it also survives power loss, for the cost of one
//! fsync per group commit. When a commit fails (disk full, directory gone), the ledger turns
//! unhealthy and the gateway refuses billable requests with 503 until a retry succeeds.
//!
//! With `store.ledger = "postgres://…"` (fleet mode) the same thread writes to PostgreSQL and,
//! while PostgreSQL cannot be reached, to a local SQLite spool; see `fleet.rs`.

mod fleet;
pub mod pg_tls;
pub mod postgres;
pub mod read;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod testing;

use crate::meter::TokenSource;
use crate::secret::Secret;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Records per transaction at most; a larger backlog is split.
const MAX_BATCH: usize = 1024;
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(250);

/// One request, as the ledger keeps it.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub started_at_us: i64,
    pub ended_at_us: i64,
    pub team: Arc<str>,
    pub key_id: Arc<str>,
    /// The request's tags as a JSON object.
    pub tags: String,
    pub endpoint: &'static str,
    pub requested_model: Arc<str>,
    pub backend: Option<Arc<str>>,
    pub served_model: Option<Arc<str>>,
    /// `None`: unknown (not zero).
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub cache_write_tokens: Option<u64>,
    /// Of `cache_write_tokens`, those written for an hour (Anthropic's dearer TTL).
    pub cache_write_1h_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    pub token_source: Option<TokenSource>,
    pub cost_nusd: i64,
    /// False when the model has no price anywhere: its cost is egress only, and reports flag it.
    pub priced: bool,
    pub egress_bytes: u64,
    /// `ok`, `client_closed`, `upstream_broken`, `upstream_error`, `gateway_error`.
    pub status: &'static str,
    pub http_status: u16,
    pub attempts: u32,
    /// Attempts sent after one whose backend may have begun working on the request.
    pub resent: u32,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub stream: bool,
    /// The gateway process that served the request (`server.replica`).
    pub replica: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot open the ledger at {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("the ledger URL `{0}` is not supported (use sqlite://path or postgres://…)")]
    Unsupported(String),
    /// `url` is shown with its password hidden.
    #[error("store.ledger `{url}`: {source}")]
    Postgres {
        url: String,
        source: postgres::PgError,
    },
    #[error("cannot open the ledger spool at {path}: {source}")]
    Spool {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot start the ledger writer: {0}")]
    Thread(std::io::Error),
    #[error("cannot read the ledger at {store}: {source}")]
    Read {
        store: String,
        source: read::ReadError,
    },
}

/// Where the ledger lives.
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded ledger file.
    Sqlite(PathBuf),
    /// The fleet ledger; `spool` keeps records while PostgreSQL cannot be reached. The URL
    /// may hold a password: a `Secret`, so no debug print shows it.
    Postgres { url: Secret, spool: PathBuf },
}

impl Store {
    /// `store.ledger` as validated; `spool` is `store.spool`'s path.
    pub fn from_url(url: &str, spool: &Path) -> Result<Store, LedgerError> {
        if let Some(p) = url.strip_prefix("sqlite://") {
            Ok(Store::Sqlite(PathBuf::from(p)))
        } else if postgres::is_postgres_url(url) {
            Ok(Store::Postgres {
                url: Secret::new(url),
                spool: spool.to_path_buf(),
            })
        } else {
            let shown = crate::secret::redact_url(url).into_owned();
            Err(LedgerError::Unsupported(shown))
        }
    }

    /// What to call the store in messages: the password never shows.
    pub fn display(&self) -> String {
        match self {
            Store::Sqlite(p) => p.display().to_string(),
            Store::Postgres { url, .. } => crate::secret::redact_url(url.expose()).into_owned(),
        }
    }

    /// A read connection: PostgreSQL in fleet mode, else the file. Blocks; call off the runtime.
    pub fn reader(&self) -> Result<read::Reader, read::ReadError> {
        match self {
            Store::Sqlite(p) => read::Reader::sqlite(p),
            Store::Postgres { url, .. } => read::Reader::postgres(url.expose()),
        }
    }

    /// The spool's reader, when there is a spool file: records PostgreSQL does not have yet.
    pub fn spool_reader(&self) -> Option<Result<read::Reader, read::ReadError>> {
        match self {
            Store::Postgres { spool, .. } if spool.exists() => Some(read::Reader::sqlite(spool)),
            _ => None,
        }
    }
}

/// Told whether the record was committed.
pub type Reply = Box<dyn FnOnce(bool) + Send>;

type Msg = (Box<Record>, Option<Reply>);

/// Handle to the writer thread; cheap to share.
#[derive(Debug)]
pub struct Ledger {
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    healthy: Arc<AtomicBool>,
    writer: Mutex<Option<JoinHandle<()>>>,
    pub store: Store,
    /// Stamped on every record this process writes.
    pub replica: Arc<str>,
    /// Records in the spool (fleet mode): written locally, not yet in PostgreSQL.
    spooled: Arc<AtomicU64>,
}

impl Ledger {
    /// Opens (creating if needed) the ledger named by `store.ledger`. In fleet mode this
    /// connects and migrates; PostgreSQL out of reach is not an error (records spool), a bad
    /// URL, a refused login or a missing database is.
    pub fn open(store: Store, fsync: bool, replica: Arc<str>) -> Result<Arc<Ledger>, LedgerError> {
        let (tx, rx) = mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let spooled = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new().name("tollgate-ledger".into());
        let writer = match &store {
            Store::Sqlite(path) => {
                let conn = sqlite::open(path, fsync).map_err(|source| LedgerError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
                let (healthy, path) = (healthy.clone(), path.clone());
                thread.spawn(move || write_loop(conn, path, fsync, rx, healthy))
            }
            Store::Postgres { url, spool } => {
                let w = fleet::Writer::open(
                    url.expose(),
                    spool,
                    fsync,
                    healthy.clone(),
                    spooled.clone(),
                )?;
                thread.spawn(move || w.run(rx))
            }
        }
        .map_err(LedgerError::Thread)?;
        Ok(Arc::new(Ledger {
            tx: Mutex::new(Some(tx)),
            healthy,
            writer: Mutex::new(Some(writer)),
            store,
            replica,
            spooled,
        }))
    }

    /// Records in the spool waiting for PostgreSQL; always 0 for an embedded ledger.
    pub fn spooled(&self) -> u64 {
        self.spooled.load(Ordering::Relaxed)
    }

    /// False while commits fail: billable requests must be refused.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Queues a record; `reply` (if any) is told whether it was committed.
    pub fn submit(&self, record: Record, reply: Option<Reply>) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let unsent = match tx.as_ref() {
            Some(tx) => tx
                .send((Box::new(record), reply))
                .err()
                .map(|mpsc::SendError((_, reply))| reply),
            None => Some(reply),
        };
        if let Some(reply) = unsent {
            tracing::error!("the ledger is closed; a record was lost");
            if let Some(r) = reply {
                r(false);
            }
        }
    }

    /// Writes everything queued, then stops the writer. Blocks: call off the runtime.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

fn write_loop(
    mut conn: rusqlite::Connection,
    path: PathBuf,
    fsync: bool,
    rx: mpsc::Receiver<Msg>,
    healthy: Arc<AtomicBool>,
) {
    let mut batch: Vec<Msg> = Vec::new();
    while let Ok(msg) = rx.recv() {
        batch.push(msg);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(msg) => batch.push(msg),
                Err(_) => break,
            }
        }
        loop {
            // SQLite keeps writing to a file that was unlinked; notice and start a new one.
            if !path.exists() {
                tracing::error!(path = %path.display(), "the ledger file was removed; creating a new one");
                match sqlite::open(&path, fsync) {
                    Ok(c) => conn = c,
                    Err(e) => {
                        fail(&healthy, &mut batch, &e);
                        std::thread::sleep(RETRY_AFTER_ERROR);
                        continue;
                    }
                }
            }
            match sqlite::insert_batch(&mut conn, batch.iter().map(|(r, _)| &**r)) {
                Ok(()) => {
                    if !healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!("ledger writes succeed again");
                    }
                    for (_, reply) in batch.drain(..) {
                        if let Some(reply) = reply {
                            reply(true);
                        }
                    }
                    break;
                }
                Err(e) => {
                    fail(&healthy, &mut batch, &e);
                    std::thread::sleep(RETRY_AFTER_ERROR);
                }
            }
        }
    }
}

/// Marks the ledger unhealthy and tells every waiter now; the records stay queued for retry,
/// because the upstream spend they describe happened either way.
fn fail(healthy: &AtomicBool, batch: &mut [Msg], e: &dyn std::fmt::Display) {
    if healthy.swap(false, Ordering::Relaxed) {
        tracing::error!(error = %e, "ledger write failed: refusing billable requests until it recovers");
    }
    metrics::counter!(crate::metrics::LEDGER_ERRORS_TOTAL).increment(1);
    for (_, reply) in batch.iter_mut() {
        if let Some(reply) = reply.take() {
            reply(false);
        }
    }
}
