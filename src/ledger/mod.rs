//! The ledger: one record per request, success or failure.
//!
//! ```text
//!  requests ──record──► journal (a mapped file): stored = safe from a killed process
//!                          │                      └─► response's last bytes, at once
//!                          ▼ behind the requests, in batches
//!                       ledger thread: one transaction: the journal's records + how far
//!                       it is loaded, commit
//!  requests ──record + waiter──► queue ──► the same transaction, then wake every waiter
//!  (journal full or gone, store.fsync, fleet mode)            └─► response's last bytes
//! ```
//!
//! A response's last bytes leave only after its record is safe from a killed process: stored
//! in the journal (`journal.rs`), or committed. With `store.fsync = false` (default) a commit
//! is a `write()` into SQLite's WAL, which the kernel keeps when the process is killed; with
//! `fsync = true` every record takes the queue and its commit fsyncs, which survives power loss.
//! When a commit fails (disk full, directory gone), the ledger turns unhealthy and the gateway
//! refuses billable requests with 503 until a retry succeeds; records stay in the journal (or
//! the queue) meanwhile. Readers in this process call [`Ledger::flush`] first, so that they see
//! every completed request; records a killed process left in the journal are loaded when the
//! ledger opens again.
//!
//! With `store.ledger = "postgres://…"` (fleet mode) the thread writes to PostgreSQL and,
//! while PostgreSQL cannot be reached, to a local SQLite spool; see `fleet.rs`.

mod fleet;
pub mod journal;
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
/// After a wake-up by the journal, how long the ledger thread lets records gather before its
/// commit: at a low rate, several requests share one commit; readers flush instead of waiting.
const GATHER: Duration = Duration::from_millis(50);
/// Journal bytes loaded between two releases of their pages from RSS.
const RELEASE_EVERY: u64 = 256 << 10;
/// How long a reader waits for a flush before reading what is there (the store failing).
pub const FLUSH_WAIT: Duration = Duration::from_secs(2);

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
    #[error("cannot open the ledger's journal: {0}")]
    Journal(#[from] journal::JournalError),
    #[error("cannot load the journal into the ledger at {path}: {source}")]
    Recover {
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

/// What the embedded ledger's thread is asked.
enum Job {
    /// A record that waits for its commit: the journal was full or gone, or `fsync` is on.
    Write(Box<Record>, Option<Reply>),
    /// Records are in the journal and the thread was idle.
    Wake,
    /// Told once everything stored in the journal before now is committed (false: the
    /// store is failing).
    Flush(Reply),
}

#[derive(Debug)]
enum Queue {
    Local(mpsc::Sender<Job>),
    Fleet(mpsc::Sender<Msg>),
}

thread_local! {
    /// A record's encoding for the journal, reused: no allocation per request.
    static ENCODED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Handle to the writer thread; cheap to share.
#[derive(Debug)]
pub struct Ledger {
    queue: Mutex<Option<Queue>>,
    /// The embedded ledger's journal; absent in fleet mode, or when another process has it.
    journal: Option<Arc<journal::Journal>>,
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
        let healthy = Arc::new(AtomicBool::new(true));
        let spooled = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new().name("tollgate-ledger".into());
        let (queue, journal, writer) = match &store {
            Store::Sqlite(path) => {
                let open_error = |source| LedgerError::Open {
                    path: path.display().to_string(),
                    source,
                };
                let mut conn = sqlite::open(path, fsync).map_err(open_error)?;
                let journal = open_journal(path, &mut conn, fsync)?;
                let (tx, rx) = mpsc::channel();
                let loader = Loader {
                    conn,
                    path: path.clone(),
                    fsync,
                    released: journal.as_ref().map_or(0, |j| j.loaded()),
                    journal: journal.clone(),
                    healthy: healthy.clone(),
                };
                let writer = thread.spawn(move || loader.run(rx));
                (Queue::Local(tx), journal, writer)
            }
            Store::Postgres { url, spool } => {
                let w = fleet::Writer::open(
                    url.expose(),
                    spool,
                    fsync,
                    healthy.clone(),
                    spooled.clone(),
                )?;
                let (tx, rx) = mpsc::channel();
                (Queue::Fleet(tx), None, thread.spawn(move || w.run(rx)))
            }
        };
        let writer = writer.map_err(LedgerError::Thread)?;
        Ok(Arc::new(Ledger {
            queue: Mutex::new(Some(queue)),
            journal,
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

    /// Stores a record; `reply` (if any) is told whether it is safe: at once when the journal
    /// took it, else once the queue's commit is done.
    pub fn submit(&self, record: Record, reply: Option<Reply>) {
        if let Some(j) = self.journal.as_ref().filter(|j| j.usable()) {
            let stored = ENCODED.with_borrow_mut(|buf| {
                journal::encode(&record, buf);
                let stored = j.append(buf);
                if buf.capacity() > 64 << 10 {
                    // One huge record (tags at their limit) does not stay with the thread.
                    *buf = Vec::new();
                }
                stored
            });
            if stored {
                if let Some(reply) = reply {
                    reply(true);
                }
                // SeqCst, paired with the thread's: it sets `idle`, then looks for records.
                if j.idle.load(Ordering::SeqCst) && j.idle.swap(false, Ordering::SeqCst) {
                    // Closed: what it stored is loaded at the next start.
                    let _ = self.send(Job::Wake);
                }
                return;
            }
        }
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let unsent =
            match queue.as_ref() {
                Some(Queue::Local(tx)) => tx.send(Job::Write(Box::new(record), reply)).err().map(
                    |mpsc::SendError(job)| match job {
                        Job::Write(_, reply) => reply,
                        _ => None,
                    },
                ),
                Some(Queue::Fleet(tx)) => tx
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

    /// False when the thread is gone (closed).
    fn send(&self, job: Job) -> bool {
        match self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(Queue::Local(tx)) => tx.send(job).is_ok(),
            _ => false,
        }
    }

    /// Waits (up to `wait`) until every record stored so far is in the ledger's tables, so
    /// that a report read next sees every completed request; false when that did not happen
    /// in time. Fleet mode commits before it answers: nothing to wait for. Blocks: call off
    /// the runtime.
    pub fn flush(&self, wait: Duration) -> bool {
        if self.journal.is_none() {
            return true;
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let asked = self.send(Job::Flush(Box::new(move |ok| {
            let _ = tx.send(ok);
        })));
        asked && rx.recv_timeout(wait).unwrap_or(false)
    }

    /// Writes everything queued, then stops the writer. Blocks: call off the runtime.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = w.join();
        }
    }
}

/// Opens the journal beside `path` and loads what a stopped process left in it. `None` when
/// another process has it (a second gateway on the same file): records then take the queue.
fn open_journal(
    path: &Path,
    conn: &mut rusqlite::Connection,
    fsync: bool,
) -> Result<Option<Arc<journal::Journal>>, LedgerError> {
    let jpath = journal::path_for(path);
    // Without a journal the ledger still works, each record waiting for its commit as in
    // fleet mode: a journal that cannot be had is worth a warning, not a refusal to start.
    let j = match journal::Journal::open(&jpath) {
        Ok(j) => j,
        Err(journal::JournalError::Busy(p)) => {
            tracing::warn!(journal = %p, "another process has this ledger's journal: every record will wait for its commit");
            return Ok(None);
        }
        Err(e) => {
            tracing::error!(error = %e, "no ledger journal: every record will wait for its commit");
            return Ok(None);
        }
    };
    let recover_error = |source| LedgerError::Recover {
        path: path.display().to_string(),
        source,
    };
    let from = sqlite::journal_position(conn, j.file_id).map_err(recover_error)?;
    let (records, end) = j.recover(from);
    sqlite::insert_batch_at(conn, records.iter(), Some((j.file_id, end))).map_err(recover_error)?;
    j.mark_loaded(end);
    if let Err(e) = j.clear_ring() {
        tracing::error!(error = %e, journal = %jpath.display(), "cannot write the ledger journal (disk full?): every record will wait for its commit");
        return Ok(None);
    }
    if !records.is_empty() {
        tracing::info!(records = records.len(), journal = %jpath.display(), "loaded the records a stopped process left in the journal");
    }
    if fsync {
        j.retire();
    }
    Ok(Some(Arc::new(j)))
}

/// The embedded ledger's thread: loads the journal and the queue into SQLite.
struct Loader {
    conn: rusqlite::Connection,
    path: PathBuf,
    fsync: bool,
    journal: Option<Arc<journal::Journal>>,
    healthy: Arc<AtomicBool>,
    /// The journal's pages before this position are out of RSS.
    released: u64,
}

impl Loader {
    /// Ends when every sender is gone and everything stored is committed.
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut waiting: Vec<Msg> = Vec::new();
        // Flushes, each with the journal position it waits for.
        let mut flushes: Vec<(u64, Reply)> = Vec::new();
        let mut from_journal: Vec<Record> = Vec::new();
        let mut open = true;
        let pending = |j: &Option<Arc<journal::Journal>>| j.as_ref().is_some_and(|j| j.pending());
        loop {
            let take = |job: Job, waiting: &mut Vec<Msg>, flushes: &mut Vec<(u64, Reply)>| match job
            {
                Job::Write(r, reply) => waiting.push((r, reply)),
                Job::Wake => {}
                Job::Flush(reply) => {
                    let upto = self.journal.as_ref().map_or(0, |j| j.reserved());
                    flushes.push((upto, reply));
                }
            };
            if waiting.is_empty() && flushes.is_empty() && !pending(&self.journal) {
                if !open {
                    break;
                }
                if let Some(j) = &self.journal {
                    j.idle.store(true, Ordering::SeqCst);
                }
                if !pending(&self.journal) {
                    match rx.recv() {
                        Ok(job) => take(job, &mut waiting, &mut flushes),
                        Err(_) => open = false,
                    }
                }
                if let Some(j) = &self.journal {
                    j.idle.store(false, Ordering::SeqCst);
                }
                if waiting.is_empty() && flushes.is_empty() && open {
                    match rx.recv_timeout(GATHER) {
                        Ok(job) => take(job, &mut waiting, &mut flushes),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
                    }
                }
            }
            while waiting.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => take(job, &mut waiting, &mut flushes),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            from_journal.clear();
            let upto = self.journal.as_ref().map(|j| {
                if j.usable() && !j.still_at_path() {
                    tracing::error!(journal = %j.path.display(), "the ledger's journal was removed or replaced: every record will wait for its commit until the next start");
                    j.retire();
                }
                (j.file_id, j.read_ready(&mut from_journal))
            });
            let moved =
                upto.is_some_and(|(_, p)| Some(p) != self.journal.as_ref().map(|j| j.loaded()));
            if waiting.is_empty() && !moved {
                if !self.answer_flushes(&mut flushes) && pending(&self.journal) {
                    // A writer is between reserving and publishing: moments.
                    std::thread::sleep(Duration::from_millis(1));
                }
                continue;
            }
            if self.commit(&from_journal, &mut waiting, upto) {
                self.answer_flushes(&mut flushes);
            } else {
                for (_, reply) in flushes.drain(..) {
                    reply(false);
                }
                if !open && waiting.is_empty() {
                    // Shutting down: what is left is safe in the journal; the next start
                    // loads it. Waiting here would hold the exit for as long as the disk fails.
                    tracing::error!("the ledger cannot be written at shutdown: records left in the journal load at the next start");
                    break;
                }
                std::thread::sleep(RETRY_AFTER_ERROR);
            }
        }
    }

    /// Tells the flushes whose records are all loaded; true when none is left waiting.
    fn answer_flushes(&self, flushes: &mut Vec<(u64, Reply)>) -> bool {
        let loaded = self.journal.as_ref().map_or(u64::MAX, |j| j.loaded());
        let mut i = 0;
        while i < flushes.len() {
            if flushes[i].0 <= loaded {
                (flushes.swap_remove(i).1)(true);
            } else {
                i += 1;
            }
        }
        flushes.is_empty()
    }

    /// One transaction: the journal's records, the queue's, and how far the journal is loaded.
    fn commit(
        &mut self,
        from_journal: &[Record],
        waiting: &mut Vec<Msg>,
        upto: Option<(u64, u64)>,
    ) -> bool {
        // SQLite keeps writing to a file that was unlinked; notice and start a new one.
        if !self.path.exists() {
            tracing::error!(path = %self.path.display(), "the ledger file was removed; creating a new one");
            match sqlite::open(&self.path, self.fsync) {
                Ok(c) => self.conn = c,
                Err(e) => {
                    fail(&self.healthy, waiting, &e);
                    return false;
                }
            }
        }
        let records = from_journal.iter().chain(waiting.iter().map(|(r, _)| &**r));
        match sqlite::insert_batch_at(&mut self.conn, records, upto) {
            Ok(()) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("ledger writes succeed again");
                }
                if let (Some(j), Some((_, pos))) = (&self.journal, upto) {
                    j.mark_loaded(pos);
                    if pos >= self.released + RELEASE_EVERY {
                        self.released = j.release(self.released, pos);
                    }
                }
                for (_, reply) in waiting.drain(..) {
                    if let Some(reply) = reply {
                        reply(true);
                    }
                }
                true
            }
            Err(e) => {
                fail(&self.healthy, waiting, &e);
                false
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
