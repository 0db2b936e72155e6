//! The fleet ledger's writer: PostgreSQL when it answers, a local SQLite spool when not.
//!
//! ```text
//!  batch ──► spool empty and PostgreSQL up? ──yes──► INSERT … ON CONFLICT DO NOTHING ─► reply ok
//!              │ no (or the insert fails)
//!              └──────────► append to spool (SQLite, committed) ─► reply ok
//!  between batches, while the spool holds records and PostgreSQL is up:
//!     oldest ≤ MAX_BATCH spooled rows (rowid order) ─► INSERT … ON CONFLICT DO NOTHING ─► DELETE them
//! ```
//!
//! The durability promise holds either way: a reply says committed only once the record is
//! in PostgreSQL or in the spool. While the spool is not empty new records go behind it, so
//! PostgreSQL receives records in the order they were written. Rows are deleted from the
//! spool only after PostgreSQL confirmed them; a crash between the two replays rows that are
//! already there, and the conflict clause keeps them once. A restart finds the spool file and
//! goes on draining it.
//!
//! All of it runs on the ledger thread with a one-worker runtime of its own: the worker
//! drives the connection and a reconnect attempt in the background, so a PostgreSQL that does
//! not answer costs the requests waiting on a commit at most [`super::postgres::WRITE_TIMEOUT`]
//! once, not a connect timeout per batch.

use super::postgres::{self, PgError};
use super::{fail, sqlite, LedgerError, Msg, Record, MAX_BATCH, RETRY_AFTER_ERROR};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};

/// How often a writer with a non-empty spool tries PostgreSQL again, and drains when idle.
const RECONNECT_EVERY: Duration = Duration::from_millis(500);
/// How long a stopping gateway keeps draining its spool before leaving the rest for its
/// next start.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

type Connecting = JoinHandle<Result<(Client, Driver), PgError>>;
type Driver = postgres::Connection;

pub(super) struct Writer {
    target: postgres::Target,
    /// The URL with its password hidden, for log lines.
    shown: String,
    rt: tokio::runtime::Runtime,
    conn: Option<Conn>,
    connecting: Option<Connecting>,
    next_try: Instant,
    /// The last reconnect failure logged: each new kind of failure is logged once, not
    /// every attempt.
    last_error: Option<String>,
    spool: rusqlite::Connection,
    spool_path: PathBuf,
    spooled: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
}

/// A live connection with what the writer prepared on it.
struct Conn {
    client: Client,
    insert: Statement,
    /// Month starts whose partition exists.
    months: HashSet<i64>,
}

impl Writer {
    /// Connects and migrates; PostgreSQL out of reach means spooling from the start, loudly.
    pub(super) fn open(
        url: &str,
        spool_path: &Path,
        fsync: bool,
        healthy: Arc<AtomicBool>,
        spooled: Arc<AtomicU64>,
    ) -> Result<Writer, LedgerError> {
        let shown = crate::secret::redact_url(url).into_owned();
        let pg_err = {
            let shown = shown.clone();
            move |source| LedgerError::Postgres {
                url: shown.clone(),
                source,
            }
        };
        let target = postgres::parse(url).map_err(&pg_err)?;
        let spool = sqlite::open(spool_path, fsync).map_err(|source| LedgerError::Spool {
            path: spool_path.display().to_string(),
            source,
        })?;
        let waiting = sqlite::count(&spool).map_err(|source| LedgerError::Spool {
            path: spool_path.display().to_string(),
            source,
        })?;
        spooled.store(waiting, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::LEDGER_SPOOLED_RECORDS).set(waiting as f64);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-ledger-pg")
            .enable_all()
            .build()
            .map_err(|e| pg_err(PgError::Runtime(e)))?;
        let mut w = Writer {
            target,
            shown,
            rt,
            conn: None,
            connecting: None,
            next_try: crate::clock::now(),
            last_error: None,
            spool,
            spool_path: spool_path.to_path_buf(),
            spooled,
            healthy,
        };
        let first = w.rt.block_on(postgres::connect(&w.target));
        match first.and_then(|(client, driver)| w.set_up(client, driver)) {
            Ok(conn) => w.conn = Some(conn),
            Err(e) if e.is_permanent() => return Err(pg_err(e)),
            Err(e) => {
                tracing::error!(
                    ledger = %w.shown, error = %e, spool = %w.spool_path.display(),
                    "PostgreSQL ledger unreachable at start: records go to the local spool until it answers"
                );
                w.next_try = crate::clock::now() + RECONNECT_EVERY;
            }
        }
        if waiting > 0 {
            tracing::warn!(
                records = waiting, spool = %w.spool_path.display(),
                "the ledger spool holds records from an earlier run: replaying them into PostgreSQL"
            );
        }
        Ok(w)
    }

    /// The ledger thread's loop; ends when every sender is gone and the queue is written.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut batch: Vec<Msg> = Vec::new();
        // Whether the last drain moved records: then the next chunk goes at once, else the
        // writer waits for records or the next reconnect attempt.
        let mut draining = false;
        loop {
            let first = if self.spooled() > 0 && draining {
                match rx.try_recv() {
                    Ok(msg) => Some(msg),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            } else if self.spooled() > 0 {
                match rx.recv_timeout(RECONNECT_EVERY) {
                    Ok(msg) => Some(msg),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => break,
                }
            };
            if let Some(msg) = first {
                batch.push(msg);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(msg) => batch.push(msg),
                        Err(_) => break,
                    }
                }
                self.write(&mut batch);
            }
            draining = self.spooled() > 0 && self.drain_some();
        }
        // Shutting down: hand PostgreSQL what it takes within a bound (a long backlog must not
        // hold the exit); the rest waits in the spool for the next start.
        let until = crate::clock::now() + SHUTDOWN_DRAIN;
        while self.spooled() > 0 && self.conn.is_some() && crate::clock::now() < until {
            if !self.drain_some() {
                break;
            }
        }
    }

    fn spooled(&self) -> u64 {
        self.spooled.load(Ordering::Relaxed)
    }

    /// Commits `batch` to PostgreSQL or the spool and tells its waiters.
    fn write(&mut self, batch: &mut Vec<Msg>) {
        if self.spooled() == 0 && self.ready() {
            let records: Vec<&Record> = batch.iter().map(|(r, _)| &**r).collect();
            match self.insert(&records) {
                Ok(_) => {
                    self.recovered();
                    for (_, reply) in batch.drain(..) {
                        if let Some(reply) = reply {
                            reply(true);
                        }
                    }
                    return;
                }
                Err(e) => self.lost(&e),
            }
        }
        loop {
            match sqlite::insert_batch(&mut self.spool, batch.iter().map(|(r, _)| &**r)) {
                Ok(()) => {
                    self.recovered();
                    let before = self
                        .spooled
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if before == 0 {
                        tracing::warn!(
                            ledger = %self.shown, spool = %self.spool_path.display(),
                            "PostgreSQL ledger not writable: spooling records locally"
                        );
                    }
                    self.gauge();
                    for (_, reply) in batch.drain(..) {
                        if let Some(reply) = reply {
                            reply(true);
                        }
                    }
                    return;
                }
                Err(e) => {
                    fail(&self.healthy, batch, &e);
                    std::thread::sleep(RETRY_AFTER_ERROR);
                }
            }
        }
    }

    /// Moves the oldest spooled records to PostgreSQL; false when it could not.
    fn drain_some(&mut self) -> bool {
        if !self.ready() {
            return false;
        }
        let rows = match sqlite::read_oldest(&self.spool, MAX_BATCH) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, spool = %self.spool_path.display(), "cannot read the ledger spool");
                return false;
            }
        };
        let Some(&(last, _)) = rows.last() else {
            // Counted more than the file holds (removed by hand): nothing to wait for.
            self.spooled.store(0, Ordering::Relaxed);
            self.gauge();
            return false;
        };
        let records: Vec<&Record> = rows.iter().map(|(_, r)| r).collect();
        if let Err(e) = self.insert(&records) {
            self.lost(&e);
            return false;
        }
        if let Err(e) = sqlite::delete_through(&self.spool, last) {
            // PostgreSQL has them; the next pass sends them again and they are skipped.
            tracing::error!(error = %e, spool = %self.spool_path.display(), "cannot trim the ledger spool");
            return false;
        }
        let left = self
            .spooled
            .load(Ordering::Relaxed)
            .saturating_sub(rows.len() as u64);
        self.spooled.store(left, Ordering::Relaxed);
        self.gauge();
        if left == 0 {
            tracing::info!(ledger = %self.shown, "ledger spool drained into PostgreSQL");
        }
        true
    }

    fn insert(&mut self, records: &[&Record]) -> Result<u64, PgError> {
        let Some(c) = self.conn.as_mut() else {
            return Err(PgError::Timeout(Duration::ZERO));
        };
        let work = async {
            postgres::ensure_partitions(
                &mut c.client,
                &mut c.months,
                records.iter().map(|r| r.started_at_us),
            )
            .await?;
            postgres::insert_batch(&c.client, &c.insert, records).await
        };
        match self
            .rt
            .block_on(async { tokio::time::timeout(postgres::WRITE_TIMEOUT, work).await })
        {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(postgres::WRITE_TIMEOUT)),
        }
    }

    /// True with a live connection. Otherwise starts (or collects) a background attempt, at
    /// most every [`RECONNECT_EVERY`], and answers false without waiting for it.
    fn ready(&mut self) -> bool {
        if self.conn.as_ref().is_some_and(|c| !c.client.is_closed()) {
            return true;
        }
        self.conn = None;
        if let Some(attempt) = self.connecting.take_if(|a| a.is_finished()) {
            let done = match self.rt.block_on(attempt) {
                Ok(r) => r.and_then(|(client, driver)| self.set_up(client, driver)),
                Err(e) => Err(PgError::Runtime(std::io::Error::other(e))),
            };
            match done {
                Ok(conn) => {
                    tracing::info!(ledger = %self.shown, "PostgreSQL ledger connected");
                    self.conn = Some(conn);
                    self.last_error = None;
                    return true;
                }
                Err(e) => {
                    let message = e.to_string();
                    if self.last_error.as_deref() != Some(message.as_str()) {
                        if e.is_permanent() {
                            // A changed password or a dropped database: no retry cures it,
                            // but the spool still keeps every record, so keep serving.
                            tracing::error!(ledger = %self.shown, error = %message, "PostgreSQL ledger refuses the connection; records stay in the spool");
                        } else {
                            tracing::warn!(ledger = %self.shown, error = %message, "PostgreSQL ledger still unreachable");
                        }
                        self.last_error = Some(message);
                    }
                    self.next_try = crate::clock::now() + RECONNECT_EVERY;
                }
            }
        }
        if self.connecting.is_none() && crate::clock::now() >= self.next_try {
            let target = self.target.clone();
            self.connecting = Some(
                self.rt
                    .spawn(async move { postgres::connect(&target).await }),
            );
        }
        false
    }

    /// Drives a new connection, migrates and prepares the insert.
    fn set_up(&self, mut client: Client, driver: Driver) -> Result<Conn, PgError> {
        // The driver belongs to this writer's runtime and ends with the connection; the
        // gateway's tracker waits for the ledger thread, which owns both.
        self.rt.spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "PostgreSQL ledger connection closed");
            }
        });
        let work = async {
            postgres::migrate(&mut client).await?;
            let mut months = HashSet::new();
            postgres::ensure_months_ahead(&mut client, &mut months, crate::clock::unix_now_us())
                .await?;
            let insert = postgres::prepare_insert(&client).await?;
            Ok(Conn {
                client,
                insert,
                months,
            })
        };
        match self
            .rt
            .block_on(async { tokio::time::timeout(postgres::WRITE_TIMEOUT, work).await })
        {
            Ok(r) => r,
            Err(_) => Err(PgError::Timeout(postgres::WRITE_TIMEOUT)),
        }
    }

    /// A write to PostgreSQL failed: drop the connection (a new one is tried shortly).
    fn lost(&mut self, e: &PgError) {
        if self.conn.take().is_some() || self.spooled() == 0 {
            tracing::warn!(ledger = %self.shown, error = %e, "PostgreSQL ledger write failed");
        }
        self.next_try = crate::clock::now() + RECONNECT_EVERY;
    }

    fn recovered(&self) {
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("ledger writes succeed again");
        }
    }

    fn gauge(&self) {
        metrics::gauge!(crate::metrics::LEDGER_SPOOLED_RECORDS).set(self.spooled() as f64);
    }
}
